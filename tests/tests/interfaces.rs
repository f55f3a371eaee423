//! `--interfaces` patterns: pods created after kpr started are served on
//! the per-packet path (socket hooks off), as clients and as backends, in
//! both modes. In eBPF mode their interfaces are attached as they appear.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use kpr_tests::{
    client::tcp_request,
    kpr::{Kpr, Mode},
    manifests::{web_service, write},
    node::VirtualNode,
    root_or_skip, servers, wait,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PODS: [(&str, Ipv4Addr); 2] =
    [("web-a", Ipv4Addr::new(10, 244, 0, 11)), ("client", Ipv4Addr::new(10, 244, 0, 100))];
const LATE_WEB: (&str, Ipv4Addr) = ("late-web", Ipv4Addr::new(10, 244, 0, 13));
const LATE_CLIENT: (&str, Ipv4Addr) = ("late-client", Ipv4Addr::new(10, 244, 0, 101));

fn pods_created_after_kpr_started_are_served(mode: Mode) {
    root_or_skip!();
    let mut node = VirtualNode::new(&PODS).unwrap();
    let mut running = vec![servers::tcp(&node.pod("web-a").ns, 8080, "web-a").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "web.yaml", &web_service("web", VIP, &PODS[..1])).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display()), "--socket-lb=false".into()];
    let log = dir.path().join("kpr.log");
    let mut kpr = Kpr::spawn_on(&node.ns, node.bpf_root(), &node.cgroup, &["veth*".into()], &args, &log).unwrap();
    kpr.wait_for_log("synced", Duration::from_secs(20)).unwrap();
    let vip = SocketAddr::from((VIP, 80));
    let ask = |node: &VirtualNode, pod: &str| {
        node.pod(pod).ns.run(move || tcp_request(vip, Duration::from_secs(1)).ok()).unwrap()
    };
    assert_eq!(ask(&node, "client").as_deref(), Some("web-a"), "served before anything changes");

    node.add_pod(LATE_WEB.0, LATE_WEB.1).unwrap();
    running.push(servers::tcp(&node.pod(LATE_WEB.0).ns, 8080, LATE_WEB.0).unwrap());
    node.add_pod(LATE_CLIENT.0, LATE_CLIENT.1).unwrap();
    write(&manifests, "web.yaml", &web_service("web", VIP, &[LATE_WEB])).unwrap();
    let answer = wait::until(
        "the new client reaching the new backend through the VIP",
        Duration::from_secs(10),
        || ask(&node, LATE_CLIENT.0),
        |a| a.as_deref() == Some(LATE_WEB.0),
    );
    answer.unwrap_or_else(|e| panic!("{e:#}\nkpr log:\n{}", kpr.log()));
    assert_eq!(ask(&node, "client").as_deref(), Some(LATE_WEB.0), "and the first client too");
    if mode == Mode::Ebpf {
        let log = kpr.log();
        for iface in ["veth2", "veth3"] {
            assert!(
                log.contains(&format!("datapath attached on ingress and egress iface={iface}")),
                "{iface} attached:\n{log}"
            );
        }
    }
    drop(running);
}

kpr_tests::in_both_modes!(pods_created_after_kpr_started_are_served);
