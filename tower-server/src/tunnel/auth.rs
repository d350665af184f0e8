//! Agent authentication and what an authenticated agent may ask for: the
//! russh handler of one connection.
//!
//! The server accepts only what an agent legitimately asks for: password auth
//! with a join-token credential (user = cluster name), one control subsystem
//! channel, and `tcpip-forward` for known upstream names. It never opens
//! outbound connections for an agent (`direct-tcpip` is refused).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session as SshSession};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio_util::sync::CancellationToken;
use tower_proto::names::{CONTROL_SUBSYSTEM, FORWARD_PORT, KNOWN_UPSTREAMS};
use tower_proto::token;

use super::HANDING_OFF;
use super::Session;
use crate::admission::source_key;
use crate::server::Shared;
use crate::tokens::Verdict;

// === impl AuthLimiter ===

/// Per-source limit on failed authentications.
#[derive(Default)]
pub(crate) struct AuthLimiter {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthLimiter {
    const MAX_FAILURES: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(60);

    fn blocked(&self, ip: IpAddr) -> bool {
        let ip = source_key(ip);
        let mut map = self.failures.lock().expect("limiter poisoned");
        match map.get(&ip) {
            Some((n, since)) if since.elapsed() < Self::WINDOW => *n >= Self::MAX_FAILURES,
            Some(_) => {
                map.remove(&ip);
                false
            }
            None => false,
        }
    }

    fn fail(&self, ip: IpAddr) {
        let ip = source_key(ip);
        let mut map = self.failures.lock().expect("limiter poisoned");
        if map.len() > 100_000 {
            map.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

// === impl Connection ===

/// Per-connection SSH handler.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    /// Set after a credential matched.
    authed: Option<Authenticated>,
    session: Option<Arc<Session>>,
    /// The session channel waiting for its subsystem request: its task reads
    /// it meanwhile ([`hold_session_channel`]), and takes it over as the
    /// control channel when this says so. Dropping the sender (the request
    /// named something else, or the connection ended) drops the channel.
    pending: HashMap<ChannelId, tokio::sync::oneshot::Sender<Promote>>,
    /// One session channel per connection: the control channel.
    session_channel_opened: bool,
    /// Cancelled once a valid credential is accepted; ends the auth deadline.
    authenticated: CancellationToken,
}

/// Who a matched credential proved the peer to be.
#[derive(Clone)]
struct Authenticated {
    cluster: String,
    token_id: String,
    /// Why the token may no longer be used (expired, revoked): the peer gets
    /// in only far enough to read this on the control channel.
    refused: Option<&'static str>,
}

impl Connection {
    pub(super) fn new(
        shared: Arc<Shared>,
        peer: Option<SocketAddr>,
        authenticated: CancellationToken,
    ) -> Self {
        Self {
            shared,
            peer,
            authed: None,
            session: None,
            pending: HashMap::new(),
            session_channel_opened: false,
            authenticated,
        }
    }

    fn reject() -> Auth {
        Auth::Reject {
            proceed_with_methods: None,
            partial_success: false,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.closed.cancel();
            self.shared.registry.remove(&session.cluster, session.id);
            tracing::info!(cluster = %session.cluster, peer = ?self.peer, "agent disconnected");
        }
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::Password][..])),
            partial_success: false,
        })
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        let ip = self.peer.map(|p| p.ip());
        if ip.is_some_and(|ip| self.shared.limiter.blocked(ip)) {
            tracing::warn!(peer = ?self.peer, "agent auth refused: too many failures from this source");
            return Ok(Self::reject());
        }
        if !tower_proto::names::is_valid_cluster_name(user) {
            if let Some(ip) = ip {
                self.shared.limiter.fail(ip);
            }
            return Ok(Self::reject());
        }
        let (id, secret) = token::split_credential(password);
        let mut verdict = self.shared.store.check(user, id, &secret);
        if verdict == Verdict::Unknown {
            // A token minted since the last periodic refresh works at once.
            if let Err(e) = self.shared.store.refresh() {
                tracing::warn!(error = %e, "token store refresh failed");
            }
            verdict = self.shared.store.check(user, id, &secret);
        }
        match verdict {
            Verdict::Valid { token_id } if self.shared.handing_off.load(Ordering::Relaxed) => {
                // Going away: the agent reads why and connects again, to
                // another replica. Not a failed authentication.
                tracing::debug!(cluster = user, peer = ?self.peer, "agent turned away: this replica is handing its agents off");
                self.authed = Some(Authenticated {
                    cluster: user.to_string(),
                    token_id,
                    refused: Some(HANDING_OFF),
                });
                Ok(Auth::Accept)
            }
            Verdict::Valid { token_id } => {
                self.authed = Some(Authenticated {
                    cluster: user.to_string(),
                    token_id,
                    refused: None,
                });
                Ok(Auth::Accept)
            }
            verdict @ (Verdict::Expired | Verdict::Revoked) => {
                self.shared.metrics.auth_failures.inc();
                // The peer proved it holds the secret; let it in only far enough to
                // read why it is refused (on the control channel), then disconnect.
                tracing::warn!(cluster = user, peer = ?self.peer, reason = verdict.reason(), "agent refused");
                self.authed = Some(Authenticated {
                    cluster: user.to_string(),
                    token_id: id.unwrap_or_default().to_string(),
                    refused: Some(verdict.reason()),
                });
                Ok(Auth::Accept)
            }
            Verdict::Unknown => {
                self.shared.metrics.auth_failures.inc();
                tracing::warn!(cluster = user, peer = ?self.peer, "agent auth refused: unknown or wrong token");
                if let Some(ip) = ip {
                    self.shared.limiter.fail(ip);
                }
                Ok(Self::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut SshSession) -> Result<(), Self::Error> {
        let Some(Authenticated {
            cluster,
            token_id,
            refused: None,
        }) = self.authed.clone()
        else {
            return Ok(());
        };
        let s = Arc::new(Session::new(
            cluster.clone(),
            token_id,
            self.peer,
            session.handle(),
            self.shared.tasks.clone(),
            crate::gateway::tunnel_conn_window(self.shared.config.cluster_streams),
        ));
        if let Some(old) = self.shared.registry.insert(s.clone()) {
            tracing::info!(%cluster, "a new agent connection replaces the previous one");
            self.shared.tasks.spawn(async move {
                old.disconnect("replaced by a newer connection for this cluster")
                    .await
            });
        }
        tracing::info!(%cluster, peer = ?self.peer, "agent authenticated");
        self.session = Some(s);
        self.authenticated.cancel();
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if self.authed.is_none() || self.session_channel_opened {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        self.session_channel_opened = true;
        let (promote, promoted) = tokio::sync::oneshot::channel();
        self.pending.insert(channel.id(), promote);
        self.shared.tasks.spawn(hold_session_channel(
            self.shared.clone(),
            channel,
            promoted,
            self.peer,
        ));
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        tracing::debug!(peer = ?self.peer, "refusing an exec request");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        tracing::debug!(peer = ?self.peer, "refusing a shell request");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        let Some(promote) = self.pending.remove(&channel_id) else {
            session.channel_failure(channel_id)?;
            return Ok(());
        };
        if name != CONTROL_SUBSYSTEM {
            // Dropping `promote` ends the channel's task, and the channel.
            session.channel_failure(channel_id)?;
            return Ok(());
        }
        session.channel_success(channel_id)?;
        let _ = promote.send(Promote {
            session: self.session.clone(),
            refusal: self.authed.as_ref().and_then(|a| a.refused),
            handle: session.handle(),
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut SshSession,
    ) -> Result<bool, Self::Error> {
        let Some(session) = &self.session else {
            return Ok(false);
        };
        if !KNOWN_UPSTREAMS.contains(&address) {
            tracing::warn!(cluster = %session.cluster, upstream = address, "refusing forward of unknown upstream");
            return Ok(false);
        }
        if *port == 0 {
            *port = FORWARD_PORT;
        }
        session.add_upstream(address, *port);
        self.shared.registry.touch();
        tracing::info!(cluster = %session.cluster, upstream = address, h2 = session.speaks_h2(), "agent serves upstream");
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        _port: u32,
        _session: &mut SshSession,
    ) -> Result<bool, Self::Error> {
        if let Some(session) = &self.session {
            session.remove_upstream(address);
            self.shared.registry.touch();
            return Ok(true);
        }
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        tracing::warn!(peer = ?self.peer, host, port, "refusing direct-tcpip: the server dials nothing for agents");
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}

/// What a session channel needs to become the control channel.
struct Promote {
    session: Option<Arc<Session>>,
    refusal: Option<&'static str>,
    handle: russh::server::Handle,
}

/// Bytes a session channel may carry before its subsystem request; past it
/// the channel is closed. An agent sends nothing there.
const PENDING_DATA_CAP: usize = 64 * 1024;

/// Reads a session channel until its subsystem request, discarding what
/// arrives (at most [`PENDING_DATA_CAP`]), then serves it as the control
/// channel. russh refills a channel's window on arrival and its session loop
/// waits while a channel's queue is full, so a channel nobody reads would
/// stop the whole connection, cuts and keepalives included; this one is
/// always read, or dropped (russh then discards what arrives for it).
async fn hold_session_channel(
    shared: Arc<Shared>,
    mut channel: Channel<Msg>,
    mut promoted: tokio::sync::oneshot::Receiver<Promote>,
    peer: Option<SocketAddr>,
) {
    let mut discarded = 0usize;
    loop {
        tokio::select! {
            biased;
            promote = &mut promoted => {
                // Err: the request named another subsystem, or the connection
                // ended; the channel goes with this task.
                if let Ok(p) = promote {
                    super::control::serve(shared, channel, p.session, p.refusal, p.handle).await;
                }
                return;
            }
            msg = channel.wait() => match msg {
                None => return,
                Some(russh::ChannelMsg::Data { data })
                | Some(russh::ChannelMsg::ExtendedData { data, .. }) => {
                    discarded += data.len();
                    if discarded > PENDING_DATA_CAP {
                        tracing::warn!(?peer, bytes = discarded, "closing a session channel that carries data before its subsystem request");
                        let _ = tokio::time::timeout(Duration::from_secs(1), channel.close()).await;
                        return;
                    }
                }
                Some(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP address")
    }

    #[test]
    fn auth_limiter_blocks_after_ten_failures_per_source() {
        let l = AuthLimiter::default();
        for _ in 0..AuthLimiter::MAX_FAILURES {
            assert!(!l.blocked(ip("10.0.0.1")));
            l.fail(ip("10.0.0.1"));
        }
        assert!(l.blocked(ip("10.0.0.1")));
        assert!(!l.blocked(ip("10.0.0.2")));
        // IPv6 neighbours in one /64 share a budget.
        for i in 0..AuthLimiter::MAX_FAILURES {
            l.fail(ip(&format!("2001:db8::{:x}", i + 1)));
        }
        assert!(l.blocked(ip("2001:db8::ffff")));
    }
}
