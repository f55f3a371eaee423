//! Ending UDP sockets connected to a backend that left its Service.
//!
//! A socket the hooks connected to a backend keeps sending there for its
//! whole life; for UDP nothing tells it the backend is gone (a client stays
//! pinned to a deleted DNS pod). As kube-proxy clears such flows from
//! conntrack, these sockets are ended through inet_diag's SOCK_DESTROY (what
//! `ss -K` does) and disconnected: a `recv` pending or next fails with
//! ECONNABORTED, a `send` with EDESTADDRREQ, and a new socket chooses again. Only sockets the hooks translated are touched:
//! each is named by its cookie in the socket reverse map.
//!
//! inet_diag sees one network namespace at a time, so every namespace of a
//! process under the cgroup is visited, from a thread that enters it. Both
//! families are listed: IPv6 sockets connected to IPv6 backends, and
//! dual-stack ones connected to IPv4 backends through mapped addresses.

use std::{
    collections::{BTreeMap, HashSet},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use crate::dataplane::netlink::{self, HEADER, NLMSG_DONE, NLMSG_ERROR};

/// A socket to end: its cookie and the backend it is connected to (an
/// IPv4 backend as its mapped IPv6 address, `::ffff:a.b.c.d`).
pub type Pinned = (u64, [u8; 16], [u8; 2]);

/// `addr` as an IPv4-mapped IPv6 address, as [`Pinned`] holds IPv4 backends.
pub fn mapped(addr: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(addr).to_ipv6_mapped().octets()
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID: usize = 48;
/// `struct inet_diag_req_v2`.
const REQUEST: usize = 8 + SOCKID;
/// `struct inet_diag_msg` up to the end of its socket id.
const MESSAGE_ID_END: usize = 4 + SOCKID;

/// A UDP socket as inet_diag lists it: its family and id, as a destroy
/// request must repeat them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub family: u8,
    pub id: [u8; SOCKID],
}

impl Listed {
    /// The peer (an IPv4 one mapped, as in [`Pinned`]).
    fn dst(&self) -> ([u8; 16], [u8; 2]) {
        let mut addr = [0; 16];
        addr.copy_from_slice(&self.id[20..36]);
        if self.family == libc::AF_INET as u8 {
            addr = mapped([addr[0], addr[1], addr[2], addr[3]]);
        }
        (addr, [self.id[2], self.id[3]])
    }

    fn cookie(&self) -> u64 {
        let low = u32::from_ne_bytes([self.id[40], self.id[41], self.id[42], self.id[43]]);
        let high = u32::from_ne_bytes([self.id[44], self.id[45], self.id[46], self.id[47]]);
        u64::from(high) << 32 | u64::from(low)
    }
}

/// A netlink message of `kind` around a UDP inet_diag request of `family` for `id`.
fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCKID]) -> Vec<u8> {
    let len = HEADER + REQUEST;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&[0; 8]); // sequence, port id
    m.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(id);
    m
}

/// The request listing every UDP socket of `family` in the namespace.
pub fn dump_request(family: u8) -> Vec<u8> {
    request(SOCK_DIAG_BY_FAMILY, libc::NLM_F_DUMP as u16, family, &[0; SOCKID])
}

/// The request ending `socket`, acknowledged.
pub fn destroy_request(socket: &Listed) -> Vec<u8> {
    request(SOCK_DESTROY, libc::NLM_F_ACK as u16, socket.family, &socket.id)
}

/// What one read of the netlink socket held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub sockets: Vec<Listed>,
    /// The dump is complete.
    pub done: bool,
    /// An error or acknowledgement: 0 is success, else a negative errno.
    pub status: Option<i32>,
}

/// Parses the netlink messages in `buf`; what does not parse ends the batch.
pub fn parse(buf: &[u8]) -> Batch {
    let mut batch = Batch::default();
    for (kind, body) in netlink::messages(buf) {
        match kind {
            NLMSG_DONE => batch.done = true,
            NLMSG_ERROR if body.len() >= 4 => batch.status = netlink::error_status(body),
            SOCK_DIAG_BY_FAMILY if body.len() >= MESSAGE_ID_END => {
                let mut id = [0; SOCKID];
                id.copy_from_slice(&body[4..MESSAGE_ID_END]);
                batch.sockets.push(Listed { family: body[0], id });
            }
            _ => {}
        }
    }
    batch
}

fn receive(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Batch> {
    netlink::receive(fd, buf).map(parse)
}

/// In the calling thread's network namespace: ends the UDP sockets that
/// are in `pinned`; returns how many.
fn destroy_here(pinned: &HashSet<Pinned>) -> std::io::Result<usize> {
    let fd = netlink::socket(libc::NETLINK_SOCK_DIAG)?;
    // The kernel answers at once; a wait this long means it will not.
    netlink::set_receive_timeout(&fd, std::time::Duration::from_secs(2))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut doomed = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        netlink::send(&fd, &dump_request(family as u8))?;
        loop {
            let batch = receive(&fd, &mut buf)?;
            doomed.extend(batch.sockets.into_iter().filter(|s| {
                let (addr, port) = s.dst();
                pinned.contains(&(s.cookie(), addr, port))
            }));
            match batch.status {
                // A node without IPv6 has no such sockets to end.
                Some(e) if e < 0 && family == libc::AF_INET6 => break,
                Some(e) if e < 0 => return Err(std::io::Error::from_raw_os_error(-e)),
                _ if batch.done || batch.status.is_some() => break,
                _ => {}
            }
        }
    }
    let mut ended = 0;
    for socket in &doomed {
        netlink::send(&fd, &destroy_request(socket))?;
        match receive(&fd, &mut buf)?.status {
            Some(0) => ended += 1,
            // Closed meanwhile: nothing left to end.
            Some(e) if -e == libc::ENOENT => {}
            other => tracing::warn!(status = ?other, "a UDP socket pinned to a removed backend could not be ended"),
        }
    }
    Ok(ended)
}

/// One `/proc/PID/ns/net` per network namespace of the processes in
/// `cgroup` and below.
fn namespaces(cgroup: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut by_inode = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        dirs.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // A process gone meanwhile has no namespace to visit.
            if let Ok(meta) = std::fs::metadata(&ns) {
                by_inode.entry((meta.dev(), meta.ino())).or_insert(ns);
            }
        }
    }
    by_inode.into_values().collect()
}

/// Ends the sockets in `pinned` wherever they are under `cgroup`; returns how many.
pub fn destroy(cgroup: &Path, pinned: &HashSet<Pinned>) -> usize {
    if pinned.is_empty() {
        return 0;
    }
    let mut ended = 0;
    let mut unvisited = 0;
    for ns in namespaces(cgroup) {
        let visit = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<usize> {
                let file = std::fs::File::open(&ns)?;
                // SAFETY: setns on this thread only; it ends with the scope.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                destroy_here(pinned)
            })
            .join()
        });
        match visit {
            Ok(Ok(n)) => ended += n,
            // A process that exited meanwhile has no namespace left: fine.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(Err(e)) => {
                unvisited += 1;
                tracing::debug!(ns = %ns.display(), error = %e, "could not visit a namespace");
            }
            Err(_) => {
                unvisited += 1;
                tracing::warn!(ns = %ns.display(), "visiting a namespace panicked");
            }
        }
    }
    if unvisited > 0 {
        // In a container this needs the host's PID namespace and CAP_SYS_PTRACE (see the DaemonSet).
        tracing::warn!(
            unvisited,
            "UDP sockets pinned to removed backends may remain: some network namespaces could not be visited"
        );
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = ((HEADER + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
        m
    }

    fn listed(dst: &[u8], dport: u16, cookie: u64) -> Vec<u8> {
        let family = if dst.len() == 4 { libc::AF_INET } else { libc::AF_INET6 };
        let mut body = vec![family as u8, 1, 0, 0];
        let mut id = [0u8; SOCKID];
        id[2..4].copy_from_slice(&dport.to_be_bytes());
        id[20..20 + dst.len()].copy_from_slice(dst);
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        body.extend_from_slice(&id);
        body.extend_from_slice(&[0; 20]); // expires, queues, uid, inode
        body
    }

    #[test]
    fn a_dump_reply_yields_each_socket_with_its_peer_and_cookie() {
        let v6: std::net::Ipv6Addr = "fd00:10:244::11".parse().unwrap();
        let mut buf = message(SOCK_DIAG_BY_FAMILY, &listed(&[10, 244, 0, 11], 5353, 0x1_0000_0002));
        buf.extend(message(SOCK_DIAG_BY_FAMILY, &listed(&[10, 244, 0, 12], 53, 7)));
        buf.extend(message(SOCK_DIAG_BY_FAMILY, &listed(&v6.octets(), 5353, 8)));
        buf.extend(message(NLMSG_DONE, &[0; 4]));
        let batch = parse(&buf);
        assert!(batch.done);
        assert_eq!(batch.sockets.len(), 3);
        // An IPv4 peer reads as its mapped address, as a dual-stack socket's would.
        assert_eq!(batch.sockets[0].dst(), (mapped([10, 244, 0, 11]), 5353u16.to_be_bytes()));
        assert_eq!(batch.sockets[0].cookie(), 0x1_0000_0002);
        assert_eq!(batch.sockets[1].cookie(), 7);
        assert_eq!(batch.sockets[2].dst(), (v6.octets(), 5353u16.to_be_bytes()));
        assert_eq!(batch.sockets[2].family, libc::AF_INET6 as u8);
    }

    #[test]
    fn a_destroy_request_repeats_the_listed_socket_id() {
        for dst in [&[10, 244, 0, 11][..], &"fd00:10:244::11".parse::<std::net::Ipv6Addr>().unwrap().octets()] {
            let batch = parse(&message(SOCK_DIAG_BY_FAMILY, &listed(dst, 5353, 9)));
            let req = destroy_request(&batch.sockets[0]);
            assert_eq!(req.len(), HEADER + REQUEST);
            assert_eq!(u16::from_ne_bytes([req[4], req[5]]), SOCK_DESTROY);
            assert_eq!(&req[HEADER + 8..], &batch.sockets[0].id[..]);
            assert_eq!(req[HEADER], batch.sockets[0].family, "the listed socket's family");
            assert_eq!(req[HEADER + 1], libc::IPPROTO_UDP as u8);
        }
    }

    #[test]
    fn errors_and_acknowledgements_carry_their_status() {
        assert_eq!(parse(&message(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes())).status, Some(-libc::ENOENT));
        assert_eq!(parse(&message(NLMSG_ERROR, &0i32.to_ne_bytes())).status, Some(0));
        assert_eq!(parse(&[1, 2, 3]), Batch::default(), "a short read is nothing");
    }
}
