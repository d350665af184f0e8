//! The token mirror: what a proxy Cluster's tokens are, from the Cluster's own
//! `spec.connection.token` and its Agent's `tokenRef` Secret. Every replica
//! runs it, so any replica authenticates agents.

use kube::ResourceExt;
use tower_proto::Secret;

use super::secrets::TokenRefSecrets;
use crate::kube::crd::{Agent, Cluster};
use crate::kube::tokens::{AGENT_TOKEN_ID, CLUSTER_TOKEN_ID, ClusterTokens};

/// The tokens `cluster` currently accepts, and whether its Agent is paused.
pub(super) async fn tokens(
    secrets: &TokenRefSecrets,
    cluster: &Cluster,
    agent: Option<&Agent>,
) -> kube::Result<ClusterTokens> {
    let mut digests = Vec::new();
    if let Some(token) = cluster.token() {
        digests.push((CLUSTER_TOKEN_ID.to_string(), Secret::new(token).digest()));
    }
    if let Some(r) = agent.and_then(|a| a.spec.token_ref.as_ref()) {
        match secrets.value(r).await? {
            Some(text) => digests.push((AGENT_TOKEN_ID.to_string(), Secret::new(text).digest())),
            None => tracing::warn!(
                cluster = %cluster.name_any(),
                secret = %r.name,
                "tokenRef Secret (or its key) not found"
            ),
        }
    }
    Ok(ClusterTokens {
        digests,
        paused: agent.is_some_and(Agent::paused),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::controller::testing::{Mock, agent_with_token_ref, proxy_cluster, secret};

    /// A Cluster with its own token and an Agent with a tokenRef.
    fn setup(paused: bool) -> (Mock, TokenRefSecrets, Cluster, Agent) {
        let mock = Mock::new();
        let secrets = mock.token_ref_secrets();
        let cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        let agent = agent_with_token_ref("gondor", "tower-tokens", "agent-tokens", paused);
        (mock, secrets, cluster, agent)
    }

    #[tokio::test]
    async fn mirrors_the_cluster_token_and_reads_the_token_ref_secret() {
        let (mock, secrets, cluster, agent) = setup(true);
        let (got, ()) = tokio::join!(tokens(&secrets, &cluster, Some(&agent)), async {
            let req = mock.next().await;
            assert_eq!(req.method, "GET");
            assert_eq!(
                req.path,
                "/api/v1/namespaces/tower-tokens/secrets/agent-tokens"
            );
            req.reply(
                200,
                &secret("agent-tokens", "token", " agent-token-0123456789\n"),
            );
        });
        let got = got.unwrap();
        assert!(got.paused);
        assert_eq!(
            got.digests,
            [
                (
                    CLUSTER_TOKEN_ID.to_string(),
                    Secret::new("cluster-token-0123456789").digest()
                ),
                (
                    AGENT_TOKEN_ID.to_string(),
                    Secret::new("agent-token-0123456789").digest()
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_token_ref_secret_leaves_the_cluster_token() {
        let (mock, secrets, cluster, agent) = setup(false);
        let (got, ()) = tokio::join!(tokens(&secrets, &cluster, Some(&agent)), async {
            mock.next().await.reply_not_found();
        });
        let got = got.unwrap();
        assert!(!got.paused);
        assert_eq!(got.digests.len(), 1);
        assert_eq!(got.digests[0].0, CLUSTER_TOKEN_ID);
    }
}
