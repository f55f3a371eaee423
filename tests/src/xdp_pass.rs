//! Two-instruction XDP programs for the wire side of the harness's veth
//! pairs. A veth delivers frames another veth's XDP program sends it
//! (XDP_TX, XDP_REDIRECT) only if it runs an XDP program itself: without one
//! they wait in its queue until other traffic comes (a real NIC puts them
//! on the wire at once). The packet-rate bench swaps in the dropping one,
//! so what a node forwards is counted on its wire and goes no further.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// What the program answers for every frame.
#[derive(Clone, Copy, Debug)]
pub enum Verdict {
    Drop = 1,
    Pass = 2,
}

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr of 128 bytes, its pointers valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// A command that returns a new file descriptor.
pub(crate) fn bpf_fd(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the program answering `verdict`.
fn program(verdict: Verdict) -> std::io::Result<OwnedFd> {
    // `r0 = verdict; exit`.
    load_xdp(&[0xb7 | ((verdict as u64) << 32), 0x95])
}

/// Loads the XDP program of instructions `insns`.
pub(crate) fn load_xdp(insns: &[u64]) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    let mut load = [0u64; 16];
    load[0] = u64::from(BPF_PROG_TYPE_XDP) | ((insns.len() as u64) << 32);
    load[1] = insns.as_ptr() as u64;
    load[2] = license.as_ptr() as u64;
    // expected_attach_type sits after log fields, kern_version, prog_flags,
    // prog_name[16] and prog_ifindex: byte 68.
    load[8] = u64::from(BPF_XDP) << 32;
    bpf_fd(BPF_PROG_LOAD, &mut load)
}

/// Attaches the pass program to interface `ifindex` of the calling
/// thread's network namespace; it stays while the returned link is open.
pub fn attach(ifindex: u32) -> anyhow::Result<OwnedFd> {
    let prog = program(Verdict::Pass)?;
    let mut link = [0u64; 16];
    link[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    link[1] = u64::from(BPF_XDP);
    Ok(bpf_fd(BPF_LINK_CREATE, &mut link)?)
}

/// Makes the program behind `link` answer `verdict` from now on.
pub fn set(link: &OwnedFd, verdict: Verdict) -> anyhow::Result<()> {
    let prog = program(verdict)?;
    let mut update = [0u64; 16];
    update[0] = link.as_raw_fd() as u64 | ((prog.as_raw_fd() as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut update)?;
    Ok(())
}
