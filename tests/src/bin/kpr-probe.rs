//! A client the socket-level tests start as its own process, so it can be
//! placed in a node's cgroup (hooks act on processes, not threads): one
//! request to ADDR, one JSON line on stdout saying what the application saw.
//!
//! `kpr-probe tcp|udp|udp-connected|udp-held ADDR`: `tcp` connects and
//! sends a line, `udp` sends a datagram from an unconnected socket,
//! `udp-connected` connects a UDP socket first. The line holds the reply and
//! the peer as the application sees it (`getpeername`, or the datagram's
//! source), or the error with its errno. `udp-held` is `udp-connected` that
//! then asks again on the same socket each time a line arrives on stdin,
//! printing a line per answer: a client that stays connected; `tcp-held`
//! the same over one TCP connection, `udp-sendto-held` over one unconnected
//! UDP socket (each request sent to ADDR, as resolvers send). `tcp-every` makes a new connection
//! and request every 10 ms until stdin closes, then prints how many were
//! answered and how many failed (with the first errors). An IPv6 ADDR
//! (such as `[::ffff:10.96.0.10]:80`) makes an IPv6 socket, as dual-stack
//! applications have.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn tcp(addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok((line.trim_end().to_string(), peer))
}

/// A UDP socket of `addr`'s family (an IPv6 one for an IPv4-mapped address).
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })
}

fn udp(addr: SocketAddr, connected: bool) -> std::io::Result<(String, SocketAddr)> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 512];
    if connected {
        socket.connect(addr)?;
        let peer = socket.peer_addr()?;
        socket.send(b"hello")?;
        let n = socket.recv(&mut buf)?;
        return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), peer));
    }
    socket.send_to(b"hello", addr)?;
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// One exchange on a connected UDP socket.
fn exchange(socket: &UdpSocket) -> std::io::Result<(String, SocketAddr)> {
    let mut buf = [0u8; 512];
    socket.send(b"hello")?;
    let n = socket.recv(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), socket.peer_addr()?))
}

fn print(result: std::io::Result<(String, SocketAddr)>) {
    let line = match result {
        Ok((reply, peer)) => serde_json::json!({"reply": reply, "peer": peer.to_string()}),
        Err(e) => serde_json::json!({"error": e.to_string(), "errno": e.raw_os_error()}),
    };
    println!("{line}");
}

fn held(addr: SocketAddr, connected: bool) -> std::io::Result<()> {
    let socket = udp_socket(addr)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let ask = |socket: &UdpSocket| {
        if connected {
            return exchange(socket);
        }
        let mut buf = [0u8; 512];
        socket.send_to(b"hello", addr)?;
        let (n, from) = socket.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    };
    if connected {
        socket.connect(addr)?;
    }
    print(ask(&socket));
    for line in std::io::stdin().lines() {
        line?;
        print(ask(&socket));
    }
    Ok(())
}

/// One request and reply on an established TCP connection.
fn request(stream: &TcpStream) -> std::io::Result<(String, SocketAddr)> {
    (&*stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok((line.trim_end().to_string(), stream.peer_addr()?))
}

fn tcp_held(addr: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    print(request(&stream));
    for line in std::io::stdin().lines() {
        line?;
        print(request(&stream));
    }
    Ok(())
}

fn tcp_every(addr: SocketAddr) {
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() {
                break;
            }
        }
        done_tx.send(()).ok();
    });
    let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
    while done.try_recv().is_err() {
        match tcp(addr) {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("{}", serde_json::json!({"ok": ok, "failed": failed, "errors": errors}));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(addr)) = (args.first(), args.get(1).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!("usage: kpr-probe tcp|udp|udp-connected ADDR");
        std::process::exit(2);
    };
    let result = match kind.as_str() {
        "tcp" => tcp(addr),
        "udp" => udp(addr, false),
        "udp-connected" => udp(addr, true),
        "tcp-every" => return tcp_every(addr),
        "udp-held" | "udp-sendto-held" | "tcp-held" => {
            let held = match kind.as_str() {
                "tcp-held" => tcp_held(addr),
                held_kind => held(addr, held_kind == "udp-held"),
            };
            if let Err(e) = held {
                eprintln!("{e}");
                std::process::exit(1);
            }
            return;
        }
        other => {
            eprintln!("unknown probe {other}");
            std::process::exit(2);
        }
    };
    print(result);
}
