use super::*;
use crate::index::Dirty;

fn service(name: &str, version: &str, ip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": version},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
    }))
    .unwrap()
}

fn name(n: &str) -> ObjectName {
    ObjectName::new("default", n)
}

fn names(index: &Index) -> Vec<String> {
    let mut v: Vec<String> = index.service_names().iter().map(|n| n.name().to_string()).collect();
    v.sort();
    v
}

fn listed(index: &mut Index, r: &mut Reflector, services: Vec<Service>) -> Applied {
    assert_eq!(r.apply::<Service>(index, Event::Init), Applied::Buffered);
    for s in services {
        assert_eq!(r.apply(index, Event::InitApply(s)), Applied::Buffered);
    }
    r.apply::<Service>(index, Event::InitDone)
}

#[test]
fn a_list_is_buffered_until_it_is_complete() {
    let (mut index, mut r) = (Index::default(), Reflector::new("api", ModelConfig::default()));
    r.apply::<Service>(&mut index, Event::Init);
    r.apply(&mut index, Event::InitApply(service("a", "1", "10.96.0.1")));
    assert!(names(&index).is_empty(), "nothing is applied before the list completes");
    assert_eq!(r.apply::<Service>(&mut index, Event::InitDone), Applied::Listed);
    assert_eq!(names(&index), ["a"]);
}

#[test]
fn a_relist_keeps_serving_and_removes_only_what_vanished() {
    let (mut index, mut r) = (Index::default(), Reflector::new("api", ModelConfig::default()));
    listed(&mut index, &mut r, vec![service("a", "1", "10.96.0.1"), service("b", "1", "10.96.0.2")]);
    index.take_dirty();
    r.apply::<Service>(&mut index, Event::Init);
    r.apply(&mut index, Event::InitApply(service("a", "1", "10.96.0.1")));
    assert_eq!(names(&index), ["a", "b"], "b keeps serving while the re-list runs");
    r.apply::<Service>(&mut index, Event::InitDone);
    assert_eq!(names(&index), ["a"], "b was deleted while the watch was down");
    assert_eq!(index.take_dirty(), Dirty::Some([name("b")].into()), "a is unchanged (same resourceVersion)");
}

#[test]
fn a_changed_version_in_a_relist_is_applied() {
    let (mut index, mut r) = (Index::default(), Reflector::new("api", ModelConfig::default()));
    listed(&mut index, &mut r, vec![service("a", "1", "10.96.0.1")]);
    index.take_dirty();
    listed(&mut index, &mut r, vec![service("a", "2", "10.96.0.9")]);
    assert_eq!(index.take_dirty(), Dirty::Some([name("a")].into()));
    assert_eq!(index.service(&name("a")).unwrap().vip, Some(std::net::Ipv4Addr::new(10, 96, 0, 9)));
}

#[test]
fn a_delete_during_a_relist_is_not_undone_by_it() {
    let (mut index, mut r) = (Index::default(), Reflector::new("api", ModelConfig::default()));
    listed(&mut index, &mut r, vec![service("a", "1", "10.96.0.1")]);
    r.apply::<Service>(&mut index, Event::Init);
    r.apply(&mut index, Event::InitApply(service("a", "1", "10.96.0.1")));
    r.apply(&mut index, Event::Delete(service("a", "2", "10.96.0.1")));
    r.apply::<Service>(&mut index, Event::InitDone);
    assert!(names(&index).is_empty(), "the deleted object does not come back from the buffer");
}

#[test]
fn watch_events_apply_at_once() {
    let (mut index, mut r) = (Index::default(), Reflector::new("api", ModelConfig::default()));
    listed(&mut index, &mut r, vec![]);
    assert_eq!(r.apply(&mut index, Event::Apply(service("a", "1", "10.96.0.1"))), Applied::Changed);
    assert_eq!(names(&index), ["a"]);
    assert_eq!(r.apply(&mut index, Event::Delete(service("a", "2", "10.96.0.1"))), Applied::Changed);
    assert!(names(&index).is_empty());
}
