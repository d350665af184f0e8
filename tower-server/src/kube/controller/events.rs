//! Events on a Cluster when its agent connects or drops, so that a
//! disconnection shows even while the Cluster itself cannot be written
//! (KubeSphere's webhook refuses every Cluster update while the member is
//! unreachable), and how to tell such a refusal.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};

use super::Ctx;
use super::status::Availability;
use crate::kube::crd::{CONDITION_AGENT_AVAILABLE, Cluster};

/// Publishes an Event on `cluster` when its availability differs from the
/// last one this replica saw (at first sight: from what the Cluster's
/// condition says).
pub(super) async fn on_availability(ctx: &Ctx, cluster: &Cluster, available: &Availability) {
    let name = cluster.name_any();
    let now = available.status == "True";
    let before = {
        let mut seen = ctx.last_available.lock().expect("poisoned");
        let before = seen.get(&name).copied().or_else(|| {
            cluster
                .condition(CONDITION_AGENT_AVAILABLE)
                .map(|c| c.status == "True")
        });
        seen.insert(name.clone(), now);
        before
    };
    if before.is_none_or(|b| b == now) {
        return;
    }
    let event = Event {
        type_: if now {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: available.reason.to_string(),
        note: Some(available.message.clone()),
        action: if now { "Connect" } else { "Disconnect" }.to_string(),
        secondary: None,
    };
    let reference = ObjectReference {
        api_version: Some("cluster.kubesphere.io/v1alpha1".into()),
        kind: Some("Cluster".into()),
        name: Some(name.clone()),
        uid: cluster.metadata.uid.clone(),
        ..Default::default()
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(cluster = %name, error = %e, "publishing an Event failed");
    }
}

/// Whether `e` is an admission webhook's refusal, or a webhook that failed
/// to answer (KubeSphere registers its Cluster webhook with `failurePolicy:
/// Fail`).
pub(super) fn refused_by_admission(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.message.contains("admission webhook") || s.message.contains("failed calling webhook"))
}
