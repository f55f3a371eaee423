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

use crate::frontend::{Endpoint, Frontend, FrontendKey};

/// kube-proxy's masquerade mark bit (`--iptables-masquerade-bit` 14).
pub const MASQ_MARK: &str = "0x4000/0x4000";

fn hash16(input: &str) -> String {
    BASE32.encode(&Sha256::digest(input.as_bytes()))[..16].to_string()
}

fn protocol(f: &Frontend) -> String {
    f.key.protocol.to_string().to_lowercase()
}

/// `KUBE-SVC-` + hash of "ns/name:port" + protocol, as kube-proxy's servicePortChainName.
pub fn service_chain(f: &Frontend) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}{}", f.service, protocol(f))))
}

/// `KUBE-SEP-` + hash of "ns/name:port" + protocol + "ip:port".
pub fn endpoint_chain(f: &Frontend, e: &Endpoint) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{}{}{}:{}", f.service, protocol(f), e.ip, e.port)))
}

/// Every chain a frontend owns.
pub fn chains_of(f: &Frontend) -> Vec<String> {
    let mut chains = vec![service_chain(f)];
    chains.extend(f.backends.iter().map(|e| endpoint_chain(f, e)));
    chains
}

#[derive(Clone, Debug, Default)]
pub struct RenderConfig {
    /// Pod network; traffic to a VIP from outside it is masqueraded
    /// (kube-proxy's `--cluster-cidr` local detector).
    pub cluster_cidr: Option<String>,
}

/// Which service chains to write.
pub enum Scope<'a> {
    /// Every chain.
    Full,
    /// Only the chains of these frontends (kube-proxy's partial sync).
    Changed(&'a BTreeSet<FrontendKey>),
}

fn match_frontend(f: &Frontend) -> String {
    let p = protocol(f);
    format!("-m {p} -p {p} -d {}/32 --dport {}", f.key.vip, f.key.port)
}

fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

/// The iptables-restore input (for `--noflush`) that makes the kernel's
/// rules equal `frontends` within `scope`; `stale` chains are flushed and
/// deleted in the same transaction.
pub fn render(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    scope: Scope<'_>,
    stale: &BTreeSet<String>,
    cfg: &RenderConfig,
) -> String {
    let writes = |k: &FrontendKey| match &scope {
        Scope::Full => true,
        Scope::Changed(set) => set.contains(k),
    };
    let mut out = String::new();

    // filter: REJECT for Services without endpoints, and forwarding accepts.
    out.push_str("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n");
    for f in frontends.values().filter(|f| f.backends.is_empty()) {
        writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} has no endpoints\" {} -j REJECT",
            f.service,
            match_frontend(f)
        )
        .expect("writing to a String cannot fail");
    }
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK} -j ACCEPT"
    )
    .expect("writing to a String cannot fail");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n");

    // nat: declare every chain written (declaring flushes it), then rules.
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::new();
    for f in frontends.values().filter(|f| !f.backends.is_empty()) {
        writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" {} -j {}",
            f.service,
            match_frontend(f),
            service_chain(f)
        )
        .expect("writing to a String cannot fail");
    }
    for f in frontends.values().filter(|f| writes(&f.key)) {
        if f.backends.is_empty() {
            continue;
        }
        let svc = service_chain(f);
        writeln!(out, ":{svc} - [0:0]").expect("writing to a String cannot fail");
        if let Some(cidr) = &cfg.cluster_cidr {
            writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} cluster IP\" {} ! -s {cidr} -j KUBE-MARK-MASQ",
                f.service,
                match_frontend(f)
            )
            .expect("writing to a String cannot fail");
        }
        let n = f.backends.len();
        for (i, e) in f.backends.iter().enumerate() {
            let sep = endpoint_chain(f, e);
            writeln!(out, ":{sep} - [0:0]").expect("writing to a String cannot fail");
            let spread = if i + 1 < n {
                format!(" -m statistic --mode random --probability {}", probability(n - i))
            } else {
                String::new()
            };
            writeln!(rules, "-A {svc} -m comment --comment \"{} -> {}:{}\"{spread} -j {sep}", f.service, e.ip, e.port)
                .expect("writing to a String cannot fail");
            let p = protocol(f);
            writeln!(rules, "-A {sep} -m comment --comment {} -s {}/32 -j KUBE-MARK-MASQ", f.service, e.ip)
                .expect("writing to a String cannot fail");
            writeln!(
                rules,
                "-A {sep} -m comment --comment {} -m {p} -p {p} -j DNAT --to-destination {}:{}",
                f.service, e.ip, e.port
            )
            .expect("writing to a String cannot fail");
        }
    }
    for chain in stale {
        writeln!(out, ":{chain} - [0:0]").expect("writing to a String cannot fail");
    }
    out.push_str(&rules);
    writeln!(out, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN")
        .expect("writing to a String cannot fail");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    for chain in stale {
        writeln!(out, "-X {chain}").expect("writing to a String cannot fail");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        frontend::{Protocol, ServiceType},
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
            node_port: None,
            load_balancer_ips: Box::default(),
            backends: backends.iter().map(|(ip, port)| Endpoint { ip: Ipv4Addr::from(*ip), port: *port }).collect(),
            terminating: Box::default(),
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
        let rules =
            render(&m, Scope::Full, &BTreeSet::new(), &RenderConfig { cluster_cidr: Some("10.244.0.0/16".into()) });
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
}
