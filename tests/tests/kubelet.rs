//! `kpr kubelet` on a real containerd (Debian's, with runc and the CNI
//! bridge) in a network namespace of the test's own: pods from manifests
//! run with their init containers, logs, restart policies and back-off,
//! report their status beside the manifest, and go away when deleted.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use kpr_tests::{
    client::http_get,
    containerd::{BUSYBOX_IMAGE, Containerd},
    kpr::{self, Kpr},
    manifests::write,
    netns::{Netns, unique_prefix},
    root_or_skip,
};
use serde_json::Value;

/// A node namespace, containerd in it, a manifest folder and `kpr kubelet`.
struct Node {
    kubelet: Option<Kpr>,
    containerd: Containerd,
    manifests: tempfile::TempDir,
    root: tempfile::TempDir,
    ns: Netns,
}

impl Node {
    fn start() -> Self {
        let ns = Netns::new(&format!("{}-node", unique_prefix())).unwrap();
        ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
        let containerd = Containerd::start(&ns).expect("containerd starts");
        let manifests = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut node = Self { kubelet: None, containerd, manifests, root, ns };
        node.start_kubelet();
        node
    }

    fn start_kubelet(&mut self) {
        let args = vec![
            format!("--container-runtime-endpoint={}", self.containerd.endpoint()),
            format!("--source=dir:{}", self.manifests.path().display()),
            format!("--root-dir={}", self.root.path().display()),
            format!("--cgroup-parent={}", self.containerd.cgroup_parent),
            "--node-name=node-1".into(),
            "--restart-backoff=1s".into(),
        ];
        let log = self.root.path().join(format!("kubelet-{}.log", Instant::now().elapsed().as_nanos()));
        self.kubelet = Some(Kpr::kubelet(&self.ns, &args, &log).expect("kpr kubelet starts"));
    }

    fn log(&self) -> String {
        self.kubelet.as_ref().map(Kpr::log).unwrap_or_default()
    }

    /// The status of pod `name` from `file`'s status file, once `done` accepts it.
    fn wait_status(&self, file: &str, name: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let path = self.manifests.path().join(format!("{file}.status.json"));
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Ok(bytes) = std::fs::read(&path)
                && let Ok(Value::Array(pods)) = serde_json::from_slice::<Value>(&bytes)
                && let Some(pod) = pods.into_iter().find(|p| p["metadata"]["name"] == name)
            {
                if done(&pod["status"]) {
                    return pod["status"].clone();
                }
                last = pod["status"].clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "pod {name} did not reach the wanted state in {timeout:?}; last status:\n{last:#}\nkubelet log:\n{}\ncontainerd log tail:\n{}",
                    self.log(),
                    tail(&self.containerd.log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self, pod: &str, container: &str) -> String {
        let root = format!("--root-dir={}", self.root.path().display());
        kpr::command(&self.ns, &["kubelet", "logs", pod, "-c", container, &root]).unwrap_or_else(|e| format!("{e:#}"))
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn phase(s: &Value) -> &str {
    s["phase"].as_str().unwrap_or_default()
}

fn container<'a>(s: &'a Value, key: &str, name: &str) -> &'a Value {
    s[key].as_array().and_then(|l| l.iter().find(|c| c["name"] == name)).unwrap_or(&Value::Null)
}

const WEB: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  terminationGracePeriodSeconds: 2
  volumes: [{name: www, emptyDir: {}}]
  initContainers:
  - name: setup
    image: IMAGE
    command: [sh, -c, 'echo "hello from $(hostname)" > /www/index.html; echo init done']
    volumeMounts: [{name: www, mountPath: /www}]
  containers:
  - name: httpd
    image: IMAGE
    command: [httpd, -f, -p, '8080', -h, /www]
    volumeMounts: [{name: www, mountPath: /www, readOnly: true}]
  - name: ticker
    image: IMAGE
    command: [sh, -c, 'trap "exit 0" TERM; echo "ticker up with $GREETING"; while true; do sleep 1; done']
    env: [{name: GREETING, value: hi}]
"#;

fn manifest(text: &str) -> String {
    text.replace("IMAGE", BUSYBOX_IMAGE)
}

#[test]
fn a_pod_with_an_init_container_and_two_app_containers_runs_and_logs() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "web.yaml", &manifest(WEB)).unwrap();
    let s = node.wait_status("web.yaml", "web", Duration::from_secs(60), |s| {
        phase(s) == "Running" && s["containerStatuses"].as_array().is_some_and(|c| c.iter().all(|c| c["ready"] == true))
    });
    let setup = &container(&s, "initContainerStatuses", "setup")["state"]["terminated"];
    assert_eq!((setup["exitCode"].as_i64(), setup["reason"].as_str()), (Some(0), Some("Completed")), "{s:#}");
    let ip = s["podIP"].as_str().expect("a pod IP");
    assert!(ip.starts_with("10.88.0."), "an address from the CNI bridge: {ip}");
    let ready = s["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "True");

    // The init container's file, served from the shared emptyDir.
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    let (code, body) = node.ns.run(move || http_get(addr, "/", Duration::from_secs(3)).unwrap()).unwrap();
    assert_eq!((code, body.trim()), (200, "hello from web"));

    assert_eq!(node.logs("web", "setup").trim(), "init done");
    assert_eq!(node.logs("web", "ticker").trim(), "ticker up with hi");
    assert_eq!(container(&s, "containerStatuses", "ticker")["restartCount"], 0);
}
