//! The datapath program run by the kernel on crafted packets through
//! BPF_PROG_TEST_RUN: exact rewrites, checksums verified by recomputation,
//! refusals, malformed packets left alone or dropped, every drop counted
//! under its reason, exact traffic counts, and map memory that does not
//! scale with capacity times CPUs; and the XDP program forwarding IPv6
//! from outside, in a namespace whose routes and neighbours its FIB
//! lookups see.

use std::{
    collections::{BTreeMap, HashMap as StdMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use device_counts::DeviceCounts as Slots;
use kpr_tests::{
    packet::{self, Ip, TCP_ACK, TCP_SYN, View, ethernet, tcp_frame, udp_frame},
    root_or_skip,
};
use proxy_common::{
    conntrack::{self as ct, CtEntry, CtEntry6, FlowKey, FlowKey6},
    counters::{Counter, DropReason},
    maps::{
        self as abi, Backend, Backend6, BackendKey, BackendTrafficKey, BackendTrafficKey6, DeviceCounts, DeviceKey,
        ServiceKey, ServiceKey6, ServiceValue, Traffic, hook,
    },
};
use proxy_userspace::{
    clock::monotonic_seconds,
    dataplane::ebpf::{
        self, FROM_POD, MapSizes, PACKET_PROGRAMS, TO_POD, conntrack_gc, device_counts, dump, marked_table::MarkedTable,
    },
    inspect::Maps,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 100);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Not programmed by `Datapath::new`: tests give it their own Service.
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const TCP_RST: u8 = 0x04;
const TCP_FIN: u8 = 0x01;
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12), Ipv4Addr::new(10, 244, 0, 13)];

struct Datapath {
    ebpf: Ebpf,
}

/// These tests write the frontend and backend tables directly, not through
/// the agent's `MarkedTable`, which marks each entry's port: every port is
/// marked for them (`a_frontend_is_looked_up_only_on_a_port_marked_for_it`
/// and `a_reply_is_looked_for_only_from_a_port_marked_for_a_backend` test
/// the marks).
fn mark_every_port(ebpf: &mut Ebpf) {
    for name in [abi::FRONTEND_PORTS, abi::FRONTEND_PORTS6, abi::BACKEND_PORTS, abi::BACKEND_PORTS6] {
        let mut ports: Array<_, u64> = Array::try_from(ebpf.map_mut(name).unwrap()).unwrap();
        for word in 0..abi::PORT_WORDS {
            ports.set(word, u64::MAX, 0).unwrap();
        }
    }
}

impl Datapath {
    /// The program loaded with: VIP:80/TCP -> backends:8080, VIP:53/UDP ->
    /// backends:5353 (one backend each unless `n` says more), and an empty
    /// Service on EMPTY_VIP:80/TCP and :53/UDP.
    fn new(n: usize) -> Self {
        let mut ebpf = ebpf::load(MapSizes::default()).expect("load");
        mark_every_port(&mut ebpf);
        for (name, _) in PACKET_PROGRAMS {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load().unwrap_or_else(|e| panic!("the verifier refuses {name}: {e}"));
        }
        let mut dp = Self { ebpf };
        dp.service(VIP, 80, abi::PROTO_TCP, 1, &BACKENDS[..n], 8080);
        dp.service(VIP, 53, abi::PROTO_UDP, 2, &BACKENDS[..n], 5353);
        dp.service(EMPTY_VIP, 80, abi::PROTO_TCP, 3, &[], 0);
        dp.service(EMPTY_VIP, 53, abi::PROTO_UDP, 4, &[], 0);
        dp
    }

    fn service(&mut self, vip: Ipv4Addr, port: u16, proto: u8, id: u32, backends: &[Ipv4Addr], target: u16) {
        let mut svcs: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(abi::SERVICES).unwrap()).unwrap();
        svcs.insert(
            ServiceKey::new(vip.octets(), port, proto),
            ServiceValue { id, backend_set: id, backend_count: backends.len() as u32, ..ServiceValue::MARKER },
            0,
        )
        .unwrap();
        svcs.insert(ServiceKey::vip_marker(vip.octets()), ServiceValue::MARKER, 0).unwrap();
        let mut bes: HashMap<_, BackendKey, Backend> =
            HashMap::try_from(self.ebpf.map_mut(abi::BACKENDS).unwrap()).unwrap();
        for (slot, b) in backends.iter().enumerate() {
            bes.insert(BackendKey { set: id, slot: slot as u32 }, Backend::new(b.octets(), target), 0).unwrap();
        }
    }

    /// Runs what a pod sent through the ingress program.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(FROM_POD, frame).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?}: {e}"))
    }

    /// Runs what the node delivers to a pod through the egress program.
    fn to_pod(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(TO_POD, frame).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?}: {e}"))
    }

    fn try_run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; 512];
        let r =
            prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn counter(&self, c: Counter) -> u64 {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(abi::COUNTERS).unwrap()).unwrap();
        m.get(&(c as u32), 0).unwrap().iter().sum()
    }

    /// Packets counted under any drop reason.
    fn drops(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.counter(r.counter())).sum()
    }

    fn service_traffic(&self, id: u32) -> Traffic {
        let m: Array<_, Traffic> = Array::try_from(self.ebpf.map(abi::SERVICE_TRAFFIC).unwrap()).unwrap();
        m.get(&id, 0).unwrap()
    }

    fn backend_traffic(&self, id: u32, backend: (Ipv4Addr, u16)) -> Option<Traffic> {
        let m: HashMap<_, BackendTrafficKey, Traffic> =
            HashMap::try_from(self.ebpf.map(abi::BACKEND_TRAFFIC).unwrap()).unwrap();
        m.get(&BackendTrafficKey::new(id, backend.0.octets(), backend.1.to_be_bytes()), 0).ok()
    }

    /// The conntrack entry under `key`, in its protocol's table.
    fn ct(&self, key: &FlowKey) -> Option<CtEntry> {
        let m: HashMap<_, FlowKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(ct::map_for(key.proto)).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn ct_table(&mut self, proto: u8) -> HashMap<&mut aya::maps::MapData, FlowKey, CtEntry> {
        HashMap::try_from(self.ebpf.map_mut(ct::map_for(proto)).unwrap()).unwrap()
    }

    fn ct_entries(&self, table: &str) -> usize {
        let m: HashMap<_, FlowKey, CtEntry> = HashMap::try_from(self.ebpf.map(table).unwrap()).unwrap();
        m.keys().filter(Result::is_ok).count()
    }
}

#[test]
fn tcp_to_vip_is_translated_exactly() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let frame = tcp_frame((CLIENT, 40000), (VIP, 80), TCP_SYN, b"");
    let (verdict, out) = dp.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    let v = View(&out);
    assert_eq!((v.src(), v.sport()), (CLIENT, 40000), "source untouched");
    assert_eq!((v.dst(), v.dport()), (BACKENDS[0], 8080), "destination is the endpoint");
    assert!(v.ip_checksum_ok(), "IP checksum");
    assert!(v.l4_checksum_ok(), "TCP checksum");
    // Only the destination address, port and checksums changed.
    let changed: Vec<usize> = (0..frame.len()).filter(|&i| frame[i] != out[i]).collect();
    assert!(changed.iter().all(|i| [24, 25, 30, 31, 32, 33, 36, 37, 50, 51].contains(i)), "changed bytes {changed:?}");
    assert_eq!(dp.counter(Counter::Translated), 1);
}

#[test]
fn replies_are_reverse_translated() {
    root_or_skip!();
    let dp = Datapath::new(1);
    dp.run(&tcp_frame((CLIENT, 40001), (VIP, 80), TCP_SYN, b""));
    let reply = tcp_frame((BACKENDS[0], 8080), (CLIENT, 40001), TCP_SYN | TCP_ACK, b"");
    let (verdict, out) = dp.to_pod(&reply);
    assert_eq!(verdict, TC_ACT_OK, "on its way to the client, translated just before it");
    let v = View(&out);
    assert_eq!((v.src(), v.sport()), (VIP, 80), "the client sees the VIP as the source");
    assert_eq!((v.dst(), v.dport()), (CLIENT, 40001));
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
    assert_eq!(dp.counter(Counter::ReverseTranslated), 1);

    // A packet from the backend in an unrelated flow is not touched.
    let other = tcp_frame((BACKENDS[0], 8080), (CLIENT, 40999), TCP_ACK, b"x");
    assert_eq!(dp.to_pod(&other), (TC_ACT_OK, other.clone()));
}

#[test]
fn a_pod_that_is_its_own_backend_is_answered_through_the_hairpin_address() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let pod = BACKENDS[0];
    let hairpin = Ipv4Addr::from(abi::HAIRPIN_SOURCE);
    let swapped = |out: &[u8], sent: &[u8]| out[..6] == sent[6..12] && out[6..12] == sent[..6];
    let flows: [(Vec<u8>, u16, Vec<u8>); 2] = [
        (
            tcp_frame((pod, 40000), (VIP, 80), TCP_SYN, b""),
            8080,
            tcp_frame((pod, 8080), (hairpin, 40000), TCP_SYN | TCP_ACK, b""),
        ),
        (udp_frame((pod, 40000), (VIP, 53), b"query"), 5353, udp_frame((pod, 5353), (hairpin, 40000), b"answer")),
    ];
    for (request, target, reply) in flows {
        let (verdict, out) = dp.run(&request);
        assert_eq!(verdict, TC_ACT_REDIRECT, "straight back to the pod");
        let v = View(&out);
        assert_eq!((v.src(), v.sport()), (hairpin, 40000), "from the hairpin address");
        assert_eq!((v.dst(), v.dport()), (pod, target));
        assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
        assert!(swapped(&out, &request), "to the pod's MAC address");
        // The egress program, which then sees it, leaves it alone.
        assert_eq!(dp.to_pod(&out), (TC_ACT_OK, out.clone()));

        // The pod's answer leaves it for the hairpin address, and goes back as the frontend's.
        let (verdict, out) = dp.run(&reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let v = View(&out);
        assert_eq!((v.src(), v.sport()), (VIP, View(&request).dport()), "from the frontend");
        assert_eq!((v.dst(), v.dport()), (pod, 40000));
        assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
        assert!(swapped(&out, &reply));
        assert_eq!(dp.to_pod(&out), (TC_ACT_OK, out.clone()));
    }
    assert_eq!((dp.counter(Counter::Translated), dp.counter(Counter::ReverseTranslated)), (2, 2));

    // The pod's ICMP errors about either direction of a hairpin flow go
    // back to it as the other end knows the flow, quote included.
    let request = udp_frame((pod, 40100), (VIP, 53), b"query");
    let (_, delivered) = dp.run(&request);
    let closed_port = icmp_error(pod, hairpin, 3, 3, ip_packet(&delivered));
    let (verdict, out) = dp.run(&closed_port);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight back to the pod");
    let v = View(&out);
    assert_eq!((v.src(), v.dst()), (VIP, pod), "the frontend's error, to the pod's client socket");
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok(), "IP and ICMP checksums");
    assert_eq!(&v.l4()[8..], ip_packet(&request), "about what the pod sent to the frontend");
    assert!(swapped(&out, &closed_port));

    let answer = udp_frame((pod, 5353), (hairpin, 40100), b"answer");
    let (_, shown) = dp.run(&answer);
    let gone = icmp_error(pod, VIP, 3, 3, ip_packet(&shown));
    let (verdict, out) = dp.run(&gone);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let v = View(&out);
    assert_eq!((v.src(), v.dst()), (hairpin, pod), "the hairpin address's error, to the pod's serving socket");
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
    assert_eq!(&v.l4()[8..], ip_packet(&answer), "about what the pod answered");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 2);

    // A packet to the hairpin address in no tracked flow is the node's business.
    let stray = tcp_frame((BACKENDS[1], 8080), (hairpin, 41000), TCP_ACK, b"x");
    assert_eq!(dp.run(&stray), (TC_ACT_OK, stray.clone()));
    assert_eq!(dp.drops(), 0);
}

/// Sets `flag` on every frontend (`on`) or clears it.
fn flag(dp: &mut Datapath, flag: u8, on: bool) {
    let mut svcs: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(dp.ebpf.map_mut(abi::SERVICES).unwrap()).unwrap();
    let entries: Vec<_> = svcs.iter().map(Result::unwrap).collect();
    for (key, value) in entries {
        let flags = if on { value.flags | flag } else { value.flags & !flag };
        svcs.insert(key, ServiceValue { flags, ..value }, 0).unwrap();
    }
}

/// What iptables mode does to the maps eBPF mode left when it takes over.
fn drain(dp: &mut Datapath) {
    flag(dp, abi::flags::DRAINING, true);
}

#[test]
fn flows_the_nodes_rules_translated_are_left_to_its_conntrack() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    // The first sync, while the rules eBPF mode takes over from still serve.
    flag(&mut dp, abi::flags::ADOPTING, true);
    let syn = tcp_frame((CLIENT, 40200), (VIP, 80), TCP_SYN, b"");
    let (_, out) = dp.run(&syn);
    assert_eq!((View(&out).dst(), View(&out).dport()), (BACKENDS[0], 8080), "a SYN starts a flow of this datapath's");
    for maybe_the_nodes in
        [tcp_frame((CLIENT, 40201), (VIP, 80), TCP_ACK, b"request"), udp_frame((CLIENT, 40202), (VIP, 53), b"query")]
    {
        assert_eq!(dp.run(&maybe_the_nodes), (TC_ACT_OK, maybe_the_nodes.clone()), "left to the node");
    }
    let (_, out) = dp.run(&tcp_frame((CLIENT, 40200), (VIP, 80), TCP_ACK, b"request"));
    assert_eq!(View(&out).dst(), BACKENDS[0], "the datapath's own flow goes on");

    // The agent tracks the node's flow and ends the adoption.
    let key = service_key(40201, VIP, 80, abi::PROTO_TCP);
    let long_ago = monotonic_seconds() - 100;
    let host = CtEntry {
        state: ct::STATE_HOST | ct::STATE_REPLIED,
        ..CtEntry::new(BACKENDS[0].octets(), 8080u16.to_be_bytes(), 1, 0, long_ago)
    };
    dp.ct_table(abi::PROTO_TCP).insert(key, host, 0).unwrap();
    flag(&mut dp, abi::flags::ADOPTING, false);
    let ack = tcp_frame((CLIENT, 40201), (VIP, 80), TCP_ACK, b"more");
    assert_eq!(dp.run(&ack), (TC_ACT_OK, ack.clone()), "the node's flow is left to it");
    let seen = dp.ct(&key).unwrap();
    assert_eq!(seen.state, ct::STATE_HOST | ct::STATE_REPLIED);
    assert!(seen.last_seen > long_ago, "and kept alive");
    assert!(dp.ct(&key.reply(BACKENDS[0].octets(), 8080u16.to_be_bytes())).is_none(), "its replies are the node's too");
    // A new connection on the port, once the node's is over, is this datapath's.
    dp.run(&tcp_frame((CLIENT, 40201), (VIP, 80), TCP_ACK | TCP_FIN, b""));
    let (_, out) = dp.run(&tcp_frame((CLIENT, 40201), (VIP, 80), TCP_SYN, b""));
    assert_eq!(View(&out).dst(), BACKENDS[0]);
    assert_eq!(dp.ct(&key).unwrap().state & ct::STATE_HOST, 0);
    // UDP with no flow is translated again.
    let (_, out) = dp.run(&udp_frame((CLIENT, 40202), (VIP, 53), b"query"));
    assert_eq!(View(&out).dst(), BACKENDS[0]);
    assert_eq!(dp.drops(), 0);
}

#[test]
fn a_draining_frontend_finishes_its_flows_and_leaves_new_ones_to_the_stack() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.run(&tcp_frame((CLIENT, 40100), (VIP, 80), TCP_SYN, b""));
    drain(&mut dp);
    // The flow taken on before goes on, both ways.
    let (verdict, out) = dp.run(&tcp_frame((CLIENT, 40100), (VIP, 80), TCP_ACK, b"request"));
    assert_eq!((verdict, View(&out).dst(), View(&out).dport()), (TC_ACT_OK, BACKENDS[0], 8080));
    let (_, out) = dp.to_pod(&tcp_frame((BACKENDS[0], 8080), (CLIENT, 40100), TCP_ACK, b"answer"));
    assert_eq!((View(&out).src(), View(&out).sport()), (VIP, 80));
    // New flows pass untouched, to a Service with endpoints or without
    // (iptables' rules answer those), and nothing is dropped.
    for new in [
        tcp_frame((CLIENT, 40101), (VIP, 80), TCP_SYN, b""),
        udp_frame((CLIENT, 40102), (VIP, 53), b"query"),
        tcp_frame((CLIENT, 40103), (EMPTY_VIP, 80), TCP_SYN, b""),
    ] {
        assert_eq!(dp.run(&new), (TC_ACT_OK, new.clone()), "left to the stack");
    }
    assert_eq!((dp.counter(Counter::Translated), dp.counter(Counter::RefusedNoBackend), dp.drops()), (2, 0, 0));
}

#[test]
fn udp_is_translated_with_and_without_checksum() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let (verdict, out) = dp.run(&udp_frame((CLIENT, 5000), (VIP, 53), b"query"));
    assert_eq!(verdict, TC_ACT_OK);
    let v = View(&out);
    assert_eq!((v.dst(), v.dport()), (BACKENDS[0], 5353));
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
    assert_ne!(&v.l4()[6..8], &[0, 0]);

    // UDP checksum 0 means "none" and must stay 0.
    let ip = Ip::new(CLIENT, VIP, 17);
    let frame = ethernet(0x0800, &ip.packet(&packet::udp_datagram(&ip, 5001, 53, b"q", false)));
    let (_, out) = dp.run(&frame);
    let v = View(&out);
    assert_eq!((v.dst(), v.dport()), (BACKENDS[0], 5353));
    assert_eq!(&v.l4()[6..8], &[0, 0], "no checksum stays no checksum");
    assert!(v.ip_checksum_ok());
}

#[test]
fn ip_options_are_respected() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let mut ip = Ip::new(CLIENT, VIP, 6);
    ip.options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL: IHL 6
    let frame = ethernet(0x0800, &ip.packet(&packet::tcp_segment(&ip, 40002, 80, 7, TCP_SYN, b"")));
    let (verdict, out) = dp.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    let v = View(&out);
    assert_eq!(v.header_len(), 24);
    assert_eq!(&out[34..38], &frame[34..38], "options untouched");
    assert_eq!((v.dst(), v.dport()), (BACKENDS[0], 8080), "ports found after the options");
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
}

/// `datagram` (an L4 header and payload from `src` to `dst`) in two
/// fragments, split after `first` bytes (a multiple of 8).
fn fragmented(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8], first: usize) -> [Vec<u8>; 2] {
    let mut ip = Ip::new(src, dst, 17);
    ip.frag = 0x2000;
    let head = ethernet(0x0800, &ip.packet(&datagram[..first]));
    ip.frag = (first / 8) as u16;
    [head, ethernet(0x0800, &ip.packet(&datagram[first..]))]
}

/// Whether the UDP checksum of the datagram reassembled from `pieces` holds.
fn reassembled_checksum_ok(pieces: &[Vec<u8>]) -> bool {
    let (v, l4): (View, Vec<u8>) = (View(&pieces[0]), pieces.iter().flat_map(|p| View(p).l4().to_vec()).collect());
    let sum = proxy_common::checksum::pseudo_header_sum(v.src().octets(), v.dst().octets(), 17, l4.len() as u16);
    proxy_common::checksum::fold(proxy_common::checksum::add_bytes(sum, &l4)) == 0xffff
}

#[test]
fn fragmented_datagrams_are_translated_whole_and_strays_are_dropped() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let payload: Vec<u8> = (0..40u8).collect();
    let ip = Ip::new(CLIENT, VIP, 17);
    let request = packet::udp_datagram(&ip, 41800, 53, &payload, true);
    let pieces = fragmented(CLIENT, VIP, &request, 24);
    let out: Vec<Vec<u8>> = pieces.iter().map(|f| dp.run(f).1).collect();
    for o in &out {
        assert_eq!(View(o).dst(), BACKENDS[0], "every piece goes to the backend");
        assert!(View(o).ip_checksum_ok());
    }
    assert_eq!(View(&out[0]).dport(), 5353);
    assert_eq!(View(&out[1]).l4(), View(&pieces[1]).l4(), "a later piece's payload is untouched");
    assert!(reassembled_checksum_ok(&out), "the datagram's checksum holds for its new addresses");

    // The backend's answer, in pieces: each comes from the frontend.
    let ip = Ip::new(BACKENDS[0], CLIENT, 17);
    let answer = packet::udp_datagram(&ip, 5353, 41800, &payload, true);
    let out: Vec<Vec<u8>> = fragmented(BACKENDS[0], CLIENT, &answer, 16).iter().map(|f| dp.to_pod(f).1).collect();
    assert!(out.iter().all(|o| View(o).src() == VIP && View(o).ip_checksum_ok()));
    assert_eq!(View(&out[0]).sport(), 53);
    assert!(reassembled_checksum_ok(&out));

    // A later piece whose first never passed: to a VIP it cannot be placed
    // and is dropped; elsewhere it passes.
    let stray = Ipv4Addr::new(10, 244, 0, 101);
    let [_, later] = fragmented(stray, VIP, &request, 24);
    assert_eq!(dp.run(&later).0, TC_ACT_SHOT);
    let [_, elsewhere] = fragmented(stray, BACKENDS[1], &request, 24);
    assert_eq!(dp.run(&elsewhere), (TC_ACT_OK, elsewhere.clone()));
    assert_eq!(dp.counter(Counter::DroppedFragment), 1);
    assert_eq!(dp.counter(Counter::PassedFragment), 1);
    assert_eq!(dp.drops(), 1, "each drop counted under one reason");
}

#[test]
fn truncated_and_malformed_packets_are_never_translated() {
    root_or_skip!();
    let dp = Datapath::new(1);
    // A TCP header cut short: the IP total length leaves 10 bytes for TCP.
    let ip = Ip::new(CLIENT, VIP, 6);
    let short = ethernet(0x0800, &ip.packet(&packet::tcp_segment(&ip, 40003, 80, 1, TCP_SYN, b"")[..10]));
    assert_eq!(dp.run(&short).0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DroppedTruncated), 1);
    assert_eq!(dp.drops(), 1, "counted under one reason");

    // IHL 4 is invalid: passed untouched for the kernel to drop.
    let mut bad = tcp_frame((CLIENT, 40004), (VIP, 80), TCP_SYN, b"");
    bad[14] = 0x44;
    assert_eq!(dp.run(&bad), (TC_ACT_OK, bad.clone()));
    // Total length beyond the frame.
    let mut long = tcp_frame((CLIENT, 40005), (VIP, 80), TCP_SYN, b"");
    long[16] = 0x05;
    assert_eq!(dp.run(&long), (TC_ACT_OK, long.clone()));
    // An IPv4 ethertype carrying something that is not version 4.
    let mut not_v4 = tcp_frame((CLIENT, 40006), (VIP, 80), TCP_SYN, b"");
    not_v4[14] = 0x65;
    assert_eq!(dp.run(&not_v4), (TC_ACT_OK, not_v4.clone()));
    assert_eq!(dp.counter(Counter::PassedMalformed), 3);
    assert_eq!(dp.counter(Counter::Translated), 0);
}

/// ARP, neither IPv4 nor IPv6, passes both programs as it came, counted.
#[test]
fn frames_neither_ipv4_nor_ipv6_pass_untouched_and_counted() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let arp = ethernet(0x0806, &[0u8; 28]);
    assert_eq!(dp.run(&arp), (TC_ACT_OK, arp.clone()));
    assert_eq!(dp.to_pod(&arp), (TC_ACT_OK, arp.clone()));
    assert_eq!(dp.counter(Counter::PassedNotIp), 2);
}

#[test]
fn tcp_to_an_empty_service_is_reset() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let frame = tcp_frame((CLIENT, 40006), (EMPTY_VIP, 80), TCP_SYN, b"");
    let (verdict, out) = dp.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the pod");
    assert_eq!(out.len(), 54);
    assert_eq!(&out[0..6], &packet::POD_MAC, "addressed to the client's MAC");
    assert_eq!(&out[6..12], &packet::GATEWAY_MAC);
    let v = View(&out);
    assert_eq!((v.src(), v.sport()), (EMPTY_VIP, 80));
    assert_eq!((v.dst(), v.dport()), (CLIENT, 40006));
    assert_eq!(v.l4()[13], 0x14, "RST|ACK");
    assert_eq!(u32::from_be_bytes(v.l4()[8..12].try_into().unwrap()), 1001, "acks the SYN");
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
    assert_eq!(dp.counter(Counter::RefusedNoBackend), 1);
}

#[test]
fn udp_to_an_empty_service_gets_port_unreachable() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let frame = udp_frame((CLIENT, 5002), (EMPTY_VIP, 53), b"a question of some length");
    let (verdict, out) = dp.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    let v = View(&out);
    assert_eq!(v.proto(), 1, "ICMP");
    assert_eq!((v.src(), v.dst()), (EMPTY_VIP, CLIENT));
    assert_eq!(&v.l4()[..2], &[3, 3], "destination unreachable, port unreachable");
    assert_eq!(&v.l4()[8..], &frame[14..42], "quotes the offending IP header and UDP header");
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
}

#[test]
fn a_flow_sticks_to_its_backend_and_new_flows_spread_evenly() {
    root_or_skip!();
    let dp = Datapath::new(3);
    let mut per_backend: StdMap<Ipv4Addr, u32> = StdMap::new();
    let flows = 3000u16;
    for i in 0..flows {
        let sport = 20000 + i;
        let (_, out) = dp.run(&tcp_frame((CLIENT, sport), (VIP, 80), TCP_SYN, b""));
        let chosen = View(&out).dst();
        *per_backend.entry(chosen).or_default() += 1;
        if i % 100 == 0 {
            for _ in 0..5 {
                let (_, out) = dp.run(&tcp_frame((CLIENT, sport), (VIP, 80), TCP_ACK, b"more"));
                assert_eq!(View(&out).dst(), chosen, "every packet of a flow goes to the same endpoint");
            }
            let key = FlowKey::service(CLIENT.octets(), sport.to_be_bytes(), VIP.octets(), 80u16.to_be_bytes(), 6);
            assert_eq!(dp.ct(&key).unwrap().addr, chosen.octets());
        }
    }
    // Uniform choice: each of 3 backends near 1000 of 3000 (6 sigma ~ 155).
    for b in BACKENDS {
        let n = per_backend.get(&b).copied().unwrap_or(0);
        assert!((845..=1155).contains(&n), "{per_backend:?}");
    }
}

#[test]
fn packets_an_empty_service_cannot_answer_are_dropped_with_their_reason() {
    root_or_skip!();
    let dp = Datapath::new(1);
    // The answers are laid out for a 20-byte IP header: IP options cannot be answered.
    let mut ip = Ip::new(CLIENT, EMPTY_VIP, 6);
    ip.options = vec![0x01, 0x01, 0x01, 0x00];
    let with_options = ethernet(0x0800, &ip.packet(&packet::tcp_segment(&ip, 40007, 80, 7, TCP_SYN, b"")));
    assert_eq!(dp.run(&with_options).0, TC_ACT_SHOT);
    // A reset is never answered.
    let reset = tcp_frame((CLIENT, 40008), (EMPTY_VIP, 80), TCP_RST, b"");
    assert_eq!(dp.run(&reset).0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DroppedNoBackend), 2);
    assert_eq!(dp.drops(), 2, "counted under no other reason");
    assert_eq!(dp.counter(Counter::RefusedNoBackend), 0, "nothing was sent back");
}

#[test]
fn a_missing_backend_slot_drops_with_its_reason() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    // Userspace mid-update: the Service says one backend, its slot is not written yet.
    let mut svcs: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(dp.ebpf.map_mut(abi::SERVICES).unwrap()).unwrap();
    let key = ServiceKey::new(OTHER_VIP.octets(), 80, abi::PROTO_TCP);
    svcs.insert(key, ServiceValue { id: 9, backend_count: 1, ..ServiceValue::MARKER }, 0).unwrap();
    let frame = tcp_frame((CLIENT, 40009), (OTHER_VIP, 80), TCP_SYN, b"");
    assert_eq!(dp.run(&frame).0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DroppedBackendMissing), 1);
    assert_eq!(dp.drops(), 1, "counted under no other reason");
    let flow = FlowKey::service(CLIENT.octets(), 40009u16.to_be_bytes(), OTHER_VIP.octets(), 80u16.to_be_bytes(), 6);
    assert_eq!(dp.ct(&flow), None, "no flow is tracked to no backend");
}

#[test]
fn traffic_is_counted_per_service_and_backend_in_both_directions() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let syn = tcp_frame((CLIENT, 40010), (VIP, 80), TCP_SYN, b"");
    let reply = tcp_frame((BACKENDS[0], 8080), (CLIENT, 40010), TCP_SYN | TCP_ACK, b"");
    let data = tcp_frame((CLIENT, 40010), (VIP, 80), TCP_ACK, b"GET / HTTP/1.0\r\n\r\n");
    assert_ne!(dp.run(&syn).0, TC_ACT_SHOT);
    assert_ne!(dp.to_pod(&reply).0, TC_ACT_SHOT);
    assert_ne!(dp.run(&data).0, TC_ACT_SHOT);
    let want = Traffic { packets: 3, bytes: (syn.len() + reply.len() + data.len()) as u64 };
    assert_eq!(dp.service_traffic(1), want, "the Service counts both directions");
    assert_eq!(dp.backend_traffic(1, (BACKENDS[0], 8080)), Some(want), "so does the backend serving it");
    assert_eq!(dp.service_traffic(2), Traffic::default(), "another frontend counts nothing");
    assert_eq!(dp.backend_traffic(2, (BACKENDS[0], 5353)), None);
}

#[test]
fn traffic_counts_stay_exact_when_every_cpu_counts_at_once() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    // A Service whose only backend is its own VIP and port: translating
    // changes no byte, so the kernel can run the same packet over and over,
    // and every run counts.
    dp.service(OTHER_VIP, 80, abi::PROTO_TCP, 9, &[OTHER_VIP], 80);
    let frame = tcp_frame((CLIENT, 40011), (OTHER_VIP, 80), TCP_ACK, b"x");
    let cpus = allowed_cpus();
    assert!(cpus.len() >= 2, "two CPUs are needed to race: allowed {cpus:?}");
    let runs: u32 = 500_000;
    let prog: &SchedClassifier = dp.ebpf.program(FROM_POD).unwrap().try_into().unwrap();
    std::thread::scope(|s| {
        for &cpu in &cpus {
            let frame = &frame;
            s.spawn(move || {
                pin_to(cpu);
                let r = prog
                    .test_run(TestRunOptions { data_in: Some(frame), repeat: runs, ..Default::default() })
                    .expect("BPF_PROG_TEST_RUN");
                assert_eq!(r.return_value, TC_ACT_OK);
            });
        }
    });
    let n = runs as u64 * cpus.len() as u64;
    let want = Traffic { packets: n, bytes: n * frame.len() as u64 };
    // Lost updates (a plain read-modify-write racing on another CPU) would
    // leave these short.
    assert_eq!(dp.service_traffic(9), want, "Service traffic over {} CPUs", cpus.len());
    assert_eq!(dp.backend_traffic(9, (OTHER_VIP, 80)), Some(want), "backend traffic over {} CPUs", cpus.len());
    assert_eq!(dp.counter(Counter::Translated), n, "the per-CPU counters agree");
}

const LIFETIMES: ct::Lifetimes = ct::Lifetimes::DEFAULT;

#[test]
fn a_closing_flow_lives_as_long_as_the_node_says() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    let key = service_key(41001, VIP, 80, abi::PROTO_TCP);
    dp.run(&tcp_frame((CLIENT, 41001), (VIP, 80), TCP_SYN, b""));
    // The flow closed two seconds ago, pinned to a backend the Service has
    // since lost: its packets still go there while the flow lives.
    let closed_two_seconds_ago = |dp: &mut Datapath| {
        let mut e = dp.ct(&key).unwrap();
        e.addr = BACKENDS[2].octets();
        e.state = ct::STATE_REPLIED | ct::STATE_CLOSING;
        e.last_seen = monotonic_seconds() - 2;
        dp.ct_table(abi::PROTO_TCP).insert(key, e, 0).unwrap();
    };
    let last_ack = tcp_frame((CLIENT, 41001), (VIP, 80), TCP_ACK, b"");
    closed_two_seconds_ago(&mut dp);
    assert_eq!(View(&dp.run(&last_ack).1).dst(), BACKENDS[2], "the default: closing flows live 10 s");
    let mut lifetimes: Array<_, ct::Lifetimes> = Array::try_from(dp.ebpf.map_mut(abi::CT_LIFETIMES).unwrap()).unwrap();
    lifetimes.set(0, ct::Lifetimes { tcp_closing: 1 }, 0).unwrap();
    closed_two_seconds_ago(&mut dp);
    assert_eq!(View(&dp.run(&last_ack).1).dst(), BACKENDS[0], "gone after 1 s: the packet starts a flow");
}

fn service_key(sport: u16, vip: Ipv4Addr, port: u16, proto: u8) -> FlowKey {
    FlowKey::service(CLIENT.octets(), sport.to_be_bytes(), vip.octets(), port.to_be_bytes(), proto)
}

#[test]
fn tcp_and_udp_flows_are_tracked_in_their_own_tables_with_their_state() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let before = monotonic_seconds();
    dp.run(&tcp_frame((CLIENT, 41000), (VIP, 80), TCP_SYN, b""));
    let key = service_key(41000, VIP, 80, abi::PROTO_TCP);
    let reply = key.reply(BACKENDS[0].octets(), 8080u16.to_be_bytes());
    let fwd = dp.ct(&key).expect("service entry");
    assert_eq!((fwd.addr, fwd.port, fwd.state), (BACKENDS[0].octets(), 8080u16.to_be_bytes(), 0), "syn sent");
    assert!((before..=monotonic_seconds()).contains(&fwd.last_seen), "last seen now, on the datapath's clock");
    assert_eq!(
        dp.ct(&reply).map(|r| (r.addr, r.port)),
        Some((VIP.octets(), 80u16.to_be_bytes())),
        "names the frontend"
    );

    dp.to_pod(&tcp_frame((BACKENDS[0], 8080), (CLIENT, 41000), TCP_SYN | TCP_ACK, b""));
    assert_eq!(dp.ct(&key).unwrap().state, ct::STATE_REPLIED, "established");
    assert_eq!(ct::lifetime(abi::PROTO_TCP, dp.ct(&key).unwrap().state, &LIFETIMES), ct::TCP_ESTABLISHED_LIFETIME);
    dp.run(&tcp_frame((CLIENT, 41000), (VIP, 80), TCP_ACK | TCP_FIN, b""));
    assert_eq!(dp.ct(&key).unwrap().state, ct::STATE_REPLIED | ct::STATE_CLOSING, "closing");
    assert_eq!(ct::lifetime(abi::PROTO_TCP, dp.ct(&reply).unwrap().state, &LIFETIMES), ct::TCP_CLOSING_LIFETIME);

    dp.run(&udp_frame((CLIENT, 41000), (VIP, 53), b"q"));
    let udp = service_key(41000, VIP, 53, abi::PROTO_UDP);
    assert_eq!(dp.ct(&udp).map(|e| e.addr), Some(BACKENDS[0].octets()));
    assert_eq!((dp.ct_entries(ct::CT_TCP), dp.ct_entries(ct::CT_ANY)), (2, 2), "one entry per direction, per table");
}

/// Points frontend `id`'s Service at a new set (id + 100) holding `backends`.
fn replace_set(dp: &mut Datapath, vip: Ipv4Addr, port: u16, proto: u8, id: u32, backends: &[Ipv4Addr], target: u16) {
    let set = id + 100;
    let mut bes: HashMap<_, BackendKey, Backend> = HashMap::try_from(dp.ebpf.map_mut(abi::BACKENDS).unwrap()).unwrap();
    for (slot, b) in backends.iter().enumerate() {
        bes.insert(BackendKey { set, slot: slot as u32 }, Backend::new(b.octets(), target), 0).unwrap();
    }
    let mut svcs: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(dp.ebpf.map_mut(abi::SERVICES).unwrap()).unwrap();
    let value = ServiceValue { id, backend_set: set, backend_count: backends.len() as u32, ..ServiceValue::MARKER };
    svcs.insert(ServiceKey::new(vip.octets(), port, proto), value, 0).unwrap();
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_while_the_backend_exists() {
    root_or_skip!();
    let mut dp = Datapath::new(3);
    let syn = tcp_frame((CLIENT, 41100), (VIP, 80), TCP_SYN, b"");
    let first = View(&dp.run(&syn).1).dst();
    for _ in 0..30 {
        assert_eq!(View(&dp.run(&syn).1).dst(), first, "a retransmission is the same connection");
    }
    // The chosen backend leaves: the next retransmission goes elsewhere.
    let rest: Vec<Ipv4Addr> = BACKENDS.iter().copied().filter(|b| *b != first).collect();
    replace_set(&mut dp, VIP, 80, abi::PROTO_TCP, 1, &rest, 8080);
    let moved = View(&dp.run(&syn).1).dst();
    assert!(rest.contains(&moved), "{moved} is not among {rest:?}");

    // Once answered, a SYN on the same port is a new connection: tracked afresh.
    let back = tcp_frame((moved, 8080), (CLIENT, 41100), TCP_SYN | TCP_ACK, b"");
    assert_eq!(View(&dp.to_pod(&back).1).src(), VIP);
    assert_eq!(dp.ct(&service_key(41100, VIP, 80, abi::PROTO_TCP)).unwrap().state, ct::STATE_REPLIED);
    dp.run(&syn);
    assert_eq!(dp.ct(&service_key(41100, VIP, 80, abi::PROTO_TCP)).unwrap().state, 0, "a new connection");
}

#[test]
fn a_client_packet_restores_an_evicted_reply_entry() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.run(&tcp_frame((CLIENT, 41200), (VIP, 80), TCP_SYN, b""));
    let reply = service_key(41200, VIP, 80, abi::PROTO_TCP).reply(BACKENDS[0].octets(), 8080u16.to_be_bytes());
    dp.ct_table(abi::PROTO_TCP).remove(&reply).unwrap();
    let (verdict, out) = dp.run(&tcp_frame((CLIENT, 41200), (VIP, 80), TCP_SYN, b""));
    assert_eq!((verdict, View(&out).dst()), (TC_ACT_OK, BACKENDS[0]));
    assert!(dp.ct(&reply).is_some(), "restored");
    assert_eq!(dp.counter(Counter::ConntrackRestored), 1);
    let (_, out) = dp.to_pod(&tcp_frame((BACKENDS[0], 8080), (CLIENT, 41200), TCP_SYN | TCP_ACK, b""));
    assert_eq!(View(&out).src(), VIP, "the reply is translated again");
}

#[test]
fn a_stale_reply_entry_never_rewrites_another_flow() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    // UDP: the client talks to the backend directly on the tuple an earlier
    // Service flow used; the backend's answer keeps the backend's address.
    dp.run(&udp_frame((CLIENT, 41300), (VIP, 53), b"via the Service"));
    let direct = udp_frame((CLIENT, 41300), (BACKENDS[0], 5353), b"direct");
    assert_eq!(dp.run(&direct), (TC_ACT_OK, direct.clone()), "not to a Service: untouched");
    let answer = udp_frame((BACKENDS[0], 5353), (CLIENT, 41300), b"answer");
    assert_eq!(dp.to_pod(&answer), (TC_ACT_OK, answer.clone()), "the direct flow's reply is not rewritten");
    assert_eq!(dp.counter(Counter::ConntrackStale), 1);

    // TCP: a direct connection's SYN on an old Service flow's tuple.
    dp.run(&tcp_frame((CLIENT, 41301), (VIP, 80), TCP_SYN, b""));
    dp.run(&tcp_frame((CLIENT, 41301), (BACKENDS[0], 8080), TCP_SYN, b""));
    let synack = tcp_frame((BACKENDS[0], 8080), (CLIENT, 41301), TCP_SYN | TCP_ACK, b"");
    assert_eq!(dp.to_pod(&synack), (TC_ACT_OK, synack.clone()));

    // A reply entry whose flow expired is not trusted either.
    dp.run(&udp_frame((CLIENT, 41302), (VIP, 53), b"q"));
    let key = service_key(41302, VIP, 53, abi::PROTO_UDP);
    let mut old = dp.ct(&key).unwrap();
    old.last_seen = monotonic_seconds() - ct::NON_TCP_LIFETIME - 5;
    dp.ct_table(abi::PROTO_UDP).insert(key, old, 0).unwrap();
    let late = udp_frame((BACKENDS[0], 5353), (CLIENT, 41302), b"late");
    assert_eq!(dp.to_pod(&late), (TC_ACT_OK, late.clone()));
    assert_eq!(dp.counter(Counter::ConntrackStale), 3);
    assert_eq!(dp.drops(), 0);
}

#[test]
fn two_frontends_sharing_a_backend_never_share_a_reply_tuple() {
    root_or_skip!();
    let mut dp = Datapath::new(2);
    dp.service(OTHER_VIP, 80, abi::PROTO_TCP, 9, &BACKENDS[..2], 8080);
    for sport in 41400..41420u16 {
        let a = View(&dp.run(&tcp_frame((CLIENT, sport), (VIP, 80), TCP_SYN, b"")).1).dst();
        let b = View(&dp.run(&tcp_frame((CLIENT, sport), (OTHER_VIP, 80), TCP_SYN, b"")).1).dst();
        assert_ne!(a, b, "the same client port to both frontends: another backend for the second");
        let (_, out) = dp.to_pod(&tcp_frame((a, 8080), (CLIENT, sport), TCP_SYN | TCP_ACK, b""));
        assert_eq!(View(&out).src(), VIP);
        let (_, out) = dp.to_pod(&tcp_frame((b, 8080), (CLIENT, sport), TCP_SYN | TCP_ACK, b""));
        assert_eq!(View(&out).src(), OTHER_VIP);
    }
    // One backend behind both: the second flow cannot be told apart, so it is dropped and counted.
    dp.service(EMPTY_VIP, 8080, abi::PROTO_TCP, 10, &BACKENDS[..1], 8080);
    dp.service(Ipv4Addr::new(10, 96, 0, 50), 8080, abi::PROTO_TCP, 11, &BACKENDS[..1], 8080);
    assert_eq!(View(&dp.run(&tcp_frame((CLIENT, 41500), (EMPTY_VIP, 8080), TCP_SYN, b"")).1).dst(), BACKENDS[0]);
    let second = tcp_frame((CLIENT, 41500), (Ipv4Addr::new(10, 96, 0, 50), 8080), TCP_SYN, b"");
    assert_eq!(dp.run(&second).0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DroppedConntrackCollision), 1);
    assert_eq!(dp.drops(), 1);
}

/// `sessionAffinity: ClientIP` on a frontend of 100 backends: a client's
/// sticky backend is found however far a rewritten set moved it (the scan
/// runs in `bpf_loop`, whatever the set's size).
#[test]
fn a_sticky_backend_is_found_wherever_a_new_set_put_it() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    let backends: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
    dp.service(OTHER_VIP, 80, abi::PROTO_TCP, 9, &backends, 8080);
    let key = ServiceKey::new(OTHER_VIP.octets(), 80, abi::PROTO_TCP);
    let mut svcs: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(dp.ebpf.map_mut(abi::SERVICES).unwrap()).unwrap();
    let value = svcs.get(&key, 0).unwrap();
    svcs.insert(key, ServiceValue { flags: value.flags | abi::flags::AFFINITY, ..value }, 0).unwrap();
    let mut timeouts: HashMap<_, u32, u32> =
        HashMap::try_from(dp.ebpf.map_mut(abi::AFFINITY_TIMEOUTS).unwrap()).unwrap();
    timeouts.insert(9, 60, 0).unwrap();
    let connect =
        |dp: &Datapath, sport: u16| View(&dp.run(&tcp_frame((CLIENT, sport), (OTHER_VIP, 80), TCP_SYN, b"")).1).dst();
    let sticky = connect(&dp, 42000);
    for sport in 42001..42010 {
        assert_eq!(connect(&dp, sport), sticky, "one client, one backend");
    }

    // A new set (as the agent publishes one): the sticky backend last of all, in slot 99.
    let mut moved: Vec<Ipv4Addr> = backends.iter().copied().filter(|b| *b != sticky).collect();
    moved.push(sticky);
    let mut bes: HashMap<_, BackendKey, Backend> = HashMap::try_from(dp.ebpf.map_mut(abi::BACKENDS).unwrap()).unwrap();
    for (slot, b) in moved.iter().enumerate() {
        bes.insert(BackendKey { set: 10, slot: slot as u32 }, Backend::new(b.octets(), 8080), 0).unwrap();
    }
    let mut svcs: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(dp.ebpf.map_mut(abi::SERVICES).unwrap()).unwrap();
    let value = svcs.get(&key, 0).unwrap();
    svcs.insert(key, ServiceValue { backend_set: 10, ..value }, 0).unwrap();
    for sport in 42100..42110 {
        assert_eq!(connect(&dp, sport), sticky, "found in slot 99 of the new set");
    }
    assert_eq!(dp.drops(), 0);
}

#[test]
fn expired_flows_choose_again_and_the_collector_removes_them() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.run(&udp_frame((CLIENT, 41600), (VIP, 53), b"old"));
    dp.run(&udp_frame((CLIENT, 41601), (VIP, 53), b"live"));
    let old = service_key(41600, VIP, 53, abi::PROTO_UDP);
    let live = service_key(41601, VIP, 53, abi::PROTO_UDP);
    let now = monotonic_seconds();
    let long_ago = now - ct::NON_TCP_LIFETIME - 5;
    // An expired flow pinned to a backend that has since left: not followed.
    let gone = CtEntry::new([10, 244, 9, 9], 5353u16.to_be_bytes(), 2, 0, long_ago);
    dp.ct_table(abi::PROTO_UDP).insert(old, gone, 0).unwrap();
    let (_, out) = dp.run(&udp_frame((CLIENT, 41600), (VIP, 53), b"again"));
    assert_eq!(View(&out).dst(), BACKENDS[0], "chose again");
    assert!(dp.ct(&old).unwrap().last_seen >= now);

    // The collector removes what expired (both directions) and nothing else.
    let mut expired = dp.ct(&old).unwrap();
    expired.last_seen = long_ago;
    let reply = old.reply(BACKENDS[0].octets(), 5353u16.to_be_bytes());
    let mut expired_reply = dp.ct(&reply).unwrap();
    expired_reply.last_seen = long_ago;
    let mut table = dp.ct_table(abi::PROTO_UDP);
    table.insert(old, expired, 0).unwrap();
    table.insert(reply, expired_reply, 0).unwrap();
    let collected = conntrack_gc::collect(&mut table, monotonic_seconds(), &LIFETIMES);
    assert_eq!((collected.seen, collected.removed), (4, 2));
    assert_eq!((dp.ct(&old), dp.ct(&reply)), (None, None));
    assert!(dp.ct(&live).is_some());
}

#[test]
fn a_map_is_read_and_emptied_in_batches() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    let mut table = dp.ct_table(abi::PROTO_UDP);
    // More than one batch's worth, so the reads resume where the last stopped.
    let written: Vec<(FlowKey, CtEntry)> = (0..10_000u32)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            let key = service_key(u16::from_be_bytes([hi, lo]), Ipv4Addr::new(10, 96, hi, lo), 53, abi::PROTO_UDP);
            (key, CtEntry::new([10, 244, hi, lo], 53u16.to_be_bytes(), i, 0, i))
        })
        .collect();
    for (k, v) in &written {
        table.insert(k, v, 0).unwrap();
    }
    let by_key = |mut entries: Vec<(FlowKey, CtEntry)>| {
        entries.sort_by_key(|(k, _)| format!("{k:?}"));
        entries
    };
    let batched = dump::batched::<FlowKey, CtEntry>(aya::maps::IterableMap::map(&table)).expect("batched lookups");
    assert_eq!(batched.len(), written.len());
    assert_eq!(by_key(batched), by_key(written.clone()));
    assert_eq!(by_key(dump::entries(&table)), by_key(table.iter().map(Result::unwrap).collect()));

    // Removed in batches too, skipping keys already gone: every other
    // entry, with some removed before.
    let doomed: Vec<FlowKey> = written.iter().step_by(2).map(|(k, _)| *k).collect();
    for key in doomed.iter().step_by(1000) {
        table.remove(key).unwrap();
    }
    let removed = dump::remove_batched(aya::maps::IterableMap::map(&table), &doomed).expect("batched removals");
    assert_eq!(removed, doomed.len() - doomed.len().div_ceil(1000), "the ones still there");
    let left = dump::entries(&table);
    assert_eq!(left.len(), written.len() / 2);
    assert!(left.iter().all(|(k, _)| !doomed.contains(k)));
}

/// An ICMP error of `kind` and `code` from `src` to `dst` quoting `quote`
/// (an IP packet), with its checksum.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(quote);
    let check = proxy_common::checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    ethernet(0x0800, &Ip::new(src, dst, 1).packet(&icmp))
}

/// The IP packet of an Ethernet frame.
fn ip_packet(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

#[test]
fn icmp_errors_about_a_translated_flow_are_translated_quote_included() {
    root_or_skip!();
    let dp = Datapath::new(1);
    // The backend's port is closed: its kernel answers the translated datagram.
    let sent = udp_frame((CLIENT, 41700), (VIP, 53), b"query");
    let (_, translated) = dp.run(&sent);
    let error = icmp_error(BACKENDS[0], CLIENT, 3, 3, ip_packet(&translated));
    let (verdict, out) = dp.to_pod(&error);
    assert_ne!(verdict, TC_ACT_SHOT);
    let v = View(&out);
    assert_eq!((v.src(), v.dst()), (VIP, CLIENT), "the error comes from the frontend");
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok(), "IP and ICMP checksums");
    assert_eq!(&v.l4()[8..], ip_packet(&sent), "the quote is what the client sent, checksums included");

    // A router's "fragmentation needed" about a TCP segment, quoting only
    // the first 8 bytes of its header: the router keeps its address.
    let router = Ipv4Addr::new(10, 244, 0, 1);
    let syn = tcp_frame((CLIENT, 41701), (VIP, 80), TCP_SYN, b"");
    let (_, translated) = dp.run(&syn);
    let error = icmp_error(router, CLIENT, 3, 4, &ip_packet(&translated)[..28]);
    let (_, out) = dp.to_pod(&error);
    let v = View(&out);
    assert_eq!((v.src(), v.dst()), (router, CLIENT));
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
    assert_eq!(&v.l4()[8..], &ip_packet(&syn)[..28]);

    // The client's error about a reply it got from the frontend goes to the backend that sent it.
    let reply = udp_frame((BACKENDS[0], 5353), (CLIENT, 41700), b"answer");
    let (_, shown) = dp.to_pod(&reply);
    let error = icmp_error(CLIENT, VIP, 3, 3, ip_packet(&shown));
    let (_, out) = dp.run(&error);
    let v = View(&out);
    assert_eq!((v.src(), v.dst()), (CLIENT, BACKENDS[0]));
    assert!(v.ip_checksum_ok() && v.l4_checksum_ok());
    assert_eq!(&v.l4()[8..], ip_packet(&reply), "the quote is what the backend sent");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 3);

    // An error about a flow kpr never translated passes untouched.
    let unrelated =
        icmp_error(BACKENDS[0], CLIENT, 3, 3, ip_packet(&udp_frame((CLIENT, 41799), (BACKENDS[0], 5353), b"q")));
    assert_eq!(dp.to_pod(&unrelated), (TC_ACT_OK, unrelated.clone()));
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 3);
    assert_eq!(dp.drops(), 0);
}

#[test]
fn a_frontend_is_looked_up_only_on_a_port_marked_for_it() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let syn = |vip: Ipv4Addr, port: u16| tcp_frame((CLIENT, 40_000 + port), (vip, port), TCP_SYN, b"");
    let translated_to = |frame: &[u8]| {
        let (verdict, out) = dp.run(frame);
        assert_eq!(verdict, TC_ACT_OK);
        View(&out).dst()
    };
    let mut ports: Array<_, u64> = Array::try_from(Map::Array(map_data(&dp.ebpf, abi::FRONTEND_PORTS))).unwrap();
    for word in 0..abi::PORT_WORDS {
        ports.set(word, 0, 0).unwrap();
    }
    // No port marked: the programmed frontend is not looked for.
    assert_eq!(translated_to(&syn(VIP, 80)), VIP);
    assert_eq!(dp.counter(Counter::Translated), 0);

    // The agent's table finds entries written with no port marked (by a
    // release before the marks) and marks their ports.
    let services = HashMap::try_from(Map::HashMap(map_data(&dp.ebpf, abi::SERVICES))).unwrap();
    let mut table = MarkedTable::<ServiceKey>::new(services, ports).unwrap();
    assert_eq!(translated_to(&syn(VIP, 80)), BACKENDS[0]);

    // A frontend it writes has its port marked first.
    let value = ServiceValue { id: 9, backend_set: 1, backend_count: 1, ..ServiceValue::MARKER };
    table.insert(ServiceKey::new(OTHER_VIP.octets(), 8443, abi::PROTO_TCP), value, 0).unwrap();
    table.insert(ServiceKey::vip_marker(OTHER_VIP.octets()), ServiceValue::MARKER, 0).unwrap();
    assert_eq!(translated_to(&syn(OTHER_VIP, 8443)), BACKENDS[0]);
    // An unmarked port of the same address is still not looked up.
    assert_eq!(translated_to(&syn(OTHER_VIP, 8444)), OTHER_VIP);
    assert_eq!(dp.drops(), 0);
}

#[test]
fn a_reply_is_looked_for_only_from_a_port_marked_for_a_backend() {
    root_or_skip!();
    let dp = Datapath::new(1);
    let reply = tcp_frame((BACKENDS[0], 8080), (CLIENT, 40_000), TCP_SYN | TCP_ACK, b"");
    let (_, out) = dp.run(&tcp_frame((CLIENT, 40_000), (VIP, 80), TCP_SYN, b""));
    assert_eq!(View(&out).dst(), BACKENDS[0]);
    let mut ports: Array<_, u64> = Array::try_from(Map::Array(map_data(&dp.ebpf, abi::BACKEND_PORTS))).unwrap();
    for word in 0..abi::PORT_WORDS {
        ports.set(word, 0, 0).unwrap();
    }
    // No port marked: the reply is not looked for, and reaches the client as it is.
    assert_eq!(dp.to_pod(&reply), (TC_ACT_OK, reply.clone()));
    assert_eq!(dp.counter(Counter::ReverseTranslated), 0);

    // The agent's table marks the port of every backend it finds (a run of
    // a release before the marks wrote them), and of every one it writes.
    let backends = HashMap::try_from(Map::HashMap(map_data(&dp.ebpf, abi::BACKENDS))).unwrap();
    let mut table = MarkedTable::<BackendKey, Backend>::new(backends, ports).unwrap();
    let (_, out) = dp.to_pod(&reply);
    assert_eq!((View(&out).src(), View(&out).sport()), (VIP, 80));
    table.insert(BackendKey { set: 1, slot: 1 }, Backend::new(BACKENDS[1].octets(), 9090), 0).unwrap();
    let ports: Array<_, u64> = Array::try_from(Map::Array(map_data(&dp.ebpf, abi::BACKEND_PORTS))).unwrap();
    let (word, bit) = abi::port_bit(9090);
    assert_ne!(ports.get(&word, 0).unwrap() & bit, 0, "the new backend's port is marked");
    assert_eq!(dp.drops(), 0);
}

/// A new handle on the datapath's map `name`.
fn map_data(ebpf: &Ebpf, name: &str) -> MapData {
    let id = match ebpf.map(name).unwrap_or_else(|| panic!("no map {name}")) {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::LruHashMap(d)
        | Map::LpmTrie(d) => d.info().unwrap().id(),
        other => panic!("{name}: {other:?}"),
    };
    MapData::from_id(id).unwrap()
}

#[test]
fn an_interface_is_counted_in_its_own_slot_once_it_has_one_and_forgotten_once_gone() {
    root_or_skip!();
    // BPF_PROG_TEST_RUN hands the programs the loopback device.
    const LOOPBACK: u32 = 1;
    let dp = Datapath::new(1);
    let inspected = || Maps::open(|name| Ok(map_data(&dp.ebpf, name))).unwrap();
    let translated = || {
        let devices = inspected().devices();
        let lo = devices.iter().find(|d| d.ifindex == LOOPBACK);
        lo.map(|d| (d.hooks["tc_ingress"].translated, d.hooks["tc_egress"].reverse_translated))
    };
    let exchange = |port: u16| {
        let (_, out) = dp.run(&tcp_frame((CLIENT, port), (VIP, 80), TCP_SYN, b""));
        assert_eq!(View(&out).dst(), BACKENDS[0]);
        dp.to_pod(&tcp_frame((BACKENDS[0], 8080), (CLIENT, port), TCP_SYN | TCP_ACK, b""));
    };
    let map_entry = |hook: u8| -> u64 {
        let m: PerCpuHashMap<_, DeviceKey, DeviceCounts> =
            PerCpuHashMap::try_from(dp.ebpf.map(abi::DEVICE_COUNTS).unwrap()).unwrap();
        m.get(&DeviceKey::new(LOOPBACK, hook), 0)
            .map_or(0, |v| v.iter().map(|c| c.translated + c.reverse_translated).sum())
    };
    let mut counts = Slots::new(
        PerCpuHashMap::try_from(Map::PerCpuHashMap(map_data(&dp.ebpf, abi::DEVICE_COUNTS))).unwrap(),
        Array::try_from(Map::Array(map_data(&dp.ebpf, abi::DEVICE_OWNERS))).unwrap(),
        PerCpuArray::try_from(Map::PerCpuArray(map_data(&dp.ebpf, abi::DEVICE_SLOTS))).unwrap(),
    );

    // Before the agent gives it its slot: counted in the map.
    exchange(40_001);
    assert_eq!((map_entry(hook::TC_INGRESS), map_entry(hook::TC_EGRESS)), (1, 1));
    assert_eq!(translated(), Some((1, 1)));

    // With its slot: counted there, the map's counts kept and added.
    let present = BTreeMap::from([("lo".to_string(), LOOPBACK)]);
    counts.follow(&present, [LOOPBACK]);
    exchange(40_002);
    exchange(40_003);
    assert_eq!((map_entry(hook::TC_INGRESS), map_entry(hook::TC_EGRESS)), (1, 1), "the map untouched");
    assert_eq!(translated(), Some((3, 3)));

    // Gone: its slot and its entries both go.
    counts.follow(&BTreeMap::new(), []);
    assert_eq!(translated(), None);
    assert_eq!((map_entry(hook::TC_INGRESS), map_entry(hook::TC_EGRESS)), (0, 0));
    // Back (as an interface given the same slot would be): from zero.
    counts.follow(&present, [LOOPBACK]);
    exchange(40_004);
    assert_eq!(translated(), Some((1, 1)));
    assert_eq!(dp.drops(), 0);
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    assert!(ok, "sched_getaffinity: {}", std::io::Error::last_os_error());
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Keeps the calling thread on `cpu`.
fn pin_to(cpu: usize) {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let ok = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } == 0;
    assert!(ok, "sched_setaffinity({cpu}): {}", std::io::Error::last_os_error());
}

#[test]
fn per_cpu_maps_grow_by_less_than_a_mebibyte_per_cpu() {
    root_or_skip!();
    let ebpf = ebpf::load(MapSizes::default()).expect("load");
    // The kernel keeps max_entries values, each rounded up to 8 bytes, for
    // every possible CPU in a per-CPU map.
    let mut per_cpu: Vec<(String, u64)> = ebpf
        .maps()
        .filter_map(|(name, map)| match map {
            Map::PerCpuArray(d) | Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) | Map::PerCpuCgroupStorage(d) => {
                let info = d.info().expect("map info");
                Some((name.to_string(), info.max_entries() as u64 * (info.value_size() as u64).next_multiple_of(8)))
            }
            _ => None,
        })
        .collect();
    per_cpu.sort();
    assert!(per_cpu.iter().any(|(name, _)| name == abi::COUNTERS), "the counters are per-CPU: {per_cpu:?}");
    let total: u64 = per_cpu.iter().map(|(_, bytes)| bytes).sum();
    assert!(total < 1 << 20, "{total} bytes more for every CPU at the default sizes, from {per_cpu:?}");
}

/// A small deterministic generator (xorshift64), so a failure names a seed
/// that reproduces it.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The frames the mutations start from: requests to Service ports and to
/// other ports, replies from backends, an ICMP error quoting a flow, and
/// fragments.
fn templates() -> Vec<Vec<u8>> {
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&packet::View(&tcp_frame((BACKENDS[0], 8080), (CLIENT, 40000), TCP_ACK, b"")).0[14..42]);
    let mut frag = Ip::new(CLIENT, VIP, 17);
    frag.frag = 0x2000;
    let mut options = Ip::new(CLIENT, VIP, 6);
    options.options = vec![1, 1, 1, 0];
    vec![
        tcp_frame((CLIENT, 40000), (VIP, 80), TCP_SYN, b""),
        tcp_frame((CLIENT, 40001), (VIP, 80), TCP_ACK, b"hello"),
        udp_frame((CLIENT, 40002), (VIP, 53), b"query"),
        tcp_frame((CLIENT, 40003), (EMPTY_VIP, 80), TCP_SYN, b""),
        udp_frame((CLIENT, 40004), (EMPTY_VIP, 53), b"query"),
        tcp_frame((CLIENT, 40005), (VIP, 443), TCP_SYN, b""),
        tcp_frame((CLIENT, 40006), (BACKENDS[1], 8080), TCP_SYN, b""),
        tcp_frame((BACKENDS[0], 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK, b""),
        udp_frame((BACKENDS[1], 5353), (CLIENT, 40002), b"answer"),
        ethernet(0x0800, &Ip::new(BACKENDS[0], CLIENT, 1).packet(&icmp)),
        ethernet(0x0800, &frag.packet(&packet::udp_datagram(&frag, 40007, 53, b"part", true))),
        ethernet(0x0800, &options.packet(&packet::tcp_segment(&options, 40008, 80, 1, TCP_SYN, b""))),
    ]
}

/// Changes one thing about `f` the way a broken or hostile sender would.
fn mutate(f: &mut Vec<u8>, rng: &mut Random) {
    let ip = 14;
    match rng.below(8) {
        // The kernel's test run takes no frame shorter than an Ethernet header.
        0 => f.truncate(ip + rng.below(f.len() - ip + 1)),
        1 if f.len() > ip => f[ip] = 0x40 | rng.below(16) as u8,
        2 if f.len() > ip + 4 => {
            let len = rng.next() as u16;
            f[ip + 2..ip + 4].copy_from_slice(&len.to_be_bytes());
        }
        3 if f.len() > ip + 8 => {
            let frag = [rng.next() as u8 & 0x3f, rng.next() as u8];
            f[ip + 6..ip + 8].copy_from_slice(&frag);
        }
        4 if f.len() > ip + 10 => f[ip + 9] = [1, 6, 17, 47, 132, rng.next() as u8][rng.below(6)],
        5 => f.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        6 if !f.is_empty() => {
            let at = rng.below(f.len().min(80));
            f[at] = rng.next() as u8;
        }
        _ => {
            let len = f.len();
            if len > ip + 24 {
                // Bytes inside the L4 header (ports, flags, ICMP's quote).
                let at = ip + 20 + rng.below((len - ip - 20).min(36));
                f[at] = rng.next() as u8;
            }
        }
    }
}

/// What a rewritten frame must have been: a well-formed IPv4 packet to a
/// Service frontend (translated or refused), or from a backend's target
/// port (a tracked reply, or an ICMP error quoting one).
fn may_be_rewritten(f: &[u8]) -> bool {
    let Some(ip) = f.get(14..34) else { return false };
    let (src, dst) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let ports =
        f.get(14 + hlen..14 + hlen + 4).map(|p| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])));
    let to_frontend =
        [VIP, EMPTY_VIP].contains(&dst) && matches!((ip[9], ports), (6, Some((_, 80))) | (17, Some((_, 53))));
    let from_backend = BACKENDS.contains(&src) && (matches!(ports, Some((8080 | 5353, _))) || ip[9] == 1);
    // A later fragment of a datagram whose first fragment was translated: its ports are elsewhere.
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    let translatable_piece = later_fragment && ([VIP, EMPTY_VIP].contains(&dst) || BACKENDS.contains(&src));
    ip[0] >> 4 == 4 && (to_frontend || from_backend || translatable_piece)
}

/// Runs 6,000 frames, each `templates`' one changed one to three times by
/// `mutate`, through what a pod sends (ingress) and what the node delivers
/// to one (egress): every verdict is one the programs give, the kernel's
/// test run refuses only frames shorter than `shortest` (it wants an IP
/// header before the program sees them), every drop is counted under one
/// reason, and a frame is rewritten only where `may_be_rewritten` allows.
/// Returns how many runs were shot and how many rewrote their frame.
fn fuzz(
    dp: &Datapath,
    seed: u64,
    templates: &[Vec<u8>],
    mutate: fn(&mut Vec<u8>, &mut Random),
    may_be_rewritten: fn(&[u8]) -> bool,
    shortest: usize,
) -> (u64, u64) {
    let mut rng = Random(seed);
    let (mut shot, mut rewritten) = (0u64, 0u64);
    for i in 0..6000 {
        let mut frame = templates[rng.below(templates.len())].clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut frame, &mut rng);
        }
        for program in [FROM_POD, TO_POD] {
            let Ok((verdict, out)) = dp.try_run(program, &frame) else {
                assert!(frame.len() < shortest, "frame {i} (seed {seed:#x}) refused by the test run: {frame:02x?}");
                continue;
            };
            assert!(
                [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict),
                "frame {i} (seed {seed:#x}): {program} said {verdict} for {frame:02x?}"
            );
            if verdict == TC_ACT_SHOT {
                shot += 1;
            } else if out != frame {
                rewritten += 1;
                assert!(
                    may_be_rewritten(&frame),
                    "frame {i} (seed {seed:#x}) rewritten by {program}:\n{frame:02x?}\n{out:02x?}"
                );
            }
        }
    }
    assert_eq!(dp.drops(), shot, "every drop counted under one reason");
    (shot, rewritten)
}

#[test]
fn mutated_frames_are_never_mistranslated_and_every_drop_is_counted() {
    root_or_skip!();
    let dp = Datapath::new(2);
    let (shot, rewritten) = fuzz(&dp, 0x6b70_7221, &templates(), mutate, may_be_rewritten, 14 + 20);
    // The run exercised both outcomes, not only one.
    assert!(shot > 0 && rewritten > 0, "shot {shot}, rewritten {rewritten}");
}

// IPv6: the same programs on IPv6 frames to the IPv6 service map.

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const EMPTY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x21);
const BACKENDS6: [Ipv6Addr; 2] =
    [Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x11), Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x12)];
/// Where the transport header of an IPv6 frame without extension headers starts.
const L4_6: usize = 14 + 40;
const HOP_BY_HOP: u8 = 0;
const DEST_OPTS: u8 = 60;
const FRAGMENT: u8 = 44;

impl Datapath {
    /// VIP6:80/TCP -> `n` backends:8080, VIP6:53/UDP -> backends:5353, and
    /// EMPTY_VIP6:80/TCP and :53/UDP without endpoints.
    fn services6(&mut self, n: usize) {
        self.service6(VIP6, 80, abi::PROTO_TCP, 11, &BACKENDS6[..n], 8080);
        self.service6(VIP6, 53, abi::PROTO_UDP, 12, &BACKENDS6[..n], 5353);
        self.service6(EMPTY_VIP6, 80, abi::PROTO_TCP, 13, &[], 0);
        self.service6(EMPTY_VIP6, 53, abi::PROTO_UDP, 14, &[], 0);
    }

    fn service6(&mut self, vip: Ipv6Addr, port: u16, proto: u8, id: u32, backends: &[Ipv6Addr], target: u16) {
        let mut svcs: HashMap<_, ServiceKey6, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(abi::SERVICES6).unwrap()).unwrap();
        let value = ServiceValue { id, backend_set: id, backend_count: backends.len() as u32, ..ServiceValue::MARKER };
        svcs.insert(ServiceKey6::new(vip.octets(), port, proto), value, 0).unwrap();
        svcs.insert(ServiceKey6::vip_marker(vip.octets()), ServiceValue::MARKER, 0).unwrap();
        let mut bes: HashMap<_, BackendKey, Backend6> =
            HashMap::try_from(self.ebpf.map_mut(abi::BACKENDS6).unwrap()).unwrap();
        for (slot, b) in backends.iter().enumerate() {
            bes.insert(BackendKey { set: id, slot: slot as u32 }, Backend6::new((*b).into(), target), 0).unwrap();
        }
    }

    /// IPv6 frontend `id`'s traffic, and its backend `backend`'s.
    fn traffic6(&self, id: u32, backend: (Ipv6Addr, u16)) -> (Option<Traffic>, Option<Traffic>) {
        traffic6(&self.ebpf, id, backend)
    }

    fn ct6_entries(&self, table: &str) -> usize {
        let m: HashMap<_, FlowKey6, CtEntry6> = HashMap::try_from(self.ebpf.map(table).unwrap()).unwrap();
        m.keys().filter(Result::is_ok).count()
    }
}

/// IPv6 frontend `id`'s traffic in `ebpf`'s maps, and its backend `backend`'s.
fn traffic6(ebpf: &Ebpf, id: u32, backend: (Ipv6Addr, u16)) -> (Option<Traffic>, Option<Traffic>) {
    let services: HashMap<_, u32, Traffic> = HashMap::try_from(ebpf.map(abi::SERVICE_TRAFFIC6).unwrap()).unwrap();
    let backends: HashMap<_, BackendTrafficKey6, Traffic> =
        HashMap::try_from(ebpf.map(abi::BACKEND_TRAFFIC6).unwrap()).unwrap();
    let key = BackendTrafficKey6::new(id, backend.0.into(), backend.1.to_be_bytes());
    (services.get(&id, 0).ok(), backends.get(&key, 0).ok())
}

fn tcp6(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&1000u32.to_be_bytes());
    h[12] = 0x50;
    h[13] = flags;
    h[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn udp6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// The upper-layer checksum of `l4` (protocol `proto`) between `src` and `dst`.
fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    proxy_common::checksum::finish(proxy_common::checksum::add_bytes(
        proxy_common::checksum::pseudo_header_sum6(src.octets(), dst.octets(), proto, l4.len() as u16),
        l4,
    ))
}

/// An IPv6 frame from `src` to `dst`: the extension headers `exts` (each
/// its type and bytes, the next-header byte filled in), then `proto`'s
/// `l4` with its checksum filled in.
fn frame6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[(u8, Vec<u8>)], proto: u8, mut l4: Vec<u8>) -> Vec<u8> {
    let check = if proto == 6 { 16 } else { 6 };
    if l4.len() >= check + 2 && proto != 58 {
        l4[check..check + 2].copy_from_slice(&[0, 0]);
        let c = checksum6(src, dst, proto, &l4);
        l4[check..check + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut chain = Vec::new();
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut bytes = bytes.clone();
        bytes[0] = exts.get(i + 1).map_or(proto, |e| e.0);
        chain.extend(bytes);
    }
    let first = exts.first().map_or(proto, |e| e.0);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend(((chain.len() + l4.len()) as u16).to_be_bytes());
    ip.extend([first, 64]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(chain);
    ip.extend(l4);
    ethernet(0x86dd, &ip)
}

/// An extension header of `len` bytes (a multiple of 8), its length byte set.
fn ext(len: usize) -> Vec<u8> {
    let mut e = vec![0u8; len];
    e[1] = (len / 8 - 1) as u8;
    // A PadN option over the rest, so the options are well formed.
    e[2] = 1;
    e[3] = (len - 4) as u8;
    e
}

fn src6(f: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).unwrap())
}

fn dst6(f: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap())
}

fn ports(f: &[u8], l4: usize) -> (u16, u16) {
    (u16::from_be_bytes([f[l4], f[l4 + 1]]), u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]))
}

/// Whether the transport checksum of the IPv6 frame `f`, whose transport
/// header (protocol `proto`) starts at `l4`, verifies.
fn checksum6_ok(f: &[u8], l4: usize, proto: u8) -> bool {
    checksum6(src6(f), dst6(f), proto, &f[l4..]) == 0
}

#[test]
fn ipv6_requests_and_replies_are_translated_with_checksums_over_the_pseudo_header() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    let syn = frame6(CLIENT6, VIP6, &[], 6, tcp6(40000, 80, TCP_SYN, b""));
    let (verdict, out) = dp.run(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((src6(&out), dst6(&out), ports(&out, L4_6)), (CLIENT6, BACKENDS6[0], (40000, 8080)));
    assert!(checksum6_ok(&out, L4_6, 6), "TCP checksum after DNAT");
    let reply = frame6(BACKENDS6[0], CLIENT6, &[], 6, tcp6(8080, 40000, TCP_SYN | TCP_ACK, b""));
    let (verdict, out) = dp.to_pod(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((src6(&out), dst6(&out), ports(&out, L4_6)), (VIP6, CLIENT6, (80, 40000)));
    assert!(checksum6_ok(&out, L4_6, 6), "TCP checksum after the reverse translation");

    let query = frame6(CLIENT6, VIP6, &[], 17, udp6(40001, 53, b"a question"));
    let (_, out) = dp.run(&query);
    assert_eq!((dst6(&out), ports(&out, L4_6)), (BACKENDS6[0], (40001, 5353)));
    assert!(checksum6_ok(&out, L4_6, 17), "UDP checksum after DNAT");
    let answer = frame6(BACKENDS6[0], CLIENT6, &[], 17, udp6(5353, 40001, b"an answer"));
    let (_, out) = dp.to_pod(&answer);
    assert_eq!((src6(&out), ports(&out, L4_6)), (VIP6, (53, 40001)));
    assert!(checksum6_ok(&out, L4_6, 17), "UDP checksum after the reverse translation");

    // Each flow tracked both ways in its protocol's IPv6 table.
    assert_eq!((dp.ct6_entries(ct::CT6_TCP), dp.ct6_entries(ct::CT6_ANY)), (2, 2));
    assert_eq!((dp.counter(Counter::Translated), dp.counter(Counter::ReverseTranslated)), (2, 2));
    // A backend's packet to a client that no flow chose it for is left alone.
    let stray = frame6(BACKENDS6[0], CLIENT6, &[], 6, tcp6(8080, 40009, TCP_ACK, b""));
    assert_eq!(dp.to_pod(&stray), (TC_ACT_OK, stray.clone()));
    assert_eq!(dp.drops(), 0);
}

#[test]
fn ipv6_traffic_is_counted_per_service_and_backend_in_both_directions() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    let syn = frame6(CLIENT6, VIP6, &[], 6, tcp6(40010, 80, TCP_SYN, b""));
    let reply = frame6(BACKENDS6[0], CLIENT6, &[], 6, tcp6(8080, 40010, TCP_SYN | TCP_ACK, b""));
    let data = frame6(CLIENT6, VIP6, &[], 6, tcp6(40010, 80, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n"));
    assert_eq!(dp.run(&syn).0, TC_ACT_OK);
    assert_eq!(dp.to_pod(&reply).0, TC_ACT_OK);
    assert_eq!(dp.run(&data).0, TC_ACT_OK);
    let want = Traffic { packets: 3, bytes: (syn.len() + reply.len() + data.len()) as u64 };
    assert_eq!(dp.traffic6(11, (BACKENDS6[0], 8080)), (Some(want), Some(want)), "the frontend and its backend");
    // Its own ids: IPv4's frontend 11 (none here) and IPv6's 12 count nothing.
    assert_eq!(dp.service_traffic(11), Traffic::default());
    assert_eq!(dp.traffic6(12, (BACKENDS6[0], 5353)), (None, None));
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    // Hop-by-hop options, then destination options, then TCP.
    let exts = [(HOP_BY_HOP, ext(8)), (DEST_OPTS, ext(16))];
    let syn = frame6(CLIENT6, VIP6, &exts, 6, tcp6(40002, 80, TCP_SYN, b""));
    let (verdict, out) = dp.run(&syn);
    let l4 = L4_6 + 24;
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((dst6(&out), ports(&out, l4)), (BACKENDS6[0], (40002, 8080)));
    assert_eq!(&out[..l4], &[&syn[..38], &BACKENDS6[0].octets()[..], &syn[54..l4]].concat()[..], "headers kept");
    assert!(checksum6_ok(&out, l4, 6));
    // An atomic fragment (offset 0, no more) is a whole datagram.
    let atomic = [(FRAGMENT, vec![0u8; 8])];
    let query = frame6(CLIENT6, VIP6, &atomic, 17, udp6(40003, 53, b"whole"));
    let (_, out) = dp.run(&query);
    assert_eq!((dst6(&out), ports(&out, L4_6 + 8)), (BACKENDS6[0], (40003, 5353)));
    assert!(checksum6_ok(&out, L4_6 + 8, 17));
    assert_eq!(dp.counter(Counter::Translated), 2);
}

/// IPv6 frames the per-packet path cannot translate, to `dst`: an
/// extension header longer than the payload, more extension headers than
/// are walked, a TCP header cut short, a later fragment whose first was
/// never seen; and one whose payload length the frame does not hold.
fn untranslatable6(dst: Ipv6Addr) -> ([Vec<u8>; 4], Vec<u8>) {
    let syn = || tcp6(40004, 80, TCP_SYN, b"");
    let mut long_ext = frame6(CLIENT6, dst, &[(HOP_BY_HOP, ext(8))], 6, syn());
    long_ext[L4_6 + 1] = 200;
    let many: Vec<(u8, Vec<u8>)> = (0..5).map(|_| (DEST_OPTS, ext(8))).collect();
    let deep = frame6(CLIENT6, dst, &many, 6, syn());
    let mut short = frame6(CLIENT6, dst, &[], 6, syn()[..10].to_vec());
    short.truncate(L4_6 + 10);
    let later = [(FRAGMENT, vec![0, 0, 0x05, 0, 0, 0, 0, 7])];
    let fragment = frame6(CLIENT6, dst, &later, 17, b"the rest of a datagram".to_vec());
    let mut long = frame6(CLIENT6, dst, &[], 6, syn());
    long[18..20].copy_from_slice(&1400u16.to_be_bytes());
    ([long_ext, deep, short, fragment], long)
}

#[test]
fn untranslatable_ipv6_frames_to_a_vip_are_dropped_and_others_pass_counted() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    // To a VIP: dropped, each counted under its reason, as IPv4's.
    let ([long_ext, deep, short, fragment], long) = untranslatable6(VIP6);
    for frame in [&long_ext, &deep, &short, &fragment] {
        assert_eq!(dp.run(frame).0, TC_ACT_SHOT, "from a pod: {frame:02x?}");
    }
    assert_eq!((dp.counter(Counter::DroppedTruncated), dp.counter(Counter::DroppedFragment)), (3, 1));
    // A payload length the frame does not hold says nothing trustworthy: the node drops it.
    assert_eq!(dp.run(&long), (TC_ACT_OK, long.clone()));
    assert_eq!(dp.drops(), 4);

    // To anything else: passed as they came, counted.
    let (frames, long) = untranslatable6(BACKENDS6[1]);
    for frame in frames.iter().chain([&long]) {
        assert_eq!(dp.run(frame), (TC_ACT_OK, frame.clone()), "from a pod: {frame:02x?}");
        assert_eq!(dp.to_pod(frame), (TC_ACT_OK, frame.clone()), "to a pod: {frame:02x?}");
    }
    assert_eq!(dp.counter(Counter::PassedMalformed), 1 + 2 * 4);
    assert_eq!(dp.counter(Counter::PassedFragment), 2);
    // ICMPv6 Neighbor Solicitation and echo request, and a routing header
    // with a segment left (the VIP is not its final destination), to the
    // VIP: not the per-packet path's, passed as they came.
    let ns = frame6(CLIENT6, VIP6, &[], 58, vec![135, 0, 0, 0, 0, 0, 0, 0]);
    let echo = frame6(CLIENT6, VIP6, &[], 58, vec![128, 0, 0, 0, 0, 1, 0, 1]);
    let routed = frame6(CLIENT6, VIP6, &[(43, vec![0, 0, 4, 1, 0, 0, 0, 0])], 6, tcp6(40005, 80, TCP_SYN, b""));
    for frame in [&ns, &echo, &routed] {
        assert_eq!(dp.run(frame), (TC_ACT_OK, frame.clone()), "from a pod: {frame:02x?}");
        assert_eq!(dp.to_pod(frame), (TC_ACT_OK, frame.clone()), "to a pod: {frame:02x?}");
    }
    assert_eq!((dp.counter(Counter::Translated), dp.drops()), (0, 4));
}

#[test]
fn ipv6_to_an_empty_service_is_refused_with_a_reset_or_icmpv6_port_unreachable() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    let syn = frame6(CLIENT6, EMPTY_VIP6, &[], 6, tcp6(40006, 80, TCP_SYN, b""));
    let (verdict, out) = dp.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the pod");
    assert_eq!(out.len(), 14 + 40 + 20);
    assert_eq!((&out[0..6], &out[6..12]), (&packet::POD_MAC[..], &packet::GATEWAY_MAC[..]));
    assert_eq!((src6(&out), dst6(&out), ports(&out, L4_6)), (EMPTY_VIP6, CLIENT6, (80, 40006)));
    assert_eq!(out[L4_6 + 13], 0x14, "RST|ACK");
    assert_eq!(u32::from_be_bytes(out[L4_6 + 8..L4_6 + 12].try_into().unwrap()), 1001, "acks the SYN");
    assert!(checksum6_ok(&out, L4_6, 6));

    let query = frame6(CLIENT6, EMPTY_VIP6, &[], 17, udp6(40007, 53, b"a question of some length"));
    let (verdict, out) = dp.run(&query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 8 + 48);
    assert_eq!((out[20], src6(&out), dst6(&out)), (58, EMPTY_VIP6, CLIENT6));
    assert_eq!(&out[L4_6..L4_6 + 2], &[1, 4], "destination unreachable, port unreachable");
    assert_eq!(&out[L4_6 + 8..], &query[14..62], "quotes the IPv6 and UDP headers");
    assert!(checksum6_ok(&out, L4_6, 58), "ICMPv6 checksum over the pseudo header");
    assert_eq!(dp.counter(Counter::RefusedNoBackend), 2);

    // With an extension header the answers' layout does not fit: dropped, counted.
    let hop = frame6(CLIENT6, EMPTY_VIP6, &[(HOP_BY_HOP, ext(8))], 6, tcp6(40008, 80, TCP_SYN, b""));
    assert_eq!(dp.run(&hop).0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DroppedNoBackend), 1);
}

/// `datagram` (a UDP header and payload between `src` and `dst`, its
/// checksum filled in) in two IPv6 fragments, the first holding `first`
/// bytes of it (a multiple of 8).
fn fragments6(src: Ipv6Addr, dst: Ipv6Addr, datagram: &[u8], first: usize) -> [Vec<u8>; 2] {
    let mut datagram = datagram.to_vec();
    let c = checksum6(src, dst, 17, &datagram);
    datagram[6..8].copy_from_slice(&c.to_be_bytes());
    let header = |offset: usize, more: bool| {
        let field = (offset as u16) | u16::from(more);
        let mut h = vec![17, 0];
        h.extend(field.to_be_bytes());
        h.extend(0x6b70_7201u32.to_be_bytes());
        h
    };
    let piece = |offset: usize, more: bool, bytes: &[u8]| {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend(((8 + bytes.len()) as u16).to_be_bytes());
        ip.extend([FRAGMENT, 64]);
        ip.extend(src.octets());
        ip.extend(dst.octets());
        ip.extend(header(offset, more));
        ip.extend(bytes);
        ethernet(0x86dd, &ip)
    };
    [piece(0, true, &datagram[..first]), piece(first, false, &datagram[first..])]
}

/// Whether the UDP checksum of a datagram in two IPv6 fragments verifies
/// once reassembled, between the addresses the fragments now carry.
fn reassembled6_ok(pieces: &[Vec<u8>; 2]) -> bool {
    let datagram = [&pieces[0][L4_6 + 8..], &pieces[1][L4_6 + 8..]].concat();
    checksum6(src6(&pieces[0]), dst6(&pieces[0]), 17, &datagram) == 0
}

#[test]
fn fragmented_ipv6_datagrams_are_translated_whole() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    let query = udp6(44000, 53, &[7u8; 100]);
    let [first, later] = fragments6(CLIENT6, VIP6, &query, 48);
    let (verdict, first_out) = dp.run(&first);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((dst6(&first_out), ports(&first_out, L4_6 + 8)), (BACKENDS6[0], (44000, 5353)));
    let (verdict, later_out) = dp.run(&later);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(dst6(&later_out), BACKENDS6[0], "the later fragment follows its first");
    assert_eq!(&later_out[L4_6..], &later[L4_6..], "its payload untouched");
    assert!(reassembled6_ok(&[first_out, later_out]), "the datagram's checksum after DNAT");

    // The backend's fragmented answer goes back as the frontend's.
    let answer = udp6(5353, 44000, &[9u8; 120]);
    let [first, later] = fragments6(BACKENDS6[0], CLIENT6, &answer, 64);
    let (_, first_out) = dp.to_pod(&first);
    let (_, later_out) = dp.to_pod(&later);
    assert_eq!((src6(&first_out), ports(&first_out, L4_6 + 8)), (VIP6, (53, 44000)));
    assert_eq!(src6(&later_out), VIP6);
    assert!(reassembled6_ok(&[first_out, later_out]), "the datagram's checksum after the reverse translation");
    assert_eq!((dp.counter(Counter::Translated), dp.counter(Counter::ReverseTranslated)), (2, 2));
    assert_eq!(dp.drops(), 0);
}

/// An ICMPv6 error of `kind` and `code` from `src` to `dst` quoting
/// `quote` (an IPv6 packet), its checksum over the pseudo header filled in.
fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    // The last four header bytes: a packet too big's MTU (1280), else unused.
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0];
    icmp.extend_from_slice(quote);
    let c = checksum6(src, dst, 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    frame6(src, dst, &[], 58, icmp)
}

#[test]
fn icmpv6_errors_about_a_translated_flow_are_translated_quote_included() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    let quote = |f: &[u8]| f[14..].to_vec();
    // The backend's port unreachable about a datagram it got: to the
    // client, from the frontend, quoting the datagram as the client sent it.
    let query = frame6(CLIENT6, VIP6, &[], 17, udp6(42001, 53, b"a question"));
    let (_, sent) = dp.run(&query);
    let (verdict, out) = dp.to_pod(&icmp6_error(BACKENDS6[0], CLIENT6, 1, 4, &quote(&sent)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((src6(&out), dst6(&out)), (VIP6, CLIENT6), "from the frontend");
    assert_eq!(&out[L4_6 + 8..], &query[14..], "quotes what the client sent, checksum included");
    assert!(checksum6_ok(&out, L4_6, 58), "ICMPv6 checksum over the pseudo header and the quote");

    // A router's packet too big about a TCP segment keeps the router's address.
    let router: Ipv6Addr = "fd00:244::1".parse().unwrap();
    let segment = frame6(CLIENT6, VIP6, &[], 6, tcp6(42002, 80, TCP_ACK, b"a large request"));
    let (_, sent) = dp.run(&segment);
    let (_, out) = dp.to_pod(&icmp6_error(router, CLIENT6, 2, 0, &quote(&sent)));
    assert_eq!((src6(&out), &out[L4_6 + 8..]), (router, &segment[14..]), "packet too big: {out:02x?}");
    assert!(checksum6_ok(&out, L4_6, 58));

    // The client's error about a reply it got from the frontend goes to the backend.
    let answer = frame6(BACKENDS6[0], CLIENT6, &[], 17, udp6(5353, 42001, b"an answer"));
    let (_, got) = dp.to_pod(&answer);
    let (_, out) = dp.run(&icmp6_error(CLIENT6, VIP6, 1, 4, &quote(&got)));
    assert_eq!((src6(&out), dst6(&out)), (CLIENT6, BACKENDS6[0]), "to the backend");
    assert_eq!(&out[L4_6 + 8..], &answer[14..], "quotes what the backend sent");
    assert!(checksum6_ok(&out, L4_6, 58));
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 3);

    // An error about a flow no one tracks passes as it came.
    let direct = frame6(CLIENT6, BACKENDS6[0], &[], 17, udp6(42009, 5353, b"direct"));
    let stray = icmp6_error(BACKENDS6[0], CLIENT6, 1, 4, &quote(&direct));
    assert_eq!(dp.to_pod(&stray), (TC_ACT_OK, stray.clone()));
    assert_eq!((dp.counter(Counter::IcmpErrorTranslated), dp.drops()), (3, 0));
}

#[test]
fn an_ipv6_pod_that_is_its_own_backend_is_answered_through_the_hairpin_address() {
    root_or_skip!();
    let mut dp = Datapath::new(1);
    dp.services6(1);
    let pod = BACKENDS6[0];
    let hairpin = Ipv6Addr::from(abi::HAIRPIN_SOURCE6);
    let swapped = |out: &[u8], sent: &[u8]| out[..6] == sent[6..12] && out[6..12] == sent[..6];
    let flows: [(Vec<u8>, u16, Vec<u8>, u8); 2] = [
        (
            frame6(pod, VIP6, &[], 6, tcp6(43000, 80, TCP_SYN, b"")),
            8080,
            frame6(pod, hairpin, &[], 6, tcp6(8080, 43000, TCP_SYN | TCP_ACK, b"")),
            6,
        ),
        (
            frame6(pod, VIP6, &[], 17, udp6(43001, 53, b"query")),
            5353,
            frame6(pod, hairpin, &[], 17, udp6(5353, 43001, b"answer")),
            17,
        ),
    ];
    for (request, target, reply, proto) in flows {
        let (verdict, out) = dp.run(&request);
        assert_eq!(verdict, TC_ACT_REDIRECT, "straight back to the pod");
        let sport = ports(&request, L4_6).0;
        assert_eq!((src6(&out), dst6(&out), ports(&out, L4_6)), (hairpin, pod, (sport, target)));
        assert!(checksum6_ok(&out, L4_6, proto) && swapped(&out, &request));
        assert_eq!(dp.to_pod(&out), (TC_ACT_OK, out.clone()), "the egress program leaves it alone");

        // The pod's answer leaves it for the hairpin address, and goes back as the frontend's.
        let (verdict, out) = dp.run(&reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!((src6(&out), dst6(&out)), (VIP6, pod), "from the frontend");
        assert_eq!(ports(&out, L4_6), (ports(&request, L4_6).1, sport));
        assert!(checksum6_ok(&out, L4_6, proto) && swapped(&out, &reply));
    }
    assert_eq!((dp.counter(Counter::Translated), dp.counter(Counter::ReverseTranslated)), (2, 2));
    // A packet to the hairpin address in no tracked flow is the node's business.
    let stray = frame6(BACKENDS6[1], hairpin, &[], 6, tcp6(8080, 43999, TCP_ACK, b"x"));
    assert_eq!(dp.run(&stray), (TC_ACT_OK, stray.clone()));
    assert_eq!(dp.drops(), 0);
}

/// IPv6 frames the mutations start from, as `templates` for IPv4.
fn templates6() -> Vec<Vec<u8>> {
    vec![
        frame6(CLIENT6, VIP6, &[], 6, tcp6(41000, 80, TCP_SYN, b"")),
        frame6(CLIENT6, VIP6, &[], 6, tcp6(41001, 80, TCP_ACK, b"hello")),
        frame6(CLIENT6, VIP6, &[], 17, udp6(41002, 53, b"query")),
        frame6(CLIENT6, VIP6, &[(HOP_BY_HOP, ext(8)), (DEST_OPTS, ext(16))], 6, tcp6(41003, 80, TCP_SYN, b"")),
        frame6(CLIENT6, EMPTY_VIP6, &[], 6, tcp6(41004, 80, TCP_SYN, b"")),
        frame6(CLIENT6, EMPTY_VIP6, &[], 17, udp6(41005, 53, b"query")),
        fragments6(CLIENT6, VIP6, &udp6(41006, 53, &[5u8; 40]), 24)[0].clone(),
        fragments6(CLIENT6, VIP6, &udp6(41006, 53, &[5u8; 40]), 24)[1].clone(),
        frame6(BACKENDS6[0], CLIENT6, &[], 6, tcp6(8080, 41000, TCP_SYN | TCP_ACK, b"")),
        frame6(BACKENDS6[1], CLIENT6, &[], 17, udp6(5353, 41002, b"answer")),
        frame6(CLIENT6, VIP6, &[], 58, vec![135, 0, 0, 0, 0, 0, 0, 0]),
        icmp6_error(
            BACKENDS6[0],
            CLIENT6,
            1,
            4,
            &frame6(CLIENT6, BACKENDS6[0], &[], 17, udp6(41002, 5353, b"query"))[14..],
        ),
    ]
}

/// Changes one thing about the IPv6 frame `f` the way a broken or hostile sender would.
fn mutate6(f: &mut Vec<u8>, rng: &mut Random) {
    let ip = 14;
    match rng.below(7) {
        0 => f.truncate(ip + rng.below(f.len() - ip + 1)),
        1 if f.len() > ip + 6 => {
            let len = rng.next() as u16 % 256;
            f[ip + 4..ip + 6].copy_from_slice(&len.to_be_bytes());
        }
        2 if f.len() > ip + 7 => f[ip + 6] = [0, 6, 17, 43, 44, 51, 58, 60, rng.next() as u8][rng.below(9)],
        // The next-header or length byte of whatever follows the fixed header.
        3 if f.len() > ip + 42 => f[ip + 40 + rng.below(2)] = rng.next() as u8,
        4 => f.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        5 if f.len() > ip => f[ip] = (rng.below(16) as u8) << 4,
        _ => {
            let at = rng.below(f.len().min(100));
            f[at] = rng.next() as u8;
        }
    }
}

/// What a rewritten IPv6 frame must have been: to a frontend (translated
/// or refused), or from a backend (a tracked reply).
fn may_be_rewritten6(f: &[u8]) -> bool {
    let hairpin = Ipv6Addr::from(abi::HAIRPIN_SOURCE6);
    let ends = |f: &[u8]| [VIP6, EMPTY_VIP6, hairpin].contains(&dst6(f)) || BACKENDS6.contains(&src6(f));
    // An ICMPv6 error may be about a tracked flow, whoever sends it.
    let quote = f.get(20) == Some(&58) && f.len() >= 54 + 8 + 40 && {
        let q = &f[54 + 8 - 14..];
        ends(q) || [VIP6, EMPTY_VIP6].contains(&src6(q)) || BACKENDS6.contains(&dst6(q))
    };
    f.len() >= 54 && f[14] >> 4 == 6 && (ends(f) || quote)
}

#[test]
fn mutated_ipv6_frames_are_never_mistranslated_and_every_drop_is_counted() {
    root_or_skip!();
    let mut dp = Datapath::new(2);
    dp.services6(2);
    let (shot, rewritten) = fuzz(&dp, 0x6b70_7236, &templates6(), mutate6, may_be_rewritten6, 14 + 40);
    assert!(rewritten > 0, "shot {shot}, rewritten {rewritten}");
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// The node, a client outside and the backend on another node, in the XDP tests' namespace.
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x10);
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const NEXT_NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x11);
const REMOTE_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11);
const OUTSIDE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const NEXT_NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];

/// The XDP program, run by BPF_PROG_TEST_RUN inside a namespace of its own
/// whose routes and neighbours its FIB lookups see: a device `x0` holding
/// the node's address, the next node and the client outside on its link.
struct Xdp {
    ebpf: Ebpf,
    ns: kpr_tests::netns::Netns,
    ifindex: u32,
    mac: [u8; 6],
}

impl Xdp {
    fn new() -> Self {
        let ns = kpr_tests::netns::Netns::new(&format!("{}xdp", kpr_tests::netns::unique_prefix())).unwrap();
        let (next, outside) = (NEXT_NODE6.to_string(), OUTSIDE6.to_string());
        #[rustfmt::skip]
        let setup: [&[&str]; 8] = [
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
            &["ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1"],
            &["ip", "link", "set", "x0", "up"],
            &["ip", "link", "set", "x1", "up"],
            &["ip", "-6", "addr", "add", "fd00:100::10/64", "dev", "x0", "nodad"],
            &["ip", "-6", "route", "add", "fd00:244:1::/64", "via", &next, "dev", "x0"],
            &["ip", "-6", "neigh", "replace", &next, "lladdr", "02:00:00:00:00:11", "dev", "x0", "nud", "permanent"],
            &["ip", "-6", "neigh", "replace", &outside, "lladdr", "02:00:00:00:00:01", "dev", "x0", "nud", "permanent"],
        ];
        for cmd in setup {
            ns.exec(cmd).unwrap();
        }
        let ifindex: u32 = ns.output(&["cat", "/sys/class/net/x0/ifindex"]).unwrap().trim().parse().unwrap();
        let mac = ns.output(&["cat", "/sys/class/net/x0/address"]).unwrap();
        let mac: Vec<u8> = mac.trim().split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        let mut ebpf = ebpf::load(MapSizes::default()).expect("load");
        mark_every_port(&mut ebpf);
        let prog: &mut aya::programs::Xdp = ebpf.program_mut(ebpf::XDP_PROGRAM).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("the verifier refuses the XDP program: {e}"));
        Self { ebpf, ns, ifindex, mac: mac.try_into().unwrap() }
    }

    /// An IPv6 node port: `NODE6:port` (`proto`) -> `REMOTE_BACKEND6:target`, under `flags`.
    fn node_port6(&mut self, port: u16, proto: u8, id: u32, target: u16, flags: u8) {
        let mut svcs: HashMap<_, ServiceKey6, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(abi::SERVICES6).unwrap()).unwrap();
        let value = ServiceValue {
            id,
            backend_set: id,
            backend_count: 1,
            kind: abi::kind::NODE_PORT_ADDRESS,
            flags,
            ..ServiceValue::MARKER
        };
        svcs.insert(ServiceKey6::new(NODE6.octets(), port, proto), value, 0).unwrap();
        let mut bes: HashMap<_, BackendKey, Backend6> =
            HashMap::try_from(self.ebpf.map_mut(abi::BACKENDS6).unwrap()).unwrap();
        bes.insert(BackendKey { set: id, slot: 0 }, Backend6::new(REMOTE_BACKEND6.into(), target), 0).unwrap();
    }

    /// Runs `frame`, come in on `x0`, through the XDP program in the namespace.
    fn run(self, frame: Vec<u8>) -> (Self, u32, Vec<u8>) {
        let (xdp, mut results) = self.run_all(vec![frame]);
        let (verdict, out) = results.pop().unwrap();
        (xdp, verdict, out)
    }

    /// [`Xdp::run`] for each of `frames`, in order (in one visit to the namespace).
    fn run_all(self, frames: Vec<Vec<u8>>) -> (Self, Vec<(u32, Vec<u8>)>) {
        let ns_name = self.ns.name().to_string();
        kpr_tests::netns::run_in(&ns_name, move || {
            let prog: &aya::programs::Xdp = self.ebpf.program(ebpf::XDP_PROGRAM).unwrap().try_into().unwrap();
            let results = frames
                .iter()
                .map(|frame| {
                    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
                    let md: Vec<u8> =
                        [0, frame.len() as u32, 0, self.ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
                    let mut out = vec![0u8; frame.len().max(512)];
                    let r = prog
                        .test_run(TestRunOptions {
                            data_in: Some(frame),
                            data_out: Some(&mut out),
                            ctx_in: Some(&md),
                            ..Default::default()
                        })
                        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?}: {e}"));
                    out.truncate(r.data_size_out as usize);
                    (r.return_value, out)
                })
                .collect();
            (self, results)
        })
        .unwrap()
    }

    fn counter(&self, c: Counter) -> u64 {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(abi::COUNTERS).unwrap()).unwrap();
        m.get(&(c as u32), 0).unwrap().iter().sum()
    }
}

fn macs(f: &[u8]) -> ([u8; 6], [u8; 6]) {
    (f[..6].try_into().unwrap(), f[6..12].try_into().unwrap())
}

/// XDP forwards IPv6 from outside to a node port whose backend is on
/// another node, both ways, without the node's stack: the request to the
/// backend from a NAT port of the node's address, the reply back to the
/// client from the node port, each with its hop limit less one, the next
/// hop's MAC addresses and a transport checksum that verifies, for TCP and
/// UDP. What XDP leaves to the TC programs passes untouched: a Local
/// policy's node port, extension headers, a frame cut short, a reply to
/// no flow it translated.
#[test]
fn xdp_forwards_ipv6_from_outside_both_ways() {
    root_or_skip!();
    let mut xdp = Xdp::new();
    xdp.node_port6(30080, abi::PROTO_TCP, 21, 8080, abi::flags::MASQUERADE);
    xdp.node_port6(29080, abi::PROTO_UDP, 22, 5353, abi::flags::MASQUERADE);
    xdp.node_port6(30081, abi::PROTO_TCP, 23, 8080, abi::flags::LOCAL);
    let (node_mac, ifindex) = (xdp.mac, xdp.ifindex);
    assert!(ifindex > 0);
    for (proto, port, target, l4) in
        [(6, 30080, 8080, tcp6(40000, 30080, TCP_SYN, b"")), (17, 29080, 5353, udp6(40001, 29080, b"query"))]
    {
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let request = frame6(OUTSIDE6, NODE6, &[], proto, l4);
        let (x, verdict, out) = xdp.run(request);
        xdp = x;
        assert_eq!(verdict, XDP_TX, "{proto}: {out:02x?}");
        let (src, dst, (nat_port, dport)) = (src6(&out), dst6(&out), ports(&out, L4_6));
        assert_eq!((src, dst, dport), (NODE6, REMOTE_BACKEND6, target), "{proto}");
        // Odd: even ones are left to the node's own connections (TCP's client port, 40000, is one).
        assert!(nat_port >= abi::NAT_PORT_MIN && nat_port % 2 == 1, "{proto}: NAT port {nat_port}");
        assert_eq!(out[21], 63, "{proto}: hop limit");
        assert_eq!(macs(&out), (NEXT_NODE_MAC, node_mac), "{proto}");
        assert!(checksum6_ok(&out, L4_6, proto), "{proto}: {out:02x?}");

        // The backend's reply, to the NAT port: back to the client, from the node port.
        let reply_l4 =
            if proto == 6 { tcp6(target, nat_port, TCP_SYN | TCP_ACK, b"") } else { udp6(target, nat_port, b"answer") };
        let (x, verdict, out) = xdp.run(frame6(REMOTE_BACKEND6, NODE6, &[], proto, reply_l4));
        xdp = x;
        assert_eq!(verdict, XDP_TX, "{proto} reply: {out:02x?}");
        assert_eq!((src6(&out), dst6(&out), ports(&out, L4_6)), (NODE6, OUTSIDE6, (port, sport)), "{proto} reply");
        assert_eq!(macs(&out), (OUTSIDE_MAC, node_mac), "{proto} reply");
        assert!(checksum6_ok(&out, L4_6, proto), "{proto} reply: {out:02x?}");
    }
    assert_eq!((xdp.counter(Counter::XdpForwarded), xdp.counter(Counter::XdpReplyForwarded)), (2, 2));
    // Each node port's request and reply, counted under its frontend and backend.
    for (id, target) in [(21, 8080), (22, 5353)] {
        let (total, backend) = traffic6(&xdp.ebpf, id, (REMOTE_BACKEND6, target));
        assert_eq!(total.map(|t| t.packets), Some(2), "frontend {id}");
        assert_eq!(backend, total, "frontend {id}");
    }

    // Left to the TC programs, untouched.
    let stray_reply = frame6(REMOTE_BACKEND6, NODE6, &[], 6, tcp6(8080, 40999, TCP_ACK, b""));
    let mut short = frame6(OUTSIDE6, NODE6, &[], 6, tcp6(40002, 30080, TCP_SYN, b""));
    short.truncate(L4_6 + 10);
    for frame in [
        frame6(OUTSIDE6, NODE6, &[], 6, tcp6(40003, 30081, TCP_SYN, b"")),
        frame6(OUTSIDE6, NODE6, &[(DEST_OPTS, ext(8))], 6, tcp6(40004, 30080, TCP_SYN, b"")),
        short,
        stray_reply,
    ] {
        let (x, verdict, out) = xdp.run(frame.clone());
        xdp = x;
        assert_eq!((verdict, out), (XDP_PASS, frame));
    }
    assert_eq!(xdp.counter(Counter::XdpForwarded), 2);
}

/// Where the XDP tests' node reaches the backends' node by a narrower way:
/// a device `y0` of MTU 1400, the next node on its link.
const NARROW_NEXT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, 0x11);

impl Xdp {
    /// The backends' node reached through `y0` (MTU 1400), and `x0` one of
    /// the node's devices, as the agent lists it.
    fn narrow_way_on(&mut self) {
        let next = NARROW_NEXT6.to_string();
        #[rustfmt::skip]
        let setup: [&[&str]; 6] = [
            &["ip", "link", "add", "y0", "mtu", "1400", "type", "veth", "peer", "name", "y1"],
            &["ip", "link", "set", "y0", "up"],
            &["ip", "link", "set", "y1", "up"],
            &["ip", "-6", "addr", "add", "fd00:101::10/64", "dev", "y0", "nodad"],
            &["ip", "-6", "route", "replace", "fd00:244:1::/64", "via", &next, "dev", "y0"],
            &["ip", "-6", "neigh", "replace", &next, "lladdr", "02:00:00:00:01:11", "dev", "y0", "nud", "permanent"],
        ];
        for cmd in setup {
            self.ns.exec(cmd).unwrap();
        }
        let mut devices: HashMap<_, u32, u8> = HashMap::try_from(self.ebpf.map_mut(abi::DEVICES).unwrap()).unwrap();
        devices.insert(self.ifindex, abi::hook::XDP_NATIVE, 0).unwrap();
        let prog: &mut SchedClassifier = self.ebpf.program_mut(FROM_POD).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("the verifier refuses {FROM_POD}: {e}"));
    }

    /// Runs `frame`, come in on `x0`, through the TC program on its ingress.
    fn run_tc(self, frame: Vec<u8>) -> (Self, u32, Vec<u8>) {
        let ns_name = self.ns.name().to_string();
        kpr_tests::netns::run_in(&ns_name, move || {
            let prog: &SchedClassifier = self.ebpf.program(FROM_POD).unwrap().try_into().unwrap();
            // struct __sk_buff, all zero but ifindex (offset 40): the device it came in on.
            let mut skb = [0u8; 192];
            skb[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
            let mut out = vec![0u8; 2048];
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&skb),
                    ..Default::default()
                })
                .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?}: {e}"));
            out.truncate(r.data_size_out as usize);
            (self, r.return_value, out)
        })
        .unwrap()
    }
}

/// A UDP request from outside to an IPv6 node port whose backend is on
/// another node, too big for the device toward it (1448 bytes for an MTU
/// of 1400): XDP leaves it to TC, which answers it as a router does, with
/// "packet too big" and the device's MTU, from the node port to the
/// client, quoting the request as the client sent it, every checksum right.
#[test]
fn an_ipv6_request_too_big_for_the_way_to_its_backend_is_answered_packet_too_big() {
    root_or_skip!();
    let mut xdp = Xdp::new();
    xdp.narrow_way_on();
    xdp.node_port6(29080, abi::PROTO_UDP, 22, 5353, abi::flags::MASQUERADE);
    let request = frame6(OUTSIDE6, NODE6, &[], abi::PROTO_UDP, udp6(40001, 29080, &[7u8; 1400]));
    let (x, verdict, _) = xdp.run(request.clone());
    assert_eq!(verdict, XDP_PASS, "too big for the way on: left to TC");
    let (x, verdict, out) = x.run_tc(request.clone());
    const TC_ACT_REDIRECT: u32 = 7;
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back: {out:02x?}");
    assert_eq!(out.len(), 14 + 40 + 8 + 48, "headers and the quote: {out:02x?}");
    assert_eq!((src6(&out), dst6(&out), out[20]), (NODE6, OUTSIDE6, proxy_common::reject::IPPROTO_ICMPV6));
    let (to, from) = macs(&request);
    assert_eq!(macs(&out), (from, to), "back to the MAC it came from");
    let icmp = &out[L4_6..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
    assert_eq!(u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]), 1400, "the device's MTU");
    assert_eq!(&icmp[8..], &request[14..14 + 48], "the request's headers as the client sent them");
    assert!(checksum6_ok(&out, L4_6, proxy_common::reject::IPPROTO_ICMPV6), "{out:02x?}");
    assert_eq!(x.counter(Counter::AnsweredTooBig), 1);
}

/// 6,000 mutated frames from outside (requests to the node ports, the
/// backend's replies, a Local policy's request) through the XDP program:
/// each passes, is sent on or is dropped counted; what is sent on was to
/// a node port XDP translates or from the backend it forwards to, and
/// leaves the node's address for the next node or the client.
#[test]
fn mutated_ipv6_frames_from_outside_are_never_misforwarded_by_xdp() {
    root_or_skip!();
    const XDP_DROP: u32 = 1;
    let mut xdp = Xdp::new();
    xdp.node_port6(30080, abi::PROTO_TCP, 21, 8080, abi::flags::MASQUERADE);
    xdp.node_port6(29080, abi::PROTO_UDP, 22, 5353, abi::flags::MASQUERADE);
    xdp.node_port6(30081, abi::PROTO_TCP, 23, 8080, abi::flags::LOCAL);
    // A flow to learn a NAT port from, so replies to it are among the templates.
    let (x, verdict, out) = xdp.run(frame6(OUTSIDE6, NODE6, &[], 6, tcp6(40000, 30080, TCP_SYN, b"")));
    xdp = x;
    assert_eq!(verdict, XDP_TX);
    let nat_port = ports(&out, L4_6).0;
    let templates = [
        frame6(OUTSIDE6, NODE6, &[], 6, tcp6(40000, 30080, TCP_ACK, b"hello")),
        frame6(OUTSIDE6, NODE6, &[], 6, tcp6(40010, 30080, TCP_SYN, b"")),
        frame6(OUTSIDE6, NODE6, &[], 17, udp6(40011, 29080, b"query")),
        frame6(OUTSIDE6, NODE6, &[], 6, tcp6(40012, 30081, TCP_SYN, b"")),
        frame6(REMOTE_BACKEND6, NODE6, &[], 6, tcp6(8080, nat_port, TCP_SYN | TCP_ACK, b"")),
        frame6(OUTSIDE6, NODE6, &[(HOP_BY_HOP, ext(8))], 6, tcp6(40013, 30080, TCP_SYN, b"")),
    ];
    let mut rng = Random(0x6b70_7258);
    let frames: Vec<Vec<u8>> = (0..6000)
        .map(|_| {
            let mut frame = templates[rng.below(templates.len())].clone();
            for _ in 0..1 + rng.below(3) {
                mutate6(&mut frame, &mut rng);
            }
            frame
        })
        .collect();
    let (xdp, results) = xdp.run_all(frames.clone());
    let (mut dropped, mut sent) = (0, 0);
    for (i, (frame, (verdict, out))) in frames.iter().zip(results).enumerate() {
        match verdict {
            XDP_PASS => assert_eq!(&out, frame, "frame {i} passed changed"),
            XDP_DROP => dropped += 1,
            XDP_TX => {
                sent += 1;
                let request = dst6(frame) == NODE6 && [30080, 29080].contains(&ports(frame, L4_6).1);
                let reply = src6(frame) == REMOTE_BACKEND6 && ports(frame, L4_6).1 == nat_port;
                assert!(frame[14] >> 4 == 6 && (request || reply), "frame {i} sent on:\n{frame:02x?}\n{out:02x?}");
                let ends = (src6(&out), dst6(&out));
                assert!(ends == (NODE6, REMOTE_BACKEND6) || ends == (NODE6, OUTSIDE6), "frame {i}: {ends:?}");
            }
            other => panic!("frame {i}: XDP said {other} for {frame:02x?}"),
        }
    }
    let counted: u64 = DropReason::ALL.iter().map(|r| xdp.counter(r.counter())).sum();
    assert_eq!(counted, dropped, "every drop counted under one reason");
    assert!(sent > 0, "some frames were still forwarded: {sent}");
}
