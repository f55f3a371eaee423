//! A cgroup v2 directory of its own per virtual node: kpr attaches its
//! socket hooks there, and the processes a test places in it (node
//! processes, pods) are the ones served, while the machine's own processes
//! are not touched. Removed on drop (it is empty by then: its processes
//! are the test's short-lived clients).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

pub struct Cgroup {
    path: PathBuf,
}

/// Where the cgroup v2 hierarchy is mounted for this process.
fn hierarchy() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .filter_map(|l| l.split_once(" - "))
        .filter(|(_, after)| after.starts_with("cgroup2 "))
        .find_map(|(before, _)| before.split_whitespace().nth(4).map(PathBuf::from))
        .context("no cgroup v2 mount (the socket-level tests need one)")
}

impl Cgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = hierarchy()?.join(name);
        // A cgroup left by a killed earlier run with the same name goes first.
        std::fs::remove_dir(&path).ok();
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// The path as a process in another mount namespace sees it: kpr runs
    /// under `ip netns exec`, which mounts a fresh /sys without the cgroup
    /// hierarchy, while /proc still reaches this process's view of it.
    pub fn path_for_agent(&self) -> PathBuf {
        Path::new(&format!("/proc/{}/root", std::process::id())).join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }

    /// Makes `command` start inside this cgroup (before it runs anything).
    pub fn place(&self, command: &mut Command) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let procs = std::ffi::CString::new(self.path.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        // SAFETY: between fork and exec the child makes only the raw
        // open/write/close calls (no allocation, async-signal-safe).
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written == 1 { Ok(()) } else { Err(error) }
            });
        }
        Ok(())
    }
}

/// `BPF_CGROUP_INET_EGRESS`: programs run on every packet a cgroup's sockets send.
pub const INET_EGRESS: u32 = 1;

impl Cgroup {
    /// How many programs the kernel runs at `attach_type` for this cgroup
    /// (attached to it directly), as `BPF_PROG_QUERY` reports.
    pub fn programs_at(&self, attach_type: u32) -> anyhow::Result<u32> {
        use std::os::fd::AsRawFd as _;
        let dir = std::fs::File::open(&self.path)?;
        // union bpf_attr's query: target_fd, attach_type, query_flags,
        // attach_flags, prog_ids (no buffer: only the count), prog_cnt.
        let mut attr = [0u32; 16];
        attr[0] = dir.as_raw_fd() as u32;
        attr[1] = attach_type;
        const BPF_PROG_QUERY: libc::c_long = 16;
        // SAFETY: a zeroed bpf_attr-sized buffer the kernel reads and writes.
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        anyhow::ensure!(r == 0, "BPF_PROG_QUERY on {}: {}", self.path.display(), std::io::Error::last_os_error());
        Ok(attr[6])
    }
}

/// This process's membership of a [`Cgroup`]; it goes back to the cgroup
/// it came from on drop.
pub struct Member {
    previous: PathBuf,
}

impl Cgroup {
    /// Moves this whole process (every thread) into the cgroup, so its own
    /// connections are served by hooks there. Only for a process doing
    /// nothing else meanwhile, as the benchmark.
    pub fn enter(&self) -> anyhow::Result<Member> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
        let previous = hierarchy()?.join(relative.trim_start_matches('/'));
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("entering cgroup {}", self.path.display()))?;
        Ok(Member { previous })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.previous.join("cgroup.procs"), std::process::id().to_string()) {
            eprintln!("could not move back to cgroup {}: {e}", self.previous.display());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes may take a moment to be reaped after exiting.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
