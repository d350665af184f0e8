//! Where the gateway looks up which replica holds a cluster's session: what
//! the owner itself recorded (the Agent's `servingReplica`, while it says
//! Connected), believed only while that replica's Lease is valid, and its
//! peer address from the Lease.

use kube::runtime::reflector::{ObjectRef, Store};

use crate::kube::crd::Agent;
use crate::kube::membership::Members;
use crate::peer::{Owner, OwnerBook};

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

    fn replica(&self, replica: &str) -> Option<Owner> {
        let member = self.members.valid_member(replica)?;
        Some(Owner {
            replica: member.replica,
            address: member.peer_address?,
        })
    }
}
