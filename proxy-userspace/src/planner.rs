//! Turns changes of frontends into small operations for the dataplane. It
//! never touches the kernel, so every case is unit-tested.

use std::collections::BTreeMap;

use crate::frontend::{Change, Frontend, FrontendKey};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create the frontend, or replace its backend set.
    Upsert(Frontend),
    Delete(FrontendKey),
}

/// Operations for the model's changes: deletions first (so a frontend
/// moving between Services never exists twice), unchanged frontends
/// produce none.
pub fn plan(changes: &[Change]) -> Vec<Op> {
    plan_triples(changes.iter().map(|c| (c.key, c.before.as_ref(), c.after.as_ref())))
}

fn plan_triples<'a>(
    changes: impl IntoIterator<Item = (FrontendKey, Option<&'a Frontend>, Option<&'a Frontend>)>,
) -> Vec<Op> {
    let mut deletes = Vec::new();
    let mut upserts = Vec::new();
    for (key, before, after) in changes {
        match (before, after) {
            (Some(_), None) => deletes.push(Op::Delete(key)),
            (b, Some(a)) if b != Some(a) => upserts.push(Op::Upsert(a.clone())),
            _ => {}
        }
    }
    deletes.extend(upserts);
    deletes
}

/// Operations that turn `old` into `new`, comparing every frontend.
pub fn diff(old: &BTreeMap<FrontendKey, Frontend>, new: &BTreeMap<FrontendKey, Frontend>) -> Vec<Op> {
    let mut keys: Vec<FrontendKey> = old.keys().chain(new.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    plan_triples(keys.into_iter().map(|k| (k, old.get(&k), new.get(&k))))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        frontend::{Endpoint, Protocol, ServiceType},
        name::{ObjectName, ServicePortName},
    };

    fn fe(vip: u8, port: u16, backends: &[u8]) -> Frontend {
        Frontend {
            service: ServicePortName { service: ObjectName::new("default", format!("svc{vip}")), port: String::new() },
            key: FrontendKey { vip: Ipv4Addr::new(10, 96, 0, vip), port, protocol: Protocol::Tcp },
            service_type: ServiceType::ClusterIP,
            node_port: None,
            load_balancer_ips: vec![],
            terminating: vec![],
            backends: backends.iter().map(|b| Endpoint { ip: Ipv4Addr::new(10, 244, 0, *b), port: 8080 }).collect(),
        }
    }

    fn model(frontends: &[Frontend]) -> BTreeMap<FrontendKey, Frontend> {
        frontends.iter().map(|f| (f.key, f.clone())).collect()
    }

    #[test]
    fn empty_to_empty_is_nothing() {
        assert!(diff(&BTreeMap::new(), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn new_frontends_are_upserted() {
        let a = fe(1, 80, &[1, 2]);
        assert_eq!(diff(&BTreeMap::new(), &model(std::slice::from_ref(&a))), vec![Op::Upsert(a)]);
    }

    #[test]
    fn unchanged_frontends_are_left_alone() {
        let m = model(&[fe(1, 80, &[1]), fe(2, 53, &[2, 3])]);
        assert!(diff(&m, &m.clone()).is_empty());
    }

    #[test]
    fn only_the_changed_service_is_touched() {
        let old = model(&[fe(1, 80, &[1, 2, 3]), fe(2, 80, &[4])]);
        let new = model(&[fe(1, 80, &[1, 3]), fe(2, 80, &[4])]);
        assert_eq!(diff(&old, &new), vec![Op::Upsert(fe(1, 80, &[1, 3]))]);
    }

    #[test]
    fn removed_frontends_are_deleted_first() {
        let old = model(&[fe(1, 80, &[1]), fe(2, 80, &[2])]);
        let new = model(&[fe(2, 80, &[2]), fe(3, 80, &[])]);
        assert_eq!(diff(&old, &new), vec![Op::Delete(fe(1, 80, &[]).key), Op::Upsert(fe(3, 80, &[]))]);
    }

    #[test]
    fn losing_all_endpoints_is_an_upsert_with_none() {
        let old = model(&[fe(1, 80, &[1])]);
        let new = model(&[fe(1, 80, &[])]);
        assert_eq!(diff(&old, &new), vec![Op::Upsert(fe(1, 80, &[]))]);
    }

    #[test]
    fn renamed_service_on_same_frontend_is_upserted() {
        let old = model(&[fe(1, 80, &[1])]);
        let mut renamed = fe(1, 80, &[1]);
        renamed.service.service.name = "other".into();
        assert_eq!(diff(&old, &model(&[renamed.clone()])), vec![Op::Upsert(renamed)]);
    }
}
