//! The DNS add-on on the two-node test cluster, in both modes: kpr on
//! node 0 answers cluster names (every record kind of the Kubernetes DNS
//! specification) to `dig` and the libc resolver in a pod with a pod's
//! resolv.conf, forwards other names to a dnsmasq upstream outside the
//! cluster (over TCP when the answer is truncated, from its cache once the
//! upstream is gone), follows Services in and out within a second, shrugs
//! off a stream of garbage, and stands in for the cluster DNS Service of
//! its node while it runs, handing it back to the Service's own pod (a
//! second dnsmasq) when it stops.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use kpr_tests::{
    cluster::{Cluster, ClusterNode, Shape},
    kpr::Mode,
    manifests::{web_service, write},
    netns::Netns,
    root_or_skip,
    servers::Dnsmasq,
    wait,
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LATE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
/// What the cluster DNS Service's own server answers for every name.
const CLUSTER_DNS_ANSWER: &str = "192.0.2.53";
/// What the upstream answers for example.test and its subdomains.
const UPSTREAM_ANSWER: &str = "192.0.2.7";

/// A pod's resolv.conf, which `ip netns exec` mounts over /etc/resolv.conf
/// for the namespace's processes; removed on drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn write(ns: &Netns, nameserver: Ipv4Addr) -> Self {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver {nameserver}\noptions ndots:5\n"
        );
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        Self(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// `dig ARGS` in namespace `ns` (as a process of `node`'s cgroup when
/// given, so the socket hooks serve it); what it printed.
fn dig_in(ns: &str, node: Option<&ClusterNode>, args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "dig", "+time=2", "+tries=1"]).args(args);
    if let Some(node) = node {
        node.cgroup.place(&mut cmd).unwrap();
    }
    let out = cmd.output().expect("running dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(node: &ClusterNode, pod: &str, server: Ipv4Addr, args: &[&str]) -> Vec<String> {
    let at = format!("@{server}");
    let out = dig_in(node.pod(pod).ns.name(), Some(node), &[&[&at[..], "+short"][..], args].concat());
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The status dig reports (NOERROR, NXDOMAIN, SERVFAIL) and the answer count.
fn status(node: &ClusterNode, pod: &str, server: Ipv4Addr, args: &[&str]) -> (String, usize) {
    let at = format!("@{server}");
    let out = dig_in(node.pod(pod).ns.name(), Some(node), &[&[&at[..]][..], args].concat());
    let status = out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("no answer").to_string();
    let answers =
        out.split("ANSWER: ").nth(1).and_then(|s| s.split(',').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    (status, answers)
}

fn getent(node: &ClusterNode, pod: &str, name: &str) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node.pod(pod).ns.name(), "getent", "hosts", name]);
    node.cgroup.place(&mut cmd).unwrap();
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

fn headless(endpoints: &[(Ipv4Addr, Option<&str>)]) -> String {
    let mut eps = String::new();
    for (ip, hostname) in endpoints {
        eps.push_str(&format!("- addresses: [\"{ip}\"]\n"));
        if let Some(h) = hostname {
            eps.push_str(&format!("  hostname: {h}\n"));
        }
    }
    format!(
        "kind: Service
metadata: {{name: db, namespace: default}}
spec: {{clusterIP: None, ports: [{{name: pg, port: 5432}}]}}
---
kind: EndpointSlice
metadata: {{name: db-1, namespace: default, labels: {{kubernetes.io/service-name: db, service.kubernetes.io/headless: ''}}}}
addressType: IPv4
ports: [{{name: pg, port: 5432, protocol: TCP}}]
endpoints:
{eps}"
    )
}

fn cluster_dns(pod: Ipv4Addr) -> String {
    format!(
        "kind: Service
metadata: {{name: kube-dns, namespace: kube-system}}
spec:
  clusterIP: {DNS_VIP}
  ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]
---
kind: EndpointSlice
metadata: {{name: kube-dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: kube-dns}}}}
addressType: IPv4
ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]
endpoints:
- addresses: [\"{pod}\"]
"
    )
}

const EXTERNAL: &str = "kind: Service
metadata: {name: search, namespace: default}
spec: {type: ExternalName, externalName: www.example.test}
";

fn answers_cluster_names(mode: Mode) {
    root_or_skip!();
    let pods = [(0, "client", 100), (0, "web-0", 11), (1, "web-1", 11), (1, "coredns", 53)];
    let cluster = Cluster::with_pods(Shape::HostGw, 2, &pods).unwrap();
    let (node0, node1) = (cluster.node(0), cluster.node(1));
    let dns = node0.address();
    // Seven 200-byte strings: more than a UDP answer holds (1232 bytes).
    let big: Vec<String> = (0..7).map(|i| format!("{i}{}", "x".repeat(199))).collect();
    let upstream = Dnsmasq::start(
        cluster.outside(),
        Cluster::OUTSIDE,
        None,
        &[
            "--no-resolv".into(),
            "--local-ttl=60".into(),
            "--address=/example.test/192.0.2.7".into(),
            format!("--txt-record=big.example.test,{}", big.join(",")),
        ],
    )
    .unwrap();
    let coredns = node1.pod("coredns");
    let cluster_dns_args = ["--no-resolv".into(), format!("--address=/#/{CLUSTER_DNS_ANSWER}")];
    let _cluster_dns = Dnsmasq::start(&coredns.ns, coredns.ip, None, &cluster_dns_args).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let (web0, web1) = (node0.pod("web-0").ip, node1.pod("web-1").ip);
    write(&manifests, "web.yaml", &web_service("web", WEB_VIP, &[("web-0", web0), ("web-1", web1)])).unwrap();
    write(&manifests, "db.yaml", &headless(&[(web0, Some("db-0")), (web1, None)])).unwrap();
    write(&manifests, "search.yaml", EXTERNAL).unwrap();
    write(&manifests, "kube-dns.yaml", &cluster_dns(coredns.ip)).unwrap();
    let source = format!("--source=dir:{}", manifests.display());
    let dns_args = [
        format!("--dns-listen={dns}"),
        format!("--dns-upstream={}", Cluster::OUTSIDE),
        "--dns-capture-service=kube-system/kube-dns".into(),
    ];
    let mut kpr0 =
        node0.start_kpr(&[], &[&[mode.arg().to_string(), source.clone()][..], &dns_args].concat(), dir.path()).unwrap();
    let _kpr1 = node1.start_kpr(&[], &[mode.arg().to_string(), source], dir.path()).unwrap();
    kpr0.wait_for_log("DNS capture: this node's clients", Duration::from_secs(10)).unwrap();

    // Every record kind, asked with dig from a pod.
    let ask = |args: &[&str]| short(node0, "client", dns, args);
    assert_eq!(ask(&["web.default.svc.cluster.local"]), [WEB_VIP.to_string()]);
    assert_eq!(ask(&["_http._tcp.web.default.svc.cluster.local", "SRV"]), ["0 100 80 web.default.svc.cluster.local."]);
    assert_eq!(ask(&["-x", &WEB_VIP.to_string()]), ["web.default.svc.cluster.local."]);
    assert_eq!(ask(&["db.default.svc.cluster.local"]), [web0.to_string(), web1.to_string()]);
    assert_eq!(ask(&["db-0.db.default.svc.cluster.local"]), [web0.to_string()]);
    let dashed = format!("{}.db.default.svc.cluster.local.", web1.to_string().replace('.', "-"));
    assert_eq!(
        ask(&["_pg._tcp.db.default.svc.cluster.local", "SRV"]),
        [format!("0 50 5432 {dashed}"), "0 50 5432 db-0.db.default.svc.cluster.local.".into()]
    );
    assert_eq!(ask(&["-x", &web0.to_string()]), ["db-0.db.default.svc.cluster.local."]);
    assert_eq!(ask(&["search.default.svc.cluster.local"]), [UPSTREAM_ANSWER, "www.example.test."]);
    assert_eq!(ask(&["dns-version.cluster.local", "TXT"]), ["\"1.1.0\""]);
    let no = |args: &[&str]| status(node0, "client", dns, args);
    assert_eq!(no(&["nope.default.svc.cluster.local"]), ("NXDOMAIN".into(), 0));
    assert_eq!(no(&["web.default.svc.cluster.local", "MX"]), ("NOERROR".into(), 0), "NODATA");

    // Names outside the cluster go upstream; a truncated answer is fetched over TCP.
    assert_eq!(ask(&["example.test"]), [UPSTREAM_ANSWER]);
    let txt = ask(&["big.example.test", "TXT"]).concat();
    assert!(big.iter().all(|s| txt.contains(s.as_str())), "the whole TXT record: {txt}");

    // The libc resolver through a pod's search path.
    let _resolv = ResolvConf::write(&node0.pod("client").ns, dns);
    assert_eq!(getent(node0, "client", "web"), WEB_VIP.to_string());
    assert_eq!(getent(node0, "client", "web.default.svc"), WEB_VIP.to_string());
    assert_eq!(getent(node0, "client", "db-0.db"), web0.to_string());
    assert_eq!(getent(node0, "client", "example.test"), UPSTREAM_ANSWER);

    // A Service's name follows it in and out within a second.
    let started = Instant::now();
    write(&manifests, "late.yaml", &web_service("late", LATE_VIP, &[("web-0", web0)])).unwrap();
    wait::until(
        "late answered",
        Duration::from_secs(1),
        || ask(&["late.default.svc.cluster.local"]),
        |a| a == &[LATE_VIP.to_string()],
    )
    .unwrap();
    eprintln!("a new Service answered after {:?}", started.elapsed());
    std::fs::remove_file(manifests.join("late.yaml")).unwrap();
    wait::until("late gone", Duration::from_secs(1), || no(&["late.default.svc.cluster.local"]), |s| s.0 == "NXDOMAIN")
        .unwrap();

    // Through the cluster DNS Service's VIP, over UDP and TCP: the add-on answers.
    for tcp in ["+notcp", "+tcp"] {
        assert_eq!(short(node0, "client", DNS_VIP, &[tcp, "web.default.svc.cluster.local"]), [WEB_VIP.to_string()]);
    }

    // Garbage: answered FORMERR or dropped, and the server answers on.
    let target = SocketAddr::from((dns, 53));
    node0
        .pod("client")
        .ns
        .run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut state = 0x2545_f491_4f6c_dd1du64;
            for i in 0..3000usize {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let len = 1 + (state as usize) % 300;
                let bytes: Vec<u8> = (0..len).map(|j| (state >> (j % 57)) as u8 ^ i as u8).collect();
                socket.send_to(&bytes, target).unwrap();
            }
        })
        .unwrap();
    assert_eq!(ask(&["web.default.svc.cluster.local"]), [WEB_VIP.to_string()], "still answering");

    // The upstream goes: cached names are still answered, others fail.
    drop(upstream);
    assert_eq!(ask(&["example.test"]), [UPSTREAM_ANSWER], "from the cache");
    assert_eq!(no(&["new.example.test"]).0, "SERVFAIL");

    // kpr stops: the node's clients of the cluster DNS Service reach its own pod again.
    kpr0.stop(libc::SIGTERM).unwrap();
    assert_eq!(short(node0, "client", DNS_VIP, &["web.default.svc.cluster.local"]), [CLUSTER_DNS_ANSWER]);
}

kpr_tests::in_both_modes!(answers_cluster_names);
