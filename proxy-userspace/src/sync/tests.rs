use std::sync::Mutex;

use super::*;
use crate::{
    dataplane::{ApplyError, DataplaneError, Desired, Mode},
    frontend::Protocol,
    testing::objects,
};

/// Records what it was asked to apply; refuses frontends on port 666 while
/// `refuse` is set.
#[derive(Default)]
struct Recorder {
    log: Log,
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

impl Dataplane for Recorder {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn apply(&mut self, ops: &[Op], _desired: &Desired) -> Vec<ApplyError> {
        self.log.lock().unwrap().push(ops.to_vec());
        let refuse = self.refuse.load(std::sync::atomic::Ordering::Relaxed);
        ops.iter()
            .filter_map(|op| match op {
                Op::Upsert(key) if refuse && key.port == 666 => Some(ApplyError {
                    frontend: *key,
                    error: DataplaneError::MapFull { map: "SERVICES", capacity: 1, flag: "--max-services" },
                }),
                _ => None,
            })
            .collect()
    }
}

/// What a recorder was asked to apply, per sync.
type Log = Arc<Mutex<Vec<Vec<Op>>>>;

fn recorder() -> (Recorder, Log, Arc<std::sync::atomic::AtomicBool>) {
    let r = Recorder { refuse: Arc::new(true.into()), ..Default::default() };
    let (log, refuse) = (r.log.clone(), r.refuse.clone());
    (r, log, refuse)
}

struct Ready;

impl Source for Ready {
    fn ready(&self) -> bool {
        true
    }
    fn connected(&self) -> bool {
        true
    }
}

fn index(yaml: &str) -> Index {
    Index::from_snapshot(objects(yaml))
}

const TWO: &str = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
                   kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80, protocol: SCTP}]}\n";
const REFUSED: &str = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 666}]}\n";

#[test]
fn a_sync_records_latency_and_counts_rejections_once() {
    let metrics = Arc::new(Metrics::default());
    let (rec, log, _) = recorder();
    let mut syncer = Syncer::new(rec, metrics.clone());
    let mut idx = index(TWO);
    let arrived = Instant::now();
    syncer.sync(&mut idx, &[arrived, arrived]);
    idx.touch_all();
    syncer.sync(&mut idx, &[arrived]);
    let text = metrics.encode();
    assert!(
        text.contains("kubeproxy_network_programming_duration_seconds_count 3"),
        "one observation per change:\n{text}"
    );
    assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"), "{text}");
    assert!(text.contains("kpr_rejected_objects_total{reason=\"unsupported_protocol\"} 1"), "{text}");
    assert_eq!(syncer.recent().lock().unwrap().rejections.len(), 1, "observers see the current rejection");
    let log = log.lock().unwrap();
    assert_eq!(log[0].len(), 1, "the valid Service was programmed");
    assert!(log[1].is_empty(), "nothing changed, nothing applied");
}

/// Records the IPv6 family's syncs.
#[derive(Clone, Default)]
struct Recorder6(Arc<Mutex<Vec<Vec<Op<std::net::Ipv6Addr>>>>>);

impl Dataplane<std::net::Ipv6Addr> for Recorder6 {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn apply(
        &mut self,
        ops: &[Op<std::net::Ipv6Addr>],
        _desired: &Desired<std::net::Ipv6Addr>,
    ) -> Vec<ApplyError<std::net::Ipv6Addr>> {
        self.0.lock().unwrap().push(ops.to_vec());
        Vec::new()
    }
}

#[test]
fn each_family_syncs_its_own_frontends_and_an_ipv4_change_leaves_ipv6_alone() {
    let (rec, log, refuse) = recorder();
    refuse.store(false, std::sync::atomic::Ordering::Relaxed);
    let v6 = Recorder6::default();
    let mut syncer = Syncer::new(rec, Arc::new(Metrics::default())).with_ipv6(Box::new(v6.clone()));
    let mut idx = index(
        "kind: Service\nmetadata: {name: ds}\nspec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{port: 80}]}\n---\n\
         kind: Service\nmetadata: {name: v4}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n",
    );
    assert!(syncer.sync(&mut idx, &[]));
    let vip6: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    assert_eq!(v6.0.lock().unwrap()[0], [Op::Upsert(FrontendKey { vip: vip6, port: 80, protocol: Protocol::Tcp })]);
    assert_eq!(log.lock().unwrap()[0].len(), 2, "both Services in IPv4");
    assert_eq!(syncer.programmed(), 3);
    idx.delete_service(&crate::name::ObjectName::new("default", "v4"));
    assert!(syncer.sync(&mut idx, &[]));
    assert_eq!(log.lock().unwrap().len(), 2);
    assert_eq!(v6.0.lock().unwrap().len(), 1, "nothing of IPv6 changed: its dataplane is not asked");
    idx.delete_service(&crate::name::ObjectName::new("default", "ds"));
    assert!(syncer.sync(&mut idx, &[]));
    assert_eq!(v6.0.lock().unwrap()[1], [Op::Delete(FrontendKey { vip: vip6, port: 80, protocol: Protocol::Tcp })]);
}

#[test]
fn a_refused_frontend_is_retried_from_the_desired_state_until_accepted() {
    let metrics = Arc::new(Metrics::default());
    let (rec, log, refuse) = recorder();
    let mut syncer = Syncer::new(rec, metrics.clone());
    let mut idx = index(REFUSED);
    assert!(!syncer.sync(&mut idx, &[]), "reports the failure");
    let key = FrontendKey { vip: [10, 96, 0, 1].into(), port: 666, protocol: Protocol::Tcp };
    assert!(syncer.pending_retry().contains(&key));
    assert!(metrics.encode().contains("kpr_dataplane_errors_total{reason=\"map_full\"} 1"));
    refuse.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(syncer.sync(&mut idx, &[]), "tried again without any new change, and accepted");
    assert_eq!(log.lock().unwrap()[1], [Op::Upsert(key)]);
    assert!(syncer.pending_retry().is_empty());
    assert!(syncer.sync(&mut idx, &[]));
    assert!(log.lock().unwrap()[2].is_empty(), "accepted frontends are not retried");
}

#[test]
fn a_refused_frontend_whose_service_went_is_deleted_on_retry() {
    let (rec, log, _) = recorder();
    let mut syncer = Syncer::new(rec, Arc::new(Metrics::default()));
    let mut idx = index(REFUSED);
    syncer.sync(&mut idx, &[]);
    idx.delete_service(&crate::name::ObjectName::new("default", "a"));
    syncer.sync(&mut idx, &[]);
    let key = FrontendKey { vip: [10, 96, 0, 1].into(), port: 666, protocol: Protocol::Tcp };
    assert_eq!(log.lock().unwrap()[1], [Op::Delete(key)]);
    assert!(syncer.pending_retry().is_empty());
}

#[tokio::test(start_paused = true)]
async fn refused_frontends_are_retried_without_a_new_change() {
    let (rec, log, _) = recorder();
    let syncer = Syncer::new(rec, Arc::new(Metrics::default()));
    let shared: SharedIndex = Arc::new(Mutex::new(index(REFUSED)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    tx.send(Instant::now()).unwrap();
    let stop = tokio::time::sleep(RETRY_AFTER * 2 + Duration::from_millis(500));
    sync_loop(&Ready, &shared, &mut rx, syncer, Duration::ZERO, stop, |_, _| {}).await;
    assert_eq!(log.lock().unwrap().len(), 3, "the first attempt and one retry per interval");
}

#[tokio::test(start_paused = true)]
async fn bursts_are_coalesced_but_a_lone_change_is_not_delayed() {
    let (rec, log, _) = recorder();
    let syncer = Syncer::new(rec, Arc::new(Metrics::default()));
    let shared: SharedIndex = Arc::new(Mutex::new(index(TWO)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = tokio::time::Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let driver = async move {
        tx.send(Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        for _ in 0..5 {
            tx.send(Instant::now()).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop_tx.send(()).unwrap();
    };
    let syncs = Arc::new(Mutex::new(Vec::new()));
    let observed = syncs.clone();
    let watcher = async move {
        let mut seen = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let n = log.lock().unwrap().len();
            if n > seen {
                observed.lock().unwrap().push(start.elapsed());
                seen = n;
            }
        }
    };
    let stop = async {
        stop_rx.await.ok();
    };
    tokio::select! {
        _ = async {
            tokio::join!(driver, sync_loop(&Ready, &shared, &mut rx, syncer, Duration::from_secs(1), stop, |_, _| {}));
        } => {}
        _ = watcher => {}
    }
    let syncs = syncs.lock().unwrap();
    assert_eq!(syncs.len(), 2, "one sync for the lone change, one for the burst: {syncs:?}");
    assert!(syncs[0] < Duration::from_millis(10), "the first change was applied at once: {syncs:?}");
    assert!(syncs[1] >= Duration::from_secs(1), "the burst waited for the interval: {syncs:?}");
}

/// One change among 50,000 Services is recomputed and applied alone. The
/// time is printed for a look (`--nocapture`); speed is the benchmark's job.
#[test]
fn one_change_among_50k_services_touches_only_its_own() {
    use crate::{
        index::Dirty,
        validate::{self, ModelConfig},
    };
    let origin: Arc<str> = "f".into();
    let config = ModelConfig::default();
    let svc = |i: u32| {
        let s = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("s{i}"), "namespace": "bench"},
            "spec": {"clusterIP": std::net::Ipv4Addr::from(0x0a60_0001 + i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        validate::service(&s, &origin, &config)
    };
    let slice = |i: u32, e: u32| {
        let s = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("s{i}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [std::net::Ipv4Addr::from(0x0af5_0001 + e).to_string()]}, {"addresses": [std::net::Ipv4Addr::from(0x0af5_0002 + e).to_string()]}]
        }))
        .unwrap();
        validate::slice(&s, &origin, &config)
    };
    let mut index = Index::default();
    for i in 0..50_000u32 {
        index.apply_service(svc(i));
        index.apply_slice(slice(i, 3 * i));
    }
    let mut model: Model = Model::default();
    let t = Instant::now();
    let full = model.update(&index, Dirty::All);
    let cold = t.elapsed();
    index.take_dirty();
    index.apply_slice(slice(49_999, 7));
    let t = Instant::now();
    let dirty = index.take_dirty();
    let one = model.update(&index, dirty);
    let change = t.elapsed();
    eprintln!("cold {cold:?} ({} changes), one change {change:?} ({} changes)", full.changes.len(), one.changes.len());
    assert_eq!(full.changes.len(), 50_000);
    assert_eq!(one.changes.len(), 1);
}
