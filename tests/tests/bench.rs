//! The benchmark's smoke run fails on a broken mode: pointed (through
//! `KPR_BIN`, as `cargo xtask bench` points it at the release build) at a kpr
//! stand-in that starts but never programs anything, the real bench code with
//! the quick, strict settings returns an error naming the mode and N.

use std::{
    os::unix::fs::PermissionsExt as _,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use kpr_tests::{
    bench::{self, Config},
    root_or_skip,
};

/// Starts as `kpr run` does and says it synced, but programs no Service;
/// any other command (the bench's `kpr cleanup`) succeeds at once.
const NEVER_ANSWERS: &str = "#!/bin/sh
case \"$1\" in
  run) echo 'synced (stand-in: programs nothing)'; exec sleep 600 ;;
  *) exit 0 ;;
esac
";

#[test]
fn the_smoke_run_fails_and_names_a_mode_that_never_answers() {
    root_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let stand_in = dir.path().join("kpr-never-answers");
    std::fs::write(&stand_in, NEVER_ANSWERS).unwrap();
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: the only test in this binary, and it has started no thread yet.
    unsafe { std::env::set_var("KPR_BIN", &stand_in) };
    let out = dir.path().join("out");
    let cfg = Config {
        services: vec![1],
        modes: vec!["ebpf"],
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(300),
        answer_within: Duration::from_secs(3),
        ..Config::quick(out.clone())
    };
    assert!(cfg.strict, "the quick run is the strict one");

    let result = bench::run(&cfg, "bench test", Arc::new(AtomicBool::new(false)));

    let err = format!("{:#}", result.expect_err("the bench passed although the mode never answered"));
    assert!(err.contains("ebpf at N=1"), "the error names the mode and N: {err}");
    assert!(err.contains("did not answer within 3s"), "the error says what went wrong: {err}");
    assert!(!out.join("report.json").exists(), "a failed smoke run writes no report");
}
