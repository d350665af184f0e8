//! Server settings: listeners' limits and timeouts, keepalives, and how
//! clients reach the gateway.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Holds the CA, the SSH host key and (for the file store) tokens.
    pub state_dir: PathBuf,
    /// Base URL clients use to reach the gateway, written into kubeconfigs.
    pub gateway_url: String,
    /// DNS names and IPs for the gateway's serving certificate.
    pub gateway_hosts: Vec<String>,
    /// This server's name in the welcome agents get (the replica's pod name
    /// in Kubernetes mode).
    pub server_id: String,
    /// Keepalive interval towards agents (and advertised to them).
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before an agent is declared dead.
    pub keepalive_max: usize,
    /// How often tokens are re-checked (revocation takes effect within this).
    pub store_poll: Duration,
    /// Concurrent SSH connections accepted (authenticated or not).
    pub max_ssh_connections: usize,
    /// An SSH connection that has not authenticated within this is cut.
    pub ssh_auth_timeout: Duration,
    /// Concurrent SSH connections not yet authenticated, overall.
    pub max_unauthenticated_ssh: usize,
    /// Concurrent SSH connections not yet authenticated, per source (an IPv4
    /// address or an IPv6 /64).
    pub max_unauthenticated_ssh_per_source: usize,
    /// A gateway client must finish its TLS handshake within this.
    pub gateway_tls_timeout: Duration,
    /// Concurrent gateway TLS handshakes, overall and per source (an IPv4
    /// address or an IPv6 /64); past the caps a connection is closed at once,
    /// with the same fair eviction as unauthenticated SSH connections.
    pub max_gateway_handshakes: usize,
    pub max_gateway_handshakes_per_source: usize,
    /// An HTTP/1.1 gateway client must send a request's headers within this
    /// (also the idle limit between keep-alive requests). Bodies, watches and
    /// upgraded streams are not bound by it.
    pub gateway_header_read_timeout: Duration,
    /// A gateway client certificate reaches only the cluster it was issued
    /// for (`CN=tower:<cluster>`), the default; off, any certificate from the
    /// tower CA reaches every cluster.
    pub gateway_client_bound_to_cluster: bool,
    /// Address the per-cluster listeners of KubeSphere mode bind.
    pub cluster_listen_host: IpAddr,
    /// Share of one client (a client certificate, or none, from one source
    /// address) on one cluster: requests in flight through the tunnel,
    /// watches and upgraded streams included. Past it: `429`.
    pub client_streams: usize,
    /// Share of one cluster: requests in flight through its tunnel from all
    /// clients (at most [`MAX_CLUSTER_STREAMS`](crate::gateway::MAX_CLUSTER_STREAMS)).
    /// Each may hold one stream window (1 MiB) of response its client has not
    /// read, so this bounds the memory one cluster's clients can make the
    /// server hold.
    pub cluster_streams: usize,
    /// Where other replicas reach this one's peer listener (host:port), when
    /// it has one: peer forwarding is on, and the peer serving certificate
    /// names this host.
    pub peer_address: Option<String>,
    /// Kubernetes mode: when told to stop, this replica first hands its
    /// agents to the others ([`Server::hand_off`](crate::Server::hand_off)),
    /// asking at most this many a second...
    pub hand_off_rate: u32,
    /// ...and waiting at most this long for them to go (zero: no hand-off).
    pub hand_off_timeout: Duration,
}

impl ServerConfig {
    pub fn new(state_dir: impl Into<PathBuf>, gateway_url: impl Into<String>) -> Self {
        Self {
            state_dir: state_dir.into(),
            gateway_url: gateway_url.into(),
            gateway_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            server_id: "tower-server".into(),
            keepalive_interval: Duration::from_secs(10),
            keepalive_max: 3,
            store_poll: Duration::from_secs(1),
            max_ssh_connections: 10_000,
            ssh_auth_timeout: Duration::from_secs(20),
            max_unauthenticated_ssh: 256,
            max_unauthenticated_ssh_per_source: 32,
            gateway_tls_timeout: Duration::from_secs(10),
            max_gateway_handshakes: 1024,
            max_gateway_handshakes_per_source: 64,
            gateway_header_read_timeout: Duration::from_secs(30),
            gateway_client_bound_to_cluster: true,
            cluster_listen_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            client_streams: crate::gateway::DEFAULT_CLIENT_STREAMS,
            cluster_streams: crate::gateway::DEFAULT_CLUSTER_STREAMS,
            peer_address: None,
            hand_off_rate: 100,
            hand_off_timeout: Duration::from_secs(20),
        }
    }
}
