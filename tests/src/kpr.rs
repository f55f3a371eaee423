//! The real `kpr` binary, run inside the node namespace.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cgroup::Cgroup, netns::Netns, node::VirtualNode};

/// Where a kpr logging to `log` keeps its status file.
pub fn state_dir(log: &Path) -> PathBuf {
    log.parent().unwrap_or(Path::new(".")).join("state")
}

/// Runs `kpr ARGS` (status, cleanup, ...) inside `node` and returns stdout.
pub fn command(node: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let bin = binary()?;
    let mut cmd = vec![bin.to_str().context("binary path")?];
    cmd.extend_from_slice(args);
    node.output(&cmd)
}

/// Everything `kpr stats` says, read from the pins under `bpf_root`.
pub fn stats(node: &Netns, bpf_root: &Path) -> anyhow::Result<serde_json::Value> {
    let root = format!("--bpf-root={}", bpf_root.display());
    let out = command(node, &["stats", "-o", "json", &root])?;
    Ok(serde_json::from_str::<serde_json::Value>(&out)?)
}

/// The eBPF datapath's counters by name (`kpr stats`), read from the pins under `bpf_root`.
pub fn datapath_stats(node: &Netns, bpf_root: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(stats(node, bpf_root)?["datapath"].clone())
}

/// The `kpr` binary: `$KPR_BIN`, else the workspace's debug build (which
/// `cargo xtask test` builds before running the tests).
pub fn binary() -> anyhow::Result<PathBuf> {
    built("KPR_BIN", "debug/kpr", "build it with `cargo build -p proxy-userspace`")
}

/// The previous release's `kpr`, which upgrade tests start from:
/// `$KPR_PREVIOUS_BIN`, else what `cargo xtask test` builds from the commit
/// named in `xtask/previous-release`.
pub fn previous_release() -> anyhow::Result<PathBuf> {
    built("KPR_PREVIOUS_BIN", "previous-release/kpr", "`cargo xtask test` builds it")
}

/// The binary `$var` names, else `path` under the target folder.
fn built(var: &str, path: &str, how: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(p.into());
    }
    let bin = target_dir().join(path);
    if !bin.exists() {
        bail!("{} not found: {how} (or set {var})", bin.display());
    }
    Ok(bin)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The dataplane a test runs kpr with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    pub fn arg(self) -> &'static str {
        match self {
            Mode::Ebpf => "--mode=ebpf",
            Mode::Iptables => "--mode=iptables",
        }
    }
}

/// A running `kpr run`; stopped with SIGINT (as Ctrl-C) on drop.
pub struct Kpr {
    child: Option<Child>,
    log: PathBuf,
}

impl Kpr {
    /// Starts `kpr run --mode MODE --source dir:DIR --interfaces ...` in
    /// `node` and waits for its first sync.
    pub fn start(node: &VirtualNode, mode: Mode, manifests: &Path, log: &Path) -> anyhow::Result<Self> {
        let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display())];
        Self::start_with(node, &args, log, "synced")
    }

    /// Starts `kpr run ARGS` in `node` (as [`Kpr::spawn`]) and waits until its
    /// log shows `ready_line`. Its status goes to `state/` beside the log.
    pub fn start_with(node: &VirtualNode, args: &[String], log: &Path, ready_line: &str) -> anyhow::Result<Self> {
        let mut kpr = Self::spawn(node, args, log)?;
        kpr.wait_for_log(ready_line, Duration::from_secs(20))?;
        Ok(kpr)
    }

    /// Starts `kpr run ARGS` in `node`, attached to its pods' interfaces and
    /// its cgroup and pinning maps in its bpffs, without waiting.
    pub fn spawn(node: &VirtualNode, args: &[String], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_on(&node.ns, node.bpf_root(), &node.cgroup, &node.interfaces(), args, log)
    }

    /// Starts `kpr run ARGS` in namespace `ns` with its bpffs at `bpf_root`,
    /// its socket hooks on `cgroup` and its per-packet path on `interfaces`.
    pub fn spawn_on(
        ns: &Netns,
        bpf_root: &Path,
        cgroup: &Cgroup,
        interfaces: &[String],
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_build(&binary()?, ns, bpf_root, cgroup, interfaces, args, log)
    }

    /// [`Kpr::spawn_on`] with the `kpr` binary at `bin` (another build).
    pub fn spawn_build(
        bin: &Path,
        ns: &Netns,
        bpf_root: &Path,
        cgroup: &Cgroup,
        interfaces: &[String],
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut all = vec!["run".to_string()];
        all.extend_from_slice(args);
        all.push(format!("--bpf-root={}", bpf_root.display()));
        all.push(format!("--interfaces={}", interfaces.join(",")));
        all.push(format!("--cgroup-root={}", cgroup.path_for_agent().display()));
        all.push(format!("--state-dir={}", state_dir(log).display()));
        Self::process_build(bin, ns, &all, log)
    }

    /// Starts `kpr run ARGS` in namespace `ns` without waiting; its status
    /// goes to `state/` beside the log.
    pub fn run_in(ns: &Netns, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let mut all = vec!["run".to_string()];
        all.extend_from_slice(args);
        all.push(format!("--state-dir={}", state_dir(log).display()));
        Self::process(ns, &all, log)
    }

    /// Starts `kpr kubelet ARGS` in `ns` and waits for it to say it runs pods.
    pub fn kubelet(ns: &Netns, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let mut all = vec!["kubelet".to_string()];
        all.extend_from_slice(args);
        // Only the network namespace, as containerd: a kubelet works in the
        // machine's mount view (its cgroup hierarchies), which `ip netns
        // exec` would hide behind a fresh /sys.
        let log_file = std::fs::File::create(log)?;
        let mut cmd = Command::new(binary()?);
        cmd.args(&all)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let _netns = crate::netns::enter_before_exec(ns.name(), &mut cmd)?;
        let child = cmd.spawn().context("starting kpr kubelet")?;
        let mut kubelet = Self { child: Some(child), log: log.to_path_buf() };
        kubelet.wait_for_log("kubelet running pods", Duration::from_secs(20))?;
        Ok(kubelet)
    }

    fn process(ns: &Netns, args: &[String], log: &Path) -> anyhow::Result<Self> {
        Self::process_build(&binary()?, ns, args, log)
    }

    fn process_build(bin: &Path, ns: &Netns, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(bin)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting kpr {}", args[0]))?;
        Ok(Self { child: Some(child), log: log.to_path_buf() })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `count` times.
    pub fn wait_for_log_count(&mut self, needle: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("kpr exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("kpr did not log {needle:?} within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGINT (what Ctrl-C sends) and waits for the exit.
    pub fn interrupt(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop(libc::SIGINT)
    }

    /// Sends `signal` (SIGTERM as a DaemonSet's rollout, SIGKILL as the
    /// OOM killer) and waits for the exit.
    pub fn stop(&mut self, signal: i32) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("kpr already stopped")?;
        // `ip netns exec` execs kpr, so the child's PID is kpr's own.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill().ok();
                child.wait().ok();
                bail!("kpr did not exit within 10 s of signal {signal}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kpr {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.interrupt().ok();
        }
    }
}
