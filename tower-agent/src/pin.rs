//! Where the agent keeps the server's host key when no join token pins it
//! (KubeSphere's agent manifest carries none): trust on first use, the pin
//! kept in a file or in a Secret of the agent's namespace, and a changed key
//! refused afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use http::{Method, StatusCode};

use crate::Upstream;

/// Data key of the pin in its Secret, and the whole content of a pin file.
pub const PIN_KEY: &str = "hostKey";
/// Data key of the server address the pin was taken from.
pub const SERVER_KEY: &str = "server";

/// Where a first-use pin is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinStoreConfig {
    /// A file holding the fingerprint (`SHA256:…`).
    File(PathBuf),
    /// A Secret of the agent's own cluster, written through kube-apiserver
    /// with the agent's credential.
    Secret { namespace: String, name: String },
}

/// A pin store, ready to use.
#[derive(Clone)]
pub(crate) enum PinStore {
    File(PathBuf),
    Secret {
        namespace: String,
        name: String,
        kube: Arc<Upstream>,
    },
}

impl PinStore {
    pub(crate) fn new(
        config: &PinStoreConfig,
        kube: Option<Arc<Upstream>>,
    ) -> anyhow::Result<Self> {
        Ok(match config {
            PinStoreConfig::File(p) => PinStore::File(p.clone()),
            PinStoreConfig::Secret { namespace, name } => PinStore::Secret {
                namespace: namespace.clone(),
                name: name.clone(),
                kube: kube.ok_or_else(|| {
                    anyhow::anyhow!("a host-key pin Secret needs the kube-apiserver upstream")
                })?,
            },
        })
    }

    /// What the store is, for messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            PinStore::File(p) => format!("file {}", p.display()),
            PinStore::Secret {
                namespace, name, ..
            } => format!("Secret {namespace}/{name}"),
        }
    }

    /// How an operator re-pins after a deliberate key change.
    pub(crate) fn repin_hint(&self) -> String {
        match self {
            PinStore::File(p) => format!(
                "if the server's key was replaced on purpose, delete {} and restart the agent to pin the new key",
                p.display()
            ),
            PinStore::Secret {
                namespace, name, ..
            } => format!(
                "if the server's key was replaced on purpose, run `kubectl -n {namespace} delete secret {name}` \
                 in this member cluster and restart the agent to pin the new key (or give the new key with --host-key)"
            ),
        }
    }

    fn secret_path(namespace: &str, name: &str) -> String {
        format!("/api/v1/namespaces/{namespace}/secrets/{name}")
    }

    /// The pinned fingerprint, if any.
    pub(crate) async fn load(&self) -> anyhow::Result<Option<String>> {
        match self {
            PinStore::File(p) => match std::fs::read_to_string(p) {
                Ok(text) => Ok(Some(check(text.trim(), &self.describe())?)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow::anyhow!("reading {}: {e}", self.describe())),
            },
            PinStore::Secret {
                namespace,
                name,
                kube,
            } => {
                let (status, body) = kube
                    .own_request(Method::GET, &Self::secret_path(namespace, name), None)
                    .await?;
                match status {
                    StatusCode::NOT_FOUND => Ok(None),
                    s if s.is_success() => {
                        let secret: serde_json::Value = serde_json::from_slice(&body)?;
                        let Some(value) = secret["data"][PIN_KEY].as_str() else {
                            return Ok(None);
                        };
                        use base64::Engine;
                        let raw = base64::engine::general_purpose::STANDARD
                            .decode(value)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", self.describe()))?;
                        let text = String::from_utf8_lossy(&raw);
                        Ok(Some(check(text.trim(), &self.describe())?))
                    }
                    s => Err(anyhow::anyhow!(
                        "reading {}: kube-apiserver answered {s}: {}",
                        self.describe(),
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    )),
                }
            }
        }
    }

    /// Keeps `fingerprint` (taken from `server`). A Secret is created, never
    /// overwritten: if one appeared meanwhile, its pin wins next time.
    pub(crate) async fn save(&self, fingerprint: &str, server: &str) -> anyhow::Result<()> {
        match self {
            PinStore::File(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(p, format!("{fingerprint}\n"))
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", self.describe()))
            }
            PinStore::Secret {
                namespace,
                name,
                kube,
            } => {
                let secret = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": { "app.kubernetes.io/part-of": "tower" },
                        "annotations": {
                            "tower.kubesphere.io/description":
                                "The tower server's SSH host key, pinned by tower-agent on first use. Delete it to re-pin.",
                        },
                    },
                    "type": "Opaque",
                    "stringData": { PIN_KEY: fingerprint, SERVER_KEY: server },
                });
                let (status, body) = kube
                    .own_request(
                        Method::POST,
                        &format!("/api/v1/namespaces/{namespace}/secrets"),
                        Some(serde_json::to_vec(&secret)?),
                    )
                    .await?;
                if status.is_success() || status == StatusCode::CONFLICT {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "creating {}: kube-apiserver answered {status}: {}",
                        self.describe(),
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    ))
                }
            }
        }
    }
}

fn check(fingerprint: &str, from: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        fingerprint.starts_with("SHA256:") && fingerprint.len() > 10,
        "{from} holds no host-key fingerprint (SHA256:…); delete it to re-pin"
    );
    Ok(fingerprint.to_string())
}
