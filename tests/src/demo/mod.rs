//! `cargo xtask demo`: a virtual node built from the demo manifests, kpr
//! running on it, and real traffic through every Service, reported plainly;
//! then two nodes and a Service whose pods run on the other one.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_yaml::Value;

use crate::{client, kpr::Kpr, netns::run_in, node::VirtualNode, servers};

mod cross_node;

const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 0, 200));
const REQUESTS: usize = 300;
const TIMEOUT: Duration = Duration::from_secs(3);
/// Where kpr serves the dashboard inside the node namespace.
const DASHBOARD: &str = "127.0.0.1:10260";
/// Where the demo relays it on this machine's loopback (or any free port).
const RELAY_PORT: u16 = 10260;

#[derive(Debug)]
struct Port {
    port: u16,
    protocol: String,
}

#[derive(Debug)]
struct DemoService {
    id: String,
    vip: Ipv4Addr,
    ports: Vec<Port>,
    target_ports: Vec<Port>,
    endpoints: Vec<(String, Ipv4Addr)>,
}

fn port_list(v: &Value) -> Vec<Port> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Port {
                port: p.get("port")?.as_u64()? as u16,
                protocol: p.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_string(),
            })
        })
        .collect()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// The Services of the demo folder with their slices' endpoints and ports.
fn load(dir: &Path) -> anyhow::Result<Vec<DemoService>> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(f)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde::Deserialize::deserialize(doc).with_context(|| format!("reading {}", f.display()))?);
        }
    }
    let mut services = Vec::new();
    for d in docs.iter().filter(|d: &&Value| str_at(d, &["kind"]) == Some("Service")) {
        let ns = str_at(d, &["metadata", "namespace"]).unwrap_or("default");
        let name = str_at(d, &["metadata", "name"]).context("Service without a name")?;
        let vip = str_at(d, &["spec", "clusterIP"]).context("Service without clusterIP")?.parse()?;
        let mut svc = DemoService {
            id: format!("{ns}/{name}"),
            vip,
            ports: port_list(d.get("spec").and_then(|s| s.get("ports")).unwrap_or(&Value::Null)),
            target_ports: vec![],
            endpoints: vec![],
        };
        for s in docs.iter().filter(|s| {
            str_at(s, &["kind"]) == Some("EndpointSlice")
                && str_at(s, &["metadata", "namespace"]).unwrap_or("default") == ns
                && str_at(s, &["metadata", "labels", "kubernetes.io/service-name"]) == Some(name)
        }) {
            svc.target_ports.extend(port_list(s.get("ports").unwrap_or(&Value::Null)));
            for ep in s.get("endpoints").and_then(Value::as_sequence).into_iter().flatten() {
                let ip = ep
                    .get("addresses")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
                    .context("endpoint without address")?;
                let pod = str_at(ep, &["targetRef", "name"]).context("demo endpoints name their pod in targetRef")?;
                svc.endpoints.push((pod.to_string(), ip.parse()?));
            }
        }
        services.push(svc);
    }
    Ok(services)
}

/// Relays connections from `listener` to `target` inside namespace `ns`,
/// until `stop` is set: the dashboard lives in the node namespace, the
/// user's browser outside it.
fn relay(listener: TcpListener, ns: String, target: SocketAddr, stop: Arc<AtomicBool>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e),
        };
        client.set_nonblocking(false)?;
        // A socket keeps the namespace it was made in, whichever thread uses it.
        let Ok(Ok(upstream)) = run_in(&ns, move || TcpStream::connect_timeout(&target, TIMEOUT)) else { continue };
        for (mut from, mut to) in [(client.try_clone()?, upstream.try_clone()?), (upstream, client)] {
            std::thread::spawn(move || {
                io::copy(&mut from, &mut to).ok();
                to.shutdown(std::net::Shutdown::Write).ok();
            });
        }
    }
    Ok(())
}

/// Prints where the dashboard and the inspection commands are, and keeps
/// a request a second flowing to every Service until Ctrl-C, so the
/// dashboard's counters move.
fn serve_dashboard(node: &VirtualNode, services: &[DemoService], stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    let listener = TcpListener::bind(("127.0.0.1", RELAY_PORT)).or_else(|_| TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (ns, target, flag) = (node.ns.name().to_string(), DASHBOARD.parse()?, stop.clone());
    let relay = std::thread::spawn(move || relay(listener, ns, target, flag));
    let kpr = crate::kpr::binary()?.canonicalize()?;
    let root = node.bpf_root().display().to_string();
    println!("dashboard: http://{addr}/");
    println!("  (served by kpr in the node namespace at {DASHBOARD}; relayed to this machine's loopback)");
    println!("inspect the pinned maps:");
    for what in ["service list", "conntrack list", "stats"] {
        println!("  ip netns exec {} {} {what} --bpf-root {root}", node.ns.name(), kpr.display());
    }
    println!("\nsending one request a second to every Service; press Ctrl-C to stop and clean up\n");
    let targets: Vec<(SocketAddr, bool)> = services
        .iter()
        .filter(|s| !s.endpoints.is_empty())
        .flat_map(|s| s.ports.iter().map(|p| (SocketAddr::from((s.vip, p.port)), p.protocol == "UDP")))
        .collect();
    let client = &node.pod(CLIENT.0).ns;
    while !stop.load(Ordering::Relaxed) {
        let targets = targets.clone();
        client.run(move || {
            for (addr, udp) in targets {
                // Background traffic for the dashboard: a failed request is only a gap in it.
                if udp {
                    client::udp_request(addr, TIMEOUT).ok();
                } else {
                    client::tcp_request(addr, TIMEOUT).ok();
                }
            }
        })?;
        std::thread::sleep(Duration::from_secs(1));
    }
    relay.join().map_err(|panic| anyhow::anyhow!("the dashboard relay panicked: {panic:?}"))??;
    Ok(())
}

fn bar(n: usize, total: usize) -> String {
    "█".repeat((n * 40).div_ceil(total.max(1)))
}

/// Which pod answered how many of a run of requests to one Service port.
struct Tally {
    hits: BTreeMap<String, usize>,
    errors: usize,
    took: Duration,
}

impl Tally {
    /// Sends up to `requests` requests (new connections over TCP) to `addr`
    /// from namespace `ns`, stopping early once `stop` is set.
    fn send(
        ns: &crate::netns::Netns,
        addr: SocketAddr,
        udp: bool,
        requests: usize,
        stop: &Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let stop = stop.clone();
        ns.run(move || {
            let t = Instant::now();
            let mut tally = Tally { hits: BTreeMap::new(), errors: 0, took: Duration::ZERO };
            for _ in 0..requests {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = if udp {
                    client::udp_request(addr, TIMEOUT).map(|(w, _)| w)
                } else {
                    client::tcp_request(addr, TIMEOUT)
                };
                match r {
                    // The pod's name (a server may follow it with the client's address).
                    Ok(w) => *tally.hits.entry(w.split(' ').next().unwrap_or_default().to_string()).or_default() += 1,
                    Err(_) => tally.errors += 1,
                }
            }
            tally.took = t.elapsed();
            tally
        })
    }

    /// One line per endpoint with its share, then the totals.
    fn print<'a, A: Into<IpAddr>>(&self, endpoints: impl Iterator<Item = (&'a str, A)>, udp: bool) {
        let total: usize = self.hits.values().sum();
        let what = if udp { "requests" } else { "connections" };
        for (pod, ip) in endpoints {
            let n = self.hits.get(pod).copied().unwrap_or(0);
            let ip = ip.into().to_string();
            println!("  {pod:<8} {ip:<15} {n:>4} {what}  {}", bar(n, total));
        }
        println!("  {total} answered, {} failed, in {:.0} ms\n", self.errors, self.took.as_secs_f64() * 1e3);
    }
}

/// Runs the demo on the manifests in `dir`. `stop` is set on Ctrl-C; the
/// demo then winds down and everything is removed as it is dropped.
pub fn run(dir: &Path, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let services = load(dir)?;
    if services.is_empty() {
        bail!("no Services in {}", dir.display());
    }
    let mut pods: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    for s in &services {
        for (pod, ip) in &s.endpoints {
            pods.insert(pod.clone(), *ip);
        }
    }
    let mut spec: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    spec.push(CLIENT);
    let node = VirtualNode::new(&spec)?;
    println!(
        "virtual node {}: bridge 10.244.0.1/24, {} pods, each in its own network namespace",
        node.ns.name(),
        spec.len()
    );

    let mut running = Vec::new();
    for s in &services {
        for (pod, _) in &s.endpoints {
            let ns = &node.pod(pod).ns;
            for p in &s.target_ports {
                running.push(match p.protocol.as_str() {
                    "UDP" => servers::udp(ns, p.port, pod)?,
                    _ => servers::tcp(ns, p.port, pod)?,
                });
            }
        }
    }

    let log_dir = tempfile::tempdir()?;
    let log = log_dir.path().join("kpr.log");
    let args = [
        crate::kpr::Mode::Ebpf.arg().to_string(),
        format!("--source=dir:{}", dir.display()),
        format!("--dashboard-bind-address={DASHBOARD}"),
    ];
    let mut kpr = Kpr::start_with(&node, &args, &log, "synced")?;
    println!(
        "kpr attached its TC programs to {} and programmed {} Services from {}\n",
        node.interfaces().join(", "),
        services.len(),
        dir.display()
    );

    let client = &node.pod(CLIENT.0).ns;
    for s in &services {
        for p in &s.ports {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let addr = SocketAddr::from((s.vip, p.port));
            let udp = p.protocol == "UDP";
            println!("Service {}  {}/{}  {} endpoint(s)", s.id, addr, p.protocol, s.endpoints.len());
            if s.endpoints.is_empty() {
                let (took, result) = client.run(move || {
                    let t = Instant::now();
                    let r = if udp {
                        client::udp_request(addr, TIMEOUT).map(|_| ())
                    } else {
                        client::tcp_request(addr, TIMEOUT).map(|_| ())
                    };
                    (t.elapsed(), r)
                })?;
                match result {
                    Err(e) => {
                        println!("  refused after {:.1} ms: {e} (no ready endpoints)\n", took.as_secs_f64() * 1e3)
                    }
                    Ok(()) => println!("  unexpectedly answered\n"),
                }
                continue;
            }
            let tally = Tally::send(client, addr, udp, REQUESTS, &stop)?;
            tally.print(s.endpoints.iter().map(|(pod, ip)| (pod.as_str(), *ip)), udp);
        }
    }

    if !stop.load(Ordering::Relaxed) {
        cross_node::run(REQUESTS, &stop)?;
    }

    serve_dashboard(&node, &services, &stop)?;

    let status = kpr.interrupt()?;
    println!(
        "kpr stopped ({status}); its programs stay attached (as on a real node, where the next start takes them over) until the node's namespaces and bpf filesystem go below; its log:"
    );
    for line in kpr.log().lines() {
        println!("  {line}");
    }
    drop(running);
    drop(node);
    println!("\nnamespaces removed; nothing was changed outside them");
    Ok(())
}
