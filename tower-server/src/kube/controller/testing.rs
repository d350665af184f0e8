//! A mocked apiserver for the controller's unit tests (tower-test's
//! `mock::pair` behind a `kube::Client`), and the objects they use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::client::Body;
use kube::runtime::reflector;
use tokio::sync::Mutex;
use tower_test::mock::{self, Handle, SendResponse};

use super::secrets::TokenRefSecrets;
use crate::kube::crd::{Agent, AgentSpec, Cluster, ClusterSpec, Connection, TokenRef};
use crate::kube::tokens::KubeTokenStore;
use crate::{Server, ServerConfig};

pub(super) const APPLY: &str = "application/apply-patch+yaml";
pub(super) const MERGE: &str = "application/merge-patch+json";
/// The path of the Cluster `gondor` the tests use.
pub(super) const CLUSTER_PATH: &str = "/apis/cluster.kubesphere.io/v1alpha1/clusters/gondor";

/// A `kube::Client` whose requests the test answers one by one.
pub(super) struct Mock {
    pub client: kube::Client,
    handle: Mutex<Handle<Request<Body>, Response<Body>>>,
}

/// One request the client made, and how to answer it.
pub(super) struct Req {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: serde_json::Value,
    send: SendResponse<Response<Body>>,
}

impl Req {
    pub fn reply(self, code: u16, body: &impl serde::Serialize) {
        let body = serde_json::to_vec(body).expect("serializes");
        let response = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("response");
        self.send.send_response(response);
    }

    /// Asserts a server-side apply of `path` by `manager`, forced.
    pub fn assert_apply(&self, path: &str, manager: &str) {
        assert_eq!((self.method.as_str(), self.path.as_str()), ("PATCH", path));
        assert_eq!(self.content_type, APPLY);
        assert_eq!(self.query["fieldManager"], manager);
        assert_eq!(self.query["force"], "true");
    }

    /// Asserts a merge patch of `path` guarded by `resource_version`.
    pub fn assert_status_merge(&self, path: &str, resource_version: Option<&str>) {
        assert_eq!((self.method.as_str(), self.path.as_str()), ("PATCH", path));
        assert_eq!(self.content_type, MERGE);
        assert_eq!(
            self.query["fieldManager"], "tower-server",
            "{:?}",
            self.query
        );
        let guard = serde_json::json!({ "resourceVersion": resource_version });
        assert_eq!(self.body["metadata"], guard);
    }

    pub fn reply_not_found(self) {
        status(self, 404, "NotFound");
    }
}

fn status(req: Req, code: u16, reason: &str) {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": reason, "reason": reason, "code": code,
    });
    req.reply(code, &body);
}

impl Mock {
    pub fn new() -> Self {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        Self {
            client: kube::Client::new(service, "default"),
            handle: Mutex::new(handle),
        }
    }

    /// The next request, within 5 s. Secret list/watch requests (the tokenRef
    /// watches) are refused with 403 on the way, as the chart's RBAC does.
    pub async fn next(&self) -> Req {
        let wait = async {
            loop {
                let req = self.raw().await.expect("a request");
                if !is_secret_watch(&req) {
                    return req;
                }
                status(req, 403, "Forbidden");
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("no request within 5 s")
    }

    /// The next request as it comes (Secret watches included), within 5 s.
    pub async fn any(&self) -> Req {
        tokio::time::timeout(Duration::from_secs(5), self.raw())
            .await
            .expect("no request within 5 s")
            .expect("a request")
    }

    /// The next request as it comes, `None` when none comes within 100 ms.
    pub async fn next_within_100ms(&self) -> Option<Req> {
        tokio::time::timeout(Duration::from_millis(100), self.raw())
            .await
            .ok()
            .flatten()
    }

    /// Asserts that no request other than a Secret watch is pending.
    pub async fn assert_quiet(&self) {
        while let Some(req) = self.next_within_100ms().await {
            assert!(
                is_secret_watch(&req),
                "unexpected request {} {}",
                req.method,
                req.path
            );
            status(req, 403, "Forbidden");
        }
    }

    async fn raw(&self) -> Option<Req> {
        let (request, send) = self.handle.lock().await.next_request().await?;
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let query = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Req {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query,
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            send,
        })
    }

    /// tokenRef Secrets read through this client, with no Agents known.
    pub fn token_ref_secrets(&self) -> TokenRefSecrets {
        let (agents, _) = reflector::store::<Agent>();
        let (triggers, _) = futures::channel::mpsc::unbounded();
        TokenRefSecrets::new(self.client.clone(), agents, triggers)
    }
}

/// A list or watch of Secrets (no object name in the path).
pub(super) fn is_secret_watch(req: &Req) -> bool {
    req.method == "GET" && req.path.ends_with("/secrets")
}

/// A server with a fresh identity in a temporary state dir (kept alive by the
/// returned guard).
pub(super) fn test_server() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig::new(dir.path(), "https://tower.example:8443/");
    let server = Server::with_store(config, Arc::new(KubeTokenStore::default())).expect("server");
    (server, dir)
}

pub(super) fn proxy_cluster(name: &str, token: Option<&str>) -> Cluster {
    Cluster::new(
        name,
        ClusterSpec {
            connection: Some(Connection {
                type_: Some("proxy".into()),
                token: token.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

pub(super) fn agent_with_token_ref(
    name: &str,
    namespace: &str,
    secret: &str,
    paused: bool,
) -> Agent {
    Agent::new(
        name,
        AgentSpec {
            token_ref: Some(TokenRef {
                namespace: namespace.into(),
                name: secret.into(),
                key: "token".into(),
            }),
            paused: Some(paused),
        },
    )
}

pub(super) fn secret(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some([(key.to_string(), ByteString(value.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

/// A mocked apiserver and a controller context on it whose Agent store holds
/// `agents` (listed already).
pub(super) fn mock_ctx(
    leader: bool,
    agents: Vec<Agent>,
) -> (Mock, Arc<super::Ctx>, tempfile::TempDir) {
    use kube::runtime::watcher::Event;
    let mock = Mock::new();
    let (server, dir) = test_server();
    let (agent_store, mut writer) = reflector::store::<Agent>();
    writer.apply_watcher_event(&Event::Init);
    for agent in agents {
        writer.apply_watcher_event(&Event::InitApply(agent));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let (clusters, _) = reflector::store::<Cluster>();
    let (triggers, _) = futures::channel::mpsc::unbounded();
    let leadership = crate::kube::lease::Leadership::default();
    leadership.set(leader);
    let ctx = super::Ctx {
        secrets: TokenRefSecrets::new(mock.client.clone(), agent_store.clone(), triggers),
        server,
        client: mock.client.clone(),
        store: Arc::new(KubeTokenStore::default()),
        config: super::ControllerConfig::new("kubesphere-system", "tower-0"),
        leadership,
        members: Default::default(),
        clusters,
        agents: agent_store,
        backoff: Default::default(),
        seen_agents: Default::default(),
        claimed_ports: Default::default(),
        last_available: Default::default(),
        recorder: kube::runtime::events::Recorder::new(
            mock.client.clone(),
            kube::runtime::events::Reporter {
                controller: "tower-server".into(),
                instance: Some("tower-0".into()),
            },
        ),
        status_path: Default::default(),
    };
    (mock, Arc::new(ctx), dir)
}
