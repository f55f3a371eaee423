//! The demo's second part: two dual-stack nodes on an underlay (pod CIDRs
//! of both families routed between them, as flannel host-gw does), kpr on
//! each, and a dual-stack Service whose pods all run on the other node
//! than its client, reached over each family.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use crate::{
    cluster::{Cluster, pod_ip6},
    kpr::{Kpr, Mode},
    manifests::{dual_stack_service, write},
    servers,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x50);
const PODS: [(&str, u8); 2] = [("far-a", 11), ("far-b", 12)];

pub(super) fn run(requests: usize, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut cluster = Cluster::new_dual_stack(2)?;
    cluster.add_pod(0, "client", 100)?;
    for (name, host) in PODS {
        cluster.add_pod(1, name, host)?;
    }
    let mut running = Vec::new();
    let (mut endpoints, mut endpoints6) = (Vec::new(), Vec::new());
    for (name, host) in PODS {
        let pod = cluster.node(1).pod(name);
        running.push(servers::tcp_dual_stack(&pod.ns, 8080, name)?);
        endpoints.push((name, IpAddr::V4(pod.ip)));
        endpoints6.push((name, IpAddr::V6(pod_ip6(1, host))));
    }
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    write(&manifests, "far.yaml", &dual_stack_service("far", (VIP, VIP6), None, &endpoints, &endpoints6))?;
    println!(
        "two dual-stack nodes on an underlay ({} and {}), pod CIDRs 10.244.N.0/24 and fd00:244:N::/64 routed between them;",
        cluster.node(0).address(),
        cluster.node(1).address()
    );
    println!(
        "dual-stack Service default/far {VIP} and {VIP6} port 80 has its pods on node1, the client runs on node0\n"
    );

    let mut agents = Vec::new();
    for node in &cluster.nodes {
        let log = dir.path().join(format!("kpr-{}.log", node.name));
        let mut args = vec![Mode::Ebpf.arg().to_string(), format!("--source=dir:{}", manifests.display())];
        if node.index == 0 {
            // The DNS add-on, on the client's node.
            args.push(format!("--dns-listen={}", node.address()));
        }
        let mut kpr = Kpr::spawn_on(&node.ns, node.bpf_root(), &node.cgroup, &[], &args, Path::new(&log))?;
        kpr.wait_for_log("synced", Duration::from_secs(20))?;
        agents.push(kpr);
    }
    println!("kpr runs on both nodes with socket-level load balancing only (no --interfaces)");
    let dns = cluster.node(0).address().to_string();
    let client_ns = cluster.node(0).pod("client").ns.name().to_string();
    let name = "far.default.svc.cluster.local";
    let dig = std::process::Command::new("ip")
        .args(["netns", "exec", &client_ns, "dig", "+short", "+time=2", "+tries=1", &format!("@{dns}"), name])
        .output()?;
    let dig6 = std::process::Command::new("ip")
        .args(["netns", "exec", &client_ns, "dig", "+short", "+time=2", "+tries=1", &format!("@{dns}"), name, "AAAA"])
        .output()?;
    println!(
        "the client pod resolves {name} with dig through kpr's DNS add-on on node0 ({dns}): {} and {}",
        String::from_utf8_lossy(&dig.stdout).trim(),
        String::from_utf8_lossy(&dig6.stdout).trim()
    );

    // The client's connections come from this process: in node0's cgroup,
    // the socket hooks there give them a backend.
    let member = cluster.node(0).cgroup.enter()?;
    let client = &cluster.node(0).pod("client").ns;
    let addr = SocketAddr::from((VIP, 80));
    let tally = super::Tally::send(client, addr, false, requests, stop)?;
    let addr6 = SocketAddr::from((VIP6, 80));
    let tally6 = super::Tally::send(client, addr6, false, requests, stop)?;
    drop(member);
    println!("Service default/far  {addr}/TCP  2 endpoint(s) on node1, client on node0 (socket hooks)");
    tally.print(endpoints.iter().copied(), false);
    println!("Service default/far  {addr6}/TCP  the same pods over IPv6 (socket hooks)");
    tally6.print(endpoints6.iter().copied(), false);
    drop(agents);
    drop(running);
    Ok(())
}
