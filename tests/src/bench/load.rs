//! Load generators, run inside the client pod: connection setup rate
//! (TCP_CRR-like) and request latency on established connections
//! (TCP_RR-like).

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

/// Connections per second over `duration` from `threads` client threads
/// (pinned to `cpu`), spreading over `targets` round robin, after `warmup`.
/// `instances` independent generators run at once and their rates add up.
pub fn connection_rate(
    client: &Netns,
    targets: &[SocketAddr],
    threads: usize,
    instances: usize,
    warmup: Duration,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..threads * instances {
        let targets = targets.to_vec();
        let (done, errors, counting, stop) = (done.clone(), errors.clone(), counting.clone(), stop.clone());
        handles.push(client.spawn(move || {
            pin_to_cpu(cpu);
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let ok = one_connection(targets[i % targets.len()]).is_ok();
                i += 1;
                if counting.load(Ordering::Relaxed) {
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
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(duration);
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    Ok((done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(), errors.load(Ordering::Relaxed)))
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
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
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
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
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
}
