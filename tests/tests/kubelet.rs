//! `kpr kubelet` on a real containerd (Debian's, with runc and the CNI
//! bridge) in a network namespace of the test's own: pods from manifests
//! run with their init containers, logs, restart policies and back-off,
//! report their status beside the manifest, and go away when deleted.

use std::{
    collections::BTreeMap,
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
    /// Where pods come from (`--source`, `--kubeconfig`).
    source: Vec<String>,
    containerd: Containerd,
    manifests: tempfile::TempDir,
    root: tempfile::TempDir,
    ns: Netns,
}

impl Node {
    /// With static pods from the manifest folder.
    fn start() -> Self {
        let mut node = Self::without_kubelet();
        node.source = vec![format!("--source=dir:{}", node.manifests.path().display())];
        node.start_kubelet();
        node
    }

    fn without_kubelet() -> Self {
        let ns = Netns::new(&format!("{}-node", unique_prefix())).unwrap();
        ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
        let containerd = Containerd::start(&ns).expect("containerd starts");
        let manifests = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        Self { kubelet: None, source: vec![], containerd, manifests, root, ns }
    }

    fn start_kubelet(&mut self) {
        let mut args = self.source.clone();
        args.extend([
            format!("--container-runtime-endpoint={}", self.containerd.endpoint()),
            format!("--root-dir={}", self.root.path().display()),
            format!("--cgroup-parent={}", self.containerd.cgroup_parent),
            "--node-name=node-1".into(),
            "--restart-backoff=1s".into(),
        ]);
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

    /// `container`'s log once `done` accepts it (or a failure after `within`).
    fn wait_logs(&self, pod: &str, container: &str, within: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.logs(pod, container);
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "{pod}/{container} did not log what was awaited:\n{log}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
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
    command: [sh, -c, 'trap "exit 0" TERM; echo "ticker up with $GREETING"; while true; do sleep 1; echo tick; done']
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
    assert!(node.logs("web", "ticker").starts_with("ticker up with hi\n"), "{}", node.logs("web", "ticker"));

    // `-f` keeps printing what the container writes.
    let mut follow = std::process::Command::new("ip")
        .args(["netns", "exec", node.ns.name()])
        .arg(kpr::binary().unwrap())
        .args(["kubelet", "logs", "default/web", "-c", "ticker", "-f"])
        .arg(format!("--root-dir={}", node.root.path().display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            tx.send(line).ok();
        }
    });
    let before = node.logs("web", "ticker").lines().count();
    let seen: Vec<String> = (0..before + 2).map_while(|_| rx.recv_timeout(Duration::from_secs(5)).ok()).collect();
    // `ip netns exec` execs kpr: this PID is kpr's own.
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert_eq!(
        seen.get(before..),
        Some(&["tick".to_string(), "tick".to_string()][..]),
        "new lines arrive while following: {seen:?}"
    );
    let now = node.wait_status("web.yaml", "web", Duration::from_secs(1), |_| true);
    assert_eq!(container(&now, "containerStatuses", "ticker")["restartCount"], 0, "{now:#}");
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

    let retry =
        node.wait_status("pods.yaml", "retry", Duration::from_secs(60), |s| app(s)["restartCount"].as_i64() >= Some(1));
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
    // Only the newest dead instance of a container is kept: 4 sandboxes,
    // at most 2 instances for each restarting pod, 1 for each finished one.
    // (Without that, the 5 instances of `crash` alone would make 12.)
    let all = node.containerd.ctr("k8s.io", &["containers", "ls", "-q"]).unwrap().lines().count();
    assert!(all <= 4 + 2 + 2 + 1 + 1, "{all} containers: old instances pile up");
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
    assert!(images.contains(BUSYBOX_IMAGE), "the listing shows the imported images:\n{images}");
    assert!(!images.contains("kpr/pulled"), "the CRI must pull it itself:\n{images}");
    write(node.manifests.path(), "pods.yaml", &manifest(PULLS)).unwrap();

    let app = |s: &Value| container(s, "containerStatuses", "app").clone();
    let reason = |s: &Value| app(s)["state"]["waiting"]["reason"].as_str().unwrap_or_default().to_string();
    // (Before its first pull it is ContainerCreating, as with the kubelet.)
    let first = node.wait_status("pods.yaml", "missing", Duration::from_secs(60), |s| reason(s) == "ErrImagePull");
    assert!(app(&first)["state"]["waiting"]["message"].as_str().unwrap().contains("nothing-here"));
    let later = node.wait_status("pods.yaml", "missing", Duration::from_secs(30), |s| reason(s) == "ImagePullBackOff");
    assert_eq!(phase(&later), "Pending");

    let pulled = node.wait_status("pods.yaml", "pulled", Duration::from_secs(60), |s| phase(s) == "Running");
    assert!(app(&pulled)["imageID"].as_str().unwrap().contains("sha256:"), "{pulled:#}");
    assert_eq!(node.logs("pulled", "app").trim(), "pulled and running");
    node.wait_status("pods.yaml", "local", Duration::from_secs(30), |s| phase(s) == "Running");
}

/// A pod added after a restart: once it runs, the kubelet has synced
/// against what was restarted.
const WITNESS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: witness}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'while true; do sleep 1; done']}
"#;

/// The runtime's tasks as `ctr tasks ls` lists them: container id -> (PID, status).
fn tasks(node: &Node) -> BTreeMap<String, (String, String)> {
    let out = node.containerd.ctr("k8s.io", &["tasks", "ls"]).unwrap();
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), (f.next()?.to_string(), f.next()?.to_string())))
        })
        .collect()
}

#[test]
fn restarting_the_kubelet_or_containerd_keeps_pods_running_and_tracked() {
    root_or_skip!();
    let mut node = Node::start();
    write(node.manifests.path(), "web.yaml", &manifest(WEB)).unwrap();
    let running = |s: &Value| phase(s) == "Running" && container(s, "containerStatuses", "httpd")["ready"] == true;
    let before = node.wait_status("web.yaml", "web", Duration::from_secs(60), running);
    // What the kubelet reports and what the runtime runs, for comparison
    // with the same read again after each restart.
    let reported = |s: &Value| {
        let containers: Vec<(String, i64)> = s["containerStatuses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["containerID"].as_str().unwrap_or_default().to_string(), c["restartCount"].as_i64().unwrap()))
            .collect();
        (s["podIP"].as_str().unwrap_or_default().to_string(), containers)
    };
    let (ip, containers) = reported(&before);
    assert_eq!(containers.len(), 2, "{before:#}");
    let running_tasks = tasks(&node);
    for (id, restarts) in &containers {
        let id = id.strip_prefix("containerd://").unwrap_or_else(|| panic!("a containerd id: {id}"));
        assert_eq!(running_tasks.get(id).map(|t| t.1.as_str()), Some("RUNNING"), "{id}: {running_tasks:?}");
        assert_eq!(*restarts, 0);
    }
    let serves = |node: &Node| {
        let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
        node.ns.run(move || http_get(addr, "/", Duration::from_secs(3)).map(|r| r.0)).unwrap().ok() == Some(200)
    };
    let all_containers = |node: &Node| {
        let mut ids: Vec<String> =
            node.containerd.ctr("k8s.io", &["containers", "ls", "-q"]).unwrap().lines().map(String::from).collect();
        ids.sort();
        ids
    };
    let created = all_containers(&node);

    // The kubelet goes away and comes back: it adopts the pod. Its status
    // file goes too, so the status read next can only be the new kubelet's.
    node.kubelet.take().unwrap().interrupt().unwrap();
    assert!(serves(&node), "pods run without the kubelet");
    std::fs::remove_file(node.manifests.path().join("web.yaml.status.json")).unwrap();
    node.start_kubelet();
    // Its very first report says the pod runs: never a moment of Pending
    // that would take it out of its Services.
    let first = node.wait_status("web.yaml", "web", Duration::from_secs(30), |_| true);
    assert!(running(&first), "the first status after a restart: {first:#}");
    let after = node.wait_status("web.yaml", "web", Duration::from_secs(30), running);
    assert_eq!(reported(&after), (ip.clone(), containers.clone()), "the same containers, adopted:\n{}", node.log());
    assert_eq!(tasks(&node), running_tasks, "the same processes: nothing restarted");
    assert_eq!(all_containers(&node), created, "nothing created twice");

    // containerd goes away and comes back: the shims kept the pod running.
    node.containerd.restart().unwrap();
    assert!(serves(&node), "pods run across a containerd restart");
    assert_eq!(tasks(&node), running_tasks, "the restarted containerd finds the same processes");
    write(node.manifests.path(), "witness.yaml", &manifest(WITNESS)).unwrap();
    node.wait_status("witness.yaml", "witness", Duration::from_secs(60), |s| phase(s) == "Running");
    // The sync that started the witness reported web as well.
    let after = node.wait_status("web.yaml", "web", Duration::from_secs(1), running);
    assert_eq!(reported(&after), (ip, containers), "still the same containers:\n{}", node.log());
    let now = tasks(&node);
    for (id, task) in &running_tasks {
        assert_eq!(now.get(id), Some(task), "{id} kept its process: {now:?}");
    }
    let now = all_containers(&node);
    assert!(created.iter().all(|id| now.contains(id)), "{created:?} -> {now:?}");
    assert_eq!(now.len(), created.len() + 2, "only the witness's sandbox and container are new: {now:?}");
}

const SERVERS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: NAME, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: IMAGE
    command: [sh, -c, 'mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 8080 -h /www']
"#;

/// The node-side veths the CNI bridge plugin made, for `kpr run --interfaces`.
fn cni_veths(ns: &Netns) -> Vec<String> {
    let out = ns.output(&["ip", "-o", "link", "show", "type", "veth"]).unwrap();
    out.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap().to_string()).collect()
}

/// A client pod on the node's CNI bridge, as the CNI plugin would attach one.
fn client_on_bridge(node: &Node) -> Netns {
    let client = Netns::new(&format!("{}-client", unique_prefix())).unwrap();
    let n = node.ns.name();
    kpr_tests::netns::ip(&[
        "-n",
        n,
        "link",
        "add",
        "vclient",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        client.name(),
    ])
    .unwrap();
    kpr_tests::netns::ip(&["-n", n, "link", "set", "vclient", "master", "cni0", "up"]).unwrap();
    let c = client.name();
    kpr_tests::netns::ip(&["-n", c, "addr", "add", "10.88.0.200/24", "dev", "eth0"]).unwrap();
    kpr_tests::netns::ip(&["-n", c, "link", "set", "eth0", "up"]).unwrap();
    kpr_tests::netns::ip(&["-n", c, "route", "add", "default", "via", "10.88.0.1"]).unwrap();
    node.ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    client
}

#[test]
fn the_whole_node_serves_kubelet_pods_through_a_clusterip() {
    root_or_skip!();
    let node = Node::start();
    for name in ["web-1", "web-2"] {
        write(node.manifests.path(), &format!("{name}.yaml"), &manifest(&SERVERS.replace("NAME", name))).unwrap();
    }
    let ips: Vec<std::net::Ipv4Addr> = ["web-1", "web-2"]
        .iter()
        .map(|name| {
            let s = node.wait_status(&format!("{name}.yaml"), name, Duration::from_secs(60), |s| {
                phase(s) == "Running" && s["podIP"].is_string()
            });
            s["podIP"].as_str().unwrap().parse().unwrap()
        })
        .collect();

    let client = client_on_bridge(&node);

    // The Service and its EndpointSlice name the CRI-assigned addresses.
    let services = tempfile::tempdir().unwrap();
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 10);
    let endpoints = [("web-1", ips[0]), ("web-2", ips[1])];
    write(services.path(), "web.yaml", &kpr_tests::manifests::web_service("web", vip, &endpoints)).unwrap();
    let args = vec![
        "--mode=ebpf".to_string(),
        format!("--source=dir:{}", services.path().display()),
        format!("--interfaces={}", cni_veths(&node.ns).join(",")),
        "--healthz-bind-address=127.0.0.1:10256".into(),
    ];
    let mut proxy = Kpr::run_in(&node.ns, &args, &services.path().join("kpr.log")).unwrap();
    proxy.wait_for_log("synced", Duration::from_secs(20)).unwrap();

    let answers = client
        .run(move || {
            (0..40)
                .map(|_| {
                    http_get(SocketAddr::from((vip, 80)), "/", Duration::from_secs(3)).map(|r| r.1.trim().to_string())
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut by_pod = std::collections::BTreeMap::<String, usize>::new();
    for a in answers {
        *by_pod.entry(a.unwrap_or_else(|e| format!("error: {e}"))).or_default() += 1;
    }
    assert_eq!(
        by_pod.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "both pods answer the ClusterIP: {by_pod:?}\n{}",
        proxy.log()
    );
}

const CONFIGURED: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web-front, namespace: default}
spec: {clusterIP: 10.96.0.99, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: default}
data: {greeting: GREETING, mode: fast}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: default}
data: {password: aHVudGVyMg==}
---
apiVersion: v1
kind: Pod
metadata: {name: configured, namespace: default, labels: {app: configured}}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - {name: settings, configMap: {name: settings}}
  - {name: info, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'echo "password=$PASSWORD ip=$POD_IP mode=$mode says=$(WORD) front=$WEB_FRONT_SERVICE_HOST:$WEB_FRONT_SERVICE_PORT_HTTP"; cat /etc/info/labels; echo; while true; do echo "file=$(cat /etc/settings/greeting)"; sleep 0.3; done']
    envFrom: [{configMapRef: {name: settings}}]
    env:
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: WORD, value: 'mode-$(mode)'}
    volumeMounts: [{name: settings, mountPath: /etc/settings}, {name: info, mountPath: /etc/info}]
---
apiVersion: v1
kind: Pod
metadata: {name: waits, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'echo "late=$LATE"; while true; do sleep 1; done']
    env: [{name: LATE, valueFrom: {configMapKeyRef: {name: later, key: value}}}]
"#;

/// ConfigMaps, Secrets and Services beside the pods: a ConfigMap volume
/// (updated in place when its ConfigMap changes), a downwardAPI volume, a
/// Secret, the pod's IP and a Service's address as variables, `envFrom`
/// and `$(VAR)` expansion; a pod
/// whose ConfigMap is missing waits with CreateContainerConfigError and
/// starts once it appears.
#[test]
fn config_maps_and_secrets_reach_pods_as_files_and_variables() {
    root_or_skip!();
    let node = Node::start();
    let configured = |greeting: &str| manifest(CONFIGURED).replace("GREETING", greeting);
    write(node.manifests.path(), "configured.yaml", &configured("hello")).unwrap();
    let s = node.wait_status("configured.yaml", "configured", Duration::from_secs(60), |s| phase(s) == "Running");
    let ip = s["podIP"].as_str().expect("a pod IP").to_string();
    let log = node.wait_logs("configured", "app", Duration::from_secs(10), |l| l.contains("file=hello"));
    let mut lines = log.lines();
    assert_eq!(
        lines.next(),
        Some(format!("password=hunter2 ip={ip} mode=fast says=mode-fast front=10.96.0.99:80").as_str()),
        "{log}"
    );
    assert_eq!(lines.next(), Some("app=\"configured\""), "{log}");

    let waiting = node.wait_status("configured.yaml", "waits", Duration::from_secs(10), |s| {
        container(s, "containerStatuses", "app")["state"]["waiting"]["reason"] == "CreateContainerConfigError"
    });
    let message = container(&waiting, "containerStatuses", "app")["state"]["waiting"]["message"].clone();
    assert_eq!(message, "configmap \"later\" not found", "{waiting:#}");

    // The ConfigMap changes: the file follows while the container runs.
    write(node.manifests.path(), "configured.yaml", &configured("goodbye")).unwrap();
    // The volume follows its ConfigMap.
    node.wait_logs("configured", "app", Duration::from_secs(10), |l| l.contains("file=goodbye"));
    let later =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: later, namespace: default}\ndata: {value: arrived}\n";
    write(node.manifests.path(), "later.yaml", later).unwrap();
    node.wait_status("configured.yaml", "waits", Duration::from_secs(20), |s| phase(s) == "Running");
    node.wait_logs("waits", "app", Duration::from_secs(10), |l| l.trim() == "late=arrived");
    let s = node.wait_status("configured.yaml", "configured", Duration::from_secs(1), |_| true);
    assert_eq!(container(&s, "containerStatuses", "app")["restartCount"], 0, "updated in place: {s:#}");
}

const PROBED: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: slow, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: IMAGE
    command: [sh, -c, 'mkdir -p /tmp/www; echo ok > /tmp/www/index.html; sleep 3; exec httpd -f -p 8080 -h /tmp/www']
    ports: [{name: http, containerPort: 8080}]
    startupProbe: {tcpSocket: {port: 8080}, periodSeconds: 1, failureThreshold: 30}
    readinessProbe: {httpGet: {path: /index.html, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: hangs, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'touch /tmp/alive; sleep 2; rm /tmp/alive; echo hung; sleep 1000']
    livenessProbe: {exec: {command: [cat, /tmp/alive]}, periodSeconds: 1, failureThreshold: 2}
"#;

/// Probes as the kubelet runs them: a startup probe (tcpSocket) holds the
/// container not started until its server listens, a readiness probe
/// (httpGet on a named port) keeps it and its pod not ready until then; a
/// liveness probe (exec) that keeps failing has a hung container killed
/// and restarted.
#[test]
fn probes_gate_readiness_and_restart_a_hung_container() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "probed.yaml", &manifest(PROBED)).unwrap();
    let early = node.wait_status("probed.yaml", "slow", Duration::from_secs(60), |s| phase(s) == "Running");
    let web = container(&early, "containerStatuses", "web");
    assert_eq!((web["ready"].as_bool(), web["started"].as_bool()), (Some(false), Some(false)), "{early:#}");
    let pod_ready =
        |s: &Value| s["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
    assert!(!pod_ready(&early), "not ready before the server listens: {early:#}");
    let ready = node.wait_status("probed.yaml", "slow", Duration::from_secs(15), |s| {
        container(s, "containerStatuses", "web")["ready"] == true
    });
    assert!(pod_ready(&ready), "{ready:#}");
    assert_eq!(container(&ready, "containerStatuses", "web")["started"], true);
    let ip = ready["podIP"].as_str().unwrap().to_string();
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    let (code, _) = node.ns.run(move || http_get(addr, "/index.html", Duration::from_secs(3)).unwrap()).unwrap();
    assert_eq!(code, 200, "ready means it serves");

    let restarted = node.wait_status("probed.yaml", "hangs", Duration::from_secs(30), |s| {
        container(s, "containerStatuses", "app")["restartCount"].as_i64() >= Some(1)
    });
    let app = container(&restarted, "containerStatuses", "app");
    assert!(app["lastState"]["terminated"].is_object(), "the hung instance was ended: {restarted:#}");
    assert!(node.log().contains("Liveness probe failed"), "{}", node.log());
    assert_eq!(
        container(
            &node.wait_status("probed.yaml", "slow", Duration::from_secs(1), |_| true),
            "containerStatuses",
            "web"
        )["restartCount"],
        0
    );
}

const SECURED: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: secured, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 1000, runAsGroup: 2000}
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'echo "uid=$(id -u) gid=$(id -g)"; touch /written 2>/dev/null && echo writable || echo read-only; while true; do sleep 1; done']
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Pod
metadata: {name: rooted, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'while true; do sleep 1; done']
    securityContext: {runAsNonRoot: true}
"#;

/// securityContext as the kubelet applies it: the pod's user and group, a
/// read-only root filesystem; `runAsNonRoot` with an image that runs as
/// root is refused with CreateContainerConfigError.
#[test]
fn security_contexts_set_the_user_and_refuse_root_where_asked() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "secured.yaml", &manifest(SECURED)).unwrap();
    node.wait_status("secured.yaml", "secured", Duration::from_secs(60), |s| phase(s) == "Running");
    let log =
        node.wait_logs("secured", "app", Duration::from_secs(10), |l| l.starts_with("uid=") && l.lines().count() >= 2);
    assert_eq!(log.trim(), "uid=1000 gid=2000\nread-only");
    let refused = node.wait_status("secured.yaml", "rooted", Duration::from_secs(10), |s| {
        container(s, "containerStatuses", "app")["state"]["waiting"]["reason"] == "CreateContainerConfigError"
    });
    let message = container(&refused, "containerStatuses", "app")["state"]["waiting"]["message"].to_string();
    assert!(message.contains("runAsNonRoot and image will run as root"), "{message}");
}

const CHATTY: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: chatty, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'i=0; while true; do i=$((i+1)); echo "line $i, padded so that the log fills up quickly"; sleep 0.01; done']
---
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'echo once; exit 1']}
"#;

/// The log files of `container` of the pod named `pod`, by file name.
fn log_files(node: &Node, pod: &str, container: &str) -> Vec<String> {
    let logs = node.root.path().join("logs");
    let Some(pod_dir) = std::fs::read_dir(&logs)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains(&format!("_{pod}_")))
    else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(pod_dir.path().join(container))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Container logs as the kubelet keeps them: a running container's log is
/// rotated over `--container-log-max-size` (the runtime reopens it, no line
/// lost from the live file) keeping `--container-log-max-files`, and a
/// removed instance's log goes with it.
#[test]
fn container_logs_rotate_and_removed_instances_take_theirs_along() {
    root_or_skip!();
    let mut node = Node::without_kubelet();
    node.source = vec![
        format!("--source=dir:{}", node.manifests.path().display()),
        "--container-log-max-size=4Ki".into(),
        "--container-log-max-files=3".into(),
    ];
    node.start_kubelet();
    write(node.manifests.path(), "chatty.yaml", &manifest(CHATTY)).unwrap();
    node.wait_status("chatty.yaml", "chatty", Duration::from_secs(60), |s| phase(s) == "Running");
    let rotated = |names: &[String]| names.iter().filter(|n| n.starts_with("0.log.")).count();
    let deadline = Instant::now() + Duration::from_secs(15);
    while rotated(&log_files(&node, "chatty", "app")) < 2 {
        assert!(Instant::now() < deadline, "rotated twice: {:?}\n{}", log_files(&node, "chatty", "app"), node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The number of the last line the live log holds.
    let last_line = || -> u64 {
        let log = node.logs("chatty", "app");
        let last = log.lines().last().unwrap_or_default().to_string();
        last.strip_prefix("line ").and_then(|r| r.split(',').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let before = last_line();
    std::thread::sleep(Duration::from_secs(2));
    // Between a rotation and the runtime reopening the log, the file just
    // rotated is there beside the ones it will push out (pruned only once
    // the runtime writes to a fresh file, as the kubelet does): a sample
    // may catch one more for that moment, never for long.
    let kept = |names: &[String]| names.len() <= 3 && names.contains(&"0.log".to_string());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut names = log_files(&node, "chatty", "app");
    while !kept(&names) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        names = log_files(&node, "chatty", "app");
    }
    assert!(kept(&names), "the live log and at most two rotated: {names:?}");
    // (Read just after a rotation, the fresh log may be empty for a moment.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = last_line();
    while after <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = last_line();
    }
    assert!(after > before, "the runtime writes to the reopened log: line {before}, then {after}");

    let s = node.wait_status("chatty.yaml", "crasher", Duration::from_secs(40), |s| {
        container(s, "containerStatuses", "app")["restartCount"].as_i64() >= Some(3)
    });
    let names = log_files(&node, "crasher", "app");
    assert!(
        names.len() <= 2 && !names.contains(&"0.log".to_string()),
        "removed instances' logs are gone: {names:?}\n{s:#}"
    );
}

const SLOW_SERVER: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: NAME, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: IMAGE
    command: [sh, -c, 'mkdir -p /www; hostname > /www/index.html; sleep 4; exec httpd -f -p 8080 -h /www']
    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
"#;

/// The Service `web` and its EndpointSlice for `pods` (name, IP, ready), as
/// the EndpointSlice controller writes it from the pods' Ready conditions.
fn web_slice(vip: std::net::Ipv4Addr, pods: &[(String, String, bool)]) -> String {
    let eps: String = pods
        .iter()
        .map(|(name, ip, ready)| {
            format!(
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {ready}}}\n  \
                 targetRef: {{kind: Pod, name: {name}, namespace: default}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {vip}\n  \
         ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

/// The whole node, kubelet and kpr: a pod whose readiness probe has not
/// passed yet is kept out of its Service's endpoints (the test plays the
/// EndpointSlice controller, publishing each pod's Ready condition), so no
/// client is sent to it while its server is not listening; once the probe
/// passes it is published ready and answers too.
#[test]
fn a_readiness_probe_keeps_a_pod_out_of_its_service_until_it_serves() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "web-1.yaml", &manifest(&SERVERS.replace("NAME", "web-1"))).unwrap();
    write(node.manifests.path(), "web-slow.yaml", &manifest(&SLOW_SERVER.replace("NAME", "web-slow"))).unwrap();
    // Each pod's IP and Ready condition, from the status the kubelet writes.
    let pods = || -> Vec<(String, String, bool)> {
        ["web-1", "web-slow"]
            .iter()
            .map(|name| {
                let s = node
                    .wait_status(&format!("{name}.yaml"), name, Duration::from_secs(60), |s| s["podIP"].is_string());
                let ready =
                    s["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
                (name.to_string(), s["podIP"].as_str().unwrap().to_string(), ready)
            })
            .collect()
    };
    let services = tempfile::tempdir().unwrap();
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 11);
    // Once the pods have addresses, the CNI bridge is there.
    let mut published = pods();
    let client = client_on_bridge(&node);
    write(services.path(), "web.yaml", &web_slice(vip, &published)).unwrap();
    let args = vec![
        "--mode=ebpf".to_string(),
        format!("--source=dir:{}", services.path().display()),
        format!("--interfaces={}", cni_veths(&node.ns).join(",")),
        "--healthz-bind-address=127.0.0.1:10257".into(),
    ];
    let mut proxy = Kpr::run_in(&node.ns, &args, &services.path().join("kpr.log")).unwrap();
    proxy.wait_for_log("synced", Duration::from_secs(20)).unwrap();

    let ask = move || {
        client
            .run(move || {
                (0..10)
                    .map(|_| {
                        http_get(SocketAddr::from((vip, 80)), "/", Duration::from_secs(2))
                            .map(|r| r.1.trim().to_string())
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut saw_unready = false;
    loop {
        let slow_ready = published.iter().any(|(n, _, ready)| n == "web-slow" && *ready);
        saw_unready |= !slow_ready;
        let answers = ask();
        for a in &answers {
            let a = a.as_ref().unwrap_or_else(|e| panic!("a client was sent nowhere: {e}\n{}", proxy.log()));
            assert!(slow_ready || a == "web-1", "answered by {a} before it was published ready");
        }
        if slow_ready && answers.iter().flatten().any(|a| a == "web-slow") {
            break;
        }
        assert!(Instant::now() < deadline, "web-slow never answered: {published:?}\n{}", node.log());
        // The controller's turn: publish what the kubelet reports now.
        let now = pods();
        if now != published {
            write(services.path(), "web.yaml", &web_slice(vip, &now)).unwrap();
            published = now;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(saw_unready, "the slow pod was first published not ready");
}

/// A test API server on the node's loopback.
fn api_server_on(node: &Node) -> kpr_tests::apiserver::ApiServer {
    let ns = node.ns.name().to_string();
    kpr_tests::apiserver::ApiServer::start(std::sync::Arc::new(move |port| {
        kpr_tests::netns::run_in(&ns, move || std::net::TcpListener::bind(("127.0.0.1", port))).expect("netns")
    }))
    .unwrap()
}

#[test]
fn pods_bound_to_the_node_run_and_report_status_to_the_api_server() {
    use k8s_openapi::api::core::v1::Pod;
    root_or_skip!();
    let mut node = Node::without_kubelet();
    let api = api_server_on(&node);
    // Its configuration comes from the API server too.
    let config_map: k8s_openapi::api::core::v1::ConfigMap =
        serde_yaml::from_str("metadata: {name: cfg, namespace: default}\ndata: {k: v1}\n").unwrap();
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_yaml::from_str("metadata: {name: token, namespace: default}\nstringData: {value: s3cret}\n").unwrap();
    api.create(&config_map).unwrap();
    api.create(&secret).unwrap();
    // The API server's own Service, whose variables every container gets.
    let kubernetes: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(
        "metadata: {name: kubernetes, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443}]}\n",
    )
    .unwrap();
    api.create(&kubernetes).unwrap();
    let pod = |name: &str, node_name: &str| -> Pod {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\nspec:\n  nodeName: {node_name}\n  terminationGracePeriodSeconds: 1\n  \
             volumes: [{{name: cfg, configMap: {{name: cfg}}}}]\n  containers:\n  \
             - {{name: app, image: {BUSYBOX_IMAGE}, command: [sh, -c, 'echo up $TOKEN $(cat /cfg/k) $KUBERNETES_SERVICE_HOST; while true; do sleep 1; done'], \
             env: [{{name: TOKEN, valueFrom: {{secretKeyRef: {{name: token, key: value}}}}}}], volumeMounts: [{{name: cfg, mountPath: /cfg}}]}}\n"
        ))
        .unwrap()
    };
    api.create(&pod("here", "node-1")).unwrap();
    api.create(&pod("elsewhere", "node-2")).unwrap();
    let kubeconfig = node.root.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    node.source = vec!["--source=kube".into(), format!("--kubeconfig={}", kubeconfig.display())];
    node.start_kubelet();

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let p: Pod = api.get("default", "here").unwrap();
        if let Some(s) = p.status.filter(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()) {
            break s;
        }
        assert!(Instant::now() < deadline, "no Running status reached the API server:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let c = &status.container_statuses.unwrap()[0];
    assert!(c.ready && c.container_id.as_deref().unwrap_or_default().starts_with("containerd://"), "{c:?}");
    let elsewhere: Pod = api.get("default", "elsewhere").unwrap();
    assert!(elsewhere.status.is_none(), "another node's pod is not run here");
    let sandboxes = || node.containerd.ctr("k8s.io", &["containers", "ls", "-q"]).unwrap().lines().count();
    assert_eq!(sandboxes(), 2, "one sandbox and its container");
    node.wait_logs("here", "app", Duration::from_secs(5), |l| l.trim() == "up s3cret v1 10.96.0.1");
    let conditions = status.conditions.clone().unwrap_or_default();
    assert!(conditions.iter().all(|c| c.last_transition_time.is_some()), "{conditions:?}");

    // The API server hangs: the pod is still tended. Its container dies
    // and is restarted meanwhile.
    api.hang_requests(true);
    let running = || -> Vec<String> {
        tasks(&node).into_iter().filter(|(_, (_, status))| status == "RUNNING").map(|(id, _)| id).collect()
    };
    // Twice: the status write after the first restart hangs too.
    let mut app_id = c.container_id.as_deref().unwrap().trim_start_matches("containerd://").to_string();
    for _ in 0..2 {
        let before = running();
        let pid: i32 = tasks(&node)[&app_id].0.parse().unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_until(Duration::from_secs(20), "a restart while the API server hangs", &node, || {
            running().iter().any(|id| !before.contains(id))
        });
        app_id = running().into_iter().find(|id| !before.contains(id)).unwrap();
    }
    api.hang_requests(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p: Pod = api.get("default", "here").unwrap();
        let restarts = p.status.and_then(|s| s.container_statuses).map(|c| c[0].restart_count);
        if restarts == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "the restart never reached the API server:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Deleted as the API server does it: marked, stopped by the kubelet
    // within its grace period, then removed by the kubelet's final delete.
    api.delete::<Pod>("default", "here").unwrap();
    let marked: Pod = api.get("default", "here").unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some(), "a graceful deletion first marks the pod");
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandboxes() > 0 || api.get::<Pod>("default", "here").is_ok() {
        assert!(Instant::now() < deadline, "the deleted pod is still there:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The kubelet logs its final delete once the API server has answered it.
    let logged = Instant::now() + Duration::from_secs(5);
    while !node.log().contains("pod deleted") {
        assert!(Instant::now() < logged, "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Node's condition `type_`: (status, reason, message, last transition).
fn node_condition(n: &k8s_openapi::api::core::v1::Node, type_: &str) -> Option<(String, String, String, String)> {
    let c = n.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_)?;
    let transition = c.last_transition_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    Some((c.status.clone(), c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default(), transition))
}

/// Waits up to `within` for node-1 to satisfy `done`; returns it.
fn wait_node(
    api: &kpr_tests::apiserver::ApiServer,
    node: &Node,
    within: Duration,
    what: &str,
    done: impl Fn(&k8s_openapi::api::core::v1::Node) -> bool,
) -> k8s_openapi::api::core::v1::Node {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(n) = api.get::<k8s_openapi::api::core::v1::Node>("", "node-1")
            && done(&n)
        {
            return n;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The node as a cluster needs it: registered with its labels, taints,
/// addresses, capacity and runtime; its lease in kube-node-lease renewed
/// every quarter of its duration; Ready false, with the runtime's words,
/// while containerd is down, and true again once it is back.
#[test]
fn the_node_registers_renews_its_lease_and_is_not_ready_without_its_runtime() {
    use k8s_openapi::api::coordination::v1::Lease;
    root_or_skip!();
    let mut node = Node::without_kubelet();
    let api = api_server_on(&node);
    let kubeconfig = node.root.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    node.source = vec![
        "--source=kube".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--node-labels=topology.kubernetes.io/zone=zone-a,tier=web".into(),
        "--register-with-taints=dedicated=web:NoSchedule".into(),
        "--node-ip=192.0.2.10".into(),
        "--node-lease-duration-seconds=4".into(),
    ];
    node.start_kubelet();

    let ready = |n: &k8s_openapi::api::core::v1::Node| node_condition(n, "Ready").is_some_and(|c| c.0 == "True");
    let registered = wait_node(&api, &node, Duration::from_secs(30), "node-1 registered and Ready", ready);
    let labels = registered.metadata.labels.clone().unwrap_or_default();
    for (k, v) in [
        ("kubernetes.io/hostname", "node-1"),
        ("kubernetes.io/os", "linux"),
        ("topology.kubernetes.io/zone", "zone-a"),
        ("tier", "web"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}: {labels:?}");
    }
    let taints = registered.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    assert_eq!(
        taints
            .iter()
            .map(|t| format!("{}={}:{}", t.key, t.value.as_deref().unwrap_or(""), t.effect))
            .collect::<Vec<_>>(),
        ["dedicated=web:NoSchedule"]
    );
    let status = registered.status.clone().unwrap();
    let addresses: Vec<(String, String)> =
        status.addresses.unwrap_or_default().into_iter().map(|a| (a.type_, a.address)).collect();
    assert_eq!(addresses, [("InternalIP".into(), "192.0.2.10".into()), ("Hostname".into(), "node-1".into())]);
    let (capacity, allocatable) = (status.capacity.unwrap_or_default(), status.allocatable.unwrap_or_default());
    let cpus = std::fs::read_to_string("/proc/cpuinfo").unwrap().lines().filter(|l| l.starts_with("processor")).count();
    assert_eq!(capacity["cpu"].0, cpus.to_string());
    assert_eq!(capacity["pods"].0, "110");
    let kib = |q: &str| q.strip_suffix("Ki").and_then(|n| n.parse::<u64>().ok()).unwrap();
    assert!(kib(&allocatable["memory"].0) < kib(&capacity["memory"].0), "the eviction threshold is kept out");
    let info = status.node_info.unwrap();
    assert!(info.container_runtime_version.starts_with("containerd://"), "{info:?}");
    assert_eq!(info.kernel_version, std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
    assert_eq!((info.operating_system.as_str(), info.kubelet_version.is_empty()), ("linux", false));
    for type_ in ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"] {
        let c = node_condition(&registered, type_).unwrap_or_else(|| panic!("no {type_} condition"));
        assert!(!c.3.is_empty(), "{type_} has a last transition time");
    }

    let lease = || api.get::<Lease>("kube-node-lease", "node-1").ok().and_then(|l| Some((l.metadata, l.spec?)));
    let (meta, spec) = lease().expect("the node's lease");
    assert_eq!((spec.holder_identity.as_deref(), spec.lease_duration_seconds), (Some("node-1"), Some(4)));
    let owner = &meta.owner_references.unwrap_or_default()[0];
    assert_eq!((owner.kind.as_str(), Some(&owner.uid)), ("Node", registered.metadata.uid.as_ref()));
    let renewed_at = |s: &k8s_openapi::api::coordination::v1::LeaseSpec| s.renew_time.as_ref().map(|t| t.0);
    let first = renewed_at(&spec).expect("a renew time");
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease().and_then(|(_, s)| renewed_at(&s)) == Some(first) {
        assert!(Instant::now() < deadline, "the lease is renewed every second (4 s / 4):\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    let ready_since = node_condition(&registered, "Ready").unwrap().3;
    node.containerd.stop();
    let down = wait_node(&api, &node, Duration::from_secs(15), "Ready false without the runtime", |n| !ready(n));
    let (_, reason, message, _) = node_condition(&down, "Ready").unwrap();
    assert_eq!(reason, "KubeletNotReady");
    assert!(message.contains("container runtime"), "{message}");
    let renewed = lease().and_then(|(_, s)| renewed_at(&s));
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(lease().and_then(|(_, s)| renewed_at(&s)), renewed, "the lease is renewed while the runtime is down");
    node.containerd.resume().unwrap();
    let back = wait_node(&api, &node, Duration::from_secs(20), "Ready again with the runtime back", ready);
    assert_ne!(node_condition(&back, "Ready").unwrap().3, ready_since, "a new transition time");
}

/// A runtime that takes connections and never answers: the first call
/// fails at `--runtime-request-timeout` with the call named, rather than
/// hanging the kubelet.
/// A pod deleted through the API with `gracePeriodSeconds: 1` stops
/// within that, not its spec's 120 s, though its container ignores SIGTERM.
#[test]
fn a_deletion_grace_period_overrides_the_pods_own() {
    use k8s_openapi::api::core::v1::Pod;
    root_or_skip!();
    let mut node = Node::without_kubelet();
    let api = api_server_on(&node);
    let out = tempfile::tempdir().unwrap();
    let pod: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: stubborn, namespace: default}}\nspec:\n  nodeName: node-1\n  terminationGracePeriodSeconds: 120\n  \
         volumes: [{{name: out, hostPath: {{path: {}}}}}]\n  \
         containers:\n  - {{name: app, image: {BUSYBOX_IMAGE}, command: [sh, -c, 'trap \"\" TERM; echo up; while true; do sleep 1; done'], \
         volumeMounts: [{{name: out, mountPath: /out}}], lifecycle: {{preStop: {{exec: {{command: [sh, -c, 'echo bye > /out/pre-stop']}}}}}}}}\n",
        out.path().display()
    ))
    .unwrap();
    api.create(&pod).unwrap();
    let kubeconfig = node.root.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    node.source = vec!["--source=kube".into(), format!("--kubeconfig={}", kubeconfig.display())];
    node.start_kubelet();
    node.wait_logs("stubborn", "app", Duration::from_secs(60), |l| l.trim() == "up");

    // Deleted while the kubelet is away: the one that comes back never ran
    // the pod, yet runs its preStop hook, from the deleted pod's spec.
    node.kubelet.take().unwrap().interrupt().unwrap();
    let asked = Instant::now();
    // (5 s, not 120: long enough for the hook on a busy machine.)
    api.delete_with_grace::<Pod>("default", "stubborn", 5).unwrap();
    node.start_kubelet();
    let deadline = asked + Duration::from_secs(15);
    while api.get::<Pod>("default", "stubborn").is_ok() {
        assert!(Instant::now() < deadline, "still there after {:?}:\n{}", asked.elapsed(), node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let said = std::fs::read_to_string(out.path().join("pre-stop")).unwrap_or_default();
    assert_eq!(said.trim(), "bye", "the preStop hook ran:\n{}", node.log());
}

const CLASSED: &str = r#"apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: standard}
handler: runc
---
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: fancy}
handler: nope
---
apiVersion: v1
kind: Pod
metadata: {name: classed, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  runtimeClassName: standard
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'while true; do sleep 1; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: unhandled, namespace: default}
spec:
  runtimeClassName: fancy
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'while true; do sleep 1; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: classless, namespace: default}
spec:
  runtimeClassName: ghost
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'while true; do sleep 1; done']}
"#;

/// `runtimeClassName` as the kubelet takes it: the RuntimeClass's handler
/// goes to the runtime with the sandbox (containerd runs `runc`, and says
/// it has no `nope`); a class that does not exist starts nothing.
#[test]
fn a_runtime_class_chooses_the_runtime_handler() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "classed.yaml", &manifest(CLASSED)).unwrap();
    node.wait_status("classed.yaml", "classed", Duration::from_secs(60), |s| phase(s) == "Running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(node.log().contains("RuntimeClass \"ghost\" not found") && node.log().contains("nope")) {
        assert!(Instant::now() < deadline, "{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for pod in ["unhandled", "classless"] {
        let s = node.wait_status("classed.yaml", pod, Duration::from_secs(1), |_| true);
        assert_eq!(phase(&s), "Pending", "{pod}: no sandbox: {s:#}");
    }
    // A sandbox the runtime refuses is asked for again with back-off
    // (1 s, 2 s, 4 s ...), not every pass.
    let attempts = || node.log().matches("could not start the pod sandbox pod=default/unhandled").count();
    let first = attempts();
    std::thread::sleep(Duration::from_secs(6));
    assert!(attempts() - first <= 3, "{} attempts in 6 s:\n{}", attempts() - first, node.log());
}

/// Unpadded base64url, decoded (a JWT's parts).
fn base64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, c)| n | u32::from(value(*c)) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The service-account volume the API server gives every pod
/// (`kube-api-access-*`): a token from the TokenRequest API bound to the
/// pod, the cluster's CA from `kube-root-ca.crt`, and the namespace.
#[test]
fn a_projected_service_account_token_comes_from_the_token_request_api() {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
    root_or_skip!();
    let mut node = Node::without_kubelet();
    let api = api_server_on(&node);
    api.create(&serde_yaml::from_str::<ServiceAccount>("metadata: {name: default, namespace: default}\n").unwrap())
        .unwrap();
    let ca: ConfigMap = serde_yaml::from_str(
        "metadata: {name: kube-root-ca.crt, namespace: default}\ndata: {ca.crt: the-cluster-ca}\n",
    )
    .unwrap();
    api.create(&ca).unwrap();
    let pod: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: sa, namespace: default}}\nspec:\n  nodeName: node-1\n  terminationGracePeriodSeconds: 1\n  \
         volumes:\n  - name: kube-api-access-x1\n    projected:\n      defaultMode: 420\n      sources:\n      \
         - serviceAccountToken: {{expirationSeconds: 3607, path: token}}\n      \
         - configMap: {{name: kube-root-ca.crt, items: [{{key: ca.crt, path: ca.crt}}]}}\n      \
         - downwardAPI: {{items: [{{path: namespace, fieldRef: {{apiVersion: v1, fieldPath: metadata.namespace}}}}]}}\n  \
         containers:\n  - name: app\n    image: {BUSYBOX_IMAGE}\n    \
         command: [sh, -c, 'd=/var/run/secrets/kubernetes.io/serviceaccount; cat $d/token; echo; cat $d/namespace; echo; cat $d/ca.crt; echo; while true; do sleep 1; done']\n    \
         volumeMounts: [{{name: kube-api-access-x1, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}}]\n"
    ))
    .unwrap();
    let created = api.create(&pod).unwrap();
    let kubeconfig = node.root.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    node.source = vec!["--source=kube".into(), format!("--kubeconfig={}", kubeconfig.display())];
    node.start_kubelet();

    // The token's header is JSON: base64url of `{"`.
    let log = node.wait_logs("sa", "app", Duration::from_secs(60), |l| l.starts_with("ey") && l.lines().count() >= 3);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(&lines[1..3], ["default", "the-cluster-ca"], "{log}");
    let parts: Vec<&str> = lines[0].split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {}", lines[0]);
    let claims: Value = serde_json::from_slice(&base64url_decode(parts[1])).unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:default:default");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"].as_str(), created.metadata.uid.as_deref(), "bound to the pod");
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() >= 3600);
    assert!(
        api.requests().iter().any(|r| r.starts_with("POST /api/v1/namespaces/default/serviceaccounts/default/token")),
        "{:?}",
        api.requests()
    );
}

#[test]
fn a_runtime_that_never_answers_is_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        // Held open, never read or written.
        let held: Vec<_> = listener.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let started = Instant::now();
    let out = std::process::Command::new(kpr::binary().unwrap())
        .args(["kubelet", "--source", &format!("dir:{}", dir.path().display()), "--runtime-request-timeout=2s"])
        .arg(format!("--container-runtime-endpoint=unix://{}", socket.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "it gave up at the deadline: {:?}", started.elapsed());
    assert!(stderr.contains("Version") && stderr.contains("Timeout expired"), "{stderr}");
}

#[test]
fn a_missing_runtime_is_named_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = std::process::Command::new(kpr::binary().unwrap())
        .args(["kubelet", "--source", &format!("dir:{}", dir.path().display())])
        .arg(format!("--container-runtime-endpoint=unix://{}", socket.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no container runtime at") && stderr.contains("is containerd running?"), "{stderr}");
}

/// The id of pod `name`'s newest sandbox and every sandbox it has, from
/// containerd's own labels.
fn sandboxes(node: &Node, name: &str) -> Vec<String> {
    let filter = format!(r#"labels."io.cri-containerd.kind"==sandbox,labels."io.kubernetes.pod.name"=={name}"#);
    let out = node.containerd.ctr("k8s.io", &["containers", "ls", "-q", &filter]).unwrap();
    out.lines().map(String::from).collect()
}

fn wait_until(within: Duration, what: &str, node: &Node, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

const SANDBOX_DEATHS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: forever}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'echo up; while true; do sleep 1; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: once}
spec:
  restartPolicy: Never
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'echo done']}
"#;

#[test]
fn a_dead_sandbox_is_replaced_only_when_containers_must_run_again() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "pods.yaml", &manifest(SANDBOX_DEATHS)).unwrap();
    let app = |s: &Value| container(s, "containerStatuses", "app").clone();

    // A finished Never pod: its sandbox is stopped (its address freed), and
    // it stays finished.
    node.wait_status("pods.yaml", "once", Duration::from_secs(60), |s| phase(s) == "Succeeded");
    let once = sandboxes(&node, "once");
    assert_eq!(once.len(), 1, "{once:?}");
    wait_until(Duration::from_secs(10), "the finished pod's sandbox stopping", &node, || {
        tasks(&node).get(&once[0]).is_none_or(|(_, status)| status != "RUNNING")
    });

    // The sandbox of a pod that must run dies: a new one, and the restart
    // count and last state carry over.
    let before = node.wait_status("pods.yaml", "forever", Duration::from_secs(60), |s| phase(s) == "Running");
    let old = sandboxes(&node, "forever");
    assert_eq!(old.len(), 1, "{old:?}");
    let pause: i32 = tasks(&node)[&old[0]].0.parse().unwrap();
    assert_eq!(unsafe { libc::kill(pause, libc::SIGKILL) }, 0, "killing the sandbox's pause process");
    let after = node.wait_status("pods.yaml", "forever", Duration::from_secs(60), |s| {
        phase(s) == "Running" && app(s)["restartCount"].as_i64() >= Some(1) && app(s)["state"]["running"].is_object()
    });
    assert_ne!(app(&after)["containerID"], app(&before)["containerID"], "{after:#}");
    assert!(app(&after)["lastState"]["terminated"].is_object(), "the last state survives: {after:#}");
    assert!(sandboxes(&node, "forever").iter().any(|s| *s != old[0]), "a new sandbox");

    // Meanwhile the finished pod was not run again.
    let once_now = node.wait_status("pods.yaml", "once", Duration::from_secs(1), |_| true);
    assert_eq!((phase(&once_now), app(&once_now)["restartCount"].as_i64()), ("Succeeded", Some(0)), "{once_now:#}");
    assert_eq!(sandboxes(&node, "once"), once, "no new sandbox for a finished Never pod");
    assert_eq!(node.logs("once", "app").trim(), "done");
}

const BAD_COMMAND: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: bad}
spec:
  containers:
  - {name: app, image: IMAGE, command: [/no/such/command]}
"#;

#[test]
fn a_command_that_cannot_start_backs_off_into_crash_loop_back_off() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "bad.yaml", &manifest(BAD_COMMAND)).unwrap();
    let app = |s: &Value| container(s, "containerStatuses", "app").clone();
    let s = node.wait_status("bad.yaml", "bad", Duration::from_secs(60), |s| {
        app(s)["state"]["waiting"]["reason"] == "CrashLoopBackOff" && app(s)["restartCount"].as_i64() >= Some(1)
    });
    let last = &app(&s)["lastState"]["terminated"];
    assert_eq!(last["reason"], "StartError", "{s:#}");
    assert!(last["message"].as_str().unwrap_or_default().contains("/no/such/command"), "{s:#}");
    // Backing off, not retried every pass: 1 s, 2 s, 4 s ... so within
    // 5 s of that, at most 2 more attempts.
    let count = app(&s)["restartCount"].as_i64().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let later = node.wait_status("bad.yaml", "bad", Duration::from_secs(1), |_| true);
    assert!(app(&later)["restartCount"].as_i64().unwrap() <= count + 2, "{later:#}");
}

const PULL_THAT_HANGS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: a-stuck}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: 127.0.0.1:5000/kpr/never-answers:1}
---
apiVersion: v1
kind: Pod
metadata: {name: b-quick}
spec:
  containers:
  - {name: app, image: IMAGE, imagePullPolicy: Never, command: [sh, -c, 'while true; do sleep 1; done']}
"#;

/// A registry that accepts connections and never answers.
struct SilentRegistry {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentRegistry {
    fn start(ns: &Netns) -> Self {
        use std::sync::{Arc, atomic::*};
        let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:5000")).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        held.push(conn);
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Self { accepted, stop, thread: Some(thread) }
    }
}

impl Drop for SilentRegistry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

#[test]
fn a_pull_that_never_ends_holds_up_only_its_own_pod() {
    root_or_skip!();
    let node = Node::start();
    let registry = SilentRegistry::start(&node.ns);
    write(node.manifests.path(), "pods.yaml", &manifest(PULL_THAT_HANGS)).unwrap();
    wait_until(Duration::from_secs(30), "the pull reaching the registry", &node, || {
        registry.accepted.load(std::sync::atomic::Ordering::Relaxed) > 0
    });
    node.wait_status("pods.yaml", "b-quick", Duration::from_secs(30), |s| phase(s) == "Running");
    let stuck = node.wait_status("pods.yaml", "a-stuck", Duration::from_secs(1), |_| true);
    assert_eq!(phase(&stuck), "Pending", "{stuck:#}");

    // Deleting the stuck pod abandons its pull: it goes at once.
    write(node.manifests.path(), "pods.yaml", &manifest(PULL_THAT_HANGS.split("---").nth(1).unwrap())).unwrap();
    wait_until(Duration::from_secs(30), "the stuck pod going", &node, || sandboxes(&node, "a-stuck").is_empty());
    node.wait_status("pods.yaml", "b-quick", Duration::from_secs(5), |s| phase(s) == "Running");
}

const HOOKS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: hooked}
spec:
  terminationGracePeriodSeconds: 10
  volumes: [{name: out, hostPath: {path: OUT}}]
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'trap "exit 0" TERM; while true; do sleep 1; done']
    volumeMounts: [{name: out, mountPath: /out}]
    lifecycle:
      postStart: {exec: {command: [sh, -c, 'echo started > /out/post-start']}}
      preStop: {exec: {command: [sh, -c, 'echo stopping > /out/pre-stop']}}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-hook}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'while true; do sleep 1; done']
    lifecycle:
      postStart: {exec: {command: [sh, -c, 'echo no; exit 3']}}
"#;

#[test]
fn lifecycle_hooks_run_after_start_and_before_stop() {
    root_or_skip!();
    let node = Node::start();
    let out = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let text = manifest(HOOKS).replace("OUT", &out.path().display().to_string());
    write(node.manifests.path(), "pods.yaml", &text).unwrap();
    let app = |s: &Value| container(s, "containerStatuses", "app").clone();

    node.wait_status("pods.yaml", "hooked", Duration::from_secs(60), |s| phase(s) == "Running");
    let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap_or_default();
    wait_until(Duration::from_secs(10), "the postStart hook", &node, || read("post-start").trim() == "started");
    assert_eq!(read("pre-stop"), "", "not stopped yet");

    // A failing postStart hook kills its container, which restarts.
    let bad = node
        .wait_status("pods.yaml", "bad-hook", Duration::from_secs(60), |s| app(s)["restartCount"].as_i64() >= Some(1));
    assert!(node.log().contains("PostStartHook failed"), "{bad:#}\n{}", node.log());

    std::fs::remove_file(node.manifests.path().join("pods.yaml")).unwrap();
    wait_until(Duration::from_secs(30), "the pods going", &node, || {
        sandboxes(&node, "hooked").is_empty() && sandboxes(&node, "bad-hook").is_empty()
    });
    assert_eq!(read("pre-stop").trim(), "stopping", "the preStop hook ran before the stop");
}

const SIDECAR: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: job}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  initContainers:
  - name: logger
    image: IMAGE
    restartPolicy: Always
    command: [sh, -c, 'trap "exit 0" TERM; while true; do echo side; sleep 1; done']
    startupProbe: {exec: {command: ['true']}, periodSeconds: 1}
  - {name: setup, image: IMAGE, command: [sh, -c, 'echo setup done']}
  containers:
  - {name: main, image: IMAGE, command: [sh, -c, 'sleep 4; echo main done']}
"#;

#[test]
fn a_sidecar_starts_first_runs_beside_the_app_and_stops_when_it_is_done() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "job.yaml", &manifest(SIDECAR)).unwrap();
    let logger = |s: &Value| container(s, "initContainerStatuses", "logger").clone();
    let main = |s: &Value| container(s, "containerStatuses", "main").clone();
    let both = node.wait_status("job.yaml", "job", Duration::from_secs(60), |s| {
        main(s)["state"]["running"].is_object() && logger(s)["state"]["running"].is_object()
    });
    assert_eq!(phase(&both), "Running", "{both:#}");
    assert_eq!((logger(&both)["started"].as_bool(), logger(&both)["ready"].as_bool()), (Some(true), Some(true)));
    let setup = container(&both, "initContainerStatuses", "setup");
    assert_eq!(setup["state"]["terminated"]["exitCode"], 0, "the regular init container ran after the sidecar");
    let done = node.wait_status("job.yaml", "job", Duration::from_secs(60), |s| phase(s) == "Succeeded");
    wait_until(Duration::from_secs(20), "the sidecar stopping", &node, || {
        let s = node.wait_status("job.yaml", "job", Duration::from_secs(1), |_| true);
        logger(&s)["state"]["terminated"].is_object()
    });
    assert_eq!(main(&done)["state"]["terminated"]["exitCode"], 0, "{done:#}");
    assert!(node.logs("job", "logger").contains("side"));
}

const CHANGING: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: changing, uid: 5f1d1a9e-0000-4000-8000-000000000001}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'echo VERSION; while true; do sleep 1; done']}
  - {name: steady, image: IMAGE, command: [sh, -c, 'while true; do sleep 1; done']}
"#;

#[test]
fn a_changed_container_spec_restarts_only_that_container() {
    root_or_skip!();
    let node = Node::start();
    write(node.manifests.path(), "pod.yaml", &manifest(CHANGING).replace("VERSION", "v1")).unwrap();
    let c = |s: &Value, name: &str| container(s, "containerStatuses", name).clone();
    let before = node.wait_status("pod.yaml", "changing", Duration::from_secs(60), |s| phase(s) == "Running");
    node.wait_logs("changing", "app", Duration::from_secs(10), |l| l.trim() == "v1");
    write(node.manifests.path(), "pod.yaml", &manifest(CHANGING).replace("VERSION", "v2")).unwrap();
    let after = node.wait_status("pod.yaml", "changing", Duration::from_secs(60), |s| {
        c(s, "app")["restartCount"] == 1 && c(s, "app")["state"]["running"].is_object()
    });
    node.wait_logs("changing", "app", Duration::from_secs(10), |l| l.trim() == "v2");
    assert_eq!(c(&after, "steady")["containerID"], c(&before, "steady")["containerID"], "{after:#}");
    assert_eq!(c(&after, "steady")["restartCount"], 0);
}

const QOS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: guaranteed, uid: 00000000-0000-4000-8000-00000000000a}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'while true; do sleep 1; done']
    resources: {limits: {cpu: 500m, memory: 64Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: burstable, uid: 00000000-0000-4000-8000-00000000000b}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'while true; do sleep 1; done']
    resources: {requests: {cpu: 100m}}
---
apiVersion: v1
kind: Pod
metadata: {name: besteffort, uid: 00000000-0000-4000-8000-00000000000c}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: IMAGE, command: [sh, -c, 'while true; do sleep 1; done']}
"#;

/// The memory cgroup a process is in (cgroup v1's memory hierarchy, or v2's).
fn memory_cgroup(pid: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = text.lines().find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == "memory")));
    let line = line.or_else(|| text.lines().find(|l| l.starts_with("0::"))).unwrap();
    line.splitn(3, ':').nth(2).unwrap().to_string()
}

#[test]
fn pods_live_in_cgroups_by_qos_class_with_their_summed_limits() {
    root_or_skip!();
    let mut node = Node::start();
    write(node.manifests.path(), "pods.yaml", &manifest(QOS)).unwrap();
    let parent = node.containerd.cgroup_parent.clone();
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let memory_root = if v2 { "/sys/fs/cgroup".to_string() } else { "/sys/fs/cgroup/memory".to_string() };
    for (name, class, uid, dir) in [
        ("guaranteed", "Guaranteed", "00000000-0000-4000-8000-00000000000a", ""),
        ("burstable", "Burstable", "00000000-0000-4000-8000-00000000000b", "/burstable"),
        ("besteffort", "BestEffort", "00000000-0000-4000-8000-00000000000c", "/besteffort"),
    ] {
        let s = node.wait_status("pods.yaml", name, Duration::from_secs(60), |s| phase(s) == "Running");
        assert_eq!(s["qosClass"], class, "{s:#}");
        let id =
            container(&s, "containerStatuses", "app")["containerID"].as_str().unwrap().replace("containerd://", "");
        let pid = tasks(&node)[&id].0.clone();
        let pod_cgroup = format!("{parent}{dir}/pod{uid}");
        assert_eq!(memory_cgroup(&pid), format!("{pod_cgroup}/{id}"), "{name}");
        if class == "Guaranteed" {
            let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
            let limit = std::fs::read_to_string(format!("{memory_root}{pod_cgroup}/{file}")).unwrap();
            assert_eq!(
                limit.trim(),
                (64u64 << 20).to_string(),
                "the pod cgroup holds the summed limit\n{}",
                node.log()
            );
        }
    }
    // BestEffort pods share the least CPU weight there is, as a tier.
    let (cpu_root, file, least) =
        if v2 { ("/sys/fs/cgroup", "cpu.weight", "1") } else { ("/sys/fs/cgroup/cpu", "cpu.shares", "2") };
    let tier = std::fs::read_to_string(format!("{cpu_root}{parent}/besteffort/{file}")).unwrap();
    assert_eq!(tier.trim(), least);
    std::fs::remove_file(node.manifests.path().join("pods.yaml")).unwrap();
    let gone = format!("{memory_root}{parent}/burstable/pod00000000-0000-4000-8000-00000000000b");
    wait_until(Duration::from_secs(30), "the pod cgroup going with its pod", &node, || {
        !std::path::Path::new(&gone).exists()
    });

    // Pods removed behind the kubelet's back (`kpr kubelet reset` while it
    // is down) leave their cgroups: the next kubelet sweeps them.
    write(node.manifests.path(), "pods.yaml", &manifest(QOS)).unwrap();
    node.wait_status("pods.yaml", "burstable", Duration::from_secs(60), |s| phase(s) == "Running");
    node.kubelet.take().unwrap().interrupt().unwrap();
    let endpoint = format!("--container-runtime-endpoint={}", node.containerd.endpoint());
    kpr::command(&node.ns, &["kubelet", "reset", &endpoint]).unwrap();
    std::fs::remove_file(node.manifests.path().join("pods.yaml")).unwrap();
    assert!(std::path::Path::new(&gone).exists(), "left behind by the reset");
    node.start_kubelet();
    wait_until(Duration::from_secs(20), "the orphaned pod cgroup swept", &node, || {
        !std::path::Path::new(&gone).exists()
    });
}

const GRPC_PROBED: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: grpc}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'while true; do sleep 1; done']
    readinessProbe: {grpc: {port: 9090}, periodSeconds: 1}
"#;

/// A TCP listener on `addr` in the network namespace of process `pid`.
fn listen_in_netns_of(pid: &str, addr: &str) -> std::net::TcpListener {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // Only this short-lived thread moves; the socket keeps the namespace.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "entering the pod's namespace");
        std::net::TcpListener::bind(addr).unwrap()
    })
    .join()
    .unwrap()
}

/// Runs pod `name` from `text` (in `NAME.yaml`) until its container `app`
/// runs, and checks its probe keeps it not ready while nothing serves.
fn running_not_ready(node: &Node, name: &str, text: &str) -> impl Fn(&Value) -> Value {
    let file = format!("{name}.yaml");
    write(node.manifests.path(), &file, &manifest(text)).unwrap();
    let app = |s: &Value| container(s, "containerStatuses", "app").clone();
    node.wait_status(&file, name, Duration::from_secs(60), |s| app(s)["state"]["running"].is_object());
    std::thread::sleep(Duration::from_secs(3));
    let s = node.wait_status(&file, name, Duration::from_secs(1), |_| true);
    assert_eq!(app(&s)["ready"], false, "nothing serves yet: {s:#}");
    app
}

#[test]
fn a_grpc_probe_asks_the_standard_health_service() {
    use tonic_health::ServingStatus;
    root_or_skip!();
    let node = Node::start();
    let app = running_not_ready(&node, "grpc", GRPC_PROBED);

    // A gRPC health server in the pod's network namespace, not serving yet.
    let pause = tasks(&node)[&sandboxes(&node, "grpc")[0]].0.clone();
    let listener = listen_in_netns_of(&pause, "0.0.0.0:9090");
    listener.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    rt.block_on(reporter.set_service_status("", ServingStatus::NotServing));
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
    });
    wait_until(Duration::from_secs(10), "the probe reaching the server", &node, || {
        node.log().contains("service unhealthy (responded with \"NOT_SERVING\")")
    });
    let s = node.wait_status("grpc.yaml", "grpc", Duration::from_secs(1), |_| true);
    assert_eq!(app(&s)["ready"], false, "{s:#}");

    rt.block_on(reporter.set_service_status("", ServingStatus::Serving));
    let ready = node.wait_status("grpc.yaml", "grpc", Duration::from_secs(20), |s| app(s)["ready"] == true);
    assert_eq!(phase(&ready), "Running");
}

const GROUPS: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: default}
data: {key: value}
---
apiVersion: v1
kind: Pod
metadata: {name: grouped, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 1000, fsGroup: 2345}
  volumes: [{name: data, emptyDir: {}}, {name: config, configMap: {name: settings, defaultMode: 256}}]
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'touch /data/new; echo "data=$(stat -c %g /data) new=$(stat -c %g /data/new) config=$(stat -L -c %g /config/key) read=$(cat /config/key)"; while true; do sleep 1; done']
    volumeMounts: [{name: data, mountPath: /data}, {name: config, mountPath: /config}]
---
apiVersion: v1
kind: Pod
metadata: {name: image-user, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {runAsGroup: 3000}
  containers:
  - name: app
    image: docker.io/kpr/user1000:test
    imagePullPolicy: Never
    command: [sh, -c, 'echo "uid=$(id -u) gid=$(id -g)"; while true; do sleep 1; done']
"#;

/// fsGroup owns the pod's emptyDir and configuration volumes (new files
/// keep the group, a 0400 ConfigMap file is readable by the group), and a
/// container with only `runAsGroup` runs as its image's user.
#[test]
fn fs_group_owns_volumes_and_a_group_alone_runs_as_the_images_user() {
    root_or_skip!();
    let node = Node::start();
    node.containerd.import("docker.io/kpr/user1000:test", &["/bin/sh"], "1000").unwrap();
    write(node.manifests.path(), "pods.yaml", &manifest(GROUPS)).unwrap();
    node.wait_status("pods.yaml", "grouped", Duration::from_secs(60), |s| phase(s) == "Running");
    let log = node.wait_logs("grouped", "app", Duration::from_secs(10), |l| l.contains("data="));
    assert_eq!(log.trim(), "data=2345 new=2345 config=2345 read=value", "{}", node.log());
    // Written once: the group's access is no reason to write it again.
    std::thread::sleep(Duration::from_secs(3));
    let writes = node.log().matches("volume files written pod=default/grouped volume=config").count();
    assert_eq!(writes, 1, "{}", node.log());
    node.wait_status("pods.yaml", "image-user", Duration::from_secs(60), |s| phase(s) == "Running");
    let log = node.wait_logs("image-user", "app", Duration::from_secs(10), |l| l.contains("uid="));
    assert_eq!(log.trim(), "uid=1000 gid=3000");
}

const HTTPS_PROBED: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: tls}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    command: [sh, -c, 'while true; do sleep 1; done']
    readinessProbe: {httpGet: {scheme: HTTPS, port: 8443, path: /}, periodSeconds: 1}
"#;

/// A child process ended (by its PID) when the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// An HTTPS probe, as the kubelet's, does not check the certificate: a
/// self-signed one serves.
#[test]
fn an_https_probe_accepts_the_pods_own_certificate() {
    root_or_skip!();
    let node = Node::start();
    let app = running_not_ready(&node, "tls", HTTPS_PROBED);

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=tls"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (`cargo xtask setup` installs it)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // A TLS server in the pod's network namespace.
    let pause = tasks(&node)[&sandboxes(&node, "tls")[0]].0.clone();
    let _server = Child(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{pause}/ns/net"))
            .args(["openssl", "s_server", "-quiet", "-www", "-accept", "8443"])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready = node.wait_status("tls.yaml", "tls", Duration::from_secs(20), |s| app(s)["ready"] == true);
    assert_eq!(phase(&ready), "Running");
}
