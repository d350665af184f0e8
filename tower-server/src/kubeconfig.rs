//! Synthesized kubeconfigs: what a client needs to reach a member through the
//! gateway (server URL with the cluster prefix, tower CA, tower client cert).

use std::time::Duration;

use tower_certs::{Ca, ClientIdentity, base64};

/// Default lifetime of client certificates in synthesized kubeconfigs.
pub const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Renders a kubeconfig (YAML) for `cluster`, reaching the gateway at `gateway_url`.
pub fn render(
    ca: &Ca,
    gateway_url: &str,
    cluster: &str,
    user: &ClientIdentity,
) -> anyhow::Result<String> {
    let client = ca.issue_client(user, CLIENT_CERT_VALIDITY)?;
    let server = format!("{}/clusters/{cluster}", gateway_url.trim_end_matches('/'));
    let user_name = format!("tower-{cluster}");
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": cluster,
            "cluster": {
                "server": server,
                "certificate-authority-data": base64(ca.cert_pem().as_bytes()),
            },
        }],
        "users": [{
            "name": user_name,
            "user": {
                "client-certificate-data": base64(client.cert_pem.as_bytes()),
                "client-key-data": base64(client.key_pem.as_bytes()),
            },
        }],
        "contexts": [{
            "name": cluster,
            "context": { "cluster": cluster, "user": user_name },
        }],
        "current-context": cluster,
        "preferences": {},
    });
    Ok(yaml_serde::to_string(&doc)?)
}

/// The identity a synthesized kubeconfig presents to the gateway.
pub fn default_identity(cluster: &str) -> ClientIdentity {
    ClientIdentity {
        common_name: format!("tower:{cluster}"),
        organizations: vec!["tower:clients".into()],
    }
}
