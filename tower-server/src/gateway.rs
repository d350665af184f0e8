//! The HTTPS gateway: TLS with required client certificates, path routing, and
//! forwarding through the cluster's session, streaming in both directions.
//!
//! Upgrades (exec, attach, port-forward, WebSocket watches) arrive as HTTP/1.1
//! `Upgrade` requests. To a Tower agent they travel as RFC 8441 extended
//! CONNECT streams (the original method rides in `x-tower-method`), and the
//! agent's `200` becomes the client's `101`. To a plain SSH client they pass
//! through as HTTP/1.1.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::admission::{Admission, Throttled};
use crate::route::{RouteError, route};
use crate::session::ForwardError;
use crate::status::{Body, status};
use tower_proto::http::strip_hop_by_hop;

/// Header carrying an upgrade request's original method inside extended CONNECT.
pub const METHOD_HEADER: &str = "x-tower-method";

/// Longest request target (path and query) that can reach the gateway: the
/// `http` crate's limit. hyper answers a longer HTTP/1.1 target with 414; an
/// HTTP/2 `:path` beyond it does not parse, and h2 resets that stream.
pub const MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// Largest request head: HTTP/1.1 read buffer and HTTP/2 header list.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;
/// Most header fields in one HTTP/1.1 request (hyper's default, made explicit).
pub const MAX_HEADERS: usize = 100;

/// Builds the gateway's rustls config: tower CA verifies client certificates.
pub(crate) fn tls_config(
    ca_pem: &str,
    serving: &tower_certs::CertifiedKey,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in tower_certs::parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            tower_certs::parse_certs(&serving.cert_pem)?,
            tower_certs::parse_key(&serving.key_pem)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the gateway until `shutdown`.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let acceptor = TlsAcceptor::from(shared.gateway_tls.clone());
    let admission = Arc::new(Admission::new(
        shared.config.max_gateway_handshakes,
        shared.config.max_gateway_handshakes_per_source,
    ));
    let dropped = Throttled::default();
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Until its handshake is done a client holds a slot, capped overall and
        // per source: a flood of silent or slow handshakes stays bounded.
        let Some(pending) = admission.admit(peer.ip()) else {
            dropped.warn(
                peer,
                "too many gateway TLS handshakes in progress (overall or from this source); dropping connections",
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
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
            let client = client_name(&tls);
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
                .initial_stream_window_size(crate::session::H2_STREAM_WINDOW)
                .initial_connection_window_size(crate::session::H2_CONN_WINDOW)
                .max_concurrent_streams(2000);
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let client = client.clone();
                async move {
                    let resp = handle(shared.clone(), client.as_deref(), req).await;
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

/// The subject common name of the verified client certificate.
fn client_name(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Option<Arc<str>> {
    let der = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(cn))
}

/// With `gateway_client_bound_to_cluster`, a client certificate reaches only
/// the cluster it was issued for (`CN=tower:<cluster>`, as every synthesized
/// kubeconfig carries): anything else is 403, before the gateway says whether
/// the other cluster exists.
fn refuse_other_cluster(
    shared: &Shared,
    client: Option<&str>,
    cluster: &str,
) -> Option<Response<Body>> {
    if !shared.config.gateway_client_bound_to_cluster {
        return None;
    }
    let allowed = client.and_then(|cn| cn.strip_prefix(CLIENT_CN_PREFIX));
    if allowed == Some(cluster) {
        return None;
    }
    Some(status(
        StatusCode::FORBIDDEN,
        format!(
            "this client certificate ({}) does not grant access to cluster {cluster:?}",
            client.map_or_else(|| "no common name".to_string(), |cn| format!("CN={cn}")),
        ),
    ))
}

/// Common-name prefix of the client certificates in synthesized kubeconfigs.
pub const CLIENT_CN_PREFIX: &str = "tower:";

/// Answers one gateway request from `client` (its certificate's CN).
async fn handle(
    shared: Arc<Shared>,
    client: Option<&str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let route = match route(req.uri().path(), req.uri().query()) {
        Ok(r) => r,
        Err(RouteError::NotACluster) => {
            return status(
                StatusCode::NOT_FOUND,
                format!("{}: {}", req.uri().path(), RouteError::NotACluster),
            );
        }
        Err(e) => return status(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(refused) = refuse_other_cluster(&shared, client, &route.cluster) {
        return refused;
    }
    let Some(session) = shared.registry.get(&route.cluster) else {
        return if shared.store.knows(&route.cluster) {
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cluster {:?} is not connected: its agent is offline",
                    route.cluster
                ),
            )
        } else {
            status(
                StatusCode::NOT_FOUND,
                format!("cluster {:?} not found", route.cluster),
            )
        };
    };
    let upgrade = upgrade_protocol(req.headers());
    let (parts, body) = req.into_parts();
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(route.path_and_query.as_str())
        .body(body.boxed_unsync())
        .expect("routed path is a valid URI");
    *out.headers_mut() = clean_request_headers(&parts.headers);
    let mut inbound = Request::from_parts(parts, ());

    let Some(protocol) = upgrade else {
        return match session.send(route.upstream, out).await {
            Ok(resp) => finish(resp),
            Err(e) => forward_error(e),
        };
    };

    // An upgrade: keep the client's side to splice after the 101.
    let client_upgrade = hyper::upgrade::on(&mut inbound);
    let h2 = session.speaks_h2();
    if h2 {
        let method = out.method().clone();
        *out.method_mut() = Method::CONNECT;
        out.extensions_mut().insert(hyper::ext::Protocol::from(
            protocol.to_ascii_lowercase().as_str(),
        ));
        out.headers_mut().insert(
            HeaderName::from_static(METHOD_HEADER),
            HeaderValue::from_str(method.as_str()).expect("methods are valid header values"),
        );
        // A CONNECT stream carries no request body; a length would end it early.
        out.headers_mut().remove(header::CONTENT_LENGTH);
        *out.body_mut() = crate::status::empty();
    } else {
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        out.headers_mut().insert(
            header::UPGRADE,
            HeaderValue::from_str(&protocol).expect("came from a header value"),
        );
    }
    let mut resp = match session.send(route.upstream, out).await {
        Ok(resp) => resp,
        Err(e) => return forward_error(e),
    };
    let upgraded = if h2 {
        resp.status() == StatusCode::OK
    } else {
        resp.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    if !upgraded {
        return finish(resp);
    }
    let tunnel_upgrade = hyper::upgrade::on(&mut resp);
    let mut headers = clean_response_headers(resp.headers());
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::UPGRADE,
        HeaderValue::from_str(&protocol).expect("came from a header value"),
    );
    let cluster = route.cluster.clone();
    tokio::spawn(async move {
        let (client, tunnel) = match tokio::join!(client_upgrade, tunnel_upgrade) {
            (Ok(c), Ok(t)) => (c, t),
            (c, t) => {
                tracing::debug!(%cluster, client = ?c.err(), tunnel = ?t.err(), "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut tunnel = TokioIo::new(tunnel);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut tunnel).await {
            tracing::debug!(%cluster, error = %e, "upgraded stream ended");
        }
    });
    let mut out = Response::new(crate::status::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = headers;
    out
}

fn finish(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers = clean_response_headers(&parts.headers);
    Response::from_parts(parts, body.boxed_unsync())
}

fn forward_error(e: ForwardError) -> Response<Body> {
    tracing::warn!(error = %e, "forwarding failed");
    match e {
        ForwardError::NoUpstream { .. } | ForwardError::Channel { .. } => {
            status(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        ForwardError::Http { .. } => status(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// The protocol named by an HTTP/1.1 upgrade request, if it is one.
fn upgrade_protocol(headers: &HeaderMap) -> Option<String> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Request headers that may cross the tunnel. Callers' credentials and
/// impersonation requests never do: the agent authenticates with its own
/// credentials, and `Impersonate-*` is stripped (see docs/security.md).
fn clean_request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = strip_hop_by_hop(headers);
    out.remove(header::AUTHORIZATION);
    out.remove(HeaderName::from_static(METHOD_HEADER));
    tower_proto::http::strip_impersonation(&mut out);
    out
}

fn clean_response_headers(headers: &HeaderMap) -> HeaderMap {
    strip_hop_by_hop(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_cleaned() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        h.insert("impersonate-user", "root".parse().unwrap());
        h.insert("impersonate-group", "system:masters".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-drop".parse().unwrap());
        h.insert("x-drop", "1".parse().unwrap());
        h.insert(header::ACCEPT, "application/json".parse().unwrap());
        h.insert(header::HOST, "gw".parse().unwrap());
        let out = clean_request_headers(&h);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key(header::ACCEPT));
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(upgrade_protocol(&h), None);
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert_eq!(upgrade_protocol(&h).as_deref(), Some("websocket"));
    }
}
