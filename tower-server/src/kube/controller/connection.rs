//! The leader's writes to a proxy Cluster's `spec.connection`: a generated
//! token when it has none, and the synthesized kubeconfig and endpoints.

use k8s_openapi::ByteString;
use kube::ResourceExt;
use kube::api::Api;
use tower_proto::Secret;

use super::{ControllerConfig, TOKEN_FIELD_MANAGER};
use crate::Server;
use crate::kube::crd::{Cluster, FIELD_MANAGER};

/// Generates `spec.connection.token` when the Cluster has none (server-side
/// apply, field manager `tower-server-token`); returns whether it wrote.
pub(super) async fn ensure_token(client: &kube::Client, cluster: &Cluster) -> kube::Result<bool> {
    if cluster.token().is_some() {
        return Ok(false);
    }
    let name = cluster.name_any();
    let token = Secret::generate();
    let connection = serde_json::json!({ "token": token.expose() });
    apply_connection(client, &name, TOKEN_FIELD_MANAGER, connection).await?;
    tracing::info!(cluster = %name, "generated a token for the proxy cluster");
    Ok(true)
}

/// Creates the Agent of a cluster that has none (server-side apply of its
/// name only, field manager `tower-server`): the replica holding a session
/// reports it there, for the leader and the other replicas to read.
pub(super) async fn create_agent(client: &kube::Client, name: &str) -> kube::Result<()> {
    let agent = serde_json::json!({
        "apiVersion": "tower.kubesphere.io/v1alpha1",
        "kind": "Agent",
        "metadata": { "name": name },
        "spec": {},
    });
    Api::<crate::kube::crd::Agent>::all(client.clone())
        .patch(
            name,
            &kube::api::PatchParams::apply(FIELD_MANAGER),
            &kube::api::Patch::Apply(&agent),
        )
        .await?;
    tracing::info!(cluster = %name, "created the cluster's Agent, to report its session on");
    Ok(())
}

/// Keeps the kubeconfig (fresh when its certificate nears expiry) and the
/// endpoints in `spec.connection` (server-side apply, field manager
/// `tower-server`); returns the kubeconfig.
pub(super) async fn write_connection(
    client: &kube::Client,
    server: &Server,
    config: &ControllerConfig,
    cluster: &Cluster,
) -> anyhow::Result<Vec<u8>> {
    let name = cluster.name_any();
    let gateway_url = server.gateway_url();
    let connection = cluster.spec.connection.clone().unwrap_or_default();
    let current = connection
        .kubeconfig
        .as_ref()
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let kubeconfig = if server.kubeconfig_still_good(&current, &name, config.renew_before) {
        current.clone()
    } else {
        tracing::info!(cluster = %name, "writing a fresh kubeconfig");
        server
            .kubeconfig_with_validity(&name, config.client_cert_validity)?
            .into_bytes()
    };
    let k8s_endpoint = tower_proto::route::cluster_url(gateway_url, &name);
    let ks_endpoint = gateway_url.trim_end_matches('/').to_string();
    if kubeconfig == current
        && connection.kubernetes_api_endpoint.as_deref() == Some(k8s_endpoint.as_str())
        && connection.kubesphere_api_endpoint.as_deref() == Some(ks_endpoint.as_str())
    {
        return Ok(kubeconfig);
    }
    let connection = serde_json::json!({
        "kubeconfig": ByteString(kubeconfig.clone()),
        "kubernetesAPIEndpoint": k8s_endpoint,
        "kubesphereAPIEndpoint": ks_endpoint,
    });
    apply_connection(client, &name, FIELD_MANAGER, connection).await?;
    Ok(kubeconfig)
}

/// Server-side applies `connection` as the Cluster's `spec.connection` fields
/// owned by `manager`, forced.
async fn apply_connection(
    client: &kube::Client,
    name: &str,
    manager: &str,
    connection: serde_json::Value,
) -> kube::Result<()> {
    let patch = serde_json::json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": { "name": name },
        "spec": { "connection": connection },
    });
    super::force_apply(&Api::<Cluster>::all(client.clone()), name, manager, patch).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::controller::testing::{CLUSTER_PATH, Mock, proxy_cluster, test_server};

    #[tokio::test]
    async fn ensure_token_applies_a_token_with_its_own_field_manager() {
        let mock = Mock::new();
        let cluster = proxy_cluster("gondor", None);
        let (wrote, ()) = tokio::join!(ensure_token(&mock.client, &cluster), async {
            let req = mock.next().await;
            req.assert_apply(CLUSTER_PATH, "tower-server-token");
            let token = req.body["spec"]["connection"]["token"].as_str().unwrap();
            assert!(token.len() >= 32, "{token}");
            assert_eq!(req.body["metadata"]["name"], "gondor");
            assert_eq!(req.body["kind"], "Cluster");
            req.reply(200, &cluster);
        });
        assert!(wrote.unwrap());
    }

    #[tokio::test]
    async fn ensure_token_leaves_an_existing_token() {
        let mock = Mock::new();
        let cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        assert!(!ensure_token(&mock.client, &cluster).await.unwrap());
        mock.assert_quiet().await;
    }

    #[tokio::test]
    async fn write_connection_applies_once_then_keeps_the_kubeconfig() {
        let mock = Mock::new();
        let (server, _dir) = test_server();
        let config = ControllerConfig::new("kubesphere-system", "tower-0");
        let mut cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        let (written, ()) = tokio::join!(
            write_connection(&mock.client, &server, &config, &cluster),
            async {
                let req = mock.next().await;
                req.assert_apply(CLUSTER_PATH, "tower-server");
                let c = &req.body["spec"]["connection"];
                assert_eq!(
                    c["kubernetesAPIEndpoint"],
                    tower_proto::route::cluster_url(server.gateway_url(), "gondor")
                );
                assert_eq!(
                    c["kubesphereAPIEndpoint"],
                    server.gateway_url().trim_end_matches('/')
                );
                assert!(
                    c.get("token").is_none(),
                    "the token is not owned by this apply"
                );
                req.reply(200, &cluster);
            }
        );
        let written = written.unwrap();
        assert!(server.kubeconfig_still_good(&written, "gondor", config.renew_before));
        // The same object back from the watch: nothing to write.
        let connection = cluster.spec.connection.as_mut().unwrap();
        connection.kubeconfig = Some(ByteString(written.clone()));
        connection.kubernetes_api_endpoint = Some(tower_proto::route::cluster_url(
            server.gateway_url(),
            "gondor",
        ));
        connection.kubesphere_api_endpoint =
            Some(server.gateway_url().trim_end_matches('/').to_string());
        let again = write_connection(&mock.client, &server, &config, &cluster)
            .await
            .unwrap();
        assert_eq!(again, written);
        mock.assert_quiet().await;
    }
}
