//! Service and EndpointSlice manifests as the dir source reads them.

use std::{net::Ipv4Addr, path::Path};

/// A ClusterIP Service with named ports `http` (TCP 80 -> 8080) and `dns`
/// (UDP 53 -> 5353), and one EndpointSlice holding `endpoints` (ready).
pub fn web_service(name: &str, vip: Ipv4Addr, endpoints: &[(&str, Ipv4Addr)]) -> String {
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
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {vip}
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
{eps}"
    )
}

/// Writes `content` to `dir/file` atomically (write, then rename), so a
/// watcher never reads half a file.
pub fn write(dir: &Path, file: &str, content: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(tmp, dir.join(file))
}
