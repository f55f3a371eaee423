//! The DNS add-on under `dnsperf`, beside a reference server on the same
//! machine: dnsmasq loaded with the same names (a hosts file of every
//! Service's name and ClusterIP) and forwarding to the same upstream (a
//! third dnsmasq). Both answer on loopback in one namespace, pinned to the
//! server CPU, with dnsperf on the client CPU; cluster names are asked in a
//! random order over all N, forwarded names from a set of 1,000 that both
//! servers have cached by then. Also: how soon kpr answers for a Service
//! that was just created.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{CLIENT_CPU, Config, Problems, SERVER_CPU, Stat, workload};
use crate::{
    cgroup::Cgroup,
    kpr::Kpr,
    netns::{Netns, unique_prefix},
    node::Bpffs,
    servers::Dnsmasq,
};

const KPR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const REFERENCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Distinct forwarded names asked.
const FORWARDED_NAMES: usize = 1_000;
/// Cluster names in the query file (asked round and round).
const QUERY_LINES: usize = 20_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DnsRow {
    pub services: usize,
    /// `kpr` or `dnsmasq`.
    pub server: String,
    /// `cluster` or `forwarded`.
    pub names: String,
    pub qps: Stat,
    pub p99_ms: Stat,
    pub lost: u64,
}

/// How soon kpr answered for a new Service, per N.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DnsChange {
    pub services: usize,
    pub answered_ms: f64,
}

/// `dig +short` against `server`; its answer lines.
fn dig(ns: &Netns, server: Ipv4Addr, name: &str) -> String {
    ns.output(&["dig", &format!("@{server}"), "+short", "+time=1", "+tries=1", name]).unwrap_or_default()
}

fn service_name(i: usize, n: usize) -> String {
    if i + 1 == n { "measured.bench.svc.cluster.local".into() } else { format!("svc-{i}.bench.svc.cluster.local") }
}

/// The query files: cluster names spread over all `n`, forwarded names.
fn query_files(dir: &Path, n: usize) -> anyhow::Result<()> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut cluster = String::new();
    for _ in 0..QUERY_LINES.min(n * 4).max(1) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        cluster.push_str(&format!("{} A\n", service_name(state as usize % n, n)));
    }
    std::fs::write(dir.join("cluster.txt"), cluster)?;
    let forwarded: String = (0..FORWARDED_NAMES).map(|k| format!("name-{k}.example.test A\n")).collect();
    std::fs::write(dir.join("forwarded.txt"), forwarded)?;
    // The reference's copy of the cluster's names.
    let hosts: String = (0..n).map(|i| format!("{} {}\n", workload::vip(i), service_name(i, n))).collect();
    std::fs::write(dir.join("hosts"), hosts)?;
    Ok(())
}

/// One dnsperf run: queries per second, p99 latency in ms, queries lost.
fn dnsperf(ns: &Netns, server: Ipv4Addr, file: &Path, seconds: f64, once: bool) -> anyhow::Result<(f64, f64, u64)> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), "taskset", "-c", &CLIENT_CPU.to_string(), "dnsperf", "-v"])
        .args(["-s", &server.to_string(), "-c", "4", "-q", "200", "-t", "2", "-S", "0"])
        .arg("-d")
        .arg(file);
    if once {
        cmd.args(["-n", "1"]);
    } else {
        cmd.args(["-l", &format!("{seconds:.1}")]);
    }
    let out = cmd.output().context("running dnsperf (Debian package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> Option<f64> {
        text.lines().find_map(|l| l.trim().strip_prefix(label)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let qps = field("Queries per second:").context("dnsperf printed no rate")?;
    let lost = field("Queries lost:").unwrap_or(0.0) as u64;
    let mut latencies: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies.get(latencies.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(f64::NAN);
    Ok((qps, p99 * 1e3, lost))
}

/// kpr and dnsmasq at each N of `services`.
pub(super) fn measure(
    cfg: &Config,
    services: &[usize],
    work: &Path,
    problems: &mut Problems,
) -> anyhow::Result<(Vec<DnsRow>, Vec<DnsChange>)> {
    let (mut rows, mut changes) = (Vec::new(), Vec::new());
    for &n in services {
        let ns = Netns::new(&format!("{}-dns", unique_prefix()))?;
        let dir = work.join(format!("dns-{n}"));
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        workload::write(&manifests, n, &[Ipv4Addr::new(10, 244, 0, 11).into()], None)?;
        query_files(&dir, n)?;
        let upstream_args = ["--no-resolv".into(), "--local-ttl=5".into(), "--address=/example.test/192.0.2.7".into()];
        let _upstream = Dnsmasq::start(&ns, UPSTREAM, Some(SERVER_CPU), &upstream_args)?;
        let _reference = Dnsmasq::start(
            &ns,
            REFERENCE,
            Some(SERVER_CPU),
            &[
                "--no-resolv".into(),
                "--local-ttl=5".into(),
                format!("--server={UPSTREAM}"),
                format!("--addn-hosts={}", dir.join("hosts").display()),
                "--cache-size=10000".into(),
            ],
        )?;
        // eBPF mode, its socket hooks on a cgroup of its own that nothing
        // runs in: the agent's dataplane is there, but takes nothing from
        // the CPU the servers share (iptables mode's restore of 50,000
        // Services takes minutes of it).
        let (bpffs, cgroup) = (Bpffs::mount()?, Cgroup::new(&format!("{}-dns", unique_prefix()))?);
        let args = [
            "--mode=ebpf".to_string(),
            format!("--source=dir:{}", manifests.display()),
            format!("--dns-listen={KPR}"),
            format!("--dns-upstream={UPSTREAM}"),
        ];
        // The agent on the server CPU from its start, as dnsmasq: it sizes
        // its runtime to the one CPU it has.
        let log = dir.join("kpr.log");
        let mut kpr = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    crate::servers::pin_to_cpu(SERVER_CPU);
                    Kpr::spawn_on(&ns, bpffs.path(), &cgroup, &[], &args, &log)
                })
                .join()
                .expect("starting kpr panicked")
        })?;
        kpr.wait_for_log("synced", cfg.answer_within)?;
        let measured = service_name(n - 1, n);
        if dig(&ns, KPR, &measured).trim() != workload::measured_vip(super::topology::Family::Ipv4, n).to_string() {
            problems.note(format!("DNS N={n}: kpr does not answer {measured}"))?;
            continue;
        }
        for (server, name) in [(KPR, "kpr"), (REFERENCE, "dnsmasq")] {
            // Both caches hold the forwarded names before they are timed.
            dnsperf(&ns, server, &dir.join("forwarded.txt"), 0.0, true)?;
            for names in ["cluster", "forwarded"] {
                let file = dir.join(format!("{names}.txt"));
                let (mut qps, mut p99, mut lost) = (Vec::new(), Vec::new(), 0);
                for _ in 0..cfg.repetitions {
                    let (q, p, l) = dnsperf(&ns, server, &file, cfg.duration.as_secs_f64(), false)?;
                    qps.push(q);
                    p99.push(p);
                    lost += l;
                }
                let row = DnsRow {
                    services: n,
                    server: name.into(),
                    names: names.into(),
                    qps: Stat::of(qps),
                    p99_ms: Stat::of(p99),
                    lost,
                };
                eprintln!(
                    "bench: N={n:>6} DNS {name:<8} {names:<9} {:>8.0} q/s, p99 {:.2} ms, {lost} lost",
                    row.qps.median, row.p99_ms.median
                );
                if row.qps.median.is_nan() || row.qps.median == 0.0 {
                    problems.note(format!("DNS N={n}: {name} answered no {names} query"))?;
                }
                rows.push(row);
            }
        }
        // A new Service: how soon kpr answers for it.
        let vip = workload::vip(n + 10);
        let late = format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"late","namespace":"bench"}},"spec":{{"clusterIP":"{vip}","ports":[{{"port":80}}]}}}}"#
        );
        let started = Instant::now();
        crate::manifests::write(&manifests, "late.json", &late)?;
        while dig(&ns, KPR, "late.bench.svc.cluster.local").trim() != vip.to_string() {
            if started.elapsed() > Duration::from_secs(10) {
                problems.note(format!("DNS N={n}: a new Service was not answered within 10 s"))?;
                break;
            }
        }
        let answered_ms = started.elapsed().as_secs_f64() * 1e3;
        eprintln!("bench: N={n:>6} DNS a new Service answered after {answered_ms:.0} ms");
        changes.push(DnsChange { services: n, answered_ms });
    }
    Ok((rows, changes))
}
