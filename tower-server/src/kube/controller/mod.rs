//! The control-plane integration: keeps proxy Clusters and their Agents in
//! step with the live sessions.
//!
//! Every replica mirrors tokens into the [`KubeTokenStore`] so any replica can
//! authenticate agents. Only the Lease holder writes:
//! - a token into `spec.connection.token` when a proxy Cluster has none
//!   ([`connection::ensure_token`]);
//! - the synthesized kubeconfig and endpoints into `spec.connection`
//!   (server-side apply, field manager `tower-server`), kept stable until its
//!   client certificate nears expiry ([`connection::write_connection`]);
//! - the `AgentAvailable` condition on the Cluster and the connection detail in
//!   the Agent's status (merge patches on `/status` guarded by the
//!   resourceVersion, [`status`]);
//! - the server-info ConfigMap ([`server_info`]).
//!
//! `direct` Clusters are never touched, and nothing is written when nothing
//! changed.
//!
//! # Shape
//!
//! The engine is kube-runtime's [`applier`], the scheduler under
//! `kube::runtime::Controller::run`: one reconcile per Cluster at a time,
//! deduplicated triggers, `Action::requeue(resync)` after a success and a
//! per-Cluster exponential backoff after a failure ([`reconcile`]). It is fed
//! by [`queue`]: the Cluster reflector, the Agent reflector (an Agent event
//! reconciles the Cluster of the same name), and a channel of single-Cluster
//! triggers from the session registry, the tokenRef Secret watches
//! ([`secrets`]) and a replica becoming leader. `Controller`'s stable builder
//! can neither share one Agent watch between a trigger and a readable store nor
//! take per-object triggers from outside (that is the
//! `unstable-runtime-reconcile-on` feature), hence `applier` directly.
//!
//! Deletions never reach a reconcile (the object is gone from the store);
//! [`queue`] handles them on the watch events: a deleted Agent ends its
//! cluster's session, a deleted (or no longer proxy) Cluster's tokens are
//! forgotten.

mod connection;
mod events;
mod kubesphere;
mod mirror;
mod owners;
mod queue;
mod reconcile;
mod secrets;
mod server_info;
mod status;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{self as applier_mod, applier};
use kube::runtime::reflector;
use tokio_util::sync::CancellationToken;

use super::crd::{Agent, Cluster};
use super::lease::{self, Leadership, LeaseConfig};
use super::membership::{self, Members, MembershipConfig};
use super::tokens::KubeTokenStore;
use crate::Server;

/// Field manager used only for a generated `spec.connection.token`, so that the
/// connection apply never owns (and never removes) the token.
pub const TOKEN_FIELD_MANAGER: &str = "tower-server-token";
/// Name of the ConfigMap where the server publishes how agents reach it.
pub const SERVER_INFO_CONFIGMAP: &str = "tower-server";

pub use kubesphere::{
    Adopt, KS_PORT_OFFSET, KubeSphereConfig, POD_LABELS, SERVED_BY_ANNOTATION,
    SERVED_BY_TOWER_SERVER, SERVICE_PREFIX, marked,
};

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
    /// KubeSphere mode: per-cluster ports, `mc-` Services and listeners for
    /// the Clusters KubeSphere's own tower serves.
    pub kubesphere: Option<KubeSphereConfig>,
    /// Where other replicas reach this one (host:port), recorded in its
    /// membership Lease.
    pub peer_address: Option<String>,
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
            kubesphere: None,
            peer_address: None,
        }
    }
}

/// A failed reconcile; the error policy retries it with backoff.
#[derive(Debug)]
pub struct Error(anyhow::Error);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Error {}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Self(e)
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self(e.into())
    }
}

/// What every reconcile shares.
struct Ctx {
    server: Server,
    client: kube::Client,
    store: Arc<KubeTokenStore>,
    config: ControllerConfig,
    leadership: Leadership,
    /// The replicas alive, from their Leases.
    members: Members,
    clusters: reflector::Store<Cluster>,
    agents: reflector::Store<Agent>,
    secrets: secrets::TokenRefSecrets,
    backoff: reconcile::Backoff,
    /// Agents seen so far, to notice deletions missed while a watch was down.
    seen_agents: Mutex<HashSet<String>>,
    /// Kube ports given to Clusters that do not record them yet, and to whom.
    claimed_ports: Mutex<BTreeMap<u16, String>>,
    /// Each Cluster's availability as last seen, for Events on a change.
    last_available: Mutex<HashMap<String, bool>>,
    recorder: kube::runtime::events::Recorder,
    status_path: status::StatusPath,
}

/// Parameters of every merge patch the controller makes: field manager
/// `tower-server`, so that `managedFields` name who wrote.
fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(crate::kube::crd::FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Server-side applies `patch` to `name` as `manager`, forced: the write every
/// apply here makes.
async fn force_apply<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    patch: serde_json::Value,
) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(manager).force();
    api.patch(name, &params, &Patch::Apply(&patch)).await?;
    Ok(())
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
    let members = Members::default();
    let membership_task = tokio::spawn(membership::run(
        client.clone(),
        MembershipConfig {
            namespace: config.namespace.clone(),
            replica: config.replica.clone(),
            peer_address: config.peer_address.clone(),
            duration: config.lease_duration,
            renew_every: config.lease_renew,
        },
        members.clone(),
        leadership.clone(),
        shutdown.clone(),
    ));
    let (clusters, cluster_writer) = reflector::store::<Cluster>();
    let (agents, agent_writer) = reflector::store::<Agent>();
    let (triggers, trigger_rx) = futures::channel::mpsc::unbounded();
    let reporter = kube::runtime::events::Reporter {
        controller: "tower-server".into(),
        instance: Some(config.replica.clone()),
    };
    server.set_owner_book(Arc::new(owners::AgentOwners {
        agents: agents.clone(),
        members: members.clone(),
    }));
    let ctx = Arc::new(Ctx {
        secrets: secrets::TokenRefSecrets::new(client.clone(), agents.clone(), triggers.clone()),
        server,
        client: client.clone(),
        store,
        config,
        leadership,
        members,
        clusters: clusters.clone(),
        agents,
        backoff: Default::default(),
        seen_agents: Default::default(),
        claimed_ports: Default::default(),
        last_available: Default::default(),
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter.clone()),
        status_path: Default::default(),
    });
    let queue = queue::build(
        ctx.clone(),
        Api::all(client.clone()),
        cluster_writer,
        Api::all(client),
        agent_writer,
        trigger_rx,
    );
    let side_tasks = [
        tokio::spawn(queue::session_triggers(
            ctx.clone(),
            triggers.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(queue::leader_duties(
            ctx.clone(),
            triggers,
            shutdown.clone(),
        )),
    ];
    let applied = applier(
        |cluster, ctx| Box::pin(reconcile::reconcile(cluster, ctx)),
        reconcile::error_policy,
        ctx,
        clusters,
        queue,
        applier_mod::Config::default(),
    );
    tokio::pin!(applied);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            item = applied.next() => match item {
                None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "controller"),
            },
        }
    }
    for task in side_tasks {
        let _ = task.await;
    }
    let _ = lease_task.await;
    let _ = membership_task.await;
    Ok(())
}
