//! The control-plane integration: keeps proxy Clusters and their Agents in
//! step with the live sessions.
//!
//! Every replica mirrors tokens into the [`KubeTokenStore`] so any replica can
//! authenticate agents. Only the Lease holder writes:
//! - a token into `spec.connection.token` when a proxy Cluster has none;
//! - the synthesized kubeconfig and endpoints into `spec.connection`
//!   (server-side apply, field manager `tower-server`), kept stable until its
//!   client certificate nears expiry;
//! - the `AgentAvailable` condition on the Cluster and the connection detail in
//!   the Agent's status.
//!
//! `direct` Clusters are never touched, and nothing is written when nothing
//! changed. The loop runs on every Cluster/Agent event, every session change,
//! and a periodic resync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret as KubeSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower_proto::Secret;

use super::crd::{
    Agent, AgentStatus, CONDITION_AGENT_AVAILABLE, CONDITION_CONNECTED, Cluster, Condition,
    FIELD_MANAGER,
};
use super::lease::{self, Leadership, LeaseConfig};
use super::tokens::{AGENT_TOKEN_ID, CLUSTER_TOKEN_ID, ClusterTokens, KubeTokenStore};
use crate::Server;

/// Field manager used only for a generated `spec.connection.token`, so that the
/// connection apply never owns (and never removes) the token.
pub const TOKEN_FIELD_MANAGER: &str = "tower-server-token";
/// Name of the ConfigMap where the server publishes how agents reach it.
pub const SERVER_INFO_CONFIGMAP: &str = "tower-server";

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespace of the Lease and the server-info ConfigMap.
    pub namespace: String,
    /// This replica's name (pod name).
    pub replica: String,
    /// SSH address(es) agents dial, published for `towerctl join`.
    pub ssh_addresses: Vec<String>,
    /// Lifetime of client certificates in kubeconfigs.
    pub client_cert_validity: Duration,
    /// Renew a kubeconfig when its certificate has less than this left.
    pub renew_before: Duration,
    /// Full resync period.
    pub resync: Duration,
    /// Lease timing.
    pub lease_duration: Duration,
    pub lease_renew: Duration,
}

impl ControllerConfig {
    pub fn new(namespace: impl Into<String>, replica: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            replica: replica.into(),
            ssh_addresses: Vec::new(),
            client_cert_validity: Duration::from_secs(365 * 24 * 3600),
            renew_before: Duration::from_secs(120 * 24 * 3600),
            resync: Duration::from_secs(60),
            lease_duration: Duration::from_secs(15),
            lease_renew: Duration::from_secs(5),
        }
    }
}

struct Ctx {
    server: Server,
    client: kube::Client,
    store: Arc<KubeTokenStore>,
    config: ControllerConfig,
    leadership: Leadership,
    clusters: reflector::Store<Cluster>,
    agents: reflector::Store<Agent>,
    /// Agents seen so far, to notice deletions.
    seen_agents: std::sync::Mutex<HashSet<String>>,
}

/// Runs the controller until `shutdown`.
pub async fn run(
    server: Server,
    client: kube::Client,
    store: Arc<KubeTokenStore>,
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let leadership = Leadership::default();
    let lease_task = tokio::spawn(lease::run(
        client.clone(),
        LeaseConfig {
            namespace: config.namespace.clone(),
            name: "tower-server-leader".into(),
            identity: config.replica.clone(),
            duration: config.lease_duration,
            renew_every: config.lease_renew,
        },
        leadership.clone(),
        shutdown.clone(),
    ));
    let wake = Arc::new(Notify::new());
    let (clusters, cluster_writer) = reflector::store::<Cluster>();
    let (agents, agent_writer) = reflector::store::<Agent>();
    spawn_reflector(
        reflector(
            cluster_writer,
            watcher(
                Api::<Cluster>::all(client.clone()),
                watcher::Config::default(),
            ),
        ),
        wake.clone(),
        shutdown.clone(),
    );
    spawn_reflector(
        reflector(
            agent_writer,
            watcher(
                Api::<Agent>::all(client.clone()),
                watcher::Config::default(),
            ),
        ),
        wake.clone(),
        shutdown.clone(),
    );
    let ctx = Ctx {
        server: server.clone(),
        client,
        store,
        config,
        leadership: leadership.clone(),
        clusters,
        agents,
        seen_agents: Default::default(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        let _ = ctx.clusters.wait_until_ready().await;
        let _ = ctx.agents.wait_until_ready().await;
    })
    .await;
    let mut sessions = server.registry().subscribe();
    let mut was_leader = false;
    loop {
        if let Err(e) = reconcile_all(&ctx).await {
            tracing::warn!(error = %e, "reconcile failed; retrying soon");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let resync = tokio::time::sleep(ctx.config.resync);
        let leader_check = tokio::time::sleep(ctx.config.lease_renew);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = sessions.changed() => {}
            _ = resync => {}
            _ = leader_check, if !was_leader => {}
        }
        was_leader = leadership.is_leader();
        // Let a burst of events settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = lease_task.await;
    Ok(())
}

fn spawn_reflector<K, S>(stream: S, wake: Arc<Notify>, shutdown: CancellationToken)
where
    K: Send + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let stream = stream.default_backoff();
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => match item {
                    None => return,
                    Some(Ok(_)) => wake.notify_one(),
                    Some(Err(e)) => tracing::debug!(error = %e, "watch error; retrying"),
                },
            }
        }
    });
}

async fn reconcile_all(ctx: &Ctx) -> anyhow::Result<()> {
    let leader = ctx.leadership.is_leader();
    let agents: HashMap<String, Arc<Agent>> = ctx
        .agents
        .state()
        .into_iter()
        .map(|a| (a.name_any(), a))
        .collect();
    let mut live = HashSet::new();
    for cluster in ctx.clusters.state() {
        if !cluster.is_proxy() || cluster.meta().deletion_timestamp.is_some() {
            continue;
        }
        let name = cluster.name_any();
        if !tower_proto::names::is_valid_cluster_name(&name) {
            continue;
        }
        live.insert(name.clone());
        let agent = agents.get(&name).cloned();
        if let Err(e) = reconcile_one(ctx, &cluster, agent.as_deref(), leader).await {
            tracing::warn!(cluster = %name, error = %e, "reconciling cluster failed");
        }
    }
    ctx.store.retain(&live);
    // A deleted Agent ends its cluster's live session (the agent may come back
    // while the Cluster still carries a token).
    let gone: Vec<String> = {
        let mut seen = ctx.seen_agents.lock().expect("poisoned");
        let gone = seen
            .iter()
            .filter(|n| !agents.contains_key(*n))
            .cloned()
            .collect();
        *seen = agents.keys().cloned().collect();
        gone
    };
    for name in gone {
        if let Some(session) = ctx.server.registry().get(&name) {
            tracing::info!(cluster = %name, "agent object deleted; ending its session");
            ctx.server.registry().remove(&name, session.id);
            tokio::spawn(async move { session.disconnect("agent object deleted").await });
        }
    }
    if leader {
        publish_server_info(ctx).await?;
    }
    Ok(())
}

async fn reconcile_one(
    ctx: &Ctx,
    cluster: &Cluster,
    agent: Option<&Agent>,
    leader: bool,
) -> anyhow::Result<()> {
    let name = cluster.name_any();
    let api: Api<Cluster> = Api::all(ctx.client.clone());

    // Tokens: the Cluster's own, plus the Agent's tokenRef.
    let mut digests = Vec::new();
    if let Some(token) = cluster.token() {
        digests.push((CLUSTER_TOKEN_ID.to_string(), Secret::new(token).digest()));
    }
    if let Some(r) = agent.and_then(|a| a.spec.token_ref.as_ref()) {
        let secrets: Api<KubeSecret> = Api::namespaced(ctx.client.clone(), &r.namespace);
        match secrets.get_opt(&r.name).await? {
            Some(s) => {
                if let Some(v) = s.data.as_ref().and_then(|d| d.get(&r.key)) {
                    let text = String::from_utf8_lossy(&v.0).trim().to_string();
                    digests.push((AGENT_TOKEN_ID.to_string(), Secret::new(text).digest()));
                }
            }
            None => tracing::warn!(cluster = %name, secret = %r.name, "tokenRef Secret not found"),
        }
    }
    let paused = agent.is_some_and(Agent::paused);
    if ctx.store.set(&name, ClusterTokens { digests, paused }) {
        // A revoked or paused cluster is cut off before its condition says so.
        ctx.server.recheck_sessions(&name);
    }

    if !leader {
        return Ok(());
    }
    if cluster.token().is_none() {
        let token = Secret::generate();
        let patch = serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": { "name": name },
            "spec": { "connection": { "token": token.expose() } },
        });
        api.patch(
            &name,
            &PatchParams::apply(TOKEN_FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        tracing::info!(cluster = %name, "generated a token for the proxy cluster");
        // The watch brings the updated object back for the rest.
        return Ok(());
    }

    // The synthesized kubeconfig and endpoints.
    let gateway_url = ctx.server.gateway_url();
    let connection = cluster.spec.connection.clone().unwrap_or_default();
    let current = connection
        .kubeconfig
        .as_ref()
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let kubeconfig = if ctx
        .server
        .kubeconfig_still_good(&current, &name, ctx.config.renew_before)
    {
        current.clone()
    } else {
        tracing::info!(cluster = %name, "writing a fresh kubeconfig");
        ctx.server
            .kubeconfig_with_validity(&name, ctx.config.client_cert_validity)?
            .into_bytes()
    };
    let k8s_endpoint = tower_proto::route::cluster_url(gateway_url, &name);
    let ks_endpoint = gateway_url.trim_end_matches('/').to_string();
    if kubeconfig != current
        || connection.kubernetes_api_endpoint.as_deref() != Some(k8s_endpoint.as_str())
        || connection.kubesphere_api_endpoint.as_deref() != Some(ks_endpoint.as_str())
    {
        let patch = serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": { "name": name },
            "spec": { "connection": {
                "kubeconfig": ByteString(kubeconfig.clone()),
                "kubernetesAPIEndpoint": k8s_endpoint,
                "kubesphereAPIEndpoint": ks_endpoint,
            } },
        });
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }

    // Conditions.
    let session = ctx.server.registry().get(&name);
    let connected = ctx.server.registry().is_connected(&name);
    let (status, reason, message) = match (connected, paused) {
        (_, true) => (
            "False",
            "AgentPaused",
            "the Agent is paused; its connections are refused".to_string(),
        ),
        (true, _) => (
            "True",
            "AgentConnected",
            format!(
                "the agent is connected to tower-server replica {}",
                ctx.config.replica
            ),
        ),
        (false, _) => (
            "False",
            "AgentDisconnected",
            "no agent is connected for this cluster; check the agent's logs in the member cluster"
                .to_string(),
        ),
    };
    let existing = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if let Some(conditions) = merge_condition(
        &existing,
        CONDITION_AGENT_AVAILABLE,
        status,
        reason,
        &message,
    ) {
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": cluster.resource_version() },
            "status": { "conditions": conditions },
        });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    // The Agent's status mirrors the detail.
    if let Some(agent) = agent {
        let agents: Api<Agent> = Api::all(ctx.client.clone());
        let old = agent.status.clone().unwrap_or_default();
        let mut new = AgentStatus {
            conditions: old.conditions.clone(),
            kubeconfig: Some(ByteString(kubeconfig)),
            ..Default::default()
        };
        if let Some(c) = merge_condition(
            &old.conditions,
            CONDITION_CONNECTED,
            status,
            reason,
            &message,
        ) {
            new.conditions = c;
        }
        if let (true, Some(s)) = (connected, &session) {
            new.agent_version = s.hello().map(|h| h.agent_version);
            new.connected_since = Some(time(s.connected_since));
            new.rtt_millis = s.rtt().map(|d| d.as_millis() as i64);
            new.serving_replica = Some(ctx.config.replica.clone());
            // Heartbeats are recorded when the connection changes, not on every
            // keepalive, so that a quiet cluster causes no writes.
            new.last_heartbeat = if old.connected_since == new.connected_since {
                old.last_heartbeat.clone()
            } else {
                Some(time(SystemTime::now()))
            };
            if old.rtt_millis.is_some() && old.connected_since == new.connected_since {
                new.rtt_millis = old.rtt_millis;
            }
        } else {
            new.last_heartbeat = old.last_heartbeat.clone();
            new.agent_version = old.agent_version.clone();
        }
        if new != old {
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": agent.resource_version() },
                "status": new,
            });
            agents
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
    }
    Ok(())
}

/// `existing` with condition `type_` set; `None` when nothing would change.
fn merge_condition(
    existing: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> Option<Vec<Condition>> {
    let now = time(SystemTime::now());
    let mut out = existing.to_vec();
    match out.iter_mut().find(|c| c.type_ == type_) {
        Some(c)
            if c.status == status
                && c.reason.as_deref() == Some(reason)
                && c.message.as_deref() == Some(message) =>
        {
            return None;
        }
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now.clone());
            }
            c.status = status.into();
            c.reason = Some(reason.into());
            c.message = Some(message.into());
            c.last_update_time = Some(now);
        }
        None => out.push(Condition {
            type_: type_.into(),
            status: status.into(),
            last_update_time: Some(now.clone()),
            last_transition_time: Some(now),
            reason: Some(reason.into()),
            message: Some(message.into()),
        }),
    }
    Some(out)
}

fn time(t: SystemTime) -> Time {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Publishes how agents reach this server, for `towerctl join`.
async fn publish_server_info(ctx: &Ctx) -> anyhow::Result<()> {
    let server = &ctx.server;
    let data: BTreeMap<String, String> = [
        (
            "sshAddresses".to_string(),
            ctx.config.ssh_addresses.join(","),
        ),
        (
            "hostKeyFingerprint".to_string(),
            server.host_key_fingerprint(),
        ),
        ("gatewayURL".to_string(), server.gateway_url().to_string()),
        ("ca.crt".to_string(), server.ca_pem().to_string()),
    ]
    .into();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
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
    api.patch(
        SERVER_INFO_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_condition_writes_only_changes() {
        let first = merge_condition(&[], "AgentAvailable", "True", "AgentConnected", "ok").unwrap();
        assert_eq!(first.len(), 1);
        assert!(
            merge_condition(&first, "AgentAvailable", "True", "AgentConnected", "ok").is_none()
        );
        let other = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        };
        let mut with_other = first.clone();
        with_other.push(other.clone());
        let flipped = merge_condition(
            &with_other,
            "AgentAvailable",
            "False",
            "AgentDisconnected",
            "gone",
        )
        .unwrap();
        assert_eq!(flipped.len(), 2, "other conditions are kept");
        assert!(flipped.contains(&other));
    }
}
