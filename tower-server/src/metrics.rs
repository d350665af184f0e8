//! Prometheus metrics of the server: sessions, tunnel channels, bytes through
//! the tunnel, channel-open (dial) latency, authentication failures, gateway
//! responses and requests refused for their share, agent connections by
//! transport, and peer forwarding between replicas.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_agent` or `from_agent`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Status class: `2xx`, `3xx`, `4xx`, `5xx`, or `101`.
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// How the agent's connection came: `ssh` (raw SSH), `ws` or `wss`
    /// (SSH inside a WebSocket, plain or over TLS).
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShareLabel {
    /// Which share was used up: `client` or `cluster`.
    pub share: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// What became of a request forwarded to another replica: `forwarded`
    /// (answered by the owner), `retried` (answered by the owner a stale one
    /// named), `moved` (no replica had the session: 503), `unreachable`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerBytesLabel {
    /// `sent` or `received` by this replica on its peer connections.
    pub direction: &'static str,
}

/// The server's metrics.
pub struct Metrics {
    pub sessions: Gauge,
    pub channels: Gauge,
    pub bytes: Family<DirectionLabel, Counter>,
    pub channel_open_seconds: Histogram,
    pub auth_failures: Counter,
    pub responses: Family<CodeLabel, Counter>,
    pub cluster_write_refusals: Counter,
    pub share_refusals: Family<ShareLabel, Counter>,
    pub agent_connections: Family<TransportLabel, Counter>,
    pub peer_requests: Family<PeerLabel, Counter>,
    pub peer_served: Counter,
    pub peer_connections: Gauge,
    pub peer_bytes: Family<PeerBytesLabel, Counter>,
    pub owner_lookup_misses: Counter,
    pub probes: Counter,
    pub hand_offs: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            sessions: Gauge::default(),
            channels: Gauge::default(),
            bytes: Family::default(),
            channel_open_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            auth_failures: Counter::default(),
            responses: Family::default(),
            cluster_write_refusals: Counter::default(),
            share_refusals: Family::default(),
            agent_connections: Family::default(),
            peer_requests: Family::default(),
            peer_served: Counter::default(),
            peer_connections: Gauge::default(),
            peer_bytes: Family::default(),
            owner_lookup_misses: Counter::default(),
            probes: Counter::default(),
            hand_offs: Counter::default(),
        };
        tower_ops::register_metrics!(registry, "tower_server",
            "sessions": m.sessions => "Agent sessions connected",
            "channels": m.channels => "Tunnel channels open",
            "tunnel_bytes": m.bytes => "Bytes carried through tunnel channels",
            "channel_open_seconds": m.channel_open_seconds => "Time to open a tunnel channel to an agent (dial latency)",
            "auth_failures": m.auth_failures => "Refused agent authentications",
            "gateway_responses": m.responses => "Gateway responses by status class",
            "cluster_write_refusals": m.cluster_write_refusals => "Cluster updates refused by an admission webhook (KubeSphere refuses them while the member is unreachable)",
            "share_refusals": m.share_refusals => "Requests refused with 429 because their client's or cluster's share of the tunnel was used up",
            "agent_connections": m.agent_connections => "Agent connections that reached SSH, by transport (ssh, ws, wss)",
            "peer_requests": m.peer_requests => "Requests this replica forwarded to the replica holding their cluster's session, by result",
            "peer_served": m.peer_served => "Forwarded requests other replicas sent here",
            "peer_connections": m.peer_connections => "HTTP/2 connections open from this replica to peers",
            "peer_bytes": m.peer_bytes => "Bytes (HTTP/2, inside TLS) this replica sent and received on peer connections, both the ones it opened and the ones it took",
            "owner_lookup_misses": m.owner_lookup_misses => "Requests for a cluster whose session no replica was known to hold",
            "peer_probes": m.probes => "Requests sent to other replicas for a cluster held lately whose new owner had not recorded itself yet",
            "hand_offs": m.hand_offs => "Agents this replica asked to move (or disconnected) while going away");
        m
    }

    /// Counts an agent connection that reached SSH over `transport`.
    pub fn agent_connection(&self, transport: &'static str) {
        self.agent_connections
            .get_or_create(&TransportLabel { transport })
            .inc();
    }

    pub fn response(&self, status: u16) {
        let code = match status {
            101 => "101",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.responses.get_or_create(&CodeLabel { code }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&mut Registry::default())
    }
}
