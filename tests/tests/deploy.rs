//! The deployment manifests parse into real Kubernetes types and ask for
//! exactly the permissions and privileges kpr needs.

use std::collections::BTreeSet;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use proxy_userspace::source::kube::PERMISSIONS;
use serde::Deserialize;

fn documents() -> Vec<serde_yaml::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/kpr.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect()
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<_> = documents().into_iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(docs.len(), 1, "one {kind}");
    serde_yaml::from_value(docs[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn every_manifest_is_a_valid_object() {
    let kinds: Vec<String> = documents().iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]);
    let _: ServiceAccount = one("ServiceAccount");
    let _: ConfigMap = one("ConfigMap");
    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "kpr");
    assert_eq!(binding.subjects.unwrap()[0].name, "kpr");
}

#[test]
fn the_cluster_role_grants_exactly_what_kpr_uses() {
    let role: ClusterRole = one("ClusterRole");
    let granted: BTreeSet<(String, String, String)> = role
        .rules
        .unwrap()
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            groups
                .into_iter()
                .flat_map(move |g| resources.clone().into_iter().map(move |res| (g.clone(), res)))
                .flat_map(|(g, res)| r.verbs.iter().map(move |v| (g.clone(), res.clone(), v.clone())))
                .collect::<Vec<_>>()
        })
        .collect();
    let needed: BTreeSet<(String, String, String)> = PERMISSIONS
        .iter()
        .flat_map(|(g, res, verbs)| verbs.iter().map(move |v| (g.to_string(), res.to_string(), v.to_string())))
        .collect();
    assert_eq!(granted, needed);
}

#[test]
fn the_daemonset_runs_on_every_linux_node_with_only_the_capabilities_it_needs() {
    let ds: DaemonSet = one("DaemonSet");
    let spec = ds.spec;
    assert_eq!(spec.update_strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    // Ending UDP sockets pinned to removed backends visits the pods' network
    // namespaces through the host's /proc.
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert!(pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let c = &pod.containers[0];
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = caps.add.as_ref().unwrap().iter().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_ne!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let mounts: BTreeSet<&str> = c.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules"] {
        assert!(mounts.contains(path), "{path} mounted");
    }
    let probes = [c.liveness_probe.as_ref().unwrap(), c.readiness_probe.as_ref().unwrap()];
    assert!(
        probes.iter().all(|p| p.http_get.as_ref().unwrap().port
            == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256))
    );
    let args = c.args.as_ref().unwrap();
    assert!(args.iter().any(|a| a == "--source=kube"));
    let cm: ConfigMap = one("ConfigMap");
    for key in ["mode", "interfaces", "min-sync-interval", "cluster-cidr"] {
        assert!(cm.data.as_ref().unwrap().contains_key(key), "ConfigMap has {key}");
    }
}
