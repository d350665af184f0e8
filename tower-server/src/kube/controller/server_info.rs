//! The server-info ConfigMap the leader publishes for `towerctl join`: how
//! agents reach this server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use super::{ControllerConfig, SERVER_INFO_CONFIGMAP};
use crate::Server;
use crate::kube::crd::FIELD_MANAGER;

/// What the ConfigMap holds.
fn data(server: &Server, config: &ControllerConfig) -> BTreeMap<String, String> {
    [
        ("sshAddresses".to_string(), config.ssh_addresses.join(",")),
        (
            "hostKeyFingerprint".to_string(),
            server.host_key_fingerprint(),
        ),
        ("gatewayURL".to_string(), server.gateway_url().to_string()),
        ("ca.crt".to_string(), server.ca_pem().to_string()),
    ]
    .into_iter()
    .chain(config.kubesphere.iter().flat_map(|k| {
        // `towerctl migrate` reads whether held Clusters are left alone and
        // which pods their Services are to select.
        let selector = k
            .pod_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        [
            ("kubesphereAdopt".to_string(), k.adopt.as_str().to_string()),
            ("kubespherePodSelector".to_string(), selector),
        ]
    }))
    .collect()
}

/// Applies the ConfigMap (field manager `tower-server`) unless it already
/// says the same.
pub(super) async fn publish(
    client: &kube::Client,
    server: &Server,
    config: &ControllerConfig,
) -> kube::Result<()> {
    let data = data(server, config);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &config.namespace);
    if let Some(cm) = api.get_opt(SERVER_INFO_CONFIGMAP).await?
        && cm.data.as_ref() == Some(&data)
    {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": SERVER_INFO_CONFIGMAP },
        "data": data,
    });
    super::force_apply(&api, SERVER_INFO_CONFIGMAP, FIELD_MANAGER, patch).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::controller::testing::{Mock, test_server};

    #[tokio::test]
    async fn publishes_when_missing_and_not_when_unchanged() {
        let mock = Mock::new();
        let (server, _dir) = test_server();
        let mut config = ControllerConfig::new("kubesphere-system", "tower-0");
        config.ssh_addresses = vec!["tower.example:2222".into()];
        let expected = data(&server, &config);
        let path = "/api/v1/namespaces/kubesphere-system/configmaps/tower-server";
        let (done, ()) = tokio::join!(publish(&mock.client, &server, &config), async {
            let get = mock.next().await;
            assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", path));
            get.reply_not_found();
            let req = mock.next().await;
            req.assert_apply(path, "tower-server");
            assert_eq!(req.body["metadata"]["name"], "tower-server");
            assert_eq!(req.body["data"], serde_json::to_value(&expected).unwrap());
            assert_eq!(req.body["data"]["sshAddresses"], "tower.example:2222");
            req.reply(200, &ConfigMap::default());
        });
        done.unwrap();
        let (done, ()) = tokio::join!(publish(&mock.client, &server, &config), async {
            let get = mock.next().await;
            assert_eq!(get.method, "GET");
            get.reply(
                200,
                &ConfigMap {
                    data: Some(expected.clone()),
                    ..Default::default()
                },
            );
        });
        done.unwrap();
        mock.assert_quiet().await;
    }
}
