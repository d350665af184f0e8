//! Tower server: the host side of the reverse tunnel.
//!
//! Agents in member clusters dial the SSH listener ([`ssh`]); each becomes a
//! [`session::Session`] in the [`session::Registry`]. Clients reach members
//! through the HTTPS [`gateway`], which routes by path ([`route`]) and carries
//! requests through the session. [`kubeconfig`] renders what clients use, and
//! [`store`] keeps join tokens (digests only).
//!
//! `main.rs` stays thin: tests bind `127.0.0.1:0` and call [`Server::run`].
#![forbid(unsafe_code)]

mod admission;
pub mod controller;
pub mod crd;
pub mod gateway;
pub mod kube_state;
pub mod kube_store;
pub mod kubeconfig;
pub mod lease;
pub mod metrics;
pub mod route;
pub mod session;
pub mod ssh;
pub mod status;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_certs::{Ca, HostKey};

use crate::session::Registry;
use crate::store::{FileStore, TokenStore, Verdict};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Holds the CA, the SSH host key and (for the file store) tokens.
    pub state_dir: PathBuf,
    /// Base URL clients use to reach the gateway, written into kubeconfigs.
    pub gateway_url: String,
    /// DNS names and IPs for the gateway's serving certificate.
    pub gateway_hosts: Vec<String>,
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
}

impl ServerConfig {
    pub fn new(state_dir: impl Into<PathBuf>, gateway_url: impl Into<String>) -> Self {
        Self {
            state_dir: state_dir.into(),
            gateway_url: gateway_url.into(),
            gateway_hosts: vec!["localhost".into(), "127.0.0.1".into()],
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
        }
    }
}

/// State shared by the listeners.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) ca: Ca,
    pub(crate) host_key: HostKey,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) registry: Registry,
    pub(crate) limiter: ssh::AuthLimiter,
    pub(crate) gateway_tls: Arc<rustls::ServerConfig>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) prometheus: std::sync::Mutex<Option<prometheus_client::registry::Registry>>,
    pub(crate) running: std::sync::atomic::AtomicBool,
}

/// A Tower server, ready to run.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

/// File name of the SSH host key inside the state dir.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

impl Server {
    /// Opens the state dir: loads or creates the CA and host key, and uses the
    /// file token store there.
    pub fn open(config: ServerConfig) -> anyhow::Result<Self> {
        let store = Arc::new(FileStore::open(&config.state_dir)?);
        Self::with_store(config, store)
    }

    /// Like [`Server::open`], with another token store.
    pub fn with_store(config: ServerConfig, store: Arc<dyn TokenStore>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.state_dir)?;
        let ca = Ca::load_or_create(&config.state_dir, "tower-ca")?;
        let host_key = HostKey::load_or_create(&config.state_dir.join(HOST_KEY_FILE))?;
        let hosts: Vec<&str> = config.gateway_hosts.iter().map(String::as_str).collect();
        let serving = ca.issue_server(&hosts, Duration::from_secs(365 * 24 * 3600))?;
        let gateway_tls = Arc::new(gateway::tls_config(ca.cert_pem(), &serving)?);
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(metrics::Metrics::new(&mut prometheus));
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                ca,
                host_key,
                store,
                registry: Registry::with_metrics(metrics.clone()),
                limiter: Default::default(),
                gateway_tls,
                metrics,
                prometheus: std::sync::Mutex::new(Some(prometheus)),
                running: Default::default(),
            }),
        })
    }

    pub fn host_key_fingerprint(&self) -> String {
        self.shared.host_key.fingerprint()
    }

    pub fn ca_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Ends `cluster`'s sessions whose token is no longer valid, without
    /// waiting for the next store poll.
    pub fn recheck_sessions(&self, cluster: &str) {
        end_invalid_sessions(&self.shared, Some(cluster));
    }

    /// A kubeconfig for `cluster` through this server's gateway.
    pub fn kubeconfig(&self, cluster: &str) -> anyhow::Result<String> {
        kubeconfig::render(
            &self.shared.ca,
            &self.shared.config.gateway_url,
            cluster,
            &kubeconfig::default_identity(cluster),
        )
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `shutdown`.
    /// Ready once [`Server::run`] has started. Call at most once per server.
    pub async fn serve_ops(&self, listener: TcpListener, shutdown: CancellationToken) {
        let Some(registry) = self.shared.prometheus.lock().expect("poisoned").take() else {
            tracing::warn!("ops endpoints already served");
            return;
        };
        let shared = self.shared.clone();
        let ops = tower_ops::Ops {
            registry,
            ready: Box::new(move || {
                if shared.running.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("listeners not running yet".into())
                }
            }),
        };
        tower_ops::serve(listener, Arc::new(ops), shutdown).await;
    }

    /// Runs the SSH listener, the gateway and the token re-checker until `shutdown`.
    pub async fn run(
        self,
        ssh: TcpListener,
        gateway: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        tracing::info!(
            ssh = %ssh.local_addr()?,
            gateway = %gateway.local_addr()?,
            host_key = %self.host_key_fingerprint(),
            "tower server listening"
        );
        let ssh_task = tokio::spawn(ssh::serve(self.shared.clone(), ssh, shutdown.clone()));
        let gw_task = tokio::spawn(gateway::serve(
            self.shared.clone(),
            gateway,
            shutdown.clone(),
        ));
        let shared = self.shared.clone();
        let poll = tokio::spawn(recheck_tokens(shared, shutdown.clone()));
        self.shared
            .running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        shutdown.cancelled().await;
        self.shared
            .running
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::join!(ssh_task, gw_task, poll);
        Ok(())
    }
}

/// Re-reads the token store and ends sessions whose token is no longer valid.
async fn recheck_tokens(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.store_poll);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = shared.store.refresh() {
            tracing::warn!(error = %e, "token store refresh failed");
            continue;
        }
        end_invalid_sessions(&shared, None);
    }
}

/// Ends the sessions (of `cluster`, or of every cluster) whose token the store
/// no longer accepts. They leave the registry at once, so the gateway refuses
/// new requests before this returns; the SSH goodbye happens in the background.
fn end_invalid_sessions(shared: &Shared, cluster: Option<&str>) {
    for session in shared.registry.all() {
        if cluster.is_some_and(|c| c != session.cluster) {
            continue;
        }
        let verdict = shared.store.recheck(&session.cluster, &session.token_id);
        if !matches!(verdict, Verdict::Valid { .. }) {
            tracing::warn!(cluster = %session.cluster, reason = verdict.reason(), "ending session");
            shared.registry.remove(&session.cluster, session.id);
            let why = format!("{}; mint a new join token with towerctl", verdict.reason());
            tokio::spawn(async move { session.disconnect(&why).await });
        }
    }
}

/// Runs the server wired to Kubernetes: identity from Secrets, tokens from
/// proxy Clusters and Agents, and the controller that writes kubeconfigs and
/// conditions back. `config.state_dir` is used as a scratch copy of the identity.
pub async fn run_with_kubernetes(
    config: ServerConfig,
    controller_config: controller::ControllerConfig,
    client: kube::Client,
    ssh: TcpListener,
    gateway: TcpListener,
    ops: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    kube_state::sync_identity(&client, &controller_config.namespace, &config.state_dir).await?;
    let store = Arc::new(kube_store::KubeTokenStore::default());
    let server = Server::with_store(config, store.clone())?;
    if let Some(ops) = ops {
        let (server, shutdown) = (server.clone(), shutdown.clone());
        tokio::spawn(async move { server.serve_ops(ops, shutdown).await });
    }
    let ctrl = tokio::spawn(controller::run(
        server.clone(),
        client,
        store,
        controller_config,
        shutdown.clone(),
    ));
    server.run(ssh, gateway, shutdown).await?;
    ctrl.await??;
    Ok(())
}
