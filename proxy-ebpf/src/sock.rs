//! Socket-level load balancing (as Cilium's bpf_sock.c): cgroup hooks give
//! a socket that connects or sends to a Service VIP one of its backends
//! before any packet exists, so nothing is translated per packet afterwards,
//! in any network namespace and whatever the CNI. Where the application
//! looks at its peer again (`recvmsg` on UDP, `getpeername`), it sees the
//! VIP it addressed. IPv6 sockets reaching IPv4 Services through
//! IPv4-mapped addresses (dual-stack sockets) are served the same way, and
//! IPv6 TCP and UDP sockets connecting or sending to IPv6 frontends from
//! `SERVICES6` (ClusterIPs, and node ports and external IPs, a Local
//! policy's through every endpoint).
//!
//! A connected socket chooses once. An unconnected UDP socket chooses on its
//! first datagram to a frontend and keeps that backend ([`SOCK_AFFINITY`]),
//! as the per-packet conntrack keeps a flow's; the agent forgets the choice
//! when the backend leaves. An IPv6 one keeps its choices in its own
//! storage ([`SOCK_UDP6`]), and chooses again once its backend is no longer
//! in the frontend's set.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    counters::{Counter, DropReason},
    ipv6::In6,
    maps::{
        AffinityKey, Backend, Backend6, BackendKey, ForwardEntry, PROTO_TCP, PROTO_UDP, ReverseEntry, ReverseEntry6,
        ServiceKey, ServiceValue, SockFence, SockKey, SockKey6, SockUdp6, UDP_FLOWS6, UdpFlow6, flags,
    },
    select,
};

use crate::{
    counters::count,
    family::Family as _,
    lookup,
    maps::{BACKENDS6, SOCK_AFFINITY, SOCK_FENCE, SOCK_REVERSE, SOCK_REVERSE6, SOCK_UDP6},
};

/// What the hook tells the kernel: go on (with the address as rewritten), or fail the call.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// Why a connect or send to a VIP fails; the call returns the errno.
enum Refusal {
    /// No ready endpoint: ECONNREFUSED at once, as kube-proxy's REJECT rule.
    NoBackend,
    Drop(DropReason),
}

const ECONNREFUSED: i32 = 111;
const ENOBUFS: i32 = 105;

/// Where the address lives in the hook's context: an IPv4 socket's, or an
/// IPv6 socket's when it holds an IPv4-mapped address (`::ffff:a.b.c.d`,
/// what dual-stack sockets such as Java's use to reach IPv4 Services).
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6Mapped,
}

/// A TCP or UDP socket connecting: the backend replaces the VIP for good.
#[cgroup_sock_addr(connect4)]
pub(crate) fn kpr_sock_connect4(ctx: SockAddrContext) -> i32 {
    finish(translate(&ctx, Family::V4, false))
}

/// An unconnected UDP socket sending to an address.
#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn kpr_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    finish(translate(&ctx, Family::V4, true))
}

/// A UDP datagram received: its source shown as the VIP the socket addressed.
#[cgroup_sock_addr(recvmsg4)]
pub(crate) fn kpr_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_frontend(&ctx, Family::V4);
    ALLOW
}

/// `getpeername` of a connected socket: the VIP, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub(crate) fn kpr_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    show_frontend(&ctx, Family::V4);
    ALLOW
}

/// The same four for IPv6 sockets: IPv4 Services through mapped
/// addresses, and IPv6 ClusterIPs.
#[cgroup_sock_addr(connect6)]
pub(crate) fn kpr_sock_connect6(ctx: SockAddrContext) -> i32 {
    if user_address(&ctx, Family::V6Mapped).is_some() {
        finish(translate(&ctx, Family::V6Mapped, false))
    } else {
        finish(translate6(&ctx))
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn kpr_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    if user_address(&ctx, Family::V6Mapped).is_some() {
        finish(translate(&ctx, Family::V6Mapped, true))
    } else {
        finish(send6(&ctx))
    }
}

#[cgroup_sock_addr(recvmsg6)]
pub(crate) fn kpr_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    if user_address(&ctx, Family::V6Mapped).is_some() {
        show_frontend(&ctx, Family::V6Mapped);
    } else if !show_sent_frontend6(&ctx) {
        show_frontend6(&ctx);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub(crate) fn kpr_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    if user_address(&ctx, Family::V6Mapped).is_some() {
        show_frontend(&ctx, Family::V6Mapped);
    } else {
        show_frontend6(&ctx);
    }
    ALLOW
}

/// A socket closing: its reverse entry goes with it, rather than staying
/// until the LRU evicts it (crowding out long-lived sockets' entries). An
/// unconnected UDP socket's entries (one per backend it sent to) are left
/// to the LRU: the socket no longer says where it sent.
#[cgroup_sock(sock_release)]
pub(crate) fn kpr_sock_release(ctx: SockContext) -> i32 {
    forget_released(&ctx);
    ALLOW
}

#[inline(always)]
fn forget_released(ctx: &SockContext) {
    let sk = ctx.sock;
    let proto = match unsafe { core::ptr::read_volatile(&raw const (*sk).protocol) } {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return,
    };
    // Network byte order, as the field is.
    let port = unsafe { core::ptr::read_volatile(&raw const (*sk).dst_port) }.to_ne_bytes();
    // The peer the socket was connected to: the backend the hooks gave it.
    let addr = match unsafe { core::ptr::read_volatile(&raw const (*sk).family) } {
        AF_INET => unsafe { core::ptr::read_volatile(&raw const (*sk).dst_ip4) }.to_ne_bytes(),
        AF_INET6 => {
            // Constant offsets, each its own load: the verifier refuses a
            // context pointer moved by a computed index.
            let (w0, w1, w2, w3) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
                )
            };
            if w0 != 0 || w1 != 0 || w2.to_ne_bytes() != [0, 0, 0xff, 0xff] {
                let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
                let key = SockKey6::new(cookie, words6(w0, w1, w2, w3), port, proto);
                // Absent when the hooks never translated this socket: nothing to do.
                match SOCK_REVERSE6.remove(&key) {
                    Ok(()) | Err(_) => {}
                }
                return;
            }
            w3.to_ne_bytes()
        }
        _ => return,
    };
    if addr == [0; 4] {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    // Absent when the hooks never translated this socket: nothing to do.
    match SOCK_REVERSE.remove(&SockKey::new(cookie, addr, port, proto)) {
        Ok(()) | Err(_) => {}
    }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// An IPv6 address from the four words the kernel keeps it in (each in network order).
#[inline(always)]
fn words6(w0: u32, w1: u32, w2: u32, w3: u32) -> [u8; 16] {
    let (a, b, c, d) = (w0.to_ne_bytes(), w1.to_ne_bytes(), w2.to_ne_bytes(), w3.to_ne_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

/// The IPv6 address and port an IPv6 socket's application passed, as on the wire.
#[inline(always)]
fn user_address6(ctx: &SockAddrContext) -> ([u8; 16], [u8; 2]) {
    let sa = ctx.sock_addr;
    let port = (unsafe { core::ptr::read_volatile(&raw const (*sa).user_port) } as u16).to_ne_bytes();
    // Constant offsets, each its own load (see forget_released).
    let (w0, w1, w2, w3) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        )
    };
    (words6(w0, w1, w2, w3), port)
}

#[inline(always)]
fn set_user_address6(ctx: &SockAddrContext, addr: [u8; 16], port: [u8; 2]) {
    let sa = ctx.sock_addr;
    let word = |i: usize| u32::from_ne_bytes([addr[4 * i], addr[4 * i + 1], addr[4 * i + 2], addr[4 * i + 3]]);
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], word(0));
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], word(1));
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], word(2));
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], word(3));
        core::ptr::write_volatile(&raw mut (*sa).user_port, u16::from_ne_bytes(port) as u32);
    }
}

/// An IPv6 socket connecting to an IPv6 ClusterIP (TCP, or connected UDP):
/// one of its backends instead. The agent ends a UDP socket connected so
/// when its backend leaves, as it does IPv4 ones.
#[inline(always)]
fn translate6(ctx: &SockAddrContext) -> Result<(), Refusal> {
    let Some(proto) = protocol(ctx) else { return Ok(()) };
    let (vip, vip_port) = user_address6(ctx);
    let Some(svc) = frontend6(vip, vip_port, proto)? else { return Ok(()) };
    let backend = pick6(&svc)?;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Written before the address is: getpeername can only ask once it is used.
    let reverse = ReverseEntry6 { vip, vip_port, _pad: [0; 2], service_id: svc.id };
    if SOCK_REVERSE6.insert(SockKey6::new(cookie, backend.addr.0, backend.port, proto), reverse, 0).is_err() {
        return Err(Refusal::Drop(DropReason::ConntrackFailed));
    }
    set_user_address6(ctx, backend.addr.0, backend.port);
    count(Counter::SocketTranslated, ());
    Ok(())
}

/// The IPv6 frontend `vip:port` (`proto`), if the hooks serve it, as pods
/// and node processes see it (a Local policy's through every endpoint);
/// refused when it has no backend.
#[inline(always)]
fn frontend6(vip: [u8; 16], port: [u8; 2], proto: u8) -> Result<Option<ServiceValue>, Refusal> {
    let Some(svc) = In6::service(In6(vip), port, proto) else { return Ok(None) };
    // iptables mode took over: new sockets are its rules' to translate.
    if svc.flags & flags::DRAINING != 0 {
        return Ok(None);
    }
    let svc = lookup::in_cluster::<In6>(svc);
    if svc.backend_count == 0 {
        return Err(Refusal::NoBackend);
    }
    Ok(Some(svc))
}

/// One of `svc`'s backends, at random.
#[inline(always)]
fn pick6(svc: &ServiceValue) -> Result<Backend6, Refusal> {
    let slot = select::slot(unsafe { bpf_get_prandom_u32() }, svc.backend_count);
    let Some(backend) = BACKENDS6.get_ptr(BackendKey { set: svc.backend_set, slot }) else {
        // The set was replaced after the frontend was read: refused, and the client retries.
        return Err(Refusal::Drop(DropReason::BackendMissing));
    };
    Ok(unsafe { core::ptr::read(backend) })
}

/// Both halves of an IPv6 address, for comparing without a library call.
#[inline(always)]
fn halves6(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// How many slots of a frontend's new backend set are searched for a
/// socket's backend; beyond, the socket chooses again (a frontend that
/// large loses a UDP flow's stickiness when its set changes).
const KEPT_SEARCH: u32 = 64;

/// Whether `backend:port` is in `svc`'s current set (within [`KEPT_SEARCH`] slots).
#[inline(always)]
fn in_set6(svc: &ServiceValue, backend: (u64, u64), port: [u8; 2]) -> bool {
    for slot in 0..KEPT_SEARCH {
        if slot >= svc.backend_count {
            return false;
        }
        let Some(b) = BACKENDS6.get_ptr(BackendKey { set: svc.backend_set, slot }) else { return false };
        let b: Backend6 = unsafe { core::ptr::read(b) };
        if halves6(&b.addr.0) == backend && b.port == port {
            return true;
        }
    }
    false
}

/// An unconnected IPv6 UDP socket sending to an IPv6 ClusterIP: the backend
/// it was given there before while that backend is in the frontend's set,
/// else one chosen now and kept in the socket's storage.
#[inline(always)]
fn send6(ctx: &SockAddrContext) -> Result<(), Refusal> {
    if protocol(ctx) != Some(PROTO_UDP) {
        return Ok(());
    }
    let (vip, vip_port) = user_address6(ctx);
    let Some(svc) = frontend6(vip, vip_port, PROTO_UDP)? else { return Ok(()) };
    let flows = unsafe { SOCK_UDP6.get_or_insert_ptr_mut(ctx, None) };
    if flows.is_null() {
        return Err(Refusal::Drop(DropReason::ConntrackFailed));
    }
    let flows: &mut SockUdp6 = unsafe { &mut *flows };
    let wanted = halves6(&vip);
    let mut known = UDP_FLOWS6;
    for i in 0..UDP_FLOWS6 {
        let flow = &flows.flows[i];
        if flow.service_id == svc.id && halves6(&flow.vip) == wanted && flow.vip_port == vip_port {
            known = i;
            break;
        }
    }
    // One search of the set at most, outside the loop (the verifier walks each copy).
    if let Some(flow) = flows.flows.get_mut(known) {
        if flow.set == svc.backend_set || in_set6(&svc, halves6(&flow.backend), flow.backend_port) {
            flow.set = svc.backend_set;
            set_user_address6(ctx, flow.backend, flow.backend_port);
            count(Counter::SocketTranslated, ());
            return Ok(());
        }
        // Its backend left: forgotten, and one chosen again below.
        flow.service_id = 0;
    }
    let backend = pick6(&svc)?;
    // Written before the address is: a reply can only come once it is used.
    let at = (flows.next as usize) % UDP_FLOWS6;
    flows.next = flows.next.wrapping_add(1);
    flows.flows[at] = UdpFlow6 {
        vip,
        backend: backend.addr.0,
        vip_port,
        backend_port: backend.port,
        service_id: svc.id,
        set: svc.backend_set,
    };
    set_user_address6(ctx, backend.addr.0, backend.port);
    count(Counter::SocketTranslated, ());
    Ok(())
}

/// The source of a datagram an unconnected IPv6 UDP socket receives from a
/// backend [`send6`] gave it: the VIP it sent to. False when the socket
/// sent to no such backend.
#[inline(always)]
fn show_sent_frontend6(ctx: &SockAddrContext) -> bool {
    let flows = unsafe { SOCK_UDP6.get_ptr_mut(ctx) };
    if flows.is_null() {
        return false;
    }
    let flows: &SockUdp6 = unsafe { &*flows };
    let (addr, port) = user_address6(ctx);
    let from = halves6(&addr);
    for i in 0..UDP_FLOWS6 {
        let flow = &flows.flows[i];
        if flow.service_id != 0 && halves6(&flow.backend) == from && flow.backend_port == port {
            set_user_address6(ctx, flow.vip, flow.vip_port);
            count(Counter::SocketReverseTranslated, ());
            return true;
        }
    }
    false
}

/// `getpeername` of an IPv6 socket [`translate6`] connected, and the source
/// of a datagram it receives: its VIP.
#[inline(always)]
fn show_frontend6(ctx: &SockAddrContext) {
    let Some(proto) = protocol(ctx) else { return };
    let (addr, port) = user_address6(ctx);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(rev) = SOCK_REVERSE6.get_ptr(SockKey6::new(cookie, addr, port, proto)) {
        let rev = unsafe { core::ptr::read(rev) };
        set_user_address6(ctx, rev.vip, rev.vip_port);
        count(Counter::SocketReverseTranslated, ());
    }
}

/// The hook's return value for a translation's outcome; a refusal sets the
/// errno the call fails with, counted under why.
#[inline(always)]
fn finish(result: Result<(), Refusal>) -> i32 {
    let (counter, errno) = match result {
        Ok(()) => return ALLOW,
        Err(Refusal::NoBackend) => (Counter::SocketRefusedNoBackend, ECONNREFUSED),
        Err(Refusal::Drop(reason)) => (reason.counter(), ENOBUFS),
    };
    count(counter, ());
    // Without the errno the call fails with EPERM, which still fails it.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// The protocol of the socket behind `ctx`, if the datapath serves it.
#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> Option<u8> {
    match unsafe { (*ctx.sock_addr).protocol } {
        6 => Some(PROTO_TCP),
        17 => Some(PROTO_UDP),
        _ => None,
    }
}

/// The IPv4 address and port the application passed, as they are on the
/// wire; `None` for an IPv6 address that is not IPv4-mapped.
#[inline(always)]
fn user_address(ctx: &SockAddrContext, family: Family) -> Option<([u8; 4], [u8; 2])> {
    let sa = ctx.sock_addr;
    // The fields hold network byte order: an IPv4 address in all four bytes
    // of its word, the port in the low two (as the kernel stores them).
    // Each is read with one 4-byte load, as the verifier wants.
    let port = (unsafe { core::ptr::read_volatile(&raw const (*sa).user_port) } as u16).to_ne_bytes();
    match family {
        Family::V4 => Some((unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip4) }.to_ne_bytes(), port)),
        Family::V6Mapped => {
            // Constant offsets, each its own load (see forget_released).
            let (w0, w1, w2, w3) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
                )
            };
            let mapped = w0 == 0 && w1 == 0 && w2.to_ne_bytes() == [0, 0, 0xff, 0xff];
            mapped.then(|| (w3.to_ne_bytes(), port))
        }
    }
}

#[inline(always)]
fn set_user_address(ctx: &SockAddrContext, family: Family, addr: [u8; 4], port: [u8; 2]) {
    let sa = ctx.sock_addr;
    unsafe {
        match family {
            Family::V4 => core::ptr::write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes(addr)),
            // The mapped prefix stays: only the IPv4 part changes.
            Family::V6Mapped => core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], u32::from_ne_bytes(addr)),
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u16::from_ne_bytes(port) as u32);
    }
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, family: Family, unconnected: bool) -> Result<(), Refusal> {
    let Some(proto) = protocol(ctx) else { return Ok(()) };
    let Some((vip, vip_port)) = user_address(ctx, family) else { return Ok(()) };
    // Sockets are pods' and the node's own: every endpoint serves them.
    let Some(svc) = lookup::service_in_cluster(&ServiceKey { addr: vip, port: vip_port, proto, _pad: 0 }) else {
        return Ok(());
    };
    // iptables mode took over: the socket's packets are its rules' to translate.
    if svc.flags & flags::DRAINING != 0 {
        return Ok(());
    }
    if svc.backend_count == 0 {
        if svc.flags & flags::DROP_WITHOUT_BACKEND != 0 {
            // Endpoints elsewhere, none for this node's clients (a Local
            // internal policy): kube-proxy drops, so the client times out
            // rather than being refused. The address stays the frontend's
            // and the socket's packets to it are dropped on egress.
            return fence(ctx, crate::fence::DROP_ALL, &Backend::new(vip, u16::from_be_bytes(vip_port)), proto);
        }
        return Err(Refusal::NoBackend);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let affinity = SockKey::new(cookie, vip, vip_port, proto);
    let kept = if unconnected { SOCK_AFFINITY.get_ptr(affinity).map(|e| unsafe { core::ptr::read(e) }) } else { None };
    let backend = match kept {
        Some(e) if e.service_id == svc.id => e.backend,
        _ => {
            // Session affinity's client: the socket's network namespace (a
            // pod, or the node's own processes), as an address would be.
            let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
            let client = AffinityKey::netns(svc.id, netns);
            let backend = lookup::choose_for(&svc, &client).map_err(Refusal::Drop)?;
            if unconnected && SOCK_AFFINITY.insert(affinity, ForwardEntry { backend, service_id: svc.id }, 0).is_err() {
                return Err(Refusal::Drop(DropReason::ConntrackFailed));
            }
            backend
        }
    };
    // Written before the address is: a reply can only come once it is used.
    let reverse = ReverseEntry { vip, vip_port, _pad: [0; 2], service_id: svc.id };
    if SOCK_REVERSE.insert(SockKey::new(cookie, backend.addr, backend.port, proto), reverse, 0).is_err() {
        return Err(Refusal::Drop(DropReason::ConntrackFailed));
    }
    if svc.flags & flags::SOURCE_RANGES != 0 {
        fence(ctx, svc.id, &backend, proto)?;
    }
    set_user_address(ctx, family, backend.addr, backend.port);
    count(Counter::SocketTranslated, ());
    Ok(())
}

/// Marks the socket as sending to `backend` for the frontend `id`, whose
/// source ranges it must be in: the kernel chooses the source address only
/// after this hook, so the check waits for the packets (see `fence`).
#[inline(always)]
fn fence(ctx: &SockAddrContext, id: u32, backend: &Backend, proto: u8) -> Result<(), Refusal> {
    let mut mark = SockFence { frontend_id: id, addr: backend.addr, port: backend.port, proto, _pad: 0 };
    // The socket's storage, created with `mark` if it had none.
    let stored = unsafe { SOCK_FENCE.get_or_insert_ptr_mut(ctx, Some(&mut mark)) };
    if stored.is_null() {
        // Unchecked would let every source through: refuse instead.
        return Err(Refusal::Drop(DropReason::ConntrackFailed));
    }
    unsafe { core::ptr::write(stored, mark) };
    Ok(())
}

#[inline(always)]
fn show_frontend(ctx: &SockAddrContext, family: Family) {
    let Some(proto) = protocol(ctx) else { return };
    let Some((addr, port)) = user_address(ctx, family) else { return };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(rev) = SOCK_REVERSE.get_ptr(SockKey::new(cookie, addr, port, proto)) {
        let rev = unsafe { core::ptr::read(rev) };
        set_user_address(ctx, family, rev.vip, rev.vip_port);
        count(Counter::SocketReverseTranslated, ());
    }
}
