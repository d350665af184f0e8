//! The server's persistent identity in Kubernetes: the CA and the SSH host key
//! live in Secrets in the server's namespace, generated once by whichever
//! replica starts first and kept across upgrades and restarts.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::HOST_KEY_FILE;

/// Secret holding the CA (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "tower-ca";
/// Secret holding the SSH host key.
pub const HOST_KEY_SECRET: &str = "tower-ssh-host-key";

/// Makes `state_dir` hold the CA and host key from the namespace's Secrets,
/// creating the Secrets from fresh material when they do not exist yet.
pub(super) async fn sync(
    client: &kube::Client,
    namespace: &str,
    state_dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    sync_secret(&api, CA_SECRET, state_dir, &["ca.crt", "ca.key"], || {
        let ca = tower_certs::Ca::generate("tower-ca")?;
        Ok(vec![ca.cert_pem().to_string(), ca.key_pem().to_string()])
    })
    .await?;
    sync_secret(&api, HOST_KEY_SECRET, state_dir, &[HOST_KEY_FILE], || {
        Ok(vec![tower_certs::HostKey::generate()?.to_openssh()?])
    })
    .await
}

async fn sync_secret(
    api: &Api<Secret>,
    name: &str,
    dir: &Path,
    keys: &[&str],
    generate: impl Fn() -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<()> {
    for attempt in 0..3 {
        if let Some(secret) = api.get_opt(name).await? {
            let data = secret.data.unwrap_or_default();
            for key in keys {
                let value = data.get(*key).ok_or_else(|| {
                    anyhow::anyhow!("Secret {name} lacks key {key}; delete it to regenerate")
                })?;
                tower_certs::write(&dir.join(key), &String::from_utf8_lossy(&value.0), 0o600)?;
            }
            return Ok(());
        }
        let values = generate()?;
        let data: BTreeMap<String, ByteString> = keys
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
            .collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(
                    [(
                        "app.kubernetes.io/name".to_string(),
                        "tower-server".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => tracing::info!(secret = name, "generated server identity"),
            // Another replica won the race; read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 2 => {}
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("could not read or create Secret {name}")
}
