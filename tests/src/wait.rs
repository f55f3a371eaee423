//! Waiting on observable state instead of sleeping: a probe is polled until
//! its value satisfies a condition or a deadline passes, and a timeout names
//! what was awaited and the last value seen, so a failure says what the test
//! actually observed.

use std::{
    fmt::Debug,
    time::{Duration, Instant},
};

/// The pause between two probes.
const PAUSE: Duration = Duration::from_millis(50);

/// Polls `probe` until `done` accepts its value and returns that value.
/// The probe runs at least once; after `timeout` the error carries `what`
/// and the last value seen.
pub fn until<T: Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = probe();
        if done(&value) {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not observed within {timeout:?}; last seen: {value:#?}");
        }
        std::thread::sleep(PAUSE);
    }
}
