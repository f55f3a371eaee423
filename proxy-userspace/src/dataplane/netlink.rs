//! The bit of raw netlink the dataplanes need (link events, inet_diag,
//! ctnetlink, and removing what kube-proxy left): opening a socket,
//! bounding how long a read waits, building, sending and receiving
//! messages, and walking the messages of one read.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

/// A netlink socket of `protocol` (e.g. NETLINK_ROUTE), close-on-exec.
pub(crate) fn socket(protocol: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a read of `fd` give up (EAGAIN) after `wait`.
pub(crate) fn set_receive_timeout(fd: &OwnedFd, wait: Duration) -> std::io::Result<()> {
    let timeout = libc::timeval { tv_sec: wait.as_secs() as libc::time_t, tv_usec: wait.subsec_micros().into() };
    let size = std::mem::size_of::<libc::timeval>() as u32;
    // SAFETY: setsockopt reads a timeval of the given size.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size)
    };
    if r != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The netlink header's size (`struct nlmsghdr`).
pub(crate) const HEADER: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NETLINK_NETFILTER: libc::c_int = 12;

/// One message: the netlink header, then `header` (the family's fixed
/// part, e.g. nfgenmsg or ifinfomsg), then `attrs`.
pub(crate) fn message(kind: u16, flags: u16, seq: u32, header: &[u8], attrs: &[u8]) -> Vec<u8> {
    let len = HEADER + header.len() + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(header);
    m.extend_from_slice(attrs);
    m
}

/// Appends one attribute (padded to 4 bytes) to `out`.
pub(crate) fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The netfilter header (`struct nfgenmsg`): family, version 0, resource id.
pub(crate) fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, 0, id[0], id[1]]
}

/// Sends `msgs` (requests asking for an acknowledgement) and returns the
/// status of each of the `count` acknowledgements, in order.
pub(crate) fn acknowledged(fd: &OwnedFd, msgs: &[u8], count: usize) -> std::io::Result<Vec<i32>> {
    send(fd, msgs)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut statuses = Vec::with_capacity(count);
    while statuses.len() < count {
        let data = receive(fd, &mut buf)?;
        statuses.extend(messages(data).filter(|(k, _)| *k == NLMSG_ERROR).map(|(_, b)| error_status(b).unwrap_or(0)));
    }
    Ok(statuses)
}

/// Sends `msg` (one message or several back to back) to the kernel.
pub(crate) fn send(fd: &OwnedFd, msg: &[u8]) -> std::io::Result<()> {
    // SAFETY: the buffer outlives the call; the kernel is the destination.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// One read: the bytes the kernel wrote into `buf`.
pub(crate) fn receive<'a>(fd: &OwnedFd, buf: &'a mut [u8]) -> std::io::Result<&'a [u8]> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(&buf[..n as usize]) }
}

/// The messages in one read, as (type, body after the header); what does
/// not parse ends the walk.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < HEADER {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < HEADER || len > buf.len() {
            return None;
        }
        let body = &buf[HEADER..len];
        // Messages are 4-byte aligned.
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, body))
    })
}

/// The status an NLMSG_ERROR body carries: 0 for an acknowledgement, else
/// a negative errno.
pub(crate) fn error_status(body: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(body.get(..4)?.try_into().ok()?))
}
