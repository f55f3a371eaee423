//! Wiring: source -> model -> planner -> dataplane, until Ctrl-C or SIGTERM.

use std::time::Instant;

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    dataplane::{
        Dataplane,
        ebpf::{EbpfDataplane, MapSizes},
    },
    model::{self, Model, Rejection, Snapshot},
    planner,
    source::{self, SourceSpec},
};

pub struct RunConfig {
    pub source: SourceSpec,
    pub interfaces: Vec<String>,
    pub map_sizes: MapSizes,
}

/// The programmed state and the reasons last reported, so a sync only logs
/// what changed.
struct Syncer<D> {
    dataplane: D,
    programmed: Model,
    reported: Vec<Rejection>,
}

impl<D: Dataplane> Syncer<D> {
    fn sync(&mut self, snapshot: &Snapshot) {
        let started = Instant::now();
        let (desired, rejected) = model::build(snapshot);
        if rejected != self.reported {
            for r in rejected.iter().filter(|r| !self.reported.contains(r)) {
                tracing::warn!(origin = %r.origin, object = %r.object, reason = %r.reason, "skipped invalid object");
            }
            self.reported = rejected;
        }
        let ops = planner::plan(&self.programmed, &desired);
        let errors = self.dataplane.apply(&ops);
        let mut programmed = desired;
        for e in &errors {
            tracing::error!(frontend = %e.frontend, reason = %e.reason, "could not program frontend; it will be retried on the next change");
            // Not programmed: keep it out so the next sync tries again.
            programmed.frontends.remove(&e.frontend);
        }
        tracing::info!(
            frontends = programmed.frontends.len(),
            backends = programmed.frontends.values().map(|f| f.backends.len()).sum::<usize>(),
            changes = ops.len(),
            failed = errors.len(),
            rejected = self.reported.len(),
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
        self.programmed = programmed;
    }
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let dataplane = EbpfDataplane::attach(&cfg.interfaces, cfg.map_sizes)?;
    let mut syncer = Syncer { dataplane, programmed: Model::default(), reported: Vec::new() };

    let (tx, mut rx) = mpsc::channel(1);
    let watcher = match cfg.source {
        SourceSpec::Dir(dir) => {
            anyhow::ensure!(dir.is_dir(), "source folder {} does not exist or is not a folder", dir.display());
            tracing::info!(dir = %dir.display(), "watching manifests");
            tokio::spawn(source::dir::watch(dir, tx))
        }
    };

    loop {
        tokio::select! {
            Some(snapshot) = rx.recv() => syncer.sync(&snapshot),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    watcher.abort();
    if let Ok(counters) = syncer.dataplane.counters() {
        tracing::info!(?counters, "datapath counters at exit");
    }
    drop(syncer);
    tracing::info!("detached from all interfaces; exiting");
    Ok(())
}
