//! Real TCP and UDP servers inside pod namespaces. Each answers every
//! request line (TCP) or datagram (UDP) with its pod's name, so a client
//! can tell which endpoint served it.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// A running server; dropping it closes the socket and ends its thread.
pub struct Server {
    /// A TCP listener to shut down (which wakes its accept()); UDP servers poll `stop`.
    listener: Option<RawFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    // Keeps the socket open as long as the guard lives.
    _socket: Arc<dyn Send + Sync>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(fd) = self.listener {
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// A dual-stack socket (`[::]`, not IPv6-only): clients of both families.
const ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// Serves TCP on 0.0.0.0:`port` in `ns`; each line read is answered with `reply`.
pub fn tcp(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    tcp_server(ns, ANY4, port, reply, false)
}

/// As [`tcp`], the answer followed by a space and the client's address as
/// the server sees it (is the client's address kept?).
pub fn tcp_peer(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    tcp_server(ns, ANY4, port, reply, true)
}

/// As [`tcp_peer`], for clients of both IP families.
pub fn tcp_dual_stack(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    tcp_server(ns, ANY, port, reply, true)
}

fn tcp_server(ns: &Netns, ip: IpAddr, port: u16, reply: &str, show_peer: bool) -> anyhow::Result<Server> {
    let listener = ns.run(move || TcpListener::bind(SocketAddr::new(ip, port)))??;
    let listener = Arc::new(listener);
    let fd = listener.as_raw_fd();
    let reply = format!("{reply}\n");
    let l = listener.clone();
    let thread = std::thread::spawn(move || {
        while let Ok((stream, peer)) = l.accept() {
            let peer = peer.ip().to_canonical();
            let reply = if show_peer { format!("{} {peer}\n", reply.trim_end()) } else { reply.clone() };
            std::thread::spawn(move || {
                let mut writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                for line in BufReader::new(stream).lines() {
                    if line.is_err() || writer.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(Server { listener: Some(fd), stop: Arc::new(AtomicBool::new(false)), thread: Some(thread), _socket: listener })
}

/// Serves UDP on 0.0.0.0:`port` in `ns`; each datagram is answered with `reply`.
pub fn udp(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    udp_server(ns, ANY4, port, reply, false)
}

/// As [`udp`], for clients of both IP families.
pub fn udp_dual_stack(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    udp_server(ns, ANY, port, reply, false)
}

/// A UDP server on `port` in `ns` answering every datagram with `reply`
/// followed by the datagram itself: large requests get large answers
/// (fragmented on the way, both ways).
pub fn udp_echo(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    udp_server(ns, ANY4, port, reply, true)
}

fn udp_server(ns: &Netns, ip: IpAddr, port: u16, reply: &str, echo: bool) -> anyhow::Result<Server> {
    let socket = ns.run(move || UdpSocket::bind(SocketAddr::new(ip, port)))??;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let socket = Arc::new(socket);
    let reply = reply.as_bytes().to_vec();
    let s = socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stopped.load(Ordering::Relaxed) {
            match s.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    let answer = if echo { [&reply[..], &buf[..n]].concat() } else { reply.clone() };
                    s.send_to(&answer, peer).ok();
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    });
    Ok(Server { listener: None, stop, thread: Some(thread), _socket: socket })
}

/// Pins the calling thread to `cpu` (benchmarks keep clients and servers
/// on separate cores).
pub fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// How long a [`tcp_pool`] worker waits for a connection's next request.
const IDLE_CONNECTION: Duration = Duration::from_secs(10);

/// A TCP server with `workers` threads sharing one listener, for load
/// tests: each request line is answered with `reply`; a request of "close"
/// is answered and the server closes first (so TIME_WAIT lands on the
/// server, as with HTTP/1.0), anything else keeps the connection open.
/// It listens on `addr` (an unspecified address: one family).
pub fn tcp_pool(
    ns: &Netns,
    addr: SocketAddr,
    reply: &str,
    workers: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Server> {
    let listener = ns.run(move || TcpListener::bind(addr))??;
    let listener = Arc::new(listener);
    let fd = listener.as_raw_fd();
    let reply = format!("{reply}\n");
    let mut threads = Vec::new();
    for _ in 0..workers {
        let l = listener.clone();
        let reply = reply.clone();
        threads.push(std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            while let Ok((stream, _)) = l.accept() {
                stream.set_nodelay(true).ok();
                // A client that vanished without a FIN (its translation gone
                // with the agent of a finished run) must not hold a worker,
                // nor the server's drop, which waits for every worker.
                stream.set_read_timeout(Some(IDLE_CONNECTION)).ok();
                let mut writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(_) => continue,
                };
                let mut lines = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match lines.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    if writer.write_all(reply.as_bytes()).is_err() || line.trim_end() == "close" {
                        break;
                    }
                }
            }
        }));
    }
    let thread = std::thread::spawn(move || {
        for t in threads {
            t.join().ok();
        }
    });
    Ok(Server { listener: Some(fd), stop: Arc::new(AtomicBool::new(false)), thread: Some(thread), _socket: listener })
}

/// A dnsmasq (Debian's dnsmasq-base) answering on `addr`:53 in a
/// namespace, with no configuration but `args`; stopped on drop.
pub struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    /// Starts it (on `cpu` alone, if given) and waits until it answers.
    pub fn start(ns: &Netns, addr: Ipv4Addr, cpu: Option<usize>, args: &[String]) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]);
        if let Some(cpu) = cpu {
            cmd.args(["taskset", "-c", &cpu.to_string()]);
        }
        let child = cmd
            .args(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-hosts", "--user=root"])
            .args(["--pid-file=", "--bind-interfaces", "--port=53"])
            .arg(format!("--listen-address={addr}"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        let server = Self(child);
        answers_dns(ns, addr, Duration::from_secs(10)).context("dnsmasq answering")?;
        Ok(server)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // Ours, by its handle; gone already is as good.
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Waits until the DNS server on `server`:53 in `ns` answers anything (an
/// error code counts).
pub fn answers_dns(ns: &Netns, server: Ipv4Addr, within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let out = ns.output(&["dig", &format!("@{server}"), "+time=1", "+tries=1", "ready.probe"]).unwrap_or_default();
        if out.contains("status: ") {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{server} does not answer DNS after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
