//! A real containerd (Debian's, with runc and the CNI plugins) for the
//! kubelet tests: its state, sockets and CNI bridge live in a temp folder
//! and a network namespace of the test's own; images are built locally as
//! OCI tarballs from busybox-static; a local registry serves real pulls.
//! Drop removes every sandbox, stops containerd and the registry, and
//! cleans the mounts, cgroups and CNI cache it left.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sha2::Digest as _;

use crate::netns::{Netns, unique_prefix};

const BUSYBOX: &str = "/bin/busybox";
/// Applets linked into the test image.
const APPLETS: &[&str] =
    &["sh", "sleep", "echo", "cat", "httpd", "true", "false", "ls", "env", "hostname", "mkdir", "date", "printf"];
/// The sandbox ("pause") image, imported before containerd serves pods.
pub const PAUSE_IMAGE: &str = "docker.io/kpr/pause:test";
/// A busybox image with a shell and httpd.
pub const BUSYBOX_IMAGE: &str = "docker.io/kpr/busybox:test";

/// A running containerd serving CRI inside `netns`.
pub struct Containerd {
    child: Option<Child>,
    netns: String,
    dir: tempfile::TempDir,
    network: String,
    /// What pod sandboxes get as cgroup parent (removed on drop).
    pub cgroup_parent: String,
}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds an OCI image layout tarball at `out` named `name`: one layer
/// holding busybox-static and its applets, running `cmd` by default.
pub fn build_image(out: &Path, name: &str, cmd: &[&str]) -> anyhow::Result<()> {
    build_image_as(out, name, cmd, "")
}

/// As [`build_image`], with the image's `User` (`"1000"`, `"1000:1000"`, a name, or none).
pub fn build_image_as(out: &Path, name: &str, cmd: &[&str], user: &str) -> anyhow::Result<()> {
    if !Path::new(BUSYBOX).exists() {
        bail!("{BUSYBOX} missing: `cargo xtask setup` installs busybox-static");
    }
    let work = tempfile::tempdir()?;
    let root = work.path().join("rootfs");
    for d in ["bin", "tmp", "proc", "sys", "dev", "etc", "www", "data"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let layer_tar = work.path().join("layer.tar");
    run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&layer_tar).arg("."))?;
    let layer = std::fs::read(&layer_tar)?;
    let layout = work.path().join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let blob = |bytes: &[u8]| -> anyhow::Result<(String, usize)> {
        let digest = sha256(bytes);
        std::fs::write(blobs.join(&digest), bytes)?;
        Ok((format!("sha256:{digest}"), bytes.len()))
    };
    let (layer_digest, layer_size) = blob(&layer)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "User": user},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&serde_json::to_vec(&manifest)?)?;
    let tag = name.rsplit(':').next().unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(out).arg("."))?;
    Ok(())
}

impl Containerd {
    /// Starts containerd in `netns` (only the network namespace: runc needs
    /// the machine's cgroup and mount view) and imports the pause and
    /// busybox images.
    pub fn start(netns: &Netns) -> anyhow::Result<Self> {
        for bin in ["containerd", "runc", "ctr"] {
            if Command::new("which").arg(bin).output().map(|o| !o.status.success()).unwrap_or(true) {
                bail!("{bin} not found: `cargo xtask setup` installs containerd, runc and the CNI plugins");
            }
        }
        let prefix = unique_prefix();
        let dir = tempfile::Builder::new().prefix("kpr-containerd-").tempdir()?;
        let d = dir.path().display().to_string();
        let network = format!("{prefix}-pods");
        std::fs::create_dir_all(dir.path().join("cni"))?;
        std::fs::write(
            dir.path().join("cni/10-pods.conflist"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "cniVersion": "0.4.0", "name": network,
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
                     "ipam": {"type": "host-local", "dataDir": format!("{d}/ipam"),
                              "ranges": [[{"subnet": "10.88.0.0/24", "gateway": "10.88.0.1"}]],
                              "routes": [{"dst": "0.0.0.0/0"}]}},
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                ],
            }))?,
        )?;
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."127.0.0.1:5000"]
    endpoint = ["http://127.0.0.1:5000"]
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )?;
        let mut c = Self {
            child: None,
            netns: netns.name().to_string(),
            dir,
            network,
            cgroup_parent: format!("/{prefix}-pods"),
        };
        c.spawn()?;
        let images = c.dir.path().join("images");
        std::fs::create_dir_all(&images)?;
        for (name, cmd) in [(PAUSE_IMAGE, &["/bin/sleep", "2147483647"][..]), (BUSYBOX_IMAGE, &["/bin/sh"][..])] {
            let tar = images.join(format!("{}.tar", sha256(name.as_bytes())));
            build_image(&tar, name, cmd)?;
            c.ctr("k8s.io", &["images", "import", tar.to_str().context("path")?])?;
        }
        Ok(c)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("containerd.log"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(self.dir.path().join("config.toml"));
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let _netns = crate::netns::enter_before_exec(&self.netns, &mut cmd)?;
        self.child = Some(cmd.spawn().context("starting containerd")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ctr("k8s.io", &["version"]).is_err() {
            if Instant::now() > deadline {
                bail!("containerd did not answer within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops containerd (SIGTERM) and starts it again; running containers
    /// keep running under their shims.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Starts containerd again after [`Containerd::stop`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s); running
    /// containers keep running under their shims.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `unix://…` for `--container-runtime-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this containerd in containerd namespace `ns`,
    /// from inside the network namespace (so it reaches the local registry).
    pub fn ctr(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.socket();
        run(Command::new("ip")
            .args(["netns", "exec", &self.netns, "ctr", "-a"])
            .arg(&socket)
            .args(["-n", ns])
            .args(args))
    }

    /// Builds `name` running as `user` and imports it into the CRI's images.
    pub fn import(&self, name: &str, cmd: &[&str], user: &str) -> anyhow::Result<()> {
        let tar = self.dir.path().join("import.tar");
        build_image_as(&tar, name, cmd, user)?;
        self.ctr("k8s.io", &["images", "import", tar.to_str().context("path")?])?;
        Ok(())
    }

    /// Builds `name` and pushes it to the registry at `registry` (e.g.
    /// `127.0.0.1:5000/kpr/web:1`) without leaving it in the CRI's images.
    pub fn push(&self, name: &str, cmd: &[&str]) -> anyhow::Result<()> {
        let tar = self.dir.path().join("push.tar");
        build_image(&tar, name, cmd)?;
        self.ctr("kpr-push", &["images", "import", tar.to_str().context("path")?])?;
        self.ctr("kpr-push", &["images", "push", "--plain-http", name, name])?;
        Ok(())
    }

    /// Removes every pod the kubelet made, through CRI (so containerd tears
    /// down their network namespaces and CNI state).
    fn remove_all_pods(&self) {
        let endpoint = format!("--container-runtime-endpoint={}", self.endpoint());
        if let Ok(bin) = crate::kpr::binary() {
            Command::new(bin).args(["kubelet", "reset", &endpoint]).output().ok();
        }
    }
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return vec![] };
    let mut found: Vec<PathBuf> =
        info.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).filter(|p| p.starts_with(dir)).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Removes a cgroup folder tree (only empty cgroups can go).
fn remove_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    std::fs::remove_dir(path).ok();
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_pods();
        self.stop();
        for m in mounts_under(self.dir.path()) {
            if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.flatten() {
                remove_cgroup(&c.path().join(self.cgroup_parent.trim_start_matches('/')));
            }
        }
        // libcni caches results per network in /var/lib/cni; ours has a unique name.
        if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.network) {
                    std::fs::remove_file(e.path()).ok();
                }
            }
        }
    }
}

/// Debian's docker-registry on 127.0.0.1:5000 inside a network namespace.
pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(netns: &Netns) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("kpr-registry-").tempdir()?;
        let config = dir.path().join("config.yml");
        let mut f = std::fs::File::create(&config)?;
        write!(
            f,
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: 127.0.0.1:5000}}\n",
            dir.path().join("data").display()
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns.name(), "docker-registry", "serve"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log"))?)
            .spawn()
            .context("starting docker-registry (`cargo xtask setup` installs it)")?;
        let registry = Self { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while netns
            .run(|| {
                std::net::TcpStream::connect_timeout(&"127.0.0.1:5000".parse().unwrap(), Duration::from_millis(200))
            })
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            if Instant::now() > deadline {
                bail!("the registry did not listen within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // `ip netns exec` execs the registry: this PID is its own.
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
