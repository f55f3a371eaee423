//! The packet-rate test: small UDP datagrams from outside through a node
//! port of node 0 to a backend on node 1 (`externalTrafficPolicy: Cluster`,
//! so node 0 translates both addresses), per mode: XDP (eBPF mode's
//! default), the TC programs alone (`--xdp=off`), iptables mode, and direct
//! (to the pod address: plain routing, no proxy).
//!
//! Only node 0's forwarding is measured. A generator pinned to one CPU
//! hands 60-byte frames of 64 flows straight to node 0's wire as live XDP
//! frames (see `xdp_generator`), as a NIC's DMA puts them in a page: the
//! veth neither copies them nor builds a socket buffer before node 0's XDP
//! program sees them (a packet socket's frames were copied into a page of
//! their own first, work a NIC never does, which diluted every mode's
//! figure alike). It offers more than any mode forwards, paced; what node
//! 0's receive queue cannot take is dropped there, as a NIC's ring
//! overflows. Node 0's receive path runs in a NAPI thread pinned to the
//! other CPU; what it forwards comes back over the same wire, where the
//! underlay's XDP program drops it and the veth counts it. Forwarded
//! packets per second are that count over the run, and packets per CPU
//! that rate over the receiving CPU's busy share.
//!
//! Taking frames off the wire runs on the receiving CPU too (a NIC's work
//! on real hardware; a thread of its own on the other CPU cost more in
//! wake-ups than it saved: measured again with the XDP generator, every
//! mode but XDP forwarded half as much per CPU that way).

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{
    CLIENT_CPU, Config, SERVER_CPU, Stat,
    load::{busy_between, cpu_times},
};
use crate::{
    cluster::{Cluster, Shape},
    kpr::{self, Kpr},
    manifests::write,
    netns::{Netns, Offload},
    servers::pin_to_cpu,
    xdp_generator::Generator,
    xdp_pass::Verdict,
};

/// The modes measured, in the report's order.
pub const MODES: [&str; 4] = ["ebpf", "ebpf-tc", "iptables", "direct"];
const NODE_PORT: u16 = 31_053;
const TARGET_PORT: u16 = 5353;
/// Distinct flows (source ports, from `FIRST_PORT`) the generator sends.
const FLOWS: u16 = 64;
const FIRST_PORT: u16 = 40_000;
const FRAME_LEN: usize = 60;

/// One mode's packet rate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PacketRow {
    pub mode: String,
    /// What the generator sent, packets per second.
    pub offered_pps: Stat,
    /// What node 0 forwarded, packets per second.
    pub forwarded_pps: Stat,
    /// Busy share of the CPU node 0 received on.
    pub receive_cpu_busy: Stat,
    /// `forwarded_pps` over `receive_cpu_busy`: packets one CPU forwards
    /// per second of its time.
    pub pps_per_cpu: Stat,
}

/// How a mode is named in the report.
pub fn mode_name(mode: &str) -> &'static str {
    match mode {
        "ebpf" => "eBPF, XDP",
        "ebpf-tc" => "eBPF, TC (--xdp=off)",
        "iptables" => "iptables",
        _ => "direct (no proxy)",
    }
}

fn manifest(backend: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: flood, namespace: bench}}
spec:
  type: NodePort
  clusterIP: 10.96.53.53
  ports: [{{name: dns, port: 53, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: flood-1, namespace: bench, labels: {{kubernetes.io/service-name: flood}}}}
addressType: IPv4
ports: [{{name: dns, port: {TARGET_PORT}, protocol: UDP}}]
endpoints: [{{addresses: [\"{backend}\"], nodeName: node1}}]
"
    )
}

fn mac(ns: &Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let text = ns.output(&["cat", &format!("/sys/class/net/{dev}/address")])?;
    let bytes: Vec<u8> = text.trim().split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    bytes.try_into().map_err(|short: Vec<u8>| anyhow::anyhow!("MAC of {dev}: {text:?} ({} bytes)", short.len()))
}

fn counter(ns: &Netns, dev: &str, name: &str) -> anyhow::Result<u64> {
    Ok(ns.output(&["cat", &format!("/sys/class/net/{dev}/statistics/{name}")])?.trim().parse()?)
}

/// What `dev` offered its peer: what the peer took, and what it dropped
/// with its receive queue full.
fn offered_to(ns: &Netns, dev: &str) -> anyhow::Result<u64> {
    Ok(counter(ns, dev, "tx_packets")? + counter(ns, dev, "tx_dropped")?)
}

/// The frame from `src` to `dst:port` between the MACs given, whose
/// source port the generator sets (one of `FLOWS` from `FIRST_PORT`).
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((FRAME_LEN - 14) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let check = proxy_common::checksum::checksum(ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&FIRST_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((FRAME_LEN - 34) as u16).to_be_bytes());
    // UDP checksum 0: none, as IPv4 allows (so the port needs no fixing).
    f
}

/// The most frames per second the generator offers (about 2.3 million
/// reach the wire here, the program's own time taken): more than any mode
/// forwards, by a margin, but not many times more (what the receive queue
/// cannot take is dropped there, and comes back to the generator's page
/// pool under its lock, which the receiving CPU's own returns then wait
/// for).
const OFFERED: u32 = 3_000_000;

/// Frames handed to the wire per `BPF_PROG_RUN` call: each call sets up
/// and tears down a page pool, which takes milliseconds.
const BURST: u32 = 500_000;

/// Sends `frame`, its source port varied over `FLOWS`, out of `dev` as live
/// XDP frames (see `xdp_generator`) until `stop`.
fn generate(dev: &str, frame: [u8; FRAME_LEN], stop: &AtomicBool) -> anyhow::Result<()> {
    pin_to_cpu(CLIENT_CPU);
    let ifindex = unsafe { libc::if_nametoindex(std::ffi::CString::new(dev)?.as_ptr()) };
    anyhow::ensure!(ifindex != 0, "no interface {dev}");
    let generator = Generator::new(&frame, FIRST_PORT, FLOWS, OFFERED)?;
    while !stop.load(Ordering::Relaxed) {
        generator.send(ifindex, BURST)?;
    }
    Ok(())
}

/// The PIDs of NAPI threads of interfaces named `dev` (any namespace).
fn napi_threads(dev: &str) -> Vec<i32> {
    let prefix = format!("napi/{dev}-");
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(&prefix)))
        .collect()
}

/// Moves the receive path of `dev` in `ns` into a NAPI thread of its own
/// on `cpu`.
fn receive_on(ns: &Netns, dev: &str, cpu: usize) -> anyhow::Result<()> {
    // A veth without XDP has no NAPI queue until GRO is turned on while it is up.
    ns.set_offload(dev, Offload::Gro, false)?;
    ns.set_offload(dev, Offload::Gro, true)?;
    let before = napi_threads(dev);
    ns.exec(&["sh", "-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")])?;
    let new: Vec<i32> = napi_threads(dev).into_iter().filter(|p| !before.contains(p)).collect();
    anyhow::ensure!(!new.is_empty(), "no NAPI thread appeared for {dev} in {}", ns.name());
    for pid in new {
        // SAFETY: plain data for a syscall on a thread this process made run.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    Ok(())
}

/// Measures `mode` on a fresh two-node cluster.
fn measure_mode(cfg: &Config, mode: &str, work: &Path) -> anyhow::Result<PacketRow> {
    let mut cluster = Cluster::new(Shape::HostGw, 2)?;
    let backend = cluster.add_pod(1, "backend", 11)?.ip;
    let (node0, node1) = (cluster.node(0), cluster.node(1));
    let manifests = work.join(format!("packets-{mode}"));
    std::fs::create_dir_all(&manifests)?;
    write(&manifests, "flood.yaml", &manifest(backend))?;
    let mut agents = Vec::new();
    if mode != "direct" {
        let mut args = vec![format!("--source=dir:{}", manifests.display()), "--node-name=node0".to_string()];
        args.extend(match mode {
            "ebpf" => vec!["--mode=ebpf".to_string()],
            "ebpf-tc" => vec!["--mode=ebpf".to_string(), "--xdp=off".to_string()],
            other => vec![format!("--mode={other}")],
        });
        for node in &cluster.nodes {
            let mut args = args.clone();
            args[1] = format!("--node-name={}", node.name);
            let log = manifests.join(format!("{}.log", node.name));
            let mut agent = Kpr::spawn_on(&node.ns, node.bpf_root(), &node.cgroup, &[], &args, &log)?;
            agent.wait_for_log("synced", Duration::from_secs(60))?;
            agents.push(agent);
        }
    }
    // Node 0 learns its neighbours' MACs now (node 1, the backend's next
    // hop, and the router, the client's): its wire drops what it sends from
    // here on, ARP included.
    let outside = cluster.outside();
    for (addr, ns, dev) in [(node1.address(), &node1.ns, "eth0"), (Cluster::OUTSIDE, outside, "br0")] {
        let lladdr = mac(ns, dev)?.map(|b| format!("{b:02x}")).join(":");
        node0.ns.exec(&[
            "ip",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &lladdr,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
    }
    let wire = "ul0";
    receive_on(&node0.ns, "eth0", SERVER_CPU)?;
    node0.set_wire(Verdict::Drop)?;

    let (dst, port) = if mode == "direct" { (backend, TARGET_PORT) } else { (node0.address(), NODE_PORT) };
    let frame = frame(mac(outside, "br0")?, mac(&node0.ns, "eth0")?, Cluster::OUTSIDE, dst, port);
    let (mut offered, mut forwarded, mut busy, mut per_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.repetitions {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let generator = outside.spawn(move || generate(wire, frame, &s))?;
        std::thread::sleep(cfg.warmup);
        let (sent0, fwd0, t0) = (offered_to(outside, wire)?, counter(outside, wire, "rx_packets")?, Instant::now());
        let cpu0 = cpu_times();
        std::thread::sleep(cfg.duration);
        let cpu1 = cpu_times();
        let (sent1, fwd1, t1) = (offered_to(outside, wire)?, counter(outside, wire, "rx_packets")?, Instant::now());
        stop.store(true, Ordering::Relaxed);
        generator.join().map_err(|panic| anyhow::anyhow!("the generator panicked: {panic:?}"))??;
        let secs = (t1 - t0).as_secs_f64();
        offered.push((sent1 - sent0) as f64 / secs);
        let rate = (fwd1 - fwd0) as f64 / secs;
        forwarded.push(rate);
        let share = busy_between(&cpu0, &cpu1).get(SERVER_CPU).copied().unwrap_or(f64::NAN);
        busy.push(share);
        per_cpu.push(rate / share);
    }
    node0.set_wire(Verdict::Pass)?;
    if mode == "ebpf" {
        let stats = kpr::stats(&node0.ns, node0.bpf_root())?;
        let xdp = stats["datapath"]["xdp_forwarded"].as_u64().unwrap_or(0);
        anyhow::ensure!(xdp > 0, "XDP forwarded nothing in the XDP run: {stats:#}");
    }
    for agent in &mut agents {
        agent.interrupt().context("stopping an agent")?;
    }
    Ok(PacketRow {
        mode: mode.into(),
        offered_pps: Stat::of(offered),
        forwarded_pps: Stat::of(forwarded),
        receive_cpu_busy: Stat::of(busy),
        pps_per_cpu: Stat::of(per_cpu),
    })
}

/// Every mode's packet rate.
pub fn measure(cfg: &Config, work: &Path) -> anyhow::Result<Vec<PacketRow>> {
    MODES
        .iter()
        .map(|mode| {
            let row = measure_mode(cfg, mode, work).with_context(|| format!("packet rate, {}", mode_name(mode)))?;
            eprintln!(
                "bench: packet rate {:<22} {:>10.0} pps forwarded ({:.0} offered), receiving CPU {:.0}% busy: {:.0} pps per CPU",
                mode_name(mode),
                row.forwarded_pps.median,
                row.offered_pps.median,
                row.receive_cpu_busy.median * 100.0,
                row.pps_per_cpu.median
            );
            Ok(row)
        })
        .collect()
}
