//! Where the gateway looks up which replica holds a cluster's session: what
//! the owner itself recorded (the Agent's `servingReplica`, while it says
//! Connected), believed only while that replica's Lease is valid, and its
//! peer address from the Lease.

use kube::runtime::reflector::{ObjectRef, Store};

use crate::kube::crd::{Agent, CONDITION_CONNECTED};
use crate::kube::membership::Members;
use crate::peer::{Owner, OwnerBook, PROBE_WINDOW};

/// The [`OwnerBook`] of a replica in Kubernetes mode.
pub(super) struct AgentOwners {
    pub(super) agents: Store<Agent>,
    pub(super) members: Members,
}

impl OwnerBook for AgentOwners {
    fn owner(&self, cluster: &str) -> Option<Owner> {
        let agent = self.agents.get(&ObjectRef::new(cluster))?;
        self.replica(agent.status.as_ref()?.connected_replica()?)
    }

    fn replicas(&self) -> Vec<Owner> {
        self.members
            .valid()
            .iter()
            .filter_map(|r| self.replica(r))
            .collect()
    }

    fn lately_held(&self, cluster: &str) -> bool {
        let Some(agent) = self.agents.get(&ObjectRef::new(cluster)) else {
            return false;
        };
        let Some(status) = agent.status.as_ref() else {
            return false;
        };
        if let Some(replica) = status.connected_replica() {
            // Recorded as held, by a replica whose Lease lapsed.
            return self.members.valid_member(replica).is_none();
        }
        // Recorded as not held: since when.
        status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_CONNECTED)
            .and_then(|c| c.last_transition_time.as_ref())
            .is_some_and(|t| {
                let since = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                since.as_secs() < PROBE_WINDOW.as_secs() as i64
            })
    }

    fn replica(&self, replica: &str) -> Option<Owner> {
        let member = self.members.valid_member(replica)?;
        Some(Owner {
            replica: member.replica,
            address: member.peer_address?,
        })
    }
}
