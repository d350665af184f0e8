//! The SSH listener agents dial: admission of connections that have not
//! authenticated yet, the authentication deadline, and each connection's life
//! until it ends or the server shuts down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::{MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::auth::Connection;
use super::cut::Cuttable;
use crate::admission::{Admission, Pending, Throttled};
use crate::server::Shared;

/// Builds the russh server configuration.
pub(crate) fn config(shared: &Shared) -> russh::server::Config {
    russh::server::Config {
        methods: MethodSet::from(&[MethodKind::Password][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![shared.host_key.private_key().clone()],
        keepalive_interval: Some(shared.config.keepalive_interval),
        keepalive_max: shared.config.keepalive_max,
        // Keepalives detect a silent peer only while the session loop runs; a
        // write blocked on a blackholed peer (full socket buffers) is bounded
        // by this instead. A live agent answers keepalives, so an idle session
        // never reaches it.
        inactivity_timeout: Some(
            shared.config.keepalive_interval * (shared.config.keepalive_max as u32 + 2),
        ),
        max_auth_attempts: 3,
        nodelay: true,
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        channel_buffer_size: 256,
        ..Default::default()
    }
}

/// Accepts agent connections until `shutdown` fires.
///
/// Every connection holds a slot of `max_ssh_connections`. Until it
/// authenticates it also holds an *unauthenticated* slot, capped overall and
/// per source ([`Admission`]), and it must authenticate within
/// `ssh_auth_timeout` or it is cut. russh's `run_stream` has no deadline of its
/// own (with no inactivity timeout it waits forever for a client's version
/// line), so garbage, half-open and slow-drip connections would otherwise pile
/// up without bound.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let config = Arc::new(config(&shared));
    let limit = Arc::new(tokio::sync::Semaphore::new(
        shared.config.max_ssh_connections,
    ));
    let admission = Arc::new(Admission::new(
        shared.config.max_unauthenticated_ssh,
        shared.config.max_unauthenticated_ssh_per_source,
    ));
    let dropped = Throttled::default();
    while let Some((socket, peer)) = tower_ops::accept(&listener, "ssh", &shutdown).await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            dropped.warn(peer, "ssh connection limit reached; dropping connections");
            continue;
        };
        let Some(pending) = admission.admit(peer.ip()) else {
            dropped.warn(
                peer,
                "too many unauthenticated ssh connections (overall or from this source); dropping connections",
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        shared.tasks.spawn(connection(
            shared.clone(),
            config.clone(),
            socket,
            peer,
            (permit, pending),
            shutdown.clone(),
        ));
    }
}

/// Runs one SSH connection: cuts it if it has not authenticated by the
/// deadline, and on shutdown after a short grace for the disconnect message.
async fn connection(
    shared: Arc<Shared>,
    config: Arc<russh::server::Config>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    (_permit, pending): (tokio::sync::OwnedSemaphorePermit, Pending),
    shutdown: CancellationToken,
) {
    let cut = pending.cut.clone();
    let authenticated = CancellationToken::new();
    let handler = Connection::new(shared.clone(), Some(peer), authenticated.clone());
    let io = Cuttable::new(socket, cut.clone());
    let session = async {
        let running = russh::server::run_stream(config, io, handler).await?;
        let handle = running.handle();
        tokio::pin!(running);
        tokio::select! {
            r = &mut running => r,
            _ = shutdown.cancelled() => {
                let bye = handle.disconnect(
                    russh::Disconnect::ByApplication,
                    "server shutting down".into(),
                    "en".into(),
                );
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, bye).await;
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut running).await {
                    Ok(r) => r,
                    Err(_) => {
                        cut.cancel();
                        running.await
                    }
                }
            }
        }
    };
    tokio::pin!(session);
    let deadline = tokio::time::sleep(shared.config.ssh_auth_timeout);
    let early = tokio::select! {
        r = &mut session => Some(r),
        _ = authenticated.cancelled() => None,
        // Not authenticated yet: nothing to say goodbye to.
        _ = shutdown.cancelled() => {
            cut.cancel();
            None
        }
        _ = deadline => {
            tracing::debug!(%peer, timeout = ?shared.config.ssh_auth_timeout, "ssh connection did not authenticate in time; cutting it");
            cut.cancel();
            None
        }
    };
    // Authenticated (or cut): the unauthenticated slot is free again.
    drop(pending);
    let result = match early {
        Some(r) => r,
        None if cut.is_cancelled() => match tokio::time::timeout(CUT_GRACE, &mut session).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(%peer, "ssh session did not end after its socket was cut");
                return;
            }
        },
        None => session.await,
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "ssh connection ended with error");
    }
}

/// How long a shutting-down server waits for a disconnect to reach the agent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a cut session may take to notice its socket is gone.
const CUT_GRACE: Duration = Duration::from_secs(5);
