//! Service and EndpointSlice manifests as the dir source reads them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

/// The EndpointSlice `slice` of Service `name`: ports `http` (TCP 8080) and
/// `dns` (UDP 5353), and `endpoints` (pod, address; ready) of `family`.
fn web_slice(name: &str, slice: &str, family: &str, endpoints: &[(&str, IpAddr)]) -> String {
    let mut eps = String::new();
    for (pod, ip) in endpoints {
        eps.push_str(&format!(
            "  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n"
        ));
    }
    if endpoints.is_empty() {
        eps.push_str("  []\n");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {slice}
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: {family}
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
{eps}"
    )
}

/// A ClusterIP Service of one family with named ports `http` (TCP 80 ->
/// 8080) and `dns` (UDP 53 -> 5353), and one EndpointSlice holding
/// `endpoints` (ready).
pub fn web_service<A: Into<IpAddr> + Copy>(name: &str, vip: A, endpoints: &[(&str, A)]) -> String {
    web_node_port_service(name, vip, None, endpoints)
}

/// [`web_service`], of type NodePort with `http` on `node_port` when given.
pub fn web_node_port_service<A: Into<IpAddr> + Copy>(
    name: &str,
    vip: A,
    node_port: Option<u16>,
    endpoints: &[(&str, A)],
) -> String {
    let vip: IpAddr = vip.into();
    let endpoints: Vec<(&str, IpAddr)> = endpoints.iter().map(|(pod, ip)| (*pod, (*ip).into())).collect();
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let (service_type, node_port) = type_and_node_port(node_port);
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: {service_type}
  clusterIP: \"{vip}\"
  ipFamilies: [{family}]
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP{node_port}}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
---
{}",
        web_slice(name, &format!("{name}-1"), family, &endpoints)
    )
}

/// The Service type, and the `http` port's `nodePort` field, for `node_port`.
fn type_and_node_port(node_port: Option<u16>) -> (&'static str, String) {
    match node_port {
        Some(port) => ("NodePort", format!(", nodePort: {port}")),
        None => ("ClusterIP", String::new()),
    }
}

/// A dual-stack Service (IPv6 first in `ipFamilies`) with HTTP on TCP 80
/// (-> 8080, on `node_port` too if given) and DNS on UDP 53 (-> 5353), and
/// one EndpointSlice per family holding `v4` and `v6` (pod, address) each.
pub fn dual_stack_service(
    name: &str,
    (vip4, vip6): (Ipv4Addr, Ipv6Addr),
    node_port: Option<u16>,
    v4: &[(&str, IpAddr)],
    v6: &[(&str, IpAddr)],
) -> String {
    let (service_type, node_port) = type_and_node_port(node_port);
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {service_type}
  clusterIP: \"{vip6}\"
  clusterIPs: [\"{vip6}\", \"{vip4}\"]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP{node_port}}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
---
{}---
{}",
        web_slice(name, &format!("{name}-ipv4"), "IPv4", v4),
        web_slice(name, &format!("{name}-ipv6"), "IPv6", v6),
    )
}

/// Writes `content` to `dir/file` atomically (write, then rename), so a
/// watcher never reads half a file.
pub fn write(dir: &Path, file: &str, content: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(tmp, dir.join(file))
}
