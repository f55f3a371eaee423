//! What the agent measures about itself, with kube-proxy's metric names
//! where they apply. Observers read these; the sync path only records.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    /// Time to build the model, plan and apply one sync.
    pub sync_duration: Histogram,
    /// Time from a change arriving from the source to the dataplane
    /// reflecting it (kube-proxy's network programming latency).
    pub programming_latency: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// Objects skipped by validation, counted when first seen, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Frontends the dataplane could not program, by kind of failure.
    pub apply_errors: Family<ReasonLabels, Counter>,
    /// Set to 1, labelled with the reason, when auto mode fell back from eBPF.
    pub ebpf_fallback: Family<ReasonLabels, Gauge>,
    /// Drift the periodic check found and repaired.
    pub repairs: Counter,
    /// The DNS add-on's (zero while it does not run).
    pub dns: std::sync::Arc<crate::dns::DnsMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let programming_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let last_sync_timestamp = Gauge::<f64, AtomicU64>::default();
        let rejected = Family::<ReasonLabels, Counter>::default();
        let apply_errors = Family::<ReasonLabels, Counter>::default();
        let ebpf_fallback = Family::<ReasonLabels, Gauge>::default();
        let repairs = Counter::default();
        let mut registry = Registry::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time to program the dataplane in one sync",
            sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from a Service or EndpointSlice change arriving to the dataplane reflecting it",
            programming_latency.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the dataplane was last synced (Unix time)",
            last_sync_timestamp.clone(),
        );
        registry.register("kpr_rejected_objects", "Objects skipped by validation, by reason", rejected.clone());
        registry.register(
            "kpr_dataplane_errors",
            "Frontends the dataplane could not program, by kind of failure",
            apply_errors.clone(),
        );
        registry.register(
            "kpr_ebpf_fallback",
            "1 when auto mode fell back from eBPF to iptables, labelled with why",
            ebpf_fallback.clone(),
        );
        registry.register(
            "kpr_dataplane_repairs",
            "Things the periodic check found drifted from the desired state (a flushed table, a deleted map entry) and wrote again",
            repairs.clone(),
        );
        let dns = std::sync::Arc::new(crate::dns::DnsMetrics::default());
        dns.register(&mut registry);
        Self {
            registry,
            dns,
            repairs,
            sync_duration,
            programming_latency,
            last_sync_timestamp,
            rejected,
            apply_errors,
            ebpf_fallback,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
