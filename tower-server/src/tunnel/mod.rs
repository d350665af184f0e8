//! The agent side of the server: the SSH listener agents dial, and the
//! sessions that carry requests to them.
//!
//! - [`ssh`]: accepts connections, admits those not authenticated yet
//!   ([`crate::admission`]), enforces the authentication deadline.
//! - [`websocket`]: the same for SSH inside a WebSocket (`ws://`, `wss://`).
//! - [`auth`]: the russh handler of one connection: join-token auth, the
//!   control channel and `tcpip-forward` requests it accepts.
//! - [`control`]: the hello/welcome exchange.
//! - [`session`]: one connected agent; sends requests over its channels.
//! - [`registry`]: live sessions by cluster.
//! - [`channel`]: a channel as a metered byte stream; [`cut`]: a socket the
//!   server can cut.

mod auth;
mod channel;
mod control;
mod cut;
mod registry;
mod session;
mod ssh;
mod websocket;

pub(crate) use auth::AuthLimiter;
pub use channel::ChannelIo;
pub use registry::Registry;
pub use session::{ForwardError, Session};

/// Why a replica handing its agents off turns new ones away.
pub(crate) const HANDING_OFF: &str =
    "this server replica is going away; connecting again reaches another one";

/// Runs the raw SSH listener and, if given, the WebSocket one, sharing one
/// intake (limits and unauthenticated slots), until `shutdown`.
pub(crate) async fn serve(
    shared: std::sync::Arc<crate::server::Shared>,
    ssh: tokio::net::TcpListener,
    websocket: Option<tokio::net::TcpListener>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let intake = std::sync::Arc::new(ssh::Intake::new(&shared));
    let ws = websocket.map(|listener| {
        shared.tasks.spawn(websocket::serve(
            shared.clone(),
            listener,
            intake.clone(),
            shutdown.clone(),
        ))
    });
    ssh::serve(shared, ssh, intake, shutdown).await;
    if let Some(ws) = ws {
        let _ = ws.await;
    }
}
