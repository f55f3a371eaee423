//! Running iptables: which backend (nf_tables or legacy) of which family
//! (`iptables` or `ip6tables`), restore, the jump rules from the built-in
//! chains, and removing everything kpr wrote.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use super::render::{Chains, FILTER_CHAINS, NAT_CHAINS, is_service_chain};
use crate::dataplane::DataplaneError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nft,
    Legacy,
}

/// One set of tables: a kind of backend, for one IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub kind: Kind,
    pub ipv6: bool,
}

impl Backend {
    /// Every backend of both families (to find and remove kpr's rules anywhere).
    pub const ALL: [Backend; 4] = [
        Backend { kind: Kind::Nft, ipv6: false },
        Backend { kind: Kind::Legacy, ipv6: false },
        Backend { kind: Kind::Nft, ipv6: true },
        Backend { kind: Kind::Legacy, ipv6: true },
    ];

    fn suffix(self) -> &'static str {
        match self.kind {
            Kind::Nft => "nft",
            Kind::Legacy => "legacy",
        }
    }

    pub fn name(self) -> &'static str {
        match (self.kind, self.ipv6) {
            (Kind::Nft, false) => "nf_tables",
            (Kind::Legacy, false) => "legacy",
            (Kind::Nft, true) => "nf_tables (ip6tables)",
            (Kind::Legacy, true) => "legacy (ip6tables)",
        }
    }

    /// `iptables` or `ip6tables`.
    fn tool(self) -> &'static str {
        if self.ipv6 { "ip6tables" } else { "iptables" }
    }

    /// `iptables-nft`, `iptables-nft-save`, `ip6tables-legacy-restore`, ...
    fn command(self, tool: &str) -> Command {
        let family = self.tool();
        Command::new(match tool {
            "iptables" => format!("{family}-{}", self.suffix()),
            other => format!("{family}-{}-{other}", self.suffix()),
        })
    }

    /// `iptables-save` output (empty if this backend is unusable, or if
    /// the table does not exist).
    pub fn save(self, table: &str) -> String {
        if !self.has_table(table) {
            return String::new();
        }
        self.command("save")
            .args(["-t", table])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Whether `table` exists. Always assumed with nf_tables; a legacy
    /// table is made on the first command that names it, even one that only
    /// reads it, and a legacy nat table sends every packet of the node
    /// through netfilter's NAT hooks: eBPF mode, which only looks for rules
    /// to remove, must not make one.
    pub fn has_table(self, table: &str) -> bool {
        let names = if self.ipv6 { "/proc/net/ip6_tables_names" } else { "/proc/net/ip_tables_names" };
        match self.kind {
            Kind::Nft => true,
            // Without the file (no legacy module loaded), no legacy table exists.
            Kind::Legacy => std::fs::read_to_string(names).is_ok_and(|n| n.lines().any(|l| l == table)),
        }
    }

    fn rule_count(self) -> usize {
        ["nat", "filter", "mangle"].iter().map(|t| self.save(t).lines().filter(|l| l.starts_with("-A ")).count()).sum()
    }

    /// Applies `input` with `iptables-restore --noflush` in one transaction.
    pub fn restore(self, input: &str) -> Result<(), DataplaneError> {
        let command = format!("{}-{}-restore", self.tool(), self.suffix());
        let failed = |e: std::io::Error| DataplaneError::Command {
            command: command.clone(),
            reason: format!("{e} (is the iptables package installed?)"),
        };
        let mut child = self
            .command("restore")
            .args(["--noflush", "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(failed)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means it exited early; its status and stderr say why.
            if let Err(e) = stdin.write_all(input.as_bytes()) {
                tracing::debug!(error = %e, "iptables-restore closed its input early");
            }
        }
        let out = child.wait_with_output().map_err(failed)?;
        if !out.status.success() {
            return Err(DataplaneError::IptablesRestore {
                backend: self.name(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Runs `iptables` of this backend; whether it succeeded.
    pub(crate) fn iptables(self, args: &[&str]) -> Result<bool, DataplaneError> {
        let out = self.command("iptables").arg("--wait").args(args).output().map_err(|e| DataplaneError::Command {
            command: format!("{}-{}", self.tool(), self.suffix()),
            reason: e.to_string(),
        })?;
        Ok(out.status.success())
    }

    /// Creates kpr's top-level chains if missing, without touching their
    /// rules, so the jumps below have a target before the first sync.
    pub fn ensure_chains(self, chains: Chains) -> Result<(), DataplaneError> {
        let filter = FILTER_CHAINS.iter().map(|c| ("filter", *c));
        for (table, chain) in filter.chain(NAT_CHAINS.iter().map(|c| ("nat", *c))) {
            // Fails when the chain exists, which is fine.
            self.iptables(&["-t", table, "-N", &chains.text(chain)])?;
        }
        Ok(())
    }

    /// Makes sure each jump from a built-in chain exists once (check, then insert).
    pub fn ensure_jumps(self, chains: Chains) -> Result<(), DataplaneError> {
        for (table, chain, rule) in JUMPS {
            let rule: Vec<String> = rule.iter().map(|a| chains.text(a).into_owned()).collect();
            let mut check = vec!["-t", table, "-C", chain];
            check.extend(rule.iter().map(String::as_str));
            if !self.iptables(&check)? {
                let mut insert = vec!["-t", table, "-I", chain];
                insert.extend(rule.iter().map(String::as_str));
                if !self.iptables(&insert)? {
                    return Err(DataplaneError::Command {
                        command: format!("iptables -t {table} -I {chain}"),
                        reason: "could not add the jump to kpr's chains".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes sure each table kpr writes has its canary: a chain holding one
    /// rule, which a flush of the table (`iptables -t nat -F`, a firewall
    /// reload) takes away with kpr's rules.
    pub fn ensure_canaries(self, chains: Chains) -> Result<(), DataplaneError> {
        let canary = chains.text(CANARY);
        for table in CANARY_TABLES {
            // Fails when the chain exists, which is fine.
            self.iptables(&["-t", table, "-N", &canary])?;
            let mut check = vec!["-t", table, "-C", &canary];
            check.extend(CANARY_RULE);
            if !self.iptables(&check)? {
                let mut append = vec!["-t", table, "-A", &canary];
                append.extend(CANARY_RULE);
                if !self.iptables(&append)? {
                    return Err(DataplaneError::Command {
                        command: format!("iptables -t {table} -A {canary}"),
                        reason: "could not add the canary rule".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether every canary still holds its rule (nothing flushed kpr's tables).
    pub fn canaries_alive(self, chains: Chains) -> bool {
        let canary = chains.text(CANARY);
        CANARY_TABLES.iter().all(|table| {
            let mut check = vec!["-t", table, "-C", &canary];
            check.extend(CANARY_RULE);
            self.iptables(&check).unwrap_or(false)
        })
    }

    /// True if this backend holds any chain kpr writes under `chains`'
    /// names; with kube-proxy's, also one its IPVS mode left.
    pub fn has_kpr_rules(self, chains: Chains) -> bool {
        ["nat", "filter"].iter().any(|t| declared(&self.save(t)).any(|c| removed_with(chains, c)))
    }

    /// Removes every chain kpr writes under `chains`' names (with kube-proxy's,
    /// also those of its IPVS mode), with every rule elsewhere that jumps to
    /// them, leaving all other rules alone.
    pub fn remove_all(self, chains: Chains) -> Result<(), DataplaneError> {
        self.remove_chains(|c| removed_with(chains, c))
    }

    /// [`Backend::remove_all`] on each of `backends` that holds some of
    /// those chains; returns how many did.
    pub fn remove_from(backends: impl IntoIterator<Item = Backend>, chains: Chains) -> Result<usize, DataplaneError> {
        let mut removed = 0;
        for backend in backends {
            if backend.has_kpr_rules(chains) {
                backend.remove_all(chains)?;
                tracing::info!(backend = backend.name(), "removed kpr's iptables rules");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the chains only kube-proxy's IPVS mode writes (for iptables
    /// mode, which writes the others itself); returns whether there were any.
    pub fn remove_kube_proxy_ipvs_chains(self) -> Result<bool, DataplaneError> {
        let found =
            ["nat", "filter"].iter().any(|t| declared(&self.save(t)).any(|c| KUBE_PROXY_IPVS_CHAINS.contains(&c)));
        if found {
            self.remove_chains(|c| KUBE_PROXY_IPVS_CHAINS.contains(&c))?;
        }
        Ok(found)
    }

    /// Removes the chains `doomed` picks in every table, after deleting each
    /// rule of another chain that jumps or goes to one of them (whatever its
    /// comment or matches: kube-proxy's versions wrote them differently), in
    /// one `iptables-restore` per backend.
    fn remove_chains(self, doomed: impl Fn(&str) -> bool) -> Result<(), DataplaneError> {
        let mut input = String::new();
        // mangle: kube-proxy's canary, when taking over from it.
        for table in ["filter", "nat", "mangle"] {
            let saved = self.save(table);
            input.push_str(&removal(table, &saved, &doomed));
        }
        if !input.is_empty() {
            self.restore(&input)?;
        }
        Ok(())
    }
}

/// The chains `saved` (one table's `iptables-save`) declares.
fn declared(saved: &str) -> impl Iterator<Item = &str> {
    saved.lines().filter_map(|l| l.strip_prefix(':')).filter_map(|l| l.split_whitespace().next())
}

/// Whether `chain` (as the kernel names it) goes when kpr's chains under
/// `chains`' names are removed.
fn removed_with(chains: Chains, chain: &str) -> bool {
    let own = chains.from_kernel(chain).is_some_and(|c| OWN_CHAINS.contains(&c.as_str()) || is_service_chain(&c));
    own || (chains == Chains::KubeProxys && KUBE_PROXY_IPVS_CHAINS.contains(&chain))
}

/// `iptables-restore --noflush` input removing the chains of `table` that
/// `doomed` picks and the rules elsewhere that lead to them; empty if none.
fn removal(table: &str, saved: &str, doomed: &impl Fn(&str) -> bool) -> String {
    let chains: Vec<&str> = declared(saved).filter(|c| doomed(c)).collect();
    if chains.is_empty() {
        return String::new();
    }
    let mut input = format!("*{table}\n");
    for line in saved.lines() {
        let Some(rule) = line.strip_prefix("-A ") else { continue };
        let mut words = rule.split_whitespace();
        let chain = words.next().unwrap_or_default();
        let mut words = words.peekable();
        let mut leads_to_doomed = false;
        while let Some(w) = words.next() {
            if (w == "-j" || w == "-g") && words.peek().is_some_and(|t| chains.contains(t)) {
                leads_to_doomed = true;
            }
        }
        if leads_to_doomed && !chains.contains(&chain) {
            input.push_str(&format!("-D {rule}\n"));
        }
    }
    for c in &chains {
        input.push_str(&format!(":{c} - [0:0]\n"));
    }
    for c in &chains {
        input.push_str(&format!("-X {c}\n"));
    }
    input.push_str("COMMIT\n");
    input
}

/// The chain whose one rule tells whether its table was flushed since kpr
/// wrote it (kube-proxy's canary is an empty chain, which a flush leaves).
const CANARY: &str = "KUBE-PROXY-CANARY";
const CANARY_RULE: [&str; 6] =
    ["-m", "comment", "--comment", "kpr: a flush of this table removes this rule", "-j", "RETURN"];
const CANARY_TABLES: [&str; 2] = ["nat", "filter"];

/// The chains kpr owns besides the per-service ones.
const OWN_CHAINS: [&str; 8] = [
    CANARY,
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

/// A jump for new connections only: `-m conntrack --ctstate NEW`, commented.
macro_rules! new_connections {
    ($comment:literal, $chain:literal) => {
        &["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", $comment, "-j", $chain]
    };
}

/// The filter-table jump to KUBE-SERVICES.
const NEW_SERVICE_PORTALS: &[&str] = new_connections!("kubernetes service portals", "KUBE-SERVICES");
/// New connections to load balancer IPs, checked against source ranges.
const FIREWALL: &[&str] = new_connections!("kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL");
/// New connections to external addresses nothing serves.
const EXTERNAL_SERVICES: &[&str] =
    new_connections!("kubernetes externally-visible service portals", "KUBE-EXTERNAL-SERVICES");

/// Chains kube-proxy's IPVS mode writes that kpr does not.
const KUBE_PROXY_IPVS_CHAINS: [&str; 5] =
    ["KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"];

/// Jumps into kpr's chains, as kube-proxy installs them.
const JUMPS: [(&str, &str, &[&str]); 13] = [
    ("filter", "INPUT", FIREWALL),
    ("filter", "OUTPUT", FIREWALL),
    ("filter", "FORWARD", FIREWALL),
    ("filter", "INPUT", EXTERNAL_SERVICES),
    ("filter", "FORWARD", EXTERNAL_SERVICES),
    (
        "filter",
        "INPUT",
        &["-m", "comment", "--comment", "kubernetes health check service ports", "-j", "KUBE-NODEPORTS"],
    ),
    ("filter", "INPUT", NEW_SERVICE_PORTALS),
    ("filter", "FORWARD", NEW_SERVICE_PORTALS),
    ("filter", "OUTPUT", NEW_SERVICE_PORTALS),
    ("filter", "FORWARD", &["-m", "comment", "--comment", "kubernetes forwarding rules", "-j", "KUBE-FORWARD"]),
    ("nat", "PREROUTING", &["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]),
    ("nat", "OUTPUT", &["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]),
    ("nat", "POSTROUTING", &["-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"]),
];

/// Chooses the backend of a family as kube-proxy's iptables wrapper does:
/// the one that already holds rules (the one with more, if both do), else
/// nf_tables.
pub fn detect(ipv6: bool) -> Backend {
    let legacy = Backend { kind: Kind::Legacy, ipv6 }.rule_count();
    let nft = Backend { kind: Kind::Nft, ipv6 }.rule_count();
    Backend { kind: if legacy > nft { Kind::Legacy } else { Kind::Nft }, ipv6 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_chains_deletes_the_rules_leading_to_them_first() {
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-IPVS-FILTER - [0:0]\n:KUBE-FORWARD - [0:0]\n\
                     -A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER\n\
                     -A INPUT -j ACCEPT\n-A KUBE-FORWARD -j KUBE-IPVS-FILTER\n\
                     -A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN\nCOMMIT\n";
        let input = removal("filter", saved, &|c: &str| KUBE_PROXY_IPVS_CHAINS.contains(&c));
        assert_eq!(
            input,
            "*filter\n-D INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER\n\
             -D KUBE-FORWARD -j KUBE-IPVS-FILTER\n:KUBE-IPVS-FILTER - [0:0]\n-X KUBE-IPVS-FILTER\nCOMMIT\n"
        );
        assert_eq!(removal("filter", saved, &|c: &str| c == "KUBE-NONE"), "");
    }
}
