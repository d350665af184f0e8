//! A member cluster's ks-apiserver stand-in: plain HTTP on loopback that authenticates
//! KubeSphere JWTs (HS256 with the shared `jwtSecret`), answers a whoami and a terminal-like
//! WebSocket under `/kapis`, proxies `/api` and `/apis` to the member kube-apiserver with its
//! own credential, and logs every request's verified user for the test to read.
//!
//! The filter order is ks-apiserver's (kubesphere v3.4.1 pkg/apiserver/apiserver.go ~335-378):
//! authentication first (a present but bad token is a 401), then authorization (an anonymous
//! caller, no `Authorization` at all, is a 403: KubeSphere's `anonymous` GlobalRole grants
//! nothing here), then the kube-apiserver proxy. Every verified user is allowed (the stand-in
//! has no RBAC and no User objects).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::HeaderValue;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::relay::{self, Body};
use crate::testbed::ControlPlane;

/// The stand-in's whoami (not a real KubeSphere path): `{"username", "tokenType", "host", "path"}`.
pub const WHOAMI_PATH: &str = "/kapis/standin.kubesphere.io/v1alpha1/whoami";
/// Prefix of the terminal path (kubesphere v3.4.1 pkg/kapis/terminal/v1alpha2/register.go ~35-53:
/// `/namespaces/{namespace}/pods/{pod}/exec` under `terminal.kubesphere.io/v1alpha2`); after
/// the JWT check a WebSocket Upgrade is answered `101` and every byte is echoed back.
pub const TERMINAL_PATH_PREFIX: &str = "/kapis/terminal.kubesphere.io/v1alpha2/namespaces/";

/// How a [`MemberKs`] is set up.
#[derive(Clone)]
pub struct MemberKsConfig {
    /// The shared `authentication.jwtSecret` of the host and its members.
    pub jwt_secret: Vec<u8>,
    /// The member kube-apiserver: `127.0.0.1` port, its CA, and the bearer token the
    /// stand-in uses there (ks-apiserver's own service account in a real member).
    pub kube: Option<KubeUpstream>,
}

/// The member kube-apiserver behind `/api` and `/apis`.
#[derive(Clone)]
pub struct KubeUpstream {
    pub port: u16,
    pub ca_pem: String,
    pub token: String,
}

impl MemberKsConfig {
    /// Proxies `/api` and `/apis` to `member` with its admin token.
    pub fn for_member(member: &ControlPlane, jwt_secret: &[u8]) -> Self {
        Self {
            jwt_secret: jwt_secret.to_vec(),
            kube: Some(KubeUpstream {
                port: member.port(),
                ca_pem: member.ca_pem.clone(),
                token: member.admin_token().to_string(),
            }),
        }
    }
}

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct KsRequest {
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// The `Host` header as received.
    pub host: Option<String>,
    /// Whether an `Authorization` header arrived.
    pub authorization: bool,
    /// The verified user (`None`: anonymous or refused).
    pub user: Option<String>,
    /// Whether it asked for an Upgrade.
    pub upgrade: bool,
    /// The status the stand-in answered (the upstream's for proxied requests).
    pub status: u16,
}

/// A running member ks-apiserver stand-in; stops when dropped.
pub struct MemberKs {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<KsRequest>>>,
    shutdown: CancellationToken,
}

impl MemberKs {
    /// Starts serving on `127.0.0.1:0`.
    pub async fn start(config: MemberKsConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let state = Arc::new(State {
            config,
            log: log.clone(),
        });
        tokio::spawn(relay::serve(
            listener,
            shutdown.clone(),
            move |req, peer| {
                let state = state.clone();
                async move { state.handle(req, peer).await }
            },
        ));
        Ok(Self {
            addr,
            log,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<KsRequest> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets the requests so far.
    pub fn clear(&self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for MemberKs {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct State {
    config: MemberKsConfig,
    log: Arc<Mutex<Vec<KsRequest>>>,
}

impl State {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let mut entry = KsRequest {
            method: req.method().to_string(),
            path: relay::path_and_query(&req),
            host: req
                .headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            authorization: req.headers().contains_key(http::header::AUTHORIZATION),
            user: None,
            upgrade: relay::is_upgrade(req.headers()),
            status: 0,
        };
        let resp = match authenticate(
            req.headers().get(http::header::AUTHORIZATION),
            &self.config.jwt_secret,
        ) {
            Authn::Refused(message) => relay::status_json(401, "Unauthorized", &message),
            Authn::Anonymous => forbidden_anonymous(&req),
            Authn::User(claims) => {
                entry.user = Some(claims.username.clone());
                self.route(req, peer, &claims).await
            }
        };
        entry.status = resp.status().as_u16();
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry);
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        claims: &Claims,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == WHOAMI_PATH {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok());
            return relay::json(
                200,
                &serde_json::json!({
                    "username": claims.username,
                    "tokenType": claims.token_type,
                    "host": host,
                    "path": relay::path_and_query(&req),
                }),
            );
        }
        if path.starts_with(TERMINAL_PATH_PREFIX) && path.ends_with("/exec") {
            return terminal(req);
        }
        // IsKubernetesRequest: the API prefix is `api` or `apis`
        // (kubesphere v3.4.1 pkg/apiserver/request/requestinfo.go ~143-155, 68).
        let first = path.trim_matches('/').split('/').next().unwrap_or_default();
        if first == "api" || first == "apis" {
            return match &self.config.kube {
                Some(kube) => self.kube_proxy(req, peer, kube).await,
                None => relay::status_json(404, "NotFound", "the stand-in has no kube-apiserver"),
            };
        }
        relay::status_json(
            404,
            "NotFound",
            &format!("the ks-apiserver stand-in serves no {path}"),
        )
    }

    /// kubesphere v3.4.1 pkg/apiserver/filters/kubeapiserver.go ~53-74: the caller's
    /// `Authorization` is deleted and the request goes to kube-apiserver with ks-apiserver's
    /// own credential (its rest.Config transport), upgrades included.
    async fn kube_proxy(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        kube: &KubeUpstream,
    ) -> Response<Body> {
        let target = relay::path_and_query(&req);
        let io = async {
            let tcp = TcpStream::connect(("127.0.0.1", kube.port)).await?;
            let tls = relay::tls_connect(tcp, relay::trusting(&kube.ca_pem)?, "127.0.0.1").await?;
            anyhow::Ok(tls)
        };
        let io = match io.await {
            Ok(io) => io,
            Err(e) => return relay::text_error(500, &format!("{e:#}")),
        };
        let bearer = format!("Bearer {}", kube.token);
        let result = relay::forward(req, Box::new(io), &target, peer, |headers| {
            headers.remove(http::header::AUTHORIZATION);
            if let Ok(v) = HeaderValue::from_str(&bearer) {
                headers.insert(http::header::AUTHORIZATION, v);
            }
        })
        .await;
        result.unwrap_or_else(|e| relay::text_error(500, &format!("{e:#}")))
    }
}

/// An anonymous caller refused by authorization, as `responsewriters.Forbidden` words it for
/// a non-resource request (k8s.io/apiserver handlers/responsewriters/errors.go `forbiddenMessage`).
fn forbidden_anonymous(req: &Request<Incoming>) -> Response<Body> {
    let verb = match *req.method() {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "get",
    };
    relay::status_json(
        403,
        "Forbidden",
        &format!(
            "forbidden: User \"system:anonymous\" cannot {verb} path \"{}\"",
            req.uri().path()
        ),
    )
}

/// `101` with the RFC 6455 accept key, then every byte echoed.
fn terminal(mut req: Request<Incoming>) -> Response<Body> {
    if !relay::is_upgrade(req.headers()) {
        return relay::status_json(400, "BadRequest", "the terminal needs a WebSocket Upgrade");
    }
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        }
    });
    Response::builder()
        .status(101)
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", websocket_accept(&key))
        .body(relay::empty())
        .expect("valid response")
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    let mut input = key.to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    STANDARD.encode(digest.as_ref())
}

// === JWT ===

/// The claims the stand-in reads, named as KubeSphere's
/// (kubesphere v3.4.1 pkg/apiserver/authentication/token/issuer.go ~80-108: `username`,
/// `token_type`, and the registered `exp`, `iat`, `sub`, `iss`).
#[derive(Clone, Debug)]
pub(crate) struct Claims {
    pub username: String,
    pub token_type: Option<String>,
}

pub(crate) enum Authn {
    /// No `Authorization` header: the anonymous authenticator's `system:anonymous`.
    Anonymous,
    /// A verified token.
    User(Claims),
    /// A header that does not authenticate: the 401 message.
    Refused(String),
}

/// KubeSphere's authenticators in union (kubesphere v3.4.1 pkg/apiserver/apiserver.go ~367-377):
/// anonymous when there is no `Authorization` (request/anonymous/anonymous.go ~33-45), the
/// bearer JWT otherwise (request/bearertoken/bearertoken.go ~39-64, token/issuer.go ~175-211).
/// A 401 says `Unauthorized: <err>` (filters/authentication.go ~68-77); a header no
/// authenticator takes up has a nil error, which Go prints as `%!s(<nil>)`.
pub(crate) fn authenticate(header: Option<&HeaderValue>, secret: &[u8]) -> Authn {
    let Some(value) = header.and_then(|v| v.to_str().ok()).map(str::trim) else {
        return Authn::Anonymous;
    };
    if value.is_empty() {
        return Authn::Anonymous;
    }
    let parts: Vec<&str> = value.split(' ').collect();
    if parts.len() < 2 || !parts[0].eq_ignore_ascii_case("bearer") || parts[1].is_empty() {
        return Authn::Refused("Unauthorized: %!s(<nil>)".into());
    }
    match verify_jwt(parts[1], secret) {
        Ok(claims) => Authn::User(claims),
        Err(e) => Authn::Refused(format!("Unauthorized: {e}")),
    }
}

/// Verifies an HS256 token the way `issuer.Verify` does: signature (HS256 only here; RS256
/// ID tokens are not access tokens), then `exp`, then `iat` with a 10 s clock skew
/// (authentication options' `maximumClockSkew` default). `token_type` is not checked, as in
/// KubeSphere, and no token cache is consulted: a member runs with `accessTokenMaxAge: 0`
/// (ks-installer v3.4.1 roles/ks-core/config/templates/kubesphere-config.yaml.j2 ~15-17), which
/// skips the cache (kubesphere v3.4.1 pkg/models/auth/token.go ~77-90). The real one also
/// needs a User object of that name (authenticators/jwt/jwt.go ~63-71); the stand-in does not.
pub(crate) fn verify_jwt(token: &str, secret: &[u8]) -> Result<Claims, String> {
    let segments: Vec<&str> = token.split('.').collect();
    if segments.len() != 3 {
        return Err("token contains an invalid number of segments".into());
    }
    let decode = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|e| format!("token is malformed: {e}"))
    };
    let header: serde_json::Value = serde_json::from_slice(&decode(segments[0])?)
        .map_err(|e| format!("token is malformed: {e}"))?;
    match header["alg"].as_str() {
        Some("HS256") => {}
        other => {
            return Err(format!(
                "token is unverifiable: error while executing keyfunc: unexpect signature algorithm {}",
                other.unwrap_or("<nil>")
            ));
        }
    }
    let signature = decode(segments[2])?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let signed = format!("{}.{}", segments[0], segments[1]);
    ring::hmac::verify(&key, signed.as_bytes(), &signature)
        .map_err(|_| "token signature is invalid: signature is invalid".to_string())?;
    let claims: serde_json::Value = serde_json::from_slice(&decode(segments[1])?)
        .map_err(|e| format!("token is malformed: {e}"))?;
    let now = unix_now();
    if let Some(exp) = claims["exp"].as_i64()
        && now >= exp
    {
        return Err(format!("jwt: token is expired by {}s", now - exp));
    }
    if let Some(iat) = claims["iat"].as_i64()
        && iat > now + 10
    {
        return Err(format!(
            "jwt: token used before issued, iat:{iat}, now:{now}"
        ));
    }
    Ok(Claims {
        username: claims["username"].as_str().unwrap_or_default().to_string(),
        token_type: claims["token_type"].as_str().map(str::to_string),
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A KubeSphere access token for `username`, valid for `ttl`, signed HS256 with `secret`:
/// the claims `issuer.IssueTo` writes (kubesphere v3.4.1
/// pkg/apiserver/authentication/token/issuer.go ~121-172): `username`, `token_type`
/// (`access_token`, ~40), `iat`, `exp`, `sub` (the username) and `iss` (the OAuth issuer,
/// `kubesphere` by default).
pub fn mint_jwt(secret: &[u8], username: &str, ttl: Duration) -> String {
    let now = unix_now();
    let header = serde_json::json!({ "alg": "HS256", "typ": "JWT" });
    let claims = serde_json::json!({
        "username": username,
        "token_type": "access_token",
        "iat": now,
        "exp": now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
        "sub": username,
        "iss": "kubesphere",
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let signature = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}
