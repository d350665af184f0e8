//! ks-controller-manager's Cluster validating webhook stand-in (kubesphere v3.4.1
//! pkg/controller/cluster/cluster_webhook.go ~48-85), served over HTTPS on loopback and
//! registered on the host the way ks-installer registers it (ks-installer v3.4.1
//! roles/ks-core/ks-core/files/ks-core/templates/webhook.yaml ~92-126): every UPDATE of a
//! Cluster whose old object has `status.uid` makes it dial the member through the NEW
//! kubeconfig (via the [`ServiceDialer`]) and compare the kube-system namespace UID.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ServiceDialer;
use super::dispatcher::base64_decode;
use super::relay;

/// The webhook's path (kubesphere v3.4.1 cmd/controller-manager/app/server.go ~232).
pub const WEBHOOK_PATH: &str = "/validate-cluster-kubesphere-io-v1alpha1";
/// The denial for a kubeconfig of another cluster (cluster_webhook.go ~81-83).
pub const DIFFERENT_CLUSTER: &str = "this kubeconfig corresponds to a different cluster than the previous one, you need to make sure that kubeconfig is not from another cluster";

/// How the webhook is registered.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// The ValidatingWebhookConfiguration's name (ks-installer: `cluster.kubesphere.io`).
    pub configuration_name: String,
    /// An `objectSelector` (ks-installer: `{}`, every Cluster); tests that share a host can
    /// confine the webhook to their own Clusters with a label.
    pub object_selector: Option<(String, String)>,
    /// `timeoutSeconds` (ks-installer: 30).
    pub timeout_seconds: i32,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            configuration_name: "cluster.kubesphere.io".into(),
            object_selector: None,
            timeout_seconds: 30,
        }
    }
}

/// One admission review as the webhook decided it.
#[derive(Clone, Debug)]
pub struct WebhookReview {
    pub cluster: String,
    pub operation: String,
    pub allowed: bool,
    /// The denial text (`Status.reason`, as controller-runtime's `admission.Denied` puts it).
    pub reason: Option<String>,
}

/// A running, registered webhook. Call [`ClusterWebhook::unregister`] before dropping it:
/// with `failurePolicy: Fail`, a registration left behind refuses every Cluster UPDATE.
pub struct ClusterWebhook {
    addr: SocketAddr,
    host: kube::Client,
    options: WebhookOptions,
    state: Arc<State>,
    shutdown: CancellationToken,
}

struct State {
    dialer: ServiceDialer,
    admissions: AtomicU64,
    refusals: AtomicU64,
    reviews: Mutex<Vec<WebhookReview>>,
}

impl ClusterWebhook {
    /// Serves the webhook on `127.0.0.1:0` with a certificate of its own CA, registers it on
    /// the host through `host`, and waits briefly for the apiserver to pick it up.
    pub async fn start(
        host: kube::Client,
        dialer: ServiceDialer,
        options: WebhookOptions,
    ) -> anyhow::Result<Self> {
        crate::testbed::install_crypto_provider();
        let ca = tower_certs::Ca::generate("ks-controller-manager-ca")?;
        let serving = ca.issue_server(&["127.0.0.1"], Duration::from_secs(24 * 3600))?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                tower_certs::parse_certs(&serving.cert_pem)?,
                tower_certs::parse_key(&serving.key_pem)?,
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let state = Arc::new(State {
            dialer,
            admissions: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            reviews: Mutex::new(Vec::new()),
        });
        let stop = shutdown.clone();
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let acceptor = acceptor.clone();
                let state = served.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    relay::serve_connection(tls, peer, stop, move |req, _| {
                        let state = state.clone();
                        async move { state.handle(req).await }
                    });
                });
            }
        });
        let webhook = Self {
            addr,
            host,
            options,
            state,
            shutdown,
        };
        webhook.register(ca.cert_pem()).await?;
        // The apiserver's webhook informer picks a new configuration up within milliseconds.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(webhook)
    }

    /// ks-installer's registration, with `clientConfig.url` in place of the
    /// `ks-controller-manager` Service (the test bed has no pods behind Services).
    async fn register(&self, ca_pem: &str) -> anyhow::Result<()> {
        let object_selector = match &self.options.object_selector {
            Some((k, v)) => serde_json::json!({ "matchLabels": { k: v } }),
            None => serde_json::json!({}),
        };
        let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": { "name": self.options.configuration_name },
            "webhooks": [{
                "admissionReviewVersions": ["v1beta1"],
                "clientConfig": {
                    "caBundle": tower_certs::base64(ca_pem.as_bytes()),
                    "url": format!("https://{}{WEBHOOK_PATH}", self.addr),
                },
                "failurePolicy": "Fail",
                "matchPolicy": "Exact",
                "name": "validating-cluster.kubesphere.io",
                "namespaceSelector": {
                    "matchExpressions": [{ "key": "control-plane", "operator": "DoesNotExist" }],
                },
                "objectSelector": object_selector,
                "rules": [{
                    "apiGroups": ["cluster.kubesphere.io"],
                    "apiVersions": ["v1alpha1"],
                    "operations": ["UPDATE"],
                    "resources": ["clusters"],
                    "scope": "*",
                }],
                "sideEffects": "None",
                "timeoutSeconds": self.options.timeout_seconds,
            }],
        }))?;
        Api::<ValidatingWebhookConfiguration>::all(self.host.clone())
            .patch(
                &self.options.configuration_name,
                &PatchParams::apply("ks-installer").force(),
                &Patch::Apply(&config),
            )
            .await
            .context("registering the Cluster webhook")?;
        Ok(())
    }

    /// Deletes the ValidatingWebhookConfiguration (the server keeps running until dropped).
    pub async fn unregister(&self) -> anyhow::Result<()> {
        match Api::<ValidatingWebhookConfiguration>::all(self.host.clone())
            .delete(&self.options.configuration_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reviews answered (allowed or refused).
    pub fn admissions(&self) -> u64 {
        self.state.admissions.load(Ordering::SeqCst)
    }

    /// Reviews refused.
    pub fn refusals(&self) -> u64 {
        self.state.refusals.load(Ordering::SeqCst)
    }

    /// Every review so far, oldest first.
    pub fn reviews(&self) -> Vec<WebhookReview> {
        self.state
            .reviews
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for ClusterWebhook {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl State {
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<relay::Body> {
        use http_body_util::BodyExt as _;
        if req.uri().path() != WEBHOOK_PATH {
            return relay::text_error(404, "404 page not found");
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return relay::text_error(400, &e.to_string()),
        };
        let review: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return relay::text_error(400, &e.to_string()),
        };
        let request = &review["request"];
        let (allowed, code, reason) = self.decide(request).await;
        self.admissions.fetch_add(1, Ordering::SeqCst);
        if !allowed {
            self.refusals.fetch_add(1, Ordering::SeqCst);
        }
        self.reviews
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(WebhookReview {
                cluster: request["name"].as_str().unwrap_or_default().to_string(),
                operation: request["operation"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                allowed,
                reason: reason.clone(),
            });
        // controller-runtime's ValidationResponse / Errored (vendor/sigs.k8s.io/
        // controller-runtime/pkg/webhook/admission/response.go ~27-80): the text goes to
        // `reason` for Allowed/Denied, to `message` for Errored.
        let mut status = serde_json::json!({ "code": code });
        if let Some(text) = reason {
            let field = if code == 400 { "message" } else { "reason" };
            status[field] = text.into();
        }
        relay::json(
            200,
            &serde_json::json!({
                "apiVersion": review["apiVersion"],
                "kind": "AdmissionReview",
                "response": {
                    "uid": request["uid"],
                    "allowed": allowed,
                    "status": status,
                },
            }),
        )
    }

    /// cluster_webhook.go ~48-85, step by step.
    async fn decide(&self, request: &serde_json::Value) -> (bool, u16, Option<String>) {
        if request["operation"] != "UPDATE" {
            return (true, 200, None);
        }
        let new = &request["object"];
        let old = &request["oldObject"];
        if !new.is_object() || !old.is_object() {
            return (false, 400, Some("there is no content to decode".into()));
        }
        // The cluster created for the first time has no status information.
        let old_uid = old["status"]["uid"].as_str().unwrap_or_default();
        if old_uid.is_empty() {
            return (true, 200, None);
        }
        let name = new["metadata"]["name"].as_str().unwrap_or_default();
        let kubeconfig = new["spec"]["connection"]["kubeconfig"]
            .as_str()
            .and_then(base64_decode)
            .unwrap_or_default();
        let client = match self.dialer.client(&kubeconfig).await {
            Ok((client, _)) => client,
            Err(e) => {
                return (
                    false,
                    403,
                    Some(format!("failed to load cluster config for {name}: {e:#}")),
                );
            }
        };
        let namespaces = Api::<Namespace>::all(client);
        let uid = match tokio::time::timeout(Duration::from_secs(30), namespaces.get("kube-system"))
            .await
        {
            Ok(Ok(ns)) => ns.metadata.uid.unwrap_or_default(),
            Ok(Err(e)) => return (false, 403, Some(e.to_string())),
            Err(_) => return (false, 403, Some("context deadline exceeded".into())),
        };
        if uid != old_uid {
            return (false, 403, Some(DIFFERENT_CLUSTER.into()));
        }
        (true, 200, None)
    }
}
