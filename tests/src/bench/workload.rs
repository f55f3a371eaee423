//! The Services a benchmark installs: N-1 filler Services with 2-4
//! endpoints each (addresses nobody answers on), and the measured Service,
//! whose VIP sorts last so iptables mode reaches it at the end of
//! KUBE-SERVICES, with real pods behind it (and a node port for loads from
//! outside). IPv6 rows install the same Services in the IPv6 family alone.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use super::topology::Family;

/// The i-th Service's VIP, counting up from 10.96.0.1.
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// The i-th Service's VIP in `family`; IPv6 counts up from fd00:96::1.
pub fn vip_in(family: Family, i: usize) -> IpAddr {
    match family {
        Family::Ipv4 => vip(i).into(),
        Family::Ipv6 => Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1)) + i as u128).into(),
    }
}

/// The first filler endpoint address in `family` (nobody answers there).
fn first_filler_endpoint(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => Ipv4Addr::new(10, 245, 0, 1).into(),
        Family::Ipv6 => Ipv6Addr::new(0xfd00, 0x245, 0, 0, 0, 0, 0, 1).into(),
    }
}

/// `addr` plus one.
fn next(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + 1).into(),
        IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + 1).into(),
    }
}

fn family_of(addr: IpAddr) -> Family {
    if addr.is_ipv6() { Family::Ipv6 } else { Family::Ipv4 }
}

/// The measured Service's node port (loads from outside come through it).
pub const NODE_PORT: u16 = 30080;

fn service(name: &str, vip: IpAddr, node_port: Option<u16>) -> String {
    let (kind, node_port) = match node_port {
        Some(p) => ("NodePort", format!(r#","nodePort":{p}"#)),
        None => ("ClusterIP", String::new()),
    };
    let family = family_of(vip).as_str();
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"bench"}},"spec":{{"type":"{kind}","clusterIP":"{vip}","clusterIPs":["{vip}"],"ipFamilies":["{family}"],"ipFamilyPolicy":"SingleStack","ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"{node_port}}}]}}}}"#
    )
}

/// The Service's EndpointSlice; its address type is that of `family`.
fn slice(name: &str, family: Family, endpoints: &[IpAddr]) -> String {
    let mut eps = String::new();
    for (i, e) in endpoints.iter().enumerate() {
        if i > 0 {
            eps.push(',');
        }
        write!(eps, r#"{{"addresses":["{e}"],"conditions":{{"ready":true}}}}"#).ok();
    }
    format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"{name}-1","namespace":"bench","labels":{{"kubernetes.io/service-name":"{name}"}}}},"addressType":"{}","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],"endpoints":[{eps}]}}"#,
        family.as_str()
    )
}

/// Writes `fillers.json` (Services 0..n-1) and `measured.json` (Service
/// n-1 with `endpoints`, a NodePort Service when `node_port` is given) into
/// `dir`, every Service in the family of `endpoints`; returns the measured VIP.
pub fn write(dir: &Path, n: usize, endpoints: &[IpAddr], node_port: Option<u16>) -> std::io::Result<IpAddr> {
    let family = endpoints.first().map_or(Family::Ipv4, |e| family_of(*e));
    let mut fillers = String::new();
    let mut next_ep = first_filler_endpoint(family);
    for i in 0..n.saturating_sub(1) {
        let name = format!("svc-{i}");
        let eps: Vec<IpAddr> = (0..2 + i % 3)
            .map(|_| {
                next_ep = next(next_ep);
                next_ep
            })
            .collect();
        fillers.push_str(&service(&name, vip_in(family, i), None));
        fillers.push('\n');
        fillers.push_str(&slice(&name, family, &eps));
        fillers.push('\n');
    }
    std::fs::write(dir.join("fillers.json"), fillers)?;
    write_measured(dir, n, endpoints, node_port)?;
    Ok(measured_vip(family, n))
}

/// The measured Service's VIP among `n`: the last.
pub fn measured_vip(family: Family, n: usize) -> IpAddr {
    vip_in(family, n - 1)
}

/// Endpoints installed with `n` Services: the fillers' 2-4 each and the
/// measured Service's three serving pods.
pub fn endpoints(n: usize) -> usize {
    (0..n.saturating_sub(1)).map(|i| 2 + i % 3).sum::<usize>() + 3
}

/// Rewrites the measured Service's file with `endpoints` (atomically), in their family.
pub fn write_measured(dir: &Path, n: usize, endpoints: &[IpAddr], node_port: Option<u16>) -> std::io::Result<()> {
    let name = "measured";
    let family = endpoints.first().map_or(Family::Ipv4, |e| family_of(*e));
    let content =
        format!("{}\n{}\n", service(name, measured_vip(family, n), node_port), slice(name, family, endpoints));
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
        let m = write(dir.path(), 5, &[Ipv4Addr::new(10, 244, 0, 11).into()], None).unwrap();
        assert_eq!(m, IpAddr::from(vip(4)));
        let fillers = std::fs::read_to_string(dir.path().join("fillers.json")).unwrap();
        assert_eq!(fillers.lines().count(), 8, "4 Services and 4 slices");
        for l in fillers.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        assert_eq!(fillers.matches("\"addresses\"").count() + 3, endpoints(5));
        assert_eq!(endpoints(50_000), 149_999, "the 150,000 endpoints of the memory target, give or take");
    }

    #[test]
    fn ipv6_services_and_slices_are_of_the_ipv6_family_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pod: IpAddr = "fd00:244:1::b".parse().unwrap();
        let m = write(dir.path(), 3, &[pod], Some(NODE_PORT)).unwrap();
        assert_eq!(m, "fd00:96::3".parse::<IpAddr>().unwrap());
        let fillers = std::fs::read_to_string(dir.path().join("fillers.json")).unwrap();
        let measured = std::fs::read_to_string(dir.path().join("measured.json")).unwrap();
        for l in fillers.lines().chain(measured.lines()) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            match v["kind"].as_str().unwrap() {
                "Service" => {
                    assert_eq!(v["spec"]["ipFamilies"], serde_json::json!(["IPv6"]));
                    assert!(v["spec"]["clusterIP"].as_str().unwrap().starts_with("fd00:96::"));
                }
                _ => {
                    assert_eq!(v["addressType"], "IPv6");
                    for e in v["endpoints"].as_array().unwrap() {
                        assert!(e["addresses"][0].as_str().unwrap().parse::<Ipv6Addr>().is_ok(), "{e}");
                    }
                }
            }
        }
        assert!(fillers.contains("\"fd00:245::2\""), "filler endpoints count up in IPv6 too");
        assert!(measured.contains("\"fd00:244:1::b\"") && measured.contains("\"nodePort\":30080"));
    }
}
