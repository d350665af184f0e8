//! HTTP plumbing shared by the KubeSphere stand-ins: a hyper HTTP/1.1 server loop with
//! upgrades, forwarding one request over a given connection (Upgrade spliced after `101`),
//! TLS dialling, and the error bodies Go's and Kubernetes' libraries write.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Errors a response body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body every stand-in answers with.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A connection a request can be forwarded over (TCP or TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// A response with a body and a content type.
pub fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body))
        .expect("valid response")
}

/// A JSON response.
pub fn json(status: u16, value: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

/// A Kubernetes `metav1.Status` failure (what `responsewriters.ErrorNegotiated` writes for a
/// `StatusError`, k8s.io/apiserver handlers/responsewriters/writers.go).
pub fn status_json(code: u16, reason: &str, message: &str) -> Response<Body> {
    json(code, &status_value(code, reason, message))
}

pub fn status_value(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// What Go's `http.Error(w, msg, code)` writes: plain text, `nosniff`, a trailing newline.
pub fn text_error(code: u16, msg: &str) -> Response<Body> {
    let mut resp = respond(code, "text/plain; charset=utf-8", format!("{msg}\n"));
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// What `responsewriters.InternalError` writes (k8s.io/apiserver
/// handlers/responsewriters/errors.go ~74-78): `Internal Server Error: "<uri>": <err>`,
/// HTML-escaped.
pub fn internal_error(request_uri: &str, err: &str) -> Response<Body> {
    let msg = format!("Internal Server Error: \"{request_uri}\": {err}")
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    text_error(500, &msg)
}

/// Serves HTTP/1.1 (with upgrades) on `listener` with `handler` until `shutdown`.
pub async fn serve<H, F>(listener: TcpListener, shutdown: CancellationToken, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        serve_connection(sock, peer, shutdown.clone(), handler.clone());
    }
}

/// Serves one accepted connection (plain or TLS) with `handler`, on a task of its own.
pub fn serve_connection<I, H, F>(io: I, peer: SocketAddr, shutdown: CancellationToken, handler: H)
where
    I: Io,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = conn => {}
        }
    });
}

/// Go's `httpstream.IsUpgradeRequest`: a `Connection` header that contains `upgrade`
/// (k8s.io/apimachinery/pkg/util/httpstream/httpstream.go).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.to_ascii_lowercase().contains("upgrade"))
    })
}

/// Removes hop-by-hop headers the way Go's `httputil.ReverseProxy` does (`removeHopByHopHeaders`).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Appends the client's address to `X-Forwarded-For`, as both Go proxies do
/// (`httputil.ReverseProxy`, `utilnet.AppendForwardedForHeader`).
fn append_forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    let ip = client.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// Forwards `req` over `io` as `path_and_query`, the way k8s.io/apimachinery's
/// `UpgradeAwareHandler` does with `UseLocationHost` false: the caller's `Host` and every
/// header stay (after `edit`), `X-Forwarded-For` is appended, hop-by-hop headers go unless
/// this is an upgrade. An upgrade answered `101` is spliced both ways; answered `>= 400` it is
/// passed back; anything else is a 500, as in `tryUpgrade` (upgradeaware.go ~309-400).
pub async fn forward(
    mut req: Request<Incoming>,
    io: Box<dyn Io>,
    path_and_query: &str,
    client: SocketAddr,
    edit: impl FnOnce(&mut HeaderMap),
) -> anyhow::Result<Response<Body>> {
    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    if !upgrade {
        strip_hop_by_hop(&mut headers);
    }
    append_forwarded_for(&mut headers, client);
    edit(&mut headers);
    let mut out = Request::builder()
        .method(parts.method)
        .uri(path_and_query)
        .body(body)?;
    *out.headers_mut() = headers;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(out).await?;
    if let Some(client_side) = client_side {
        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let backend_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(client), Ok(backend)) = tokio::join!(client_side, backend_side) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(backend),
                )
                .await;
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, empty()));
        }
        if status.as_u16() < 400 {
            return Ok(text_error(
                500,
                &format!("invalid upgrade response: status code {}", status.as_u16()),
            ));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
}

/// A rustls client configuration trusting only the system's roots (what Go's
/// `http.DefaultTransport` trusts), HTTP/1.1 only.
pub fn system_roots() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            crate::testbed::install_crypto_provider();
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let mut config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// A rustls client configuration trusting only `ca_pem`, HTTP/1.1 only.
pub fn trusting(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    crate::testbed::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in tower_certs::parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS over `tcp`, verifying the server as `server_name` (a DNS name or an IP address).
pub async fn tls_connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

/// The request's path and query, as received.
pub fn path_and_query(req: &Request<Incoming>) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string())
}
