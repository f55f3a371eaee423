//! Mode selection: the fallback from eBPF to iptables when the eBPF probe
//! really fails, switching modes on one node (exactly one dataplane each
//! time, foreign rules untouched), the iptables backend choice, and
//! `kpr cleanup`, checked against the node's own bpffs, the programs on its
//! interfaces and its iptables rules, each seen present before it is seen
//! gone.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use kpr_tests::{
    client::{Repeating, every_10ms, tcp_request},
    kpr::{self, Kpr},
    manifests::{web_service, write},
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
    wait,
};
use proxy_userspace::dataplane::ebpf::{self as kpr_ebpf, FROM_POD, MapSizes, PACKET_PROGRAMS, TO_POD};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
    ("client", Ipv4Addr::new(10, 244, 0, 100)),
];
/// An interface the pods have in their own namespaces but the node does not
/// have in its namespace: attaching there fails for real.
const ABSENT_IFACE: &str = "eth0";

struct Node {
    dir: tempfile::TempDir,
    _servers: Vec<Server>,
    node: VirtualNode,
}

impl Node {
    fn new() -> Self {
        let node = VirtualNode::new(&PODS).unwrap();
        let servers = PODS[..2].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        write(&dir.path().join("manifests"), "web.yaml", &web_service("web", VIP, &PODS[..2])).unwrap();
        Self { dir, _servers: servers, node }
    }

    fn source(&self) -> String {
        format!("--source=dir:{}", self.dir.path().join("manifests").display())
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("kpr.log")
    }

    fn kpr(&self, args: &[&str]) -> Kpr {
        let mut all = vec![self.source()];
        all.extend(args.iter().map(|a| a.to_string()));
        Kpr::start_with(&self.node, &all, &self.log(), "synced").unwrap()
    }

    /// How many of `n` fresh connections from the client pod to the VIP get an answer.
    fn answered(&self, n: usize, timeout: Duration) -> usize {
        self.node
            .pod("client")
            .ns
            .run(move || (0..n).filter(|_| tcp_request(SocketAddr::from((VIP, 80)), timeout).is_ok()).count())
            .unwrap()
    }

    fn answers(&self) -> bool {
        self.answered(10, Duration::from_secs(2)) == 10
    }

    /// No connection is answered. Only meaningful where the same client got
    /// answers before (see each use).
    fn silent(&self) -> bool {
        self.answered(3, Duration::from_secs(1)) == 0
    }

    /// Per pod interface, the programs on its ingress: TCX links (what the
    /// agent attaches on this kernel) and netlink classifiers (what a kernel
    /// before 6.6 gets, and what outlives the process that attached it).
    fn programs(&self) -> BTreeMap<String, Vec<String>> {
        let ifaces = self.node.interfaces();
        let mut attached: BTreeMap<String, Vec<String>> = self
            .node
            .ns
            .run(move || {
                ifaces
                    .into_iter()
                    .map(|i| {
                        let names = [TcAttachType::Ingress, TcAttachType::Egress]
                            .into_iter()
                            .flat_map(|hook| SchedClassifier::query_tcx(&i, hook).unwrap().1)
                            .map(|p| format!("tcx {}", p.name_as_str().unwrap_or("?")))
                            .collect();
                        (i, names)
                    })
                    .collect()
            })
            .unwrap();
        for (iface, programs) in &mut attached {
            for hook in ["ingress", "egress"] {
                // Without a clsact qdisc there is no hook and nothing to list.
                let filters = self.node.ns.output(&["tc", "filter", "show", "dev", iface, hook]).unwrap_or_default();
                programs.extend(
                    filters
                        .lines()
                        .filter(|l| l.contains(" bpf ") && l.contains("handle"))
                        .map(|l| format!("netlink {l}")),
                );
            }
        }
        attached
    }

    fn program_count(&self) -> usize {
        self.programs().values().map(Vec::len).sum()
    }

    /// The folder kpr pins its maps and links in, on the node's bpffs.
    fn pin_dir(&self) -> PathBuf {
        self.node.bpf_root().join("kpr")
    }

    /// The map pins of this layout, sorted; none when the folder is gone.
    fn pins(&self) -> Vec<String> {
        let maps = self.pin_dir().join(format!("maps-v{}", proxy_common::maps::LAYOUT));
        let mut pins: Vec<String> = std::fs::read_dir(maps)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        pins.sort();
        pins
    }

    fn all_map_pins() -> Vec<String> {
        let all = proxy_common::maps::ALL_MAPS.iter().chain(&proxy_common::maps::SOCKET_STORAGE);
        let mut all: Vec<String> = all.map(|m| m.to_string()).collect();
        all.sort();
        all
    }

    /// Attaches kpr's classifiers on every pod interface through netlink, as
    /// an agent on a kernel before 6.6 (no TCX) leaves it behind: such an
    /// attachment outlives its process, and removing it is cleanup's job.
    fn leave_netlink_classifiers(&self) {
        let ifaces = self.node.interfaces();
        self.node
            .ns
            .run(move || {
                let mut ebpf = kpr_ebpf::load(MapSizes::default()).unwrap();
                for (name, hook) in PACKET_PROGRAMS {
                    let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
                    program.load().unwrap();
                    for iface in &ifaces {
                        if let Err(e) = tc::qdisc_add_clsact(iface) {
                            // The agent (or the other program) made one already.
                            eprintln!("clsact on {iface}: {e}");
                        }
                        let options = TcAttachOptions::Netlink(NlOptions::default());
                        let id = program.attach_with_options(iface, hook, options).unwrap();
                        // Dropping the link would detach it; the kernel keeps the filter without it.
                        std::mem::forget(program.take_link(id).unwrap());
                    }
                }
            })
            .unwrap();
    }

    fn cleanup(&self) -> String {
        let root = format!("--bpf-root={}", self.node.bpf_root().display());
        kpr::command(&self.node.ns, &["cleanup", &root]).unwrap()
    }

    fn save(&self, backend: &str) -> String {
        ["nat", "filter"]
            .iter()
            .map(|t| self.node.ns.output(&[&format!("iptables-{backend}-save"), "-t", t]).unwrap())
            .collect()
    }

    /// kpr's chains in either backend.
    fn kpr_chains(&self) -> usize {
        ["nft", "legacy"].iter().map(|b| self.save(b).lines().filter(|l| l.starts_with(":KUBE-")).count()).sum()
    }

    fn status(&self) -> String {
        let state = kpr::state_dir(&self.log());
        kpr::command(&self.node.ns, &["status", &format!("--state-dir={}", state.display())]).unwrap()
    }
}

#[test]
fn auto_mode_uses_ebpf_where_it_can() {
    root_or_skip!();
    let n = Node::new();
    let mut kpr = n.kpr(&["--mode=auto"]);
    assert!(n.answers());
    assert_eq!(n.program_count(), 2 * PODS.len(), "ingress and egress: {:?}", n.programs());
    assert_eq!(n.kpr_chains(), 0);
    assert!(n.status().contains("mode:       ebpf"), "{}", n.status());
    kpr.interrupt().unwrap();
    assert!(n.status().contains("not running"));
}

#[test]
fn auto_mode_falls_back_to_iptables_when_attaching_fails_and_says_why() {
    root_or_skip!();
    let n = Node::new();
    // The probe's failure is real: the interface is missing where kpr runs.
    assert!(n.node.ns.output(&["ip", "link", "show", ABSENT_IFACE]).is_err(), "the node has no {ABSENT_IFACE}");
    n.node.pod("client").ns.output(&["ip", "link", "show", ABSENT_IFACE]).expect("a pod has one");
    // The pod interfaces come first, so the probe attaches to them before it
    // fails; the fallback must take those attachments away again.
    let mut interfaces = n.node.interfaces();
    interfaces.push(ABSENT_IFACE.into());
    let args = [
        "--mode=auto".to_string(),
        n.source(),
        format!("--interfaces={}", interfaces.join(",")),
        format!("--bpf-root={}", n.node.bpf_root().display()),
    ];
    let mut kpr = Kpr::run_in(&n.node.ns, &args, &n.log()).unwrap();
    kpr.wait_for_log("synced", Duration::from_secs(20)).unwrap();

    assert!(n.answers(), "Services work through iptables:\n{}", kpr.log());
    assert!(n.save("nft").contains(":KUBE-SERVICES"), "{}", n.save("nft"));
    assert_eq!(n.program_count(), 0, "no eBPF program stays attached: {:?}", n.programs());
    assert!(n.pins().is_empty(), "no maps pinned: {:?}", n.pins());
    let log = kpr.log();
    let why: Vec<&str> = log.lines().filter(|l| names_absent_iface(l)).collect();
    assert_eq!(why.len(), 1, "one line says why:\n{log}");
    assert!(why[0].to_lowercase().contains("attach") && why[0].contains("iptables"), "{}", why[0]);
    assert!(log.contains("mode=\"iptables\"") || log.contains("mode=iptables"), "{log}");
    let status = n.status();
    assert!(status.contains("mode:       iptables"), "{status}");
    let reason = status.lines().find(|l| l.contains("fell back")).unwrap_or_else(|| panic!("no reason:\n{status}"));
    assert!(names_absent_iface(reason), "{status}");
}

/// A TCP connection from a pod, outside the node's cgroup (so the
/// per-packet path translates it), asking again and again.
struct HeldStream {
    stream: std::net::TcpStream,
    lines: std::io::Lines<std::io::BufReader<std::net::TcpStream>>,
}

impl HeldStream {
    fn open(client: &kpr_tests::netns::Netns, addr: SocketAddr) -> Self {
        let stream = client.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))).unwrap();
        let stream = stream.unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(stream.try_clone().unwrap()));
        Self { stream, lines }
    }

    fn ask(&mut self) -> std::io::Result<String> {
        std::io::Write::write_all(&mut self.stream, b"again\n")?;
        self.lines.next().unwrap_or_else(|| Err(std::io::ErrorKind::UnexpectedEof.into()))
    }
}

/// Whether `text` names [`ABSENT_IFACE`] as a whole word (not inside `veth0`).
fn names_absent_iface(text: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    text.match_indices(ABSENT_IFACE)
        .any(|(i, _)| !word(text[..i].chars().next_back()) && !word(text[i + ABSENT_IFACE.len()..].chars().next()))
}

#[test]
fn switching_modes_leaves_exactly_one_dataplane_and_cleanup_leaves_none() {
    root_or_skip!();
    let n = Node::new();
    // Rules that are not kpr's must survive everything below.
    n.node.ns.exec(&["iptables-nft", "-N", "SITE-POLICY"]).unwrap();
    n.node.ns.exec(&["iptables-nft", "-A", "SITE-POLICY", "-s", "192.0.2.0/24", "-j", "DROP"]).unwrap();
    n.node.ns.exec(&["iptables-nft", "-A", "FORWARD", "-j", "SITE-POLICY"]).unwrap();
    let foreign = |n: &Node| {
        let s = n.save("nft");
        s.contains("-A SITE-POLICY -s 192.0.2.0/24 -j DROP") && s.contains("-A FORWARD -j SITE-POLICY")
    };

    let mut kpr = n.kpr(&["--mode=ebpf"]);
    assert!(n.answers());
    assert_eq!((n.program_count(), n.kpr_chains()), (2 * PODS.len(), 0), "ebpf only");
    kpr.interrupt().unwrap();
    assert_eq!(n.pins(), Node::all_map_pins(), "maps stay pinned after eBPF mode exits");
    assert_eq!(n.program_count(), 2 * PODS.len(), "and its programs serve on");

    // Clients connecting all through the switch, on the per-packet path and
    // through the socket hooks, are all answered: flows eBPF mode took on
    // just before iptables mode serves finish through its programs.
    let client = &n.node.pod("client").ns;
    let vip = SocketAddr::from((VIP, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let per_packet = every_10ms(client, vip, Duration::from_secs(2), stop.clone());
    let sockets = Repeating::start(Path::new(env!("CARGO_BIN_EXE_kpr-probe")), client, &n.node.cgroup, vip).unwrap();
    // And a connection the per-packet path took on before the switch is
    // still served after iptables mode serves.
    let mut held = HeldStream::open(client, vip);
    assert!(held.ask().is_ok());
    std::thread::sleep(Duration::from_millis(300));
    let mut kpr = n.kpr(&["--mode=iptables"]);
    std::thread::sleep(Duration::from_millis(500));
    let answer = held.ask();
    assert!(answer.is_ok(), "the connection eBPF mode took on: {answer:?}\n{}", kpr.log());
    assert!(n.answers());
    // Once iptables mode serves (right after its first sync) and eBPF
    // mode's flows have had time to finish.
    let detached = wait::until(
        "iptables mode detaches eBPF mode's programs",
        Duration::from_secs(8),
        || n.program_count(),
        |count| *count == 0,
    );
    detached.unwrap();
    wait::until("iptables mode removes eBPF mode's pinned maps", Duration::from_secs(5), || n.pins(), Vec::is_empty)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (per_packet, sockets) = (per_packet.join().unwrap(), sockets.finish().unwrap());
    for (path, tally) in [("per-packet", per_packet), ("socket", sockets)] {
        assert!(tally.failed == 0 && tally.ok > 20, "{path} clients through the switch: {tally:?}\n{}", kpr.log());
    }
    assert!(kpr.log().contains("new flows go to iptables"), "{}", kpr.log());
    assert!(n.kpr_chains() > 0);
    kpr.interrupt().unwrap();
    // As with kube-proxy, iptables rules outlive the agent and keep serving.
    assert!(n.answers(), "rules stay in place after iptables mode exits");

    let mut kpr = n.kpr(&["--mode=ebpf"]);
    assert!(n.answers());
    // The take-over happens once eBPF serves, right after its first sync
    // (IPv6's rules, which no Service needs, may go during that sync).
    kpr.wait_for_log("removed kpr's iptables rules backend=\"nf_tables\"", Duration::from_secs(10)).unwrap();
    assert_eq!(
        (n.program_count(), n.kpr_chains()),
        (2 * PODS.len(), 0),
        "taking over removed iptables mode's rules:\n{}",
        kpr.log()
    );
    assert!(foreign(&n), "other rules untouched:\n{}", n.save("nft"));
    kpr.interrupt().unwrap();

    // What iptables mode leaves behind, serving until cleanup.
    let mut kpr = n.kpr(&["--mode=iptables"]);
    kpr.interrupt().unwrap();
    assert!(n.kpr_chains() > 0);
    assert!(n.answers(), "the rules serve until cleanup");
    n.cleanup();
    assert_eq!((n.program_count(), n.kpr_chains()), (0, 0), "cleanup leaves nothing:\n{}", n.save("nft"));
    assert!(foreign(&n), "other rules untouched:\n{}", n.save("nft"));
    assert!(n.silent(), "nothing proxies any more");
}

#[test]
fn cleanup_removes_the_pinned_maps_and_the_programs_an_agent_left() {
    root_or_skip!();
    let n = Node::new();
    let mut kpr = n.kpr(&["--mode=ebpf"]);
    assert!(n.answers());
    assert_eq!(n.program_count(), 2 * PODS.len(), "ingress and egress: {:?}", n.programs());
    assert_eq!(n.pins(), Node::all_map_pins(), "every map pinned on the node's bpffs");
    kpr.interrupt().unwrap();
    // The agent's links are pinned: its programs serve on without it.
    assert_eq!(n.program_count(), 2 * PODS.len(), "{:?}", n.programs());
    assert_eq!(n.pins(), Node::all_map_pins());
    assert!(n.answers(), "Services keep working while the agent is down");

    n.leave_netlink_classifiers();
    let before = n.programs();
    assert!(
        before.values().all(|p| {
            let netlink: Vec<&String> = p.iter().filter(|p| p.starts_with("netlink")).collect();
            p.len() == 4 && netlink.len() == 2 && netlink[0].contains(FROM_POD) && netlink[1].contains(TO_POD)
        }),
        "the agent's two pinned links and two leftover netlink classifiers per interface: {before:?}"
    );

    let out = n.cleanup();
    assert!(!n.pin_dir().exists(), "the pin folder is gone from the node's bpffs: {:?} ({out})", n.pins());
    assert_eq!(n.program_count(), 0, "every leftover program detached ({out}): {:?}", n.programs());
    // With nothing pinned, the inspection commands say so.
    let root = format!("--bpf-root={}", n.node.bpf_root().display());
    let err = kpr::command(&n.node.ns, &["service", "list", &root]).unwrap_err();
    assert!(format!("{err:#}").contains("no pinned kpr maps"), "{err:#}");
}

#[test]
fn iptables_mode_uses_the_backend_that_already_has_rules() {
    root_or_skip!();
    let n = Node::new();
    n.node.ns.exec(&["iptables-legacy", "-A", "INPUT", "-s", "192.0.2.1/32", "-j", "ACCEPT"]).unwrap();
    let kpr = n.kpr(&["--mode=iptables"]);
    assert!(n.answers());
    assert!(n.save("legacy").contains(":KUBE-SERVICES"), "{}", n.save("legacy"));
    assert!(!n.save("nft").contains(":KUBE-SERVICES"));
    assert!(kpr.log().contains("backend=\"legacy\"") || kpr.log().contains("backend=legacy"), "{}", kpr.log());
}
