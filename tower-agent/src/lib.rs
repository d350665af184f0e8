//! Tower agent: the member side of the reverse tunnel.
//!
//! The agent dials the server named in its join token, pins the server's host
//! key from the token, authenticates with the token, says hello on the control
//! channel, and asks for standard SSH remote forwarding of each upstream it
//! serves. Each `forwarded-tcpip` channel the server opens carries an HTTP/2
//! connection that [`upstream::Upstream`] serves with the agent's own
//! credentials. The session is kept alive with keepalives and re-established
//! with capped, jittered exponential backoff; the token is re-read each time.
#![forbid(unsafe_code)]

pub mod metrics;
pub mod pin;
pub mod proxy;
pub mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use hyper::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use russh::client::{self, ChannelOpenHandle, DisconnectReason, Msg};
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelOpenFailure};
use tokio::io::BufReader;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_proto::hello::{self, LineError, NOTICE_MOVE, Notice, ProtocolVersion, Reply};
use tower_proto::http::Body;
use tower_proto::names::{
    CAP_CALLER_CREDENTIAL, CAP_H2, CAP_MOVE, CONTROL_SUBSYSTEM, FORWARD_PORT, KNOWN_UPSTREAMS,
    UPSTREAM_KUBE_APISERVER,
};
use tower_proto::token::host_key_fingerprint;
use tower_proto::{Hello, JoinToken, TokenError, tunnel};

pub use proxy::{Proxy, ProxySettings};
use tower_proto::transport::{BoxIo, ServerAddr, TransportError};
pub use upstream::{Upstream, UpstreamConfig};

/// How long the server has to answer the agent's hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent's credential comes from. A file is re-read on every
/// reconnect.
#[derive(Clone)]
pub enum TokenSource {
    /// A join token in a file.
    File(PathBuf),
    /// A join token.
    Literal(String),
    /// KubeSphere's form: a cluster name, the bare token of the Cluster's
    /// `spec.connection.token`, and the server addresses. It pins no host
    /// key ([`AgentConfig::host_key`] or a first-use pin does).
    Bare {
        cluster: String,
        token: String,
        servers: Vec<String>,
    },
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            TokenSource::Bare {
                cluster, servers, ..
            } => f
                .debug_struct("Bare")
                .field("cluster", cluster)
                .field("servers", servers)
                .finish_non_exhaustive(),
        }
    }
}

/// What one connection attempt logs in with.
struct Login {
    servers: Vec<String>,
    cluster: String,
    /// The SSH password.
    password: tower_proto::Secret,
    /// The host key the credential itself pins (a join token's).
    pin: Option<String>,
}

impl TokenSource {
    fn load(&self) -> Result<Login, AgentError> {
        let text = match self {
            TokenSource::File(p) => {
                std::fs::read_to_string(p).map_err(|source| AgentError::TokenFile {
                    path: p.clone(),
                    source,
                })?
            }
            TokenSource::Literal(s) => s.clone(),
            TokenSource::Bare {
                cluster,
                token,
                servers,
            } => {
                return Ok(Login {
                    servers: servers.clone(),
                    cluster: cluster.clone(),
                    password: tower_proto::Secret::new(token.trim().to_string()),
                    pin: None,
                });
            }
        };
        let token = JoinToken::parse(&text)?;
        Ok(Login {
            password: token.credential(),
            pin: Some(token.claims.host_key.clone()),
            servers: token.claims.servers,
            cluster: token.claims.cluster,
        })
    }
}

/// The host key a connection attempt accepts.
#[derive(Clone, Debug)]
enum HostKeyPin {
    /// From the join token or `--host-key`.
    Given(String),
    /// Pinned on first use and kept in a store.
    Stored(String),
    /// Nothing pinned yet: the first key seen is accepted, then kept.
    FirstUse,
}

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub token: TokenSource,
    pub upstreams: Vec<UpstreamConfig>,
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long requests already in the tunnel may take to
    /// finish (new ones are refused, so the server answers 503 for them)
    /// before the connection is closed. Watches are cut when it runs out.
    pub drain_timeout: Duration,
    /// How long a request that is not a watch or an upgrade may wait for its
    /// upstream's response head before the client gets a `504` Status.
    pub upstream_timeout: Duration,
    /// Streams (requests) the agent serves at once on one tunnel channel; one
    /// upstream connection at most for each, so this bounds what a server can
    /// make the agent open.
    pub max_streams: u32,
    /// Which HTTP proxy each server address goes through.
    pub proxy: ProxySettings,
    /// CA bundle that verifies a `wss://` server's certificate; the system's
    /// roots when unset. The SSH host key is pinned on every transport.
    pub server_ca_file: Option<PathBuf>,
    /// The server's host-key fingerprint (`SHA256:…`), for a credential that
    /// pins none ([`TokenSource::Bare`]).
    pub host_key: Option<String>,
    /// Where a first-use pin is kept, for a credential that pins no host key
    /// when `host_key` is unset.
    pub pin_store: Option<pin::PinStoreConfig>,
    /// Server addresses that replace the join token's.
    pub servers_override: Option<Vec<String>>,
}

impl AgentConfig {
    pub fn new(token: TokenSource, upstreams: Vec<UpstreamConfig>) -> Self {
        Self {
            token,
            upstreams,
            keepalive_interval: Duration::from_secs(10),
            keepalive_max: 3,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            upstream_timeout: upstream::DEFAULT_RESPONSE_TIMEOUT,
            max_streams: tunnel::H2_MAX_STREAMS,
            proxy: ProxySettings::default(),
            server_ca_file: None,
            host_key: None,
            pin_store: None,
            servers_override: None,
        }
    }
}

/// Why a connection attempt or session ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: reading join token {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Token(#[from] TokenError),
    #[error("configuration: the join token names no server")]
    NoServer,
    #[error("cannot reach server {addr}: {reason}")]
    Dial { addr: String, reason: DialError },
    #[error(
        "host key mismatch: server {addr} presented {presented}, but {source_of_pin} pins {pinned}; \
         refusing to connect (the server may be impersonated, or its key was replaced: {hint})"
    )]
    HostKeyMismatch {
        addr: String,
        presented: String,
        pinned: String,
        /// What pins the key ("the join token", a pin store).
        source_of_pin: String,
        /// How to re-pin after a deliberate change.
        hint: String,
    },
    #[error("configuration: {0}")]
    Pin(String),
    #[error(
        "the server refused the join token for cluster {cluster:?}: it is wrong, expired or revoked; mint a new one with towerctl"
    )]
    AuthRefused { cluster: String },
    /// The server's own words.
    #[error("the server refused this agent: {0}")]
    Refused(String),
    /// The server's welcome was missing, malformed or of another major version.
    #[error("the server refused this agent: {0}")]
    Welcome(#[from] LineError),
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
    #[error("SSH: {0}")]
    Io(#[from] std::io::Error),
    #[error("session ended: {0}")]
    Ended(String),
}

/// Why the server could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("timed out after 10s")]
    Timeout,
    #[error("SSH handshake timed out")]
    HandshakeTimeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Address(#[from] tower_proto::transport::AddrError),
    #[error("{0}")]
    Proxy(#[from] proxy::ProxyError),
    #[error("TLS: {0} (a private CA? give its bundle with --server-ca-file)")]
    Tls(std::io::Error),
    #[error("{0}")]
    Transport(#[from] TransportError),
}

/// What the agent is doing now; observable through [`Agent::state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentState {
    Connecting,
    Connected { server: String },
    Failed(String),
    Stopped,
}

/// A Tower agent.
pub struct Agent {
    config: AgentConfig,
    /// Where a first-use pin is kept.
    pin_store: Option<pin::PinStore>,
    /// A first-use pin taken by this process (kept even if storing it failed).
    pinned_here: Mutex<Option<String>>,
    /// Verifies `wss://` servers.
    server_tls: Arc<rustls::ClientConfig>,
    upstreams: Arc<HashMap<String, Arc<Upstream>>>,
    state: watch::Sender<AgentState>,
    metrics: metrics::AgentMetrics,
}

impl Agent {
    pub fn new(config: AgentConfig) -> anyhow::Result<Self> {
        let mut upstreams = HashMap::new();
        for u in &config.upstreams {
            anyhow::ensure!(
                KNOWN_UPSTREAMS.contains(&u.name.as_str()),
                "unknown upstream {:?}; known: {KNOWN_UPSTREAMS:?}",
                u.name
            );
            let upstream = Upstream::new(u)?.with_response_timeout(config.upstream_timeout);
            upstreams.insert(u.name.clone(), Arc::new(upstream));
        }
        anyhow::ensure!(
            !upstreams.is_empty(),
            "the agent needs at least one upstream"
        );
        let server_tls = Arc::new(server_tls(config.server_ca_file.as_deref())?);
        let pin_store = config
            .pin_store
            .as_ref()
            .map(|c| pin::PinStore::new(c, upstreams.get(UPSTREAM_KUBE_APISERVER).cloned()))
            .transpose()?;
        if let Some(key) = &config.host_key {
            anyhow::ensure!(
                key.starts_with("SHA256:"),
                "--host-key must be a SHA256:… fingerprint, got {key:?}"
            );
        }
        Ok(Self {
            config,
            pin_store,
            pinned_here: Mutex::new(None),
            server_tls,
            upstreams: Arc::new(upstreams),
            state: watch::channel(AgentState::Connecting).0,
            metrics: Default::default(),
        })
    }

    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// Serves `/healthz`, `/readyz` (ready while connected) and `/metrics` on
    /// `listener` until `shutdown`.
    pub async fn serve_ops(&self, listener: tokio::net::TcpListener, shutdown: CancellationToken) {
        let mut registry = tower_ops::prometheus_client::registry::Registry::default();
        self.metrics.register(&mut registry);
        let state = self.state.subscribe();
        let ops = tower_ops::Ops {
            registry,
            ready: Box::new(move || match &*state.borrow() {
                AgentState::Connected { .. } => Ok(()),
                other => Err(format!("{other:?}")),
            }),
        };
        tower_ops::serve(listener, Arc::new(ops), shutdown).await;
    }

    /// Connects and reconnects until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut backoff = self.backoff();
        loop {
            self.state.send_replace(AgentState::Connecting);
            let started = Instant::now();
            // The session watches `shutdown` itself, to drain before it goes.
            let result = self.session(&shutdown).await;
            if shutdown.is_cancelled() {
                break;
            }
            self.metrics.connected.set(0);
            self.metrics.reconnects.inc();
            if let Ok(Some(moving)) = result {
                // Make before break: the old session serves on until a new
                // one is up, then drains.
                self.state.send_replace(AgentState::Connecting);
                let state = self.state.subscribe();
                tokio::spawn(moving.leave(state, self.config.drain_timeout, shutdown.clone()));
                backoff = self.backoff();
                continue;
            }
            let err = result
                .err()
                .unwrap_or_else(|| AgentError::Ended("closed".into()));
            tracing::warn!(error = %err, "tunnel session ended; reconnecting");
            self.state.send_replace(AgentState::Failed(err.to_string()));
            if started.elapsed() > Duration::from_secs(10) {
                backoff = self.backoff();
            }
            let delay = backoff.next().unwrap_or(self.config.backoff_max);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.state.send_replace(AgentState::Stopped);
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// One session: dial, verify, authenticate, hello, forward, serve until it ends.
    async fn session(&self, shutdown: &CancellationToken) -> Result<Option<Moving>, AgentError> {
        let mut login = self.config.token.load()?;
        if let Some(servers) = &self.config.servers_override {
            login.servers = servers.clone();
        }
        let pin = self.pin(&login).await?;
        let cluster = login.cluster.clone();
        let mut last_err = AgentError::NoServer;
        for addr in &login.servers {
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = self.dial(addr, &login, &pin) => r,
            };
            match dialed {
                Ok((handle, ended, drain, presented)) => {
                    return self
                        .established(
                            addr,
                            handle,
                            ended,
                            drain,
                            &cluster,
                            shutdown,
                            (&pin, presented),
                        )
                        .await;
                }
                Err(e @ AgentError::HostKeyMismatch { .. }) => return Err(e),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// The host key this attempt accepts: the credential's, `--host-key`,
    /// this process's first-use pin, the stored one, or (none anywhere)
    /// whatever the server presents first.
    async fn pin(&self, login: &Login) -> Result<HostKeyPin, AgentError> {
        if let Some(key) = login.pin.clone().or_else(|| self.config.host_key.clone()) {
            return Ok(HostKeyPin::Given(key));
        }
        if let Some(key) = self.pinned_here.lock().expect("poisoned").clone() {
            return Ok(HostKeyPin::Stored(key));
        }
        let Some(store) = &self.pin_store else {
            return Err(AgentError::Pin(
                "nothing pins the server's host key: give --host-key, or a pin store (--host-key-pin-file or --host-key-pin-secret)".into(),
            ));
        };
        match store.load().await {
            Ok(Some(key)) => Ok(HostKeyPin::Stored(key)),
            Ok(None) => Ok(HostKeyPin::FirstUse),
            // Connecting unverified because the store could not be read
            // would defeat the pin: wait and retry instead.
            Err(e) => Err(AgentError::Pin(format!(
                "cannot read the host-key pin from {}: {e:#}",
                store.describe()
            ))),
        }
    }

    fn mismatch(&self, addr: &str, presented: String, pin: &HostKeyPin) -> AgentError {
        let (pinned, source_of_pin, hint) = match pin {
            HostKeyPin::Given(k) if self.config.host_key.is_some() => (
                k.clone(),
                "--host-key".to_string(),
                "check the fingerprint tower-server logs at start and give that one".to_string(),
            ),
            HostKeyPin::Given(k) => (
                k.clone(),
                "the join token".to_string(),
                "get a new join token".to_string(),
            ),
            HostKeyPin::Stored(k) => {
                let store = self.pin_store.as_ref();
                (
                    k.clone(),
                    store.map_or("this agent's first-use pin".into(), |s| {
                        format!("the first-use pin in {}", s.describe())
                    }),
                    store.map_or("restart the agent to re-pin".into(), |s| s.repin_hint()),
                )
            }
            HostKeyPin::FirstUse => (String::new(), String::new(), String::new()),
        };
        AgentError::HostKeyMismatch {
            addr: addr.to_string(),
            presented,
            pinned,
            source_of_pin,
            hint,
        }
    }

    async fn dial(
        &self,
        addr: &str,
        login: &Login,
        pin: &HostKeyPin,
    ) -> Result<
        (
            client::Handle<AgentHandler>,
            Arc<Mutex<Option<String>>>,
            Drain,
            Option<String>,
        ),
        AgentError,
    > {
        let dial_err = |reason: DialError| AgentError::Dial {
            addr: addr.to_string(),
            reason,
        };
        let io = self.open(addr).await.map_err(dial_err)?;
        let config = Arc::new(client::Config {
            keepalive_interval: Some(self.config.keepalive_interval),
            keepalive_max: self.config.keepalive_max,
            // Keepalives find a silent server only while russh's session loop
            // runs; a write blocked on a blackholed server (full socket
            // buffers) would wait for TCP to give up, minutes later. This bounds
            // it. A live server answers keepalives, so idle sessions never hit it.
            inactivity_timeout: Some(
                self.config.keepalive_interval * (self.config.keepalive_max as u32 + 2),
            ),
            window_size: 8 * 1024 * 1024,
            maximum_packet_size: tower_proto::tunnel::SSH_MAX_PACKET,
            channel_buffer_size: 256,
            nodelay: true,
            // AES-GCM first: hardware AES makes it several times cheaper than
            // ChaCha20-Poly1305 (russh's default first choice) for bulk data.
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                ]),
                ..Default::default()
            },
            ..Default::default()
        });
        let mismatch = Arc::new(Mutex::new(None));
        let presented = Arc::new(Mutex::new(None));
        let ended = Arc::new(Mutex::new(None));
        let drain = Drain::default();
        let handler = AgentHandler {
            pinned: match pin {
                HostKeyPin::Given(k) | HostKeyPin::Stored(k) => Some(k.clone()),
                HostKeyPin::FirstUse => None,
            },
            mismatch: mismatch.clone(),
            presented: presented.clone(),
            ended: ended.clone(),
            upstreams: self.upstreams.clone(),
            metrics: self.metrics.clone(),
            drain: drain.clone(),
            max_streams: self.config.max_streams,
        };
        let connect = client::connect_stream(config, io, handler);
        let mut handle = match tokio::time::timeout(Duration::from_secs(15), connect).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                if let Some(presented) = mismatch.lock().expect("poisoned").take() {
                    return Err(self.mismatch(addr, presented, pin));
                }
                return Err(e.into());
            }
            Err(_) => return Err(dial_err(DialError::HandshakeTimeout)),
        };
        let auth = handle
            .authenticate_password(login.cluster.clone(), login.password.expose())
            .await?;
        if !auth.success() {
            return Err(AgentError::AuthRefused {
                cluster: login.cluster.clone(),
            });
        }
        let presented = presented.lock().expect("poisoned").take();
        Ok((handle, ended, drain, presented))
    }

    /// Opens the byte stream SSH runs on to `addr`: TCP (directly or
    /// through a proxy), TLS for `wss://`, then the address's transport.
    async fn open(&self, addr: &str) -> Result<BoxIo, DialError> {
        let addr = ServerAddr::parse(addr)?;
        let tcp = match self.config.proxy.for_addr(&addr) {
            Some(proxy) => proxy.connect(&addr.authority()).await?,
            None => tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr.authority()),
            )
            .await
            .map_err(|_| DialError::Timeout)??,
        };
        let _ = tcp.set_nodelay(true);
        let io: BoxIo = if addr.tls() {
            let name = rustls_pki_types::ServerName::try_from(addr.host().to_string())
                .map_err(|e| DialError::Tls(std::io::Error::other(e)))?;
            let tls = tokio_rustls::TlsConnector::from(self.server_tls.clone());
            let handshake = tls.connect(name, tcp);
            Box::new(
                tokio::time::timeout(Duration::from_secs(10), handshake)
                    .await
                    .map_err(|_| DialError::Timeout)?
                    .map_err(DialError::Tls)?,
            )
        } else {
            Box::new(tcp)
        };
        let transport = addr.transport();
        Ok(
            tokio::time::timeout(Duration::from_secs(10), transport.connect(io, &addr))
                .await
                .map_err(|_| DialError::Timeout)??,
        )
    }

    /// Keeps the key of a server that welcomed this agent on first contact,
    /// saying loudly that this contact was not verified.
    async fn first_use(&self, addr: &str, key: String) {
        *self.pinned_here.lock().expect("poisoned") = Some(key.clone());
        let Some(store) = &self.pin_store else { return };
        let saved = store.save(&key, addr).await;
        tracing::warn!(
            server = addr,
            host_key = %key,
            pin = %store.describe(),
            saved = saved.is_ok(),
            "FIRST CONTACT WITH THE SERVER WAS NOT VERIFIED (trust on first use): nothing pinned its host key, \
             so the key it presented is pinned from now on and a different one is refused; compare it with \
             the fingerprint tower-server logs at start"
        );
        if let Err(e) = saved {
            tracing::error!(
                error = %format!("{e:#}"),
                pin = %store.describe(),
                "cannot keep the host-key pin; it holds only until this agent restarts"
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn established(
        &self,
        addr: &str,
        handle: client::Handle<AgentHandler>,
        ended: Arc<Mutex<Option<String>>>,
        inflight: Drain,
        cluster: &str,
        shutdown: &CancellationToken,
        (pin, presented): (&HostKeyPin, Option<String>),
    ) -> Result<Option<Moving>, AgentError> {
        let channel = handle.channel_open_session().await?;
        channel.request_subsystem(true, CONTROL_SUBSYSTEM).await?;
        let mut names: Vec<String> = self.upstreams.keys().cloned().collect();
        names.sort();
        let hello = Hello {
            protocol: ProtocolVersion::CURRENT,
            agent_version: tower_proto::VERSION.to_string(),
            capabilities: vec![
                CAP_H2.to_string(),
                CAP_CALLER_CREDENTIAL.to_string(),
                CAP_MOVE.to_string(),
            ],
            upstreams: names.clone(),
            facts: Default::default(),
        };
        let mut control = BufReader::new(channel.into_stream());
        hello::write_message(control.get_mut(), &hello).await?;
        let ended_reason = || ended.lock().expect("poisoned").clone();
        let server_id = &mut String::new();
        match hello::read_message::<Reply, _>(&mut control, WELCOME_TIMEOUT).await {
            Ok(Reply::Welcome(w)) => {
                ProtocolVersion::CURRENT.check_peer(w.protocol)?;
                tracing::debug!(server_version = %w.server_version, server_id = %w.server_id, "welcomed");
                *server_id = w.server_id;
            }
            Ok(Reply::Refusal(r)) => return Err(AgentError::Refused(r.refused)),
            // The connection ended (the server's goodbye says why) or said nothing.
            Err(LineError::Closed | LineError::Timeout(_) | LineError::Io(_)) => {
                return Err(AgentError::Refused(
                    ended_reason().unwrap_or_else(|| "no answer to hello".into()),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        if let (HostKeyPin::FirstUse, Some(key)) = (pin, presented) {
            self.first_use(addr, key).await;
        }
        for name in &names {
            handle
                .tcpip_forward(name.clone(), FORWARD_PORT)
                .await
                .map_err(|e| AgentError::Refused(format!("forwarding {name} refused: {e}")))?;
        }
        tracing::info!(server = addr, %server_id, %cluster, upstreams = ?names, "tunnel established");
        self.state.send_replace(AgentState::Connected {
            server: addr.to_string(),
        });
        self.metrics.connected.set(1);
        // The control channel stays open for the life of the session; the
        // server may ask the agent to move on it.
        tokio::select! {
            moved = notices(&mut control) => if moved {
                tracing::info!(%server_id, "the server is going away and asked this agent to move; connecting anew before leaving it");
                return Ok(Some(Moving {
                    handle,
                    inflight,
                    _control: control,
                    server_id: std::mem::take(server_id),
                }));
            },
            _ = shutdown.cancelled() => {
                // Drain: refuse new channels, let each open one finish its
                // requests (HTTP/2 GOAWAY), then say goodbye.
                let started = Instant::now();
                let unfinished = inflight.run(self.config.drain_timeout).await;
                tracing::info!(
                    took = ?started.elapsed(),
                    cut = unfinished,
                    "drained the tunnel; disconnecting"
                );
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "agent shutting down", "en")
                    .await;
                return Ok(None);
            }
        }
        Err(AgentError::Ended(
            ended_reason().unwrap_or_else(|| "connection to the server lost".into()),
        ))
    }
}

// === impl AgentHandler ===

struct AgentHandler {
    /// The fingerprint accepted; `None`: any (first use).
    pinned: Option<String>,
    mismatch: Arc<Mutex<Option<String>>>,
    /// The fingerprint the server presented.
    presented: Arc<Mutex<Option<String>>>,
    ended: Arc<Mutex<Option<String>>>,
    upstreams: Arc<HashMap<String, Arc<Upstream>>>,
    metrics: metrics::AgentMetrics,
    drain: Drain,
    max_streams: u32,
}

/// A session's channels, so that a shutdown can let them finish.
///
/// Draining refuses new channels and sends GOAWAY on the open ones: requests
/// already sent are served to the last byte. Watches end at the next event
/// boundary and upgraded streams are cut, since they never finish on their
/// own; their clients resume them elsewhere.
#[derive(Clone, Default)]
struct Drain {
    started: CancellationToken,
    channels: tokio_util::task::TaskTracker,
    /// Tunnel channels whose close the server has not confirmed yet: until it
    /// does, their last bytes may still sit in the SSH layer's send queue.
    unclosed: Arc<(
        Mutex<std::collections::HashSet<russh::ChannelId>>,
        tokio::sync::Notify,
    )>,
}

impl Drain {
    /// Drains, waiting up to `limit` for every channel to finish and be closed
    /// by both sides; returns how many were still open when it ran out.
    async fn run(&self, limit: Duration) -> usize {
        self.started.cancel();
        self.channels.close();
        let all_closed = async {
            self.channels.wait().await;
            loop {
                let notified = self.unclosed.1.notified();
                if self.unclosed.0.lock().expect("poisoned").is_empty() {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, all_closed).await;
        self.unclosed.0.lock().expect("poisoned").len()
    }

    fn opened(&self, id: russh::ChannelId) {
        self.unclosed.0.lock().expect("poisoned").insert(id);
    }

    fn closed(&self, id: russh::ChannelId) {
        if self.unclosed.0.lock().expect("poisoned").remove(&id) {
            self.unclosed.1.notify_waiters();
        }
    }

    /// A watch's response ends cleanly once draining starts.
    fn end_watch_on_drain(&self, long_running: bool, resp: Response<Body>) -> Response<Body> {
        if !long_running {
            return resp;
        }
        let ends = self.started.clone().cancelled_owned();
        resp.map(|body| tower_proto::http::ends_at_boundary(body, ends))
    }
}

impl client::Handler for AgentHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.mismatch.lock().expect("poisoned") = Some("an SSH certificate".into());
            return Ok(false);
        };
        let presented = key
            .to_bytes()
            .map(|blob| host_key_fingerprint(&blob))
            .unwrap_or_else(|e| format!("an unreadable key ({e})"));
        *self.presented.lock().expect("poisoned") = Some(presented.clone());
        if self.pinned.as_ref().is_none_or(|p| *p == presented) {
            Ok(true)
        } else {
            *self.mismatch.lock().expect("poisoned") = Some(presented);
            Ok(false)
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(upstream) = self.upstreams.get(connected_address).cloned() else {
            tracing::warn!(
                requested = connected_address,
                "refusing a channel for an upstream outside the allow-list"
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        if self.drain.started.is_cancelled() {
            // Shutting down: the server answers this request 503.
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        }
        reply.accept().await;
        self.drain.opened(channel.id());
        self.drain.channels.spawn(serve_channel(
            channel,
            upstream,
            self.metrics.clone(),
            self.drain.clone(),
            self.max_streams,
        ));
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: russh::ChannelId,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.drain.closed(channel);
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!("server disconnected: {}", info.message)
            }
            DisconnectReason::Error(e) => format!("connection error: {e}"),
        };
        *self.ended.lock().expect("poisoned") = Some(text);
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// The TLS client config that verifies `wss://` servers: `ca_file`'s
/// certificates, or the system's roots.
fn server_tls(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading --server-ca-file {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert?)?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "--server-ca-file {} holds no certificate",
                path.display()
            );
        }
        None => {
            // A system without roots only matters for `wss://`, whose
            // handshake then fails with a message naming --server-ca-file.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Reads the control channel until it ends (`false`) or the server asks the
/// agent to move (`true`); lines it does not understand are ignored.
async fn notices<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> bool {
    loop {
        match hello::read_message::<Notice, _>(r, NOTICE_WAIT).await {
            Ok(n) if n.notice == NOTICE_MOVE => {
                if !n.reason.is_empty() {
                    tracing::info!(reason = %n.reason, "server notice");
                }
                return true;
            }
            Ok(n) => tracing::debug!(notice = %n.notice, "ignoring a server notice"),
            Err(LineError::Timeout(_) | LineError::Malformed(_) | LineError::TooLong) => {}
            Err(_) => return false,
        }
    }
}

/// How long one wait for a control line lasts before it is waited for again.
const NOTICE_WAIT: Duration = Duration::from_secs(3600);
/// How long a moving agent keeps its old session while no new one comes up.
const MOVE_WAIT: Duration = Duration::from_secs(30);
/// How long the old session still serves once the new one is up: time for
/// the new replica to record that it holds the session, so that requests
/// already routed to the old one still find it.
const MOVE_GRACE: Duration = Duration::from_secs(2);

/// A session the server asked the agent to leave, kept until a new one is up.
struct Moving {
    handle: client::Handle<AgentHandler>,
    inflight: Drain,
    _control: BufReader<russh::ChannelStream<Msg>>,
    server_id: String,
}

impl Moving {
    /// Serves on until the agent is connected again (or [`MOVE_WAIT`]), then
    /// [`MOVE_GRACE`], then drains and closes the old session.
    async fn leave(
        self,
        mut state: watch::Receiver<AgentState>,
        drain_timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let connected = state.wait_for(|s| matches!(s, AgentState::Connected { .. }));
        tokio::select! {
            _ = tokio::time::timeout(MOVE_WAIT, connected) => {}
            _ = shutdown.cancelled() => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(MOVE_GRACE) => {}
            _ = shutdown.cancelled() => {}
        }
        let unfinished = self.inflight.run(drain_timeout).await;
        tracing::info!(server_id = %self.server_id, cut = unfinished, "left the replica that asked this agent to move");
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "agent moved", "en")
            .await;
    }
}

/// Serves HTTP/2 (with extended CONNECT) on one forwarded channel.
async fn serve_channel(
    channel: Channel<Msg>,
    upstream: Arc<Upstream>,
    metrics: metrics::AgentMetrics,
    drain: Drain,
    max_streams: u32,
) {
    let io = TokioIo::new(tower_proto::tunnel::Gather::new(channel.into_stream()));
    metrics.channels.inc();
    let requests = metrics
        .requests
        .get_or_create(&metrics::UpstreamLabel {
            upstream: upstream.name.clone(),
        })
        .clone();
    let started = drain.started.clone();
    let service = service_fn(move |req| {
        let (upstream, drain) = (upstream.clone(), drain.clone());
        requests.inc();
        async move {
            let long_running = upstream::is_long_running(&req);
            let resp = upstream.serve(req, drain.started.clone()).await;
            Ok::<_, std::convert::Infallible>(drain.end_watch_on_drain(long_running, resp))
        }
    });
    let conn = tunnel::h2_server(max_streams).serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = started.cancelled() => {
            // GOAWAY: streams already sent are served, new ones go elsewhere.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    metrics.channels.dec();
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel channel ended");
    }
}
