//! Prometheus metrics of the xDS server.
//!
//! Counters are registered without the `_total` suffix; the OpenMetrics
//! encoder appends it (`meshbox_xds_nacks` is exposed as
//! `meshbox_xds_nacks_total`). Labels are bounded: type URLs are our two
//! known types, reasons are fixed strings; nothing a client sends becomes a
//! label value.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    type_url: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct XdsMetrics {
    connected: Gauge,
    streams_refused: Family<ReasonLabels, Counter>,
    pushes: Family<TypeLabels, Counter>,
    resources_sent: Family<TypeLabels, Counter>,
    removals_sent: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    encodings: Counter,
    requests_ignored: Family<ReasonLabels, Counter>,
    fell_behind: Family<ActionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

impl XdsMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "meshbox_xds_connected_clients",
            "xDS streams currently open",
            m.connected.clone(),
        );
        registry.register(
            "meshbox_xds_streams_refused",
            "xDS streams refused before anything was sent, by reason",
            m.streams_refused.clone(),
        );
        registry.register(
            "meshbox_xds_pushes",
            "xDS responses sent, by type",
            m.pushes.clone(),
        );
        registry.register(
            "meshbox_xds_resources_sent",
            "Resources sent in xDS responses, by type",
            m.resources_sent.clone(),
        );
        registry.register(
            "meshbox_xds_removals_sent",
            "Removed (or not found) resource names sent in xDS responses, by type",
            m.removals_sent.clone(),
        );
        registry.register(
            "meshbox_xds_nacks",
            "xDS responses a client rejected (NACK), by type",
            m.nacks.clone(),
        );
        registry.register(
            "meshbox_xds_resource_encodings",
            "Resources encoded for the xDS cache (once per update, shared by all clients)",
            m.encodings.clone(),
        );
        registry.register(
            "meshbox_xds_requests_ignored",
            "xDS requests ignored, by reason (unknown_type, unknown_nonce)",
            m.requests_ignored.clone(),
        );
        registry.register(
            "meshbox_xds_fell_behind",
            "Streams that fell behind the change log: reconciled in full (resync) or restarted (reconnect)",
            m.fell_behind.clone(),
        );
        m
    }

    pub(crate) fn stream_opened(&self) {
        self.connected.inc();
    }

    pub(crate) fn stream_closed(&self) {
        self.connected.dec();
    }

    pub(crate) fn stream_refused(&self, reason: &'static str) {
        self.streams_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn pushed(&self, type_url: &'static str, resources: usize, removals: usize) {
        let labels = TypeLabels { type_url };
        self.pushes.get_or_create(&labels).inc();
        self.resources_sent
            .get_or_create(&labels)
            .inc_by(resources as u64);
        self.removals_sent
            .get_or_create(&labels)
            .inc_by(removals as u64);
    }

    pub(crate) fn nacked(&self, type_url: &'static str) {
        self.nacks.get_or_create(&TypeLabels { type_url }).inc();
    }

    pub(crate) fn encoded(&self, count: u64) {
        self.encodings.inc_by(count);
    }

    pub(crate) fn ignored(&self, reason: &'static str) {
        self.requests_ignored
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn fell_behind(&self, action: &'static str) {
        self.fell_behind
            .get_or_create(&ActionLabels { action })
            .inc();
    }
}
