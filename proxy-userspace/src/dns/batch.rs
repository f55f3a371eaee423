//! UDP queries taken and answered in batches: one `recvmmsg` takes every
//! query waiting in the socket (up to [`BATCH`]), one `sendmmsg` sends
//! their answers. Under load the socket holds many queries at once, and
//! two system calls per batch instead of two per query leave the CPU to
//! the answers (the kernel's UDP path is most of a query's cost).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, RawFd},
    ptr::null_mut,
};

/// Queries taken by one receive at most.
pub const BATCH: usize = 32;
/// The largest query taken: far beyond any real one over UDP (EDNS
/// payloads are announced at 4096 at most); a longer datagram is cut here
/// and then reads as malformed.
const QUERY_MAX: usize = 4096;

/// A client's address as the kernel gave it, ready to be handed back.
#[derive(Clone, Copy)]
pub struct Peer {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl Peer {
    /// The address, for logs and for answers sent one by one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match i32::from(self.addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in for this family.
                let a = unsafe { &*(&raw const self.addr).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6 for this family.
                let a = unsafe { &*(&raw const self.addr).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let port = u16::from_be(a.sin6_port);
                Some(SocketAddr::V6(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id)))
            }
            _ => None,
        }
    }
}

/// Buffers for one batch of queries, reused from batch to batch.
pub struct Receiver {
    buffers: Vec<Vec<u8>>,
    peers: Vec<Peer>,
    lengths: Vec<usize>,
    /// Queries longer than [`QUERY_MAX`] (cut, so not to be read).
    cut: Vec<bool>,
    received: usize,
}

impl Default for Receiver {
    fn default() -> Self {
        // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
        let empty = Peer { addr: unsafe { zeroed() }, len: 0 };
        Self {
            buffers: vec![vec![0; QUERY_MAX]; BATCH],
            peers: vec![empty; BATCH],
            lengths: vec![0; BATCH],
            cut: vec![false; BATCH],
            received: 0,
        }
    }
}

impl Receiver {
    /// Waits for at least one query, then takes every one waiting (up to
    /// [`BATCH`]) without waiting for more.
    pub fn receive(&mut self, socket: &std::net::UdpSocket) -> io::Result<usize> {
        let fd = socket.as_raw_fd();
        // SAFETY: zeroed iovec and mmsghdr are plain data, filled in below.
        let mut iovecs: Vec<libc::iovec> = vec![unsafe { zeroed() }; BATCH];
        let mut headers: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; BATCH];
        for ((iov, header), (buffer, peer)) in
            iovecs.iter_mut().zip(&mut headers).zip(self.buffers.iter_mut().zip(&mut self.peers))
        {
            *iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
            header.msg_hdr.msg_name = (&raw mut peer.addr).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at live buffers of the lengths given.
        let n = unsafe { libc::recvmmsg(fd, headers.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, null_mut()) };
        if n < 0 {
            self.received = 0;
            return Err(io::Error::last_os_error());
        }
        self.received = n as usize;
        for (i, header) in headers.iter().take(self.received).enumerate() {
            self.peers[i].len = header.msg_hdr.msg_namelen;
            self.lengths[i] = (header.msg_len as usize).min(QUERY_MAX);
            self.cut[i] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(self.received)
    }

    /// The queries of the last receive: their bytes, whether they were cut
    /// (longer than [`QUERY_MAX`]: only the start is here), and senders.
    pub fn queries(&self) -> impl Iterator<Item = (&[u8], bool, Peer)> {
        (0..self.received).map(|i| (&self.buffers[i][..self.lengths[i]], self.cut[i], self.peers[i]))
    }
}

/// Sends `answers` with as few system calls as the kernel allows. An
/// answer the kernel refuses (its client gone, say) is skipped: a datagram
/// answer is not the server's to retry.
pub fn send(socket: &std::net::UdpSocket, answers: &mut [(Vec<u8>, Peer)]) {
    let fd: RawFd = socket.as_raw_fd();
    let mut sent = 0;
    while sent < answers.len() {
        let rest = &mut answers[sent..];
        let mut iovecs: Vec<libc::iovec> = rest
            .iter_mut()
            .map(|(bytes, _)| libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = rest
            .iter_mut()
            .zip(&mut iovecs)
            .map(|((_, peer), iov)| {
                // SAFETY: a zeroed mmsghdr is plain data, filled in here.
                let mut header: libc::mmsghdr = unsafe { zeroed() };
                header.msg_hdr.msg_name = (&raw mut peer.addr).cast();
                header.msg_hdr.msg_namelen = peer.len;
                header.msg_hdr.msg_iov = iov;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        // SAFETY: every header points at a live answer and address.
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), headers.len() as u32, 0) };
        if n <= 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The first of the rest failed: skip it, send the others.
            tracing::debug!(to = ?rest[0].1.socket_addr(), error = %e, "could not send a DNS answer");
            sent += 1;
        } else {
            sent += n as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_queries_is_taken_at_once_and_answered_to_each_sender() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let clients: Vec<_> = (0..5).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(format!("query {i}").as_bytes(), server.local_addr().unwrap()).unwrap();
        }
        // A datagram longer than any query is cut and flagged.
        clients[0].send_to(&vec![7u8; QUERY_MAX + 10], server.local_addr().unwrap()).unwrap();
        let mut receiver = Receiver::default();
        let mut taken = Vec::new();
        while taken.len() < 6 {
            receiver.receive(&server).unwrap();
            taken.extend(receiver.queries().map(|(q, cut, p)| ((!cut).then(|| q.to_vec()), p)));
        }
        let senders: Vec<SocketAddr> = taken.iter().map(|(_, p)| p.socket_addr().unwrap()).collect();
        for (i, c) in clients.iter().enumerate() {
            let query = format!("query {i}").into_bytes();
            assert!(
                taken.iter().any(|(q, p)| q.as_deref() == Some(&query[..]) && p.socket_addr() == c.local_addr().ok())
            );
        }
        assert_eq!(taken.iter().filter(|(q, _)| q.is_none()).count(), 1, "the long datagram is cut");
        assert_eq!(senders.len(), 6);

        let mut answers: Vec<(Vec<u8>, Peer)> =
            taken.iter().filter_map(|(q, p)| q.as_ref().map(|q| ([b"answer to ", &q[..]].concat(), *p))).collect();
        send(&server, &mut answers);
        for (i, c) in clients.iter().enumerate() {
            c.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            let n = c.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("answer to query {i}").as_bytes());
        }
    }

    #[test]
    fn an_ipv6_sender_is_read_back() {
        let Ok(server) = std::net::UdpSocket::bind("[::1]:0") else { return };
        let client = std::net::UdpSocket::bind("[::1]:0").unwrap();
        client.send_to(b"q", server.local_addr().unwrap()).unwrap();
        let mut receiver = Receiver::default();
        receiver.receive(&server).unwrap();
        let (_, _, peer) = receiver.queries().next().unwrap();
        assert_eq!(peer.socket_addr(), client.local_addr().ok());
    }
}
