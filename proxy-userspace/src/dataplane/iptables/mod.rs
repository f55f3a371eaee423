//! The iptables dataplane: kube-proxy's iptables mode, for nodes where eBPF
//! cannot run, and the baseline kpr is measured against.
//!
//! One dataplane serves one IP family (`iptables` or `ip6tables`), as
//! kube-proxy runs one proxier per family; a dual-stack node runs two.
//!
//! Each sync is one `iptables-restore --noflush` transaction. Like
//! kube-proxy since 1.28, a sync rewrites only the chains of the Services
//! that changed (plus the small top-level chains), and a full resync runs
//! periodically and after any failure.

pub mod backend;
pub mod render;

use std::{
    collections::{BTreeSet, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use backend::Backend;
use render::{RenderConfig, Scope, chains_of, render};

use super::{
    ApplyError, Dataplane, DataplaneError, Desired, Mode,
    conntrack::{self, CtFamily, Serving},
};
use crate::{
    frontend::{FrontendKey, Protocol},
    planner::Op,
};

pub struct IptablesDataplane<A = Ipv4Addr> {
    backend: Backend,
    config: RenderConfig<A>,
    /// kpr's per-service chains present in the kernel (as far as we know).
    written: BTreeSet<String>,
    full_sync_period: Duration,
    last_full_sync: Option<Instant>,
}

impl<A: CtFamily> IptablesDataplane<A> {
    /// Picks the backend as kube-proxy does and takes over any chains a
    /// previous run left (they are rewritten or deleted on the first sync).
    pub fn new(config: RenderConfig<A>, full_sync_period: Duration) -> Result<Self, DataplaneError> {
        let backend = backend::detect(A::BITS == 128);
        tracing::info!(backend = backend.name(), family = A::NAME, "iptables rules");
        let chains = config.chains;
        let written = backend
            .save("nat")
            .lines()
            .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
            .filter_map(|c| chains.from_kernel(c))
            .filter(|c| render::is_service_chain(c))
            .collect();
        // Rules a previous run left keep serving until the first sync rewrites them.
        backend.ensure_chains(chains)?;
        backend.ensure_jumps(chains)?;
        backend.ensure_canaries(chains)?;
        Ok(Self { backend, config, written, full_sync_period, last_full_sync: None })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the next sync rewrites every chain: none has run yet, or the last failed.
    pub fn full_sync_pending(&self) -> bool {
        self.last_full_sync.is_none()
    }

    fn sync(&mut self, desired: &Desired<A>, changed: &BTreeSet<FrontendKey<A>>) -> Result<(), DataplaneError> {
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

    /// The addresses of the UDP frontends in `changed`, each with the
    /// endpoints that may answer there (none for a frontend deleted).
    fn serving_udp(&self, desired: &Desired<A>, changed: &BTreeSet<FrontendKey<A>>) -> Serving<A> {
        let mut serving = Serving::new();
        // Listing the node's addresses costs a system call: only when a node port needs them.
        let mut node_addresses = None;
        for key in changed.iter().filter(|k| k.protocol == Protocol::Udp) {
            let Some(f) = desired.get(key) else {
                serving.insert((key.vip, key.port), HashSet::new());
                continue;
            };
            let endpoints: HashSet<(A, u16)> =
                f.backends.iter().chain(&f.terminating[..]).map(|e| (e.ip, e.port)).collect();
            let mut addresses = vec![(key.vip, key.port)];
            if let Some(ext) = f.external.as_deref() {
                addresses.extend(ext.external_ips.iter().chain(&ext.load_balancer_ips[..]).map(|ip| (*ip, key.port)));
                if let Some(node_port) = ext.node_port {
                    let node = node_addresses.get_or_insert_with(|| self.config.node_port_addresses.addresses());
                    addresses.extend(node.iter().map(|ip| (*ip, node_port)));
                }
            }
            for address in addresses {
                serving.insert(address, endpoints.clone());
            }
        }
        serving
    }
}

impl<A: CtFamily> Dataplane<A> for IptablesDataplane<A> {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    /// A canary gone means someone flushed a table (or a firewall reloaded):
    /// the chains, jumps and every Service's rules are written again.
    fn repair(&mut self, desired: &Desired<A>) -> usize {
        let chains = self.config.chains;
        if self.backend.canaries_alive(chains) {
            return 0;
        }
        let repaired = self
            .backend
            .ensure_chains(chains)
            .and_then(|()| self.backend.ensure_jumps(chains))
            .and_then(|()| {
                self.last_full_sync = None;
                self.sync(desired, &BTreeSet::new())
            })
            // Last: a canary alive says the rules were written after the flush.
            .and_then(|()| self.backend.ensure_canaries(chains));
        match repaired {
            Ok(()) => 1,
            Err(e) => {
                tracing::error!(error = %e, "could not rewrite the flushed rules; trying again next period");
                0
            }
        }
    }

    fn apply(&mut self, ops: &[Op<A>], desired: &Desired<A>) -> Vec<ApplyError<A>> {
        let changed: BTreeSet<FrontendKey<A>> = ops.iter().map(Op::key).collect();
        if let Err(e) = self.sync(desired, &changed) {
            // One transaction: nothing of it applied. The next sync is a
            // full one, rendered from the desired state then.
            self.last_full_sync = None;
            return changed.into_iter().map(|frontend| ApplyError { frontend, error: e.clone() }).collect();
        }
        // As kube-proxy after each sync: UDP flows of the changed frontends
        // answered by anything but a serving endpoint are forgotten, so the
        // next datagram is translated afresh.
        match conntrack::clear_stale_udp(&self.serving_udp(desired, &changed)) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(flows = n, "forgot stale UDP flows"),
            Err(e) => tracing::warn!(error = %e, "could not clear stale UDP conntrack entries"),
        }
        Vec::new()
    }
}
