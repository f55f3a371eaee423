//! Renders kube-proxy's iptables-mode rules as iptables-restore input.
//!
//! Structure and names follow kube-proxy (pkg/proxy/iptables): nat
//! KUBE-SERVICES dispatches on VIP:port to a per-service-port KUBE-SVC-*
//! chain, which spreads over per-endpoint KUBE-SEP-* chains with
//! `-m statistic --mode random --probability 1/(n-i)`; each KUBE-SEP-* DNATs
//! and marks hairpin traffic for masquerade; Services without endpoints get
//! a REJECT in filter KUBE-SERVICES. Chain names are a hash of the service
//! port (and endpoint) identity, exactly as kube-proxy computes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use std::net::Ipv4Addr;

use crate::{
    dataplane::node_addresses::NodePortAddresses,
    frontend::{Endpoint, External, Family, Frontend, FrontendKey},
};

/// kube-proxy's masquerade mark bit (`--iptables-masquerade-bit` 14).
pub const MASQ_MARK: &str = "0x4000/0x4000";

fn hash16(input: &str) -> String {
    BASE32.encode(&Sha256::digest(input.as_bytes()))[..16].to_string()
}

fn protocol<A>(f: &Frontend<A>) -> String {
    f.key.protocol.to_string().to_lowercase()
}

/// kube-proxy's portProtoHash: every per-service-port chain (SVC, EXT, FW,
/// SVL) is named by the hash of "ns/name:port" + protocol.
fn port_hash<A>(f: &Frontend<A>) -> String {
    hash16(&format!("{}{}", f.service, protocol(f)))
}

/// `KUBE-SVC-`: the Service port's cluster-wide endpoints.
pub fn service_chain<A>(f: &Frontend<A>) -> String {
    format!("KUBE-SVC-{}", port_hash(f))
}

/// `KUBE-EXT-`: traffic to the node port, external IPs and load balancer IPs.
pub fn external_chain<A>(f: &Frontend<A>) -> String {
    format!("KUBE-EXT-{}", port_hash(f))
}

/// `KUBE-FW-`: load balancer traffic checked against the source ranges.
pub fn firewall_chain<A>(f: &Frontend<A>) -> String {
    format!("KUBE-FW-{}", port_hash(f))
}

/// `KUBE-SVL-`: the Service port's endpoints on this node.
pub fn local_chain<A>(f: &Frontend<A>) -> String {
    format!("KUBE-SVL-{}", port_hash(f))
}

/// `KUBE-SEP-` + hash of "ns/name:port" + protocol + "ip:port" (an IPv6
/// address in brackets, as Go's `JoinHostPort` writes it).
pub fn endpoint_chain<A: Family>(f: &Frontend<A>, e: &Endpoint<A>) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{}{}{e}", f.service, protocol(f))))
}

/// Whose names kpr's chains carry. Rendering always speaks kube-proxy's
/// names; the kernel sees them through [`Chains::text`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Chains {
    /// kube-proxy's own (`KUBE-SERVICES`, ...): kpr replaces kube-proxy and
    /// takes its chains over.
    #[default]
    KubeProxys,
    /// `KPR-SERVICES`, ...: kpr runs beside kube-proxy
    /// (`--service-proxy-name`) and never touches its chains.
    Own,
}

impl Chains {
    const KUBE: &str = "KUBE-";
    const OWN: &str = "KPR-";

    /// `text` (rules, a chain name, an argument) as the kernel holds it.
    pub fn text(self, text: &str) -> std::borrow::Cow<'_, str> {
        match self {
            Chains::KubeProxys => text.into(),
            // Only chain names start "KUBE-": comments carry Service names,
            // which are lowercase.
            Chains::Own => text.replace(Self::KUBE, Self::OWN).into(),
        }
    }

    /// A chain of the kernel's, in rendering's names, if it is one of ours.
    pub fn from_kernel(self, chain: &str) -> Option<String> {
        match self {
            Chains::KubeProxys => chain.starts_with(Self::KUBE).then(|| chain.to_string()),
            Chains::Own => chain.strip_prefix(Self::OWN).map(|rest| format!("{}{rest}", Self::KUBE)),
        }
    }
}

/// Whether a chain name is one of the per-service-port or per-endpoint chains.
pub fn is_service_chain(name: &str) -> bool {
    ["KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SVL-"].iter().any(|p| name.starts_with(p))
}

/// How a frontend is reached from outside, as kube-proxy decides it.
struct Plan<'a, A> {
    f: &'a Frontend<A>,
    ext: Option<&'a External<A>>,
    /// Endpoints for external traffic (local ones under a Local policy).
    external_backends: &'a [Endpoint<A>],
    /// The chain load balancer IPs jump to: KUBE-FW- with source ranges.
    uses_firewall: bool,
}

impl<'a, A: Family> Plan<'a, A> {
    fn of(f: &'a Frontend<A>) -> Self {
        let ext = f.external.as_deref();
        let external_backends = ext.map_or(&f.backends[..], |e| e.backends(f));
        let uses_firewall = !f.backends.is_empty()
            && ext.is_some_and(|e| !e.load_balancer_ips.is_empty() && !e.source_ranges.is_empty());
        Self { f, ext, external_backends, uses_firewall }
    }

    fn has_endpoints(&self) -> bool {
        !self.f.backends.is_empty()
    }

    /// Whether pods and node processes have an endpoint to go to.
    fn has_internal_endpoints(&self) -> bool {
        !self.f.internal_backends().is_empty()
    }

    fn uses_external_chain(&self) -> bool {
        self.has_endpoints() && self.ext.is_some()
    }

    fn local_policy(&self) -> bool {
        self.ext.is_some_and(|e| e.local_only)
    }

    /// kube-proxy's `usesClusterPolicyChain`: KUBE-SVC- serves pods under a
    /// Cluster internal policy, and outside clients (directly, or pods and
    /// the node through a Local external policy's short circuit).
    fn uses_cluster_chain(&self) -> bool {
        self.has_endpoints() && (!self.f.internal_local || self.ext.is_some())
    }

    /// kube-proxy's `usesLocalPolicyChain`: KUBE-SVL- for a Local policy
    /// with endpoints here.
    fn uses_local_chain(&self) -> bool {
        !self.f.local_backends().is_empty() && (self.f.internal_local || self.local_policy())
    }

    /// Where pods' and node processes' traffic to the cluster IP goes.
    fn internal_chain(&self) -> String {
        if self.f.internal_local { local_chain(self.f) } else { service_chain(self.f) }
    }

    /// The endpoints with a KUBE-SEP- chain: the cluster-wide ones, then
    /// this node's that are not among them (terminating stand-ins).
    fn endpoints(&self) -> Vec<&'a Endpoint<A>> {
        let f = self.f;
        let mut endpoints: Vec<&Endpoint<A>> = Vec::new();
        if self.uses_cluster_chain() {
            endpoints.extend(f.backends.iter());
        }
        if self.uses_local_chain() {
            let cluster = self.uses_cluster_chain();
            endpoints.extend(f.local_backends().iter().filter(|e| !cluster || !f.backends.contains(e)));
        }
        endpoints
    }

    /// The filter target and comment for external traffic nothing serves:
    /// REJECT without endpoints, DROP with endpoints but none here.
    fn external_filter(&self) -> (&'static str, String) {
        if self.has_endpoints() {
            ("DROP", format!("\"{} has no local endpoints\"", self.f.service))
        } else {
            ("REJECT", format!("\"{} has no endpoints\"", self.f.service))
        }
    }

    /// The chains this frontend owns in the nat table.
    fn chains(&self) -> Vec<String> {
        let f = self.f;
        let mut chains = Vec::new();
        let endpoints = self.endpoints();
        let cluster = if self.uses_cluster_chain() { f.backends.len() } else { 0 };
        if self.uses_cluster_chain() {
            chains.push(service_chain(f));
            chains.extend(endpoints[..cluster].iter().map(|e| endpoint_chain(f, e)));
        }
        if self.uses_external_chain() {
            chains.push(external_chain(f));
        }
        if self.uses_firewall {
            chains.push(firewall_chain(f));
        }
        if self.uses_local_chain() {
            chains.push(local_chain(f));
            // Local endpoints without a chain yet (terminating stand-ins, or all
            // of them when the cluster-wide chain is not used).
            chains.extend(endpoints[cluster..].iter().map(|e| endpoint_chain(f, e)));
        }
        chains
    }
}

/// Every chain a frontend owns.
pub fn chains_of<A: Family>(f: &Frontend<A>) -> Vec<String> {
    Plan::of(f).chains()
}

#[derive(Clone, Debug)]
pub struct RenderConfig<A = Ipv4Addr> {
    /// Pod network of this family; traffic to a VIP from outside it is
    /// masqueraded (kube-proxy's `--cluster-cidr` local detector).
    pub cluster_cidr: Option<String>,
    /// Node addresses NodePorts answer on (`--nodeport-addresses`, resolved).
    pub node_port_addresses: NodePortAddresses<A>,
    /// Whose chain names the rules use.
    pub chains: Chains,
}

impl<A> Default for RenderConfig<A> {
    fn default() -> Self {
        Self { cluster_cidr: None, node_port_addresses: NodePortAddresses::All, chains: Chains::default() }
    }
}

/// Which service chains to write.
pub enum Scope<'a, A = Ipv4Addr> {
    /// Every chain.
    Full,
    /// Only the chains of these frontends (kube-proxy's partial sync).
    Changed(&'a BTreeSet<FrontendKey<A>>),
}

fn match_frontend<A: Family>(f: &Frontend<A>) -> String {
    match_address(f, f.key.vip, f.key.port)
}

/// One address, as `iptables-save` shows it (with its full prefix length).
fn host<A: Family>(addr: A) -> String {
    format!("{addr}/{}", A::BITS)
}

fn match_address<A: Family>(f: &Frontend<A>, addr: A, port: u16) -> String {
    let p = protocol(f);
    format!("-m {p} -p {p} -d {} --dport {port}", host(addr))
}

fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

/// Rules being written, by table: chain declarations apart from rules, as
/// iptables-restore wants every chain declared before the first rule.
#[derive(Default)]
struct Tables {
    filter: String,
    nat_chains: String,
    nat: String,
}

/// Appends one rule line (`-A ...`).
macro_rules! rule {
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, $($arg)*).expect("writing to a String cannot fail")
    };
}

/// The iptables-restore input (for `--noflush`) that makes the kernel's
/// rules equal `frontends` within `scope`; `stale` chains are flushed and
/// deleted in the same transaction.
pub fn render<A: Family>(
    frontends: &BTreeMap<FrontendKey<A>, Frontend<A>>,
    scope: Scope<'_, A>,
    stale: &BTreeSet<String>,
    cfg: &RenderConfig<A>,
) -> String {
    let writes = |k: &FrontendKey<A>| match &scope {
        Scope::Full => true,
        Scope::Changed(set) => set.contains(k),
    };
    let mut t = Tables::default();
    for f in frontends.values() {
        let plan = Plan::of(f);
        dispatch(&plan, &mut t);
        if writes(&f.key) {
            chains(&plan, cfg, &mut t);
        }
    }
    // Last in KUBE-SERVICES: what is left, addressed to the node, may be a node port.
    let nodeports =
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match &cfg.node_port_addresses {
        NodePortAddresses::All => {
            // Never the loopback addresses (kube-proxy's localhost node ports are off).
            let loopback = A::LOOPBACK_NET;
            rule!(t.nat, "-A KUBE-SERVICES {nodeports} -m addrtype --dst-type LOCAL ! -d {loopback} -j KUBE-NODEPORTS")
        }
        NodePortAddresses::Only(addrs) => {
            for a in addrs.iter().filter(|a| !a.is_loopback()) {
                rule!(t.nat, "-A KUBE-SERVICES {nodeports} -d {} -j KUBE-NODEPORTS", host(*a));
            }
        }
    }

    let mut out = String::new();
    out.push_str("*filter\n");
    for chain in FILTER_CHAINS {
        rule!(out, ":{chain} - [0:0]");
    }
    out.push_str(&t.filter);
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    rule!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK} -j ACCEPT"
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n");

    // nat: declare every chain written (declaring flushes it), then rules.
    out.push_str("*nat\n");
    for chain in NAT_CHAINS {
        rule!(out, ":{chain} - [0:0]");
    }
    out.push_str(&t.nat_chains);
    for chain in stale {
        rule!(out, ":{chain} - [0:0]");
    }
    out.push_str(&t.nat);
    rule!(out, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    for chain in stale {
        rule!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    match cfg.chains.text(&out) {
        std::borrow::Cow::Borrowed(_) => out,
        std::borrow::Cow::Owned(renamed) => renamed,
    }
}

/// kpr's top-level filter chains, rewritten whole on every sync.
pub const FILTER_CHAINS: [&str; 5] =
    ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"];
/// kpr's top-level nat chains, rewritten whole on every sync.
pub const NAT_CHAINS: [&str; 4] = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"];

/// The top-level rules of one frontend, written on every sync: how
/// KUBE-SERVICES and KUBE-NODEPORTS reach its chains, and the filter rules
/// for what nothing serves.
fn dispatch<A: Family>(plan: &Plan<'_, A>, t: &mut Tables) {
    let f = plan.f;
    let svc = &f.service;
    if plan.has_internal_endpoints() {
        rule!(
            t.nat,
            "-A KUBE-SERVICES -m comment --comment \"{svc} cluster IP\" {} -j {}",
            match_frontend(f),
            plan.internal_chain()
        );
    } else if plan.has_endpoints() {
        // A Local internal policy with no endpoint here: dropped, as kube-proxy.
        rule!(
            t.filter,
            "-A KUBE-SERVICES -m comment --comment \"{svc} has no local endpoints\" {} -j DROP",
            match_frontend(f)
        );
    } else {
        rule!(
            t.filter,
            "-A KUBE-SERVICES -m comment --comment \"{svc} has no endpoints\" {} -j REJECT",
            match_frontend(f)
        );
    }
    let Some(ext) = plan.ext else { return };
    let (target, comment) = plan.external_filter();
    let serves_outside = !plan.external_backends.is_empty() && plan.has_endpoints();
    for ip in &ext.external_ips {
        let m = match_address(f, *ip, f.key.port);
        if plan.has_endpoints() {
            rule!(t.nat, "-A KUBE-SERVICES -m comment --comment \"{svc} external IP\" {m} -j {}", external_chain(f));
        }
        if !serves_outside {
            rule!(t.filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} {m} -j {target}");
        }
    }
    let lb_chain = if plan.uses_firewall { firewall_chain(f) } else { external_chain(f) };
    for ip in &ext.load_balancer_ips {
        let m = match_address(f, *ip, f.key.port);
        if plan.has_endpoints() {
            rule!(t.nat, "-A KUBE-SERVICES -m comment --comment \"{svc} loadbalancer IP\" {m} -j {lb_chain}");
        }
        if plan.uses_firewall {
            rule!(
                t.filter,
                "-A KUBE-PROXY-FIREWALL -m comment --comment \"{svc} traffic not accepted by {}\" {m} -j DROP",
                firewall_chain(f)
            );
        }
        if !serves_outside {
            rule!(t.filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} {m} -j {target}");
        }
    }
    let p = protocol(f);
    if let Some(node_port) = ext.node_port {
        if plan.has_endpoints() {
            // NodePorts are not subject to the source ranges (as kube-proxy).
            rule!(
                t.nat,
                "-A KUBE-NODEPORTS -m comment --comment {svc} -m {p} -p {p} --dport {node_port} -j {}",
                external_chain(f)
            );
        }
        if !serves_outside {
            rule!(
                t.filter,
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {node_port} -j {target}"
            );
        }
    }
    if let Some(hc) = ext.health_check_node_port {
        rule!(
            t.filter,
            "-A KUBE-NODEPORTS -m comment --comment \"{svc} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"
        );
    }
}

/// The chains one frontend owns, declared and filled.
fn chains<A: Family>(plan: &Plan<'_, A>, cfg: &RenderConfig<A>, t: &mut Tables) {
    let f = plan.f;
    let svc_name = &f.service;
    for chain in plan.chains() {
        rule!(t.nat_chains, ":{chain} - [0:0]");
    }
    if !plan.has_endpoints() {
        return;
    }
    let svc = service_chain(f);
    if plan.has_internal_endpoints()
        && let Some(cidr) = &cfg.cluster_cidr
    {
        rule!(
            t.nat,
            "-A {} -m comment --comment \"{svc_name} cluster IP\" {} ! -s {cidr} -j KUBE-MARK-MASQ",
            plan.internal_chain(),
            match_frontend(f)
        );
    }
    if plan.uses_cluster_chain() {
        spread(f, &svc, &f.backends, &mut t.nat);
    }
    if plan.uses_local_chain() {
        spread(f, &local_chain(f), f.local_backends(), &mut t.nat);
    }
    let p = protocol(f);
    for e in plan.endpoints() {
        let sep = endpoint_chain(f, e);
        rule!(t.nat, "-A {sep} -m comment --comment {svc_name} -s {} -j KUBE-MARK-MASQ", host(e.ip));
        // Session affinity: each new connection's client joins the endpoint's recent list.
        let recent =
            if f.affinity_timeout.is_some() { format!(" -m recent --name {sep} --set") } else { String::new() };
        rule!(t.nat, "-A {sep} -m comment --comment {svc_name}{recent} -m {p} -p {p} -j DNAT --to-destination {e}");
    }
    if plan.uses_external_chain() {
        let ext = external_chain(f);
        if !plan.local_policy() {
            // Endpoints may be on other nodes: replies must come back through this one.
            rule!(
                t.nat,
                "-A {ext} -m comment --comment \"masquerade traffic for {svc_name} external destinations\" -j KUBE-MARK-MASQ"
            );
        } else {
            // Pods reaching an external address are served like any
            // in-cluster client (as if out to the load balancer and back).
            if let Some(cidr) = &cfg.cluster_cidr {
                rule!(
                    t.nat,
                    "-A {ext} -m comment --comment \"pod traffic for {svc_name} external destinations\" -s {cidr} -j {svc}"
                );
            }
            // The node itself: its source would be the external address, so masquerade.
            rule!(
                t.nat,
                "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {svc_name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
            );
            rule!(
                t.nat,
                "-A {ext} -m comment --comment \"route LOCAL traffic for {svc_name} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
            );
        }
        if !plan.external_backends.is_empty() {
            let policy = if plan.local_policy() { local_chain(f) } else { svc.clone() };
            rule!(t.nat, "-A {ext} -j {policy}");
        }
    }
    if plan.uses_firewall {
        let fw = firewall_chain(f);
        let ext = plan.ext.expect("a firewall needs load balancer IPs");
        let args = format!("-A {fw} -m comment --comment \"{svc_name} loadbalancer IP\"");
        for range in &ext.source_ranges {
            rule!(t.nat, "{args} -s {range} -j {}", external_chain(f));
        }
        rule!(
            t.nat,
            "-A {fw} -m comment --comment \"other traffic to {svc_name} will be dropped by KUBE-PROXY-FIREWALL\""
        );
    }
}

/// Spreads `chain` evenly over `endpoints`' KUBE-SEP chains; under session
/// affinity, a client seen within the timeout first goes where it went.
fn spread<A: Family>(f: &Frontend<A>, chain: &str, endpoints: &[Endpoint<A>], out: &mut String) {
    if let Some(timeout) = f.affinity_timeout {
        for e in endpoints {
            let sep = endpoint_chain(f, e);
            rule!(
                out,
                "-A {chain} -m comment --comment \"{} -> {e}\" -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}",
                f.service
            );
        }
    }
    let n = endpoints.len();
    for (i, e) in endpoints.iter().enumerate() {
        let sep = endpoint_chain(f, e);
        let odds = if i + 1 < n {
            format!(" -m statistic --mode random --probability {}", probability(n - i))
        } else {
            String::new()
        };
        rule!(out, "-A {chain} -m comment --comment \"{} -> {e}\"{odds} -j {sep}", f.service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        frontend::{Extras, Protocol, ServiceType},
        name::{ObjectName, ServicePortName},
    };

    fn fe(
        ns: &str,
        name: &str,
        port_name: &str,
        vip: [u8; 4],
        port: u16,
        protocol: Protocol,
        backends: &[([u8; 4], u16)],
    ) -> Frontend {
        Frontend {
            service: ServicePortName { service: ObjectName::new(ns, name), port: port_name.into() },
            key: FrontendKey { vip: vip.into(), port, protocol },
            service_type: ServiceType::ClusterIP,
            external: None,
            backends: backends.iter().map(|(ip, port)| Endpoint { ip: Ipv4Addr::from(*ip), port: *port }).collect(),
            terminating: Box::default(),
            internal_local: false,
            affinity_timeout: None,
            extras: None,
        }
    }

    fn model(fs: Vec<Frontend>) -> BTreeMap<FrontendKey, Frontend> {
        fs.into_iter().map(|f| (f.key, f)).collect()
    }

    /// Compares with `golden/NAME.txt`; `UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/dataplane/iptables/golden")
            .join(format!("{name}.txt"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(actual, expected, "rules differ from {}", path.display());
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Values computed with kube-proxy's servicePortChainName /
        // servicePortEndpointChainName for the same identities.
        let f = fe("ns1", "svc1", "p80", [10, 20, 30, 41], 80, Protocol::Tcp, &[([10, 180, 0, 1], 80)]);
        assert_eq!(service_chain(&f), format!("KUBE-SVC-{}", hash16("ns1/svc1:p80tcp")));
        assert_eq!(endpoint_chain(&f, &f.backends[0]), format!("KUBE-SEP-{}", hash16("ns1/svc1:p80tcp10.180.0.1:80")));
        assert_eq!(service_chain(&f), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(endpoint_chain(&f, &f.backends[0]), "KUBE-SEP-SXIVWICOYRO3J4NJ");
    }

    #[test]
    fn one_endpoint() {
        let m = model(vec![fe("ns1", "svc1", "p80", [172, 30, 0, 41], 80, Protocol::Tcp, &[([10, 180, 0, 1], 80)])]);
        golden("one_endpoint", &render(&m, Scope::Full, &BTreeSet::new(), &RenderConfig::default()));
    }

    #[test]
    fn many_endpoints_spread_evenly() {
        let m = model(vec![fe(
            "default",
            "web",
            "http",
            [10, 96, 0, 10],
            80,
            Protocol::Tcp,
            &[([10, 244, 0, 11], 8080), ([10, 244, 0, 12], 8080), ([10, 244, 0, 13], 8080), ([10, 244, 0, 14], 8080)],
        )]);
        let rules = render(
            &m,
            Scope::Full,
            &BTreeSet::new(),
            &RenderConfig { cluster_cidr: Some("10.244.0.0/16".into()), ..Default::default() },
        );
        // 1/4, 1/3, 1/2, then the rest: each endpoint gets a quarter.
        for p in ["0.2500000000", "0.3333333333", "0.5000000000"] {
            assert!(rules.contains(&format!("--probability {p}")), "{rules}");
        }
        golden("many_endpoints", &rules);
    }

    #[test]
    fn no_endpoints_rejects() {
        let m = model(vec![fe("default", "empty", "", [10, 96, 0, 20], 53, Protocol::Udp, &[])]);
        let rules = render(&m, Scope::Full, &BTreeSet::new(), &RenderConfig::default());
        assert!(!rules.contains("KUBE-SVC-"), "no service chain without endpoints");
        golden("no_endpoints", &rules);
    }

    #[test]
    fn several_and_named_ports() {
        let m = model(vec![
            fe(
                "shop",
                "api",
                "http",
                [10, 96, 1, 1],
                80,
                Protocol::Tcp,
                &[([10, 244, 1, 1], 8080), ([10, 244, 1, 2], 8080)],
            ),
            fe(
                "shop",
                "api",
                "metrics",
                [10, 96, 1, 1],
                9090,
                Protocol::Tcp,
                &[([10, 244, 1, 1], 9100), ([10, 244, 1, 2], 9100)],
            ),
            fe("shop", "api", "dns", [10, 96, 1, 1], 53, Protocol::Udp, &[([10, 244, 1, 1], 5353)]),
        ]);
        golden("several_ports", &render(&m, Scope::Full, &BTreeSet::new(), &RenderConfig::default()));
    }

    #[test]
    fn partial_sync_writes_only_changed_chains_and_deletes_stale_ones() {
        let a = fe("default", "a", "", [10, 96, 0, 1], 80, Protocol::Tcp, &[([10, 244, 0, 1], 80)]);
        let b = fe("default", "b", "", [10, 96, 0, 2], 80, Protocol::Tcp, &[([10, 244, 0, 2], 80)]);
        let m = model(vec![a.clone(), b.clone()]);
        let changed = BTreeSet::from([b.key]);
        let stale = BTreeSet::from(["KUBE-SEP-OLDOLDOLDOLDOLDO".to_string()]);
        let rules = render(&m, Scope::Changed(&changed), &stale, &RenderConfig::default());
        assert!(!rules.contains(&format!(":{}", service_chain(&a))), "unchanged chains are not rewritten");
        assert!(rules.contains(&format!("-j {}", service_chain(&a))), "KUBE-SERVICES still dispatches to them");
        assert!(rules.contains(&format!(":{}", service_chain(&b))));
        golden("partial", &rules);
    }

    /// Per table: the declared chains, and each chain's rules in order
    /// (how iptables-save shows them, whatever order they were written in).
    type Table = (BTreeSet<String>, BTreeMap<String, Vec<String>>);

    fn by_chain(rules: &str) -> BTreeMap<String, Table> {
        let mut tables: BTreeMap<String, Table> = BTreeMap::new();
        let mut table = String::new();
        for line in rules.lines().filter(|l| !l.starts_with('#')) {
            if let Some(name) = line.strip_prefix('*') {
                table = name.to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap().to_string();
                tables.entry(table.clone()).or_default().0.insert(chain);
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap().to_string();
                tables.entry(table.clone()).or_default().1.entry(chain).or_default().push(line.to_string());
            }
        }
        tables
    }

    #[test]
    fn external_access_matches_kube_proxys_own_expected_rules() {
        // The Services and EndpointSlices of kube-proxy's TestOverallIPTablesRules
        // (node test-node, pods in 10.0.0.0/8).
        let yaml = "
kind: Service
metadata: {name: svc1, namespace: ns1}
spec: {clusterIP: 172.30.0.41, ports: [{name: p80, port: 80}]}
---
kind: Service
metadata: {name: svc2, namespace: ns2}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.42
  externalIPs: [192.168.99.22]
  externalTrafficPolicy: Local
  healthCheckNodePort: 30000
  ports: [{name: p80, port: 80, nodePort: 3001}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}
---
kind: Service
metadata: {name: svc3, namespace: ns3}
spec: {type: NodePort, clusterIP: 172.30.0.43, ports: [{name: p80, port: 80, nodePort: 3003}]}
---
kind: Service
metadata: {name: svc4, namespace: ns4}
spec: {type: NodePort, clusterIP: 172.30.0.44, externalIPs: [192.168.99.33], ports: [{name: p80, port: 80}]}
---
kind: Service
metadata: {name: svc5, namespace: ns5}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.45
  externalTrafficPolicy: Cluster
  healthCheckNodePort: 30000
  loadBalancerSourceRanges: [' 203.0.113.0/25']
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}}
  ports: [{name: p80, port: 80, nodePort: 3002}]
status: {loadBalancer: {ingress: [{ip: 5.6.7.8}]}}
---
kind: Service
metadata: {name: svc6, namespace: ns6}
spec: {clusterIP: 172.30.0.46, ports: [{name: p80, port: 80}]}
";
        let slice = |ns: &str, svc: &str, endpoints: &str| {
            format!(
                "---\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
                 addressType: IPv4\nports: [{{name: p80, port: 80}}]\nendpoints: [{endpoints}]\n"
            )
        };
        let mut all = yaml.to_string();
        for (ns, svc, eps) in [
            ("ns1", "svc1", "{addresses: [10.180.0.1]}"),
            ("ns2", "svc2", "{addresses: [10.180.0.2]}"),
            ("ns3", "svc3", "{addresses: [10.180.0.3]}"),
            ("ns4", "svc4", "{addresses: [10.180.0.4]}, {addresses: [10.180.0.5], nodeName: test-node}"),
            ("ns5", "svc5", "{addresses: [10.180.0.3]}"),
        ] {
            all.push_str(&slice(ns, svc, eps));
        }
        let config = crate::validate::ModelConfig { node_name: "test-node".into(), ..Default::default() };
        let (m, rejected) = crate::model::build::<Ipv4Addr>(crate::testing::objects_with(&all, &config));
        assert!(rejected.is_empty(), "{rejected:?}");
        let cfg_kube = || RenderConfig { cluster_cidr: Some("10.0.0.0/8".into()), ..Default::default() };
        let cfg = cfg_kube();
        let ours = render(&m.frontends, Scope::Full, &BTreeSet::new(), &cfg);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/dataplane/iptables/golden/kube_proxy_overall.txt");
        let theirs = std::fs::read_to_string(path).unwrap();
        let (ours, theirs) = (by_chain(&ours), by_chain(&theirs));
        for table in ["filter", "nat"] {
            assert_eq!(ours[table].0, theirs[table].0, "{table}: declared chains");
            for (chain, rules) in &theirs[table].1 {
                assert_eq!(ours[table].1.get(chain), Some(rules), "{table} {chain}");
            }
            assert_eq!(ours[table].1.keys().collect::<Vec<_>>(), theirs[table].1.keys().collect::<Vec<_>>(), "{table}");
        }
        // Beside kube-proxy: the same rules under kpr's own chain names.
        let own = render(&m.frontends, Scope::Full, &BTreeSet::new(), &RenderConfig { chains: Chains::Own, ..cfg });
        assert!(!own.contains("KUBE-"), "{own}");
        assert_eq!(own.replace("KPR-", "KUBE-"), render(&m.frontends, Scope::Full, &BTreeSet::new(), &cfg_kube()));
    }

    /// kube-proxy's IPv6 proxier writes the same rules as its IPv4 one,
    /// with the family's addresses (`[ip]:port` in DNAT targets, comments
    /// and chain hashes) and `! -d ::1/128` on the node port jump.
    #[test]
    fn ipv6_rules_match_kube_proxys_own_expected_rules() {
        let yaml = "
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: NodePort
  clusterIP: 'fd00:ab34::20'
  clusterIPs: ['fd00:ab34::20']
  ipFamilies: [IPv6]
  externalTrafficPolicy: Local
  ports: [{name: p80, port: 80, nodePort: 30001}]
---
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv6
ports: [{name: p80, port: 80}]
endpoints: [{addresses: ['ff06::c1']}, {addresses: ['ff06::c2'], nodeName: test-node}]
";
        let config = crate::validate::ModelConfig { node_name: "test-node".into(), ..Default::default() };
        let (m, rejected) = crate::model::build::<std::net::Ipv6Addr>(crate::testing::objects_with(yaml, &config));
        assert!(rejected.is_empty(), "{rejected:?}");
        let ours = render(&m.frontends, Scope::Full, &BTreeSet::new(), &RenderConfig::default());
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dataplane/iptables/golden/kube_proxy_ipv6.txt");
        let theirs = std::fs::read_to_string(path).unwrap();
        let (ours, theirs) = (by_chain(&ours), by_chain(&theirs));
        assert_eq!(ours, theirs);
        let (v4, _) = crate::model::build::<Ipv4Addr>(crate::testing::objects_with(yaml, &config));
        assert!(v4.frontends.is_empty(), "an IPv6-only Service has no IPv4 rules");
    }

    #[test]
    fn own_chain_names_map_back_to_rendering_names() {
        assert_eq!(Chains::Own.from_kernel("KPR-SVC-ABC").as_deref(), Some("KUBE-SVC-ABC"));
        assert_eq!(Chains::Own.from_kernel("KUBE-SVC-ABC"), None);
        assert_eq!(Chains::KubeProxys.from_kernel("KUBE-SVC-ABC").as_deref(), Some("KUBE-SVC-ABC"));
        assert_eq!(Chains::KubeProxys.from_kernel("KPR-SVC-ABC"), None);
    }

    #[test]
    fn a_local_policy_with_a_local_endpoint_goes_through_its_own_chain() {
        // kube-proxy's TestExternalTrafficPolicyLocal: one endpoint here, one elsewhere.
        let mut f = fe(
            "ns1",
            "svc1",
            "p80",
            [172, 30, 0, 41],
            80,
            Protocol::Tcp,
            &[([10, 180, 0, 1], 80), ([10, 180, 2, 1], 80)],
        );
        f.service_type = ServiceType::LoadBalancer;
        f.external = Some(Box::new(External {
            node_port: Some(3001),
            external_ips: [Ipv4Addr::new(192, 168, 99, 11)].into(),
            load_balancer_ips: [Ipv4Addr::new(1, 2, 3, 4)].into(),
            local_only: true,
            health_check_node_port: Some(30000),
            ..Default::default()
        }));
        f.extras = Extras::of([Endpoint { ip: Ipv4Addr::new(10, 180, 2, 1), port: 80 }].into(), None);
        let cfg = RenderConfig {
            cluster_cidr: Some("10.0.0.0/8".into()),
            node_port_addresses: NodePortAddresses::Only(vec![Ipv4Addr::new(192, 168, 0, 2)]),
            ..Default::default()
        };
        let rules = render(&model(vec![f]), Scope::Full, &BTreeSet::new(), &cfg);
        let nat = &by_chain(&rules)["nat"].1;
        assert_eq!(
            nat["KUBE-SVL-XPGD46QRK7WJZT7O"],
            [
                "-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.2.1:80\" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ"
            ]
        );
        assert_eq!(
            nat["KUBE-EXT-XPGD46QRK7WJZT7O"].last().unwrap(),
            "-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            nat["KUBE-SERVICES"].last().unwrap(),
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.168.0.2/32 -j KUBE-NODEPORTS"
        );
        assert!(!rules.contains("KUBE-EXTERNAL-SERVICES -m"), "served here: nothing dropped\n{rules}");
        golden("local_policy", &rules);
    }
}
