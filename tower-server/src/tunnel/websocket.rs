//! The agents' WebSocket port: SSH inside a WebSocket, `ws://` or `wss://`
//! on one port (TLS is told apart by its first byte), for agents that may
//! leave their network only through an HTTP proxy or only on port 443.
//!
//! A connection here passes the same intake as a raw SSH one (connection
//! limit, unauthenticated slots, one deadline that covers the TLS and
//! WebSocket handshakes and SSH authentication), then runs the same SSH
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower_proto::transport::{BoxIo, Transport, WebSocket};

use super::ssh::{Intake, Slots, connection};
use crate::server::Shared;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts WebSocket connections until `shutdown` fires.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    intake: Arc<Intake>,
    shutdown: CancellationToken,
) {
    while let Some((socket, peer)) = tower_ops::accept(&listener, "websocket", &shutdown).await {
        let Some(slots) = intake.admit(peer) else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        shared.tasks.spawn(accept(
            shared.clone(),
            intake.clone(),
            socket,
            peer,
            slots,
            shutdown.clone(),
        ));
    }
}

async fn accept(
    shared: Arc<Shared>,
    intake: Arc<Intake>,
    socket: TcpStream,
    peer: SocketAddr,
    slots: Slots,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + shared.config.ssh_auth_timeout;
    let cut = slots.1.cut.clone();
    let handshake = async {
        let mut first = [0u8; 1];
        let tls = socket.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE;
        let io: BoxIo = if tls {
            let acceptor = tokio_rustls::TlsAcceptor::from(shared.agent_tls.clone());
            Box::new(acceptor.accept(socket).await?)
        } else {
            Box::new(socket)
        };
        let io = WebSocket.accept(io).await?;
        shared
            .metrics
            .agent_connection(if tls { "wss" } else { "ws" });
        Ok::<_, tower_proto::transport::TransportError>(io)
    };
    let io = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => match r {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "agent WebSocket handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "agent WebSocket handshake did not finish in time");
                return;
            }
        },
        _ = cut.cancelled() => return,
        _ = shutdown.cancelled() => return,
    };
    connection(
        shared,
        intake.config.clone(),
        io,
        peer,
        slots,
        deadline,
        shutdown,
    )
    .await
}
