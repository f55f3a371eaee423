//! A two-instruction XDP program that passes every frame, for the wire side
//! of the harness's veth pairs. A veth delivers frames another veth's XDP
//! program sends it (XDP_TX, XDP_REDIRECT) only if it runs an XDP program
//! itself: without one they wait in its queue until other traffic comes
//! (a real NIC puts them on the wire at once).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// `r0 = XDP_PASS; exit`.
const PASS: [u64; 2] = [0xb7 | (2 << 32), 0x95];

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of 128 bytes, its pointers valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the pass program to interface `ifindex` of the calling
/// thread's network namespace; it stays while the returned link is open.
pub fn attach(ifindex: u32) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut load = [0u64; 16];
    load[0] = u64::from(BPF_PROG_TYPE_XDP) | ((PASS.len() as u64) << 32);
    load[1] = PASS.as_ptr() as u64;
    load[2] = license.as_ptr() as u64;
    // expected_attach_type sits after log fields, kern_version, prog_flags,
    // prog_name[16] and prog_ifindex: byte 68.
    load[8] = u64::from(BPF_XDP) << 32;
    let prog = bpf(BPF_PROG_LOAD, &mut load)?;
    let mut link = [0u64; 16];
    link[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    link[1] = u64::from(BPF_XDP);
    Ok(bpf(BPF_LINK_CREATE, &mut link)?)
}
