//! Tower in Kubernetes: the server's identity and join tokens come from the
//! API, and a controller writes kubeconfigs and conditions back.
//!
//! - [`crd`]: the Cluster and Agent objects as Rust types (the chart's CRDs
//!   are generated from them).
//! - [`identity`]: the CA and SSH host key kept in Secrets.
//! - [`KubeTokenStore`]: join tokens mirrored from proxy Clusters and Agents.
//! - `controller`: keeps each proxy Cluster and its Agent in step with the
//!   live sessions; `lease`: which replica writes; [`membership`]: which
//!   replicas are alive (a Lease each).

mod controller;
pub mod crd;
mod identity;
mod lease;
pub mod membership;
mod tokens;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Server, ServerConfig};

pub use controller::{
    Adopt, ControllerConfig, KS_PORT_OFFSET, KubeSphereConfig, POD_LABELS, SERVED_BY_ANNOTATION,
    SERVED_BY_TOWER_SERVER, SERVER_INFO_CONFIGMAP, SERVICE_PREFIX, TOKEN_FIELD_MANAGER, marked,
};
pub use identity::{CA_SECRET, HOST_KEY_SECRET};
pub use tokens::{AGENT_TOKEN_ID, CLUSTER_TOKEN_ID, ClusterTokens, KubeTokenStore};

/// Runs the server wired to Kubernetes: identity from Secrets, tokens from
/// proxy Clusters and Agents, and the controller that writes kubeconfigs and
/// conditions back. `config.state_dir` is used as a scratch copy of the identity.
pub async fn run(
    config: ServerConfig,
    controller_config: ControllerConfig,
    client: kube::Client,
    ssh: TcpListener,
    gateway: TcpListener,
    ops: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listeners = crate::Listeners {
        ssh,
        gateway,
        websocket: None,
        peer: None,
    };
    run_with(config, controller_config, client, listeners, ops, shutdown).await
}

/// Like [`run`], with every listener the server may have.
pub async fn run_with(
    mut config: ServerConfig,
    mut controller_config: ControllerConfig,
    client: kube::Client,
    listeners: crate::Listeners,
    ops: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Agents are told which replica welcomed them; peers learn where this
    // one is from its Lease.
    config.server_id = controller_config.replica.clone();
    if let Some(address) = &config.peer_address {
        controller_config.peer_address = Some(address.clone());
    }
    identity::sync(&client, &controller_config.namespace, &config.state_dir).await?;
    let store = Arc::new(KubeTokenStore::default());
    let server = Server::with_store(config, store.clone())?;
    let ops = ops.map(|ops| {
        let (server, shutdown) = (server.clone(), shutdown.clone());
        tokio::spawn(async move { server.serve_ops(ops, shutdown).await })
    });
    // Stopping has two steps: the agents are handed to the other replicas
    // while everything here still serves, then the rest stops.
    let stop = CancellationToken::new();
    tokio::spawn({
        let (server, stop) = (server.clone(), stop.clone());
        async move {
            shutdown.cancelled().await;
            let config = server.config();
            if !config.hand_off_timeout.is_zero() {
                server
                    .hand_off(config.hand_off_rate, config.hand_off_timeout)
                    .await;
            }
            stop.cancel();
        }
    });
    let shutdown = stop;
    let ctrl = tokio::spawn(controller::run(
        server.clone(),
        client,
        store,
        controller_config,
        shutdown.clone(),
    ));
    server.run_with(listeners, shutdown).await?;
    ctrl.await??;
    if let Some(ops) = ops {
        ops.await?;
    }
    Ok(())
}
