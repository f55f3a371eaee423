//! `cargo xtask bench`: kpr's eBPF mode against iptables mode and against
//! no proxy at all (the pod IP directly), at growing numbers of Services,
//! on a virtual node in network namespaces. Nothing broken passes silently:
//! a mode that does not answer, a change that is not followed, or a load
//! with over 1% failed connections ends a strict (`--quick`) run with an
//! error naming the mode and N, and is listed in the report of any other.

pub mod dns;
pub mod load;
pub mod packets;
pub mod programs;
pub mod report;
pub mod topology;
pub mod workload;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use topology::{BenchNode, Family, Nodes, Placement};

use crate::{
    kpr::{self, Kpr},
    netns::Netns,
    servers::{self, Server},
};

/// Client threads run on this CPU, servers on the other.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;
const PORT: u16 = 8080;
const SERVING: [&str; 3] = ["ep-1", "ep-2", "ep-3"];
const SPARE: &str = "ep-4";

pub struct Config {
    pub quick: bool,
    /// A broken measurement (a mode that does not answer, a change that is
    /// not followed, connection errors over 1% of a load's attempts) ends
    /// the run with an error naming the mode and N. Otherwise it is listed
    /// in the report and the run goes on.
    pub strict: bool,
    pub services: Vec<usize>,
    /// The dataplanes measured at each N, beside the direct line: `--mode`
    /// values, where `ebpf` is the per-packet path alone
    /// (`--socket-lb=false`; from outside, XDP on the node's devices),
    /// `ebpf-tc` the same with `--xdp=off` (measured from outside only, the
    /// one place XDP acts) and `ebpf-socket` the socket hooks with the load
    /// generator under the node's cgroup.
    pub modes: Vec<&'static str>,
    /// Backends beside the clients, on another node, or both.
    pub placements: Vec<Placement>,
    /// Numbers of Services also measured over IPv6, on an IPv6-only
    /// cluster: the direct line and every mode but those measured from
    /// outside alone, with the backends on the clients' node and on
    /// another (of `placements`).
    pub ipv6_services: Vec<usize>,
    /// The packet-rate test (see `packets`).
    pub packet_rate: bool,
    /// Numbers of Services the DNS add-on is measured at (see `dns`).
    pub dns_services: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub repetitions: usize,
    /// Pairs of runs of the socket-level row taken in turn with the direct
    /// line while the agent runs (see [`Row::socket_in_turn`]), and how long
    /// each run is.
    pub pairs: usize,
    pub pair_run: Duration,
    /// Concurrent client connections of the connection-rate load.
    pub threads: usize,
    /// How long a mode may take to answer after the agent starts, and to
    /// follow one change.
    pub answer_within: Duration,
    pub out: PathBuf,
}

impl Config {
    pub fn full(out: PathBuf) -> Self {
        Self {
            quick: false,
            strict: false,
            services: vec![1, 1_000, 10_000, 50_000],
            modes: vec!["ebpf-socket", "ebpf", "ebpf-tc", "iptables"],
            placements: vec![Placement::SameNode, Placement::OtherNode, Placement::Outside],
            ipv6_services: vec![1, 10_000],
            packet_rate: true,
            dns_services: vec![1_000, 50_000],
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(3),
            repetitions: 3,
            pairs: 8,
            pair_run: Duration::from_secs(1),
            threads: 4,
            answer_within: Duration::from_secs(900),
            out,
        }
    }

    /// The smoke test: small N, short runs, and any broken measurement fails.
    pub fn quick(out: PathBuf) -> Self {
        Self {
            quick: true,
            strict: true,
            services: vec![1, 1_000],
            modes: vec!["ebpf-socket", "ebpf", "ebpf-tc", "iptables"],
            placements: vec![Placement::SameNode, Placement::OtherNode, Placement::Outside],
            ipv6_services: vec![1],
            packet_rate: true,
            dns_services: vec![1_000],
            warmup: Duration::from_millis(200),
            duration: Duration::from_millis(700),
            repetitions: 1,
            pairs: 2,
            pair_run: Duration::from_millis(500),
            threads: 4,
            answer_within: Duration::from_secs(120),
            out,
        }
    }
}

/// Median and spread of repeated measurements.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self { median: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let mid = v.len() / 2;
        // An even count (a change timed there and back) has two middles.
        let median = if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] };
        Self { median, min: v[0], max: v[v.len() - 1] }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Row {
    pub mode: String,
    /// Where the backends ran, seen from the clients.
    pub placement: Placement,
    /// The family of the Services and of the traffic.
    pub family: Family,
    pub services: usize,
    /// Endpoints installed over all N Services.
    pub endpoints: usize,
    /// Connections per second (connect, request, reply, close).
    pub conn_rate: Stat,
    /// `conn_rate` over `direct_paired`.
    pub conn_ratio: Option<f64>,
    /// The direct rate in the runs just before and just after this row's
    /// agent ran (none running), so that the machine's slow drift between
    /// the direct row and this one does not show as a difference between them.
    pub direct_paired: Option<Stat>,
    /// Socket-level rows: the rate with the hooks over the direct rate, in
    /// pairs of runs taken in turn while the agent runs (this process moved
    /// into the node's cgroup for one run of a pair and out of it for the
    /// other), one ratio a pair. Nothing else of the agent's is on either
    /// path (no program on the interfaces), so this is the hooks' cost
    /// alone, and the machine's drift over minutes falls within no pair.
    pub socket_in_turn: Option<Stat>,
    /// Failed and attempted connections over all connection-rate runs.
    pub conn_errors: u64,
    pub conn_attempts: u64,
    /// The highest share of failed attempts in any one run.
    pub conn_error_worst: f64,
    /// Request/reply latency on an established connection, microseconds.
    pub rr_p50_us: Stat,
    pub rr_p99_us: Stat,
    /// From starting the agent to the measured Service answering.
    pub cold_ms: Option<f64>,
    /// From rewriting one EndpointSlice to traffic reaching the new endpoint.
    pub change_ms: Option<Stat>,
    /// Agent resident memory once all N Services answer (VmRSS).
    pub agent_rss_mib: Option<f64>,
    /// Agent peak resident memory over the whole measurement (VmHWM).
    pub agent_peak_mib: Option<f64>,
    /// What the kernel charges for the agent's BPF maps, each map once.
    pub bpf_maps_mib: Option<f64>,
    pub bpf_map_count: Option<usize>,
    pub iptables_rules: Option<usize>,
    /// The iptables backend holding kpr's rules (iptables mode).
    pub iptables_backend: Option<String>,
    /// CPU time of the agent (and its iptables-restore children) to program all N Services.
    pub agent_cpu_ms: Option<f64>,
}

impl Row {
    /// Failed over attempted connections in all connection-rate runs.
    pub fn conn_error_rate(&self) -> Option<f64> {
        (self.conn_attempts > 0).then(|| self.conn_errors as f64 / self.conn_attempts as f64)
    }
}

/// Is the direct line limited by the load generator? Direct connection
/// rates from one generator (on the client CPU, as every other load) and
/// from two at once, the second on another CPU, in interleaved runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GeneratorCheck {
    /// Runs with each number of generators.
    pub runs: usize,
    pub one: Stat,
    pub two: Stat,
    pub client_cpu: usize,
    pub server_cpu: usize,
    /// Where the second generator ran: a CPU of its own if the machine has
    /// one, else the servers' CPU.
    pub second_cpu: usize,
    /// Busy share of the client and server CPUs during the one-generator
    /// runs (median; machine-wide, so other work counts as busy).
    pub client_cpu_busy: f64,
    pub server_cpu_busy: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub quick: bool,
    pub duration_s: f64,
    pub repetitions: usize,
    pub threads: usize,
    pub iptables_backend: String,
    pub generator: Option<GeneratorCheck>,
    pub rows: Vec<Row>,
    /// Small UDP packets from outside through a node port, per mode.
    pub packet_rates: Vec<packets::PacketRow>,
    /// A run of the per-packet path's programs, by the kind of packet.
    pub program_costs: Vec<programs::ProgramCost>,
    /// The DNS add-on and the reference server under dnsperf.
    pub dns: Vec<dns::DnsRow>,
    /// How soon the DNS add-on answered for a new Service.
    pub dns_changes: Vec<dns::DnsChange>,
    /// Measurements that went wrong (a run that is not strict goes on).
    pub problems: Vec<String>,
}

/// At most this share of a load's connection attempts may fail.
pub const MAX_ERROR_RATE: f64 = 0.01;

/// What went wrong so far; in a strict run the first problem is the error.
struct Problems {
    strict: bool,
    seen: Vec<String>,
}

impl Problems {
    fn note(&mut self, what: String) -> anyhow::Result<()> {
        if self.strict {
            anyhow::bail!("bench: {what}");
        }
        eprintln!("bench: {what} (reported; the run goes on)");
        self.seen.push(what);
        Ok(())
    }

    /// A load fails when nothing completed or over 1% of attempts failed.
    fn check_load(&mut self, load: &load::ConnLoad, what: &str) -> anyhow::Result<()> {
        if load.completed == 0 {
            self.note(format!("{what}: no connection completed ({} failed)", load.errors))
        } else if load.error_rate() > MAX_ERROR_RATE {
            self.note(format!(
                "{what}: {} of {} connections failed ({:.2}%, over the {:.0}% allowed)",
                load.errors,
                load.attempts(),
                load.error_rate() * 100.0,
                MAX_ERROR_RATE * 100.0
            ))
        } else {
            Ok(())
        }
    }
}

/// How a problem names what was measured.
pub(crate) fn label(row: &Row) -> String {
    let family = if row.family == Family::Ipv6 { " over IPv6" } else { "" };
    match row.placement {
        Placement::SameNode => format!("{}{family} at N={}", row.mode, row.services),
        Placement::Outside => format!("{}{family} at N={} (from outside)", row.mode, row.services),
        other => format!("{}{family} at N={} (backends on the {})", row.mode, row.services, other.as_str()),
    }
}

/// From outside, the pods dialled directly by a client whose traffic the
/// node-port node routes both ways (no agent running): what the node port
/// path's extra hop through that node costs with no proxy at all.
pub const ROUTED: &str = "direct via node";

/// The load generators, by name and host part of their address. Separate
/// clients for Service and direct traffic: the servers keep TIME_WAIT state
/// per client address and port, and a client's ISNs depend on the address
/// it dials, so sharing one client between the VIP and the pod IPs would
/// make each load trip over the other's TIME_WAITs. Socket-level load
/// balancing dials the pod IPs too, with the ISNs of those addresses: it
/// has a client of its own for the same reason.
const CLIENTS: [(&str, u8); 3] = [("client", 100), ("direct", 101), ("socket-client", 102)];

struct Bench {
    placement: Placement,
    family: Family,
    // Servers first: they stop before their namespaces go.
    _servers: Vec<Server>,
    /// From outside: a client whose direct traffic the node-port node routes (see [`ROUTED`]).
    routed: Option<Netns>,
    nodes: Nodes,
    endpoints: Vec<IpAddr>,
    spare: IpAddr,
}

impl Bench {
    fn new(placement: Placement, family: Family) -> anyhow::Result<Self> {
        let servers: Vec<(&str, u8)> =
            SERVING.iter().chain([&SPARE]).enumerate().map(|(i, n)| (*n, 11 + i as u8)).collect();
        let nodes = Nodes::new(placement, family, &CLIENTS, &servers)?;
        for node in nodes.all() {
            // A run opens hundreds of thousands of connections; conntrack keeps
            // each closed one for 120 s, and a full table drops new SYNs. Keep
            // closed connections for a second only, so the table measures the
            // proxy, not the benchmark's own history.
            node.ns().sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")?;
            // iptables mode runs on the legacy backend: iptables-nft-restore
            // 1.8.9 took 177 s here to load 10,000 Services (legacy: 2.5 s) and
            // would not finish 50,000 within the run. One legacy rule makes kpr
            // choose legacy, as kube-proxy chooses the backend that has rules.
            node.ns().exec(&["iptables-legacy", "-A", "INPUT", "-s", "192.0.2.255/32", "-j", "ACCEPT"])?;
            node.ns().exec(&["ip6tables-legacy", "-A", "INPUT", "-s", "2001:db8::ff/128", "-j", "ACCEPT"])?;
        }
        let routed = if placement.outside() { nodes.outside_routed_by_client_node(family)? } else { None };
        let outside = nodes.outside(family).filter(|_| placement.outside()).map(|(ns, _)| ns);
        let clients = CLIENTS.iter().map(|(client, _)| nodes.client_node().pod_ns(client));
        for ns in clients.chain(outside).chain(routed.as_ref()) {
            // Room for tens of thousands of connections a second from one address.
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        let server_node = nodes.server_node();
        for (name, _) in &servers {
            // The servers close first and so hold TIME_WAIT for every
            // connection. A client behind a source NAT (from outside, under
            // the Cluster policy) reaches them from ports the NAT picks, whose
            // sequence numbers do not rise from one connection on a tuple to
            // the next: a SYN landing on a TIME_WAIT would be refused and
            // retried after a second, and the run would measure that. No
            // TIME_WAIT on the servers, for every mode alike.
            server_node.pod_ns(name).sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
        }
        let mut running = Vec::new();
        let any: IpAddr = match family {
            Family::Ipv4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::Ipv6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        for (name, _) in &servers {
            let pool = servers::tcp_pool(server_node.pod_ns(name), (any, PORT).into(), name, 8, Some(SERVER_CPU))?;
            running.push(pool);
        }
        let endpoints = SERVING.iter().map(|n| server_node.pod_ip(n, family)).collect();
        let spare = server_node.pod_ip(SPARE, family);
        Ok(Self { placement, family, _servers: running, routed, nodes, endpoints, spare })
    }

    /// Outside the cluster and the node address the load goes to, when the load comes from there.
    fn outside(&self) -> Option<(&Netns, IpAddr)> {
        self.nodes.outside(self.family).filter(|_| self.placement.outside())
    }

    /// The measured Service's node port, when the load comes from outside
    /// (otherwise a ClusterIP Service, so nothing on the devices is measured).
    fn node_port(&self) -> Option<u16> {
        self.placement.outside().then_some(workload::NODE_PORT)
    }

    /// Where a mode's load goes: the measured Service's VIP, or from outside its node port.
    fn target(&self, n: usize) -> SocketAddr {
        match self.outside() {
            Some((_, node)) => SocketAddr::from((node, workload::NODE_PORT)),
            None => SocketAddr::from((workload::measured_vip(self.family, n), 80)),
        }
    }

    /// The client a mode's load comes from (see [`CLIENTS`]); from outside,
    /// the underlay's router.
    fn client(&self, mode: &str) -> &Netns {
        if let Some((outside, _)) = self.outside() {
            return outside;
        }
        self.nodes.client_node().pod_ns(if mode == "ebpf-socket" { "socket-client" } else { "client" })
    }

    /// The pods behind the measured Service, dialled directly.
    fn direct_targets(&self) -> Vec<SocketAddr> {
        self.endpoints.iter().map(|ip| SocketAddr::from((*ip, PORT))).collect()
    }

    fn direct_client(&self) -> &Netns {
        if let Some((outside, _)) = self.outside() {
            return outside;
        }
        self.nodes.client_node().pod_ns("direct")
    }

    /// Measures `row`'s connection rate and latency from `client` to
    /// `targets`; returns the rate of each connection-rate run.
    fn traffic(
        &self,
        cfg: &Config,
        client: &crate::netns::Netns,
        targets: &[SocketAddr],
        row: &mut Row,
        problems: &mut Problems,
    ) -> anyhow::Result<Vec<f64>> {
        let mut rates = Vec::new();
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        let what = label(row);
        for rep in 1..=cfg.repetitions {
            let load = load::connection_rate(client, targets, cfg.threads, &[CLIENT_CPU], cfg.warmup, cfg.duration)?;
            rates.push(load.rate);
            row.conn_errors += load.errors;
            row.conn_attempts += load.attempts();
            row.conn_error_worst = row.conn_error_worst.max(load.error_rate());
            problems.check_load(&load, &format!("{what}, connection-rate run {rep}"))?;
            match load::request_latencies(client, targets[0], cfg.warmup, cfg.duration, CLIENT_CPU) {
                Ok(mut lat) => {
                    p50.push(load::quantile(&mut lat, 0.5));
                    p99.push(load::quantile(&mut lat, 0.99));
                }
                Err(e) => problems.note(format!("{what}, latency run {rep} failed: {e:#}"))?,
            }
        }
        row.conn_rate = Stat::of(rates.clone());
        row.rr_p50_us = Stat::of(p50);
        row.rr_p99_us = Stat::of(p99);
        Ok(rates)
    }

    /// The direct connection rate of each of `cfg.repetitions` runs, with no agent running.
    fn direct_rates(&self, cfg: &Config, problems: &mut Problems, what: &str) -> anyhow::Result<Vec<f64>> {
        let mut rates = Vec::new();
        for rep in 1..=cfg.repetitions {
            let load = load::connection_rate(
                self.direct_client(),
                &self.direct_targets(),
                cfg.threads,
                &[CLIENT_CPU],
                cfg.warmup,
                cfg.duration,
            )?;
            problems.check_load(&load, &format!("direct after {what}, run {rep}"))?;
            rates.push(load.rate);
        }
        Ok(rates)
    }

    /// Direct traffic from one generator on the client CPU, then from that
    /// and a second generator on another CPU, in interleaved runs.
    fn generator_check(
        &self,
        cfg: &Config,
        targets: &[SocketAddr],
        problems: &mut Problems,
    ) -> anyhow::Result<GeneratorCheck> {
        let second_cpu = second_generator_cpu();
        let (mut one, mut two, mut client_busy, mut server_busy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 1..=cfg.repetitions {
            for cpus in [&[CLIENT_CPU][..], &[CLIENT_CPU, second_cpu]] {
                let load =
                    load::connection_rate(self.direct_client(), targets, cfg.threads, cpus, cfg.warmup, cfg.duration)?;
                let what = format!("direct, generator check run {rep} with {} generator(s)", cpus.len());
                problems.check_load(&load, &what)?;
                if cpus.len() == 1 {
                    one.push(load.rate);
                    client_busy.push(load.cpu_busy.get(CLIENT_CPU).copied().unwrap_or(f64::NAN));
                    server_busy.push(load.cpu_busy.get(SERVER_CPU).copied().unwrap_or(f64::NAN));
                } else {
                    two.push(load.rate);
                }
            }
        }
        Ok(GeneratorCheck {
            runs: cfg.repetitions,
            one: Stat::of(one),
            two: Stat::of(two),
            client_cpu: CLIENT_CPU,
            server_cpu: SERVER_CPU,
            second_cpu,
            client_cpu_busy: Stat::of(client_busy).median,
            server_cpu_busy: Stat::of(server_busy).median,
        })
    }
}

/// A CPU for the second generator that neither the first generator nor the
/// servers use, if this process may run on one; else the servers' CPU.
fn second_generator_cpu() -> usize {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let allowed = |cpu: usize| ok && unsafe { libc::CPU_ISSET(cpu, &set) };
    (0..libc::CPU_SETSIZE as usize).find(|&c| c != CLIENT_CPU && c != SERVER_CPU && allowed(c)).unwrap_or(SERVER_CPU)
}

fn proc_stat_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11..15)?.iter().filter_map(|v| v.parse::<f64>().ok()).sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

/// A memory line of /proc/PID/status (`VmRSS:`, `VmHWM:`), in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix(field))?.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The id and kernel charge (`memlock:`, bytes) of a BPF map from its
/// /proc/PID/fdinfo text; None for anything that is not a map.
fn map_charge(fdinfo: &str) -> Option<(u32, u64)> {
    let field = |name: &str| fdinfo.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    Some((field("map_id:")?.parse().ok()?, field("memlock:")?.parse().ok()?))
}

/// Total charge and number of distinct maps among `fdinfos`: a map held
/// through several descriptors is counted once.
fn charged_once(fdinfos: impl IntoIterator<Item = String>) -> (u64, usize) {
    let maps: std::collections::BTreeMap<u32, u64> = fdinfos.into_iter().filter_map(|i| map_charge(&i)).collect();
    (maps.values().sum(), maps.len())
}

/// What the kernel charges for the BPF maps the process holds, in MiB, and
/// how many distinct maps that is.
fn bpf_maps(pid: u32) -> Option<(f64, usize)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    // A descriptor closed since the listing has no fdinfo: skipped.
    let infos = fds.flatten().filter_map(|fd| {
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).ok()
    });
    let (bytes, maps) = charged_once(infos);
    Some((bytes as f64 / (1024.0 * 1024.0), maps))
}

/// kpr's rules of `family` on the node (`-A` lines over both backends) and
/// the backend holding its KUBE-SERVICES chain.
fn iptables_rules(node: &dyn BenchNode, family: Family) -> (usize, Option<String>) {
    let mut rules = 0;
    let mut backend = None;
    let saves = match family {
        Family::Ipv4 => [("nft", "iptables-nft-save"), ("legacy", "iptables-legacy-save")],
        Family::Ipv6 => [("nft", "ip6tables-nft-save"), ("legacy", "ip6tables-legacy-save")],
    };
    for (name, cmd) in saves {
        let saved = node.ns().output(&[cmd]).unwrap_or_default();
        rules += saved.lines().filter(|l| l.starts_with("-A ")).count();
        if saved.contains("-A KUBE-SERVICES") {
            backend = Some(name.to_string());
        }
    }
    (rules, backend)
}

/// Programs `n` Services with kpr in `mode` and measures it. The agent is
/// stopped and the node cleaned up whatever the outcome.
fn measure_mode(
    cfg: &Config,
    bench: &Bench,
    mode: &str,
    n: usize,
    work: &std::path::Path,
    problems: &mut Problems,
) -> anyhow::Result<Row> {
    let (placement, family) = (bench.placement, bench.family);
    let manifests = work.join(format!("{mode}-{n}-{}-{}", placement.as_str().replace(' ', "-"), family.as_str()));
    std::fs::create_dir_all(&manifests)?;
    workload::write(&manifests, n, &bench.endpoints, bench.node_port())?;
    let mut row = Row {
        mode: mode.into(),
        placement,
        family,
        services: n,
        endpoints: workload::endpoints(n),
        ..Default::default()
    };

    // Room for every Service and VIP, and a conntrack map sized for the load.
    let mut args = vec![
        format!("--source=dir:{}", manifests.display()),
        format!("--max-services={}", 2 * n + 1024),
        format!("--max-backends={}", (4 * n).max(4096)),
    ];
    if mode.starts_with("ebpf") {
        // As the node's netfilter keeps closed connections for a second
        // (see `Bench::new`), so does eBPF mode's own conntrack: at this
        // rate, from one client to three backends, ports a source NAT
        // handed to closed flows must come round within seconds.
        args.push("--conntrack-tcp-timeout-fin=1s".to_string());
    }
    args.extend(match mode {
        "ebpf-socket" => vec!["--mode=ebpf".to_string()],
        "ebpf" => vec!["--mode=ebpf".to_string(), "--socket-lb=false".to_string()],
        "ebpf-tc" => vec!["--mode=ebpf".to_string(), "--socket-lb=false".to_string(), "--xdp=off".to_string()],
        other => vec![format!("--mode={other}")],
    });
    // The socket hooks serve only processes in the node's cgroup: the load
    // generator (this process) joins it for the measurement.
    let client_node = bench.nodes.client_node();
    let mut member = if mode == "ebpf-socket" { Some(client_node.cgroup().enter()?) } else { None };
    let started = Instant::now();
    // kpr runs on every node, the client's first (the one measured). The
    // socket row is socket-level load balancing alone, as the DaemonSet
    // runs by default: no per-packet program on the pod interfaces.
    let mut agents = Vec::new();
    for (i, node) in bench.nodes.all().into_iter().enumerate() {
        let log = manifests.with_extension(format!("node{i}.log"));
        let interfaces = if mode == "ebpf-socket" { Vec::new() } else { node.interfaces() };
        agents.push(Kpr::spawn_on(node.ns(), node.bpf_root(), node.cgroup(), &interfaces, &args, &log)?);
    }
    let mut measured = measure_agent(cfg, bench, &agents[0], &manifests, started, &mut row, problems);
    if measured.is_ok() && mode == "ebpf-socket" && !placement.outside() {
        measured = socket_in_turn(cfg, bench, n, &mut member, &mut row, problems);
    }
    drop(member);
    let what = label(&row);
    let stopped: anyhow::Result<Vec<_>> = agents.iter_mut().map(Kpr::interrupt).collect();
    // Programs and maps outlive the agent: the next row starts from nothing.
    let cleaned: anyhow::Result<Vec<String>> = bench
        .nodes
        .all()
        .into_iter()
        .map(|node| kpr::command(node.ns(), &["cleanup", &format!("--bpf-root={}", node.bpf_root().display())]))
        .collect();
    measured?;
    stopped.with_context(|| format!("stopping the agents ({what})"))?;
    cleaned.with_context(|| format!("kpr cleanup after {what}"))?;
    Ok(row)
}

/// Measures the running `agent` for `row` (its mode and N); `started` is
/// when it was started.
fn measure_agent(
    cfg: &Config,
    bench: &Bench,
    agent: &Kpr,
    manifests: &std::path::Path,
    started: Instant,
    row: &mut Row,
    problems: &mut Problems,
) -> anyhow::Result<()> {
    let (mode, n) = (row.mode.clone(), row.services);
    let what = label(row);
    let target = bench.target(n);
    let pid = agent.pid().context("agent pid")?;
    let limit = cfg.answer_within;
    let Some(cold) = load::until_answer(bench.client(&mode), target, started, limit, |_| true)? else {
        return problems.note(format!("{what}: the measured Service did not answer within {limit:?} of starting kpr"));
    };
    row.cold_ms = Some(cold.as_secs_f64() * 1e3);
    row.agent_cpu_ms = proc_stat_cpu_ms(pid);
    row.agent_rss_mib = status_mib(pid, "VmRSS:");
    if mode.starts_with("ebpf") {
        let maps = bpf_maps(pid);
        row.bpf_maps_mib = maps.map(|m| m.0);
        row.bpf_map_count = maps.map(|m| m.1);
    } else {
        let (rules, backend) = iptables_rules(bench.nodes.client_node(), bench.family);
        row.iptables_rules = Some(rules);
        row.iptables_backend = backend;
    }

    bench.traffic(cfg, bench.client(&mode), &[target], row, problems)?;

    let spare = bench.spare;
    let mut changes = Vec::new();
    for rep in 1..=cfg.repetitions {
        for to_spare in [true, false] {
            let eps = if to_spare { vec![spare] } else { bench.endpoints.clone() };
            let dir = manifests.to_path_buf();
            let node_port = bench.node_port();
            let change = move || workload::write_measured(&dir, n, &eps, node_port);
            let took = if to_spare {
                load::time_change(bench.client(&mode), target, limit, change, |w| w == SPARE)?
            } else {
                load::time_change(bench.client(&mode), target, limit, change, |w| SERVING.contains(&w))?
            };
            match took {
                Some(t) => changes.push(t.as_secs_f64() * 1e3),
                None => problems.note(format!(
                    "{what}: the change to {} (run {rep}) was not followed within {limit:?}",
                    if to_spare { "the spare endpoint" } else { "the serving endpoints" }
                ))?,
            }
        }
    }
    row.change_ms = Some(Stat::of(changes));
    // The high-water mark covers programming, traffic and the changes.
    row.agent_peak_mib = status_mib(pid, "VmHWM:");
    Ok(())
}

/// The socket-level row's rate against the direct line's in pairs of runs
/// taken in turn, the agent running throughout (see
/// [`Row::socket_in_turn`]); `member` is this process's membership of the
/// node's cgroup, left and taken again between runs. Which run of a pair
/// comes first alternates from pair to pair, so that a drift during the
/// pairs falls on both sides.
fn socket_in_turn(
    cfg: &Config,
    bench: &Bench,
    n: usize,
    member: &mut Option<crate::cgroup::Member>,
    row: &mut Row,
    problems: &mut Problems,
) -> anyhow::Result<()> {
    let what = label(row);
    let cgroup = bench.nodes.client_node().cgroup();
    let (socket, direct) =
        ((bench.client("ebpf-socket"), vec![bench.target(n)]), (bench.direct_client(), bench.direct_targets()));
    let mut ratios = Vec::new();
    for pair in 0..cfg.pairs {
        let mut rates = [0.0; 2];
        let order = if pair % 2 == 0 { [true, false] } else { [false, true] };
        for hooked in order {
            // In the cgroup for the hooked run only.
            if hooked && member.is_none() {
                *member = Some(cgroup.enter()?);
            } else if !hooked {
                member.take();
            }
            let (client, targets) = if hooked { (socket.0, &socket.1) } else { (direct.0, &direct.1) };
            let load = load::connection_rate(client, targets, cfg.threads, &[CLIENT_CPU], cfg.warmup, cfg.pair_run)?;
            let side = if hooked { "socket-level" } else { "direct" };
            problems.check_load(&load, &format!("{what}, {side} run of pair {}", pair + 1))?;
            rates[usize::from(!hooked)] = load.rate;
        }
        eprintln!("bench: {what}, pair {}: {:.0} conn/s hooked, {:.0} direct", pair + 1, rates[0], rates[1]);
        ratios.push(rates[0] / rates[1]);
    }
    row.socket_in_turn = Some(Stat::of(ratios));
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0) / 1048576.0)
        })
        .unwrap_or(0.0);
    format!("{cpu}, {cores} cores, {mem:.0} GiB, Linux {}", kernel.trim())
}

/// The direct line and every mode of `cfg` at `n` Services, backends placed
/// as `placement` says, in `family`; rows go into `report`.
fn measure_placement(
    cfg: &Config,
    (n, placement, family): (usize, Placement, Family),
    work: &std::path::Path,
    report: &mut Report,
    problems: &mut Problems,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let bench = Bench::new(placement, family)?;
    let direct_targets = bench.direct_targets();
    let mut direct = Row {
        mode: "direct".into(),
        placement,
        family,
        services: n,
        endpoints: workload::endpoints(n),
        ..Default::default()
    };
    let mut direct_before = bench.traffic(cfg, bench.direct_client(), &direct_targets, &mut direct, problems)?;
    if report.generator.is_none() {
        report.generator = Some(bench.generator_check(cfg, &direct_targets, problems)?);
    }
    let at = format!("N={n:>6} {:<10} {}", placement.as_str(), family.as_str());
    eprintln!("bench: {at} direct      {:>9.0} conn/s", direct.conn_rate.median);
    let direct_rate = direct.conn_rate.median;
    report.rows.push(direct);
    if let Some(routed) = &bench.routed {
        let endpoints = workload::endpoints(n);
        let mut row = Row { mode: ROUTED.into(), placement, family, services: n, endpoints, ..Default::default() };
        bench.traffic(cfg, routed, &direct_targets, &mut row, problems)?;
        row.conn_ratio = Some(row.conn_rate.median / direct_rate);
        eprintln!("bench: {at} {ROUTED} {:>9.0} conn/s", row.conn_rate.median);
        report.rows.push(row);
    }
    for &mode in &cfg.modes {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // From outside, socket-level load balancing has nothing to do;
        // elsewhere XDP has nothing to do, and ebpf-tc is ebpf.
        let socket_from_outside = placement.outside() && mode == "ebpf-socket";
        if socket_from_outside || (!placement.outside() && mode == "ebpf-tc") {
            continue;
        }
        let mut row = measure_mode(cfg, &bench, mode, n, work, problems)?;
        let direct_after = bench.direct_rates(cfg, problems, &label(&row))?;
        let paired = Stat::of([direct_before, direct_after.clone()].concat());
        row.conn_ratio = Some(row.conn_rate.median / paired.median);
        row.direct_paired = Some(paired);
        direct_before = direct_after;
        if let Some(backend) = &row.iptables_backend {
            report.iptables_backend.clone_from(backend);
        }
        eprintln!(
            "bench: {at} {mode:<11}{:>9.0} conn/s, cold {:.0} ms, change {:.1} ms",
            row.conn_rate.median,
            row.cold_ms.unwrap_or(f64::NAN),
            row.change_ms.as_ref().map_or(f64::NAN, |s| s.median)
        );
        report.rows.push(row);
    }
    Ok(())
}

/// Runs the benchmark and writes the report under `cfg.out`. A strict run
/// returns the first problem as its error, before writing a report.
pub fn run(cfg: &Config, command: &str, stop: Arc<AtomicBool>) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&cfg.out)?;
    let work = tempfile::tempdir()?;
    let mut report = Report {
        command: command.into(),
        machine: machine(),
        quick: cfg.quick,
        duration_s: cfg.duration.as_secs_f64(),
        repetitions: cfg.repetitions,
        threads: cfg.threads,
        ..Default::default()
    };
    let mut problems = Problems { strict: cfg.strict, seen: Vec::new() };
    eprintln!("bench: {}", report.machine);
    let ipv4 = cfg.services.iter().flat_map(|&n| cfg.placements.iter().map(move |&p| (n, p, Family::Ipv4)));
    let ipv6 = cfg.ipv6_services.iter().flat_map(|&n| cfg.placements.iter().map(move |&p| (n, p, Family::Ipv6)));
    for (n, placement, family) in ipv4.chain(ipv6) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        measure_placement(cfg, (n, placement, family), work.path(), &mut report, &mut problems, &stop)?;
    }
    if !stop.load(Ordering::Relaxed) {
        match programs::measure(cfg) {
            Ok(costs) => report.program_costs = costs,
            Err(e) => problems.note(format!("program cost: {e:#}"))?,
        }
    }
    if cfg.packet_rate && !stop.load(Ordering::Relaxed) {
        report.packet_rates = packets::measure(cfg, work.path())?;
    }
    if !stop.load(Ordering::Relaxed) {
        (report.dns, report.dns_changes) = dns::measure(cfg, &cfg.dns_services, work.path(), &mut problems)?;
    }
    report.problems = problems.seen;
    report::write(&report, &cfg.out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\nkey_size:\t4\nvalue_size:\t8\nmax_entries:\t65536\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t1049600\nmap_id:\t42\nfrozen:\t0\n";

    #[test]
    fn the_median_of_an_even_count_is_between_its_two_middles() {
        let s = Stat::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Stat::of(vec![3.0, 1.0, 2.0]).median, 2.0);
        assert!(Stat::of(Vec::new()).median.is_nan());
    }

    #[test]
    fn a_map_held_through_several_descriptors_is_charged_once() {
        let other = MAP_FDINFO.replace("map_id:\t42", "map_id:\t43").replace("1049600", "4096");
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t6\nprog_jited:\t1\nmemlock:\t8192\nprog_id:\t7\n";
        let infos = [MAP_FDINFO, MAP_FDINFO, &other, prog, "pos:\t0\nflags:\t0\n"].map(String::from);
        assert_eq!(charged_once(infos), (1049600 + 4096, 2));
    }

    #[test]
    fn a_failed_load_is_an_error_in_a_strict_run_and_a_note_otherwise() {
        let over = load::ConnLoad { completed: 98, errors: 2, ..Default::default() };
        let within = load::ConnLoad { completed: 99, errors: 1, ..Default::default() };
        let nothing = load::ConnLoad::default();
        let mut strict = Problems { strict: true, seen: Vec::new() };
        assert!(strict.check_load(&within, "ebpf at N=1").is_ok());
        let err = strict.check_load(&over, "ebpf at N=1").unwrap_err().to_string();
        assert!(err.contains("ebpf at N=1") && err.contains("2 of 100"), "{err}");
        assert!(strict.check_load(&nothing, "ebpf at N=1").unwrap_err().to_string().contains("no connection"));
        let mut lenient = Problems { strict: false, seen: Vec::new() };
        lenient.check_load(&over, "iptables at N=10000").unwrap();
        lenient.check_load(&nothing, "iptables at N=10000").unwrap();
        assert_eq!(lenient.seen.len(), 2);
    }
}
