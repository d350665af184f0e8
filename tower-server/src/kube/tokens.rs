//! A token store fed from Kubernetes: each proxy Cluster's
//! `spec.connection.token` (and its Agent's `tokenRef`, if any) is a valid
//! credential for that cluster; a paused Agent refuses its cluster.
//!
//! The controller keeps it current; the SSH listener asks it. Only digests are
//! kept, and they are compared in constant time.

use std::collections::HashMap;
use std::sync::RwLock;

use subtle::ConstantTimeEq;
use tower_proto::Secret;

use crate::tokens::{TokenStore, Verdict};

/// Token id reported for a Cluster's own `spec.connection.token`.
pub const CLUSTER_TOKEN_ID: &str = "cluster";
/// Token id reported for an Agent's `tokenRef`.
pub const AGENT_TOKEN_ID: &str = "agent";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterTokens {
    /// `(token id, SHA-256 hex of the secret)`.
    pub digests: Vec<(String, String)>,
    pub paused: bool,
}

/// Tokens of every proxy cluster, as the controller last saw them.
#[derive(Default)]
pub struct KubeTokenStore {
    clusters: RwLock<HashMap<String, ClusterTokens>>,
}

impl KubeTokenStore {
    /// Replaces what is known of `cluster`; returns whether anything changed.
    pub fn set(&self, cluster: &str, tokens: ClusterTokens) -> bool {
        let mut map = self.clusters.write().expect("poisoned");
        if map.get(cluster) == Some(&tokens) {
            return false;
        }
        map.insert(cluster.to_string(), tokens);
        true
    }

    /// Forgets every cluster not in `keep`.
    pub fn retain(&self, keep: &std::collections::HashSet<String>) {
        self.clusters
            .write()
            .expect("poisoned")
            .retain(|name, _| keep.contains(name));
    }

    pub fn clusters(&self) -> Vec<String> {
        self.clusters
            .read()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
    }
}

impl TokenStore for KubeTokenStore {
    fn check(&self, cluster: &str, id: Option<&str>, secret: &Secret) -> Verdict {
        let map = self.clusters.read().expect("poisoned");
        let Some(entry) = map.get(cluster) else {
            return Verdict::Unknown;
        };
        let digest = secret.digest();
        let mut matched: Option<&str> = None;
        for (token_id, stored) in &entry.digests {
            let id_ok = id.is_none_or(|id| id == token_id);
            let ok: bool = digest.as_bytes().ct_eq(stored.as_bytes()).into();
            if ok && id_ok && matched.is_none() {
                matched = Some(token_id);
            }
        }
        match matched {
            None => Verdict::Unknown,
            Some(_) if entry.paused => Verdict::Revoked,
            Some(id) => Verdict::Valid {
                token_id: format!("{id}:{}", &digest[..16]),
            },
        }
    }

    fn recheck(&self, cluster: &str, token_id: &str) -> Verdict {
        let map = self.clusters.read().expect("poisoned");
        let Some(entry) = map.get(cluster) else {
            return Verdict::Unknown;
        };
        let Some((id, prefix)) = token_id.split_once(':') else {
            return Verdict::Unknown;
        };
        let still = entry
            .digests
            .iter()
            .any(|(i, d)| i == id && d.starts_with(prefix));
        match (still, entry.paused) {
            (false, _) => Verdict::Unknown,
            (true, true) => Verdict::Revoked,
            (true, false) => Verdict::Valid {
                token_id: token_id.to_string(),
            },
        }
    }

    fn knows(&self, cluster: &str) -> bool {
        self.clusters
            .read()
            .expect("poisoned")
            .contains_key(cluster)
    }

    fn refresh(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_and_paused() {
        let store = KubeTokenStore::default();
        let secret = Secret::new("kubesphere-generated-token-0123456789");
        store.set(
            "gondor",
            ClusterTokens {
                digests: vec![(CLUSTER_TOKEN_ID.into(), secret.digest())],
                paused: false,
            },
        );
        let Verdict::Valid { token_id } = store.check("gondor", None, &secret) else {
            panic!("bare token refused")
        };
        assert!(matches!(
            store.check("gondor", Some("cluster"), &secret),
            Verdict::Valid { .. }
        ));
        assert_eq!(
            store.check("gondor", None, &Secret::new("nope")),
            Verdict::Unknown
        );
        assert!(matches!(
            store.recheck("gondor", &token_id),
            Verdict::Valid { .. }
        ));
        store.set(
            "gondor",
            ClusterTokens {
                digests: vec![(CLUSTER_TOKEN_ID.into(), secret.digest())],
                paused: true,
            },
        );
        assert_eq!(store.recheck("gondor", &token_id), Verdict::Revoked);
        store.retain(&Default::default());
        assert_eq!(store.recheck("gondor", &token_id), Verdict::Unknown);
        assert!(!store.knows("gondor"));
    }
}
