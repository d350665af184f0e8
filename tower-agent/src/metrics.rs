//! Prometheus metrics of the agent: connection state, reconnects, and requests
//! served per upstream.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// The agent's metrics.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    /// 1 while a session to the server is established.
    pub connected: Gauge,
    /// Sessions that ended and were retried.
    pub reconnects: Counter,
    /// Requests served through the tunnel, per upstream.
    pub requests: Family<UpstreamLabel, Counter>,
    /// Tunnel channels currently open.
    pub channels: Gauge,
}

impl AgentMetrics {
    pub fn register(&self, registry: &mut Registry) {
        tower_ops::register_metrics!(registry, "tower_agent",
            "connected": self.connected => "1 while the tunnel session is established",
            "reconnects": self.reconnects => "Tunnel sessions that ended and were retried",
            "requests": self.requests => "Requests served through the tunnel",
            "channels": self.channels => "Tunnel channels open");
    }
}
