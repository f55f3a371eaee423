//! What one pass does for a pod, decided as the kubelet's
//! `computePodActions` decides it, from what the runtime holds of the pod:
//! which sandbox to make or stop, which containers to kill, start or clean
//! away. Pure, so every rule is tested without a runtime; the pod's worker
//! carries the actions out.
//!
//! And the kubelet's crash-loop back-off, which counts from a container's
//! finish and forgets a container that ran long enough.

use std::{collections::HashMap, time::Duration};

use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::{
    probe::Verdict,
    spec::{Kind, is_sidecar, spec_hash},
    status::{Instance, RestartPolicy, State},
};

/// One of the pod's sandboxes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub attempt: u32,
    pub ready: bool,
}

/// What the runtime holds of one pod.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Newest first.
    pub sandboxes: Vec<Sandbox>,
    /// Container name -> its instances in any of the pod's sandboxes,
    /// newest first: restart counts and last states outlive a sandbox.
    pub instances: HashMap<String, Vec<Instance>>,
}

impl Seen {
    pub fn latest(&self, name: &str) -> Option<&Instance> {
        self.instances.get(name).and_then(|l| l.first())
    }

    pub fn previous(&self, name: &str) -> Option<&Instance> {
        self.instances.get(name).and_then(|l| l.get(1))
    }

    /// The sandbox containers run in: the newest, while it is ready.
    pub fn current(&self) -> Option<&Sandbox> {
        self.sandboxes.first().filter(|s| s.ready)
    }
}

/// Start instance `attempt` of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    pub name: String,
    pub kind: Kind,
    pub attempt: u32,
    /// When the instance it replaces finished (Unix ns): the crash back-off
    /// counts from there. `None`: no back-off (a first start, a spec change).
    pub after_finish: Option<i64>,
}

/// Stop a running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kill {
    pub id: String,
    pub name: String,
    pub why: String,
    /// Killed for a failed probe: the probe's grace period applies.
    pub by_probe: bool,
}

/// One pass's work, in the order it is done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    pub kill: Vec<Kill>,
    /// Sandboxes to stop (their network released): dead ones before a new
    /// one is made, the current one once the pod is done.
    pub stop_sandboxes: Vec<String>,
    /// Instances no status needs any more, and emptied older sandboxes.
    pub remove: Vec<Instance>,
    pub remove_sandboxes: Vec<String>,
    /// Make a sandbox with this attempt; the starts go into it.
    pub new_sandbox: Option<u32>,
    pub start: Vec<Start>,
}

fn start(c: &Container, kind: Kind, seen: &Seen) -> Start {
    Start {
        name: c.name.clone(),
        kind,
        attempt: seen.latest(&c.name).map_or(0, |i| i.attempt + 1),
        after_finish: newest_finish(c, seen),
    }
}

/// When the newest exited instance of `c` finished: the back-off counts
/// from there (as the kubelet's `doBackOff`), whatever came after it.
fn newest_finish(c: &Container, seen: &Seen) -> Option<i64> {
    let list = seen.instances.get(&c.name)?;
    list.iter().find(|i| i.state == State::Exited).map(|i| i.finished_at)
}

/// Whether a running instance's spec changed since it started (an instance
/// without a recorded hash predates hashes: left alone).
fn changed(c: &Container, i: &Instance) -> bool {
    i.hash.as_ref().is_some_and(|h| *h != spec_hash(c))
}

/// The instances of each container that no status needs: all but the
/// newest, the newest exited one (the last state) and running ones.
fn garbage(seen: &Seen) -> Vec<Instance> {
    let mut out = Vec::new();
    for list in seen.instances.values() {
        let mut exited_kept = false;
        for (n, i) in list.iter().enumerate() {
            let keep = n == 0 || i.state == State::Running || (i.state == State::Exited && !exited_kept);
            exited_kept |= i.state == State::Exited && keep;
            if !keep {
                out.push(i.clone());
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The pass for a pod with spec `spec`, given what the runtime holds and
/// what the probes say of running instances (by instance id).
pub fn plan(spec: &PodSpec, seen: &Seen, verdicts: &HashMap<String, Verdict>) -> Actions {
    let policy = RestartPolicy::of(spec.restart_policy.as_deref());
    let mut a = Actions { remove: garbage(seen), ..Default::default() };
    a.remove_sandboxes = seen
        .sandboxes
        .iter()
        .skip(1)
        .filter(|s| !s.ready)
        .filter(|s| {
            seen.instances.values().flatten().all(|i| i.sandbox_id != s.id || a.remove.iter().any(|r| r.id == i.id))
        })
        .map(|s| s.id.clone())
        .collect();
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    let running = |i: &&Instance| i.state == State::Running;

    let Some(current) = seen.current() else {
        // No sandbox yet, or it died: what still runs in a dead one goes.
        for (name, list) in &seen.instances {
            for i in list.iter().filter(running) {
                let why = "the pod sandbox is not ready".to_string();
                a.kill.push(Kill { id: i.id.clone(), name: name.clone(), why, by_probe: false });
            }
        }
        a.stop_sandboxes = seen.sandboxes.iter().map(|s| s.id.clone()).collect();
        // A pod that never restarts, once anything ran, is done.
        if !seen.sandboxes.is_empty() && policy == RestartPolicy::Never && !seen.instances.is_empty() {
            return a;
        }
        let apps: Vec<&Container> = spec
            .containers
            .iter()
            .filter(|c| !(policy == RestartPolicy::OnFailure && succeeded(seen.latest(&c.name))))
            .collect();
        if apps.is_empty() {
            return a;
        }
        a.new_sandbox = Some(seen.sandboxes.first().map_or(0, |s| s.attempt + 1));
        match inits.first() {
            Some(c) => a.start.push(start(c, init_kind(c), seen)),
            None => a.start.extend(apps.iter().map(|c| start(c, Kind::App, seen))),
        }
        return a;
    };

    // Only the newest instance of a container may run: an older one still
    // running (a kill that failed) is killed again.
    for (name, list) in &seen.instances {
        for i in list.iter().skip(1).filter(running) {
            let why = "a newer instance replaced it".to_string();
            a.kill.push(Kill { id: i.id.clone(), name: name.clone(), why, by_probe: false });
        }
    }
    let in_current = |name: &str| seen.latest(name).filter(|i| i.sandbox_id == current.id);
    let started = |c: &Container, i: &Instance| verdicts.get(&i.id).map_or(c.startup_probe.is_none(), |v| v.started);
    // A running instance is replaced when its spec changed, killed when a
    // startup or liveness probe gave up on it (the next pass restarts it as
    // the policy says).
    let check_running = |a: &mut Actions, c: &Container, i: &Instance, kind: Kind| {
        if changed(c, i) {
            let why = format!("container {} definition changed, will be restarted", c.name);
            a.kill.push(Kill { id: i.id.clone(), name: c.name.clone(), why, by_probe: false });
            a.start.push(Start { name: c.name.clone(), kind, attempt: i.attempt + 1, after_finish: None });
        } else if let Some(why) = verdicts.get(&i.id).and_then(|v| v.kill.clone()) {
            a.kill.push(Kill { id: i.id.clone(), name: c.name.clone(), why, by_probe: true });
            // Restarted whatever it exits with, unless the pod never
            // restarts (sidecars always do).
            if policy != RestartPolicy::Never || kind == Kind::Sidecar {
                let after_finish = newest_finish(c, seen);
                a.start.push(Start { name: c.name.clone(), kind, attempt: i.attempt + 1, after_finish });
            }
        }
    };
    // A container left Created (a start that never happened) or Unknown is
    // replaced; an Unknown one is killed first.
    let replace = |a: &mut Actions, c: &Container, i: &Instance, kind: Kind| {
        if i.state == State::Unknown {
            let why = "container state unknown".to_string();
            a.kill.push(Kill { id: i.id.clone(), name: c.name.clone(), why, by_probe: false });
        }
        a.start.push(start(c, kind, seen));
    };

    // Once an app container has run in this sandbox, initialization is
    // over: regular init containers never run again, sidecars are kept up.
    let apps_started = spec.containers.iter().any(|c| in_current(&c.name).is_some());
    let mut initialized = true;
    let mut init_failed = false;
    if apps_started {
        for c in inits.iter().filter(|c| is_sidecar(c)) {
            match in_current(&c.name) {
                Some(i) if i.state == State::Running => check_running(&mut a, c, i, Kind::Sidecar),
                Some(i) if i.state != State::Exited => replace(&mut a, c, i, Kind::Sidecar),
                _ => a.start.push(start(c, Kind::Sidecar, seen)),
            }
        }
    } else {
        for c in inits {
            let kind = init_kind(c);
            match in_current(&c.name) {
                None => a.start.push(start(c, kind, seen)),
                Some(i) => match (i.state, kind) {
                    (State::Running, Kind::Sidecar) => {
                        check_running(&mut a, c, i, kind);
                        if started(c, i) {
                            continue;
                        }
                    }
                    (State::Exited, Kind::Sidecar) => a.start.push(start(c, kind, seen)),
                    (State::Exited, _) if i.exit_code == 0 => continue,
                    (State::Exited, _) if policy == RestartPolicy::Never => init_failed = true,
                    (State::Exited, _) => a.start.push(start(c, kind, seen)),
                    (State::Running, _) => {}
                    (State::Created | State::Unknown, _) => replace(&mut a, c, i, kind),
                },
            }
            initialized = false;
            break;
        }
    }

    if initialized {
        for c in &spec.containers {
            let latest = seen.latest(&c.name);
            match in_current(&c.name) {
                // Not run in this sandbox: unless it finished for good in an
                // earlier one, it starts.
                None => {
                    if !latest.is_some_and(|i| i.state == State::Exited && !policy.restarts(i.exit_code)) {
                        a.start.push(start(c, Kind::App, seen));
                    }
                }
                Some(i) => match i.state {
                    State::Running => check_running(&mut a, c, i, Kind::App),
                    State::Exited if policy.restarts(i.exit_code) => a.start.push(start(c, Kind::App, seen)),
                    State::Exited => {}
                    State::Created | State::Unknown => replace(&mut a, c, i, Kind::App),
                },
            }
        }
    }

    // Done: every app container finished for good (or an init container
    // failed for good). Sidecars are stopped, last first, and the sandbox
    // with them; the instances stay for the status.
    let apps_done = spec
        .containers
        .iter()
        .all(|c| seen.latest(&c.name).is_some_and(|i| i.state == State::Exited && !policy.restarts(i.exit_code)));
    if init_failed || (initialized && apps_done) {
        // Sidecars are not restarted any more.
        a.start.clear();
        for c in inits.iter().rev() {
            if let Some(i) = in_current(&c.name).filter(running) {
                let why = "the pod is done".to_string();
                a.kill.push(Kill { id: i.id.clone(), name: c.name.clone(), why, by_probe: false });
            }
        }
        a.stop_sandboxes.push(current.id.clone());
    }
    a
}

fn init_kind(c: &Container) -> Kind {
    if is_sidecar(c) { Kind::Sidecar } else { Kind::Init }
}

fn succeeded(i: Option<&Instance>) -> bool {
    i.is_some_and(|i| i.state == State::Exited && i.exit_code == 0)
}

/// The kubelet's back-off per container (its `flowcontrol.Backoff`): after
/// each restart the next waits twice as long, from `base` up to `max`,
/// counted from the moment the container finished; a container that ran
/// for twice `max` after its last restart starts again from `base`.
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Container -> (its delay, when it was last restarted, Unix ns).
    entries: HashMap<String, (Duration, i64)>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, entries: HashMap::new() }
    }

    fn expired(&self, event: i64, last_update: i64) -> bool {
        event.saturating_sub(last_update) > (2 * self.max).as_nanos() as i64
    }

    /// The delay still holding `key` back at `now`, counted from `since`
    /// (Unix ns), if any.
    pub fn holding(&self, key: &str, since: i64, now: i64) -> Option<Duration> {
        let (delay, last_update) = *self.entries.get(key)?;
        if self.expired(since, last_update) {
            return None;
        }
        (now.saturating_sub(since) < delay.as_nanos() as i64).then_some(delay)
    }

    /// Records a restart at `now` of what finished at `since`.
    pub fn next(&mut self, key: &str, since: i64, now: i64) {
        let delay = match self.entries.get(key) {
            Some((delay, last)) if !self.expired(since, *last) => (*delay * 2).min(self.max),
            _ => self.base,
        };
        self.entries.insert(key.to_string(), (delay, now));
    }

    /// The delay holding `key` back since its last restart (image pulls
    /// count from their last failure).
    pub fn holding_since_last(&self, key: &str, now: i64) -> Option<Duration> {
        let (_, last) = *self.entries.get(key)?;
        self.holding(key, last, now)
    }

    pub fn clear(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn sandbox(id: &str, attempt: u32, ready: bool) -> Sandbox {
        Sandbox { id: id.into(), attempt, ready }
    }

    fn inst(sandbox: &str, attempt: u32, state: State, exit_code: i32) -> Instance {
        Instance {
            id: format!("{sandbox}-{attempt}"),
            sandbox_id: sandbox.into(),
            attempt,
            state,
            started_at: 100 * S,
            finished_at: if state == State::Exited { 200 * S } else { 0 },
            exit_code,
            reason: String::new(),
            message: String::new(),
            image_ref: String::new(),
            hash: None,
        }
    }

    fn seen(sandboxes: Vec<Sandbox>, instances: Vec<(&str, Vec<Instance>)>) -> Seen {
        Seen { sandboxes, instances: instances.into_iter().map(|(n, l)| (n.to_string(), l)).collect() }
    }

    fn starts(a: &Actions) -> Vec<(&str, u32)> {
        a.start.iter().map(|s| (s.name.as_str(), s.attempt)).collect()
    }

    const APP: &str = "containers: [{name: app, image: i}]";

    #[test]
    fn a_new_pod_gets_a_sandbox_and_its_first_init_container() {
        let s = spec("initContainers: [{name: a, image: i}, {name: b, image: i}]\ncontainers: [{name: app, image: i}]");
        let a = plan(&s, &Seen::default(), &HashMap::new());
        assert_eq!(a.new_sandbox, Some(0));
        assert_eq!(starts(&a), [("a", 0)]);
        let a = plan(&spec(APP), &Seen::default(), &HashMap::new());
        assert_eq!((a.new_sandbox, starts(&a)), (Some(0), vec![("app", 0)]));
    }

    #[test]
    fn a_finished_never_pod_is_not_run_again_when_its_sandbox_dies() {
        let s = spec(&format!("restartPolicy: Never\n{APP}"));
        let done = seen(vec![sandbox("s0", 0, false)], vec![("app", vec![inst("s0", 0, State::Exited, 0)])]);
        let a = plan(&s, &done, &HashMap::new());
        assert_eq!((a.new_sandbox, a.start.len()), (None, 0), "{a:?}");
        assert_eq!(a.stop_sandboxes, ["s0"]);
        // ... but a sandbox that died before anything ran is made again.
        let a = plan(&s, &seen(vec![sandbox("s0", 0, false)], vec![]), &HashMap::new());
        assert_eq!(a.new_sandbox, Some(1));
    }

    #[test]
    fn on_failure_skips_succeeded_containers_and_a_recreated_sandbox_keeps_counting() {
        let s = spec("restartPolicy: OnFailure\ncontainers: [{name: ok, image: i}, {name: bad, image: i}]");
        let died = seen(
            vec![sandbox("s0", 0, false)],
            vec![
                ("ok", vec![inst("s0", 0, State::Exited, 0)]),
                ("bad", vec![inst("s0", 3, State::Exited, 1), inst("s0", 2, State::Exited, 1)]),
            ],
        );
        let a = plan(&s, &died, &HashMap::new());
        assert_eq!(a.new_sandbox, Some(1));
        assert_eq!(starts(&a), [("bad", 4)], "restart count goes on; the success stays done");
        assert_eq!(a.start[0].after_finish, Some(200 * S), "and backs off from its finish");
        assert_eq!(a.remove.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["s0-2"]);
        // All succeeded: nothing to run, no sandbox.
        let all_ok = seen(
            vec![sandbox("s0", 0, false)],
            vec![("ok", vec![inst("s0", 0, State::Exited, 0)]), ("bad", vec![inst("s0", 1, State::Exited, 0)])],
        );
        assert_eq!(plan(&s, &all_ok, &HashMap::new()).new_sandbox, None);
        // In the new sandbox, the old one is kept while it holds the last state.
        let again = seen(
            vec![sandbox("s1", 1, true), sandbox("s0", 0, false)],
            vec![
                ("ok", vec![inst("s0", 0, State::Exited, 0)]),
                ("bad", vec![inst("s1", 4, State::Running, 0), inst("s0", 3, State::Exited, 1)]),
            ],
        );
        let a = plan(&s, &again, &HashMap::new());
        assert!(a.start.is_empty() && a.remove_sandboxes.is_empty(), "{a:?}");
    }

    #[test]
    fn an_emptied_old_sandbox_is_removed() {
        let s = spec(APP);
        let moved = seen(
            vec![sandbox("s1", 1, true), sandbox("s0", 0, false)],
            vec![("app", vec![inst("s1", 2, State::Exited, 1), inst("s1", 1, State::Exited, 1)])],
        );
        let a = plan(&s, &moved, &HashMap::new());
        assert_eq!(a.remove_sandboxes, ["s0"]);
        assert_eq!(starts(&a), [("app", 3)]);
    }

    #[test]
    fn created_and_unknown_instances_are_replaced() {
        let s = spec(APP);
        let stuck = seen(vec![sandbox("s0", 0, true)], vec![("app", vec![inst("s0", 0, State::Created, 0)])]);
        let a = plan(&s, &stuck, &HashMap::new());
        assert_eq!((starts(&a), a.kill.len()), (vec![("app", 1)], 0));
        let lost = seen(vec![sandbox("s0", 0, true)], vec![("app", vec![inst("s0", 0, State::Unknown, 0)])]);
        let a = plan(&s, &lost, &HashMap::new());
        assert_eq!((starts(&a), a.kill[0].id.as_str()), (vec![("app", 1)], "s0-0"));
    }

    #[test]
    fn a_changed_spec_replaces_the_running_instance_whatever_the_policy() {
        let s = spec(&format!("restartPolicy: Never\n{APP}"));
        let mut i = inst("s0", 0, State::Running, 0);
        i.hash = Some(spec_hash(&s.containers[0]));
        let same = seen(vec![sandbox("s0", 0, true)], vec![("app", vec![i.clone()])]);
        assert_eq!(plan(&s, &same, &HashMap::new()), Actions::default());
        i.hash = Some("0000000000000000".into());
        let changed = seen(vec![sandbox("s0", 0, true)], vec![("app", vec![i])]);
        let a = plan(&s, &changed, &HashMap::new());
        assert_eq!((a.kill.len(), starts(&a)), (1, vec![("app", 1)]));
        assert_eq!(a.start[0].after_finish, None);
    }

    #[test]
    fn a_probe_kill_restarts_the_container_unless_the_pod_never_restarts() {
        let s = spec(APP);
        let run = seen(vec![sandbox("s0", 0, true)], vec![("app", vec![inst("s0", 0, State::Running, 0)])]);
        let verdicts = HashMap::from([(
            "s0-0".to_string(),
            Verdict { started: true, ready: false, kill: Some("Liveness probe failed".into()) },
        )]);
        let a = plan(&s, &run, &verdicts);
        assert!(a.kill[0].by_probe, "{a:?}");
        assert_eq!(starts(&a), [("app", 1)], "restarted in the same pass, whatever it exits with");
        let never = spec(&format!("restartPolicy: Never\n{APP}"));
        let a = plan(&never, &run, &verdicts);
        assert!(a.kill[0].by_probe && a.start.is_empty(), "a Never pod's container stays dead");
    }

    #[test]
    fn an_older_instance_still_running_is_killed_again() {
        let s = spec(APP);
        let both = seen(
            vec![sandbox("s0", 0, true)],
            vec![("app", vec![inst("s0", 1, State::Running, 0), inst("s0", 0, State::Running, 0)])],
        );
        let a = plan(&s, &both, &HashMap::new());
        assert_eq!(a.kill.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["s0-0"]);
    }

    #[test]
    fn sidecars_start_in_order_keep_running_and_stop_when_the_pod_is_done() {
        let s = spec(
            "restartPolicy: Never
initContainers: [{name: side, image: i, restartPolicy: Always, startupProbe: {exec: {command: [true]}}}, {name: setup, image: i}]
containers: [{name: app, image: i}]",
        );
        let side = |st| ("side", vec![inst("s0", 0, st, 0)]);
        let sb = || vec![sandbox("s0", 0, true)];
        // Running, not started by its probe yet: nothing after it starts.
        let a = plan(&s, &seen(sb(), vec![side(State::Running)]), &HashMap::new());
        assert!(a.start.is_empty(), "{a:?}");
        let started = HashMap::from([("s0-0".to_string(), Verdict { started: true, ready: true, kill: None })]);
        let a = plan(&s, &seen(sb(), vec![side(State::Running)]), &started);
        assert_eq!(starts(&a), [("setup", 0)]);
        let setup_done = ("setup", vec![inst("s0", 0, State::Exited, 0)]);
        let a = plan(&s, &seen(sb(), vec![side(State::Running), setup_done.clone()]), &started);
        assert_eq!(starts(&a), [("app", 0)]);
        // After initialization a crashed sidecar restarts, even in a Never pod.
        let app_running = ("app", vec![inst("s0", 0, State::Running, 0)]);
        let a = plan(&s, &seen(sb(), vec![side(State::Exited), setup_done.clone(), app_running]), &started);
        assert_eq!(starts(&a), [("side", 1)]);
        // The app is done: the sidecar is stopped and the sandbox with it.
        let app_done = ("app", vec![inst("s0", 0, State::Exited, 0)]);
        let a = plan(&s, &seen(sb(), vec![side(State::Running), setup_done.clone(), app_done.clone()]), &started);
        assert_eq!((a.kill.len(), a.start.len(), a.stop_sandboxes.as_slice()), (1, 0, &["s0".to_string()][..]));
        // ... and a sidecar that crashed meanwhile is not restarted.
        let a = plan(&s, &seen(sb(), vec![side(State::Exited), setup_done, app_done]), &started);
        assert_eq!((a.kill.len(), a.start.len(), a.stop_sandboxes.len()), (0, 0, 1));
    }

    #[test]
    fn a_failed_init_container_fails_a_never_pod_and_restarts_otherwise() {
        let init = "initContainers: [{name: setup, image: i}]\ncontainers: [{name: app, image: i}]";
        let failed = seen(vec![sandbox("s0", 0, true)], vec![("setup", vec![inst("s0", 0, State::Exited, 1)])]);
        let a = plan(&spec(&format!("restartPolicy: Never\n{init}")), &failed, &HashMap::new());
        assert_eq!((a.start.len(), a.stop_sandboxes.len()), (0, 1));
        let a = plan(&spec(init), &failed, &HashMap::new());
        assert_eq!(starts(&a), [("setup", 1)]);
    }

    #[test]
    fn back_off_counts_from_the_finish_doubles_and_resets_after_a_long_run() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
        assert_eq!(b.holding("c", 100 * S, 100 * S), None, "a first crash restarts at once");
        b.next("c", 100 * S, 100 * S);
        assert_eq!(b.holding("c", 105 * S, 110 * S), Some(Duration::from_secs(10)), "5 s after its finish");
        assert_eq!(b.holding("c", 105 * S, 116 * S), None, "11 s after its finish");
        b.next("c", 105 * S, 116 * S);
        assert_eq!(b.holding("c", 120 * S, 130 * S), Some(Duration::from_secs(20)));
        for _ in 0..10 {
            b.next("c", 120 * S, 130 * S);
        }
        assert_eq!(b.holding("c", 131 * S, 131 * S), Some(Duration::from_secs(300)), "capped");
        // It ran for over 2 × max after its last restart: forgiven.
        let late = 130 * S + 601 * S;
        assert_eq!(b.holding("c", late, late), None);
        b.next("c", late, late);
        assert_eq!(b.holding("c", late + S, late + S), Some(Duration::from_secs(10)));
    }
}
