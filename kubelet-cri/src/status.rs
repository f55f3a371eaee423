//! The pod status the kubelet reports, worked out from what the runtime
//! says about the sandbox and each container's latest instances.

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn of(policy: Option<&str>) -> Self {
        match policy {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }

    /// Whether a container that exited with `code` runs again.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Exited,
    Unknown,
}

/// One instance of a container as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// The sandbox it runs in.
    pub sandbox_id: String,
    pub attempt: u32,
    pub state: State,
    /// Unix nanoseconds; 0 when not yet.
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub image_ref: String,
    /// The hash of the spec it was made from, when recorded.
    pub hash: Option<String>,
}

/// What the kubelet knows of one container of the pod.
pub struct ContainerView<'a> {
    pub spec: &'a Container,
    /// The newest instance, then the one before it.
    pub latest: Option<&'a Instance>,
    pub previous: Option<&'a Instance>,
    /// Why it is not running when the kubelet itself holds it back
    /// (ErrImagePull, CrashLoopBackOff, ...), with a message.
    pub waiting: Option<(String, String)>,
    /// What its probes say of the running instance: (started, ready);
    /// `None` when it has none to say (both follow `running`).
    pub probed: Option<(bool, bool)>,
}

pub struct PodView<'a> {
    pub sandbox_ready: bool,
    pub pod_ip: Option<String>,
    pub restart_policy: RestartPolicy,
    /// Guaranteed, Burstable or BestEffort.
    pub qos_class: &'static str,
    pub init: Vec<ContainerView<'a>>,
    pub apps: Vec<ContainerView<'a>>,
    /// Prefix of container ids (`containerd://`).
    pub runtime: &'a str,
}

fn time(ns: i64) -> Option<Time> {
    (ns > 0).then(|| Time(Timestamp::from_nanosecond(ns as i128).unwrap_or(Timestamp::UNIX_EPOCH)))
}

fn terminated(i: &Instance, runtime: &str) -> ContainerState {
    let reason = if !i.reason.is_empty() {
        i.reason.clone()
    } else if i.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: i.exit_code,
            reason: Some(reason),
            message: (!i.message.is_empty()).then(|| i.message.clone()),
            started_at: time(i.started_at),
            finished_at: time(i.finished_at),
            container_id: Some(format!("{runtime}://{}", i.id)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message }),
        ..Default::default()
    }
}

fn container_status(v: &ContainerView, not_started_reason: &str, runtime: &str) -> ContainerStatus {
    let latest = v.latest;
    let exited = |i: Option<&Instance>| i.filter(|i| i.state == State::Exited).map(|i| terminated(i, runtime));
    let (state, last_state) = match (&v.waiting, latest) {
        (Some((reason, message)), _) => (waiting(reason, Some(message.clone())), exited(latest)),
        (None, Some(i)) if i.state == State::Running => (
            ContainerState {
                running: Some(ContainerStateRunning { started_at: time(i.started_at) }),
                ..Default::default()
            },
            exited(v.previous),
        ),
        (None, Some(i)) if i.state == State::Exited => (terminated(i, runtime), exited(v.previous)),
        (None, Some(_)) => (waiting("ContainerCreating", None), exited(v.previous)),
        (None, None) => (waiting(not_started_reason, None), None),
    };
    let running = latest.is_some_and(|i| i.state == State::Running) && v.waiting.is_none();
    ContainerStatus {
        name: v.spec.name.clone(),
        image: v.spec.image.clone().unwrap_or_default(),
        image_id: latest.map(|i| i.image_ref.clone()).unwrap_or_default(),
        container_id: latest.map(|i| format!("{runtime}://{}", i.id)),
        ready: running && v.probed.is_none_or(|(_, ready)| ready),
        started: Some(running && v.probed.is_none_or(|(started, _)| started)),
        restart_count: latest.map_or(0, |i| i.attempt as i32),
        state: Some(state),
        last_state: last_state.or(Some(ContainerState::default())),
        ..Default::default()
    }
}

fn exited_with(v: &ContainerView) -> Option<i32> {
    v.latest.filter(|i| i.state == State::Exited).map(|i| i.exit_code)
}

/// Whether the init containers are through: each regular one succeeded and
/// each sidecar started, or an app container already ran.
fn initialized(v: &PodView) -> bool {
    v.apps.iter().any(|c| c.latest.is_some())
        || v.init.iter().all(|c| {
            if crate::spec::is_sidecar(c.spec) {
                c.latest.is_some_and(|i| i.state == State::Running) && c.probed.is_none_or(|(started, _)| started)
            } else {
                exited_with(c) == Some(0)
            }
        })
}

/// The phase as the kubelet computes it (sidecars do not count: a pod whose
/// app containers finished is done, whatever its sidecars do).
pub fn phase(v: &PodView) -> &'static str {
    let p = v.restart_policy;
    let regular_init = v.init.iter().filter(|c| !crate::spec::is_sidecar(c.spec));
    if regular_init.clone().any(|c| exited_with(c).is_some_and(|code| code != 0) && !p.restarts(code_of(c))) {
        return "Failed";
    }
    if !initialized(v) {
        return "Pending";
    }
    let (mut running, mut failed, mut waiting) = (0, 0, 0);
    for c in &v.apps {
        match (c.latest.map(|i| i.state), exited_with(c)) {
            (Some(State::Running), _) => running += 1,
            // Done for good: succeeded unless another failed.
            (_, Some(0)) if !p.restarts(0) => {}
            (_, Some(code)) if !p.restarts(code) => failed += 1,
            // Exited but to be restarted: still running as far as the pod goes.
            (_, Some(_)) => running += 1,
            _ => waiting += 1,
        }
    }
    // Running sidecars count, as the kubelet's (they are stopped once the
    // app containers are done).
    running += v
        .init
        .iter()
        .filter(|c| crate::spec::is_sidecar(c.spec))
        .filter(|c| c.latest.is_some_and(|i| i.state == State::Running))
        .count();
    // As the kubelet: a container that has never started keeps the pod
    // Pending, whatever the others do.
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if failed > 0 {
        "Failed"
    } else {
        "Succeeded"
    }
}

fn code_of(c: &ContainerView) -> i32 {
    exited_with(c).unwrap_or(0)
}

fn condition(kind: &str, ok: bool) -> PodCondition {
    PodCondition { type_: kind.into(), status: if ok { "True" } else { "False" }.into(), ..Default::default() }
}

pub fn pod_status(v: &PodView) -> PodStatus {
    let initialized = initialized(v);
    let init_statuses: Vec<_> = v.init.iter().map(|c| container_status(c, "PodInitializing", v.runtime)).collect();
    let app_reason = if initialized { "ContainerCreating" } else { "PodInitializing" };
    let statuses: Vec<_> = v.apps.iter().map(|c| container_status(c, app_reason, v.runtime)).collect();
    // Sidecars' readiness counts with the app containers'.
    let sidecars_ready =
        v.init.iter().zip(&init_statuses).filter(|(c, _)| crate::spec::is_sidecar(c.spec)).all(|(_, s)| s.ready);
    let ready = v.sandbox_ready && initialized && sidecars_ready && statuses.iter().all(|s| s.ready);
    PodStatus {
        phase: Some(phase(v).into()),
        pod_ip: v.pod_ip.clone(),
        pod_ips: v.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        conditions: Some(vec![
            condition("PodScheduled", true),
            condition("PodReadyToStartContainers", v.sandbox_ready),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ]),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        qos_class: Some(v.qos_class.into()),
        container_statuses: Some(statuses),
        ..Default::default()
    }
}

/// Gives each condition its last transition time: kept from `previous`
/// (type -> status, time) while its status holds, `now` when it changed.
pub fn stamp_transitions(
    status: &mut PodStatus,
    previous: &mut std::collections::HashMap<String, (String, Time)>,
    now: Time,
) {
    for c in status.conditions.iter_mut().flatten() {
        let at = match previous.get(&c.type_) {
            Some((was, at)) if *was == c.status => at.clone(),
            _ => now.clone(),
        };
        previous.insert(c.type_.clone(), (c.status.clone(), at.clone()));
        c.last_transition_time = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> Container {
        Container { name: name.into(), image: Some("busybox".into()), ..Default::default() }
    }

    fn inst(attempt: u32, state: State, exit_code: i32) -> Instance {
        Instance {
            id: format!("id{attempt}"),
            sandbox_id: "s0".into(),
            attempt,
            state,
            started_at: 1_700_000_000_000_000_000,
            finished_at: if state == State::Exited { 1_700_000_001_000_000_000 } else { 0 },
            exit_code,
            reason: String::new(),
            message: String::new(),
            image_ref: "sha256:abc".into(),
            hash: None,
        }
    }

    fn view<'a>(policy: RestartPolicy, init: Vec<ContainerView<'a>>, apps: Vec<ContainerView<'a>>) -> PodView<'a> {
        PodView {
            sandbox_ready: true,
            pod_ip: Some("10.88.0.5".into()),
            restart_policy: policy,
            qos_class: "BestEffort",
            init,
            apps,
            runtime: "containerd",
        }
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_it_changes() {
        let at = |s: i64| Time(Timestamp::from_second(s).unwrap());
        let with = |ready: &str| PodStatus {
            conditions: Some(vec![PodCondition { type_: "Ready".into(), status: ready.into(), ..Default::default() }]),
            ..Default::default()
        };
        let mut seen = std::collections::HashMap::new();
        let time = |s: &PodStatus| s.conditions.as_ref().unwrap()[0].last_transition_time.clone();
        let mut s = with("False");
        stamp_transitions(&mut s, &mut seen, at(100));
        assert_eq!(time(&s), Some(at(100)));
        let mut s = with("False");
        stamp_transitions(&mut s, &mut seen, at(200));
        assert_eq!(time(&s), Some(at(100)), "unchanged");
        let mut s = with("True");
        stamp_transitions(&mut s, &mut seen, at(300));
        assert_eq!(time(&s), Some(at(300)), "changed");
    }

    #[test]
    fn phases_follow_the_restart_policy() {
        let (a, b) = (spec("a"), spec("b"));
        let (run, ok, bad) = (inst(0, State::Running, 0), inst(0, State::Exited, 0), inst(2, State::Exited, 3));
        let c = |s, i| ContainerView { spec: s, latest: i, previous: None, waiting: None, probed: None };
        assert_eq!(
            phase(&view(RestartPolicy::Always, vec![], vec![c(&a, Some(&run)), c(&b, None)])),
            "Pending",
            "b has never started"
        );
        assert_eq!(phase(&view(RestartPolicy::Always, vec![], vec![c(&a, Some(&run)), c(&b, Some(&bad))])), "Running");
        assert_eq!(phase(&view(RestartPolicy::Never, vec![], vec![c(&a, Some(&ok)), c(&b, Some(&ok))])), "Succeeded");
        assert_eq!(phase(&view(RestartPolicy::Never, vec![], vec![c(&a, Some(&ok)), c(&b, Some(&bad))])), "Failed");
        assert_eq!(phase(&view(RestartPolicy::OnFailure, vec![], vec![c(&a, Some(&bad))])), "Running", "will restart");
        assert_eq!(
            phase(&view(RestartPolicy::Always, vec![c(&a, Some(&run))], vec![c(&b, None)])),
            "Pending",
            "initializing"
        );
        assert_eq!(
            phase(&view(RestartPolicy::Never, vec![c(&a, Some(&bad))], vec![c(&b, None)])),
            "Failed",
            "init failed"
        );
        assert_eq!(phase(&view(RestartPolicy::Always, vec![], vec![c(&a, None)])), "Pending");
        let mut stopped = view(RestartPolicy::Never, vec![], vec![c(&a, Some(&ok))]);
        stopped.sandbox_ready = false;
        assert_eq!(phase(&stopped), "Succeeded", "a done pod's sandbox is stopped");
    }

    #[test]
    fn container_statuses_carry_state_last_state_and_restarts() {
        let (a, b) = (spec("a"), spec("b"));
        let (crashed, before) = (inst(2, State::Exited, 3), inst(1, State::Exited, 3));
        let backoff = ContainerView {
            spec: &a,
            latest: Some(&crashed),
            previous: Some(&before),
            waiting: Some(("CrashLoopBackOff".into(), "back-off 20s restarting a".into())),
            probed: None,
        };
        let running = inst(0, State::Running, 0);
        let up = ContainerView { spec: &b, latest: Some(&running), previous: None, waiting: None, probed: None };
        let s = pod_status(&view(RestartPolicy::Always, vec![], vec![backoff, up]));
        let cs = s.container_statuses.unwrap();
        assert_eq!(cs[0].restart_count, 2);
        assert_eq!(cs[0].state.as_ref().unwrap().waiting.as_ref().unwrap().reason.as_deref(), Some("CrashLoopBackOff"));
        let last = cs[0].last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
        assert!(!cs[0].ready);
        assert!(cs[1].ready && cs[1].state.as_ref().unwrap().running.is_some());
        assert_eq!(cs[1].container_id.as_deref(), Some("containerd://id0"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.88.0.5"));
        let ready = s.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False", "one container is not running");

        // Running, but its probes say: started, not ready yet.
        let probing = ContainerView {
            spec: &b,
            latest: Some(&running),
            previous: None,
            waiting: None,
            probed: Some((true, false)),
        };
        let s = pod_status(&view(RestartPolicy::Always, vec![], vec![probing]));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!((cs.ready, cs.started), (false, Some(true)));
        let ready = s.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False", "a readiness probe holds the pod back");
    }
}
