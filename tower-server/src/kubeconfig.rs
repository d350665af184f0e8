//! Synthesized kubeconfigs: what a client needs to reach a member through the
//! gateway (server URL with the cluster prefix, tower CA, tower client cert).

use std::time::Duration;

use tower_certs::{Ca, ClientIdentity, base64};
use tower_proto::route::cluster_url;

/// Default lifetime of client certificates in synthesized kubeconfigs.
pub const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Renders a kubeconfig (YAML) for `cluster`, reaching the gateway at `gateway_url`.
pub fn render(
    ca: &Ca,
    gateway_url: &str,
    cluster: &str,
    user: &ClientIdentity,
) -> anyhow::Result<String> {
    render_with_validity(ca, gateway_url, cluster, user, CLIENT_CERT_VALIDITY)
}

/// Like [`render`], with a chosen client-certificate lifetime.
pub fn render_with_validity(
    ca: &Ca,
    gateway_url: &str,
    cluster: &str,
    user: &ClientIdentity,
    validity: Duration,
) -> anyhow::Result<String> {
    render_at(
        ca,
        &cluster_url(gateway_url, cluster),
        cluster,
        user,
        validity,
    )
}

/// Like [`render_with_validity`], for a cluster reached at `server` (in
/// KubeSphere mode, the cluster's own kube listener).
pub fn render_at(
    ca: &Ca,
    server: &str,
    cluster: &str,
    user: &ClientIdentity,
    validity: Duration,
) -> anyhow::Result<String> {
    let client = ca.issue_client(user, validity)?;
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
        common_name: format!("{}{cluster}", crate::gateway::CLIENT_CN_PREFIX),
        organizations: vec!["tower:clients".into()],
    }
}

/// Whether `yaml` is a kubeconfig this gateway would still issue: same server
/// URL and CA, and a client certificate from `ca` valid for at least
/// `min_remaining`. Used to keep kubeconfigs stable instead of re-minting them.
pub fn still_good(
    yaml: &[u8],
    ca: &Ca,
    gateway_url: &str,
    cluster: &str,
    min_remaining: Duration,
) -> bool {
    still_good_at(yaml, ca, &cluster_url(gateway_url, cluster), min_remaining)
}

/// Like [`still_good`], for a kubeconfig whose server is `server`.
pub fn still_good_at(yaml: &[u8], ca: &Ca, server: &str, min_remaining: Duration) -> bool {
    use ::base64::Engine;
    let Ok(doc) = yaml_serde::from_slice::<serde_json::Value>(yaml) else {
        return false;
    };
    let b64 = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| ::base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let cluster_entry = &doc["clusters"][0]["cluster"];
    if cluster_entry["server"].as_str() != Some(server) {
        return false;
    }
    if b64(&cluster_entry["certificate-authority-data"]).as_deref()
        != Some(ca.cert_pem().as_bytes())
    {
        return false;
    }
    let Some(cert_pem) = b64(&doc["users"][0]["user"]["client-certificate-data"]) else {
        return false;
    };
    let Ok(ders) = tower_certs::parse_certs(&String::from_utf8_lossy(&cert_pem)) else {
        return false;
    };
    let Ok(ca_ders) = tower_certs::parse_certs(ca.cert_pem()) else {
        return false;
    };
    let (Some(der), Some(ca_der)) = (ders.first(), ca_ders.first()) else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, ca_cert))) = (
        x509_parser::parse_x509_certificate(der),
        x509_parser::parse_x509_certificate(ca_der),
    ) else {
        return false;
    };
    if cert.issuer().as_raw() != ca_cert.subject().as_raw() {
        return false;
    }
    if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
        return false;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    cert.validity().not_after.timestamp() - now > min_remaining.as_secs() as i64
}
