//! Load generators, run inside the client pod: connection setup rate
//! (TCP_CRR-like) and request latency on established connections
//! (TCP_RR-like). Every connection attempt in a measured window is counted,
//! failed or not, so a load's error rate is known.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{netns::Netns, servers::pin_to_cpu};

const TIMEOUT: Duration = Duration::from_secs(2);

/// One connect, one request, one reply, server closes, client closes.
fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"close\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What one connection-rate load saw. Attempts are counted when they start
/// inside the measured window (and finish, however late), so a load whose
/// connections hang is not mistaken for an error-free one.
#[derive(Clone, Debug, Default)]
pub struct ConnLoad {
    /// Completed connections per second of the window.
    pub rate: f64,
    pub completed: u64,
    /// Connections that failed: refused, timed out, reset, no reply.
    pub errors: u64,
    /// Busy fraction of each CPU (indexed by CPU number) during the window,
    /// machine-wide: other work on the machine counts as busy.
    pub cpu_busy: Vec<f64>,
}

impl ConnLoad {
    pub fn attempts(&self) -> u64 {
        self.completed + self.errors
    }

    /// Failed attempts over all attempts; 0 when nothing was attempted.
    pub fn error_rate(&self) -> f64 {
        if self.attempts() == 0 { 0.0 } else { self.errors as f64 / self.attempts() as f64 }
    }
}

/// Per-CPU (busy, total) jiffies from /proc/stat, indexed by CPU number.
pub(crate) fn cpu_times() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_cpu_times(&stat)
}

fn parse_cpu_times(stat: &str) -> Vec<(u64, u64)> {
    let mut cpus = Vec::new();
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields.next().and_then(|f| f.strip_prefix("cpu")).and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest is inside user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        if cpus.len() <= cpu {
            cpus.resize(cpu + 1, (0, 0));
        }
        cpus[cpu] = (total - idle, total);
    }
    cpus
}

pub(crate) fn busy_between(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.1.saturating_sub(b.1);
            if total == 0 { f64::NAN } else { a.0.saturating_sub(b.0) as f64 / total as f64 }
        })
        .collect()
}

/// Connections per second over `duration` after `warmup`, spreading over
/// `targets` round robin. One generator of `threads` client threads runs per
/// entry of `generator_cpus`, pinned to that CPU; their counts add up.
pub fn connection_rate(
    client: &Netns,
    targets: &[SocketAddr],
    threads: usize,
    generator_cpus: &[usize],
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<ConnLoad> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (t, &cpu) in generator_cpus.iter().flat_map(|cpu| std::iter::repeat_n(cpu, threads)).enumerate() {
        let targets = targets.to_vec();
        let (done, errors, counting, stop) = (done.clone(), errors.clone(), counting.clone(), stop.clone());
        handles.push(client.spawn(move || {
            pin_to_cpu(cpu);
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let counted = counting.load(Ordering::Relaxed);
                let ok = one_connection(targets[i % targets.len()]).is_ok();
                i += 1;
                if counted {
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed)
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed)
                    };
                }
            }
        })?);
    }
    std::thread::sleep(warmup);
    let cpu_before = cpu_times();
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(duration);
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu_busy = busy_between(&cpu_before, &cpu_times());
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        // A panicked client thread would undercount: fail the load instead.
        h.join().map_err(|panic| anyhow::anyhow!("a load generator thread panicked: {panic:?}"))?;
    }
    let completed = done.load(Ordering::Relaxed);
    Ok(ConnLoad {
        rate: completed as f64 / elapsed.as_secs_f64(),
        completed,
        errors: errors.load(Ordering::Relaxed),
        cpu_busy,
    })
}

/// Latencies (µs) of request/reply round trips on one established
/// connection for `duration`, after `warmup`. Connecting is retried: right
/// after a connection-rate run a SYN may be lost to the churn it left.
pub fn request_latencies(
    client: &Netns,
    target: SocketAddr,
    warmup: Duration,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<Vec<f64>> {
    client.run(move || -> anyhow::Result<Vec<f64>> {
        pin_to_cpu(cpu);
        let mut attempt = 0;
        let s = loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                Ok(s) => break s,
                Err(e) if attempt < 4 => {
                    attempt += 1;
                    eprintln!("bench: connecting to {target} for the latency run: {e}; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut writer = s.try_clone()?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        let mut samples = Vec::new();
        let start = Instant::now();
        while start.elapsed() < warmup + duration {
            let t = Instant::now();
            writer.write_all(b"ping\n")?;
            line.clear();
            reader.read_line(&mut line)?;
            if start.elapsed() >= warmup {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })?
}

/// The value at quantile `q` (0..=1) of `samples`.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// Makes `change` from inside the client pod, then polls `target` until a
/// reply satisfies `ok`; returns the time from just before the change to
/// that reply. Entering the namespace happens before the clock starts.
pub fn time_change(
    client: &Netns,
    target: SocketAddr,
    limit: Duration,
    change: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ok: impl Fn(&str) -> bool + Send + 'static,
) -> anyhow::Result<Option<Duration>> {
    client.run(move || -> anyhow::Result<Option<Duration>> {
        let since = Instant::now();
        change()?;
        Ok(poll(target, since, limit, ok))
    })?
}

fn poll(target: SocketAddr, since: Instant, limit: Duration, ok: impl Fn(&str) -> bool) -> Option<Duration> {
    while since.elapsed() < limit {
        if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(20)) {
            s.set_read_timeout(Some(Duration::from_millis(200))).ok();
            let mut line = String::new();
            if s.write_all(b"close\n").is_ok() && BufReader::new(&s).read_line(&mut line).is_ok() && ok(line.trim_end())
            {
                return Some(since.elapsed());
            }
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    None
}

/// Polls `target` until a reply satisfies `ok`; returns the time from
/// `since` (taken just before the change being waited for) to that reply.
pub fn until_answer(
    client: &Netns,
    target: SocketAddr,
    since: Instant,
    limit: Duration,
    ok: impl Fn(&str) -> bool + Send + 'static,
) -> anyhow::Result<Option<Duration>> {
    client.run(move || {
        while since.elapsed() < limit {
            if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(20)) {
                s.set_read_timeout(Some(Duration::from_millis(200))).ok();
                let mut line = String::new();
                if s.write_all(b"close\n").is_ok()
                    && BufReader::new(&s).read_line(&mut line).is_ok()
                    && ok(line.trim_end())
                {
                    return Some(since.elapsed());
                }
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 51.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert!(quantile(&mut [], 0.5).is_nan());
    }

    #[test]
    fn cpu_busy_counts_everything_but_idle_and_iowait() {
        let before = parse_cpu_times(
            "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 0 10 70 10 0 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0 0 0\nintr 5\n",
        );
        let after = parse_cpu_times("cpu0 40 0 10 120 20 0 10 0 0 0\ncpu1 50 0 0 150 0 0 0 0 0 0\n");
        assert_eq!(before, vec![(20, 100), (0, 100)]);
        let busy = busy_between(&before, &after);
        // cpu0: 40 busy of 100 jiffies; cpu1: 50 of 100.
        assert_eq!(busy, vec![0.4, 0.5]);
    }

    #[test]
    fn a_load_where_nothing_was_attempted_has_no_error_rate() {
        assert_eq!(ConnLoad::default().error_rate(), 0.0);
        let l = ConnLoad { completed: 99, errors: 1, ..Default::default() };
        assert_eq!(l.attempts(), 100);
        assert_eq!(l.error_rate(), 0.01);
    }
}
