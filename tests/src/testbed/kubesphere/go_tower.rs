//! A stand-in of the Go tower v0.2.1's proxy (kubesphere/tower `pkg/proxy/proxy.go`,
//! `pkg/proxy/proxy_server.go`, `pkg/proxy/http_proxy.go`, `pkg/certs/cert.go`), the
//! component `towerctl migrate` takes members away from. Written from a reading of those files.
//!
//! - Its pod: registered in the [`ServiceDialer`] with the labels ks-installer gives the
//!   `tower` Deployment's pods (ks-installer v3.4.1
//!   roles/ks-multicluster/templates/tower.yaml.j2 ~20-24: `app: tower`,
//!   `app.kubernetes.io/name: tower`), at a loopback IP of its own, so the `mc-<cluster>`
//!   Services lead to it while their selector says so.
//! - [`GoTower::add_member`]: `addCluster` (proxy.go ~374-513) for a proxy Cluster that joins
//!   federation and is not Initialized: ports, the token when empty, Service `mc-<cluster>`,
//!   both endpoints and the `Initialized` condition, in one Update of the main resource.
//! - [`GoTower::set_agent_connected`]: what `handleWebsocket` (proxy.go ~148-299) does when the
//!   Go agent's session opens and closes: serve (or stop serving) the kube port, then
//!   `Update(cluster, connected)` (proxy.go ~536-585).
//!
//! Its kube port is the Go tower's open proxy (proxy_server.go ~101-127, ~166-184): TLS with a
//! certificate of its own CA for the endpoint's ClusterIP; a client certificate is requested
//! and never verified; every request goes to the member's kube-apiserver with the member's
//! admin token in place of whatever the caller sent. Here the agent's SSH channel is a direct
//! TLS connection to the member (the same destination, the same credential).
//!
//! Left out: the WebSocket/SSH agent protocol itself (the [`Kubelet`](crate::testbed::Kubelet)
//! stand-in calls [`GoTower::agent_connects`] instead), the kubesphere port (P+10000, plain
//! HTTP to the member's ks-apiserver), port allocation (the caller picks the port), the
//! Cluster informer (the caller says when a Cluster is added), deleting the Service when a
//! Cluster goes (`delete`, proxy.go ~515-533), and HTTP/2 on the kube port (HTTP/1.1 only;
//! upgrades pass through `relay::forward`, but a stream already spliced outlives the session).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DynamicObject, PostParams};
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{ServiceDialer, clusters_api, relay};
use crate::testbed::ControlPlane;

/// The field manager of every write the stand-in makes: the real v0.2.1 proxy's writes show
/// up in `managedFields` as `proxy` (client-go's default, the binary's name; seen when it ran
/// locally, docs/kubesphere-standin-check.md).
pub const GO_TOWER_FIELD_MANAGER: &str = "proxy";
/// The labels of the Go tower's pods (tower.yaml.j2 ~20-24), which the `mc-<cluster>`
/// Services select (proxy.go ~418-421).
pub const GO_TOWER_POD_LABELS: [(&str, &str); 2] =
    [("app", "tower"), ("app.kubernetes.io/name", "tower")];
/// The Service port of the kube endpoint (proxy.go ~48).
const KUBERNETES_PORT: u16 = 6443;
/// The Service port of the kubesphere endpoint (proxy.go ~49).
const KUBESPHERE_PORT: u16 = 80;
/// `AgentAvailable` messages (proxy.go ~550, ~565).
pub const AGENT_CONNECTED_MESSAGE: &str = "Agent has connected to proxy successfully.";
pub const AGENT_NOT_CONNECTED_MESSAGE: &str = "Agent has not connected to proxy.";
const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// One attempt of the stand-in to write a Cluster.
#[derive(Clone, Debug)]
pub struct GoWrite {
    pub cluster: String,
    /// `setup` (addCluster), `connected` or `disconnected` (`Update(cluster, connected)`).
    pub what: &'static str,
    /// The Cluster's resourceVersion after the write, or why it failed.
    pub result: Result<String, String>,
    pub at: Instant,
}

/// A running Go tower stand-in; cheap to clone (clones share it). Stops when the last clone
/// goes or on [`GoTower::stop`].
#[derive(Clone)]
pub struct GoTower {
    inner: Arc<Inner>,
}

struct Inner {
    host: kube::Client,
    dialer: ServiceDialer,
    pod_ip: IpAddr,
    namespace: String,
    ca: tower_certs::Ca,
    /// `s.agents` and `s.sessions`: the members added, and their serving state.
    members: Mutex<HashMap<String, Member>>,
    writes: Mutex<Vec<GoWrite>>,
    /// One session change at a time.
    ops: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

struct Member {
    kube_port: u16,
    /// The member's kube-apiserver, its CA and the admin token the Go agent would send as
    /// `BearerToken` in its `config` request.
    url: String,
    ca_pem: String,
    bearer: String,
    /// Agent connections open (`len(httpClient)`).
    connections: u32,
    /// The kube port's server while any connection is open (`proxy.cancel`).
    session: Option<CancellationToken>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.dialer.remove_pod(self.pod_ip);
    }
}

impl GoTower {
    /// Starts the stand-in: a fresh CA (cert.go's `GenerateCACertificateAndWriteToFile`
    /// names it `kubesphere`) and its pod at `pod_ip` in `dialer`. `host` is a client of the
    /// host cluster; `namespace` is where the `mc-<cluster>` Services go (`kubesphere-system`,
    /// proxy.go ~51).
    pub async fn start(
        host: kube::Client,
        dialer: ServiceDialer,
        pod_ip: IpAddr,
        namespace: &str,
    ) -> anyhow::Result<Self> {
        crate::testbed::install_crypto_provider();
        let ca = tower_certs::Ca::generate("kubesphere")?;
        dialer.add_pod(&GO_TOWER_POD_LABELS, pod_ip);
        Ok(Self {
            inner: Arc::new(Inner {
                host,
                dialer,
                pod_ip,
                namespace: namespace.to_string(),
                ca,
                members: Mutex::new(HashMap::new()),
                writes: Mutex::new(Vec::new()),
                ops: tokio::sync::Mutex::new(()),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// The Go tower's CA (PEM): what its kubeconfigs trust and its kube port presents.
    pub fn ca_pem(&self) -> &str {
        self.inner.ca.cert_pem()
    }

    /// Where its pod is.
    pub fn pod_ip(&self) -> IpAddr {
        self.inner.pod_ip
    }

    /// Every Cluster write attempted so far, oldest first.
    pub fn writes(&self) -> Vec<GoWrite> {
        lock(&self.inner.writes).clone()
    }

    /// Whether the kube port of `cluster` is being served (an agent is connected).
    pub fn serving(&self, cluster: &str) -> bool {
        lock(&self.inner.members)
            .get(cluster)
            .is_some_and(|m| m.session.is_some())
    }

    /// Stops serving every member and removes its pod from the dialer (the tower pod is
    /// gone; no Cluster is written, as none would be by a process that died).
    pub fn stop(&self) {
        self.inner.shutdown.cancel();
        for member in lock(&self.inner.members).values_mut() {
            member.session = None;
            member.connections = 0;
        }
        self.inner.dialer.remove_pod(self.inner.pod_ip);
    }

    /// `addCluster` (proxy.go ~374-513) for Cluster `name` (created as the console does), with
    /// `kube_port` in place of `allocatePort`'s random 6000-7000 and `kube_port + 10000` as
    /// the kubesphere port. A Cluster already `Initialized` is only remembered (~389-392).
    /// Otherwise: the token when empty (`generateToken`, 32 random bytes as hex, ~403-405,
    /// ~620-625), Service `mc-<name>` created or its spec overwritten (~407-477), both
    /// endpoints from its ClusterIP and `Initialized` True (~481-493), then one Update of the
    /// whole object as read at the start with the current resourceVersion, retried on
    /// conflict only (~495-510). `member` is the cluster the agent will run in.
    pub async fn add_member(
        &self,
        name: &str,
        member: &ControlPlane,
        kube_port: u16,
    ) -> anyhow::Result<()> {
        let inner = &self.inner;
        let api = clusters_api(inner.host.clone());
        let mut cluster = serde_json::to_value(api.get(name).await?)?;
        // ~379-382: anything else is not the proxy's business.
        if cluster["spec"]["joinFederation"] != true
            || cluster["spec"]["connection"]["type"] != "proxy"
        {
            bail!("Cluster {name} is not a proxy Cluster joining federation");
        }
        let remember = || {
            lock(&inner.members).insert(
                name.to_string(),
                Member {
                    kube_port,
                    url: member.url.clone(),
                    ca_pem: member.ca_pem.clone(),
                    bearer: member.admin_token().to_string(),
                    connections: 0,
                    session: None,
                },
            );
        };
        if condition_true(&cluster, "Initialized") {
            remember();
            return Ok(());
        }
        let old = cluster.clone();
        let ks_port = kube_port
            .checked_add(10_000)
            .context("the kubesphere port (kube port + 10000) is out of range")?;
        let conn = &mut cluster["spec"]["connection"];
        conn["kubernetesAPIServerPort"] = kube_port.into();
        conn["kubesphereAPIServerPort"] = ks_port.into();
        if conn["token"].as_str().unwrap_or_default().is_empty() {
            conn["token"] = crate::testbed::random_hex(32).into();
        }

        let service_name = format!("mc-{name}");
        let wanted_spec = serde_json::json!({
            "selector": { "app.kubernetes.io/name": "tower", "app": "tower" },
            "ports": [
                { "name": "kubernetes", "protocol": "TCP", "port": KUBERNETES_PORT, "targetPort": kube_port },
                { "name": "kubesphere", "protocol": "TCP", "port": KUBESPHERE_PORT, "targetPort": ks_port },
            ],
        });
        let services = Api::<Service>::namespaced(inner.host.clone(), &inner.namespace);
        let pp = post_params();
        let service = match services.get_opt(&service_name).await? {
            None => {
                let svc: Service = serde_json::from_value(serde_json::json!({
                    "metadata": {
                        "name": service_name,
                        "namespace": inner.namespace,
                        "labels": { "app.kubernetes.io/name": service_name, "app": service_name },
                    },
                    "spec": wanted_spec,
                }))?;
                services
                    .create(&pp, &svc)
                    .await
                    .with_context(|| format!("failed to create service {service_name}"))?
            }
            Some(existing) if !same_service_spec(&existing, &wanted_spec)? => {
                // ~453-477: its own spec over the existing one, keeping the existing metadata
                // and ClusterIP. (The real DeepEqual compares against a server-defaulted
                // spec and so always finds a difference; the selector and ports end the same.)
                let mut spec = wanted_spec.clone();
                spec["clusterIP"] = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.clone())
                    .into();
                let mut svc: Service = serde_json::from_value(serde_json::json!({ "spec": spec }))?;
                svc.metadata = existing.metadata.clone();
                services
                    .replace(&service_name, &pp, &svc)
                    .await
                    .with_context(|| format!("failed to update svc: {service_name}"))?
            }
            Some(existing) => existing,
        };
        let ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .with_context(|| format!("Service {service_name} has no ClusterIP"))?;
        let conn = &mut cluster["spec"]["connection"];
        conn["kubernetesAPIEndpoint"] = format!("https://{ip}:{KUBERNETES_PORT}").into();
        conn["kubesphereAPIEndpoint"] = format!("http://{ip}:{KUBESPHERE_PORT}").into();
        update_cluster_condition(
            &mut cluster,
            condition(
                "Initialized",
                "True",
                "Initialized",
                "Cluster has been initialized",
            ),
        );

        if cluster != old {
            let mut result = Err(anyhow::anyhow!("not attempted"));
            for delay in backoff() {
                let fresh = match api.get(name).await {
                    Ok(c) => c,
                    Err(e) => {
                        self.record(name, "setup", Err(format!("get: {e}")));
                        result = Err(e.into());
                        break;
                    }
                };
                cluster["metadata"]["resourceVersion"] = fresh.metadata.resource_version.into();
                let attempt = self.replace(&api, name, "setup", &cluster).await;
                let conflict = is_conflict(&attempt);
                result = attempt.map(|_| ()).map_err(anyhow::Error::from);
                if !conflict {
                    break;
                }
                tokio::time::sleep(delay).await;
            }
            result.with_context(|| format!("failed to update cluster {name}"))?;
        }
        remember();
        Ok(())
    }

    /// The Go agent's `config` request (proxy.go ~184-195): refused ("Unauthorized agent")
    /// unless `cluster` was added and `token` is its `spec.connection.token`; then
    /// [`GoTower::set_agent_connected`]`(cluster, true)`.
    pub async fn agent_connects(&self, cluster: &str, token: &str) -> anyhow::Result<()> {
        if !lock(&self.inner.members).contains_key(cluster) {
            bail!("Unauthorized agent");
        }
        let obj = clusters_api(self.inner.host.clone()).get(cluster).await?;
        let expected = obj.data["spec"]["connection"]["token"]
            .as_str()
            .unwrap_or_default();
        if expected != token {
            bail!("Unauthorized agent");
        }
        self.set_agent_connected(cluster, true).await
    }

    /// A Go agent session of `cluster` opens (`connected`) or closes.
    ///
    /// Opening: with no session yet, the kube port `pod_ip:P` starts serving, with a
    /// certificate of the Go CA for the host of `kubesphereAPIEndpoint` (the ClusterIP;
    /// `IssueCertAndKey(u.Hostname())`, proxy.go ~197-204, cert.go ~196-227); then
    /// `Update(cluster, true)` (~255-257): the kubeconfig and `AgentAvailable` True.
    ///
    /// Closing the last session: the kube port stops (listener and connections, `proxy.cancel()`,
    /// ~276-281), then `Update(cluster, false)`: `AgentAvailable` False.
    ///
    /// Each Update is Get then Update, retried on conflict only (`retry.OnError(...,
    /// IsConflict, ...)`): a webhook refusal just fails, recorded in [`GoTower::writes`]. The
    /// result says whether the session changed; the Update's outcome is only recorded, as the
    /// real one only logs it.
    pub async fn set_agent_connected(&self, cluster: &str, connected: bool) -> anyhow::Result<()> {
        let _one_at_a_time = self.inner.ops.lock().await;
        if connected {
            let (port, url, ca_pem, bearer, opened) = {
                let mut members = lock(&self.inner.members);
                let m = members.get_mut(cluster).context("Unauthorized agent")?;
                m.connections += 1;
                (
                    m.kube_port,
                    m.url.clone(),
                    m.ca_pem.clone(),
                    m.bearer.clone(),
                    m.session.is_some(),
                )
            };
            if !opened {
                match self.serve(cluster, port, &url, &ca_pem, &bearer).await {
                    Ok(session) => {
                        if let Some(m) = lock(&self.inner.members).get_mut(cluster) {
                            m.session = Some(session);
                        }
                    }
                    Err(e) => {
                        if let Some(m) = lock(&self.inner.members).get_mut(cluster) {
                            m.connections = m.connections.saturating_sub(1);
                        }
                        return Err(e);
                    }
                }
            }
            self.update(cluster, true).await;
        } else {
            let closed = {
                let mut members = lock(&self.inner.members);
                let Some(m) = members.get_mut(cluster) else {
                    return Ok(());
                };
                if m.connections == 0 {
                    return Ok(());
                }
                m.connections -= 1;
                if m.connections == 0 {
                    if let Some(session) = m.session.take() {
                        session.cancel();
                    }
                    true
                } else {
                    false
                }
            };
            if closed {
                self.update(cluster, false).await;
            }
        }
        Ok(())
    }

    /// Serves the kube port of `cluster` until the returned token is cancelled.
    async fn serve(
        &self,
        cluster: &str,
        port: u16,
        url: &str,
        ca_pem: &str,
        bearer: &str,
    ) -> anyhow::Result<CancellationToken> {
        let obj = clusters_api(self.inner.host.clone()).get(cluster).await?;
        let endpoint = obj.data["spec"]["connection"]["kubesphereAPIEndpoint"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let uri: http::Uri = endpoint
            .parse()
            .with_context(|| format!("Failed to get host {endpoint:?}"))?;
        let host = uri
            .host()
            .with_context(|| format!("Failed to get host {endpoint:?}"))?
            .to_string();
        // cert.go ~23, ~196-227: the default DNS names, the host as a DNS name and as an IP.
        let mut names = vec!["kubernetes", "kubernetes.default", "kubernetes.default.svc"];
        names.push(&host);
        let serving = self.inner.ca.issue_server(&names, CERT_VALIDITY)?;
        let mut tls = rustls::ServerConfig::builder()
            .with_client_cert_verifier(Arc::new(RequestAnyClientCert::new()))
            .with_single_cert(
                tower_certs::parse_certs(&serving.cert_pem)?,
                tower_certs::parse_key(&serving.key_pem)?,
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(SocketAddr::new(self.inner.pod_ip, port))
            .await
            .with_context(|| {
                format!(
                    "Proxy server {cluster}-kubernetes: listen on {}:{port}",
                    self.inner.pod_ip
                )
            })?;

        let member: http::Uri = url.parse()?;
        let upstream = Arc::new(Upstream {
            addr: format!(
                "{}:{}",
                member.host().unwrap_or("127.0.0.1"),
                member.port_u16().unwrap_or(443)
            ),
            server_name: member.host().unwrap_or("127.0.0.1").to_string(),
            tls: relay::trusting(ca_pem)?,
            authorization: http::HeaderValue::from_str(&format!("Bearer {bearer}"))?,
        });
        let session = self.inner.shutdown.child_token();
        let stop = session.clone();
        tokio::spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let tls = tokio::select! {
                        _ = stop.cancelled() => return,
                        tls = acceptor.accept(sock) => match tls {
                            Ok(tls) => tls,
                            Err(_) => return,
                        },
                    };
                    relay::serve_connection(tls, peer, stop, move |req, peer| {
                        let upstream = upstream.clone();
                        async move { upstream.forward(req, peer).await }
                    });
                });
            }
        });
        Ok(session)
    }

    /// `Update(cluster, connected)` (proxy.go ~536-585) under `retry.OnError(DefaultBackoff,
    /// IsConflict, ...)` (~255-257, ~279-281).
    async fn update(&self, name: &str, connected: bool) {
        let what = if connected {
            "connected"
        } else {
            "disconnected"
        };
        let api = clusters_api(self.inner.host.clone());
        for delay in backoff() {
            let obj = match api.get(name).await {
                Ok(c) => c,
                Err(e) => {
                    self.record(name, what, Err(format!("get: {e}")));
                    return;
                }
            };
            let mut cluster = match serde_json::to_value(&obj) {
                Ok(c) => c,
                Err(e) => {
                    self.record(name, what, Err(e.to_string()));
                    return;
                }
            };
            let mut status = if connected { "True" } else { "False" };
            let mut message = if connected {
                AGENT_CONNECTED_MESSAGE.to_string()
            } else {
                AGENT_NOT_CONNECTED_MESSAGE.to_string()
            };
            if connected {
                let endpoint = cluster["spec"]["connection"]["kubernetesAPIEndpoint"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match self.issue_kubeconfig(name, &endpoint) {
                    Ok(kubeconfig) => {
                        cluster["spec"]["connection"]["kubeconfig"] =
                            tower_certs::base64(kubeconfig.as_bytes()).into();
                    }
                    Err(e) => {
                        status = "False";
                        message = format!("Error issuing kubeconfig to cluster {name}, error {e}");
                    }
                }
            }
            // ~568-576: every other condition kept, AgentAvailable replaced at the end.
            update_cluster_condition(
                &mut cluster,
                condition("AgentAvailable", status, "", &message),
            );
            let attempt = self.replace(&api, name, what, &cluster).await;
            if !is_conflict(&attempt) {
                return;
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// `IssueKubeConfig(clusterName, apiServer)` (cert.go ~176-193, ~66-97, ~125-150): the
    /// Go CA, a client certificate `kubernetes-admin` in `system:masters`, cluster and
    /// context named as clientcmd's `CreateBasic` names them.
    pub fn issue_kubeconfig(&self, cluster: &str, server: &str) -> anyhow::Result<String> {
        let user = "kubernetes-admin";
        let client = self.inner.ca.issue_client(
            &tower_certs::ClientIdentity {
                common_name: user.into(),
                organizations: vec!["system:masters".into()],
            },
            CERT_VALIDITY,
        )?;
        let context = format!("{user}@{cluster}");
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": cluster, "cluster": {
                "server": server,
                "certificate-authority-data": tower_certs::base64(self.ca_pem().as_bytes()),
            }}],
            "contexts": [{ "name": context, "context": { "cluster": cluster, "user": user } }],
            "current-context": context,
            "preferences": {},
            "users": [{ "name": user, "user": {
                "client-certificate-data": tower_certs::base64(client.cert_pem.as_bytes()),
                "client-key-data": tower_certs::base64(client.key_pem.as_bytes()),
            }}],
        });
        Ok(yaml_serde::to_string(&config)?)
    }

    /// One Update of the whole object, recorded.
    async fn replace(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        what: &'static str,
        cluster: &serde_json::Value,
    ) -> kube::Result<DynamicObject> {
        let obj: DynamicObject = match serde_json::from_value(cluster.clone()) {
            Ok(o) => o,
            Err(e) => {
                self.record(name, what, Err(e.to_string()));
                return Err(kube::Error::SerdeError(e));
            }
        };
        let result = api.replace(name, &post_params(), &obj).await;
        match &result {
            Ok(written) => self.record(
                name,
                what,
                Ok(written
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default()),
            ),
            Err(e) => {
                tracing::warn!(cluster = name, what, error = %e, "go tower stand-in: Cluster update failed");
                self.record(name, what, Err(e.to_string()));
            }
        }
        result
    }

    fn record(&self, cluster: &str, what: &'static str, result: Result<String, String>) {
        lock(&self.inner.writes).push(GoWrite {
            cluster: cluster.to_string(),
            what,
            result,
            at: Instant::now(),
        });
    }
}

/// The member's kube-apiserver as the Go agent's channel reaches it.
struct Upstream {
    addr: String,
    server_name: String,
    tls: Arc<rustls::ClientConfig>,
    authorization: http::HeaderValue,
}

impl Upstream {
    /// `Server.ServeHTTP` (proxy_server.go ~166-184): the request to the member with
    /// `Authorization: Bearer <member token>` set over whatever the caller sent, through
    /// k8s.io/apimachinery's UpgradeAwareHandler (`relay::forward`).
    async fn forward(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> hyper::Response<relay::Body> {
        let path = relay::path_and_query(&req);
        let io = match self.connect().await {
            Ok(io) => io,
            Err(e) => return relay::text_error(502, &format!("{e:#}")),
        };
        let authorization = self.authorization.clone();
        match relay::forward(req, Box::new(io), &path, peer, move |headers| {
            headers.insert(http::header::AUTHORIZATION, authorization);
        })
        .await
        {
            Ok(resp) => resp,
            Err(e) => relay::text_error(502, &format!("{e:#}")),
        }
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("dial {}", self.addr))?;
        relay::tls_connect(tcp, self.tls.clone(), &self.server_name).await
    }
}

/// `tls.RequestClientCert` with a `VerifyPeerCertificate` that accepts anything
/// (proxy_server.go ~101-127): a client certificate is asked for, not required, and never
/// checked against any CA. (Go still checks the handshake signature, and so does this.)
#[derive(Debug)]
struct RequestAnyClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl RequestAnyClientCert {
    fn new() -> Self {
        Self {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for RequestAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(GO_TOWER_FIELD_MANAGER.into()),
        ..Default::default()
    }
}

fn is_conflict<T>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 409)
}

/// client-go's `retry.DefaultBackoff` (k8s.io/client-go/util/retry/util.go): four attempts,
/// 10 ms apart growing fivefold (jitter left out).
fn backoff() -> impl Iterator<Item = Duration> {
    [10u64, 50, 250, 1250]
        .into_iter()
        .map(Duration::from_millis)
}

/// `isConditionTrue` (proxy.go ~650-657).
fn condition_true(cluster: &serde_json::Value, type_: &str) -> bool {
    cluster["status"]["conditions"]
        .as_array()
        .is_some_and(|list| {
            list.iter()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        })
}

/// A `ClusterCondition` stamped now for both times (`reason` and `message` omitted when
/// empty, as their `omitempty` tags say).
fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
    let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default();
    let mut c = serde_json::json!({
        "type": type_,
        "status": status,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    });
    if !reason.is_empty() {
        c["reason"] = reason.into();
    }
    if !message.is_empty() {
        c["message"] = message.into();
    }
    c
}

/// `updateClusterCondition` (proxy.go ~661-676): the condition of the same type taken out,
/// the new one appended, every other one kept in order.
fn update_cluster_condition(cluster: &mut serde_json::Value, cond: serde_json::Value) {
    let Some(obj) = cluster.as_object_mut() else {
        return;
    };
    let status = obj.entry("status").or_insert_with(|| serde_json::json!({}));
    let Some(status) = status.as_object_mut() else {
        return;
    };
    let list = status
        .entry("conditions")
        .or_insert_with(|| serde_json::json!([]));
    if !list.is_array() {
        *list = serde_json::json!([]);
    }
    if let Some(list) = list.as_array_mut() {
        list.retain(|c| c["type"] != cond["type"]);
        list.push(cond);
    }
}

/// Whether `existing` already has the selector and ports of `wanted` (name, protocol, port,
/// targetPort).
fn same_service_spec(existing: &Service, wanted: &serde_json::Value) -> anyhow::Result<bool> {
    let have = serde_json::to_value(existing.spec.clone().unwrap_or_default())?;
    let ports = |spec: &serde_json::Value| -> Vec<serde_json::Value> {
        spec["ports"]
            .as_array()
            .map(|ports| {
                ports
                    .iter()
                    .map(|p| {
                        serde_json::json!([
                            p["name"],
                            p["protocol"].as_str().unwrap_or("TCP"),
                            p["port"],
                            p["targetPort"],
                        ])
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(have["selector"] == wanted["selector"] && ports(&have) == ports(wanted))
}

/// KubeSphere 3.4's agent Deployment for `name` (kubesphere v3.4.1
/// pkg/kapis/cluster/v1alpha1/handler.go ~184-253).
pub fn go_agent_deployment(name: &str, token: &str) -> k8s_openapi::api::apps::v1::Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "cluster-agent", "namespace": super::KUBESPHERE_NAMESPACE },
        "spec": {
            "selector": { "matchLabels": { "app": "agent", "app.kubernetes.io/part-of": "tower" } },
            "template": {
                "metadata": { "labels": { "app": "agent", "app.kubernetes.io/part-of": "tower" } },
                "spec": {
                    "serviceAccountName": "kubesphere",
                    "containers": [{
                        "name": "agent",
                        "image": "kubesphere/tower:v0.2.1",
                        "command": [
                            "/agent",
                            format!("--name={name}"),
                            format!("--token={token}"),
                            "--proxy-server=http://192.0.2.10:8080",
                            "--keepalive=10s",
                            "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80",
                            "--kubernetes-service=kubernetes.default.svc:443",
                            "--v=0",
                        ],
                    }],
                },
            },
        },
    }))
    .unwrap()
}
