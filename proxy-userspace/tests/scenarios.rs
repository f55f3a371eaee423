//! Scenario tests as data: every folder in tests/scenarios holds Services
//! and EndpointSlices (objects.yaml) and what a user must observe
//! (expected.txt: the frontends and backends in the BPF maps, with their
//! Services' names, and the rejections; expected.iptables: the
//! iptables-restore input). Each case runs through the real manifest
//! parser, index, model, planner and eBPF dataplane on in-memory maps,
//! three ways: all objects at once, one by one in file order, and one by
//! one in reverse; all three must agree. No root needed.
//!
//! `KPR_BLESS=1 cargo test --test scenarios` rewrites expected.iptables
//! (review the diff: kube-proxy's proxier tests publish the rules to match).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use proxy_common::maps::{BACKEND_TERMINATING, ServiceValue, kind};
use proxy_userspace::{
    dataplane::{
        Dataplane,
        ebpf::{EbpfDataplane, MapSizes, fake::FakeMaps},
        iptables::render::{RenderConfig, Scope, render},
    },
    frontend::{FrontendKey, ServiceType},
    index::{Index, Snapshot},
    inspect::frontend_key,
    model::Model,
    planner,
    source::dir::parse_file,
    validate::{ModelConfig, Object},
};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    cases
}

/// A case's config.txt: the model's settings and this node's zone.
fn config(case: &Path) -> (ModelConfig, Option<String>) {
    let mut config = ModelConfig::default();
    let mut zone = None;
    let text = std::fs::read_to_string(case.join("config.txt")).unwrap_or_default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.split_once('=') {
            Some(("service-proxy-name", v)) => config.service_proxy_name = Some(v.to_string()),
            Some(("node-name", v)) => config.node_name = v.to_string(),
            Some(("zone", v)) => zone = Some(v.to_string()),
            Some(("sctp", "served")) => config.sctp = true,
            _ => panic!("{}: unknown config line {line:?}", case.display()),
        }
    }
    (config, zone)
}

/// The proxy's state after some objects: the model, the eBPF dataplane's
/// maps, and every rejection.
struct Node {
    index: Index,
    model: Model,
    dataplane: EbpfDataplane<FakeMaps>,
}

impl Node {
    fn new() -> Self {
        let sizes = MapSizes { services: 1024, backends: 4096, flows: 16 };
        Self {
            index: Index::default(),
            model: Model::default(),
            dataplane: EbpfDataplane::new(FakeMaps::new(1024, 4096), sizes),
        }
    }

    fn sync(&mut self) {
        let dirty = self.index.take_dirty();
        let update = self.model.update(&self.index, dirty);
        let errors = self.dataplane.apply(&planner::plan(&update.changes), &self.model.frontends);
        assert!(errors.is_empty(), "the dataplane refused: {errors:?}");
    }

    /// What a user observes, in expected.txt's format.
    fn observed(&self) -> Vec<String> {
        let maps = self.dataplane.maps();
        let mut lines = Vec::new();
        let mut frontends: Vec<(FrontendKey, &ServiceValue)> =
            maps.services.iter().filter_map(|(k, v)| Some((frontend_key(k)?, v))).collect();
        frontends.sort_by_key(|(k, _)| *k);
        // External frontends (load balancer and external IPs; node ports
        // need node addresses, which these tests have none of) share their
        // ClusterIP frontend's id.
        let owners: std::collections::HashMap<u32, FrontendKey> =
            frontends.iter().filter(|(k, _)| self.model.frontends.contains_key(k)).map(|(k, v)| (v.id, *k)).collect();
        for (key, value) in frontends {
            let (f, external) = match self.model.frontends.get(&key) {
                Some(f) => (f, None),
                None => (&self.model.frontends[&owners[&value.id]], Some(value.kind)),
            };
            let node_port = f.external.as_deref().and_then(|e| e.node_port);
            let kind = match (external, f.service_type) {
                (Some(kind::LOAD_BALANCER_IP), _) => "load-balancer-IP".to_string(),
                (Some(kind::EXTERNAL_IP), _) => "external-IP".to_string(),
                (Some(other), _) => format!("external({other})"),
                (None, t) => match t {
                    ServiceType::ClusterIP => "ClusterIP".to_string(),
                    ServiceType::NodePort => format!("NodePort({})", port_text(node_port)),
                    ServiceType::LoadBalancer => {
                        let mut parts = vec![port_text(node_port)];
                        let ext = f.external.as_deref();
                        parts.extend(ext.into_iter().flat_map(|e| e.load_balancer_ips.iter()).map(Ipv4Addr::to_string));
                        format!("LoadBalancer({})", parts.join(","))
                    }
                },
            };
            let slots = maps.backends_of(value);
            let text = |terminating: bool| -> Vec<String> {
                let mut v: Vec<(Ipv4Addr, u16)> = slots
                    .iter()
                    .filter(|b| (b.state == BACKEND_TERMINATING) == terminating)
                    .map(|b| (Ipv4Addr::from(b.addr), b.port()))
                    .collect();
                v.sort();
                v.into_iter().map(|(ip, port)| format!("{ip}:{port}")).collect()
            };
            let (ready, terminating) = (text(false), text(true));
            let none = if value.flags & proxy_common::maps::flags::DROP_WITHOUT_BACKEND != 0 {
                "none, dropped"
            } else {
                "none"
            };
            let mut line = format!(
                "{key} {kind} {} -> {}",
                f.service,
                if ready.is_empty() { none.to_string() } else { ready.join(" ") }
            );
            if !terminating.is_empty() {
                line.push_str(&format!(" terminating {}", terminating.join(" ")));
            }
            if value.flags & proxy_common::maps::flags::AFFINITY != 0 {
                line.push_str(&format!(" affinity {}s", maps.affinity[&value.id]));
            }
            lines.push(line);
        }
        let mut rejected: Vec<String> = self
            .index
            .rejections()
            .chain(self.model.rejections())
            .map(|r| format!("rejected {} {}", r.kind.label(), r.object))
            .collect();
        rejected.sort();
        lines.extend(rejected);
        lines
    }
}

fn port_text(p: Option<u16>) -> String {
    p.map_or_else(String::new, |p| p.to_string())
}

fn cold(snapshot: Snapshot, zone: Option<&str>) -> Node {
    let mut node = Node::new();
    node.index = Index::from_snapshot(snapshot);
    node.index.set_zone(zone);
    node.sync();
    node
}

fn one_by_one(snapshot: Snapshot, reverse: bool, zone: Option<&str>) -> Node {
    let mut node = Node::new();
    node.index.set_zone(zone);
    node.index.set_unreadable("objects.yaml", snapshot.unreadable);
    let mut objects: Vec<Object> = snapshot.objects;
    if reverse {
        objects.reverse();
    }
    for o in objects {
        node.index.apply(o);
        node.sync();
    }
    node
}

fn expected(case: &Path) -> Vec<String> {
    std::fs::read_to_string(case.join("expected.txt"))
        .unwrap_or_else(|e| panic!("{}: {e}", case.display()))
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn every_scenario_gives_the_expected_maps_and_rejections_in_any_arrival_order() {
    let cases = cases();
    assert!(cases.len() >= 25, "the scenario folder holds {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (config, zone) = config(case);
        let zone = zone.as_deref();
        let path = case.join("objects.yaml");
        let parse = || parse_file(&path, &std::fs::read(&path).unwrap(), &config);
        let want = expected(case);
        for (how, node) in [
            ("all at once", cold(parse(), zone)),
            ("one by one", one_by_one(parse(), false, zone)),
            ("in reverse", one_by_one(parse(), true, zone)),
        ] {
            let got = node.observed();
            if got != want {
                failures.push(format!(
                    "{} ({how}):\n  expected:\n    {}\n  observed:\n    {}",
                    case.file_name().unwrap().to_string_lossy(),
                    want.join("\n    "),
                    got.join("\n    ")
                ));
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

#[test]
fn every_scenario_renders_the_expected_iptables_rules() {
    let bless = std::env::var_os("KPR_BLESS").is_some();
    let mut failures = Vec::new();
    for case in cases() {
        let (config, zone) = config(&case);
        let path = case.join("objects.yaml");
        let node = cold(parse_file(&path, &std::fs::read(&path).unwrap(), &config), zone.as_deref());
        let rules = render(
            &node.model.frontends,
            Scope::Full,
            &BTreeSet::new(),
            &RenderConfig { cluster_cidr: Some("10.244.0.0/16".into()), ..Default::default() },
        );
        let file = case.join("expected.iptables");
        if bless {
            std::fs::write(&file, &rules).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&file).unwrap_or_default();
        if want != rules {
            failures.push(format!("{}:\n{rules}", case.display()));
        }
    }
    assert!(failures.is_empty(), "rules differ (KPR_BLESS=1 rewrites them; review the diff):\n{}", failures.join("\n"));
}
