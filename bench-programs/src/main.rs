//! `kpr-program-cost SERVICES BATCHES`: what one run of the per-packet
//! path's programs costs, by the kind of packet, printed as JSON for
//! `cargo xtask bench` (see kpr-tests' `bench::programs`, which says what
//! the figures are and are not).
//!
//! Each program is run by the kernel on one crafted frame over and over
//! (BPF_PROG_TEST_RUN with a repeat count), with its maps as the agent
//! creates them and SERVICES Services programmed. A run must see the same
//! frame as the one before it, but the programs rewrite what they
//! translate. So the measured Service's one backend is its own VIP and
//! port: every step (Service lookup, conntrack, counters) runs as for any
//! backend but the rewrite itself, which leaves fields that keep their
//! value alone, so its checksum updates are not in the figure.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use kpr_tests::{
    bench::{Stat, programs::ProgramCost},
    packet::{TCP_ACK, TCP_SYN, tcp_frame, udp_frame},
};
use proxy_common::maps::{self as abi, Backend, BackendKey, ServiceKey, ServiceValue};
use proxy_userspace::dataplane::ebpf::{
    self, FROM_POD, MapSizes, PACKET_PROGRAMS, TO_POD, device_counts::DeviceCounts, marked_table::MarkedTable,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [services, batches] = args.as_slice() else { anyhow::bail!("usage: kpr-program-cost SERVICES BATCHES") };
    let costs = measure_at(services.parse().context("SERVICES")?, batches.parse().context("BATCHES")?)?;
    println!("{}", serde_json::to_string(&costs)?);
    Ok(())
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 100);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 80;
const CLIENT_PORT: u16 = 40_000;
/// Runs in a batch (each batch is one figure; the spread is theirs).
const RUNS: u32 = 200_000;

fn measure_at(services: usize, batches: usize) -> anyhow::Result<Vec<ProgramCost>> {
    let mut ebpf = ebpf::load(MapSizes::default()).context("loading the programs")?;
    for (name, _) in PACKET_PROGRAMS {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("the verifier refuses {name}"))?;
    }
    program_services(&mut ebpf, services)?;
    give_slot(&mut ebpf)?;

    let request = |flags, payload: &[u8]| tcp_frame((CLIENT, CLIENT_PORT), (VIP, PORT), flags, payload);
    let reply = tcp_frame((VIP, PORT), (CLIENT, CLIENT_PORT), TCP_ACK, b"HTTP/1.0 200 OK\r\n\r\n");
    // The flow is tracked (SYN) and answered (SYN-ACK) before it is measured.
    run(&ebpf, FROM_POD, &request(TCP_SYN, b""), 1)?;
    run(&ebpf, TO_POD, &tcp_frame((VIP, PORT), (CLIENT, CLIENT_PORT), TCP_SYN | TCP_ACK, b""), 1)?;
    let kinds = [
        ("a request to a Service, tracked", FROM_POD, request(TCP_ACK, b"GET / HTTP/1.0\r\n\r\n")),
        ("the request, at the backend's interface", TO_POD, request(TCP_ACK, b"GET / HTTP/1.0\r\n\r\n")),
        ("its reply, at the backend's interface", FROM_POD, reply.clone()),
        ("its reply, at the client's interface", TO_POD, reply),
        ("TCP to a pod directly", FROM_POD, tcp_frame((CLIENT, CLIENT_PORT + 1), (POD, 8080), TCP_ACK, b"x")),
        ("UDP to a pod directly", FROM_POD, udp_frame((CLIENT, CLIENT_PORT + 2), (POD, 5353), b"query")),
    ];
    kinds
        .into_iter()
        .map(|(packet, program, frame)| {
            let ns = (0..batches)
                .map(|_| run(&ebpf, program, &frame, RUNS).map(|d| d.as_nanos() as f64))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (packet, program) = (packet.into(), program.into());
            Ok(ProgramCost { services, packet, program, runs: RUNS, ns_per_run: Stat::of(ns) })
        })
        .collect()
}

/// `n` TCP Services on port 80, the measured one on `VIP` with itself as
/// its one backend, every other with one backend of its own.
fn program_services(ebpf: &mut Ebpf, n: usize) -> anyhow::Result<()> {
    // Through the agent's tables, which mark the ports of what they write.
    let table = HashMap::try_from(ebpf.take_map(abi::SERVICES).context(abi::SERVICES)?)?;
    let ports = Array::try_from(ebpf.take_map(abi::FRONTEND_PORTS).context(abi::FRONTEND_PORTS)?)?;
    let mut services = MarkedTable::<ServiceKey>::new(table, ports)?;
    for id in 1..=n as u32 {
        let vip = if id == 1 { VIP } else { Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + id) };
        let value = ServiceValue { id, backend_set: id, backend_count: 1, ..ServiceValue::MARKER };
        services.insert(ServiceKey::new(vip.octets(), PORT, abi::PROTO_TCP), value, 0)?;
        services.insert(ServiceKey::vip_marker(vip.octets()), ServiceValue::MARKER, 0)?;
    }
    let table = HashMap::try_from(ebpf.take_map(abi::BACKENDS).context(abi::BACKENDS)?)?;
    let ports = Array::try_from(ebpf.take_map(abi::BACKEND_PORTS).context(abi::BACKEND_PORTS)?)?;
    let mut backends = MarkedTable::<BackendKey, Backend>::new(table, ports)?;
    for id in 1..=n as u32 {
        let backend = if id == 1 { Backend::new(VIP.octets(), PORT) } else { Backend::new(POD.octets(), 8080) };
        backends.insert(BackendKey { set: id, slot: 0 }, backend, 0)?;
    }
    Ok(())
}

/// The interface the runs see (BPF_PROG_TEST_RUN hands the programs the
/// loopback device) is given its counting slot, as the agent gives every
/// interface it attaches to, by the agent's own code.
fn give_slot(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    const LOOPBACK: u32 = 1;
    let mut take = |name: &str| ebpf.take_map(name).with_context(|| name.to_string());
    let map = PerCpuHashMap::try_from(take(abi::DEVICE_COUNTS)?)?;
    let owners = Array::try_from(take(abi::DEVICE_OWNERS)?)?;
    let rows = PerCpuArray::try_from(take(abi::DEVICE_SLOTS)?)?;
    let mut counts = DeviceCounts::new(map, owners, rows);
    counts.follow(&BTreeMap::from([("lo".to_string(), LOOPBACK)]), [LOOPBACK]);
    Ok(())
}

/// The time of one run of `program` on `frame`, over `runs` runs.
fn run(ebpf: &Ebpf, program: &str, frame: &[u8], runs: u32) -> anyhow::Result<std::time::Duration> {
    let prog: &SchedClassifier = ebpf.program(program).context(program.to_string())?.try_into()?;
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat: runs, ..Default::default() })?;
    // TC_ACT_OK: passed on, translated or not; anything else is not the path measured.
    anyhow::ensure!(r.return_value == 0, "{program} returned {} on {frame:02x?}", r.return_value);
    Ok(r.duration)
}
