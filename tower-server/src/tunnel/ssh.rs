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
        maximum_packet_size: tower_proto::tunnel::SSH_MAX_PACKET,
        channel_buffer_size: 256,
        ..Default::default()
    }
}

/// What every agent connection, on any transport, passes before it runs.
///
/// Every connection holds a slot of `max_ssh_connections`. Until it
/// authenticates it also holds an *unauthenticated* slot, capped overall and
/// per source ([`Admission`]), and it must authenticate within
/// `ssh_auth_timeout` or it is cut. russh's `run_stream` has no deadline of its
/// own (with no inactivity timeout it waits forever for a client's version
/// line), so garbage, half-open and slow-drip connections would otherwise pile
/// up without bound. A WebSocket's handshake counts against the same deadline.
pub(crate) struct Intake {
    pub(super) config: Arc<russh::server::Config>,
    limit: Arc<tokio::sync::Semaphore>,
    admission: Arc<Admission>,
    dropped: Throttled,
}

/// The slots an admitted connection holds.
pub(super) type Slots = (tokio::sync::OwnedSemaphorePermit, Pending);

impl Intake {
    pub(crate) fn new(shared: &Shared) -> Self {
        Self {
            config: Arc::new(config(shared)),
            limit: Arc::new(tokio::sync::Semaphore::new(
                shared.config.max_ssh_connections,
            )),
            admission: Arc::new(Admission::new(
                shared.config.max_unauthenticated_ssh,
                shared.config.max_unauthenticated_ssh_per_source,
                "too many unauthenticated agent connections (overall or from this source); dropping connections",
            )),
            dropped: Throttled::default(),
        }
    }

    /// Admits a new connection from `peer`, or refuses it (and logs, throttled).
    pub(super) fn admit(&self, peer: SocketAddr) -> Option<Slots> {
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            self.dropped
                .warn(peer, "agent connection limit reached; dropping connections");
            return None;
        };
        let pending = self.admission.admit_peer(peer)?;
        Some((permit, pending))
    }
}

/// Accepts raw SSH connections until `shutdown` fires.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    intake: Arc<Intake>,
    shutdown: CancellationToken,
) {
    while let Some((socket, peer)) = tower_ops::accept(&listener, "ssh", &shutdown).await {
        let Some(slots) = intake.admit(peer) else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        shared.metrics.agent_connection("ssh");
        let deadline = tokio::time::Instant::now() + shared.config.ssh_auth_timeout;
        shared.tasks.spawn(connection(
            shared.clone(),
            intake.config.clone(),
            socket,
            peer,
            slots,
            deadline,
            shutdown.clone(),
        ));
    }
}

/// Runs one SSH connection on `io` (a socket, or a transport's stream):
/// cuts it if it has not authenticated by `deadline`, and on shutdown after a
/// short grace for the disconnect message.
pub(super) async fn connection(
    shared: Arc<Shared>,
    config: Arc<russh::server::Config>,
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    peer: SocketAddr,
    (_permit, pending): Slots,
    deadline: tokio::time::Instant,
    shutdown: CancellationToken,
) {
    let cut = pending.cut.clone();
    let authenticated = CancellationToken::new();
    let handler = Connection::new(shared.clone(), Some(peer), authenticated.clone());
    let io = Cuttable::new(io, cut.clone());
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
    let deadline = tokio::time::sleep_until(deadline);
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
