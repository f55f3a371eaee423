//! The Services a benchmark installs: N-1 filler Services with 2-4
//! endpoints each (addresses nobody answers on), and the measured Service,
//! whose VIP sorts last so iptables mode reaches it at the end of
//! KUBE-SERVICES, with real pods behind it (and a node port for loads from
//! outside).

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

/// The i-th Service's VIP, counting up from 10.96.0.1.
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// The measured Service's node port (loads from outside come through it).
pub const NODE_PORT: u16 = 30080;

fn service(name: &str, vip: Ipv4Addr, node_port: Option<u16>) -> String {
    let (kind, node_port) = match node_port {
        Some(p) => ("NodePort", format!(r#","nodePort":{p}"#)),
        None => ("ClusterIP", String::new()),
    };
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"bench"}},"spec":{{"type":"{kind}","clusterIP":"{vip}","ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"{node_port}}}]}}}}"#
    )
}

fn slice(name: &str, endpoints: &[Ipv4Addr]) -> String {
    let mut eps = String::new();
    for (i, e) in endpoints.iter().enumerate() {
        if i > 0 {
            eps.push(',');
        }
        write!(eps, r#"{{"addresses":["{e}"],"conditions":{{"ready":true}}}}"#).ok();
    }
    format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"{name}-1","namespace":"bench","labels":{{"kubernetes.io/service-name":"{name}"}}}},"addressType":"IPv4","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],"endpoints":[{eps}]}}"#
    )
}

/// Writes `fillers.json` (Services 0..n-1) and `measured.json` (Service
/// n-1 with `endpoints`, a NodePort Service when `node_port` is given) into
/// `dir`; returns the measured VIP.
pub fn write(dir: &Path, n: usize, endpoints: &[Ipv4Addr], node_port: Option<u16>) -> std::io::Result<Ipv4Addr> {
    let mut fillers = String::new();
    let mut next_ep = u32::from(Ipv4Addr::new(10, 245, 0, 1));
    for i in 0..n.saturating_sub(1) {
        let name = format!("svc-{i}");
        let eps: Vec<Ipv4Addr> = (0..2 + i % 3)
            .map(|_| {
                next_ep += 1;
                Ipv4Addr::from(next_ep)
            })
            .collect();
        fillers.push_str(&service(&name, vip(i), None));
        fillers.push('\n');
        fillers.push_str(&slice(&name, &eps));
        fillers.push('\n');
    }
    std::fs::write(dir.join("fillers.json"), fillers)?;
    write_measured(dir, n, endpoints, node_port)?;
    Ok(measured_vip(n))
}

/// The measured Service's VIP among `n`: the last.
pub fn measured_vip(n: usize) -> Ipv4Addr {
    vip(n - 1)
}

/// Endpoints installed with `n` Services: the fillers' 2-4 each and the
/// measured Service's three serving pods.
pub fn endpoints(n: usize) -> usize {
    (0..n.saturating_sub(1)).map(|i| 2 + i % 3).sum::<usize>() + 3
}

/// Rewrites the measured Service's file with `endpoints` (atomically).
pub fn write_measured(dir: &Path, n: usize, endpoints: &[Ipv4Addr], node_port: Option<u16>) -> std::io::Result<()> {
    let name = "measured";
    let content = format!("{}\n{}\n", service(name, measured_vip(n), node_port), slice(name, endpoints));
    crate::manifests::write(dir, "measured.json", &content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_count_up_and_the_measured_one_is_last() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(vip(49_999), Ipv4Addr::new(10, 96, 195, 80));
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), 5, &[Ipv4Addr::new(10, 244, 0, 11)], None).unwrap();
        assert_eq!(m, vip(4));
        let fillers = std::fs::read_to_string(dir.path().join("fillers.json")).unwrap();
        assert_eq!(fillers.lines().count(), 8, "4 Services and 4 slices");
        for l in fillers.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        assert_eq!(fillers.matches("\"addresses\"").count() + 3, endpoints(5));
        assert_eq!(endpoints(50_000), 149_999, "the 150,000 endpoints of the memory target, give or take");
    }
}
