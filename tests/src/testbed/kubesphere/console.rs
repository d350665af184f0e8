//! The 3.4 console's "Add Cluster" for an agent-connected member: the Cluster object it POSTs
//! (through ks-apiserver to `/apis/cluster.kubesphere.io/v1alpha1/clusters`) when the
//! connection mode is "agent" (`proxy`).
//!
//! From kubesphere/console v3.4.1: the form starts as `IMPORT_CLUSTER_SPEC`
//! (src/components/Forms/Cluster/constants.js ~19-30: `provider: ''`, `joinFederation: true`);
//! the basic-information step sets `metadata.name`, the alias and description annotations and
//! the group label (src/components/Forms/Cluster/BaseInfo/index.jsx ~119-170); the connection
//! step sets `spec.connection.type` (Configuration/index.jsx ~38-75); for `proxy` the
//! kubeconfig is removed before the POST (src/actions/cluster.js ~113-125); every POST with
//! metadata gets the `kubesphere.io/creator` annotation (src/utils/request.js ~90-104).
//! ks-apiserver adds nothing: `spec.enable` stays unset (kubesphere v3.4.1
//! pkg/controller/cluster/cluster_controller.go ~377-378 says as much).

use kube::api::{DynamicObject, PostParams};

use super::clusters_api;

/// What a user fills in on the console's form.
#[derive(Clone, Debug, Default)]
pub struct ConsoleCluster {
    pub name: String,
    /// The logged-in user (the `kubesphere.io/creator` annotation).
    pub creator: String,
    /// `kubesphere.io/alias-name`, if given.
    pub alias: Option<String>,
    /// `kubesphere.io/description`, if given.
    pub description: Option<String>,
    /// `cluster.kubesphere.io/group` (`production`, `development`, `testing`, `demo`), if chosen.
    pub group: Option<String>,
    /// `spec.provider` (the form's default is the empty string).
    pub provider: String,
}

impl ConsoleCluster {
    /// A member `name` added by `creator` with nothing else filled in.
    pub fn new(name: &str, creator: &str) -> Self {
        Self {
            name: name.into(),
            creator: creator.into(),
            ..Default::default()
        }
    }

    /// The object the console POSTs.
    pub fn object(&self) -> serde_json::Value {
        let mut annotations = serde_json::Map::new();
        if let Some(alias) = &self.alias {
            annotations.insert("kubesphere.io/alias-name".into(), alias.clone().into());
        }
        if let Some(description) = &self.description {
            annotations.insert(
                "kubesphere.io/description".into(),
                description.clone().into(),
            );
        }
        annotations.insert("kubesphere.io/creator".into(), self.creator.clone().into());
        let mut metadata = serde_json::json!({
            "name": self.name,
            "annotations": annotations,
        });
        if let Some(group) = &self.group {
            metadata["labels"] = serde_json::json!({ "cluster.kubesphere.io/group": group });
        }
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": metadata,
            "spec": {
                "provider": self.provider,
                "connection": { "type": "proxy" },
                "joinFederation": true,
            },
        })
    }

    /// Creates it on the host through `host`.
    pub async fn create(&self, host: &kube::Client) -> anyhow::Result<DynamicObject> {
        let obj: DynamicObject = serde_json::from_value(self.object())?;
        Ok(clusters_api(host.clone())
            .create(&PostParams::default(), &obj)
            .await?)
    }
}

/// Creates member `name` on the host as the console does for an agent connection, by `admin`.
pub async fn create_agent_cluster(
    host: &kube::Client,
    name: &str,
) -> anyhow::Result<DynamicObject> {
    ConsoleCluster::new(name, "admin").create(host).await
}
