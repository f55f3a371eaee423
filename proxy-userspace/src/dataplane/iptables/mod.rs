//! The iptables dataplane: kube-proxy's iptables mode, for nodes where eBPF
//! cannot run, and the baseline kpr is measured against.
//!
//! Each sync is one `iptables-restore --noflush` transaction. Like
//! kube-proxy since 1.28, a sync rewrites only the chains of the Services
//! that changed (plus the small top-level chains), and a full resync runs
//! periodically and after any failure.

pub mod backend;
pub mod render;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use backend::Backend;
use render::{RenderConfig, Scope, chains_of, render};

use super::{ApplyError, Dataplane, DataplaneError, Desired, Mode};
use crate::{
    frontend::{Frontend, FrontendKey, Protocol},
    planner::Op,
};

pub struct IptablesDataplane {
    backend: Backend,
    config: RenderConfig,
    /// kpr's per-service chains present in the kernel (as far as we know).
    written: BTreeSet<String>,
    /// UDP endpoints last written per frontend, to clear conntrack entries
    /// of the ones that go (the rest of the desired state is the model's).
    udp_endpoints: BTreeMap<FrontendKey, Box<[crate::frontend::Endpoint]>>,
    full_sync_period: Duration,
    last_full_sync: Option<Instant>,
}

impl IptablesDataplane {
    /// Picks the backend as kube-proxy does and takes over any chains a
    /// previous run left (they are rewritten or deleted on the first sync).
    pub fn new(config: RenderConfig, full_sync_period: Duration) -> Result<Self, DataplaneError> {
        let backend = backend::detect();
        tracing::info!(backend = backend.name(), "iptables mode");
        let written = backend
            .save("nat")
            .lines()
            .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
            .filter(|c| render::is_service_chain(c))
            .map(String::from)
            .collect();
        // Rules a previous run left keep serving until the first sync rewrites them.
        backend.ensure_chains()?;
        backend.ensure_jumps()?;
        backend.ensure_canaries()?;
        Ok(Self { backend, config, written, udp_endpoints: BTreeMap::new(), full_sync_period, last_full_sync: None })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn sync(&mut self, desired: &Desired, changed: &BTreeSet<FrontendKey>) -> Result<(), DataplaneError> {
        let full = self.last_full_sync.is_none_or(|t| t.elapsed() >= self.full_sync_period);
        let wanted: BTreeSet<String> = desired.values().flat_map(chains_of).collect();
        let stale: BTreeSet<String> = self.written.difference(&wanted).cloned().collect();
        let scope = if full { Scope::Full } else { Scope::Changed(changed) };
        let input = render(desired, scope, &stale, &self.config);
        let started = Instant::now();
        self.backend.restore(&input)?;
        tracing::debug!(
            full,
            lines = input.lines().count(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "iptables-restore"
        );
        self.written = wanted;
        if full {
            self.last_full_sync = Some(Instant::now());
        }
        Ok(())
    }

    /// kube-proxy clears conntrack entries of UDP flows to removed
    /// endpoints, which would otherwise keep being DNATed to them.
    fn forget_udp_flows(&mut self, key: FrontendKey, now: Option<&Frontend>) {
        if key.protocol != Protocol::Udp {
            return;
        }
        let old = match now {
            Some(f) => self.udp_endpoints.insert(key, f.backends.clone()),
            None => self.udp_endpoints.remove(&key),
        };
        for e in old.iter().flatten().filter(|e| now.is_none_or(|n| !n.backends.contains(e))) {
            let status = Command::new("conntrack")
                .args([
                    "-D",
                    "-p",
                    "udp",
                    "--orig-dst",
                    &key.vip.to_string(),
                    "--dport",
                    &key.port.to_string(),
                    "--reply-src",
                    &e.ip.to_string(),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if status.is_err() {
                tracing::warn!("conntrack tool missing: UDP flows to removed endpoints are not cleared");
                return;
            }
        }
    }
}

impl Dataplane for IptablesDataplane {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    /// A canary gone means someone flushed a table (or a firewall reloaded):
    /// the chains, jumps and every Service's rules are written again.
    fn repair(&mut self, desired: &Desired) -> usize {
        if self.backend.canaries_alive() {
            return 0;
        }
        let repaired = self
            .backend
            .ensure_chains()
            .and_then(|()| self.backend.ensure_jumps())
            .and_then(|()| {
                self.last_full_sync = None;
                self.sync(desired, &BTreeSet::new())
            })
            // Last: a canary alive says the rules were written after the flush.
            .and_then(|()| self.backend.ensure_canaries());
        match repaired {
            Ok(()) => 1,
            Err(e) => {
                tracing::error!(error = %e, "could not rewrite the flushed rules; trying again next period");
                0
            }
        }
    }

    fn apply(&mut self, ops: &[Op], desired: &Desired) -> Vec<ApplyError> {
        let changed: BTreeSet<FrontendKey> = ops
            .iter()
            .map(|op| match op {
                Op::Upsert(k) => *k,
                Op::Delete(k) => *k,
            })
            .collect();
        if let Err(e) = self.sync(desired, &changed) {
            // One transaction: nothing of it applied. The next sync is a
            // full one, rendered from the desired state then.
            self.last_full_sync = None;
            return changed.into_iter().map(|frontend| ApplyError { frontend, error: e.clone() }).collect();
        }
        for k in changed {
            self.forget_udp_flows(k, desired.get(&k));
        }
        Vec::new()
    }
}
