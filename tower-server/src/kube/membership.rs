//! Which tower-server replicas are alive: each keeps a Lease of its own
//! (`tower-server-<replica>`), renewed every few seconds and carrying its peer
//! address, and watches everyone's (a replica that joins is known to the
//! others within moments, not a renew period later). A replica is a member while its Lease's
//! `renewTime + leaseDurationSeconds` is in the future; the leader deletes
//! Leases long expired. Kubernetes is the only coordination: no secrets and
//! no consensus of our own.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

use super::crd::FIELD_MANAGER;
use super::lease::Leadership;

/// Label every replica Lease carries (value: the replica's name).
pub const REPLICA_LABEL: &str = "tower.kubesphere.io/replica";
/// Annotation holding a replica's peer address (host:port), when it has one.
pub const PEER_ADDRESS_ANNOTATION: &str = "tower.kubesphere.io/peer-address";
/// Prefix of replica Lease names.
pub const LEASE_PREFIX: &str = "tower-server-";
/// How long past its expiry the leader leaves a replica's Lease before
/// deleting it (a paused replica that comes back renews it meanwhile).
const DELETE_AFTER_EXPIRY: Duration = Duration::from_secs(60);

/// Settings of this replica's membership.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    pub namespace: String,
    pub replica: String,
    /// Where peers reach this replica, if anywhere.
    pub peer_address: Option<String>,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// One replica as its Lease says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub replica: String,
    pub peer_address: Option<String>,
    /// Unix seconds after which the Lease is expired.
    pub expires_at: i64,
}

impl Member {
    fn of(lease: &Lease) -> Option<Self> {
        let replica = lease.metadata.labels.as_ref()?.get(REPLICA_LABEL)?.clone();
        let spec = lease.spec.as_ref()?;
        let renewed = spec.renew_time.as_ref()?.0.as_second();
        let secs = i64::from(spec.lease_duration_seconds?);
        Some(Self {
            replica,
            peer_address: lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PEER_ADDRESS_ANNOTATION))
                .cloned(),
            expires_at: renewed + secs,
        })
    }

    /// Whether the Lease is valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> bool {
        self.expires_at > now
    }
}

/// The replicas as last listed; cheap to clone.
#[derive(Clone, Default)]
pub struct Members(Arc<RwLock<BTreeMap<String, Member>>>);

impl Members {
    /// Whether `replica`'s Lease is valid now.
    pub fn is_valid(&self, replica: &str) -> bool {
        let now = Timestamp::now().as_second();
        self.0
            .read()
            .expect("poisoned")
            .get(replica)
            .is_some_and(|m| m.valid_at(now))
    }

    /// `replica` as its Lease says, while the Lease is valid.
    pub fn valid_member(&self, replica: &str) -> Option<Member> {
        let now = Timestamp::now().as_second();
        self.0
            .read()
            .expect("poisoned")
            .get(replica)
            .filter(|m| m.valid_at(now))
            .cloned()
    }

    /// The replicas whose Lease is valid now.
    pub fn valid(&self) -> Vec<String> {
        let now = Timestamp::now().as_second();
        self.0
            .read()
            .expect("poisoned")
            .values()
            .filter(|m| m.valid_at(now))
            .map(|m| m.replica.clone())
            .collect()
    }

    /// Everyone listed, valid or not.
    pub fn all(&self) -> Vec<Member> {
        self.0.read().expect("poisoned").values().cloned().collect()
    }

    #[cfg(test)]
    pub fn insert(&self, member: Member) {
        self.0
            .write()
            .expect("poisoned")
            .insert(member.replica.clone(), member);
    }
}

/// The name of `replica`'s Lease.
pub fn lease_name(replica: &str) -> String {
    format!("{LEASE_PREFIX}{replica}")
}

/// Renews this replica's Lease and watches everyone's until `shutdown`,
/// then deletes its own (peers stop counting on it at once). The leader also
/// deletes Leases expired for a while.
pub async fn run(
    client: kube::Client,
    config: MembershipConfig,
    members: Members,
    leadership: Leadership,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(&config.replica);
    let watching = tokio::spawn(watch(api.clone(), members.clone(), shutdown.clone()));
    loop {
        if let Err(e) = renew(&api, &name, &config).await {
            tracing::warn!(error = %e, lease = %name, "renewing this replica's Lease failed");
        }
        if leadership.is_leader() {
            collect_expired(&api, &members.all()).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.renew_every) => {}
        }
    }
    let _ = watching.await;
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(lease = %name, "removed this replica's Lease"),
        Err(e) => tracing::warn!(error = %e, lease = %name, "removing this replica's Lease failed"),
    }
}

async fn renew(api: &Api<Lease>, name: &str, config: &MembershipConfig) -> kube::Result<()> {
    let now = MicroTime(Timestamp::now());
    let mut annotations = BTreeMap::new();
    if let Some(addr) = &config.peer_address {
        annotations.insert(PEER_ADDRESS_ANNOTATION.to_string(), addr.clone());
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([(REPLICA_LABEL.to_string(), config.replica.clone())].into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.replica.clone()),
            lease_duration_seconds: Some(config.duration.as_secs().max(1) as i32),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    let mut value = serde_json::to_value(&lease).expect("serializes");
    value["apiVersion"] = "coordination.k8s.io/v1".into();
    value["kind"] = "Lease".into();
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(())
}

/// Keeps `members` in step with the replica Leases until `shutdown`.
async fn watch(api: Api<Lease>, members: Members, shutdown: CancellationToken) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (store, writer) = reflector::store::<Lease>();
    let events = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().labels(REPLICA_LABEL)),
    )
    .default_backoff();
    tokio::pin!(events);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => tracing::debug!(error = %e, "watching replica Leases; retrying"),
                Some(Ok(_)) => {
                    *members.0.write().expect("poisoned") = store
                        .state()
                        .iter()
                        .filter_map(|l| Member::of(l))
                        .map(|m| (m.replica.clone(), m))
                        .collect();
                }
            },
        }
    }
}

/// Deletes the Leases of replicas gone for longer than [`DELETE_AFTER_EXPIRY`].
async fn collect_expired(api: &Api<Lease>, listed: &[Member]) {
    let now = Timestamp::now().as_second();
    for m in listed {
        if m.expires_at + DELETE_AFTER_EXPIRY.as_secs() as i64 <= now {
            let name = lease_name(&m.replica);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(replica = %m.replica, "removed an expired replica's Lease"),
                Err(e) => {
                    tracing::debug!(error = %e, replica = %m.replica, "removing an expired Lease failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_valid_until_renew_time_plus_duration() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "tower-server-r1",
                "labels": { REPLICA_LABEL: "r1" },
                "annotations": { PEER_ADDRESS_ANNOTATION: "10.0.0.5:9443" },
            },
            "spec": {
                "holderIdentity": "r1",
                "leaseDurationSeconds": 15,
                "renewTime": "2026-11-30T12:00:00.000000Z",
            },
        }))
        .unwrap();
        let m = Member::of(&lease).unwrap();
        assert_eq!(m.replica, "r1");
        assert_eq!(m.peer_address.as_deref(), Some("10.0.0.5:9443"));
        let renewed = "2026-11-30T12:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second();
        assert!(m.valid_at(renewed + 14));
        assert!(!m.valid_at(renewed + 15));
        let unlabelled: Lease = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "tower-server-leader" },
            "spec": { "holderIdentity": "r1", "leaseDurationSeconds": 15 },
        }))
        .unwrap();
        assert!(
            Member::of(&unlabelled).is_none(),
            "the leader Lease is no member"
        );
    }
}
