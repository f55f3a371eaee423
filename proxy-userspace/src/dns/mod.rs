//! The cluster DNS add-on (`kpr run --dns-listen`): Service names answered
//! on the node from the same watch that programs the dataplane, per the
//! Kubernetes DNS specification, and every other name forwarded to the
//! node's upstream servers with a cache.
//!
//! `zone` keeps the names, rebuilding the Services each change touches;
//! `answer` turns a question into records (pure); `cache` and `forward`
//! handle names outside the cluster; `server` speaks the protocol over UDP
//! (in batches, see `batch`) and TCP. Messages are read and written by
//! hickory-proto.

pub mod answer;
pub mod batch;
pub mod cache;
pub mod forward;
pub mod server;
pub mod zone;

use std::{net::SocketAddr, time::Duration};

use crate::name::ObjectName;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// How the DNS add-on runs.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    /// `--cluster-domain`.
    pub domain: String,
    /// TTL of the cluster's records (and of negative answers about them).
    pub ttl: u32,
    pub upstreams: Vec<SocketAddr>,
    /// Forwarded answers kept at most.
    pub cache_size: usize,
    /// How long one upstream is waited for.
    pub upstream_timeout: Duration,
    /// The cluster DNS Service this node's clients reach the add-on
    /// through (`--dns-capture-service`): never forwarded to, as that
    /// would be the add-on itself.
    pub capture: Option<ObjectName>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RcodeLabels {
    pub rcode: String,
}

/// What the DNS server counts (CoreDNS's metrics, under kpr's names).
#[derive(Default)]
pub struct DnsMetrics {
    pub requests: Family<ProtocolLabels, Counter>,
    pub responses: Family<RcodeLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub forward_duration: ForwardHistogram,
    pub upstream_failures: Counter,
    /// Queries that could not be read, answered FORMERR or dropped.
    pub malformed: Counter,
}

/// The histogram of upstream answer times, with buckets from 0.1 ms.
#[derive(Clone)]
pub struct ForwardHistogram(Histogram);

impl Default for ForwardHistogram {
    fn default() -> Self {
        Self(Histogram::new(exponential_buckets(0.0001, 2.0, 18)))
    }
}

impl ForwardHistogram {
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

impl DnsMetrics {
    /// Queries received over both transports.
    pub fn requests_total(&self) -> u64 {
        ["udp", "tcp"]
            .iter()
            .map(|p| self.requests.get_or_create(&ProtocolLabels { protocol: (*p).into() }).get())
            .sum()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register("kpr_dns_requests", "DNS queries received, by transport", self.requests.clone());
        registry.register("kpr_dns_responses", "DNS responses sent, by response code", self.responses.clone());
        registry.register("kpr_dns_cache_hits", "Forwarded names answered from the cache", self.cache_hits.clone());
        registry.register(
            "kpr_dns_cache_misses",
            "Forwarded names not in the cache, asked upstream",
            self.cache_misses.clone(),
        );
        registry.register(
            "kpr_dns_forward_duration_seconds",
            "Time for an upstream server to answer a forwarded name",
            self.forward_duration.0.clone(),
        );
        registry.register(
            "kpr_dns_upstream_failures",
            "Upstream servers that failed a forwarded name: no answer in time, an unreadable one, SERVFAIL or REFUSED",
            self.upstream_failures.clone(),
        );
        registry.register(
            "kpr_dns_malformed_requests",
            "Queries that could not be read (answered FORMERR when their header could be, else dropped)",
            self.malformed.clone(),
        );
    }
}
