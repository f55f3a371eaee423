//! Client calls made from inside a pod namespace (run them with `Netns::run`).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

/// Connects, sends one request line and returns the reply line (the name of
/// the pod that answered).
pub fn tcp_request(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    request_on(&mut stream)
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
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello", addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}
