//! A Tower server: its state shared by the listeners, what it runs, and the
//! tasks it spawns, which shutdown waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_certs::{Ca, HostKey};

use crate::config::ServerConfig;
use crate::tokens::{FileStore, TokenStore, Verdict};
use crate::tunnel::{AuthLimiter, Registry, Session};
use crate::{gateway, kubeconfig, metrics, peer, tunnel};

/// State shared by the listeners.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) ca: Ca,
    pub(crate) host_key: HostKey,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) registry: Registry,
    pub(crate) limiter: AuthLimiter,
    pub(crate) gateway_tls: Arc<rustls::ServerConfig>,
    /// TLS of the agents' WebSocket port (`wss://`): the gateway's serving
    /// certificate, no client certificate.
    pub(crate) agent_tls: Arc<rustls::ServerConfig>,
    /// The per-cluster listeners of KubeSphere mode.
    pub(crate) cluster_listeners: gateway::ClusterListeners,
    /// Requests in flight through each cluster's tunnel, per client.
    pub(crate) shares: gateway::Shares,
    /// Other replicas, for requests whose session one of them holds.
    pub(crate) peers: peer::Peers,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) prometheus: std::sync::Mutex<Option<prometheus_client::registry::Registry>>,
    pub(crate) running: AtomicBool,
    /// Set while this replica hands its agents off: new sessions are turned
    /// away.
    pub(crate) handing_off: AtomicBool,
    /// Every task the server spawns (connections, sessions' HTTP/2
    /// connections, spliced upgrades); shutdown waits for them.
    pub(crate) tasks: TaskTracker,
    /// Fires when the server shuts down, for tasks that outlive a request.
    pub(crate) shutdown: CancellationToken,
}

/// The listeners a server runs.
pub struct Listeners {
    /// Raw SSH from agents.
    pub ssh: TcpListener,
    /// The HTTPS gateway for clients.
    pub gateway: TcpListener,
    /// SSH inside a WebSocket from agents, `ws://` and `wss://` on one port.
    pub websocket: Option<TcpListener>,
    /// Forwarded requests from other replicas (with
    /// [`ServerConfig::peer_address`]).
    pub peer: Option<TcpListener>,
}

/// A Tower server, ready to run.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

/// File name of the SSH host key inside the state dir.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// How long a stopping server waits for its tasks: longer than an SSH
/// connection's goodbye and a cut session's grace.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

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
        let gateway_tls = Arc::new(gateway::tls_config(
            ca.cert_pem(),
            &serving,
            gateway::ClientCert::Required,
        )?);
        let agent_tls = Arc::new(gateway::tls_config(
            ca.cert_pem(),
            &serving,
            gateway::ClientCert::None,
        )?);
        anyhow::ensure!(
            (1..=gateway::MAX_CLUSTER_STREAMS).contains(&config.cluster_streams),
            "--cluster-streams must be 1 to {}, got {}",
            gateway::MAX_CLUSTER_STREAMS,
            config.cluster_streams
        );
        anyhow::ensure!(
            (1..=config.cluster_streams).contains(&config.client_streams),
            "--client-streams must be 1 to --cluster-streams ({}), got {}",
            config.cluster_streams,
            config.client_streams
        );
        let shares = gateway::Shares::new(config.client_streams, config.cluster_streams);
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(metrics::Metrics::new(&mut prometheus));
        let tasks = TaskTracker::new();
        let peers = peer::Peers::new(
            &ca,
            &config.server_id,
            config.peer_address.is_some(),
            metrics.clone(),
            tasks.clone(),
        )?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                ca,
                host_key,
                store,
                registry: Registry::with_metrics(metrics.clone()),
                limiter: Default::default(),
                gateway_tls,
                agent_tls,
                cluster_listeners: Default::default(),
                shares,
                peers,
                metrics,
                prometheus: std::sync::Mutex::new(Some(prometheus)),
                running: Default::default(),
                handing_off: Default::default(),
                tasks,
                shutdown: CancellationToken::new(),
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

    /// Base URL clients use to reach the gateway.
    pub fn gateway_url(&self) -> &str {
        &self.shared.config.gateway_url
    }

    /// Where the gateway looks up which replica holds a cluster's session
    /// (peer forwarding; set once).
    pub fn set_owner_book(&self, book: Arc<dyn peer::OwnerBook>) {
        self.shared.peers.set_book(book);
    }

    /// Hands this replica's agents to the others before it goes: new
    /// sessions are turned away from now on; each agent that can move
    /// ([`tower_proto::names::CAP_MOVE`]) is asked to, at most `rate` a
    /// second, and opens a new session before it leaves this one; the others
    /// are disconnected (they reconnect elsewhere). Waits up to `limit` for
    /// the sessions here to end; returns how many were asked and how many
    /// were still here.
    pub async fn hand_off(&self, rate: u32, limit: std::time::Duration) -> (usize, usize) {
        let shared = &self.shared;
        shared.handing_off.store(true, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let sessions = shared.registry.all();
        if sessions.is_empty() {
            return (0, 0);
        }
        tracing::info!(
            sessions = sessions.len(),
            rate,
            "handing agents off to the other replicas"
        );
        let pace = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let mut asked = 0;
        for session in &sessions {
            if started.elapsed() >= limit {
                break;
            }
            if session.can_move() {
                session.request_move();
                asked += 1;
            } else {
                shared.end_session(session.clone(), tunnel::HANDING_OFF.to_string());
            }
            shared.metrics.hand_offs.inc();
            tokio::time::sleep(pace).await;
        }
        let mut changed = shared.registry.subscribe();
        loop {
            let left = shared.registry.all().len();
            if left == 0 {
                break;
            }
            let remaining = limit.saturating_sub(started.elapsed());
            if remaining.is_zero()
                || tokio::time::timeout(remaining, changed.changed())
                    .await
                    .is_err()
            {
                break;
            }
        }
        let left = shared.registry.all().len();
        tracing::info!(
            asked,
            left,
            took = ?started.elapsed(),
            "hand-off done"
        );
        (asked, left)
    }

    /// Ends `cluster`'s session, if any, telling its agent `why`.
    pub fn end_session(&self, cluster: &str, why: &str) {
        if let Some(session) = self.shared.registry.get(cluster) {
            self.shared.end_session(session, why.to_string());
        }
    }

    /// A kubeconfig for `cluster` through this server's gateway.
    pub fn kubeconfig(&self, cluster: &str) -> anyhow::Result<String> {
        self.kubeconfig_with_validity(cluster, kubeconfig::CLIENT_CERT_VALIDITY)
    }

    /// A kubeconfig for `cluster` whose client certificate is valid for `validity`.
    pub fn kubeconfig_with_validity(
        &self,
        cluster: &str,
        validity: Duration,
    ) -> anyhow::Result<String> {
        kubeconfig::render_with_validity(
            &self.shared.ca,
            self.gateway_url(),
            cluster,
            &kubeconfig::default_identity(cluster),
            validity,
        )
    }

    /// A kubeconfig for `cluster` reached at `server` (its kube listener in
    /// KubeSphere mode), the client certificate valid for `validity`.
    pub fn kubeconfig_at(
        &self,
        server: &str,
        cluster: &str,
        validity: Duration,
    ) -> anyhow::Result<String> {
        kubeconfig::render_at(
            &self.shared.ca,
            server,
            cluster,
            &kubeconfig::default_identity(cluster),
            validity,
        )
    }

    /// Whether `yaml` names `server`, the tower CA, and a client certificate
    /// from it valid for at least `min_remaining`.
    pub fn kubeconfig_still_good_at(
        &self,
        yaml: &[u8],
        server: &str,
        min_remaining: Duration,
    ) -> bool {
        kubeconfig::still_good_at(yaml, &self.shared.ca, server, min_remaining)
    }

    pub(crate) fn metrics(&self) -> &metrics::Metrics {
        &self.shared.metrics
    }

    /// The server's settings.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Whether `yaml` is a kubeconfig for `cluster` this server would still
    /// issue, with at least `min_remaining` left on its certificate.
    pub fn kubeconfig_still_good(
        &self,
        yaml: &[u8],
        cluster: &str,
        min_remaining: Duration,
    ) -> bool {
        kubeconfig::still_good(
            yaml,
            &self.shared.ca,
            self.gateway_url(),
            cluster,
            min_remaining,
        )
    }

    /// Binds `cluster`'s kube and ks listeners on `ports` (KubeSphere mode),
    /// the kube one serving a certificate for `hosts`; rebinds on new ports.
    pub fn ensure_cluster_listeners(
        &self,
        cluster: &str,
        ports: gateway::ClusterPorts,
        hosts: Vec<String>,
    ) -> anyhow::Result<()> {
        self.shared
            .cluster_listeners
            .ensure(&self.shared, cluster, ports, hosts)
    }

    /// Closes the per-cluster listeners of every cluster `keep` refuses.
    pub fn retain_cluster_listeners(&self, keep: impl Fn(&str) -> bool) {
        self.shared.cluster_listeners.retain(keep)
    }

    /// The ports `cluster`'s listeners are bound on, if any.
    pub fn cluster_ports(&self, cluster: &str) -> Option<gateway::ClusterPorts> {
        self.shared.cluster_listeners.ports(cluster)
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
                if shared.running.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("listeners not running yet".into())
                }
            }),
        };
        tower_ops::serve(listener, Arc::new(ops), shutdown).await;
    }

    /// Runs the SSH listener, the gateway and the token re-checker until
    /// `shutdown`, then waits (up to [`SHUTDOWN_WAIT`]) for every task they
    /// spawned to end.
    pub async fn run(
        self,
        ssh: TcpListener,
        gateway: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.run_with(
            Listeners {
                ssh,
                gateway,
                websocket: None,
                peer: None,
            },
            shutdown,
        )
        .await
    }

    /// Like [`Server::run`], with every listener the server may have.
    pub async fn run_with(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Listeners {
            ssh,
            gateway,
            websocket,
            peer,
        } = listeners;
        tracing::info!(
            ssh = %ssh.local_addr()?,
            gateway = %gateway.local_addr()?,
            websocket = ?websocket.as_ref().map(TcpListener::local_addr).transpose()?,
            host_key = %self.host_key_fingerprint(),
            "tower server listening"
        );
        let shared = &self.shared;
        let tasks = &shared.tasks;
        tasks.spawn(tunnel::serve(
            shared.clone(),
            ssh,
            websocket,
            shutdown.clone(),
        ));
        tasks.spawn(gateway::serve(shared.clone(), gateway, shutdown.clone()));
        if let Some(listener) = peer {
            let address = shared.config.peer_address.as_deref().ok_or_else(|| {
                anyhow::anyhow!("a peer listener needs the address peers reach it at")
            })?;
            let tls = peer::tls(&shared.ca, peer::address_host(address))?;
            tracing::info!(peer = %listener.local_addr()?, %address, "peer listener");
            tasks.spawn(peer::serve(
                shared.clone(),
                listener,
                Arc::new(tls),
                shutdown.clone(),
            ));
        }
        tasks.spawn(recheck_tokens(shared.clone(), shutdown.clone()));
        shared.running.store(true, Ordering::Relaxed);
        shutdown.cancelled().await;
        shared.running.store(false, Ordering::Relaxed);
        shared.shutdown.cancel();
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tasks.len(),
                "server tasks still running after {SHUTDOWN_WAIT:?}; leaving them"
            );
        }
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
            let why = format!("{}; mint a new join token with towerctl", verdict.reason());
            shared.end_session(session, why);
        }
    }
}

impl Shared {
    /// Takes `session` out of the registry at once (the gateway refuses new
    /// requests for it from now on) and says goodbye to its agent with `why`
    /// in the background.
    fn end_session(&self, session: Arc<Session>, why: String) {
        self.registry.remove(&session.cluster, session.id);
        self.tasks
            .spawn(async move { session.disconnect(&why).await });
    }
}
