//! One Cluster's reconcile, job by job, and what happens when it fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use super::{Ctx, Error, connection, events, kubesphere, mirror, status};
use crate::kube::crd::{Agent, AgentStatus, CONDITION_CONNECTED, Cluster};

/// How long a reconcile waits for the Agent store's first list, so that a
/// Cluster is not judged without its Agent.
const AGENTS_READY_WAIT: Duration = Duration::from_secs(30);
/// First retry after a failure; doubled per consecutive failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Whether Tower manages this Cluster: a proxy Cluster with a valid name.
///
/// One being deleted stays managed until it is gone: KubeSphere removes its
/// finalizer with an UPDATE that its webhook admits only if the member is
/// reachable through the kubeconfig, i.e. through Tower. So its token,
/// session and listeners live on; only the writes stop.
pub(super) fn managed(cluster: &Cluster) -> bool {
    cluster.is_proxy() && tower_proto::names::is_valid_cluster_name(&cluster.name_any())
}

/// Brings one Cluster (and its Agent) in step; requeued every resync.
pub(super) async fn reconcile(cluster: Arc<Cluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !managed(&cluster) {
        ctx.server
            .retain_cluster_listeners(|c| c != cluster.name_any());
        return Ok(Action::await_change());
    }
    let name = cluster.name_any();
    let _ = tokio::time::timeout(AGENTS_READY_WAIT, ctx.agents.wait_until_ready()).await;
    let agent = ctx.agents.get(&ObjectRef::<Agent>::new(&name));
    let tokens = mirror::tokens(&ctx.secrets, &cluster, agent.as_deref()).await?;
    if ctx.store.set(&name, tokens) {
        // A revoked or paused cluster is cut off before its condition says so.
        ctx.server.recheck_sessions(&name);
    }
    if kubesphere::listens(&ctx, &cluster) {
        // Every replica serves the listeners, whoever leads.
        kubesphere::ensure_listeners(&ctx, &cluster)?;
    } else {
        ctx.server.retain_cluster_listeners(|c| c != name);
    }
    if cluster.metadata.deletion_timestamp.is_some() {
        // Serve it until the object is gone (the watch's delete ends it).
        ctx.backoff.reset(&name);
        return Ok(Action::await_change());
    }
    if ctx.leadership.is_leader() {
        write(&ctx, &cluster, agent.as_deref()).await?;
    } else {
        report(&ctx, &cluster, agent.as_deref()).await?;
    }
    ctx.backoff.reset(&name);
    Ok(Action::requeue(ctx.config.resync))
}

/// The leader's writes for one Cluster: its token, its connection (KubeSphere
/// set-up or the path gateway's kubeconfig), the Agent's status, then the
/// Cluster's conditions, so that a Cluster write KubeSphere's webhook refuses
/// (the member unreachable) holds up nothing else.
async fn write(ctx: &Ctx, cluster: &Cluster, agent: Option<&Agent>) -> anyhow::Result<()> {
    if kubesphere::held(ctx, cluster) {
        // A Go tower serves it: only the Agent (tower's own object) says
        // whether the agent is connected here, for `towerctl migrate`.
        return write_held(ctx, cluster, agent).await;
    }
    if connection::ensure_token(&ctx.client, cluster).await? {
        // The watch brings the updated object back for the rest.
        return Ok(());
    }
    let name = cluster.name_any();
    let paused = agent.is_some_and(Agent::paused);
    let remote = remote_owner(ctx, &name, agent);
    let available = status::availability(&ctx.server, &name, paused, remote.as_deref());
    events::on_availability(ctx, cluster, &available).await;
    let (connection, kubeconfig, initialized) = if kubesphere::served(ctx, cluster) {
        match kubesphere::setup(ctx, cluster, &available).await? {
            kubesphere::Setup::Wrote => return Ok(()),
            kubesphere::Setup::Ready {
                connection,
                kubeconfig,
                initialized,
            } => (connection, kubeconfig, Some(initialized)),
        }
    } else {
        let kubeconfig =
            connection::write_connection(&ctx.client, &ctx.server, &ctx.config, cluster).await?;
        (None, kubeconfig, None)
    };
    if agent.is_none() && ctx.server.registry().is_connected(&name) {
        // The session's owner records it on the Agent, where the other
        // replicas look for it (peer forwarding); the Agent's event brings
        // the status write.
        connection::create_agent(&ctx.client, &name).await?;
    }
    if let Some(agent) = agent
        && remote.is_none()
    {
        // A session another replica holds is that replica's to report.
        let session = local_session(ctx, &name, &available);
        let new = status::agent_status(
            agent.status.clone().unwrap_or_default(),
            &available,
            session,
            &ctx.config.replica,
            kubeconfig,
        );
        status::write_agent_status(&ctx.client, agent, new).await?;
    }
    let mut conditions = status::cluster_conditions(cluster, &available);
    if let Some(initialized) = initialized {
        let base = conditions.clone().unwrap_or_else(|| {
            cluster
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default()
        });
        if let Some(with) = kubesphere::initialized_condition(&base, initialized) {
            conditions = Some(with);
        }
    }
    let written = status::write_cluster(
        &ctx.client,
        &ctx.status_path,
        cluster,
        connection,
        conditions,
    )
    .await;
    if let Err(e) = &written
        && events::refused_by_admission(e)
    {
        ctx.server.metrics().cluster_write_refusals.inc();
        tracing::warn!(
            cluster = %name,
            error = %e,
            "an admission webhook refused the Cluster update (KubeSphere refuses updates while the member is unreachable); the Agent status and an Event say so, and the write is retried"
        );
    }
    written?;
    Ok(())
}

/// The detail of `cluster`'s session on this replica, while it counts as connected.
fn local_session(
    ctx: &Ctx,
    cluster: &str,
    available: &status::Availability,
) -> Option<status::SessionDetail> {
    ctx.server
        .registry()
        .get(cluster)
        .filter(|_| available.connected)
        .map(|s| status::SessionDetail::of(&s))
}

/// The replica other than this one that holds `cluster`'s session: the one
/// the Agent's status names as serving it, connected, while its membership
/// Lease is valid. `None` when this replica holds it.
fn remote_owner(ctx: &Ctx, cluster: &str, agent: Option<&Agent>) -> Option<String> {
    let owner = agent?.status.as_ref()?.connected_replica()?;
    let claimed = owner != ctx.config.replica && ctx.members.is_valid(owner);
    // A session here counts unless its agent is moving and the replica it
    // moved to has recorded itself.
    let registry = ctx.server.registry();
    if registry.is_connected(cluster) && !(claimed && registry.is_moving(cluster)) {
        return None;
    }
    claimed.then(|| owner.to_string())
}

/// A follower's one job: what only it knows, its own session, on the Agent
/// (creating the Agent if there is none), and that it holds it no more.
async fn report(ctx: &Ctx, cluster: &Cluster, agent: Option<&Agent>) -> anyhow::Result<()> {
    let name = cluster.name_any();
    let local =
        ctx.server.registry().is_connected(&name) && remote_owner(ctx, &name, agent).is_none();
    let Some(agent) = agent else {
        if local {
            connection::create_agent(&ctx.client, &name).await?;
        }
        return Ok(());
    };
    let old = agent.status.clone().unwrap_or_default();
    let recorded_here = old.serving_replica.as_deref() == Some(ctx.config.replica.as_str())
        && old
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_CONNECTED && c.status == "True");
    if !local && !recorded_here {
        return Ok(());
    }
    let available = status::availability(&ctx.server, &name, agent.paused(), None);
    let session = local_session(ctx, &name, &available);
    let kubeconfig = reported_kubeconfig(ctx, cluster, &old);
    let mut new = status::agent_status(
        old.clone(),
        &available,
        session,
        &ctx.config.replica,
        kubeconfig,
    );
    if new.kubeconfig.as_ref().is_some_and(|k| k.0.is_empty()) {
        new.kubeconfig = old.kubeconfig;
    }
    status::write_agent_status(&ctx.client, agent, new).await?;
    Ok(())
}

/// The kubeconfig a replica reporting its own session puts on the Agent: the
/// one the leader would, so that the Agent says the same whichever replica
/// holds the session, and a new leader has nothing to rewrite. That is the
/// Cluster's own (the leader writes it there), or for a held Cluster the one
/// this server would write (`towerctl migrate` reads it from the Agent).
fn reported_kubeconfig(ctx: &Ctx, cluster: &Cluster, old: &AgentStatus) -> Vec<u8> {
    let current = old
        .kubeconfig
        .as_ref()
        .map(|k| k.0.clone())
        .unwrap_or_default();
    if kubesphere::held(ctx, cluster) {
        return kubesphere::held_kubeconfig(ctx, cluster, current);
    }
    cluster.kubeconfig().map_or(current, <[u8]>::to_vec)
}

/// The leader's one write for a held Cluster: its Agent's status.
async fn write_held(ctx: &Ctx, cluster: &Cluster, agent: Option<&Agent>) -> anyhow::Result<()> {
    let Some(agent) = agent else { return Ok(()) };
    let name = cluster.name_any();
    let available = status::availability(
        &ctx.server,
        &name,
        agent.paused(),
        remote_owner(ctx, &name, Some(agent)).as_deref(),
    );
    if available.connected && !ctx.server.registry().is_connected(&name) {
        // Another replica holds it and reports it.
        return Ok(());
    }
    let session = local_session(ctx, &name, &available);
    let old = agent.status.clone().unwrap_or_default();
    let current = old.kubeconfig.clone().map(|k| k.0).unwrap_or_default();
    let kubeconfig = kubesphere::held_kubeconfig(ctx, cluster, current);
    let new = status::agent_status(old, &available, session, &ctx.config.replica, kubeconfig);
    status::write_agent_status(&ctx.client, agent, new).await?;
    Ok(())
}

/// Retries a failed Cluster after a backoff that doubles per consecutive
/// failure of that Cluster.
pub(super) fn error_policy(cluster: Arc<Cluster>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let name = cluster.name_any();
    let wait = ctx.backoff.next(&name);
    tracing::warn!(cluster = %name, error = %error, retry_in = ?wait, "reconciling cluster failed");
    Action::requeue(wait)
}

/// Consecutive failures per Cluster.
#[derive(Default)]
pub(super) struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    /// Counts a failure; the wait before the retry.
    pub(super) fn next(&self, name: &str) -> Duration {
        let mut map = self.0.lock().expect("poisoned");
        let n = map.entry(name.to_string()).or_default();
        let wait = BACKOFF_FIRST
            .saturating_mul(1 << (*n).min(16))
            .min(BACKOFF_MAX);
        *n = n.saturating_add(1);
        wait
    }

    pub(super) fn reset(&self, name: &str) {
        self.0.lock().expect("poisoned").remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::controller::testing::{CLUSTER_PATH, mock_ctx, proxy_cluster};
    use crate::kube::crd::{AgentSpec, CONNECTION_DIRECT};
    use crate::tokens::TokenStore;

    #[tokio::test]
    async fn a_direct_cluster_is_never_touched() {
        let (mock, ctx, _dir) = mock_ctx(true, Vec::new());
        let mut cluster = proxy_cluster("rohan", None);
        cluster.spec.connection.as_mut().unwrap().type_ = Some(CONNECTION_DIRECT.into());
        let action = reconcile(Arc::new(cluster), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert!(!ctx.store.knows("rohan"));
        mock.assert_quiet().await;
    }

    /// Beside a Go tower (`Adopt::Marked`), an unmarked KubeSphere Cluster
    /// gets one write: its Agent's status, carrying the kubeconfig for the
    /// Cluster's endpoint. Marked, the Cluster's own set-up starts.
    #[tokio::test]
    async fn a_held_cluster_is_left_to_the_go_tower_until_marked() {
        use crate::kube::controller::kubesphere::{
            Adopt, KubeSphereConfig, SERVED_BY_ANNOTATION, SERVED_BY_TOWER_SERVER,
        };
        let agent = Agent::new("gondor", AgentSpec::default());
        let (mock, mut ctx, _dir) = mock_ctx(true, vec![agent.clone()]);
        Arc::get_mut(&mut ctx).unwrap().config.kubesphere = Some(KubeSphereConfig {
            adopt: Adopt::Marked,
            ..Default::default()
        });
        let mut cluster = proxy_cluster("gondor", Some("go-tower-token-0123456789"));
        cluster.spec.join_federation = Some(true);
        cluster
            .spec
            .connection
            .as_mut()
            .unwrap()
            .kubernetes_api_endpoint = Some("https://10.233.0.7:6443".into());
        let (action, ()) = tokio::join!(reconcile(Arc::new(cluster.clone()), ctx.clone()), async {
            let status = mock.next().await;
            status.assert_status_merge(
                "/apis/tower.kubesphere.io/v1alpha1/agents/gondor/status",
                None,
            );
            let kubeconfig = status.body["status"]["kubeconfig"].as_str().unwrap();
            let kubeconfig = String::from_utf8(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, kubeconfig)
                    .unwrap(),
            )
            .unwrap();
            assert!(
                kubeconfig.contains("server: https://10.233.0.7:6443"),
                "{kubeconfig}"
            );
            status.reply(200, &agent);
            mock.assert_quiet().await;
        });
        action.unwrap();
        assert!(ctx.store.knows("gondor"), "its agent may connect");

        cluster.metadata.annotations =
            Some([(SERVED_BY_ANNOTATION.into(), SERVED_BY_TOWER_SERVER.into())].into());
        let (_, ()) = tokio::join!(reconcile(Arc::new(cluster.clone()), ctx.clone()), async {
            let write = mock.next().await;
            assert_eq!(
                (write.method.as_str(), write.path.as_str()),
                ("PATCH", CLUSTER_PATH),
                "a marked Cluster is set up (its ports first)"
            );
            write.reply(200, &cluster);
        });
    }

    #[tokio::test]
    async fn a_follower_mirrors_tokens_and_writes_nothing() {
        let (mock, ctx, _dir) = mock_ctx(false, Vec::new());
        let cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        let action = reconcile(Arc::new(cluster), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(ctx.config.resync));
        assert!(ctx.store.knows("gondor"));
        mock.assert_quiet().await;
    }

    #[tokio::test]
    async fn the_leader_writes_connection_condition_and_agent_status_in_order() {
        let agent = Agent::new("gondor", AgentSpec::default());
        let (mock, ctx, _dir) = mock_ctx(true, vec![agent.clone()]);
        let cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        let (action, ()) = tokio::join!(reconcile(Arc::new(cluster.clone()), ctx.clone()), async {
            let apply = mock.next().await;
            apply.assert_apply(CLUSTER_PATH, "tower-server");
            apply.reply(200, &cluster);
            // The Agent's status first: a Cluster write KubeSphere's webhook
            // refuses must not hold it up.
            let status = mock.next().await;
            status.assert_status_merge(
                "/apis/tower.kubesphere.io/v1alpha1/agents/gondor/status",
                None,
            );
            assert_eq!(status.body["status"]["conditions"][0]["type"], "Connected");
            status.reply(200, &agent);
            let condition = mock.next().await;
            condition.assert_status_merge(CLUSTER_PATH, None);
            assert_eq!(
                condition.body["status"]["conditions"][0]["reason"],
                "AgentDisconnected"
            );
            let mut back = cluster.clone();
            back.status = Some(serde_json::from_value(condition.body["status"].clone()).unwrap());
            condition.reply(200, &back);
        });
        assert_eq!(action.unwrap(), Action::requeue(ctx.config.resync));
        assert!(ctx.store.knows("gondor"));
        mock.assert_quiet().await;
    }

    #[tokio::test]
    async fn a_failed_write_is_an_error_and_the_tokens_are_mirrored_first() {
        let (mock, ctx, _dir) = mock_ctx(true, Vec::new());
        let cluster = proxy_cluster("gondor", None);
        let (result, ()) = tokio::join!(reconcile(Arc::new(cluster), ctx.clone()), async {
            let apply = mock.next().await;
            assert_eq!(apply.query["fieldManager"], "tower-server-token");
            apply.reply_not_found();
        });
        assert!(result.is_err());
        assert!(
            ctx.store.knows("gondor"),
            "mirrored before the write failed"
        );
        assert_eq!(
            ctx.store
                .check("gondor", None, &tower_proto::Secret::new("x")),
            crate::tokens::Verdict::Unknown
        );
    }

    #[test]
    fn backoff_doubles_per_cluster_caps_and_resets() {
        let b = Backoff::default();
        let waits: Vec<_> = (0..8).map(|_| b.next("a").as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(b.next("b"), BACKOFF_FIRST, "per cluster");
        b.reset("a");
        assert_eq!(b.next("a"), BACKOFF_FIRST);
    }
}
