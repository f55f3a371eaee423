//! Names outside the cluster, forwarded to the upstream servers: over
//! UDP, again over TCP when the answer was truncated, the next upstream
//! tried when one does not answer in time, and answers kept in the cache.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

use crate::dns::{
    DnsMetrics,
    cache::{Cache, Question},
};

/// The UDP payload asked of upstreams (the DNS flag day's safe size).
pub const EDNS_PAYLOAD: u16 = 1232;

/// Every upstream is tried this many times over before giving up.
const ROUNDS: usize = 2;

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    cache: Mutex<Cache>,
    timeout: Duration,
    metrics: Arc<DnsMetrics>,
}

/// The `nameserver` lines of a resolv.conf, as socket addresses on port 53.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            let ip: std::net::IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, cache: Cache, timeout: Duration, metrics: Arc<DnsMetrics>) -> Self {
        Self { upstreams, cache: Mutex::new(cache), timeout, metrics }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    fn question(query: &Query) -> Question {
        Question { name: super::answer::plain(&query.name), qtype: query.query_type, class: query.query_class }
    }

    /// The cached answer to `query`, if there is one.
    pub fn cached(&self, query: &Query) -> Option<Message> {
        let hit = self.cache.lock().unwrap().get(&Self::question(query), Instant::now());
        match &hit {
            Some(_) => self.metrics.cache_hits.inc(),
            None => self.metrics.cache_misses.inc(),
        };
        hit
    }

    /// The upstreams' answer to `query` (cached for next time), from the
    /// first upstream not in `excluded` that answers it; one that fails
    /// (SERVFAIL, REFUSED) passes the question to the next, and its answer
    /// is given only when none does better. `None` when none answered.
    pub async fn resolve(&self, query: &Query, excluded: &[std::net::IpAddr]) -> Option<Message> {
        let started = Instant::now();
        let mut failed: Option<Message> = None;
        let upstreams = self.upstreams.iter().filter(|u| !excluded.contains(&u.ip()));
        for upstream in upstreams.cycle().take(ROUNDS * self.upstreams.len()) {
            match self.exchange(*upstream, query).await {
                Ok(response)
                    if matches!(response.metadata.response_code, ResponseCode::ServFail | ResponseCode::Refused) =>
                {
                    self.metrics.upstream_failures.inc();
                    failed = Some(response);
                }
                Ok(response) => {
                    self.metrics.forward_duration.observe(started.elapsed().as_secs_f64());
                    self.cache.lock().unwrap().put(Self::question(query), &response, Instant::now());
                    return Some(response);
                }
                Err(e) => {
                    self.metrics.upstream_failures.inc();
                    tracing::debug!(%upstream, name = %query.name, error = %e, "upstream did not answer");
                }
            }
        }
        failed
    }

    async fn exchange(&self, upstream: SocketAddr, query: &Query) -> std::io::Result<Message> {
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        request.set_edns(edns);
        let bytes = request.to_vec().map_err(std::io::Error::other)?;
        let response = tokio::time::timeout(self.timeout, udp_exchange(upstream, &bytes, &request))
            .await
            .map_err(|elapsed| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("UDP: {elapsed}")))??;
        if !response.metadata.truncation {
            return Ok(response);
        }
        match tokio::time::timeout(self.timeout, tcp_exchange(upstream, &bytes, &request)).await {
            Ok(Ok(whole)) => Ok(whole),
            // The truncated answer is still an answer: the client may ask over TCP itself.
            Ok(Err(e)) => {
                tracing::debug!(%upstream, error = %e, "upstream's TCP answer failed; passing on the truncated one");
                Ok(response)
            }
            Err(elapsed) => {
                tracing::debug!(%upstream, %elapsed, "upstream's TCP answer timed out; passing on the truncated one");
                Ok(response)
            }
        }
    }
}

/// Whether `response` answers `request` (its id and question).
fn answers(response: &Message, request: &Message) -> bool {
    response.metadata.message_type == MessageType::Response
        && response.metadata.op_code == OpCode::Query
        && response.metadata.id == request.metadata.id
        && response.queries == request.queries
}

async fn udp_exchange(upstream: SocketAddr, bytes: &[u8], request: &Message) -> std::io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(bytes).await?;
    // What was asked for is at most EDNS_PAYLOAD; anything cut short by
    // this buffer does not parse and is ignored like any stray datagram.
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything else (a late answer to another query, a forgery) is ignored.
        if let Ok(response) = Message::from_vec(&buf[..n])
            && answers(&response, request)
        {
            return Ok(response);
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, bytes: &[u8], request: &Message) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
    stream.write_all(&[&len.to_be_bytes()[..], bytes].concat()).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let response = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if !answers(&response, request) {
        return Err(std::io::Error::other("the TCP answer does not match the question"));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let text = "# generated\nsearch example.com\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\noptions ndots:5\n";
        let servers: Vec<String> = resolv_conf_servers(text).iter().map(|s| s.to_string()).collect();
        assert_eq!(servers, ["192.0.2.53:53", "[fe80::1]:53"]);
    }
}
