//! The control channel: the agent's hello, the server's welcome or refusal.

use std::sync::Arc;
use std::time::Duration;

use russh::Channel;
use russh::server::Msg;
use tokio::io::{AsyncReadExt, BufReader};
use tower_proto::Hello;
use tower_proto::hello::{
    self, LineError, NOTICE_MOVE, Notice, ProtocolVersion, Refusal, Reply, Welcome,
};
use tower_proto::names::CAP_H2;

use super::Session;
use crate::server::Shared;

/// How long an agent has to say hello once its control channel is open.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an agent is refused on its control channel.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// Its token matched but is expired or revoked.
    #[error("{0}; mint a new join token with towerctl")]
    Token(&'static str),
    /// This replica is handing its agents off.
    #[error("{0}")]
    Leaving(&'static str),
    /// No hello, a malformed one, or another major version.
    #[error(transparent)]
    Hello(#[from] LineError),
}

/// Reads the agent's hello and answers with a welcome (or a refusal, after
/// which the connection ends). `refusal` is set when the agent's token matched
/// but may no longer be used; `session` is the agent's registered session.
pub(super) async fn serve(
    shared: Arc<Shared>,
    channel: Channel<Msg>,
    session: Option<Arc<Session>>,
    refusal: Option<&'static str>,
    handle: russh::server::Handle,
) {
    let mut stream = BufReader::new(channel.into_stream());
    let hello = hello::read_message::<Hello, _>(&mut stream, HELLO_TIMEOUT).await;
    let decision = match (hello, refusal) {
        (_, Some(reason)) if reason == super::HANDING_OFF => Err(Refused::Leaving(reason)),
        (_, Some(reason)) => Err(Refused::Token(reason)),
        (Err(e), None) => Err(e.into()),
        (Ok(hello), None) => match ProtocolVersion::CURRENT.check_peer(hello.protocol) {
            Ok(()) => Ok(hello),
            Err(e) => Err(e.into()),
        },
    };
    let reply = match &decision {
        Ok(_) => Reply::Welcome(Welcome {
            protocol: ProtocolVersion::CURRENT,
            server_version: tower_proto::VERSION.to_string(),
            keepalive_interval_ms: shared.config.keepalive_interval.as_millis() as u64,
            keepalive_max: shared.config.keepalive_max as u32,
            capabilities: vec![CAP_H2.to_string()],
            server_id: shared.config.server_id.clone(),
        }),
        Err(why) => Reply::Refusal(Refusal {
            refused: why.to_string(),
        }),
    };
    let _ = hello::write_message(stream.get_mut(), &reply).await;
    match (decision, session) {
        (Ok(hello), Some(session)) => {
            tracing::info!(cluster = %session.cluster, agent_version = %hello.agent_version, "agent hello");
            session.set_hello(hello);
            // Keep the channel open; it ends with the connection. A request
            // to move goes out on it once.
            let mut buf = [0u8; 1024];
            let mut told = false;
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    },
                    _ = session.move_requested(), if !told => {
                        told = true;
                        let notice = Notice {
                            notice: NOTICE_MOVE.to_string(),
                            reason: "this server replica is going away".to_string(),
                        };
                        if let Err(e) = hello::write_message(stream.get_mut(), &notice).await {
                            tracing::debug!(cluster = %session.cluster, error = %e, "could not ask the agent to move");
                        }
                    }
                }
            }
        }
        (Err(why), _) => {
            tracing::warn!(reason = %why, "agent refused on control channel");
            // The refusal is written; nothing more is read from a refused
            // peer, so the channel goes now (russh then discards what
            // arrives for it) rather than sit unread while we wait.
            drop(stream);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    why.to_string(),
                    "en".into(),
                )
                .await;
        }
        (Ok(_), None) => {}
    }
}
