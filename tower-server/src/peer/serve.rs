//! The owner's side of peer forwarding: the peer listener. It admits only
//! replicas (a peer certificate from the tower CA), and carries a forwarded
//! request through the session this replica holds, or answers `421` when it
//! holds none. It never forwards a request on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_proto::http::{Body, empty, status};
use tower_proto::names::{UPSTREAM_KS_APISERVER, UPSTREAM_KUBE_APISERVER};
use tower_proto::tunnel::{
    self, CREDENTIAL_CALLER, CREDENTIAL_HEADER, METHOD_HEADER, decode_upgrade,
    encode_upgrade_refusal,
};

use super::{CLUSTER_HEADER, Counted, OWNER_HEADER, PEER_CN_PREFIX};
use crate::gateway;
use crate::server::Shared;

/// A peer must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwarded streams one peer connection may carry at once: every request
/// from that replica to clusters whose sessions are here.
const MAX_STREAMS: u32 = 16_384;

/// The peer listener's TLS: a serving certificate for `host` (where peers
/// reach this replica), a client certificate from the tower CA required,
/// HTTP/2 only.
pub(crate) fn tls(ca: &tower_certs::Ca, host: &str) -> anyhow::Result<rustls::ServerConfig> {
    let serving = ca.issue_server(&[host], Duration::from_secs(365 * 24 * 3600))?;
    let mut config = gateway::tls_config(ca.cert_pem(), &serving, gateway::ClientCert::Required)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Serves the peer listener until `shutdown`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    while let Some((socket, peer)) = tower_ops::accept(&listener, "peer listener", &shutdown).await
    {
        let _ = socket.set_nodelay(true);
        let (shared, acceptor, shutdown) = (shared.clone(), acceptor.clone(), shutdown.clone());
        let tasks = shared.tasks.clone();
        tasks.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "peer TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "peer TLS handshake timed out");
                    return;
                }
            };
            let client = gateway::client_name(&tls);
            let io = TokioIo::new(Counted::new(tls, shared.metrics.clone()));
            serve_connection(shared, io, peer, client, shutdown).await;
        });
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    io: TokioIo<Counted<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
    peer: SocketAddr,
    client: Option<Arc<str>>,
    shutdown: CancellationToken,
) {
    let mut builder = tunnel::h2_server(MAX_STREAMS);
    builder
        .initial_connection_window_size(64 * 1024 * 1024)
        .keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let service = service_fn(move |req| {
        let (shared, client) = (shared.clone(), client.clone());
        async move { Ok::<_, std::convert::Infallible>(answer(shared, client.as_deref(), req).await) }
    });
    let conn = builder.serve_connection(io, service);
    gateway::serve_until_shutdown(conn, &shutdown, peer, "peer").await;
}

/// Answers one forwarded request from the replica named by `client`.
async fn answer(
    shared: Arc<Shared>,
    client: Option<&str>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let Some(entry) = client.and_then(|cn| cn.strip_prefix(PEER_CN_PREFIX)) else {
        tracing::warn!(client = ?client, "a request on the peer listener without a peer certificate");
        return status(
            StatusCode::FORBIDDEN,
            "the peer listener serves tower-server replicas only",
        );
    };
    let Some(cluster) = req
        .headers_mut()
        .remove(CLUSTER_HEADER)
        .and_then(|v| v.to_str().ok().map(str::to_string))
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "a forwarded request names no cluster",
        );
    };
    let upstream = match req.uri().host() {
        Some(UPSTREAM_KUBE_APISERVER) => UPSTREAM_KUBE_APISERVER,
        Some(UPSTREAM_KS_APISERVER) => UPSTREAM_KS_APISERVER,
        other => {
            return status(
                StatusCode::BAD_REQUEST,
                format!("a forwarded request names no known upstream ({other:?})"),
            );
        }
    };
    shared.metrics.peer_served.inc();
    let Some(session) = shared.registry.ready(&cluster, upstream) else {
        // Verified on arrival: not held here. The entry may try the owner
        // named, once; this replica never forwards on.
        tracing::debug!(%cluster, %entry, "forwarded request for a session not held here");
        let mut resp = status(
            StatusCode::MISDIRECTED_REQUEST,
            format!("cluster {cluster:?}'s session is not held by this replica"),
        );
        if let Some(hint) = shared.peers.hint(&cluster)
            && let Ok(v) = HeaderValue::from_str(&hint)
        {
            resp.headers_mut()
                .insert(HeaderName::from_static(OWNER_HEADER), v);
        }
        return resp;
    };
    let caller = req
        .headers()
        .get(CREDENTIAL_HEADER)
        .is_some_and(|v| v == CREDENTIAL_CALLER);
    if caller && !session.carries_caller_credential() {
        return status(
            StatusCode::BAD_GATEWAY,
            format!(
                "the agent of cluster {cluster:?} cannot pass a caller's own credential to the member; upgrade tower-agent"
            ),
        );
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let upgrade = decode_upgrade(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(path_and_query.as_str())
        .body(body.boxed_unsync())
        .expect("a path that came as a URI is a valid URI");
    *out.headers_mut() = parts.headers;
    out.headers_mut().remove(header::HOST);

    let (Some((method, protocol)), Some(client_upgrade)) = (upgrade, client_upgrade) else {
        return match session.send(upstream, out).await {
            Ok(resp) => gateway::finish(resp),
            Err(e) => gateway::forward_error(e),
        };
    };
    // An upgrade: the original method, the stream spliced after the answer.
    *out.method_mut() = method;
    out.headers_mut().remove(METHOD_HEADER);
    *out.body_mut() = empty();
    let mut resp = match session.send_upgrade(upstream, out, &protocol).await {
        Ok(Ok(switched)) => switched,
        Ok(Err(refused)) => {
            let (mut parts, body) = gateway::finish(refused).into_parts();
            encode_upgrade_refusal(&mut parts);
            return Response::from_parts(parts, body);
        }
        Err(e) => return gateway::forward_error(e),
    };
    let tunnel_upgrade = hyper::upgrade::on(&mut resp);
    let mut headers = tower_proto::http::response_headers(resp.headers());
    headers.remove(header::CONTENT_LENGTH);
    gateway::splice(&shared, cluster, client_upgrade, tunnel_upgrade, ());
    let mut out = Response::new(empty());
    *out.headers_mut() = headers;
    out
}
