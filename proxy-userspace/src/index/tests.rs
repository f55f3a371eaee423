use super::*;
use crate::testing::objects;

fn index(yaml: &str) -> Index {
    let mut i = Index::default();
    for o in objects(yaml).objects {
        i.apply(o);
    }
    i
}

fn key(n: &str) -> ObjectName {
    ObjectName::new("default", n)
}

fn slice(name: &str, service: &str) -> Object {
    objects(&format!(
        "kind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\n"
    ))
    .objects
    .remove(0)
}

const TWO: &str = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n---\n\
                   kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2}\n";

#[test]
fn changes_mark_only_their_service() {
    let mut i = index(TWO);
    assert_eq!(i.take_dirty(), Dirty::All, "a new index has everything to compute");
    assert_eq!(i.take_dirty(), Dirty::None);
    for o in objects(TWO).objects {
        i.apply(o);
    }
    assert_eq!(i.take_dirty(), Dirty::Some([key("a"), key("b")].into()));
    i.apply(slice("a-1", "a"));
    assert_eq!(i.take_dirty(), Dirty::Some([key("a")].into()));
    assert_eq!(i.slices_of(&key("a")).count(), 1);
}

#[test]
fn a_slice_moving_between_services_touches_both() {
    let mut i = Index::default();
    i.take_dirty();
    i.apply(slice("x", "a"));
    i.take_dirty();
    i.apply(slice("x", "b"));
    assert_eq!(i.take_dirty(), Dirty::Some([key("a"), key("b")].into()));
    assert_eq!(i.slices_of(&key("a")).count(), 0);
    i.delete_slice(&key("x"));
    assert_eq!(i.take_dirty(), Dirty::Some([key("b")].into()));
    assert_eq!(i.slices_of(&key("b")).count(), 0);
}

#[test]
fn unlabelled_slices_are_rejected_and_forgotten_on_delete() {
    let mut i = index("kind: EndpointSlice\nmetadata: {name: loose}\naddressType: IPv4\n");
    assert_eq!(i.rejections().count(), 1);
    assert_eq!(i.rejection_count(), 1);
    assert_eq!(i.take_new_rejections().len(), 1);
    i.delete_slice(&key("loose"));
    assert_eq!(i.rejections().count(), 0);
    assert_eq!(i.rejection_count(), 0);
}

#[test]
fn a_rejection_is_new_once_and_counted_while_its_object_stays() {
    let bad = "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 9, protocol: SCTP}]}\n";
    let mut i = index(bad);
    assert_eq!(i.take_new_rejections().len(), 1);
    for o in objects(bad).objects {
        i.apply(o);
    }
    assert!(i.take_new_rejections().is_empty(), "the same object again raises nothing new");
    assert_eq!(i.rejection_count(), 1);
    i.delete_service(&key("s"));
    assert_eq!(i.rejection_count(), 0);
}

#[test]
fn unreadable_documents_are_replaced_per_origin() {
    let mut i = Index::default();
    let r = |o: &str| Rejection {
        origin: o.into(),
        object: "document 1".into(),
        kind: crate::rejection::RejectReason::Unreadable,
        reason: "bad".into(),
    };
    i.set_unreadable("a.yaml", vec![r("a.yaml")]);
    i.set_unreadable("b.yaml", vec![r("b.yaml")]);
    assert_eq!(i.rejection_count(), 2);
    i.set_unreadable("a.yaml", vec![]);
    assert_eq!(i.rejections().cloned().collect::<Vec<_>>(), [r("b.yaml")]);
    assert_eq!(i.rejection_count(), 1);
}

#[test]
fn a_service_and_its_slices_come_and_go_in_any_order_sharing_one_name() {
    let mut i = Index::default();
    i.apply(slice("a-1", "a"));
    assert_eq!((i.service_count(), i.slices_of(&key("a")).count()), (0, 1), "a slice may come first");
    i.apply(objects(TWO).objects.remove(0));
    let held = i.service(&key("a")).unwrap();
    let owner = i.slices_of(&key("a")).next().unwrap().service.clone().unwrap();
    assert!(owner.shares(&held.name), "the Service takes the name its slice brought");
    i.delete_service(&key("a"));
    assert_eq!((i.service_count(), i.slices_of(&key("a")).count()), (0, 1), "the slice outlives its Service");
    assert_eq!(i.service_names(), Vec::<ObjectName>::new());
    i.delete_slice(&key("a-1"));
    assert!(i.services.is_empty(), "nothing is left under the name");
}
