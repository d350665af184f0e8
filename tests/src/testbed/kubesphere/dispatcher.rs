//! The host ks-apiserver's multicluster dispatcher stand-in (kubesphere v3.4.1
//! pkg/apiserver/filters/multicluster.go ~55-148): plain HTTP on loopback that sends every
//! request naming a member cluster to that cluster, the way the console's requests travel.
//!
//! For a cluster with a `kubesphereAPIEndpoint` the request goes to the endpoint's scheme and
//! host with `/clusters/<c>` cut from the path, the caller's `Host` and `Authorization` kept,
//! through Go's `http.DefaultTransport` (no client certificate; for https, system roots
//! only), and an HTTP/1.1 Upgrade is spliced. Connections go through the
//! [`ServiceDialer`], as ks-apiserver's would go through kube-proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::body::Incoming;
use hyper::{Request, Response};
use kube::api::DynamicObject;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::member_ks::{Authn, authenticate};
use super::relay::{self, Body, Io};
use super::{HOST_CLUSTER_LABEL, ServiceDialer, clusters_api, is_cluster_ready};

/// `proxyURLFormat` (multicluster.go ~35): a direct cluster without a ks endpoint is reached
/// through its kube-apiserver's service proxy to ks-apiserver.
const PROXY_URL_FORMAT: &str = "/api/v1/namespaces/kubesphere-system/services/:ks-apiserver:/proxy";

/// The cluster a request path names, exactly as ks-apiserver's `RequestInfoFactory` parses it
/// (kubesphere v3.4.1 pkg/apiserver/request/requestinfo.go ~157-177, prefixes from
/// pkg/apiserver/apiserver.go ~309): at least three segments, the first an API prefix
/// (`api`, `apis`, `kapis`, `kapi`), the second `clusters`. So `/clusters/<c>/…` names no
/// cluster: ks-apiserver serves it as a host request.
pub fn cluster_of_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if parts.len() < 3 || !["api", "apis", "kapis", "kapi"].contains(&parts[0]) {
        return None;
    }
    (parts[1] == "clusters").then(|| parts[2].to_string())
}

/// A running dispatcher; stops when dropped.
pub struct Dispatcher {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Dispatcher {
    /// Starts on `127.0.0.1:0`, reading Clusters through `host` and dialling through `dialer`.
    ///
    /// With `jwt_secret`, a request whose `Authorization` does not verify is refused 401 on
    /// the host before dispatch, as ks-apiserver authenticates first
    /// (pkg/apiserver/apiserver.go ~360-378); a request without one goes on as anonymous.
    pub async fn start(
        host: kube::Client,
        dialer: ServiceDialer,
        jwt_secret: Option<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let state = Arc::new(State {
            host,
            dialer,
            jwt_secret,
        });
        tokio::spawn(relay::serve(
            listener,
            shutdown.clone(),
            move |req, peer| {
                let state = state.clone();
                async move { state.handle(req, peer).await }
            },
        ));
        Ok(Self { addr, shutdown })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct State {
    host: kube::Client,
    dialer: ServiceDialer,
    jwt_secret: Option<Vec<u8>>,
}

impl State {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let uri = relay::path_and_query(&req);
        if let Some(secret) = &self.jwt_secret
            && let Authn::Refused(message) =
                authenticate(req.headers().get(http::header::AUTHORIZATION), secret)
        {
            return relay::status_json(401, "Unauthorized", &message);
        }
        // multicluster.go ~61-64: no cluster in the path, the host serves it.
        let Some(name) = cluster_of_path(req.uri().path()) else {
            return host_local(&uri);
        };
        // ~66-74: an unknown cluster is a 400 written with WriteRawJSON of a *StatusError,
        // which has no JSON tags: the body is `{"ErrStatus": {...}}`.
        let cluster = match clusters_api(self.host.clone()).get_opt(&name).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                let mut status =
                    relay::status_value(400, "BadRequest", &format!("cluster {name} not exists"));
                if let Some(s) = status.as_object_mut() {
                    s.remove("kind");
                    s.remove("apiVersion");
                }
                return relay::json(400, &serde_json::json!({ "ErrStatus": status }));
            }
            Err(e) => return relay::internal_error(&uri, &e.to_string()),
        };
        // ~76-81: the host cluster is served locally.
        if cluster
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(HOST_CLUSTER_LABEL))
        {
            return host_local(&uri);
        }
        let object = serde_json::to_value(&cluster).unwrap_or_default();
        // ~83-92: not Ready, or no usable kubeconfig (clusterclient.go ~93-130 builds the inner
        // cluster from it and gives nil on failure): 500 "not ready".
        if !is_cluster_ready(&object) || !kubeconfig_usable(&object) {
            return relay::internal_error(&uri, &format!("cluster {name} is not ready"));
        }
        let connection = &object["spec"]["connection"];
        let ks_endpoint = connection["kubesphereAPIEndpoint"]
            .as_str()
            .unwrap_or_default();
        let cluster_segment = format!("/clusters/{name}");
        let stripped = uri.replacen(&cluster_segment, "", 1);
        // ~100-139: direct, no ks endpoint: through kube-apiserver's service proxy.
        if connection["type"] == "direct" && ks_endpoint.is_empty() {
            return self.via_service_proxy(req, &cluster, &uri, &stripped).await;
        }
        // ~139-147: everything else to the ks endpoint's scheme and host.
        if ks_endpoint.is_empty() {
            return relay::text_error(500, "unsupported protocol scheme \"\"");
        }
        let io = match self.dial(ks_endpoint).await {
            Ok(io) => io,
            Err(e) => return relay::text_error(500, &format!("{e:#}")),
        };
        relay::forward(req, io, &stripped, peer, |_| {})
            .await
            .unwrap_or_else(|e| relay::text_error(500, &format!("{e:#}")))
    }

    /// A connection to `endpoint`'s host and port as `http.DefaultTransport` makes it.
    async fn dial(&self, endpoint: &str) -> anyhow::Result<Box<dyn Io>> {
        let ep = self.dialer.endpoint(endpoint).await?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::net::TcpStream::connect(ep.addr),
        )
        .await
        .map_err(|_| anyhow::anyhow!("dial tcp {}:{}: i/o timeout", ep.host, ep.port))??;
        match ep.scheme.as_str() {
            "http" => Ok(Box::new(tcp)),
            "https" => Ok(Box::new(
                relay::tls_connect(tcp, relay::system_roots(), &ep.host).await?,
            )),
            other => anyhow::bail!("unsupported protocol scheme \"{other}\""),
        }
    }

    /// multicluster.go ~100-139: the request goes to
    /// `<kube endpoint>/api/v1/namespaces/kubesphere-system/services/:ks-apiserver:/proxy<path>`
    /// with the cluster's kubeconfig credential; the caller's `Authorization` moves to
    /// `X-KubeSphere-Authorization` and `dryRun` is spelled `dryrun`. Upgrades are not
    /// carried on this path by the stand-in.
    async fn via_service_proxy(
        &self,
        req: Request<Incoming>,
        cluster: &DynamicObject,
        uri: &str,
        stripped: &str,
    ) -> Response<Body> {
        use http_body_util::BodyExt as _;
        let object = serde_json::to_value(cluster).unwrap_or_default();
        let kubeconfig = object["spec"]["connection"]["kubeconfig"]
            .as_str()
            .and_then(base64_decode)
            .unwrap_or_default();
        let (client, _) = match self.dialer.client(&kubeconfig).await {
            Ok(c) => c,
            Err(e) => return relay::internal_error(uri, &format!("{e:#}")),
        };
        let target = format!("{PROXY_URL_FORMAT}{stripped}");
        let target = if target.contains("dryRun") {
            target.replacen("dryRun", "dryrun", 1)
        } else {
            target
        };
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) => return relay::text_error(500, &e.to_string()),
        };
        let mut out = http::Request::builder()
            .method(parts.method)
            .uri(target)
            .body(kube::client::Body::from(body))
            .expect("valid request");
        let mut headers = parts.headers;
        if let Some(auth) = headers.remove(http::header::AUTHORIZATION) {
            headers.insert("x-kubesphere-authorization", auth);
        } else {
            headers.insert("x-kubesphere-authorization", HeaderValue::from_static(""));
        }
        headers.remove(http::header::HOST);
        *out.headers_mut() = headers;
        match client.send(out).await {
            Ok(resp) => resp
                .map(|b| http_body_util::BodyExt::boxed_unsync(b.map_err(relay::BoxError::from))),
            Err(e) => relay::text_error(500, &e.to_string()),
        }
    }
}

/// What the stand-in answers for requests ks-apiserver serves on the host itself: it has no
/// host API, so a 404 `Status` saying so.
fn host_local(uri: &str) -> Response<Body> {
    relay::status_json(
        404,
        "NotFound",
        &format!("the dispatcher stand-in serves no host API ({uri})"),
    )
}

/// Whether `spec.connection.kubeconfig` decodes to a kubeconfig with a current context and a
/// server, as `clientcmd.NewClientConfigFromBytes(...).ClientConfig()` needs.
fn kubeconfig_usable(cluster: &serde_json::Value) -> bool {
    let Some(bytes) = cluster["spec"]["connection"]["kubeconfig"]
        .as_str()
        .and_then(base64_decode)
    else {
        return false;
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| kube::config::Kubeconfig::from_yaml(s).ok())
        .and_then(|k| super::service_dialer::current_server(&k))
        .is_some()
}

pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}
