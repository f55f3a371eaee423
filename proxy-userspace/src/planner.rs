//! Turns changes of frontends into small operations for the dataplane. It
//! never touches the kernel, so every case is unit-tested.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::frontend::{Change, Family, Frontend, FrontendKey};

/// What to do with one frontend. An upsert names the frontend only: the
/// dataplane reads it from the desired state it is handed, so no operation
/// copies a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<A = Ipv4Addr> {
    /// Create the frontend, or replace its backend set.
    Upsert(FrontendKey<A>),
    Delete(FrontendKey<A>),
}

impl<A: Copy> Op<A> {
    /// The frontend the operation is about.
    pub fn key(&self) -> FrontendKey<A> {
        match self {
            Op::Upsert(k) | Op::Delete(k) => *k,
        }
    }
}

/// Operations for the model's changes: deletions first (so a frontend
/// moving between Services never exists twice).
pub fn plan<A: Copy>(changes: &[Change<A>]) -> Vec<Op<A>> {
    let deletes = changes.iter().filter(|c| !c.exists && c.before.is_some()).map(|c| Op::Delete(c.key));
    let upserts = changes.iter().filter(|c| c.exists).map(|c| Op::Upsert(c.key));
    deletes.chain(upserts).collect()
}

/// Operations that turn `old` into `new`, comparing every frontend.
pub fn diff<A: Family>(
    old: &BTreeMap<FrontendKey<A>, Frontend<A>>,
    new: &BTreeMap<FrontendKey<A>, Frontend<A>>,
) -> Vec<Op<A>> {
    let mut keys: Vec<FrontendKey<A>> = old.keys().chain(new.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    let changes: Vec<Change<A>> = keys
        .into_iter()
        .filter(|k| old.get(k) != new.get(k))
        .map(|key| Change { key, before: old.get(&key).cloned().map(Box::new), exists: new.contains_key(&key) })
        .collect();
    plan(&changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::frontend as fe;

    fn model(frontends: &[Frontend]) -> BTreeMap<FrontendKey, Frontend> {
        frontends.iter().map(|f| (f.key, f.clone())).collect()
    }

    #[test]
    fn empty_to_empty_is_nothing() {
        assert!(diff::<Ipv4Addr>(&BTreeMap::new(), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn new_frontends_are_upserted() {
        let a = fe(1, 80, &[1, 2]);
        assert_eq!(diff(&BTreeMap::new(), &model(std::slice::from_ref(&a))), vec![Op::Upsert(a.key)]);
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
        assert_eq!(diff(&old, &new), vec![Op::Upsert(fe(1, 80, &[1, 3]).key)]);
    }

    #[test]
    fn removed_frontends_are_deleted_first() {
        let old = model(&[fe(1, 80, &[1]), fe(2, 80, &[2])]);
        let new = model(&[fe(2, 80, &[2]), fe(3, 80, &[])]);
        assert_eq!(diff(&old, &new), vec![Op::Delete(fe(1, 80, &[]).key), Op::Upsert(fe(3, 80, &[]).key)]);
    }

    #[test]
    fn losing_all_endpoints_is_an_upsert_with_none() {
        let old = model(&[fe(1, 80, &[1])]);
        let new = model(&[fe(1, 80, &[])]);
        assert_eq!(diff(&old, &new), vec![Op::Upsert(fe(1, 80, &[]).key)]);
    }

    #[test]
    fn renamed_service_on_same_frontend_is_upserted() {
        let old = model(&[fe(1, 80, &[1])]);
        let mut renamed = fe(1, 80, &[1]);
        renamed.service.service = crate::name::ObjectName::new("default", "other");
        assert_eq!(diff(&old, &model(&[renamed.clone()])), vec![Op::Upsert(renamed.key)]);
    }
}
