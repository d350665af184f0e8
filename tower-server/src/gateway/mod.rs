//! Where clients enter: the HTTPS path gateway, and in KubeSphere mode a kube
//! listener and a ks listener per cluster. All of them admit handshakes
//! fairly, serve HTTP/1.1 and HTTP/2 with limits on what a request head may
//! hold, and carry requests through the cluster's session.
//!
//! - [`tls`]: serving certificates and client verification.
//! - [`identity`]: who a client is, which cluster it may reach, and with
//!   whose credential its request reaches the member (docs/security.md).
//! - [`forward`]: one request's way through routing and the cluster's
//!   session, upgrades included (the session decides how they cross the
//!   tunnel, see [`tower_proto::tunnel`]).
//! - [`shares`]: how many requests one client, and one cluster, may have in
//!   flight through the tunnel.
//! - [`clusters`]: the per-cluster listeners of KubeSphere mode.

mod clusters;
mod forward;
mod identity;
mod shares;
mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_proto::tunnel;

use crate::admission::Admission;
use crate::server::Shared;

pub(crate) use clusters::ClusterListeners;
pub use clusters::ClusterPorts;
pub(crate) use forward::{finish, forward_error, splice};
pub use identity::CLIENT_CN_PREFIX;
pub(crate) use identity::client_name;
pub(crate) use shares::Shares;
pub use shares::{
    DEFAULT_CLIENT_STREAMS, DEFAULT_CLUSTER_STREAMS, MAX_CLUSTER_STREAMS, RETRY_AFTER_SECONDS,
    tunnel_conn_window,
};
pub(crate) use tls::{ClientCert, config as tls_config};

/// Longest request target (path and query) that can reach the gateway: the
/// `http` crate's limit. hyper answers a longer HTTP/1.1 target with 414; an
/// HTTP/2 `:path` beyond it does not parse, and h2 resets that stream.
pub const MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// Largest request head: HTTP/1.1 read buffer and HTTP/2 header list.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;
/// Most header fields in one HTTP/1.1 request (hyper's default, made explicit).
pub const MAX_HEADERS: usize = 100;

/// Which door a request came through; it decides the cluster, the upstream
/// and whose credential reaches the member.
#[derive(Clone, Debug)]
pub(crate) enum Entry {
    /// The single-port path gateway: the cluster comes from the path
    /// ([`tower_proto::route`]); a tower client certificate is required.
    Paths,
    /// A cluster's kube listener: member-relative paths to kube-apiserver; a
    /// tower client certificate, or the caller's own bearer token.
    Kube(Arc<str>),
    /// A cluster's ks listener: plain HTTP, member-relative paths to
    /// ks-apiserver, the caller's `Authorization` passed through unchanged.
    Ks(Arc<str>),
}

impl Entry {
    fn name(&self) -> &'static str {
        match self {
            Entry::Paths => "gateway",
            Entry::Kube(_) => "kube listener",
            Entry::Ks(_) => "ks listener",
        }
    }
}

/// The TLS a listener serves; swappable so that a new serving certificate
/// takes effect for the next handshake.
pub(crate) type TlsSource = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Serves the path gateway until `shutdown`.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let tls = Arc::new(RwLock::new(shared.gateway_tls.clone()));
    serve_listener(shared, listener, Some(tls), Entry::Paths, shutdown).await
}

/// Accepts on `listener` until `shutdown`: TLS when `tls` is given, with the
/// handshake admitted under caps overall and per source.
pub(crate) async fn serve_listener(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsSource>,
    entry: Entry,
    shutdown: CancellationToken,
) {
    // Until its handshake is done a client holds a slot, capped overall and
    // per source: a flood of silent or slow handshakes stays bounded.
    let admission = Arc::new(Admission::new(
        shared.config.max_gateway_handshakes,
        shared.config.max_gateway_handshakes_per_source,
        "too many gateway TLS handshakes in progress (overall or from this source); dropping connections",
    ));
    while let Some((socket, peer)) = tower_ops::accept(&listener, entry.name(), &shutdown).await {
        let Some(pending) = admission.admit_peer(peer) else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let entry = entry.clone();
        let tls = tls.clone();
        let tasks = shared.tasks.clone();
        tasks.spawn(async move {
            let Some(tls) = tls else {
                drop(pending);
                serve_http(shared, TokioIo::new(socket), peer, None, entry, shutdown).await;
                return;
            };
            let acceptor = TlsAcceptor::from(tls.read().expect("poisoned").clone());
            let tls_timeout = shared.config.gateway_tls_timeout;
            let handshake = tokio::select! {
                r = tokio::time::timeout(tls_timeout, acceptor.accept(socket)) => r,
                _ = pending.cut.cancelled() => {
                    tracing::debug!(%peer, "gateway TLS handshake evicted by a quieter source");
                    return;
                }
            };
            drop(pending);
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "gateway TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "gateway TLS handshake timed out");
                    return;
                }
            };
            let client = identity::client_name(&tls);
            serve_http(shared, TokioIo::new(tls), peer, client, entry, shutdown).await;
        });
    }
}

/// Serves HTTP/1.1 and HTTP/2 on one client connection until it ends or
/// `shutdown`.
async fn serve_http<I>(
    shared: Arc<Shared>,
    io: TokioIo<I>,
    peer: SocketAddr,
    client: Option<Arc<str>>,
    entry: Entry,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slowloris: HTTP/1.1 heads must arrive within the header read timeout
    // (hyper answers nothing and closes). Once a head is read the timer
    // stops, so watches and upgraded streams are not cut. Oversized heads get
    // hyper's 431 / 414 and a close.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.gateway_header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES);
    // HTTP/2 pings find clients that vanished without closing, so their
    // watches do not hold tunnel streams forever.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(tunnel::H2_STREAM_WINDOW)
        .initial_connection_window_size(tunnel::H2_CONN_WINDOW)
        .max_concurrent_streams(2000);
    let client = shares::ClientKey {
        certificate: client,
        source: peer.ip(),
        credential: None,
    };
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let client = client.clone();
        let entry = entry.clone();
        async move {
            let resp = forward::handle(shared.clone(), &entry, &client, req).await;
            shared.metrics.response(resp.status().as_u16());
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    serve_until_shutdown(conn, &shutdown, peer, "gateway").await;
}

/// How long a stopping server lets a connection's requests in flight finish.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(5);

/// Serves `conn` (from `peer`, a `door` connection) until it ends, or until
/// `shutdown`: then no new requests (HTTP/2 GOAWAY, HTTP/1.1 closes after
/// the current one), those in flight get [`GRACEFUL_CLOSE`] to finish,
/// watches end at their next event, upgraded streams are cut.
pub(crate) async fn serve_until_shutdown<C>(
    conn: C,
    shutdown: &CancellationToken,
    peer: SocketAddr,
    door: &'static str,
) where
    C: hyper_util::server::graceful::GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(GRACEFUL_CLOSE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, door, "connection ended");
    }
}
