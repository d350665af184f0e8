//! Upstreams the agent serves: the member's kube-apiserver (and optionally
//! ks-apiserver), reached over verified TLS with the agent's own credentials.
//!
//! Requests arriving through the tunnel are rewritten onto the configured base
//! URL; callers cannot choose a host. Extended CONNECT streams become HTTP/1.1
//! upgrades to the upstream and are spliced after its `101`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower_proto::http::{
    Body, caller_request_headers_with_host, empty, full, request_headers, response_headers, status,
};
use tower_proto::names::UPSTREAM_KS_APISERVER;
use tower_proto::tunnel::{decode_upgrade, encode_upgrade_refusal, wants_caller_credential};

/// How to reach and authenticate to one upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Logical name: `kube-apiserver` or `ks-apiserver`.
    pub name: String,
    /// Base URL, e.g. `https://kubernetes.default.svc`.
    pub url: String,
    /// CA bundle that verifies the upstream's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// Bearer token file (a mounted service-account token); re-read when it changes.
    pub token_file: Option<PathBuf>,
}

/// A configured upstream with its HTTP client.
pub struct Upstream {
    pub name: String,
    base: Uri,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    token: Option<TokenFile>,
    /// How long a short request may wait for the upstream's response head.
    response_timeout: Duration,
}

/// Default for [`Upstream::with_response_timeout`]: kube-apiserver answers a
/// short request within its own 60 s request timeout, so this only fires on
/// an upstream that hangs.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> anyhow::Result<Self> {
        let base: Uri = config
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("{} URL {:?}: {e}", config.name, config.url))?;
        // Plain HTTP only for ks-apiserver, which KubeSphere serves on :80
        // inside the member; kube-apiserver is always verified TLS.
        let plain = base.scheme_str() == Some("http");
        anyhow::ensure!(
            (base.scheme_str() == Some("https") || (plain && config.name == UPSTREAM_KS_APISERVER))
                && base.authority().is_some(),
            "{} URL must be https://host[:port]{}, got {:?}",
            config.name,
            if config.name == UPSTREAM_KS_APISERVER {
                " or http://host[:port]"
            } else {
                ""
            },
            config.url
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if plain {
            // No TLS: nothing to verify.
        } else if let Some(ca) = &config.ca_file {
            let pem = std::fs::read_to_string(ca)
                .map_err(|e| anyhow::anyhow!("reading CA file {}: {e}", ca.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                roots.add(cert?)?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "CA file {} holds no certificate",
                ca.display()
            );
        } else if !plain {
            anyhow::bail!(
                "{}: a CA file is required to verify the upstream",
                config.name
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let connector = if plain {
            connector.https_or_http()
        } else {
            connector.https_only()
        }
        .enable_http1()
        .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Ok(Self {
            name: config.name.clone(),
            base,
            client,
            token: config.token_file.clone().map(TokenFile::new),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
        })
    }

    /// Bounds how long a request that is not a watch or an upgrade waits for
    /// the upstream's response head; past it the client gets a `504` Status.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Serves one request that arrived through the tunnel. An upgraded stream
    /// is cut when `ends` fires (the agent is shutting down).
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        ends: tokio_util::sync::CancellationToken,
    ) -> Response<Body> {
        let result = if let Some((method, protocol)) = decode_upgrade(&req) {
            self.upgrade(req, method, protocol, ends).await
        } else {
            let long_running = is_long_running(&req);
            self.forward(req, long_running).await
        };
        result.unwrap_or_else(|resp| resp)
    }

    /// A request of the agent's own (not a tunnelled one), with the agent's
    /// credential: `method` on `path` with a JSON `body`. Returns the status
    /// and the body.
    pub async fn own_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, bytes::Bytes)> {
        let uri: Uri = path.parse()?;
        let mut req = Request::builder().method(method).uri(self.target(&uri));
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, token.bearer()?);
        }
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                full(b)
            }
            None => empty(),
        };
        let resp = tokio::time::timeout(
            Duration::from_secs(15),
            self.client.request(req.body(body)?),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{} did not answer within 15s", self.name))??;
        let status = resp.status();
        let body = tokio::time::timeout(Duration::from_secs(15), resp.into_body().collect())
            .await
            .map_err(|_| anyhow::anyhow!("{} did not finish its answer within 15s", self.name))??
            .to_bytes();
        Ok((status, body))
    }

    fn target(&self, req_uri: &Uri) -> Uri {
        let pq = req_uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut parts = self.base.clone().into_parts();
        let base_path = self.base.path().trim_end_matches('/');
        parts.path_and_query = Some(
            format!("{base_path}{pq}")
                .parse()
                .expect("base path plus a valid path is valid"),
        );
        Uri::from_parts(parts).expect("scheme and authority come from a valid base URL")
    }

    /// The headers sent upstream: the caller's own credential when the server
    /// asked for it ([`wants_caller_credential`]), else the agent's.
    fn headers(&self, incoming: &HeaderMap) -> Result<HeaderMap, Box<Response<Body>>> {
        if wants_caller_credential(incoming) {
            return Ok(caller_request_headers_with_host(incoming));
        }
        let mut headers = request_headers(incoming);
        if let Some(token) = &self.token {
            let value = token.bearer().map_err(|e| {
                tracing::error!(upstream = %self.name, error = %e, "cannot read credential");
                status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the agent cannot read its {} credential", self.name),
                )
            })?;
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok(headers)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        long_running: bool,
    ) -> Result<Response<Body>, Response<Body>> {
        let (parts, body) = req.into_parts();
        let mut out = Request::builder()
            .method(parts.method)
            .uri(self.target(&parts.uri))
            .body(body.boxed_unsync())
            .expect("valid request parts");
        *out.headers_mut() = self.headers(&parts.headers).map_err(|r| *r)?;
        let request = self.client.request(out);
        let resp = if long_running {
            request.await
        } else {
            tokio::time::timeout(self.response_timeout, request)
                .await
                .map_err(|_| {
                    tracing::warn!(upstream = %self.name, timeout = ?self.response_timeout, "upstream did not answer");
                    status(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "{} did not answer within {:?}",
                            self.name, self.response_timeout
                        ),
                    )
                })?
        }
        .map_err(|e| self.unreachable(e))?;
        let (mut parts, body) = resp.into_parts();
        parts.headers = response_headers(&parts.headers);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        method: Method,
        protocol: String,
        ends: tokio_util::sync::CancellationToken,
    ) -> Result<Response<Body>, Response<Body>> {
        let tunnel_side = hyper::upgrade::on(&mut req);
        let mut out = Request::builder()
            .method(method)
            .uri(self.target(req.uri()))
            .body(empty())
            .expect("valid request parts");
        *out.headers_mut() = self.headers(req.headers()).map_err(|r| *r)?;
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        out.headers_mut().insert(
            header::UPGRADE,
            HeaderValue::from_str(&protocol)
                .map_err(|_| status(StatusCode::BAD_REQUEST, "invalid upgrade protocol"))?,
        );
        let mut resp = self
            .client
            .request(out)
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = resp.into_parts();
            parts.headers = response_headers(&parts.headers);
            encode_upgrade_refusal(&mut parts);
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let name = self.name.clone();
        // Copied on the splice threads (lower priority, see
        // `tower_ops::splice`), so requests win the CPU from the bulk bytes.
        tower_ops::splice::handle().spawn(async move {
            match tokio::join!(tunnel_side, upstream_side) {
                (Ok(t), Ok(u)) => {
                    let mut t = TokioIo::new(t);
                    let mut u = TokioIo::new(u);
                    tokio::select! {
                        r = tokio::io::copy_bidirectional_with_sizes(&mut t, &mut u, tower_proto::tunnel::SPLICE_BUFFER, tower_proto::tunnel::SPLICE_BUFFER) => {
                            if let Err(e) = r {
                                tracing::debug!(upstream = %name, error = %e, "upgraded stream ended");
                            }
                        }
                        _ = ends.cancelled() => {
                            tracing::debug!(upstream = %name, "upgraded stream cut: the agent is shutting down");
                        }
                    }
                }
                (t, u) => {
                    tracing::debug!(upstream = %name, tunnel = ?t.err(), upstream_err = ?u.err(), "upgrade failed")
                }
            }
        });
        let mut headers = response_headers(resp.headers());
        headers.remove(header::CONTENT_LENGTH);
        let mut ok = Response::new(empty());
        *ok.headers_mut() = headers;
        Ok(ok)
    }

    fn unreachable(&self, e: hyper_util::client::legacy::Error) -> Response<Body> {
        tracing::warn!(upstream = %self.name, error = %e, "upstream request failed");
        status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent could not reach {}: {e}", self.name),
        )
    }
}

/// Whether a request through the tunnel may run for as long as its client
/// likes: a watch, or an upgraded stream (exec, port-forward, WebSocket).
pub fn is_long_running(req: &Request<Incoming>) -> bool {
    req.method() == Method::CONNECT
        || req.headers().contains_key(header::UPGRADE)
        || req.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|kv| matches!(kv, "watch=true" | "watch=1" | "follow=true"))
        })
}

// === impl TokenFile ===

/// A bearer-token file, re-read when its modification time changes (checked at
/// most once a second), as kubelet rotates projected service-account tokens.
struct TokenFile {
    path: PathBuf,
    cache: Mutex<Option<(Instant, Option<SystemTime>, HeaderValue)>>,
}

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new(None),
        }
    }

    fn bearer(&self) -> anyhow::Result<HeaderValue> {
        let mut cache = self.cache.lock().expect("token cache poisoned");
        if let Some((checked, _, value)) = cache.as_ref()
            && checked.elapsed() < Duration::from_secs(1)
        {
            return Ok(value.clone());
        }
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if let Some((checked, seen, value)) = cache.as_mut()
            && *seen == mtime
            && mtime.is_some()
        {
            *checked = Instant::now();
            return Ok(value.clone());
        }
        let token = std::fs::read_to_string(&self.path)
            .map_err(|e| anyhow::anyhow!("reading token file {}: {e}", self.path.display()))?;
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                anyhow::anyhow!("token file {} holds an invalid token", self.path.display())
            })?;
        value.set_sensitive(true);
        *cache = Some((Instant::now(), mtime, value.clone()));
        Ok(value)
    }
}
