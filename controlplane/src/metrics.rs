//! Prometheus metrics of the control plane, served on `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::limits::LimitMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabels {
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    via: &'static str,
    reason: &'static str,
}

/// Counters and latency of the CA.
#[derive(Clone)]
pub struct CaMetrics {
    issued: Family<ViaLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    latency: Family<ViaLabels, Histogram>,
}

impl CaMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            issued: Family::default(),
            refused: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
        };
        registry.register(
            "meshbox_ca_certificates_issued",
            "Certificates issued, by API",
            metrics.issued.clone(),
        );
        registry.register(
            "meshbox_ca_requests_refused",
            "Certificate requests refused, by API and reason",
            metrics.refused.clone(),
        );
        registry.register(
            "meshbox_ca_issuance_duration_seconds",
            "Time to authorize and sign one certificate",
            metrics.latency.clone(),
        );
        metrics
    }

    pub fn issued(&self, via: &'static str, took: Duration) {
        self.issued.get_or_create(&ViaLabels { via }).inc();
        self.latency
            .get_or_create(&ViaLabels { via })
            .observe(took.as_secs_f64());
    }

    pub fn refused(&self, via: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { via, reason })
            .inc();
    }
}

/// The registry and every metric group in it.
pub struct Metrics {
    registry: Registry,
    pub ca: CaMetrics,
    pub limits: LimitMetrics,
}

impl Metrics {
    /// Registers the control plane's own metrics; `more` registers those of
    /// parts that own their metrics (the xDS server).
    pub fn new(more: impl FnOnce(&mut Registry)) -> Arc<Self> {
        let mut registry = Registry::default();
        let ca = CaMetrics::register(&mut registry);
        let limits = LimitMetrics::register(&mut registry);
        more(&mut registry);
        Arc::new(Self {
            registry,
            ca,
            limits,
        })
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}
