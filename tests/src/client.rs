//! Client calls made from inside a pod namespace (run them with `Netns::run`).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

/// Connects, sends one request line and returns the reply line (the name of
/// the pod that answered).
pub fn tcp_request(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    request_on(&mut stream)
}

/// A connection from local port `port` (IPv4), closed with a reset rather
/// than left in TIME_WAIT, so that the next one can take the same port at
/// once, as a busy client reusing its ports does.
pub fn tcp_connect_from_port(port: u16, addr: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    fn check(rc: libc::c_int) -> std::io::Result<()> {
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }
    fn option<T>(fd: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
        let len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: `value` is a live `T` of `len` bytes.
        check(unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, name, (value as *const T).cast(), len) })
    }
    let in4 = |addr: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the stream from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    option(fd, libc::SO_REUSEADDR, &(1 as libc::c_int))?;
    option(fd, libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 })?;
    // Also bounds connect().
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let local = in4(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: `local` and `remote` are sockaddr_in of `len` bytes.
    check(unsafe { libc::bind(stream.as_raw_fd(), (&raw const local).cast(), len) })?;
    let remote = in4(addr);
    // The last connection on the same tuple can still hold it for a moment
    // after its reset (seen once in CI as EADDRNOTAVAIL, in iptables mode,
    // on the client's own stack): asked again, within a second.
    let mut retries = 0;
    loop {
        match check(unsafe { libc::connect(stream.as_raw_fd(), (&raw const remote).cast(), len) }) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && retries < 50 => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            done => return done.map(|()| stream),
        }
    }
}

/// [`tcp_request`] over a connection from local port `port` (see [`tcp_connect_from_port`]).
pub fn tcp_request_from_port(port: u16, addr: SocketAddrV4, timeout: Duration) -> std::io::Result<String> {
    request_on(&mut tcp_connect_from_port(port, addr, timeout)?)
}

/// One request/reply on an established connection.
pub fn request_on(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line.trim_end().to_string())
}

/// Sends one datagram and returns the reply and the address it came from.
pub fn udp_request(addr: SocketAddr, timeout: Duration) -> std::io::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello", addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// The errno a connected UDP socket's `recv` fails with after one datagram
/// to `addr` (ECONNREFUSED once an ICMP port unreachable reaches it).
pub fn connected_udp_error(addr: SocketAddr) -> Option<i32> {
    let socket = UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    socket.connect(addr).unwrap();
    socket.send(b"anyone?").unwrap();
    socket.recv(&mut [0u8; 64]).err().and_then(|e| e.raw_os_error())
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The value of the first sample line starting with `series` in a
/// Prometheus text exposition.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
}

/// What a `kpr-probe` process saw: the reply and the peer as the
/// application sees it, or the error.
#[derive(Debug, serde::Deserialize)]
pub struct Probe {
    pub reply: Option<String>,
    pub peer: Option<String>,
    pub error: Option<String>,
    pub errno: Option<i32>,
}

/// `kpr-probe KIND ADDR` (the binary at `bin`; tests pass
/// `env!("CARGO_BIN_EXE_kpr-probe")`) to run in `ns` as a process of `cgroup`.
fn probe_command(
    bin: &std::path::Path,
    ns: &crate::netns::Netns,
    cgroup: &crate::cgroup::Cgroup,
    kind: &str,
    addr: SocketAddr,
) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).arg(bin).arg(kind).arg(addr.to_string());
    cgroup.place(&mut cmd)?;
    Ok(cmd)
}

/// Runs `kpr-probe KIND ADDR` once (see [`probe_command`]) and reads what it saw.
pub fn probe(
    bin: &std::path::Path,
    ns: &crate::netns::Netns,
    cgroup: &crate::cgroup::Cgroup,
    kind: &str,
    addr: SocketAddr,
) -> anyhow::Result<Probe> {
    use anyhow::Context as _;
    let out = probe_command(bin, ns, cgroup, kind, addr)?.output().context("running kpr-probe")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!("kpr-probe said {:?} ({})", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// A `kpr-probe udp-held` or `tcp-held` process: a client that stays
/// connected and asks again on the same socket when told to. Killed on drop.
pub struct Held {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Held {
    /// Starts `kpr-probe KIND ADDR` (`udp-held` or `tcp-held`) in `ns` as a
    /// process of `cgroup`; returns it with its first answer.
    pub fn start(
        bin: &std::path::Path,
        ns: &crate::netns::Netns,
        cgroup: &crate::cgroup::Cgroup,
        kind: &str,
        addr: SocketAddr,
    ) -> anyhow::Result<(Self, Probe)> {
        use anyhow::Context as _;
        let mut cmd = probe_command(bin, ns, cgroup, kind, addr)?;
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("starting kpr-probe")?;
        let stdout = child.stdout.take().context("probe stdout")?;
        let mut held = Self { child, lines: BufReader::new(stdout).lines() };
        let first = held.next()?;
        Ok((held, first))
    }

    fn next(&mut self) -> anyhow::Result<Probe> {
        use anyhow::Context as _;
        let line = self.lines.next().context("the probe ended")??;
        Ok(serde_json::from_str(&line)?)
    }

    /// Asks again on the same socket.
    pub fn ask(&mut self) -> anyhow::Result<Probe> {
        use anyhow::Context as _;
        let stdin = self.child.stdin.as_mut().context("probe stdin")?;
        stdin.write_all(b"again\n")?;
        stdin.flush()?;
        self.next()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Our own child, by its handle.
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The answer to a `kpr-probe KIND ADDR` process in `ns` under `cgroup`, once
/// there is one (kpr may still be programming); fails unless the
/// application saw `addr` (the VIP) as its peer.
pub fn probe_answer(
    bin: &std::path::Path,
    ns: &crate::netns::Netns,
    cgroup: &crate::cgroup::Cgroup,
    kind: &str,
    addr: SocketAddr,
) -> anyhow::Result<String> {
    let p = crate::wait::until(
        &format!("an answer to {kind} {addr} from {}", ns.name()),
        Duration::from_secs(10),
        || {
            probe(bin, ns, cgroup, kind, addr).unwrap_or_else(|e| Probe {
                reply: None,
                peer: None,
                error: Some(format!("{e:#}")),
                errno: None,
            })
        },
        |p| p.reply.is_some(),
    )?;
    anyhow::ensure!(p.peer == Some(addr.to_string()), "{kind}: the peer shown is not the VIP {addr}: {p:?}");
    p.reply.ok_or_else(|| anyhow::anyhow!("no reply"))
}

/// What a client that kept asking saw: requests answered and failed, with
/// the first errors.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

impl Tally {
    pub fn count(&mut self, result: std::io::Result<String>) {
        match result {
            Ok(_) => self.ok += 1,
            Err(e) => {
                self.failed += 1;
                if self.errors.len() < 5 {
                    self.errors.push(e.to_string());
                }
            }
        }
    }
}

/// A client in `ns` making a new connection and request to `addr` every
/// 10 ms (each given `timeout`) until `stop`; what it saw.
pub fn every_10ms(
    ns: &crate::netns::Netns,
    addr: SocketAddr,
    timeout: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Tally> {
    let name = ns.name().to_string();
    std::thread::spawn(move || {
        crate::netns::run_in(&name, move || {
            let mut tally = Tally::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tally.count(tcp_request(addr, timeout));
                std::thread::sleep(Duration::from_millis(10));
            }
            tally
        })
        .expect("entering the client's namespace")
    })
}

/// A `kpr-probe tcp-every` process: a new connection and request every
/// 10 ms from a process of `cgroup` (so the socket hooks serve it). Killed on drop.
pub struct Repeating {
    child: Option<std::process::Child>,
}

impl Repeating {
    pub fn start(
        bin: &std::path::Path,
        ns: &crate::netns::Netns,
        cgroup: &crate::cgroup::Cgroup,
        addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let mut cmd = probe_command(bin, ns, cgroup, "tcp-every", addr)?;
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        Ok(Self { child: Some(cmd.spawn().context("starting kpr-probe")?) })
    }

    /// Stops asking; what it saw.
    pub fn finish(mut self) -> anyhow::Result<Tally> {
        use anyhow::Context as _;
        let mut child = self.child.take().context("finished already")?;
        // Closing stdin tells it to stop.
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("kpr-probe tcp-every said {:?}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Repeating {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// The path MTU a connected UDP socket knows for `addr` once one datagram
/// of `len` bytes went there with "don't fragment" set: lowered by the
/// "fragmentation needed" (ICMPv6 "packet too big") a hop on the way sent
/// back. Waits up to 2 s for that answer; the MTU of the route if none came.
pub fn path_mtu_after_datagram(addr: SocketAddr, len: usize) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    let socket = UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    socket.connect(addr)?;
    let fd = socket.as_raw_fd();
    let (level, discover, do_discover, mtu) = if addr.is_ipv6() {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO, libc::IP_MTU)
    };
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option of an open socket.
    if unsafe { libc::setsockopt(fd, level, discover, (&raw const do_discover).cast(), size) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let known = || {
        let (mut value, mut len): (libc::c_int, libc::socklen_t) = (0, size);
        // SAFETY: an int option of an open socket, into an int.
        if unsafe { libc::getsockopt(fd, level, mtu, (&raw mut value).cast(), &mut len) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(value as u32)
    };
    let route = known()?;
    socket.send(&vec![0u8; len])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let now = known()?;
        if now < route {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    known()
}
