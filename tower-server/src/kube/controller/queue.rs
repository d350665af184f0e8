//! What reconciles which Cluster, and when: the watch events, deletions (which
//! never reach a reconcile), session changes and leadership.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures::{Stream, StreamExt, stream};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{ReconcileReason, ReconcileRequest};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use super::{Ctx, server_info};
use crate::kube::crd::{Agent, Cluster};

/// Triggers for one Cluster each, from outside the watches.
pub(super) type Triggers = UnboundedSender<ObjectRef<Cluster>>;

type Request = Result<ReconcileRequest<Cluster>, Infallible>;

/// The applier's queue: the Cluster and Agent watches (which also fill the
/// stores) and the external triggers.
pub(super) fn build(
    ctx: Arc<Ctx>,
    clusters: Api<Cluster>,
    cluster_writer: reflector::store::Writer<Cluster>,
    agents: Api<Agent>,
    agent_writer: reflector::store::Writer<Agent>,
    triggers: UnboundedReceiver<ObjectRef<Cluster>>,
) -> impl Stream<Item = Request> + Send + 'static {
    let cluster_events = watch(clusters, cluster_writer).flat_map({
        let ctx = ctx.clone();
        move |event| stream::iter(on_cluster_event(&ctx, event))
    });
    let agent_events = watch(agents, agent_writer).flat_map(move |event| {
        let names = on_agent_event(&ctx, event);
        stream::iter(names.into_iter().map(|n| ObjectRef::new(&n)))
    });
    stream::select_all([
        cluster_events.map(request).boxed(),
        agent_events.map(request).boxed(),
        triggers.map(request).boxed(),
    ])
}

fn request(obj_ref: ObjectRef<Cluster>) -> Request {
    Ok(ReconcileRequest {
        obj_ref,
        reason: ReconcileReason::Unknown,
    })
}

/// A reflector's events, retried with backoff; errors are logged and dropped.
fn watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
) -> impl Stream<Item = watcher::Event<K>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(|event| async move {
            event
                .inspect_err(|e| tracing::debug!(error = %e, "watch error; retrying"))
                .ok()
        })
}

/// A Cluster event (the store already holds it): forgets the tokens of every
/// Cluster no longer managed, and says which Clusters to reconcile.
fn on_cluster_event(ctx: &Ctx, event: watcher::Event<Cluster>) -> Vec<ObjectRef<Cluster>> {
    if let watcher::Event::Init | watcher::Event::InitApply(_) = event {
        return Vec::new(); // the store changes at InitDone
    }
    let live: HashSet<String> = ctx
        .clusters
        .state()
        .iter()
        .filter(|c| super::reconcile::managed(c))
        .map(|c| c.name_any())
        .collect();
    ctx.store.retain(&live);
    // A deleted (or no longer served) Cluster never reaches a reconcile:
    // its listeners close here.
    let served: HashSet<String> = ctx
        .clusters
        .state()
        .iter()
        .filter(|c| super::reconcile::managed(c) && super::kubesphere::listens(ctx, c))
        .map(|c| c.name_any())
        .collect();
    ctx.server.retain_cluster_listeners(|c| served.contains(c));
    match event {
        watcher::Event::Apply(c) => vec![ObjectRef::from_obj(&c)],
        watcher::Event::InitDone => ctx
            .clusters
            .state()
            .iter()
            .map(|c| ObjectRef::from_obj(&**c))
            .collect(),
        _ => Vec::new(),
    }
}

/// An Agent event (the store already holds it): ends the session of every
/// Agent gone since the last event, drops Secret watches no Agent needs, and
/// names the Clusters to reconcile (the Agent's, and those of gone Agents).
fn on_agent_event(ctx: &Ctx, event: watcher::Event<Agent>) -> Vec<String> {
    if let watcher::Event::Init | watcher::Event::InitApply(_) = event {
        return Vec::new(); // the store changes at InitDone
    }
    let agents = ctx.agents.state();
    let names: HashSet<String> = agents.iter().map(|a| a.name_any()).collect();
    let gone: Vec<String> = {
        let mut seen = ctx.seen_agents.lock().expect("poisoned");
        let gone = seen.difference(&names).cloned().collect();
        seen.clone_from(&names);
        gone
    };
    for name in &gone {
        end_session(ctx, name);
    }
    ctx.secrets
        .retain(agents.iter().filter_map(|a| a.spec.token_ref.clone()));
    let mut out = gone;
    match event {
        watcher::Event::Apply(a) | watcher::Event::Delete(a) => out.push(a.name_any()),
        watcher::Event::InitDone => out.extend(names),
        _ => {}
    }
    out
}

/// A deleted Agent ends its cluster's live session (the agent may come back
/// while the Cluster still carries a token).
fn end_session(ctx: &Ctx, cluster: &str) {
    if ctx.server.registry().get(cluster).is_some() {
        tracing::info!(cluster, "agent object deleted; ending its session");
        ctx.server.end_session(cluster, "agent object deleted");
    }
}

/// What a reconcile reads of a session that the registry announces: its id,
/// upstreams, whether its hello arrived, and whether its round trip is known.
type SessionState = (u64, Vec<String>, bool, bool);

/// Reconciles the Clusters whose session came, went, changed upstreams, said
/// hello or first measured its round trip.
pub(super) async fn session_triggers(
    ctx: Arc<Ctx>,
    triggers: Triggers,
    shutdown: CancellationToken,
) {
    let registry = ctx.server.registry();
    let mut changes = registry.subscribe();
    let mut last = BTreeMap::new();
    loop {
        let now: BTreeMap<String, SessionState> = registry
            .all()
            .iter()
            .map(|s| {
                let state = (s.id, s.upstreams(), s.hello().is_some(), s.rtt().is_some());
                (s.cluster.clone(), state)
            })
            .collect();
        for name in changed_keys(&last, &now) {
            let _ = triggers.unbounded_send(ObjectRef::new(&name));
        }
        last = now;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Keys added, removed or with another value.
fn changed_keys<V: PartialEq>(a: &BTreeMap<String, V>, b: &BTreeMap<String, V>) -> Vec<String> {
    let mut out: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    out.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
    out
}

/// While this replica leads: publishes the server info every resync,
/// reconciles every Cluster on becoming leader so that it catches up, and
/// those served by a replica whose Lease became valid or lapsed.
pub(super) async fn leader_duties(ctx: Arc<Ctx>, triggers: Triggers, shutdown: CancellationToken) {
    let mut was_leader = false;
    let mut published: Option<tokio::time::Instant> = None;
    let mut valid: BTreeSet<String> = BTreeSet::new();
    loop {
        let now: BTreeSet<String> = ctx.members.valid().into_iter().collect();
        if now != valid {
            let changed: BTreeSet<&String> = now.symmetric_difference(&valid).collect();
            for agent in ctx.agents.state() {
                let serving = agent
                    .status
                    .as_ref()
                    .and_then(|s| s.serving_replica.as_ref());
                if serving.is_some_and(|r| changed.contains(r)) {
                    let _ = triggers.unbounded_send(ObjectRef::new(&agent.name_any()));
                }
            }
            tracing::info!(replicas = ?now, "the replicas alive changed");
            valid = now;
        }
        let leader = ctx.leadership.is_leader();
        if leader && !was_leader {
            tracing::info!("leading: reconciling every cluster");
            for c in ctx.clusters.state() {
                let _ = triggers.unbounded_send(ObjectRef::from_obj(&*c));
            }
            published = None;
        }
        was_leader = leader;
        if leader && published.is_none_or(|at| at.elapsed() >= ctx.config.resync) {
            match server_info::publish(&ctx.client, &ctx.server, &ctx.config).await {
                Ok(()) => published = Some(tokio::time::Instant::now()),
                Err(e) => tracing::warn!(error = %e, "publishing server info failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.config.lease_renew) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::controller::testing::{mock_ctx, proxy_cluster};
    use crate::kube::crd::AgentSpec;
    use crate::kube::tokens::ClusterTokens;
    use crate::tokens::TokenStore;

    #[tokio::test]
    async fn a_cluster_gone_from_the_store_forgets_its_tokens() {
        let (mock, ctx, _dir) = mock_ctx(true, Vec::new());
        ctx.store.set("gone", ClusterTokens::default());
        let deleted = watcher::Event::Delete(proxy_cluster("gone", None));
        assert!(on_cluster_event(&ctx, deleted).is_empty());
        assert!(!ctx.store.knows("gone"));
        mock.assert_quiet().await;
    }

    #[tokio::test]
    async fn agent_events_name_their_cluster_and_those_of_agents_gone_meanwhile() {
        let gondor = Agent::new("gondor", AgentSpec::default());
        let (mock, ctx, _dir) = mock_ctx(true, vec![gondor.clone()]);
        ctx.seen_agents.lock().unwrap().insert("moria".into());
        let names = on_agent_event(&ctx, watcher::Event::Apply(gondor));
        assert_eq!(names, ["moria", "gondor"]);
        let seen = ctx.seen_agents.lock().unwrap().clone();
        assert_eq!(seen, HashSet::from(["gondor".to_string()]));
        mock.assert_quiet().await;
    }

    #[test]
    fn changed_keys_sees_new_gone_and_different() {
        let a: BTreeMap<String, (u64, bool)> = [
            ("same".into(), (1, true)),
            ("gone".into(), (2, true)),
            ("flip".into(), (3, false)),
        ]
        .into();
        let b: BTreeMap<String, (u64, bool)> = [
            ("same".into(), (1, true)),
            ("flip".into(), (3, true)),
            ("new".into(), (4, false)),
        ]
        .into();
        let mut got = changed_keys(&a, &b);
        got.sort();
        assert_eq!(got, ["flip", "gone", "new"]);
    }
}
