//! A KubeSphere 3.4 stand-in for the test bed: the parts of ks-apiserver and ks-controller-manager
//! that a tower must coexist with, written in Rust from a reading of KubeSphere v3.4.1.
//!
//! The test bed has no pods, no kube-proxy and no KubeSphere, so each part stands in for one
//! real component, and every behaviour names the KubeSphere source it copies:
//!
//! - [`service_dialer`]: kube-proxy. Maps `<ClusterIP>:<port>` of a host Service to
//!   `<pod IP>:<targetPort>` (`127.0.0.1` unless pods are registered), keeping the ClusterIP
//!   as the TLS server name.
//! - [`service_proxy`]: kube-proxy for a client process: a loopback port for one ClusterIP
//!   port, resolved afresh for each connection.
//! - [`go_tower`]: the Go tower v0.2.1's proxy (kubesphere/tower `pkg/proxy/proxy.go`): the
//!   one-time set-up of a proxy Cluster, its open kube port and its Cluster writes.
//! - [`dispatcher`]: the host ks-apiserver's multicluster dispatcher
//!   (`pkg/apiserver/filters/multicluster.go`): `/{api,apis,kapis}/clusters/<c>/…` to the
//!   cluster's `kubesphereAPIEndpoint`, caller's `Host` and `Authorization` kept.
//! - [`member_ks`]: a member cluster's ks-apiserver: verifies KubeSphere JWTs (HS256, shared
//!   secret), answers a whoami and a terminal-like WebSocket, proxies `/api` and `/apis` to the
//!   member kube-apiserver with its own credential, and logs who came.
//! - [`controller`]: ks-controller-manager's cluster controller
//!   (`pkg/controller/cluster/cluster_controller.go`): finalizer, endpoint-if-empty, `Ready`,
//!   versions, `uid`, all through Update of the main resource, with its writes counted.
//! - [`webhook`]: ks-controller-manager's Cluster validating webhook
//!   (`pkg/controller/cluster/cluster_webhook.go`) and its registration from ks-installer.
//! - [`console`]: a Cluster created the way the 3.4 console adds an agent-connected member.
//!
//! [`install_cluster_crd`] puts the chart's Cluster CRD on a host in KubeSphere's shape (no
//! status subresource), so status is written through the main resource as in KubeSphere.

pub mod console;
pub mod controller;
pub mod dispatcher;
pub mod go_tower;
pub mod member_ks;
mod relay;
pub mod service_dialer;
pub mod service_proxy;
pub mod webhook;

use std::path::Path;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};

use super::ControlPlane;

pub use console::{ConsoleCluster, create_agent_cluster};
pub use controller::{
    ClusterController, ControllerOptions, SyncOutcome, WriteCounts, remove_finalizer,
};
pub use dispatcher::{Dispatcher, cluster_of_path};
pub use go_tower::{GoTower, GoWrite, go_agent_deployment};
pub use member_ks::{
    KsRequest, KubeUpstream, MemberKs, MemberKsConfig, TERMINAL_PATH_PREFIX, WHOAMI_PATH, mint_jwt,
};
pub use service_dialer::{Endpoint, ServiceDialer};
pub use service_proxy::{ServiceProxy, kubeconfig_via};
pub use webhook::{ClusterWebhook, WebhookOptions, WebhookReview};

/// KubeSphere's own namespace, where tower's `mc-<cluster>` Services live.
pub const KUBESPHERE_NAMESPACE: &str = "kubesphere-system";
/// Label that marks the host cluster's Cluster object
/// (kubesphere v3.4.1 staging/src/kubesphere.io/api/cluster/v1alpha1/cluster_types.go ~30).
pub const HOST_CLUSTER_LABEL: &str = "cluster-role.kubesphere.io/host";
/// KubeSphere's finalizer on Cluster objects (same file ~36).
pub const CLUSTER_FINALIZER: &str = "finalizer.cluster.kubesphere.io";

/// The `cluster.kubesphere.io/v1alpha1` `clusters` resource, untyped: the stand-ins read and
/// write whole objects, so no field is lost whatever the CRD carries.
pub fn cluster_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster.kubesphere.io", "v1alpha1", "Cluster"),
        "clusters",
    )
}

/// `Api` over Cluster objects as [`DynamicObject`]s.
pub fn clusters_api(client: kube::Client) -> Api<DynamicObject> {
    Api::all_with(client, &cluster_resource())
}

/// Applies the tower-server chart's Cluster CRD to `host` with any status subresource
/// removed (KubeSphere's CRD has `subresources: {}`, kubesphere v3.4.1
/// config/ks-core/crds/cluster.kubesphere.io_clusters.yaml ~183), creates `kubesphere-system`,
/// and waits until the CRD is established.
pub async fn install_cluster_crd(host: &ControlPlane) -> anyhow::Result<()> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/tower-server/crds/clusters.cluster.kubesphere.io.yaml");
    let text = std::fs::read_to_string(&file)?;
    let mut crd: serde_json::Value = yaml_serde::from_str(&text)?;
    if let Some(versions) = crd["spec"]["versions"].as_array_mut() {
        for version in versions {
            if let Some(v) = version.as_object_mut() {
                v.remove("subresources");
            }
        }
    }
    let manifest = serde_json::to_string(&crd)?;
    host.run_kubectl(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&manifest),
    )
    .await?;
    host.run_kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd/clusters.cluster.kubesphere.io",
        ],
        None,
    )
    .await?;
    let _ = host
        .run_kubectl(&["create", "namespace", KUBESPHERE_NAMESPACE], None)
        .await;
    Ok(())
}

/// Whether the Cluster's `Ready` condition is `True`
/// (kubesphere v3.4.1 pkg/controller/cluster/utils/utils.go ~25-32).
pub fn is_cluster_ready(cluster: &serde_json::Value) -> bool {
    cluster["status"]["conditions"]
        .as_array()
        .is_some_and(|conds| {
            conds
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The KubeSphere parts that run on the host, started together: the kube-proxy stand-in,
/// ks-apiserver's dispatcher, and ks-controller-manager's cluster controller and webhook.
pub struct KubeSphereHost {
    pub dialer: ServiceDialer,
    pub dispatcher: Dispatcher,
    pub controller: ClusterController,
    pub webhook: ClusterWebhook,
}

impl KubeSphereHost {
    /// Installs the Cluster CRD in KubeSphere's shape ([`install_cluster_crd`]) and starts every
    /// host part against `host`, the dispatcher verifying JWTs with `jwt_secret`.
    pub async fn start(
        host: &ControlPlane,
        jwt_secret: &[u8],
        controller: ControllerOptions,
        webhook: WebhookOptions,
    ) -> anyhow::Result<Self> {
        install_cluster_crd(host).await?;
        let client = host.client().await?;
        let dialer = ServiceDialer::new(client.clone());
        let webhook = ClusterWebhook::start(client.clone(), dialer.clone(), webhook).await?;
        let dispatcher =
            Dispatcher::start(client.clone(), dialer.clone(), Some(jwt_secret.to_vec())).await?;
        let controller = ClusterController::start(client, dialer.clone(), controller);
        Ok(Self {
            dialer,
            dispatcher,
            controller,
            webhook,
        })
    }

    /// Stops the controller and the dispatcher and removes the webhook's registration (a
    /// registration left behind with `failurePolicy: Fail` refuses every Cluster UPDATE).
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.controller.stop();
        self.dispatcher.stop();
        self.webhook.unregister().await?;
        self.webhook.stop();
        Ok(())
    }
}
