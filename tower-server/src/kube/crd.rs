//! The Kubernetes objects Tower works with, as Rust types; the CRDs in the
//! server chart are generated from these (`towerctl crds`).
//!
//! - [`Cluster`] (`cluster.kubesphere.io/v1alpha1`, cluster-scoped): KubeSphere's
//!   own schema and CRD shape (field names, no status subresource). Tower fills
//!   in the connection of `proxy` clusters and keeps the `AgentAvailable` (and
//!   in KubeSphere mode `Initialized`) condition; it never touches `direct`
//!   clusters.
//! - [`Agent`] (`tower.kubesphere.io/v1alpha1`, cluster-scoped, named after its
//!   cluster): the agent's token reference and pause switch, and the live detail
//!   of its connection in status.

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Field manager for every server-side apply Tower makes.
pub const FIELD_MANAGER: &str = "tower-server";
/// Condition on a Cluster that says whether its agent is connected.
pub const CONDITION_AGENT_AVAILABLE: &str = "AgentAvailable";
/// Condition on a Cluster that says its one-time set-up (KubeSphere mode:
/// ports, `mc-` Service, endpoints, token, kubeconfig) is done.
pub const CONDITION_INITIALIZED: &str = "Initialized";
/// Condition on an Agent that says whether it is connected.
pub const CONDITION_CONNECTED: &str = "Connected";
/// `spec.connection.type` of a tunnelled cluster.
pub const CONNECTION_PROXY: &str = "proxy";
/// `spec.connection.type` of a directly reachable cluster.
pub const CONNECTION_DIRECT: &str = "direct";

// === Cluster ===

/// KubeSphere's member-cluster object.
#[serde_with::skip_serializing_none]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cluster.kubesphere.io",
    version = "v1alpha1",
    kind = "Cluster",
    plural = "clusters",
    status = "ClusterStatus",
    printcolumn = r#"{"name":"Federated","type":"boolean","jsonPath":".spec.joinFederation"}"#,
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.provider"}"#,
    printcolumn = r#"{"name":"Active","type":"boolean","jsonPath":".spec.enable"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.kubernetesVersion"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Join the cluster to the federation control plane.
    pub join_federation: Option<bool>,
    /// Whether the cluster is enabled.
    pub enable: Option<bool>,
    /// Provider of the cluster (e.g. a cloud).
    pub provider: Option<String>,
    /// How the host reaches the member.
    pub connection: Option<Connection>,
    /// Whether the member's kube-apiserver is exposed externally
    /// (KubeSphere spells it `externalKubeAPIEnabled`).
    #[serde(rename = "externalKubeAPIEnabled")]
    pub external_kube_api_enabled: Option<bool>,
    /// KubeSphere's configuration for the member.
    // `schema_with` hides the Option from schemars: `default` keeps it optional.
    #[serde(default)]
    #[schemars(schema_with = "bytes_schema")]
    pub config: Option<ByteString>,
}

/// `spec.connection`.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// `direct` or `proxy`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// KubeSphere API endpoint of the member.
    #[serde(rename = "kubesphereAPIEndpoint")]
    pub kubesphere_api_endpoint: Option<String>,
    /// Kubernetes API endpoint of the member.
    #[serde(rename = "kubernetesAPIEndpoint")]
    pub kubernetes_api_endpoint: Option<String>,
    /// External Kubernetes API endpoint.
    #[serde(rename = "externalKubernetesAPIEndpoint")]
    pub external_kubernetes_api_endpoint: Option<String>,
    /// Kubeconfig that reaches the member (base64 in JSON).
    // `schema_with` hides the Option from schemars: `default` keeps it optional.
    #[serde(default)]
    #[schemars(schema_with = "bytes_schema")]
    pub kubeconfig: Option<ByteString>,
    /// Token the agent presents (proxy clusters).
    pub token: Option<String>,
    /// Port the Kubernetes API is served on by the proxy.
    #[serde(rename = "kubernetesAPIServerPort")]
    pub kubernetes_api_server_port: Option<u16>,
    /// Port the KubeSphere API is served on by the proxy.
    #[serde(rename = "kubesphereAPIServerPort")]
    pub kubesphere_api_server_port: Option<u16>,
}

/// `status` of a Cluster.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    pub kubernetes_version: Option<String>,
    #[serde(rename = "kubeSphereVersion")]
    pub kube_sphere_version: Option<String>,
    pub node_count: Option<i64>,
    pub zones: Option<Vec<String>>,
    pub region: Option<String>,
    pub configz: Option<std::collections::BTreeMap<String, bool>>,
    pub uid: Option<String>,
}

impl Cluster {
    /// Whether Tower manages this cluster's connection.
    pub fn is_proxy(&self) -> bool {
        self.spec
            .connection
            .as_ref()
            .and_then(|c| c.type_.as_deref())
            == Some(CONNECTION_PROXY)
    }

    /// Whether it asks to join the federation (`spec.joinFederation`): with
    /// `proxy`, the Clusters KubeSphere's own tower serves.
    pub fn joins_federation(&self) -> bool {
        self.spec.join_federation == Some(true)
    }

    pub fn token(&self) -> Option<&str> {
        self.spec
            .connection
            .as_ref()
            .and_then(|c| c.token.as_deref())
            .filter(|t| !t.is_empty())
    }

    /// The kubeconfig the Cluster carries, if any (not empty).
    pub fn kubeconfig(&self) -> Option<&[u8]> {
        self.spec
            .connection
            .as_ref()
            .and_then(|c| c.kubeconfig.as_ref())
            .map(|k| k.0.as_slice())
            .filter(|k| !k.is_empty())
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
    }
}

// === Agent ===

/// One per member, named after its cluster.
#[serde_with::skip_serializing_none]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "tower.kubesphere.io", version = "v1alpha1", kind = "Agent")]
#[kube(plural = "agents", status = "AgentStatus")]
#[kube(
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.agentVersion"}"#,
    printcolumn = r#"{"name":"RTT-ms","type":"integer","jsonPath":".status.rttMillis"}"#,
    printcolumn = r#"{"name":"Since","type":"date","jsonPath":".status.connectedSince"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// A Secret key holding the agent's token. Without it, the Cluster's
    /// `spec.connection.token` is the token.
    pub token_ref: Option<TokenRef>,
    /// A paused agent is refused and its live session ended.
    pub paused: Option<bool>,
}

/// Where a token lives.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRef {
    pub namespace: String,
    pub name: String,
    #[serde(default = "default_token_key")]
    pub key: String,
}

fn default_token_key() -> String {
    "token".into()
}

/// `status` of an Agent.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The kubeconfig that reaches this member through the gateway.
    // `schema_with` hides the Option from schemars: `default` keeps it optional.
    #[serde(default)]
    #[schemars(schema_with = "bytes_schema")]
    pub kubeconfig: Option<ByteString>,
    pub agent_version: Option<String>,
    pub connected_since: Option<Time>,
    pub last_heartbeat: Option<Time>,
    pub rtt_millis: Option<i64>,
    /// The server replica holding the session.
    pub serving_replica: Option<String>,
}

impl Agent {
    pub fn paused(&self) -> bool {
        self.spec.paused.unwrap_or(false)
    }
}

impl AgentStatus {
    /// The replica this status records as holding the session, while it
    /// says Connected.
    pub fn connected_replica(&self) -> Option<&str> {
        let connected = self
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_CONNECTED && c.status == "True");
        self.serving_replica.as_deref().filter(|_| connected)
    }
}

// === Condition ===

/// A condition as KubeSphere's Cluster and Tower's Agent carry them.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub last_update_time: Option<Time>,
    pub last_transition_time: Option<Time>,
    pub reason: Option<String>,
    pub message: Option<String>,
}

/// `[]byte` fields: a base64 string, as Kubernetes encodes them.
fn bytes_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "format": "byte" })
}

/// The Cluster CRD shaped like KubeSphere's own: no status subresource, so
/// that status is written through the main resource as KubeSphere writes it.
pub fn cluster_crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = Cluster::crd();
    for version in &mut crd.spec.versions {
        version.subresources = None;
    }
    crd
}

/// The CRD manifests as YAML documents, in a stable order.
pub fn crd_yaml() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    vec![
        (
            "clusters.cluster.kubesphere.io.yaml",
            yaml_serde::to_string(&cluster_crd()).expect("CRDs serialize"),
        ),
        (
            "agents.tower.kubesphere.io.yaml",
            yaml_serde::to_string(&Agent::crd()).expect("CRDs serialize"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_are_left_out_not_nulled() {
        // Patches built from these types must never null a field someone else owns.
        let status = serde_json::to_value(AgentStatus::default()).unwrap();
        assert_eq!(status, serde_json::json!({}));
        let connection = serde_json::to_value(Connection {
            type_: Some(CONNECTION_PROXY.into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(connection, serde_json::json!({ "type": "proxy" }));
        let back: Connection = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(back, Connection::default());
    }
}
