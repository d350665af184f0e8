//! The HTTPS gateway clients reach members through: TLS with required client
//! certificates, admission of handshakes, and HTTP/1.1 and HTTP/2 serving with
//! limits on what a request head may hold.
//!
//! - [`tls`]: the serving certificate and client verification.
//! - [`identity`]: who a client is and which cluster it may reach.
//! - [`forward`]: one request's way through routing and the cluster's
//!   session, upgrades included (the session decides how they cross the
//!   tunnel, see [`tower_proto::tunnel`]).

mod forward;
mod identity;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_proto::tunnel;

use crate::admission::Admission;
use crate::server::Shared;

pub use identity::CLIENT_CN_PREFIX;
pub(crate) use tls::config as tls_config;

/// Longest request target (path and query) that can reach the gateway: the
/// `http` crate's limit. hyper answers a longer HTTP/1.1 target with 414; an
/// HTTP/2 `:path` beyond it does not parse, and h2 resets that stream.
pub const MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// Largest request head: HTTP/1.1 read buffer and HTTP/2 header list.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;
/// Most header fields in one HTTP/1.1 request (hyper's default, made explicit).
pub const MAX_HEADERS: usize = 100;

/// Serves the gateway until `shutdown`.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let acceptor = TlsAcceptor::from(shared.gateway_tls.clone());
    // Until its handshake is done a client holds a slot, capped overall and
    // per source: a flood of silent or slow handshakes stays bounded.
    let admission = Arc::new(Admission::new(
        shared.config.max_gateway_handshakes,
        shared.config.max_gateway_handshakes_per_source,
        "too many gateway TLS handshakes in progress (overall or from this source); dropping connections",
    ));
    while let Some((socket, peer)) = tower_ops::accept(&listener, "gateway", &shutdown).await {
        let Some(pending) = admission.admit_peer(peer) else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let tasks = shared.tasks.clone();
        tasks.spawn(async move {
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
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // Slowloris: HTTP/1.1 heads must arrive within the header read
            // timeout (hyper answers nothing and closes). Once a head is read
            // the timer stops, so watches and upgraded streams are not cut.
            // Oversized heads get hyper's 431 / 414 and a close.
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
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let client = client.clone();
                async move {
                    let resp = forward::handle(shared.clone(), client.as_deref(), req).await;
                    shared.metrics.response(resp.status().as_u16());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "gateway connection ended");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}
