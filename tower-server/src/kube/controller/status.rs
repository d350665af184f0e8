//! What the leader says about a proxy Cluster's agent: the `AgentAvailable`
//! condition on the Cluster and the connection detail in the Agent's status.
//! The Cluster's goes through the main resource (KubeSphere's CRD has no
//! status subresource) merged into KubeSphere's own list, the Agent's through
//! `/status`; both are merge patches guarded by the resourceVersion the
//! decision was made on (a conflict retries with the newer object).

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};

use super::merge_params;
use crate::Server;
use crate::kube::crd::{
    Agent, AgentStatus, CONDITION_AGENT_AVAILABLE, CONDITION_CONNECTED, Cluster, Condition,
};
use crate::tunnel::Session;

/// Whether a cluster's agent is available, as a condition says it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Availability {
    pub connected: bool,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// The live session's detail the Agent's status carries.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct SessionDetail {
    pub agent_version: Option<String>,
    pub connected_since: SystemTime,
    pub rtt_millis: Option<i64>,
}

impl SessionDetail {
    pub(super) fn of(session: &Session) -> Self {
        Self {
            agent_version: session.hello().map(|h| h.agent_version),
            connected_since: session.connected_since,
            rtt_millis: session.rtt().map(|d| d.as_millis() as i64),
        }
    }
}

/// `cluster`'s availability: its session on this replica, or on `remote`,
/// another replica whose valid Lease and own report on the Agent say it holds
/// the session. Which replica holds it is the Agent's `servingReplica`, not
/// the condition's message: an agent moving between replicas changes no
/// Cluster.
pub(super) fn availability(
    server: &Server,
    cluster: &str,
    paused: bool,
    remote: Option<&str>,
) -> Availability {
    // A session here the agent is leaving for `remote` no longer counts.
    let local = server.registry().is_connected(cluster)
        && !(remote.is_some() && server.registry().is_moving(cluster));
    let connected = local || remote.is_some();
    let (status, reason, message) = match (connected, paused) {
        (_, true) => (
            "False",
            "AgentPaused",
            "the Agent is paused; its connections are refused".to_string(),
        ),
        (true, _) => (
            "True",
            "AgentConnected",
            "the agent is connected to tower-server".to_string(),
        ),
        (false, _) => (
            "False",
            "AgentDisconnected",
            "no agent is connected for this cluster; check the agent's logs in the member cluster"
                .to_string(),
        ),
    };
    Availability {
        connected,
        status,
        reason,
        message,
    }
}

/// How a Cluster's status is written (unknown until the first write): KubeSphere's CRD has no status
/// subresource, so through the main resource; a CRD with the subresource
/// (older Tower charts) drops status from main-resource writes, which the
/// first write notices, and from then on status goes to `/status`.
#[derive(Default)]
pub(super) struct StatusPath(AtomicU8);

const PATH_MAIN: u8 = 1;
const PATH_SUBRESOURCE: u8 = 2;

/// One write of a Cluster: `connection` keys into `spec.connection` and the
/// whole `conditions` list (KubeSphere's own conditions included, as read),
/// one resourceVersion-guarded merge patch; `None` parts are left alone.
pub(super) async fn write_cluster(
    client: &kube::Client,
    path: &StatusPath,
    cluster: &Cluster,
    connection: Option<serde_json::Value>,
    conditions: Option<Vec<Condition>>,
) -> kube::Result<()> {
    if connection.is_none() && conditions.is_none() {
        return Ok(());
    }
    let api = Api::<Cluster>::all(client.clone());
    let name = cluster.name_any();
    let via_subresource = path.0.load(Ordering::Relaxed) == PATH_SUBRESOURCE;
    let mut patch = serde_json::json!({
        "metadata": { "resourceVersion": cluster.resource_version() },
    });
    if let Some(connection) = &connection {
        patch["spec"] = serde_json::json!({ "connection": connection });
    }
    if let (Some(conditions), false) = (&conditions, via_subresource) {
        patch["status"] = serde_json::json!({ "conditions": conditions });
    }
    let mut resource_version = cluster.resource_version();
    if connection.is_some() || !via_subresource {
        let written = api
            .patch(&name, &merge_params(), &Patch::Merge(&patch))
            .await?;
        resource_version = written.resource_version();
        let Some(conditions) = &conditions else {
            return Ok(());
        };
        if via_subresource {
            // Status still to write, below.
        } else if same_conditions(
            written.status.as_ref().map(|s| &s.conditions[..]),
            conditions,
        ) {
            path.0.store(PATH_MAIN, Ordering::Relaxed);
            return Ok(());
        } else if path.0.load(Ordering::Relaxed) == PATH_MAIN {
            // The main resource took status before: someone else's newer
            // write raced ours; the watch brings it back for another look.
            return Ok(());
        } else {
            tracing::info!("the Cluster CRD has a status subresource; writing status there");
            path.0.store(PATH_SUBRESOURCE, Ordering::Relaxed);
        }
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": resource_version },
        "status": { "conditions": conditions },
    });
    api.patch_status(&name, &merge_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn same_conditions(written: Option<&[Condition]>, wanted: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
        )
    };
    let written: Vec<_> = written.unwrap_or_default().iter().map(key).collect();
    wanted.iter().all(|w| written.contains(&key(w)))
}

/// The Cluster's conditions with `AgentAvailable` as `available` says;
/// `None` when nothing would change.
pub(super) fn cluster_conditions(
    cluster: &Cluster,
    available: &Availability,
) -> Option<Vec<Condition>> {
    let existing = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    merge_condition(
        &existing,
        CONDITION_AGENT_AVAILABLE,
        available.status,
        available.reason,
        &available.message,
    )
}

/// The Agent's status after `old`: the `Connected` condition, the kubeconfig
/// and, while connected, the session's detail.
pub(super) fn agent_status(
    old: AgentStatus,
    available: &Availability,
    session: Option<SessionDetail>,
    replica: &str,
    kubeconfig: Vec<u8>,
) -> AgentStatus {
    let mut new = AgentStatus {
        conditions: merge_condition(
            &old.conditions,
            CONDITION_CONNECTED,
            available.status,
            available.reason,
            &available.message,
        )
        .unwrap_or_else(|| old.conditions.clone()),
        kubeconfig: Some(ByteString(kubeconfig)),
        ..Default::default()
    };
    let Some(s) = session else {
        new.last_heartbeat = old.last_heartbeat;
        new.agent_version = old.agent_version;
        return new;
    };
    new.agent_version = s.agent_version;
    new.connected_since = Some(time(s.connected_since));
    new.serving_replica = Some(replica.to_string());
    // Heartbeats are recorded when the connection changes, not on every
    // keepalive, so that a quiet cluster causes no writes; the same goes for
    // the RTT once known.
    let same_connection = old.connected_since == new.connected_since;
    new.last_heartbeat = if same_connection {
        old.last_heartbeat
    } else {
        Some(time(SystemTime::now()))
    };
    new.rtt_millis = if same_connection && old.rtt_millis.is_some() {
        old.rtt_millis
    } else {
        s.rtt_millis
    };
    new
}

/// Writes `new` as the Agent's status when it differs.
pub(super) async fn write_agent_status(
    client: &kube::Client,
    agent: &Agent,
    new: AgentStatus,
) -> kube::Result<()> {
    if agent.status.clone().unwrap_or_default() == new {
        return Ok(());
    }
    merge_status(client, agent, serde_json::json!(new)).await
}

/// A merge patch of an Agent's `/status`, guarded by the resourceVersion it
/// was read at.
async fn merge_status<K>(
    client: &kube::Client,
    object: &K,
    status: serde_json::Value,
) -> kube::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": object.resource_version() },
        "status": status,
    });
    Api::<K>::all(client.clone())
        .patch_status(&object.name_any(), &merge_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// `existing` with condition `type_` set; `None` when nothing would change.
pub(super) fn merge_condition(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::controller::testing::{
        Mock, agent_with_token_ref, proxy_cluster, test_server,
    };

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

    #[test]
    fn availability_without_a_session_and_when_paused() {
        let (server, _dir) = test_server();
        let gone = availability(&server, "gondor", false, None);
        assert_eq!(
            (gone.connected, gone.status, gone.reason),
            (false, "False", "AgentDisconnected")
        );
        let paused = availability(&server, "gondor", true, None);
        let elsewhere = availability(&server, "gondor", false, Some("tower-2"));
        assert_eq!(
            (elsewhere.connected, elsewhere.status, elsewhere.reason),
            (true, "True", "AgentConnected")
        );
        assert_eq!(
            elsewhere.message, "the agent is connected to tower-server",
            "which replica is the Agent's to say: a move changes no Cluster"
        );
        assert_eq!((paused.status, paused.reason), ("False", "AgentPaused"));
        assert_eq!(
            paused.message,
            "the Agent is paused; its connections are refused"
        );
    }

    fn connected() -> Availability {
        Availability {
            connected: true,
            status: "True",
            reason: "AgentConnected",
            message: "the agent is connected to tower-server".into(),
        }
    }

    const MAIN: &str = "/apis/cluster.kubesphere.io/v1alpha1/clusters/gondor";

    #[tokio::test]
    async fn cluster_conditions_go_through_the_main_resource_guarded_by_resource_version() {
        let mock = Mock::new();
        let path = StatusPath::default();
        let mut cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        cluster.metadata.resource_version = Some("42".into());
        let ready = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        };
        cluster.status = Some(crate::kube::crd::ClusterStatus {
            conditions: vec![ready.clone()],
            ..Default::default()
        });
        let conditions = cluster_conditions(&cluster, &connected()).unwrap();
        let (done, ()) = tokio::join!(
            write_cluster(
                &mock.client,
                &path,
                &cluster,
                None,
                Some(conditions.clone())
            ),
            async {
                let req = mock.next().await;
                req.assert_status_merge(MAIN, Some("42"));
                let list = req.body["status"]["conditions"].as_array().unwrap();
                assert_eq!(list.len(), 2, "KubeSphere's own condition is kept");
                assert_eq!(list[0]["type"], "Ready");
                let c = &list[1];
                assert_eq!(c["type"], "AgentAvailable");
                assert_eq!(c["status"], "True");
                assert_eq!(c["reason"], "AgentConnected");
                assert_eq!(c["message"], "the agent is connected to tower-server");
                assert_eq!(
                    req.body["status"].as_object().unwrap().len(),
                    1,
                    "only conditions"
                );
                assert!(req.body.get("spec").is_none());
                let mut back = cluster.clone();
                back.status.as_mut().unwrap().conditions = conditions.clone();
                req.reply(200, &back);
            }
        );
        done.unwrap();
        assert_eq!(path.0.load(Ordering::Relaxed), PATH_MAIN);
        // Once the condition is there, nothing is written.
        cluster.status.as_mut().unwrap().conditions = conditions;
        assert!(cluster_conditions(&cluster, &connected()).is_none());
        write_cluster(&mock.client, &path, &cluster, None, None)
            .await
            .unwrap();
        mock.assert_quiet().await;
    }

    #[tokio::test]
    async fn a_crd_with_a_status_subresource_gets_status_written_there() {
        let mock = Mock::new();
        let path = StatusPath::default();
        let mut cluster = proxy_cluster("gondor", Some("cluster-token-0123456789"));
        cluster.metadata.resource_version = Some("42".into());
        let conditions = cluster_conditions(&cluster, &connected()).unwrap();
        let connection = serde_json::json!({ "kubesphereAPIEndpoint": "http://10.0.0.9:80" });
        let (done, ()) = tokio::join!(
            write_cluster(
                &mock.client,
                &path,
                &cluster,
                Some(connection),
                Some(conditions.clone())
            ),
            async {
                let main = mock.next().await;
                main.assert_status_merge(MAIN, Some("42"));
                assert_eq!(
                    main.body["spec"]["connection"]["kubesphereAPIEndpoint"],
                    "http://10.0.0.9:80"
                );
                // The subresource drops status from main-resource writes.
                let mut back = cluster.clone();
                back.metadata.resource_version = Some("43".into());
                main.reply(200, &back);
                let status = mock.next().await;
                status.assert_status_merge(&format!("{MAIN}/status"), Some("43"));
                assert_eq!(
                    status.body["status"]["conditions"][0]["type"],
                    "AgentAvailable"
                );
                status.reply(200, &back);
            }
        );
        done.unwrap();
        assert_eq!(path.0.load(Ordering::Relaxed), PATH_SUBRESOURCE);
        // From then on status goes straight to /status.
        let (done, ()) = tokio::join!(
            write_cluster(&mock.client, &path, &cluster, None, Some(conditions)),
            async {
                let status = mock.next().await;
                status.assert_status_merge(&format!("{MAIN}/status"), Some("42"));
                status.reply(200, &cluster);
            }
        );
        done.unwrap();
        mock.assert_quiet().await;
    }

    #[test]
    fn agent_status_keeps_heartbeat_and_rtt_while_the_connection_is_the_same() {
        let since = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let session = SessionDetail {
            agent_version: Some("1.2.3".into()),
            connected_since: since,
            rtt_millis: Some(7),
        };
        let first = agent_status(
            AgentStatus::default(),
            &connected(),
            Some(session.clone()),
            "tower-0",
            b"kc".to_vec(),
        );
        assert_eq!(first.agent_version.as_deref(), Some("1.2.3"));
        assert_eq!(first.serving_replica.as_deref(), Some("tower-0"));
        assert_eq!(first.rtt_millis, Some(7));
        assert_eq!(first.connected_since, Some(time(since)));
        assert!(first.last_heartbeat.is_some());
        assert_eq!(first.conditions[0].type_, CONDITION_CONNECTED);
        let later = SessionDetail {
            rtt_millis: Some(9),
            ..session
        };
        let again = agent_status(
            first.clone(),
            &connected(),
            Some(later),
            "tower-0",
            b"kc".to_vec(),
        );
        assert_eq!(again, first, "a quiet connection changes nothing");
        let (server, _dir) = test_server();
        let gone = agent_status(
            first.clone(),
            &availability(&server, "gondor", false, None),
            None,
            "tower-0",
            b"kc".to_vec(),
        );
        assert_eq!(gone.agent_version, first.agent_version);
        assert_eq!(gone.last_heartbeat, first.last_heartbeat);
        assert_eq!(gone.connected_since, None);
        assert_eq!(gone.serving_replica, None);
        assert_eq!(
            gone.conditions[0].reason.as_deref(),
            Some("AgentDisconnected")
        );
    }

    #[tokio::test]
    async fn agent_status_is_a_merge_patch_on_status_written_only_on_change() {
        let mock = Mock::new();
        let mut agent = agent_with_token_ref("gondor", "tower-tokens", "agent-tokens", false);
        agent.metadata.resource_version = Some("7".into());
        let new = agent_status(
            AgentStatus::default(),
            &connected(),
            None,
            "tower-0",
            b"kc".to_vec(),
        );
        let (done, ()) = tokio::join!(
            write_agent_status(&mock.client, &agent, new.clone()),
            async {
                let req = mock.next().await;
                req.assert_status_merge(
                    "/apis/tower.kubesphere.io/v1alpha1/agents/gondor/status",
                    Some("7"),
                );
                assert_eq!(req.body["status"], serde_json::to_value(&new).unwrap());
                assert_eq!(req.body["status"]["kubeconfig"], "a2M=");
                req.reply(200, &agent);
            }
        );
        done.unwrap();
        agent.status = Some(new.clone());
        write_agent_status(&mock.client, &agent, new).await.unwrap();
        mock.assert_quiet().await;
    }
}
