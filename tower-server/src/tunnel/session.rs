//! A connected agent ([`Session`]) and the registry of sessions by cluster.
//!
//! A session carries requests to the agent's upstreams over SSH
//! `forwarded-tcpip` channels. With a Tower agent (hello advertised `h2`) each
//! upstream gets one long-lived HTTP/2 connection over one channel: every
//! request is an h2 stream with its own flow control, and the connection task
//! keeps draining the channel, so a stalled consumer never blocks the others.
//! Without a hello (a plain OpenSSH client standing in as agent) each request
//! gets its own channel and one HTTP/1.1 exchange.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_proto::Hello;
use tower_proto::http::{Body, empty};
use tower_proto::names::{CAP_CALLER_CREDENTIAL, CAP_H2, CAP_MOVE};
use tower_proto::tunnel;

use super::ChannelIo;
use crate::metrics::Metrics;

/// Why a request could not be carried to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the agent for cluster {cluster:?} does not serve {upstream}")]
    NoUpstream { cluster: String, upstream: String },
    #[error("could not open a tunnel channel to cluster {cluster:?}: {reason}")]
    Channel { cluster: String, reason: String },
    #[error(
        "cluster {cluster:?}'s session is on replica {replica:?}, which cannot be reached: {reason}"
    )]
    Peer {
        cluster: String,
        replica: String,
        reason: String,
    },
    #[error("cluster {cluster:?}'s session is moving between replicas; retry in a moment")]
    Moved { cluster: String },
    #[error("tunnel to cluster {cluster:?} failed: {source}")]
    Http {
        cluster: String,
        #[source]
        source: hyper::Error,
    },
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One authenticated agent connection.
pub struct Session {
    pub id: u64,
    pub cluster: String,
    pub token_id: String,
    pub peer: Option<SocketAddr>,
    pub connected_since: SystemTime,
    handle: russh::server::Handle,
    state: Mutex<State>,
    h2: tokio::sync::Mutex<HashMap<String, http2::SendRequest<Body>>>,
    /// Cancelled when the SSH connection ends.
    pub closed: CancellationToken,
    /// Cancelled when this replica asks the agent to move elsewhere.
    moving: CancellationToken,
    open_channels: Arc<AtomicUsize>,
    pub(super) metrics: std::sync::OnceLock<Arc<Metrics>>,
    /// The registry's change signal, set when the session is registered: the
    /// first round trip measured is a change observers care about (the
    /// Agent's status shows it), so it is written at once, not during a
    /// later quiet spell.
    pub(super) registry_changed: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
    /// The server's tasks, which shutdown waits for.
    tasks: TaskTracker,
    /// Receive window of each HTTP/2 connection to the agent, sized from the
    /// cluster share (`gateway::shares::tunnel_conn_window`).
    conn_window: u32,
}

#[derive(Default)]
struct State {
    upstreams: BTreeMap<String, u32>,
    hello: Option<Hello>,
    /// Round trip of the last tunnel channel open.
    rtt: Option<Duration>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("cluster", &self.cluster)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        cluster: String,
        token_id: String,
        peer: Option<SocketAddr>,
        handle: russh::server::Handle,
        tasks: TaskTracker,
        conn_window: u32,
    ) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cluster,
            token_id,
            peer,
            connected_since: SystemTime::now(),
            handle,
            state: Mutex::default(),
            h2: tokio::sync::Mutex::default(),
            closed: CancellationToken::new(),
            moving: CancellationToken::new(),
            open_channels: Arc::default(),
            metrics: std::sync::OnceLock::new(),
            registry_changed: std::sync::OnceLock::new(),
            tasks,
            conn_window,
        }
    }

    pub fn add_upstream(&self, name: &str, port: u32) {
        self.lock().upstreams.insert(name.to_string(), port);
    }

    pub fn remove_upstream(&self, name: &str) {
        self.lock().upstreams.remove(name);
    }

    pub fn upstreams(&self) -> Vec<String> {
        self.lock().upstreams.keys().cloned().collect()
    }

    pub fn set_hello(&self, hello: Hello) {
        self.lock().hello = Some(hello);
    }

    pub fn hello(&self) -> Option<Hello> {
        self.lock().hello.clone()
    }

    /// Whether requests travel as HTTP/2 streams (a Tower agent) rather than one
    /// HTTP/1.1 exchange per channel (plain SSH client).
    pub fn speaks_h2(&self) -> bool {
        self.lock()
            .hello
            .as_ref()
            .is_some_and(|h| h.capabilities.iter().any(|c| c == CAP_H2))
    }

    /// Whether the agent passes a caller's own credential through when asked
    /// ([`CAP_CALLER_CREDENTIAL`]); without it, such requests are refused.
    pub fn carries_caller_credential(&self) -> bool {
        self.lock()
            .hello
            .as_ref()
            .is_some_and(|h| h.capabilities.iter().any(|c| c == CAP_CALLER_CREDENTIAL))
    }

    /// Whether the agent moves when asked ([`CAP_MOVE`]): it opens a new
    /// session elsewhere before it leaves this one.
    pub fn can_move(&self) -> bool {
        self.lock()
            .hello
            .as_ref()
            .is_some_and(|h| h.capabilities.iter().any(|c| c == CAP_MOVE))
    }

    /// Asks the agent to move (the control channel sends the notice).
    pub fn request_move(&self) {
        self.moving.cancel();
    }

    /// Whether the agent was asked to move.
    pub fn is_moving(&self) -> bool {
        self.moving.is_cancelled()
    }

    /// Completes when the agent is asked to move.
    pub async fn move_requested(&self) {
        self.moving.cancelled().await
    }

    /// Round trip of the last tunnel channel open (an SSH request/confirmation).
    pub fn rtt(&self) -> Option<Duration> {
        self.lock().rtt
    }

    /// Number of tunnel channels currently open.
    pub fn open_channels(&self) -> usize {
        self.open_channels.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("session state poisoned")
    }

    /// Ends the SSH connection with a message the agent logs.
    pub async fn disconnect(&self, why: &str) {
        let _ = self
            .handle
            .disconnect(
                russh::Disconnect::ByApplication,
                why.to_string(),
                "en".to_string(),
            )
            .await;
        self.closed.cancel();
    }

    async fn open_channel(&self, upstream: &str) -> Result<TokioIo<ChannelIo>, ForwardError> {
        let port = self
            .lock()
            .upstreams
            .get(upstream)
            .copied()
            .ok_or_else(|| ForwardError::NoUpstream {
                cluster: self.cluster.clone(),
                upstream: upstream.to_string(),
            })?;
        self.open_channel_unchecked(upstream, port).await
    }

    /// Opens a `forwarded-tcpip` channel for any name, whether or not the agent
    /// offered it. The gateway never does this; tests use it to prove the agent
    /// enforces its own allow-list.
    pub async fn open_channel_unchecked(
        &self,
        upstream: &str,
        port: u32,
    ) -> Result<TokioIo<ChannelIo>, ForwardError> {
        let started = std::time::Instant::now();
        let channel = tokio::time::timeout(
            Duration::from_secs(10),
            self.handle
                .channel_open_forwarded_tcpip(upstream, port, "127.0.0.1", 0),
        )
        .await
        .map_err(|_| ForwardError::Channel {
            cluster: self.cluster.clone(),
            reason: "the agent did not answer within 10s".into(),
        })?
        .map_err(|e| ForwardError::Channel {
            cluster: self.cluster.clone(),
            reason: e.to_string(),
        })?;
        let rtt = started.elapsed();
        let first = self.lock().rtt.replace(rtt).is_none();
        if first && let Some(changed) = self.registry_changed.get() {
            changed.send_modify(|g| *g += 1);
        }
        let metrics = self.metrics.get().cloned().unwrap_or_default();
        metrics.channel_open_seconds.observe(rtt.as_secs_f64());
        Ok(TokioIo::new(ChannelIo::new(
            channel.into_stream(),
            self.open_channels.clone(),
            metrics,
        )))
    }

    fn http_error(&self, source: hyper::Error) -> ForwardError {
        ForwardError::Http {
            cluster: self.cluster.clone(),
            source,
        }
    }

    /// Sends `req` (path-and-query URI, headers already cleaned) to `upstream`.
    pub async fn send(
        &self,
        upstream: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ForwardError> {
        if self.speaks_h2() {
            self.send_h2(upstream, req).await
        } else {
            self.send_h1(upstream, req).await
        }
    }

    /// Sends an upgrade request (exec, attach, port-forward, WebSocket) to
    /// `upstream`, encoded as the channel speaks it ([`tunnel::encode_upgrade`]).
    /// `Ok(Err(resp))` is the upstream's refusal, to relay as it is.
    pub async fn send_upgrade(
        &self,
        upstream: &str,
        mut req: Request<Body>,
        protocol: &str,
    ) -> Result<Result<Response<Incoming>, Response<Incoming>>, ForwardError> {
        tunnel::encode_upgrade(&mut req, protocol, self.speaks_h2());
        let resp = self.send(upstream, req).await?;
        if tunnel::upgrade_accepted(resp.status(), resp.version()) {
            Ok(Ok(resp))
        } else {
            let (mut parts, body) = resp.into_parts();
            tunnel::decode_upgrade_refusal(&mut parts);
            Ok(Err(Response::from_parts(parts, body)))
        }
    }

    async fn send_h2(
        &self,
        upstream: &str,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let mut sender = self.h2_sender(upstream, false).await?;
        // h2 needs an absolute URI; the authority is the logical upstream name.
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = format!("https://{upstream}{pq}")
            .parse()
            .expect("upstream names and routed paths form valid URIs");
        *req.version_mut() = http::Version::HTTP_2;
        let replay = replayable(&req);
        match sender.send_request(req).await {
            Ok(resp) => Ok(resp),
            // The agent's connection went away (a draining agent's GOAWAY, or
            // a dead channel) before any response: a safe, bodiless request
            // is sent once more on a fresh channel, whose refusal is a 503.
            Err(_) if replay.is_some() => {
                let mut sender = self.h2_sender(upstream, true).await?;
                let req = replay.expect("checked");
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| self.http_error(e))
            }
            Err(e) => Err(self.http_error(e)),
        }
    }

    /// The HTTP/2 connection to `upstream`, opened on a new channel when there
    /// is none, it is closed, or `fresh` asks for a new one.
    async fn h2_sender(
        &self,
        upstream: &str,
        fresh: bool,
    ) -> Result<http2::SendRequest<Body>, ForwardError> {
        let mut senders = self.h2.lock().await;
        if let Some(sender) = senders.get_mut(upstream) {
            if !fresh && !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok(sender.clone());
            }
            senders.remove(upstream);
        }
        let io = self.open_channel(upstream).await?;
        let (mut sender, conn) = tunnel::h2_client(self.conn_window)
            .handshake(io)
            .await
            .map_err(|e| self.http_error(e))?;
        let cluster = self.cluster.clone();
        self.tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%cluster, error = %e, "tunnel h2 connection ended");
            }
        });
        sender.ready().await.map_err(|e| self.http_error(e))?;
        senders.insert(upstream.to_string(), sender.clone());
        Ok(sender)
    }

    async fn send_h1(
        &self,
        upstream: &str,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let io = self.open_channel(upstream).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| self.http_error(e))?;
        let cluster = self.cluster.clone();
        self.tasks.spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%cluster, error = %e, "tunnel h1 exchange ended");
            }
        });
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(upstream).expect("upstream names are valid header values"),
        );
        sender
            .send_request(req)
            .await
            .map_err(|e| self.http_error(e))
    }
}

/// A copy of `req` to send again if the first attempt fails before any
/// response: only for safe methods without a body.
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    use hyper::body::Body as _;
    let safe = matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    if !safe
        || !req.body().is_end_stream()
        || req.extensions().get::<hyper::ext::Protocol>().is_some()
    {
        return None;
    }
    let mut copy = Request::new(empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}
