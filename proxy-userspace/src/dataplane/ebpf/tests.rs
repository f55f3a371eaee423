use super::{
    fake::{FakeMaps, Faulty},
    *,
};
use crate::{
    frontend::{Endpoint, Extras},
    testing::frontend as fe,
};

fn sizes(services: u32, backends: u32) -> MapSizes {
    MapSizes { services, backends, flows: 16 }
}

fn upsert<M: ServiceMaps>(dp: &mut EbpfDataplane<M>, f: &Frontend) -> Vec<ApplyError> {
    dp.apply(&[Op::Upsert(f.key)], &Desired::from([(f.key, f.clone())]))
}

/// The backends (last octets) the datapath would read for a frontend.
fn serving(maps: &FakeMaps, f: &Frontend) -> Vec<u8> {
    let value = maps.services[&service_key(&f.key)];
    maps.backends_of(&value).iter().map(|b| b.addr[3]).collect()
}

#[test]
fn a_frontend_is_written_with_its_vip_marker_and_removed_with_it() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16));
    let (a, b) = (fe(1, 80, &[1, 2]), fe(1, 443, &[3]));
    assert!(upsert(&mut dp, &a).is_empty());
    assert!(upsert(&mut dp, &b).is_empty());
    assert_eq!(serving(dp.maps(), &a), [1, 2]);
    let marker = ServiceKey::vip_marker([10, 96, 0, 1]);
    assert!(dp.maps().services.contains_key(&marker));
    dp.apply(&[Op::Delete(a.key)], &Desired::new());
    assert!(dp.maps().services.contains_key(&marker), "another frontend still uses the VIP");
    dp.apply(&[Op::Delete(b.key)], &Desired::new());
    assert!(dp.maps().services.is_empty());
    assert_eq!(dp.maps().backends.len(), 1, "the last set goes at the next apply");
    dp.apply(&[], &Desired::new());
    assert!(dp.maps().backends.is_empty(), "{:?}", dp.maps());
}

#[test]
fn ids_of_deleted_frontends_are_reused_and_their_traffic_forgotten() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16));
    let (a, b) = (fe(1, 80, &[1]), fe(2, 80, &[2]));
    upsert(&mut dp, &a);
    upsert(&mut dp, &b);
    let id_a = dp.maps().services[&service_key(&a.key)].id;
    dp.apply(&[Op::Delete(a.key)], &Desired::new());
    assert_eq!(dp.maps().forgotten_traffic, [id_a]);
    let c = fe(3, 80, &[3]);
    upsert(&mut dp, &c);
    assert_eq!(dp.maps().services[&service_key(&c.key)].id, id_a, "the freed id is taken again");
}

#[test]
fn a_changed_backend_set_is_published_under_a_new_set_and_the_old_freed() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16));
    upsert(&mut dp, &fe(1, 80, &[1, 2, 3]));
    let before = dp.maps().services[&service_key(&fe(1, 80, &[]).key)];
    upsert(&mut dp, &fe(1, 80, &[4]));
    let after = dp.maps().services[&service_key(&fe(1, 80, &[]).key)];
    assert_eq!(after.id, before.id, "the frontend keeps its id");
    assert_ne!(after.backend_set, before.backend_set);
    assert_eq!(serving(dp.maps(), &fe(1, 80, &[])), [4]);
    let old = BackendKey { set: before.backend_set, slot: 0 };
    assert!(dp.maps().backends.contains_key(&old), "a program that read the old entry still finds its set");
    dp.apply(&[], &Desired::new());
    assert_eq!(dp.maps().backends.len(), 1, "the old set's slots are gone at the next apply");
    upsert(&mut dp, &fe(1, 80, &[5]));
    assert_ne!(dp.maps().services[&service_key(&fe(1, 80, &[]).key)].backend_set, after.backend_set);
}

#[test]
fn only_removed_backends_have_their_traffic_forgotten() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16));
    upsert(&mut dp, &fe(1, 80, &[1, 2, 3]));
    let id = dp.maps().services[&service_key(&fe(1, 80, &[]).key)].id;
    upsert(&mut dp, &fe(1, 80, &[2, 4]));
    let forgotten: Vec<(u32, u8)> = dp.maps().forgotten_backends.iter().map(|(id, b)| (*id, b.addr[3])).collect();
    assert_eq!(forgotten, [(id, 1), (id, 3)], "read back from the old set, the kept one left alone");
}

#[test]
fn a_failed_write_in_the_middle_of_a_rewrite_leaves_the_previous_set_serving() {
    let mut dp = EbpfDataplane::new(Faulty { inner: FakeMaps::new(16, 16), ok_writes: usize::MAX }, sizes(16, 16));
    let old = fe(1, 80, &[1, 2]);
    assert!(upsert(&mut dp, &old).is_empty());
    // Two of three new slots get written, then writes fail.
    dp.maps.ok_writes = 2;
    let errors = upsert(&mut dp, &fe(1, 80, &[5, 6, 7]));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].error.label(), "map_write");
    dp.maps.ok_writes = usize::MAX;
    // The failed set's slots were taken out again once writes work.
    dp.apply(&[], &Desired::new());
    assert_eq!(serving(&dp.maps.inner, &old), [1, 2], "the previous set still serves");
    assert_eq!(dp.maps.inner.backends.len(), 2, "nothing of the failed set is left");
    assert!(upsert(&mut dp, &fe(1, 80, &[5, 6, 7])).is_empty(), "a retry succeeds");
    assert_eq!(serving(&dp.maps.inner, &old), [5, 6, 7]);
}

#[test]
fn a_failed_publish_leaves_the_previous_set_serving() {
    let mut dp = EbpfDataplane::new(Faulty { inner: FakeMaps::new(16, 16), ok_writes: usize::MAX }, sizes(16, 16));
    let old = fe(1, 80, &[1, 2]);
    upsert(&mut dp, &old);
    // Both slots are written; the frontend entry is not.
    dp.maps.ok_writes = 2;
    assert_eq!(upsert(&mut dp, &fe(1, 80, &[5, 6])).len(), 1);
    dp.maps.ok_writes = usize::MAX;
    dp.apply(&[], &Desired::new());
    assert_eq!(serving(&dp.maps.inner, &old), [1, 2]);
    assert_eq!(dp.maps.inner.backends.len(), 2);
}

#[test]
fn a_full_service_map_refuses_new_frontends_with_a_reason_and_keeps_the_rest() {
    // Room for one frontend and its VIP marker.
    let mut dp = EbpfDataplane::new(FakeMaps::new(2, 16), sizes(2, 16));
    assert!(upsert(&mut dp, &fe(1, 80, &[1])).is_empty());
    let errors = upsert(&mut dp, &fe(2, 80, &[2]));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].error.label(), "map_full");
    assert!(errors[0].to_string().contains("--max-services"), "{}", errors[0]);
    assert_eq!(dp.maps().services.len(), 2, "nothing of the refused frontend was written");
    assert_eq!(dp.maps().backends.len(), 1);
    assert!(upsert(&mut dp, &fe(1, 80, &[1, 3])).is_empty(), "the programmed one can still change");
}

#[test]
fn a_backend_set_that_does_not_fit_is_refused_and_the_old_one_kept() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 4), sizes(16, 4));
    upsert(&mut dp, &fe(1, 80, &[1, 2]));
    // 2 live + 3 new > 4: the new set cannot be written beside the old.
    let errors = upsert(&mut dp, &fe(1, 80, &[3, 4, 5]));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("--max-backends"), "{}", errors[0]);
    assert_eq!(serving(dp.maps(), &fe(1, 80, &[])), [1, 2]);
    assert!(upsert(&mut dp, &fe(1, 80, &[3, 4])).is_empty(), "a set that fits beside the old one is taken");
}

#[test]
fn a_kernel_full_answer_is_reported_as_a_full_map() {
    // The fake holds fewer entries than the configured size, as when another
    // writer filled the map: the kernel's own refusal is reported as full.
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 1), sizes(16, 16));
    let errors = upsert(&mut dp, &fe(1, 80, &[1, 2]));
    assert_eq!(errors[0].error.label(), "map_full");
    assert!(dp.maps().backends.is_empty() && dp.maps().services.is_empty());
}

#[test]
fn terminating_endpoints_follow_the_ready_ones_and_are_counted_apart() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16));
    let mut f = fe(1, 80, &[1]);
    f.terminating = Box::new([Endpoint { ip: Ipv4Addr::new(10, 244, 0, 9), port: 8080 }]);
    upsert(&mut dp, &f);
    let v = dp.maps().services[&service_key(&f.key)];
    assert_eq!((v.backend_count, v.terminating_count), (1, 1));
    assert_eq!(serving(dp.maps(), &f), [1, 9]);
}

/// `fe` reached from outside: node port 30080, an external IP, a load
/// balancer IP fenced to 203.0.113.0/25, under `local_only` with `local` (last octets) here.
fn external(f: Frontend, local_only: bool, local: &[u8]) -> Frontend {
    let ext = crate::frontend::External {
        node_port: Some(30080),
        external_ips: [Ipv4Addr::new(198, 51, 100, 7)].into(),
        load_balancer_ips: [Ipv4Addr::new(192, 0, 2, 10)].into(),
        source_ranges: ["203.0.113.0/25".parse().unwrap()].into(),
        local_only,
        health_check_node_port: None,
    };
    let local_backends = local.iter().map(|h| Endpoint { ip: Ipv4Addr::new(10, 244, 0, *h), port: 8080 }).collect();
    Frontend { external: Some(Box::new(ext)), extras: Extras::of(local_backends, None), ..f }
}

fn entry(dp: &EbpfDataplane<FakeMaps>, addr: [u8; 4], port: u16) -> ServiceValue {
    dp.maps().services[&ServiceKey::new(addr, port, proxy_common::maps::PROTO_TCP)]
}

#[test]
fn external_frontends_share_the_id_and_carry_their_policy() {
    let node = Ipv4Addr::new(192, 168, 0, 2);
    let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16)).with_node_addresses(vec![node]);
    let cluster = external(fe(1, 80, &[1, 2]), false, &[]);
    assert!(upsert(&mut dp, &cluster).is_empty());
    let id = dp.maps().services[&service_key(&cluster.key)].id;
    let node_port = entry(&dp, node.octets(), 30080);
    let external_ip = entry(&dp, [198, 51, 100, 7], 80);
    let lb = entry(&dp, [192, 0, 2, 10], 80);
    for v in [node_port, external_ip, lb] {
        assert_eq!((v.id, v.backend_count), (id, 2), "every backend, under the ClusterIP's id");
        assert_ne!(v.flags & flags::MASQUERADE, 0, "Cluster policy: source-NATed to the node");
    }
    assert_eq!(node_port.kind, kind::NODE_PORT_ADDRESS);
    assert_eq!(lb.flags & flags::SOURCE_RANGES, flags::SOURCE_RANGES, "only the load balancer IP is fenced");
    assert_eq!(external_ip.flags & flags::SOURCE_RANGES, 0);
    assert_eq!(dp.maps().source_ranges, [(id, "203.0.113.0/25".parse().unwrap())].into());

    // Local policy: its own set of this node's endpoints, no masquerade, dropped when empty.
    let local = external(fe(1, 80, &[1, 2]), true, &[2]);
    assert!(upsert(&mut dp, &local).is_empty());
    let v = entry(&dp, node.octets(), 30080);
    assert_eq!(v.flags & flags::MASQUERADE, 0);
    assert_ne!(v.flags & flags::DROP_WITHOUT_BACKEND, 0);
    assert_eq!(dp.maps().backends_of(&v).iter().map(|b| b.addr[3]).collect::<Vec<_>>(), [2]);
    assert_eq!(serving(dp.maps(), &local), [1, 2], "the ClusterIP keeps every endpoint");
    // Pods and node processes reach it through every endpoint.
    assert_ne!(v.flags & flags::LOCAL, 0);
    let scope = dp.maps().cluster_scope[&id];
    assert_eq!(scope, dp.maps().services[&service_key(&local.key)], "the ClusterIP's own backends");

    // No longer reached from outside: the external frontends, ranges and local set go.
    let plain = fe(1, 80, &[1, 2]);
    assert!(upsert(&mut dp, &plain).is_empty());
    dp.apply(&[], &Desired::new());
    assert_eq!(dp.maps().services.len(), 2, "the ClusterIP and its VIP marker: {:?}", dp.maps().services);
    assert!(dp.maps().source_ranges.is_empty() && dp.maps().cluster_scope.is_empty());
    assert_eq!(dp.maps().backends.len(), 2, "only the ClusterIP's set is left");

    // Deleted with external frontends: nothing is left.
    upsert(&mut dp, &local);
    dp.apply(&[Op::Delete(local.key)], &Desired::new());
    dp.apply(&[], &Desired::new());
    assert!(dp.maps().services.is_empty() && dp.maps().backends.is_empty() && dp.maps().source_ranges.is_empty());
    assert!(dp.maps().cluster_scope.is_empty());
}

/// A load balancer IP handed from one Service to another in one sync stays
/// with its new owner, whichever of the two is written first.
#[test]
fn a_way_in_from_outside_moving_between_frontends_in_one_sync_stays_with_its_new_one() {
    let node = Ipv4Addr::new(192, 168, 0, 2);
    let lb = Ipv4Addr::new(192, 0, 2, 10);
    let with_lb = |f: Frontend, ips: &[Ipv4Addr]| {
        let ext = crate::frontend::External { load_balancer_ips: ips.into(), ..Default::default() };
        Frontend { service_type: ServiceType::LoadBalancer, external: Some(Box::new(ext)), ..f }
    };
    // Written first or last: the frontend gaining the address sorts before
    // the one losing it, then after it.
    for (gains, loses) in [(fe(1, 80, &[1]), fe(2, 80, &[2])), (fe(3, 80, &[3]), fe(1, 80, &[1]))] {
        let mut dp = EbpfDataplane::new(FakeMaps::new(16, 16), sizes(16, 16)).with_node_addresses(vec![node]);
        let (gains_before, loses_before) = (with_lb(gains.clone(), &[]), with_lb(loses.clone(), &[lb]));
        let desired = Desired::from([(gains.key, gains_before), (loses.key, loses_before)]);
        assert!(dp.apply(&[Op::Upsert(gains.key), Op::Upsert(loses.key)], &desired).is_empty());
        let (gains, loses) = (with_lb(gains, &[lb]), with_lb(loses, &[]));
        let desired = Desired::from([(gains.key, gains.clone()), (loses.key, loses.clone())]);
        let mut ops = [Op::Upsert(gains.key), Op::Upsert(loses.key)];
        ops.sort_by_key(Op::key);
        assert!(dp.apply(&ops, &desired).is_empty());
        let owner = dp.maps().services[&service_key(&gains.key)].id;
        assert_eq!(entry(&dp, lb.octets(), 80).id, owner, "{:?} holds {lb}", gains.key);
    }
}

/// A restart reusing the maps: what a previous run programmed, taken over.
fn restarted(maps: &FakeMaps) -> EbpfDataplane<FakeMaps> {
    let mut dp =
        EbpfDataplane::new(maps.clone(), sizes(32, 32)).with_node_addresses(vec![Ipv4Addr::new(192, 168, 1, 2)]);
    dp.adopt_programmed();
    dp
}

#[test]
fn a_restart_takes_over_the_maps_and_its_first_sync_removes_only_what_is_gone() {
    let mut before = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32))
        .with_node_addresses(vec![Ipv4Addr::new(192, 168, 1, 2)]);
    let (kept, gone) = (external(fe(1, 80, &[1, 2]), true, &[2]), fe(2, 53, &[3]));
    let desired = Desired::from([(kept.key, kept.clone()), (gone.key, gone.clone())]);
    assert!(before.apply(&[Op::Upsert(kept.key), Op::Upsert(gone.key)], &desired).is_empty());
    // A change just before the stop: its old set is still there, unpublished.
    assert!(upsert(&mut before, &fe(2, 53, &[4])).is_empty());
    let programmed = before.maps().clone();
    let kept_id = programmed.services[&service_key(&kept.key)].id;

    let mut after = restarted(&programmed);
    assert_eq!(after.maps().services, programmed.services, "taking over writes nothing the datapath reads");
    // The first complete sync: the kept Service only (the other was deleted meanwhile).
    let desired = Desired::from([(kept.key, kept.clone())]);
    assert!(after.apply(&[Op::Upsert(kept.key)], &desired).is_empty());
    after.apply(&[], &desired);
    let maps = after.maps();
    assert_eq!(maps.services[&service_key(&kept.key)].id, kept_id, "the frontend keeps its id (and its flows)");
    assert_eq!(serving(maps, &kept), [1, 2]);
    assert!(!maps.services.contains_key(&service_key(&gone.key)), "gone from the desired state: removed");
    assert!(!maps.services.contains_key(&ServiceKey::vip_marker([10, 96, 0, 2])));
    assert_eq!(maps.source_ranges.len(), 1, "the kept frontend's range stays: {:?}", maps.source_ranges);
    assert_eq!(maps.cluster_scope.len(), 1);
    // Every slot left belongs to a set a frontend names: nothing leaked.
    let named: std::collections::BTreeSet<u32> = maps.services.values().map(|v| v.backend_set).collect();
    assert!(maps.backends.keys().all(|k| named.contains(&k.set)), "{:?} vs {named:?}", maps.backends);
    // Ids in use are not handed out again.
    let new = fe(3, 80, &[5]);
    assert!(upsert(&mut after, &new).is_empty());
    assert_ne!(after.maps().services[&service_key(&new.key)].id, kept_id);
}

#[test]
fn a_drain_left_unfinished_is_cleared_when_the_maps_are_taken_back() {
    let mut before = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32))
        .with_node_addresses(vec![Ipv4Addr::new(192, 168, 1, 2)]);
    // Local policy: a cluster-wide scope beside the frontends.
    assert!(upsert(&mut before, &external(fe(1, 80, &[1, 2]), true, &[2])).is_empty());
    let mut drained = before.maps().clone();
    for value in drained.services.values_mut().chain(drained.cluster_scope.values_mut()) {
        value.flags |= flags::DRAINING;
    }
    let after = restarted(&drained);
    assert_eq!(after.maps().services, before.maps().services, "as the eBPF run left them");
    assert_eq!(after.maps().cluster_scope, before.maps().cluster_scope);
}

#[test]
fn ids_start_past_the_ones_in_use_and_reuse_the_holes() {
    let ids = Ids::with_used(&[2, 5].into());
    let mut ids = ids;
    assert_eq!([ids.take(), ids.take(), ids.take(), ids.take()], [1, 3, 4, 6]);
    let mut fresh = Ids::with_used(&Default::default());
    assert_eq!(fresh.take(), 1);
}

#[test]
fn link_pins_are_named_without_dots() {
    assert_eq!(pins::interface_link("tc", 4, "flannel.1", "ingress"), "tc-4-flannel_1-ingress");
}

#[test]
fn drift_is_written_again_and_strays_removed() {
    let mut dp = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32));
    let (a, b) = (fe(1, 80, &[1, 2]), fe(2, 80, &[3]));
    let desired = Desired::from([(a.key, a.clone()), (b.key, b.clone())]);
    assert!(dp.apply(&[Op::Upsert(a.key), Op::Upsert(b.key)], &desired).is_empty());
    assert_eq!(dp.repair(&desired), 0, "nothing drifted");
    let want = dp.maps().services.clone();

    // Someone deletes a's entry and one of b's slots, adds an entry of their
    // own and removes b's VIP marker.
    let maps = &mut dp.maps;
    maps.services.remove(&service_key(&a.key));
    let b_set = maps.services[&service_key(&b.key)].backend_set;
    maps.backends.remove(&BackendKey { set: b_set, slot: 0 });
    let stray = ServiceKey::new([10, 96, 0, 9], 80, 6);
    maps.services.insert(stray, ServiceValue { id: 99, ..ServiceValue::MARKER });
    maps.services.remove(&ServiceKey::vip_marker([10, 96, 0, 2]));

    assert_eq!(dp.repair(&desired), 4, "two frontends, the stray and the marker");
    assert_eq!(serving(dp.maps(), &a), [1, 2]);
    assert_eq!(serving(dp.maps(), &b), [3]);
    assert!(!dp.maps().services.contains_key(&stray));
    let keys = |m: &std::collections::BTreeMap<ServiceKey, ServiceValue>| m.keys().copied().collect::<Vec<_>>();
    assert_eq!(keys(&dp.maps().services), keys(&want), "the same frontends and markers as before");
    assert_eq!(dp.maps().services[&service_key(&a.key)].id, want[&service_key(&a.key)].id, "ids kept");
    assert_eq!(dp.repair(&desired), 0, "repaired for good");
}

#[test]
fn drift_of_ranges_and_scopes_is_repaired() {
    let node = Ipv4Addr::new(192, 168, 0, 2);
    let mut dp = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32)).with_node_addresses(vec![node]);
    let local = external(fe(1, 80, &[1, 2]), true, &[2]);
    let desired = Desired::from([(local.key, local.clone())]);
    assert!(dp.apply(&[Op::Upsert(local.key)], &desired).is_empty());
    assert_eq!(dp.repair(&desired), 0, "nothing drifted");
    let (ranges, scopes) = (dp.maps().source_ranges.clone(), dp.maps().cluster_scope.clone());

    // Someone removes the fence and the cluster-wide scope, and adds a
    // range and a scope of an id nothing owns.
    let maps = &mut dp.maps;
    maps.source_ranges.clear();
    maps.cluster_scope.clear();
    maps.source_ranges.insert((77, "0.0.0.0/0".parse().unwrap()));
    maps.cluster_scope.insert(77, ServiceValue::MARKER);

    assert_eq!(dp.repair(&desired), 3, "the frontend, the stray range and the stray scope");
    assert_eq!(dp.maps().source_ranges, ranges);
    assert_eq!(dp.maps().cluster_scope.keys().collect::<Vec<_>>(), scopes.keys().collect::<Vec<_>>());
    assert_eq!(dp.repair(&desired), 0, "repaired for good");
}

/// `f` with `internalTrafficPolicy: Local` and `local` (last octets) on this node.
fn internal_local(f: Frontend, local: &[u8]) -> Frontend {
    let local_backends = local.iter().map(|h| Endpoint { ip: Ipv4Addr::new(10, 244, 0, *h), port: 8080 }).collect();
    Frontend { internal_local: true, extras: Extras::of(local_backends, None), ..f }
}

#[test]
fn a_local_internal_policy_serves_pods_from_this_node_and_outside_from_every_endpoint() {
    let node = Ipv4Addr::new(192, 168, 0, 2);
    let mut dp = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32)).with_node_addresses(vec![node]);
    // ClusterIP only: this node's endpoint.
    let plain = internal_local(fe(1, 80, &[1, 2]), &[2]);
    assert!(upsert(&mut dp, &plain).is_empty());
    assert_eq!(serving(dp.maps(), &plain), [2]);
    assert_eq!(dp.maps().services[&service_key(&plain.key)].flags, 0);
    // None here, some elsewhere: dropped; none at all: refused (no flag).
    let elsewhere = internal_local(fe(1, 80, &[1, 2]), &[]);
    assert!(upsert(&mut dp, &elsewhere).is_empty());
    let v = dp.maps().services[&service_key(&elsewhere.key)];
    assert_eq!((v.backend_count, v.flags & flags::DROP_WITHOUT_BACKEND), (0, flags::DROP_WITHOUT_BACKEND));
    let nowhere = internal_local(fe(1, 80, &[]), &[]);
    assert!(upsert(&mut dp, &nowhere).is_empty());
    assert_eq!(dp.maps().services[&service_key(&nowhere.key)].flags, 0);

    // External traffic under a Cluster policy: every endpoint.
    let cluster_outside = internal_local(external(fe(1, 80, &[1, 2]), false, &[]), &[2]);
    assert!(upsert(&mut dp, &cluster_outside).is_empty());
    assert_eq!(serving(dp.maps(), &cluster_outside), [2]);
    let np = entry(&dp, node.octets(), 30080);
    assert_eq!(dp.maps().backends_of(&np).iter().map(|b| b.addr[3]).collect::<Vec<_>>(), [1, 2]);

    // Both Local: outside clients get this node's endpoints, and pods
    // reaching an external address every endpoint (kube-proxy's short circuit).
    let both = internal_local(external(fe(1, 80, &[1, 2]), true, &[2]), &[2]);
    assert!(upsert(&mut dp, &both).is_empty());
    let np = entry(&dp, node.octets(), 30080);
    assert_eq!(dp.maps().backends_of(&np).iter().map(|b| b.addr[3]).collect::<Vec<_>>(), [2]);
    let id = np.id;
    let scope = dp.maps().cluster_scope[&id];
    assert_eq!(dp.maps().backends_of(&scope).iter().map(|b| b.addr[3]).collect::<Vec<_>>(), [1, 2]);
    let desired = Desired::from([(both.key, both.clone())]);
    assert_eq!(dp.repair(&desired), 0, "consistent with its own bookkeeping");

    // A restart takes the sets over as they are; nothing leaks afterwards.
    let programmed = dp.maps().clone();
    let mut after = restarted(&programmed);
    assert_eq!(after.repair(&desired), 0, "taken over whole");
    let plain_again = internal_local(fe(1, 80, &[1, 2]), &[1]);
    let desired = Desired::from([(plain_again.key, plain_again.clone())]);
    assert!(after.apply(&[Op::Upsert(plain_again.key)], &desired).is_empty());
    after.apply(&[], &desired);
    assert_eq!(serving(after.maps(), &plain_again), [1]);
    assert!(after.maps().cluster_scope.is_empty());
    let named: std::collections::BTreeSet<u32> = after.maps().services.values().map(|v| v.backend_set).collect();
    assert!(after.maps().backends.keys().all(|k| named.contains(&k.set)), "{:?}", after.maps().backends);
}

#[test]
fn session_affinity_is_written_with_its_frontend_and_removed_with_it() {
    let node = Ipv4Addr::new(192, 168, 0, 2);
    let mut dp = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32)).with_node_addresses(vec![node]);
    let f = Frontend { affinity_timeout: Some(600), ..external(fe(1, 80, &[1, 2]), false, &[]) };
    assert!(upsert(&mut dp, &f).is_empty());
    let v = dp.maps().services[&service_key(&f.key)];
    assert_eq!(v.flags & flags::AFFINITY, flags::AFFINITY);
    assert_eq!(entry(&dp, node.octets(), 30080).flags & flags::AFFINITY, flags::AFFINITY, "on every way in");
    assert_eq!(dp.maps().affinity, [(v.id, 600)].into());
    let desired = Desired::from([(f.key, f.clone())]);
    dp.maps.affinity.clear();
    assert_eq!(dp.repair(&desired), 1, "a lost timeout is written again");
    assert_eq!(dp.maps().affinity, [(v.id, 600)].into());
    // Turned off: the timeout goes; deleted: nothing is left.
    let plain = Frontend { affinity_timeout: None, ..f.clone() };
    assert!(upsert(&mut dp, &plain).is_empty());
    assert!(dp.maps().affinity.is_empty());
    assert_eq!(dp.maps().services[&service_key(&f.key)].flags & flags::AFFINITY, 0);
    assert!(upsert(&mut dp, &f).is_empty());
    dp.apply(&[Op::Delete(f.key)], &Desired::new());
    assert!(dp.maps().affinity.is_empty());
}

#[test]
fn a_first_sync_adopts_the_nodes_flows_then_serves_them_all() {
    use crate::dataplane::conntrack::Flow;
    let mut dp = EbpfDataplane::new(FakeMaps::new(32, 32), sizes(32, 32))
        .with_node_addresses(vec![Ipv4Addr::new(192, 168, 1, 2)]);
    dp.adopting = true;
    // Local policy: a cluster-wide scope beside the frontends.
    let f = external(fe(1, 80, &[1, 2]), true, &[2]);
    assert!(upsert(&mut dp, &f).is_empty());
    let maps = dp.maps();
    let adopting = |v: &ServiceValue| v.flags & flags::ADOPTING != 0;
    // Every frontend (a VIP's marker is none).
    let frontends = maps.services.values().filter(|v| **v != ServiceValue::MARKER);
    assert!(frontends.chain(maps.cluster_scope.values()).all(adopting), "{maps:?}");
    let id = maps.services[&service_key(&f.key)].id;
    let vip = f.key.vip;
    let flow = |client: u8, replier: Ipv4Addr| Flow {
        proto: proxy_common::maps::PROTO_TCP,
        tcp_state: 3,
        client: (Ipv4Addr::new(10, 244, 0, client), 40000),
        addressed: (vip, 80),
        replier: (replier, 80),
    };
    let flows = vec![flow(100, Ipv4Addr::new(10, 244, 0, 1)), flow(101, vip)];
    dp.adopt_host_flows(Ok(flows));
    let maps = dp.maps();
    assert!(!maps.services.values().chain(maps.cluster_scope.values()).any(adopting), "the adoption ends: {maps:?}");
    let tracked: Vec<(u8, u8, u32)> =
        maps.flows.iter().map(|(k, e)| (k.src_addr[3], e.addr[3], e.service_id)).collect();
    assert_eq!(tracked, [(100, 1, id)], "only the translated flow is the node's");
    // Conntrack stays on for it until it ends (a new connection on its port: eBPF mode's).
    dp.release_conntrack_when_done();
    assert_eq!(dp.adopted_flows.len(), 1);
    let (key, entry) = dp.maps().flows[0];
    dp.maps.flows.push((key, proxy_common::conntrack::CtEntry { state: 0, ..entry }));
    dp.release_conntrack_when_done();
    assert!(dp.adopted_flows.is_empty());
    // Later writes carry no flag.
    assert!(upsert(&mut dp, &external(fe(1, 80, &[1, 3]), true, &[3])).is_empty());
    assert!(!dp.maps().services.values().any(adopting));
}
