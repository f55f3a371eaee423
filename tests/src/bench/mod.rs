//! `cargo xtask bench`: kpr's eBPF mode against iptables mode and against
//! no proxy at all (the pod IP directly), at growing numbers of Services,
//! on a virtual node in network namespaces.

pub mod load;
pub mod report;
pub mod workload;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    kpr::{self, Kpr},
    node::VirtualNode,
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
    pub services: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub repetitions: usize,
    /// Concurrent client connections of the connection-rate load.
    pub threads: usize,
    pub out: PathBuf,
}

impl Config {
    pub fn full(out: PathBuf) -> Self {
        Self {
            quick: false,
            services: vec![1, 1_000, 10_000, 50_000],
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(3),
            repetitions: 3,
            threads: 4,
            out,
        }
    }

    pub fn quick(out: PathBuf) -> Self {
        Self {
            quick: true,
            services: vec![1, 1_000],
            warmup: Duration::from_millis(200),
            duration: Duration::from_millis(700),
            repetitions: 1,
            threads: 4,
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
        Self { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    pub mode: String,
    pub services: usize,
    /// Connections per second (connect, request, reply, close).
    pub conn_rate: Stat,
    /// `conn_rate` over the direct-pod rate at the same N.
    pub conn_ratio: Option<f64>,
    pub conn_errors: u64,
    /// Request/reply latency on an established connection, microseconds.
    pub rr_p50_us: Stat,
    pub rr_p99_us: Stat,
    /// From starting the agent to the measured Service answering.
    pub cold_ms: Option<f64>,
    /// From rewriting one EndpointSlice to traffic reaching the new endpoint.
    pub change_ms: Option<Stat>,
    pub agent_rss_mib: Option<f64>,
    /// Kernel-accounted memory of the agent's BPF maps.
    pub bpf_maps_mib: Option<f64>,
    pub iptables_rules: Option<usize>,
    /// CPU time of the agent (and its iptables-restore children) to program all N Services.
    pub agent_cpu_ms: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GeneratorCheck {
    pub one_generator: f64,
    pub two_generators: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub quick: bool,
    pub duration_s: f64,
    pub repetitions: usize,
    pub threads: usize,
    pub iptables_backend: String,
    pub generator: GeneratorCheck,
    pub rows: Vec<Row>,
}

struct Bench {
    node: VirtualNode,
    _servers: Vec<Server>,
    endpoints: Vec<Ipv4Addr>,
    spare: Ipv4Addr,
}

impl Bench {
    fn new() -> anyhow::Result<Self> {
        let mut pods: Vec<(String, Ipv4Addr)> = SERVING
            .iter()
            .chain([&SPARE])
            .enumerate()
            .map(|(i, n)| (n.to_string(), Ipv4Addr::new(10, 244, 0, 11 + i as u8)))
            .collect();
        // Separate clients for Service and direct traffic: the servers keep
        // TIME_WAIT state per client address and port, and a client's ISNs
        // depend on the address it dials, so sharing one client between the
        // VIP and the pod IPs would make each load trip over the other's
        // TIME_WAITs.
        pods.push(("client".into(), Ipv4Addr::new(10, 244, 0, 100)));
        pods.push(("direct".into(), Ipv4Addr::new(10, 244, 0, 101)));
        let spec: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        let node = VirtualNode::new(&spec)?;
        // A run opens hundreds of thousands of connections; conntrack keeps
        // each closed one for 120 s, and a full table drops new SYNs. Keep
        // closed connections for a second only, so the table measures the
        // proxy, not the benchmark's own history.
        node.ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")?;
        // iptables mode runs on the legacy backend: iptables-nft-restore
        // 1.8.9 took 177 s here to load 10,000 Services (legacy: 2.5 s) and
        // would not finish 50,000 within the run. One legacy rule makes kpr
        // choose legacy, as kube-proxy chooses the backend that has rules.
        node.ns.exec(&["iptables-legacy", "-A", "INPUT", "-s", "192.0.2.255/32", "-j", "ACCEPT"])?;
        for client in ["client", "direct"] {
            let ns = &node.pod(client).ns;
            // Room for tens of thousands of connections a second from one address.
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        let mut running = Vec::new();
        for (name, _) in &pods[..4] {
            running.push(servers::tcp_pool(&node.pod(name).ns, PORT, name, 8, Some(SERVER_CPU))?);
        }
        Ok(Self { endpoints: pods[..3].iter().map(|p| p.1).collect(), spare: pods[3].1, node, _servers: running })
    }

    fn client(&self) -> &crate::netns::Netns {
        &self.node.pod("client").ns
    }

    fn direct_client(&self) -> &crate::netns::Netns {
        &self.node.pod("direct").ns
    }

    fn traffic(
        &self,
        cfg: &Config,
        client: &crate::netns::Netns,
        targets: &[SocketAddr],
        row: &mut Row,
    ) -> anyhow::Result<()> {
        let mut rates = Vec::new();
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..cfg.repetitions {
            let (rate, errors) =
                load::connection_rate(client, targets, cfg.threads, 1, cfg.warmup, cfg.duration, CLIENT_CPU)?;
            rates.push(rate);
            row.conn_errors += errors;
            // A failed latency run is reported as missing, not fatal.
            match load::request_latencies(client, targets[0], cfg.warmup, cfg.duration, CLIENT_CPU) {
                Ok(mut lat) => {
                    p50.push(load::quantile(&mut lat, 0.5));
                    p99.push(load::quantile(&mut lat, 0.99));
                }
                Err(e) => eprintln!("bench: {} latency run failed: {e:#}", row.mode),
            }
        }
        row.conn_rate = Stat::of(rates);
        row.rr_p50_us = Stat::of(p50);
        row.rr_p99_us = Stat::of(p99);
        Ok(())
    }
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

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The kernel's memlock accounting of every BPF map the process holds.
fn bpf_maps_mib(pid: u32) -> Option<f64> {
    let mut bytes = 0u64;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let is_map = std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf-map"));
        if !is_map {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).ok()?;
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(bytes as f64 / (1024.0 * 1024.0))
}

fn iptables_rules(node: &VirtualNode) -> usize {
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .map(|cmd| node.ns.output(&[cmd]).map(|s| s.lines().filter(|l| l.starts_with("-A ")).count()).unwrap_or(0))
        .sum()
}

/// Programs `n` Services with kpr in `mode` and measures it.
fn measure_mode(cfg: &Config, bench: &Bench, mode: &str, n: usize, work: &std::path::Path) -> anyhow::Result<Row> {
    let manifests = work.join(format!("{mode}-{n}"));
    std::fs::create_dir_all(&manifests)?;
    let vip = workload::write(&manifests, n, &bench.endpoints)?;
    let target = SocketAddr::from((vip, 80));
    let mut row = Row { mode: mode.into(), services: n, ..Default::default() };
    let limit = Duration::from_secs(if cfg.quick { 120 } else { 900 });

    // Room for every Service and VIP, and a conntrack map sized for the load.
    let args = [
        format!("--mode={mode}"),
        format!("--source=dir:{}", manifests.display()),
        format!("--max-services={}", 2 * n + 1024),
        format!("--max-backends={}", (4 * n).max(4096)),
    ];
    let log = work.join(format!("kpr-{mode}-{n}.log"));
    let started = Instant::now();
    let mut agent = Kpr::spawn(&bench.node, &args, &log)?;
    let pid = agent.pid().context("agent pid")?;
    let cold = load::until_answer(bench.client(), target, started, limit, |_| true)?;
    let Some(cold) = cold else {
        // Reported as missing rather than ending the whole run.
        eprintln!("bench: {mode} with {n} Services did not answer within {limit:?}; no figures for it");
        agent.interrupt()?;
        kpr::command(&bench.node.ns, &["cleanup"])?;
        return Ok(row);
    };
    row.cold_ms = Some(cold.as_secs_f64() * 1e3);
    row.agent_cpu_ms = proc_stat_cpu_ms(pid);
    row.agent_rss_mib = rss_mib(pid);
    if mode == "ebpf" {
        row.bpf_maps_mib = bpf_maps_mib(pid);
    } else {
        row.iptables_rules = Some(iptables_rules(&bench.node));
    }

    bench.traffic(cfg, bench.client(), &[target], &mut row)?;

    let spare = bench.spare;
    let mut changes = Vec::new();
    for rep in 0..cfg.repetitions {
        for to_spare in [true, false] {
            let eps = if to_spare { vec![spare] } else { bench.endpoints.clone() };
            let dir = manifests.clone();
            let change = move || workload::write_measured(&dir, n, &eps);
            let took = if to_spare {
                load::time_change(bench.client(), target, limit, change, |w| w == SPARE)?
            } else {
                load::time_change(bench.client(), target, limit, change, |w| SERVING.contains(&w))?
            };
            match took {
                Some(t) => changes.push(t.as_secs_f64() * 1e3),
                None => {
                    eprintln!("bench: {mode} with {n} Services: a change was not followed within {limit:?} (rep {rep})")
                }
            }
        }
    }
    row.change_ms = Some(Stat::of(changes));
    agent.interrupt()?;
    kpr::command(&bench.node.ns, &["cleanup"])?;
    Ok(row)
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

/// Runs the benchmark and writes the report under `cfg.out`.
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
    eprintln!("bench: {}", report.machine);
    for &n in &cfg.services {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let bench = Bench::new()?;
        let direct_targets: Vec<SocketAddr> = bench.endpoints.iter().map(|ip| SocketAddr::from((*ip, PORT))).collect();
        let mut direct = Row { mode: "direct".into(), services: n, ..Default::default() };
        bench.traffic(cfg, bench.direct_client(), &direct_targets, &mut direct)?;
        if report.generator.one_generator == 0.0 {
            // A second generator must not raise the direct rate, or the
            // generator, not the node, would be the limit being measured.
            report.generator.one_generator = direct.conn_rate.median;
            report.generator.two_generators = load::connection_rate(
                bench.direct_client(),
                &direct_targets,
                cfg.threads,
                2,
                cfg.warmup,
                cfg.duration,
                CLIENT_CPU,
            )?
            .0;
        }
        eprintln!("bench: N={n:>6} direct  {:>9.0} conn/s", direct.conn_rate.median);
        let direct_rate = direct.conn_rate.median;
        report.rows.push(direct);
        for mode in ["ebpf", "iptables"] {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut row = measure_mode(cfg, &bench, mode, n, work.path())?;
            row.conn_ratio = Some(row.conn_rate.median / direct_rate);
            eprintln!(
                "bench: N={n:>6} {mode:<8}{:>9.0} conn/s, cold {:.0} ms, change {:.1} ms",
                row.conn_rate.median,
                row.cold_ms.unwrap_or(f64::NAN),
                row.change_ms.as_ref().map_or(f64::NAN, |s| s.median)
            );
            report.rows.push(row);
        }
    }
    report::write(&report, &cfg.out)?;
    Ok(report)
}
