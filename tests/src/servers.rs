//! Real TCP and UDP servers inside pod namespaces. Each answers every
//! request line (TCP) or datagram (UDP) with its pod's name, so a client
//! can tell which endpoint served it.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    thread::JoinHandle,
};

use crate::netns::Netns;

/// A running server; dropping it closes the socket and ends its thread.
pub struct Server {
    fd: RawFd,
    thread: Option<JoinHandle<()>>,
    // Keeps the socket open as long as the guard lives.
    _socket: std::sync::Arc<dyn Send + Sync>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // shutdown() wakes a thread blocked in accept() or recv_from().
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves TCP on 0.0.0.0:`port` in `ns`; each line read is answered with `reply`.
pub fn tcp(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    let listener = ns.run(move || TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))??;
    let listener = std::sync::Arc::new(listener);
    let fd = listener.as_raw_fd();
    let reply = format!("{reply}\n");
    let l = listener.clone();
    let thread = std::thread::spawn(move || {
        while let Ok((stream, _)) = l.accept() {
            let reply = reply.clone();
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
    Ok(Server { fd, thread: Some(thread), _socket: listener })
}

/// Serves UDP on 0.0.0.0:`port` in `ns`; each datagram is answered with `reply`.
pub fn udp(ns: &Netns, port: u16, reply: &str) -> anyhow::Result<Server> {
    let socket = ns.run(move || UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))??;
    let socket = std::sync::Arc::new(socket);
    let fd = socket.as_raw_fd();
    let reply = reply.as_bytes().to_vec();
    let s = socket.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        // After shutdown() recv_from returns 0 bytes; no client sends empty datagrams.
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = s.send_to(&reply, peer);
        }
    });
    Ok(Server { fd, thread: Some(thread), _socket: socket })
}
