//! Network namespaces that delete themselves when dropped.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context as _, bail};

/// Runs `ip ARGS...` and fails with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is it installed? cargo xtask setup installs it)"))?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A unique name prefix per test run: process id plus a counter, short
/// enough for interface and namespace names.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("kpr{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

/// Has `cmd` enter network namespace `name`, and only it, between fork and
/// exec (a daemon started there keeps the machine's mounts and cgroups, as
/// containerd and a kubelet need). The returned file must live until `cmd`
/// is spawned.
pub fn enter_before_exec(name: &str, cmd: &mut std::process::Command) -> std::io::Result<std::fs::File> {
    let netns = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns is async-signal-safe; only the network namespace changes.
    unsafe {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let fd = netns.as_raw_fd();
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(netns)
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        // A namespace left by a killed earlier run with the same name goes first.
        ip(&["netns", "del", name]).ok();
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn output(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(cmd).output()?;
        if !out.status.success() {
            bail!("{} failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets an offload of interface `dev` as `ethtool -K` does (the harness
    /// has no ethtool): `Offload::TxChecksum` off makes what leaves `dev`
    /// carry complete checksums, as a packet on a real wire does (a veth
    /// otherwise hands its peer a partial one, which XDP cannot tell).
    pub fn set_offload(&self, dev: &str, offload: Offload, on: bool) -> anyhow::Result<()> {
        let dev = dev.to_string();
        self.run(move || ethtool_set(&dev, offload as u32, on))?
            .with_context(|| format!("setting {offload:?} on {}", self.name))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// opens live in the namespace for their whole life.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<thread::JoinHandle<T>> {
        spawn_in(&self.name, f)
    }

    /// Runs `f` inside the namespace and waits for its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        run_in(&self.name, f)
    }
}

/// [`Netns::run`] by namespace name, for closures that outlive a borrow.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    spawn_in(name, f)?.join().map_err(|panic| anyhow::anyhow!("thread in namespace {name} panicked: {panic:?}"))
}

fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<thread::JoinHandle<T>> {
    let file = File::open(format!("/run/netns/{name}")).with_context(|| format!("opening namespace {name}"))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        // setns affects only the calling thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        ready_tx.send(if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }).ok();
        if rc != 0 {
            panic!("setns failed");
        }
        f()
    });
    ready_rx.recv().context("namespace thread died")?.context("entering the namespace")?;
    Ok(handle)
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces (and veth peers) too.
        ip(&["netns", "del", &self.name]).ok();
    }
}

/// Offloads [`Netns::set_offload`] sets: their ethtool "set" commands.
#[derive(Clone, Copy, Debug)]
pub enum Offload {
    TxChecksum = 0x17,
    /// On a veth, GRO turned on while the link is up gives it a NAPI queue.
    Gro = 0x2c,
}

/// `ioctl(SIOCETHTOOL)` with a `struct ethtool_value`, in the calling thread's namespace.
fn ethtool_set(dev: &str, cmd: u32, on: bool) -> anyhow::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd, data: u32::from(on) };
    // SAFETY: ifreq is plain data; the name is NUL-terminated within IFNAMSIZ
    // and ifru_data points at `value`, alive for the call.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        anyhow::ensure!(dev.len() < libc::IFNAMSIZ, "interface name {dev:?} too long");
        for (i, b) in dev.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&raw mut value).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, 0x8946, &raw mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(rc == 0, "SIOCETHTOOL on {dev}: {err}");
    }
    Ok(())
}
