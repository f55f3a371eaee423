//! The DNS protocol over UDP and TCP: a query is read (hickory-proto),
//! answered from the zone, the cache or an upstream, and written back,
//! truncated over UDP when it does not fit (the client then asks over TCP).
//! Input that is not a query is answered FORMERR when its header can be
//! read and dropped otherwise, counted either way; nothing in it can stop
//! the server.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, RecordType},
};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
};

use crate::dns::{
    DnsConfig, DnsMetrics, ProtocolLabels, RcodeLabels,
    answer::{self, Answer},
    batch,
    cache::Cache,
    forward::{EDNS_PAYLOAD, Forwarder},
    zone::SharedZone,
};

/// The largest UDP answer to a client that did not say (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// How long a TCP connection may wait for its next query, and take to send it.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries waiting for an upstream at once; more are answered SERVFAIL
/// (a flood of unknown names must not exhaust the agent).
const MAX_FORWARDS: usize = 1024;

pub struct DnsServer {
    zone: SharedZone,
    forwarder: Forwarder,
    ttl: u32,
    metrics: Arc<DnsMetrics>,
    capture: Option<crate::name::ObjectName>,
    forwards: Arc<tokio::sync::Semaphore>,
    /// The per-query counters, looked up once (a label lookup per query
    /// would cost more than the rest of an answer).
    udp_requests: Counter,
    tcp_requests: Counter,
    by_rcode: [(ResponseCode, Counter); 6],
}

/// What a query needs next.
enum Step {
    /// Its response, ready.
    Reply(Message),
    /// An upstream's answer.
    Forward(Message),
    /// The zone's answer, completed with an upstream's for an ExternalName's target.
    Chase(Message, Answer),
    /// Nothing: it was not a query.
    Drop,
}

/// The rcode's mnemonic, as CoreDNS labels it (`NOERROR`, `NXDOMAIN`, ...).
impl Step {
    /// SERVFAIL for a query that cannot wait for an upstream now.
    fn fail(self) -> Message {
        match self {
            Step::Reply(m) => m,
            Step::Forward(request) | Step::Chase(request, _) => reply_to(&request, ResponseCode::ServFail),
            Step::Drop => unreachable!("dropped queries are not answered"),
        }
    }
}

fn rcode_label(rcode: ResponseCode) -> String {
    format!("{rcode:?}").to_ascii_uppercase()
}

impl DnsServer {
    pub fn new(config: &DnsConfig, zone: SharedZone, metrics: Arc<DnsMetrics>) -> Self {
        // Forwarded answers are kept at most an hour, negative ones five minutes.
        let cache = Cache::new(config.cache_size, Duration::from_secs(3600), Duration::from_secs(300));
        let forwarder = Forwarder::new(config.upstreams.clone(), cache, config.upstream_timeout, metrics.clone());
        let requests =
            |protocol: &str| metrics.requests.get_or_create(&ProtocolLabels { protocol: protocol.into() }).clone();
        let rcode = |code: ResponseCode| {
            (code, metrics.responses.get_or_create(&RcodeLabels { rcode: rcode_label(code) }).clone())
        };
        Self {
            zone,
            forwarder,
            ttl: config.ttl,
            capture: config.capture.clone(),
            forwards: Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS)),
            udp_requests: requests("udp"),
            tcp_requests: requests("tcp"),
            by_rcode: [
                rcode(ResponseCode::NoError),
                rcode(ResponseCode::NXDomain),
                rcode(ResponseCode::ServFail),
                rcode(ResponseCode::FormErr),
                rcode(ResponseCode::NotImp),
                rcode(ResponseCode::Refused),
            ],
            metrics,
        }
    }

    fn count_response(&self, code: ResponseCode) {
        match self.by_rcode.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.inc(),
            None => self.metrics.responses.get_or_create(&RcodeLabels { rcode: rcode_label(code) }).inc(),
        };
    }

    /// Serves on `listen` over UDP and TCP: TCP until the returned task is
    /// aborted, UDP until the process exits.
    ///
    /// UDP queries are read by a thread of their own with blocking calls,
    /// in batches (see `batch`): an answer from the zone or the cache costs
    /// a share of two system calls and no wake-up of the runtime, whatever
    /// else the agent is doing. Queries that wait for an upstream are
    /// handed to the runtime.
    pub async fn serve(self: Arc<Self>, listen: SocketAddr) -> std::io::Result<Vec<JoinHandle<()>>> {
        let udp = Arc::new(std::net::UdpSocket::bind(listen)?);
        let tcp = TcpListener::bind(listen).await?;
        tracing::info!(%listen, upstreams = ?self.forwarder.upstreams(), "DNS add-on serving");
        let (server, runtime) = (self.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new().name("dns-udp".into()).spawn(move || server.serve_udp(&udp, &runtime))?;
        let server = self;
        let tcp_task = tokio::spawn(async move {
            loop {
                match tcp.accept().await {
                    Ok((stream, _)) => drop(tokio::spawn(server.clone().serve_tcp(stream))),
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!(error = %e, "DNS over TCP: accepting failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(vec![tcp_task])
    }

    fn serve_udp(self: Arc<Self>, udp: &Arc<std::net::UdpSocket>, runtime: &tokio::runtime::Handle) {
        let mut receiver = batch::Receiver::default();
        let mut answers = Vec::with_capacity(batch::BATCH);
        loop {
            if let Err(e) = receiver.receive(udp) {
                tracing::debug!(error = %e, "DNS over UDP: receiving failed");
                continue;
            }
            for (query, cut, peer) in receiver.queries() {
                self.udp_requests.inc();
                // Longer than any query: not one, whatever it starts with.
                let step = if cut { self.malformed(query) } else { self.start(query) };
                match step {
                    Step::Reply(response) => answers.push((self.encode_udp(response), peer)),
                    Step::Drop => {}
                    // A round trip upstream must not hold up the other queries.
                    step => match self.forwards.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let Some(from) = peer.socket_addr() else { continue };
                            let (server, udp) = (self.clone(), udp.clone());
                            runtime.spawn(async move {
                                let response = server.finish(step).await;
                                send(&udp, &server.encode_udp(response), from);
                                drop(permit);
                            });
                        }
                        Err(_) => answers.push((self.encode_udp(step.fail()), peer)),
                    },
                }
            }
            batch::send(udp, &mut answers);
            answers.clear();
        }
    }

    fn encode_udp(&self, response: Message) -> Vec<u8> {
        let limit = udp_limit(&response);
        self.encode(response, Some(limit))
    }

    async fn serve_tcp(self: Arc<Self>, mut stream: TcpStream) {
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else { return };
            let mut buf = vec![0u8; len as usize];
            if !matches!(tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await, Ok(Ok(_))) {
                return;
            }
            self.tcp_requests.inc();
            let Some(bytes) = self.respond(&buf, false).await else { continue };
            let Ok(len) = u16::try_from(bytes.len()) else { continue };
            if stream.write_all(&[&len.to_be_bytes()[..], &bytes].concat()).await.is_err() {
                return;
            }
        }
    }

    /// The response to the query in `bytes`, encoded (truncated to fit a
    /// UDP answer when `udp`); `None` when it is dropped.
    pub async fn respond(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let response = match self.start(bytes) {
            Step::Drop => return None,
            Step::Reply(response) => response,
            step => match self.forwards.clone().try_acquire_owned() {
                Ok(_permit) => self.finish(step).await,
                Err(_) => step.fail(),
            },
        };
        Some(if udp { self.encode_udp(response) } else { self.encode(response, None) })
    }

    /// What can be decided without waiting: everything but a round trip upstream.
    fn start(&self, bytes: &[u8]) -> Step {
        let Ok(request) = Message::from_vec(bytes) else { return self.malformed(bytes) };
        if request.metadata.message_type != MessageType::Query {
            self.metrics.malformed.inc();
            return Step::Drop;
        }
        if request.metadata.op_code != OpCode::Query {
            return Step::Reply(reply_to(&request, ResponseCode::NotImp));
        }
        let [query] = request.queries.as_slice() else {
            self.metrics.malformed.inc();
            return Step::Reply(reply_to(&request, ResponseCode::FormErr));
        };
        if matches!(query.query_type, RecordType::AXFR | RecordType::IXFR) {
            return Step::Reply(reply_to(&request, ResponseCode::Refused));
        }
        if matches!(query.query_class, DNSClass::IN | DNSClass::ANY) {
            let zone = self.zone.read().unwrap();
            if let Some(found) = answer::answer(&zone, &query.name, query.query_type, self.ttl) {
                if !zone.loaded() {
                    // Before the first complete list the zone would deny every name.
                    return Step::Reply(reply_to(&request, ResponseCode::ServFail));
                }
                if found.chase.is_some() {
                    return Step::Chase(request, found);
                }
                return Step::Reply(self.authoritative(&request, found, &zone));
            }
        }
        match self.forwarder.cached(query) {
            Some(cached) => Step::Reply(forwarded(&request, cached)),
            None => Step::Forward(request),
        }
    }

    /// What input that is not a query gets, counted: FORMERR with the id
    /// and opcode it gave when it has a query's header, else nothing.
    fn malformed(&self, bytes: &[u8]) -> Step {
        self.metrics.malformed.inc();
        match bytes {
            [a, b, flags, ..] if bytes.len() >= 12 && flags & 0x80 == 0 => {
                let mut m = Message::error_msg(u16::from_be_bytes([*a, *b]), OpCode::Query, ResponseCode::FormErr);
                m.metadata.op_code = OpCode::from_u8((flags >> 3) & 0x0f);
                Step::Reply(m)
            }
            _ => Step::Drop,
        }
    }

    /// Completes a step that waits for an upstream.
    async fn finish(&self, step: Step) -> Message {
        match step {
            Step::Reply(m) => m,
            Step::Drop => unreachable!("dropped queries are not finished"),
            Step::Forward(request) => {
                let query = &request.queries[0];
                match self.forwarder.resolve(query, &self.captured_ips()).await {
                    Some(upstream) => forwarded(&request, upstream),
                    None => reply_to(&request, ResponseCode::ServFail),
                }
            }
            Step::Chase(request, mut found) => {
                let target = found.chase.take().expect("a chase has a target");
                let query = Query::query(target, request.queries[0].query_type);
                let resolved = match self.forwarder.cached(&query) {
                    Some(hit) => Some(hit),
                    None => self.forwarder.resolve(&query, &self.captured_ips()).await,
                };
                // The target's rcode is the answer's (NXDOMAIN for a name that does not exist).
                let Some(resolved) = resolved else { return reply_to(&request, ResponseCode::ServFail) };
                found.rcode = resolved.metadata.response_code;
                found.answers.extend(resolved.answers);
                let zone = self.zone.read().unwrap();
                self.authoritative(&request, found, &zone)
            }
        }
    }

    /// The addresses of the captured cluster DNS Service: forwarding there
    /// would be forwarding to the add-on itself.
    fn captured_ips(&self) -> Vec<std::net::IpAddr> {
        let Some(name) = &self.capture else { return Vec::new() };
        let zone = self.zone.read().unwrap();
        match zone.service(name.namespace(), name.name()).map(|s| &s.target) {
            Some(crate::validate::DnsTarget::ClusterIps(ips)) => ips.to_vec(),
            _ => Vec::new(),
        }
    }

    /// The response carrying the zone's answer, with its zone's SOA when it
    /// holds no record (NXDOMAIN or NODATA) so resolvers cache that.
    fn authoritative(&self, request: &Message, found: Answer, zone: &super::zone::Zone) -> Message {
        let mut m = reply_to(request, found.rcode);
        m.metadata.authoritative = true;
        if found.answers.is_empty() {
            m.authorities.extend(answer::soa_for(zone, &request.queries[0].name, self.ttl));
        }
        m.answers = found.answers;
        m.additionals = found.additionals;
        m
    }

    /// The wire form of `response`, counted; cut down to its question with
    /// TC set when it exceeds `limit` (UDP).
    fn encode(&self, response: Message, limit: Option<usize>) -> Vec<u8> {
        self.count_response(response.metadata.response_code);
        let bytes = match response.to_vec() {
            Ok(bytes) => bytes,
            // Too large for any message (65,535 bytes): over UDP, ask for TCP as for any large answer.
            Err(_) if limit.is_some() => return response.truncate().to_vec().unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "could not encode a DNS response; answering SERVFAIL");
                let mut failed = response.truncate();
                failed.metadata.truncation = false;
                failed.metadata.response_code = ResponseCode::ServFail;
                return failed.to_vec().unwrap_or_default();
            }
        };
        match limit {
            Some(limit) if bytes.len() > limit => response.truncate().to_vec().unwrap_or_default(),
            _ => bytes,
        }
    }
}

/// Sends a UDP answer (a datagram send does not wait on the client); a
/// client gone meanwhile is not the server's concern.
fn send(udp: &std::net::UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = udp.send_to(bytes, to) {
        tracing::debug!(%to, error = %e, "could not send a DNS answer");
    }
}

/// The most a UDP response may hold: what the client's EDNS says, within
/// 512 and the server's own payload size.
fn udp_limit(response: &Message) -> usize {
    match &response.edns {
        Some(edns) => (edns.max_payload() as usize).clamp(CLASSIC_UDP, EDNS_PAYLOAD as usize),
        None => CLASSIC_UDP,
    }
}

/// An empty response to `request` with `rcode`: its id, question and
/// recursion flag, and EDNS when it used EDNS, announcing the lesser of
/// the client's payload size and ours (which [`udp_limit`] then holds the
/// answer to).
fn reply_to(request: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries = request.queries.clone();
    if let Some(asked) = &request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload().clamp(CLASSIC_UDP as u16, EDNS_PAYLOAD));
        m.set_edns(edns);
    }
    m
}

/// An upstream's answer, given to the client as the response to its request.
fn forwarded(request: &Message, upstream: Message) -> Message {
    let mut m = reply_to(request, upstream.metadata.response_code);
    m.answers = upstream.answers;
    m.authorities = upstream.authorities;
    m.additionals = upstream.additionals;
    m
}

/// How long the DNS server takes to answer its own probe, for health checks.
pub async fn probe(listen: SocketAddr, domain: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut request = Message::query();
    let name = hickory_proto::rr::Name::from_ascii(format!("dns-version.{domain}.")).ok()?;
    request.add_query(Query::query(name, RecordType::TXT));
    let local: SocketAddr = if listen.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    let socket = UdpSocket::bind(local).await.ok()?;
    socket.connect(listen).await.ok()?;
    socket.send(&request.to_vec().ok()?).await.ok()?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(timeout, socket.recv(&mut buf)).await.ok()?.ok()?;
    let response = Message::from_vec(&buf[..n]).ok()?;
    (response.metadata.id == request.metadata.id && response.metadata.response_code == ResponseCode::NoError)
        .then(|| started.elapsed())
}

#[cfg(test)]
mod tests;
