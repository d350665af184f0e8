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
use tokio::io::{AsyncReadExt, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_proto::hello::{self, LineError, ProtocolVersion, Reply};
use tower_proto::http::Body;
use tower_proto::names::{
    CAP_CALLER_CREDENTIAL, CAP_H2, CONTROL_SUBSYSTEM, FORWARD_PORT, KNOWN_UPSTREAMS,
};
use tower_proto::token::host_key_fingerprint;
use tower_proto::{Hello, JoinToken, TokenError, tunnel};

pub use upstream::{Upstream, UpstreamConfig};

/// How long the server has to answer the agent's hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the join token comes from. A file is re-read on every reconnect.
#[derive(Clone)]
pub enum TokenSource {
    File(PathBuf),
    Literal(String),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Literal(_) => f.write_str("Literal(<redacted>)"),
        }
    }
}

impl TokenSource {
    fn load(&self) -> Result<JoinToken, AgentError> {
        let text = match self {
            TokenSource::File(p) => {
                std::fs::read_to_string(p).map_err(|source| AgentError::TokenFile {
                    path: p.clone(),
                    source,
                })?
            }
            TokenSource::Literal(s) => s.clone(),
        };
        Ok(JoinToken::parse(&text)?)
    }
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
        "host key mismatch: server {addr} presented {presented}, but the join token pins {pinned}; \
         refusing to connect (the server may be impersonated, or its key was replaced: get a new join token)"
    )]
    HostKeyMismatch {
        addr: String,
        presented: String,
        pinned: String,
    },
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
        Ok(Self {
            config,
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
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), AgentError> {
        let token = self.config.token.load()?;
        let cluster = token.claims.cluster.clone();
        let mut last_err = AgentError::NoServer;
        for addr in &token.claims.servers {
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.dial(addr, &token) => r,
            };
            match dialed {
                Ok((handle, ended, drain)) => {
                    return self
                        .established(addr, handle, ended, drain, &cluster, shutdown)
                        .await;
                }
                Err(e @ AgentError::HostKeyMismatch { .. }) => return Err(e),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    async fn dial(
        &self,
        addr: &str,
        token: &JoinToken,
    ) -> Result<
        (
            client::Handle<AgentHandler>,
            Arc<Mutex<Option<String>>>,
            Drain,
        ),
        AgentError,
    > {
        let dial_err = |reason: DialError| AgentError::Dial {
            addr: addr.to_string(),
            reason,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| dial_err(DialError::Timeout))?
        .map_err(|e| dial_err(e.into()))?;
        let _ = tcp.set_nodelay(true);
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
            maximum_packet_size: 32 * 1024,
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
        let ended = Arc::new(Mutex::new(None));
        let drain = Drain::default();
        let handler = AgentHandler {
            pinned: token.claims.host_key.clone(),
            mismatch: mismatch.clone(),
            ended: ended.clone(),
            upstreams: self.upstreams.clone(),
            metrics: self.metrics.clone(),
            drain: drain.clone(),
            max_streams: self.config.max_streams,
        };
        let connect = client::connect_stream(config, tcp, handler);
        let mut handle = match tokio::time::timeout(Duration::from_secs(15), connect).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                if let Some(presented) = mismatch.lock().expect("poisoned").take() {
                    return Err(AgentError::HostKeyMismatch {
                        addr: addr.to_string(),
                        presented,
                        pinned: token.claims.host_key.clone(),
                    });
                }
                return Err(e.into());
            }
            Err(_) => return Err(dial_err(DialError::HandshakeTimeout)),
        };
        let auth = handle
            .authenticate_password(token.claims.cluster.clone(), token.credential().expose())
            .await?;
        if !auth.success() {
            return Err(AgentError::AuthRefused {
                cluster: token.claims.cluster.clone(),
            });
        }
        Ok((handle, ended, drain))
    }

    async fn established(
        &self,
        addr: &str,
        handle: client::Handle<AgentHandler>,
        ended: Arc<Mutex<Option<String>>>,
        inflight: Drain,
        cluster: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), AgentError> {
        let channel = handle.channel_open_session().await?;
        channel.request_subsystem(true, CONTROL_SUBSYSTEM).await?;
        let mut names: Vec<String> = self.upstreams.keys().cloned().collect();
        names.sort();
        let hello = Hello {
            protocol: ProtocolVersion::CURRENT,
            agent_version: tower_proto::VERSION.to_string(),
            capabilities: vec![CAP_H2.to_string(), CAP_CALLER_CREDENTIAL.to_string()],
            upstreams: names.clone(),
            facts: Default::default(),
        };
        let mut control = BufReader::new(channel.into_stream());
        hello::write_message(control.get_mut(), &hello).await?;
        let ended_reason = || ended.lock().expect("poisoned").clone();
        match hello::read_message::<Reply, _>(&mut control, WELCOME_TIMEOUT).await {
            Ok(Reply::Welcome(w)) => {
                ProtocolVersion::CURRENT.check_peer(w.protocol)?;
                tracing::debug!(server_version = %w.server_version, "welcomed");
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
        for name in &names {
            handle
                .tcpip_forward(name.clone(), FORWARD_PORT)
                .await
                .map_err(|e| AgentError::Refused(format!("forwarding {name} refused: {e}")))?;
        }
        tracing::info!(server = addr, %cluster, upstreams = ?names, "tunnel established");
        self.state.send_replace(AgentState::Connected {
            server: addr.to_string(),
        });
        self.metrics.connected.set(1);
        // The control channel stays open for the life of the session.
        tokio::select! {
            _ = drain(&mut control) => {}
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
                return Ok(());
            }
        }
        Err(AgentError::Ended(
            ended_reason().unwrap_or_else(|| "connection to the server lost".into()),
        ))
    }
}

// === impl AgentHandler ===

struct AgentHandler {
    pinned: String,
    mismatch: Arc<Mutex<Option<String>>>,
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
        let ends = Box::pin(self.started.clone().cancelled_owned());
        resp.map(|body| {
            http_body_util::BodyExt::boxed_unsync(EndsOnDrain {
                inner: body,
                ends,
                at_boundary: true,
                draining: false,
            })
        })
    }
}

/// A watch body that ends at the first event boundary (a newline-terminated
/// frame) after draining starts.
struct EndsOnDrain {
    inner: Body,
    ends: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    at_boundary: bool,
    draining: bool,
}

impl hyper::body::Body for EndsOnDrain {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if !self.draining && self.ends.as_mut().poll(cx).is_ready() {
            self.draining = true;
        }
        if self.draining && self.at_boundary {
            return Poll::Ready(None);
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && !data.is_empty()
        {
            self.at_boundary = data.ends_with(b"\n");
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
        if presented == self.pinned {
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

/// Reads and discards until EOF or error.
async fn drain<R: tokio::io::AsyncRead + Unpin>(r: &mut R) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
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
    let io = TokioIo::new(channel.into_stream());
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
