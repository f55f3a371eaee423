//! Startup, readiness and liveness probes, as the kubelet runs them: exec
//! (CRI ExecSync), httpGet and tcpSocket against the pod, each with its
//! initial delay, period, timeout and success/failure thresholds. A probe
//! runs in a task of its own, so a slow one never holds the pods' loop up;
//! the loop asks what the probes say of each running container.
//!
//! Until a startup probe succeeds the others do not run and the container
//! is not started; a readiness probe decides `ready` (false until its first
//! success); a startup or liveness probe that reaches its failure threshold
//! has the container killed, to be restarted as its pod's policy says.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    cri::Cri,
    handler::{self, Action},
};
use k8s_openapi::api::core::v1::{Container, Probe};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Readiness,
    Liveness,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Readiness => "Readiness",
            Kind::Liveness => "Liveness",
        }
    }

    fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            Kind::Startup => c.startup_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
            Kind::Liveness => c.liveness_probe.as_ref(),
        }
    }
}

/// One probe of one container instance.
#[derive(Debug, Default)]
struct Track {
    successes: u32,
    failures: u32,
    /// Settled by the thresholds; `None` until then.
    result: Option<bool>,
    last_run: Option<Instant>,
    running: bool,
    /// The last failure's words.
    message: String,
}

/// What the probes say of a running container now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub started: bool,
    pub ready: bool,
    /// Kill it: why (a startup or liveness probe failed enough times).
    pub kill: Option<String>,
}

/// The probes' timing and thresholds, with the API's defaults.
#[derive(Clone, Copy, Debug)]
struct Timing {
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Timing {
    fn of(p: &Probe) -> Self {
        let secs = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// Where probes run and what they found, by container instance id.
#[derive(Clone, Default)]
pub struct Prober {
    tracks: Arc<Mutex<HashMap<(String, Kind), Track>>>,
}

impl Prober {
    /// Starts the probes of the running instance `id` of `c` that are due
    /// (it started at `started_at`, Unix nanoseconds), and says what they
    /// have found so far.
    pub fn check(&self, cri: &Cri, c: &Container, id: &str, started_at: i64, pod_ip: Option<&str>) -> Verdict {
        let age = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_nanos(started_at.max(0) as u64));
        let result = |kind: Kind| self.tracks.lock().unwrap().get(&(id.to_string(), kind)).and_then(|t| t.result);
        let started = match Kind::Startup.of(c) {
            None => true,
            // Once it has succeeded, the startup probe runs no more.
            Some(_) if result(Kind::Startup) == Some(true) => true,
            Some(p) => {
                if let Some(why) = self.run_if_due(cri, c, id, Kind::Startup, p, age, pod_ip) {
                    return Verdict { started: false, ready: false, kill: Some(why) };
                }
                result(Kind::Startup) == Some(true)
            }
        };
        if !started {
            return Verdict::default();
        }
        let mut verdict = Verdict { started: true, ready: true, kill: None };
        if let Some(p) = Kind::Liveness.of(c) {
            verdict.kill = self.run_if_due(cri, c, id, Kind::Liveness, p, age, pod_ip);
        }
        if let Some(p) = Kind::Readiness.of(c) {
            self.run_if_due(cri, c, id, Kind::Readiness, p, age, pod_ip);
            verdict.ready = result(Kind::Readiness) == Some(true);
        }
        verdict
    }

    /// Starts the probe if due; returns why to kill the container when a
    /// startup or liveness probe has failed `failureThreshold` times.
    #[expect(clippy::too_many_arguments, reason = "one probe's whole context, passed through once")]
    fn run_if_due(
        &self,
        cri: &Cri,
        c: &Container,
        id: &str,
        kind: Kind,
        probe: &Probe,
        age: Duration,
        pod_ip: Option<&str>,
    ) -> Option<String> {
        let timing = Timing::of(probe);
        let key = (id.to_string(), kind);
        let mut tracks = self.tracks.lock().unwrap();
        let track = tracks.entry(key.clone()).or_default();
        if kind != Kind::Readiness && track.result == Some(false) {
            return Some(format!("{} probe failed: {}", kind.label(), track.message));
        }
        let due = age >= timing.initial_delay && track.last_run.is_none_or(|t| t.elapsed() >= timing.period);
        if !due || track.running {
            return None;
        }
        track.running = true;
        track.last_run = Some(Instant::now());
        let (tracks, cri, probe, container, id) =
            (self.tracks.clone(), cri.clone(), probe.clone(), c.clone(), id.to_string());
        let pod_ip = pod_ip.map(str::to_string);
        tokio::spawn(async move {
            let action = Action::of_probe(&probe);
            let outcome = handler::run(cri, &container, &id, &action, timing.timeout, pod_ip.as_deref()).await;
            let mut tracks = tracks.lock().unwrap();
            // Forgotten meanwhile: the instance is gone.
            let Some(track) = tracks.get_mut(&key) else { return };
            track.running = false;
            settle(track, &timing, outcome, &container.name, kind);
        });
        None
    }

    /// Forgets the probes of instances not in `live` (stopped or removed).
    pub fn retain(&self, live: &HashSet<String>) {
        self.tracks.lock().unwrap().retain(|(id, _), _| live.contains(id));
    }
}

/// Counts one outcome toward the thresholds.
fn settle(track: &mut Track, timing: &Timing, outcome: Result<(), String>, container: &str, kind: Kind) {
    match outcome {
        Ok(()) => {
            track.failures = 0;
            track.successes += 1;
            if track.successes >= timing.success_threshold {
                track.result = Some(true);
            }
        }
        Err(message) => {
            track.successes = 0;
            track.failures += 1;
            tracing::info!(container, probe = kind.label(), failures = track.failures, %message, "probe failed");
            track.message = message;
            if track.failures >= timing.failure_threshold {
                track.result = Some(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(success: u32, failure: u32) -> Timing {
        Timing {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn thresholds_settle_a_result_and_a_success_resets_the_failures() {
        let mut t = Track::default();
        let timing = timing(2, 3);
        settle(&mut t, &timing, Ok(()), "c", Kind::Readiness);
        assert_eq!(t.result, None, "one success of two");
        settle(&mut t, &timing, Ok(()), "c", Kind::Readiness);
        assert_eq!(t.result, Some(true));
        for _ in 0..2 {
            settle(&mut t, &timing, Err("refused".into()), "c", Kind::Readiness);
        }
        assert_eq!(t.result, Some(true), "two failures of three");
        settle(&mut t, &timing, Ok(()), "c", Kind::Readiness);
        settle(&mut t, &timing, Err("refused".into()), "c", Kind::Readiness);
        assert_eq!((t.failures, t.result), (1, Some(true)), "a success started the count again");
        settle(&mut t, &timing, Err("refused".into()), "c", Kind::Readiness);
        settle(&mut t, &timing, Err("refused again".into()), "c", Kind::Readiness);
        assert_eq!((t.result, t.message.as_str()), (Some(false), "refused again"));
    }

    #[test]
    fn defaults_are_the_apis() {
        let t = Timing::of(&Probe::default());
        assert_eq!(
            (t.period, t.timeout, t.success_threshold, t.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
    }
}
