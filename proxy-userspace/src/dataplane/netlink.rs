//! The bit of raw netlink the dataplanes need (link events, inet_diag,
//! ctnetlink): opening a socket and bounding how long a read waits.

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
