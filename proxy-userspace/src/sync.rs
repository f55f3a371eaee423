//! Keeping the dataplane equal to the model of the sources' objects.
//!
//! A sync has two steps. [`Syncer::update_model`] runs under the index
//! lock and is pure computation: the touched Services are recomputed and
//! the planner turns what changed into operations. [`Syncer::apply`] then
//! hands them to the dataplane with no lock the watchers need, on a
//! blocking thread (iptables-restore, conntrack and map writes block).
//! Frontends the dataplane refused are remembered here and retried.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, RwLock, RwLockReadGuard},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::mpsc;

use crate::{
    api::{Recent, SyncRecord},
    dataplane::{ApplyError, Dataplane},
    frontend::FrontendKey,
    index::{Dirty, Index},
    metrics::{Metrics, ReasonLabels},
    model::Model,
    planner::{self, Op},
    rejection::Rejection,
    source::{SharedIndex, Source},
    validate::Served,
};

/// How long to wait before retrying frontends the dataplane refused.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One IP family's desired state and the frontends its dataplane refused.
struct FamilyState<A> {
    /// Shared with observers, which only read it.
    model: Arc<RwLock<Model<A>>>,
    /// Frontends the dataplane refused: programmed again from the desired
    /// state on every sync until it accepts them.
    retry: BTreeSet<FrontendKey<A>>,
}

impl<A> Default for FamilyState<A> {
    fn default() -> Self {
        Self { model: Arc::default(), retry: BTreeSet::new() }
    }
}

impl<A: Served> FamilyState<A> {
    /// Recomputes the `dirty` Services; returns the operations, with the
    /// refused frontends again, and the conflicts raised.
    fn plan(&mut self, index: &Index, dirty: Dirty) -> (Vec<Op<A>>, Vec<Rejection>) {
        let mut model = self.model.write().unwrap();
        let update = model.update(index, dirty);
        let mut ops = planner::plan(&update.changes);
        // The changes are sorted by key: a refused frontend that changed again is planned already.
        let planned = |k: &FrontendKey<A>| update.changes.binary_search_by_key(k, |c| c.key).is_ok();
        for key in std::mem::take(&mut self.retry).into_iter().filter(|k| !planned(k)) {
            ops.push(if model.frontends.contains_key(&key) { Op::Upsert(key) } else { Op::Delete(key) });
        }
        (ops, update.new_rejections)
    }

    /// Applies `ops`; what the dataplane refused is logged, counted and kept for a retry.
    fn apply(&mut self, dataplane: &mut dyn Dataplane<A>, ops: &[Op<A>], metrics: &Metrics) -> usize {
        let errors: Vec<ApplyError<A>> = {
            let model = self.model.read().unwrap();
            dataplane.apply(ops, &model.frontends)
        };
        for e in &errors {
            tracing::error!(frontend = %e.frontend, kind = e.error.label(), reason = %e.error, "could not program frontend; retrying");
            metrics.apply_errors.get_or_create(&ReasonLabels { reason: e.error.label().to_string() }).inc();
            self.retry.insert(e.frontend);
        }
        errors.len()
    }

    fn repair(&mut self, dataplane: &mut dyn Dataplane<A>) -> usize {
        let model = self.model.read().unwrap();
        dataplane.repair(&model.frontends)
    }

    /// Frontends held and not waiting for a retry.
    fn programmed(&self) -> usize {
        let model = self.model.read().unwrap();
        model.frontends.len() - self.retry.iter().filter(|k| model.frontends.contains_key(k)).count()
    }
}

/// The IPv6 family on a dual-stack or IPv6 node: its own model and dataplane.
struct Ipv6 {
    dataplane: Box<dyn Dataplane<Ipv6Addr>>,
    state: FamilyState<Ipv6Addr>,
    /// Whether it was handed a sync yet: after the first (which writes its
    /// base rules), a sync with nothing of this family skips it, so an
    /// IPv4 change costs no ip6tables-restore.
    applied: bool,
}

/// Keeps the dataplanes equal to the models: one per IP family served, fed
/// from the same index (kube-proxy's dual-stack proxier is one proxier per
/// family alike).
pub struct Syncer<D> {
    /// The IPv4 family's dataplane.
    pub dataplane: D,
    v4: FamilyState<Ipv4Addr>,
    v6: Option<Ipv6>,
    /// Rejections last published, by count, to skip recollecting them.
    published_rejections: Option<usize>,
    metrics: Arc<Metrics>,
    recent: Arc<Mutex<Recent>>,
    /// How often [`Syncer::repair`] runs in [`sync_loop`], if at all.
    repair_every: Option<Duration>,
}

/// The first step's result: what the second must apply.
#[derive(Debug, Default)]
pub struct Planned {
    pub ops: Vec<Op>,
    pub ops6: Vec<Op<Ipv6Addr>>,
    started: Option<Instant>,
}

impl<D: Dataplane> Syncer<D> {
    pub fn new(dataplane: D, metrics: Arc<Metrics>) -> Self {
        Self {
            dataplane,
            v4: FamilyState::default(),
            v6: None,
            published_rejections: None,
            metrics,
            recent: Arc::default(),
            repair_every: None,
        }
    }

    /// Serves IPv6 Services too, through `dataplane`.
    pub fn with_ipv6(mut self, dataplane: Box<dyn Dataplane<Ipv6Addr>>) -> Self {
        self.v6 = Some(Ipv6 { dataplane, state: FamilyState::default(), applied: false });
        self
    }

    /// Checks the dataplane for drift every `period` in [`sync_loop`].
    pub fn with_repairs_every(mut self, period: Duration) -> Self {
        self.repair_every = Some(period);
        self
    }

    /// Repairs whatever drifted from the desired state; returns how much.
    pub fn repair(&mut self) -> usize {
        let mut repaired = self.v4.repair(&mut self.dataplane);
        if let Some(v6) = &mut self.v6 {
            repaired += v6.state.repair(v6.dataplane.as_mut());
        }
        if repaired > 0 {
            tracing::warn!(repaired, "the dataplane had drifted from the desired state; written again");
            self.metrics.repairs.inc_by(repaired as u64);
        }
        repaired
    }

    /// The IPv4 desired state; what the dataplane refused is in [`Syncer::pending_retry`].
    pub fn model(&self) -> RwLockReadGuard<'_, Model> {
        self.v4.model.read().unwrap()
    }

    /// The IPv4 model, for observers.
    pub fn shared_model(&self) -> Arc<RwLock<Model>> {
        self.v4.model.clone()
    }

    /// The IPv6 model, for observers, when IPv6 is served.
    pub fn shared_model6(&self) -> Option<Arc<RwLock<Model<Ipv6Addr>>>> {
        self.v6.as_ref().map(|v6| v6.state.model.clone())
    }

    /// Recent syncs and current rejections, for observers.
    pub fn recent(&self) -> Arc<Mutex<Recent>> {
        self.recent.clone()
    }

    /// IPv4 frontends waiting for the dataplane to accept them.
    pub fn pending_retry(&self) -> &BTreeSet<FrontendKey> {
        &self.v4.retry
    }

    /// Frontends of every family programmed (held and not waiting for a retry).
    pub fn programmed(&self) -> usize {
        self.v4.programmed() + self.v6.as_ref().map_or(0, |v6| v6.state.programmed())
    }

    /// Frontends of every family in the models.
    fn frontends(&self) -> usize {
        let v6 = self.v6.as_ref().map_or(0, |v6| v6.state.model.read().unwrap().frontends.len());
        self.model().frontends.len() + v6
    }

    /// Conflicts between Services in every family's model, counted without walking them.
    fn model_rejection_count(&self) -> usize {
        let v6 = self.v6.as_ref().map_or(0, |v6| v6.state.model.read().unwrap().rejection_count());
        self.model().rejection_count() + v6
    }

    /// Conflicts between Services in every family's model.
    fn model_rejections(&self) -> Vec<Rejection> {
        let mut all: Vec<Rejection> = self.model().rejections().cloned().collect();
        if let Some(v6) = &self.v6 {
            all.extend(v6.state.model.read().unwrap().rejections().cloned());
        }
        all
    }

    fn report(&self, r: &Rejection) {
        tracing::warn!(origin = %r.origin, object = %r.object, reason = %r.reason, "skipped invalid object");
        self.metrics.rejected.get_or_create(&ReasonLabels { reason: r.kind.label().to_string() }).inc();
    }

    /// Step one, under the index lock: recompute what changed in `index`
    /// and plan the operations, with the refused frontends again.
    pub fn update_model(&mut self, index: &mut Index) -> Planned {
        let started = Instant::now();
        let dirty = index.take_dirty();
        let mut new_rejections: Vec<Rejection> = index.take_new_rejections();
        let ops6 = match &mut self.v6 {
            Some(v6) => {
                let (ops, rejections) = v6.state.plan(index, dirty.clone());
                new_rejections.extend(rejections);
                ops
            }
            None => Vec::new(),
        };
        let (ops, rejections) = self.v4.plan(index, dirty);
        new_rejections.extend(rejections);
        for r in &new_rejections {
            self.report(r);
        }
        let count = index.rejection_count() + self.model_rejection_count();
        if self.published_rejections != Some(count) || !new_rejections.is_empty() {
            self.recent.lock().unwrap().rejections =
                index.rejections().cloned().chain(self.model_rejections()).collect();
            self.published_rejections = Some(count);
        }
        Planned { ops, ops6, started: Some(started) }
    }

    /// Step two, without the index lock: apply `planned`; `arrivals` are
    /// when the changes came in. Returns false if some frontends could not
    /// be programmed (they are retried on the next sync).
    pub fn apply(&mut self, planned: Planned, arrivals: &[Instant]) -> bool {
        let started = planned.started.unwrap_or_else(Instant::now);
        // IPv6 first: in eBPF mode its dataplane may need the node's devices,
        // which the IPv4 dataplane (owning the programs) attaches as it applies.
        let mut failed = 0;
        if let Some(v6) = self.v6.as_mut().filter(|v6| !v6.applied || !planned.ops6.is_empty()) {
            failed += v6.state.apply(v6.dataplane.as_mut(), &planned.ops6, &self.metrics);
            v6.applied = true;
        }
        failed += self.v4.apply(&mut self.dataplane, &planned.ops, &self.metrics);
        let done = Instant::now();
        self.metrics.sync_duration.observe((done - started).as_secs_f64());
        for at in arrivals {
            self.metrics.programming_latency.observe((done - *at).as_secs_f64());
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.metrics.last_sync_timestamp.set(now.as_secs_f64());
        let duration_ms = (done - started).as_secs_f64() * 1e3;
        let changes = planned.ops.len() + planned.ops6.len();
        self.recent.lock().unwrap().record(SyncRecord { at: now.as_secs_f64(), duration_ms, changes });
        tracing::info!(
            frontends = self.frontends(),
            changes,
            failed,
            rejected = self.recent.lock().unwrap().rejections.len(),
            coalesced = arrivals.len(),
            duration_ms,
            "synced"
        );
        failed == 0
    }

    /// Both steps at once (for callers that hold the index themselves).
    pub fn sync(&mut self, index: &mut Index, arrivals: &[Instant]) -> bool {
        let planned = self.update_model(index);
        self.apply(planned, arrivals)
    }
}

/// Syncs whenever the source announces changes, at most once per
/// `min_interval` (a lone change is applied at once), until `stop`
/// resolves; returns the syncer. `after_sync` runs after each sync on the
/// same blocking thread as the dataplane (it may run commands too), with
/// whether the source is connected.
pub async fn sync_loop<D, F>(
    source: &dyn Source,
    index: &SharedIndex,
    changes: &mut mpsc::UnboundedReceiver<Instant>,
    syncer: Syncer<D>,
    min_interval: Duration,
    stop: impl std::future::Future<Output = ()>,
    after_sync: F,
) -> Syncer<D>
where
    D: Dataplane + 'static,
    F: FnMut(&mut Syncer<D>, bool) + Send + 'static,
{
    let mut stop = std::pin::pin!(stop);
    // Handed to the blocking thread for each sync and back.
    let mut state = Some((syncer, after_sync));
    let mut pending: Vec<Instant> = Vec::new();
    let mut last_sync: Option<tokio::time::Instant> = None;
    // Set after a sync the dataplane partly refused: try again then, even
    // without a new change.
    let mut retry: Option<tokio::time::Instant> = None;
    let repair_every = state.as_ref().and_then(|(s, _)| s.repair_every);
    let mut next_repair = repair_every.map(|p| tokio::time::Instant::now() + p);
    loop {
        let next_allowed = last_sync.map_or_else(tokio::time::Instant::now, |t| t + min_interval);
        let due = if pending.is_empty() { retry.map(|r| r.max(next_allowed)) } else { Some(next_allowed) };
        tokio::select! {
            Some(at) = changes.recv() => {
                pending.push(at);
                while let Ok(at) = changes.try_recv() {
                    pending.push(at);
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() && source.ready() => {
                let (mut s, mut after) = state.take().expect("the syncer is back after every sync");
                let planned = s.update_model(&mut index.lock().unwrap());
                let arrivals = std::mem::take(&mut pending);
                let connected = source.connected();
                let (s, after, ok) = tokio::task::spawn_blocking(move || {
                    let ok = s.apply(planned, &arrivals);
                    after(&mut s, connected);
                    (s, after, ok)
                })
                .await
                .expect("applying a sync panicked");
                state = Some((s, after));
                last_sync = Some(tokio::time::Instant::now());
                retry = (!ok).then(|| tokio::time::Instant::now() + RETRY_AFTER);
            }
            // Only once something was programmed: before, there is nothing to drift.
            _ = tokio::time::sleep_until(next_repair.unwrap_or_else(tokio::time::Instant::now)), if next_repair.is_some() && last_sync.is_some() => {
                let (mut s, after) = state.take().expect("the syncer is back after every sync");
                let s = tokio::task::spawn_blocking(move || {
                    s.repair();
                    s
                })
                .await
                .expect("repairing panicked");
                state = Some((s, after));
                next_repair = repair_every.map(|p| tokio::time::Instant::now() + p);
            }
            _ = &mut stop => return state.take().expect("the syncer is back after every sync").0,
        }
    }
}

#[cfg(test)]
mod tests;
