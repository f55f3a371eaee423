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

const POLICIES: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'echo "crashing at $(date +%s)"; exit 3']}
---
apiVersion: v1
kind: Pod
metadata: {name: once}
spec:
  restartPolicy: OnFailure
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'echo done; exit 0']}
---
apiVersion: v1
kind: Pod
metadata: {name: retry}
spec:
  restartPolicy: OnFailure
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'exit 1']}
---
apiVersion: v1
kind: Pod
metadata: {name: never}
spec:
  restartPolicy: Never
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'exit 7']}
"#;

#[test]
fn exit_codes_and_restarts_follow_the_restart_policy_and_crashes_back_off() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "pods.yaml", &manifest(POLICIES)).unwrap();
    let app = |s: &Value| container(s, "containerStatuses", "app").clone();

    let once = node.wait_status("pods.yaml", "once", Duration::from_secs(60), |s| phase(s) == "Succeeded");
    let t = &app(&once)["state"]["terminated"];
    assert_eq!((t["exitCode"].as_i64(), t["reason"].as_str()), (Some(0), Some("Completed")), "{once:#}");
    assert_eq!(app(&once)["restartCount"], 0, "OnFailure does not restart a success");

    let never = node.wait_status("pods.yaml", "never", Duration::from_secs(60), |s| phase(s) == "Failed");
    let t = &app(&never)["state"]["terminated"];
    assert_eq!((t["exitCode"].as_i64(), t["reason"].as_str()), (Some(7), Some("Error")), "{never:#}");
    assert_eq!(app(&never)["restartCount"], 0);

    let retry = node.wait_status("pods.yaml", "retry", Duration::from_secs(60), |s| {
        app(s)["restartCount"].as_i64() >= Some(1)
    });
    assert_eq!(phase(&retry), "Running", "OnFailure restarts a failure: {retry:#}");

    // Always: restarted, with the kubelet's growing back-off in between.
    let started = Instant::now();
    let crash = node.wait_status("pods.yaml", "crash", Duration::from_secs(60), |s| {
        app(s)["state"]["waiting"]["reason"] == "CrashLoopBackOff" && app(s)["restartCount"].as_i64() >= Some(2)
    });
    assert_eq!(app(&crash)["lastState"]["terminated"]["exitCode"], 3, "{crash:#}");
    assert_eq!(phase(&crash), "Running");
    // Back-off of 1s doubling: by restart 4 at least 1 + 2 + 4 s have passed.
    node.wait_status("pods.yaml", "crash", Duration::from_secs(60), |s| app(s)["restartCount"].as_i64() >= Some(4));
    assert!(started.elapsed() >= Duration::from_secs(7), "restarts came too fast: {:?}", started.elapsed());
    let message = app(&node.wait_status("pods.yaml", "crash", Duration::from_secs(30), |s| {
        app(s)["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    }))["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("back-off 8s") || message.contains("back-off 16s"), "{message}");
    assert!(node.logs("crash", "app").starts_with("crashing at"), "the latest instance's log");
}

#[test]
fn deleting_a_pod_stops_and_removes_everything() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "web.yaml", &manifest(WEB)).unwrap();
    node.wait_status("web.yaml", "web", Duration::from_secs(60), |s| phase(s) == "Running");
    let pod_dirs = |what: &str| std::fs::read_dir(node.root.path().join(what)).map(|d| d.count()).unwrap_or(0);
    assert_eq!((pod_dirs("pods"), pod_dirs("logs")), (1, 1));

    std::fs::remove_file(node.manifests.path().join("web.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sandboxes = node.containerd.ctr("k8s.io", &["containers", "ls", "-q"]).unwrap();
        let tasks = node.containerd.ctr("k8s.io", &["tasks", "ls", "-q"]).unwrap();
        let gone = sandboxes.trim().is_empty() && tasks.trim().is_empty() && pod_dirs("pods") + pod_dirs("logs") == 0;
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "still there: {sandboxes} {tasks}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!node.manifests.path().join("web.yaml.status.json").exists(), "the status file went with the pod");
    // The grace period (2 s) was given: httpd ignores SIGTERM as PID 1.
    assert!(node.log().contains("pod removed"), "{}", node.log());
}

const PULLS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: missing}
spec:
  containers:
  - {name: app, image: 127.0.0.1:5000/kpr/nothing-here:1}
---
apiVersion: v1
kind: Pod
metadata: {name: pulled}
spec:
  containers:
  - {name: app, image: 127.0.0.1:5000/kpr/pulled:1, command: [sh, -c, 'echo pulled and running; while true; do sleep 1; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: local}
spec:
  containers:
  - {name: app, image: IMAGE, imagePullPolicy: Never, command: [sh, -c, 'while true; do sleep 1; done']}
"#;

#[test]
fn a_missing_image_reports_errimagepull_while_other_pods_run_and_pull() {
    root_or_skip!();
    let node = Node::start();
    let _registry = kpr_tests::containerd::Registry::start(&node.ns).expect("registry");
    node.containerd.push("127.0.0.1:5000/kpr/pulled:1", &["/bin/sh"]).expect("push to the local registry");
    let images = node.containerd.ctr("k8s.io", &["images", "ls", "-q"]).unwrap();
    assert!(!images.contains("kpr/pulled"), "the CRI must pull it itself:\n{images}");
    write(node.manifests.path(), "pods.yaml", &manifest(PULLS)).unwrap();

    let app = |s: &Value| container(s, "containerStatuses", "app").clone();
    let reason = |s: &Value| app(s)["state"]["waiting"]["reason"].as_str().unwrap_or_default().to_string();
    let first = node.wait_status("pods.yaml", "missing", Duration::from_secs(60), |s| !reason(s).is_empty());
    assert_eq!(reason(&first), "ErrImagePull", "{first:#}");
    assert!(app(&first)["state"]["waiting"]["message"].as_str().unwrap().contains("nothing-here"));
    let later = node.wait_status("pods.yaml", "missing", Duration::from_secs(30), |s| reason(s) == "ImagePullBackOff");
    assert_eq!(phase(&later), "Pending");

    let pulled = node.wait_status("pods.yaml", "pulled", Duration::from_secs(60), |s| phase(s) == "Running");
    assert!(app(&pulled)["imageID"].as_str().unwrap().contains("sha256:"), "{pulled:#}");
    assert_eq!(node.logs("pulled", "app").trim(), "pulled and running");
    node.wait_status("pods.yaml", "local", Duration::from_secs(30), |s| phase(s) == "Running");
}

#[test]
fn restarting_the_kubelet_or_containerd_keeps_pods_running_and_tracked() {
    root_or_skip!();
    let mut node = Node::start();
    write(node.manifests.path(), "web.yaml", &manifest(WEB)).unwrap();
    let running = |s: &Value| phase(s) == "Running" && container(s, "containerStatuses", "httpd")["ready"] == true;
    let before = node.wait_status("web.yaml", "web", Duration::from_secs(60), running);
    let ids = |s: &Value| {
        s["containerStatuses"].as_array().unwrap().iter().map(|c| c["containerID"].clone()).collect::<Vec<_>>()
    };
    let ip = before["podIP"].as_str().unwrap().to_string();
    let serves = |node: &Node| {
        let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
        node.ns.run(move || http_get(addr, "/", Duration::from_secs(3)).map(|r| r.0)).unwrap().ok() == Some(200)
    };
    let sandboxes = |node: &Node| node.containerd.ctr("k8s.io", &["containers", "ls", "-q"]).unwrap().lines().count();
    let count = sandboxes(&node);

    // The kubelet goes away and comes back: it adopts the pod.
    node.kubelet.take().unwrap().interrupt().unwrap();
    assert!(serves(&node), "pods run without the kubelet");
    node.start_kubelet();
    std::thread::sleep(Duration::from_secs(3));
    let after = node.wait_status("web.yaml", "web", Duration::from_secs(30), running);
    assert_eq!(ids(&after), ids(&before), "the same containers, adopted:\n{}", node.log());
    assert_eq!(sandboxes(&node), count, "nothing started twice");

    // containerd goes away and comes back: the shims kept the pod running.
    node.containerd.restart().unwrap();
    assert!(serves(&node), "pods run across a containerd restart");
    std::thread::sleep(Duration::from_secs(3));
    let after = node.wait_status("web.yaml", "web", Duration::from_secs(30), running);
    assert_eq!(ids(&after), ids(&before), "still the same containers:\n{}", node.log());
    assert_eq!(container(&after, "containerStatuses", "httpd")["restartCount"], 0);
    assert_eq!(sandboxes(&node), count);
}
