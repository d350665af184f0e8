//! The SSH listener agents dial: authentication, the control channel (hello),
//! and registration of the upstreams an agent forwards.
//!
//! The server accepts only what an agent legitimately asks for: password auth
//! with a join-token credential (user = cluster name), one control subsystem
//! channel, and `tcpip-forward` for known upstream names. It never opens
//! outbound connections for an agent (`direct-tcpip` is refused).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session as SshSession};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tower_proto::hello::{self, ProtocolVersion, Refusal, Reply, Welcome};
use tower_proto::names::{CAP_H2, CONTROL_SUBSYSTEM, FORWARD_PORT, KNOWN_UPSTREAMS};
use tower_proto::{Hello, token};

use crate::Shared;
use crate::session::Session;
use crate::store::Verdict;

/// Builds the russh server configuration.
pub(crate) fn config(shared: &Shared) -> russh::server::Config {
    russh::server::Config {
        methods: MethodSet::from(&[MethodKind::Password][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![shared.host_key.private_key().clone()],
        keepalive_interval: Some(shared.config.keepalive_interval),
        keepalive_max: shared.config.keepalive_max,
        inactivity_timeout: None,
        max_auth_attempts: 3,
        nodelay: true,
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        channel_buffer_size: 256,
        ..Default::default()
    }
}

/// Accepts agent connections until `shutdown` fires.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let config = Arc::new(config(&shared));
    let limit = Arc::new(tokio::sync::Semaphore::new(
        shared.config.max_ssh_connections,
    ));
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "ssh accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "ssh connection limit reached; dropping connection");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let handler = Connection::new(shared.clone(), Some(peer));
        let config = config.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let running = match russh::server::run_stream(config, socket, handler).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "ssh handshake failed");
                    return;
                }
            };
            let handle = running.handle();
            tokio::select! {
                r = running => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "ssh connection ended with error");
                },
                _ = shutdown.cancelled() => {
                    let _ = handle.disconnect(russh::Disconnect::ByApplication, "server shutting down".into(), "en".into()).await;
                }
            }
        });
    }
}

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
    /// Set after a credential matched: cluster, token id, and a refusal reason if
    /// the token matched but is expired or revoked.
    authed: Option<(String, String, Option<&'static str>)>,
    session: Option<Arc<Session>>,
    pending: HashMap<ChannelId, Channel<Msg>>,
}

impl Connection {
    fn new(shared: Arc<Shared>, peer: Option<SocketAddr>) -> Self {
        Self {
            shared,
            peer,
            authed: None,
            session: None,
            pending: HashMap::new(),
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
            Verdict::Valid { token_id } => {
                self.authed = Some((user.to_string(), token_id, None));
                Ok(Auth::Accept)
            }
            verdict @ (Verdict::Expired | Verdict::Revoked) => {
                // The peer proved it holds the secret; let it in only far enough to
                // read why it is refused (on the control channel), then disconnect.
                tracing::warn!(cluster = user, peer = ?self.peer, reason = verdict.reason(), "agent refused");
                self.authed = Some((
                    user.to_string(),
                    id.unwrap_or_default().to_string(),
                    Some(verdict.reason()),
                ));
                Ok(Auth::Accept)
            }
            Verdict::Unknown => {
                tracing::warn!(cluster = user, peer = ?self.peer, "agent auth refused: unknown or wrong token");
                if let Some(ip) = ip {
                    self.shared.limiter.fail(ip);
                }
                Ok(Self::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut SshSession) -> Result<(), Self::Error> {
        let Some((cluster, token_id, None)) = self.authed.clone() else {
            return Ok(());
        };
        let s = Arc::new(Session::new(
            cluster.clone(),
            token_id,
            self.peer,
            session.handle(),
        ));
        if let Some(old) = self.shared.registry.insert(s.clone()) {
            tracing::info!(%cluster, "a new agent connection replaces the previous one");
            tokio::spawn(async move {
                old.disconnect("replaced by a newer connection for this cluster")
                    .await
            });
        }
        tracing::info!(%cluster, peer = ?self.peer, "agent authenticated");
        self.session = Some(s);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if self.authed.is_none() || !self.pending.is_empty() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        self.pending.insert(channel.id(), channel);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        let Some(channel) = self.pending.remove(&channel_id) else {
            session.channel_failure(channel_id)?;
            return Ok(());
        };
        if name != CONTROL_SUBSYSTEM {
            session.channel_failure(channel_id)?;
            return Ok(());
        }
        session.channel_success(channel_id)?;
        let refusal = self.authed.as_ref().and_then(|a| a.2);
        let shared = self.shared.clone();
        let target = self.session.clone();
        let handle = session.handle();
        tokio::spawn(control_channel(shared, channel, target, refusal, handle));
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

/// Reads the agent's hello and answers with a welcome (or a refusal).
async fn control_channel(
    shared: Arc<Shared>,
    channel: Channel<Msg>,
    session: Option<Arc<Session>>,
    refusal: Option<&'static str>,
    handle: russh::server::Handle,
) {
    let mut stream = BufReader::new(channel.into_stream());
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        (&mut stream)
            .take(hello::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line),
    )
    .await;
    let hello: Result<Hello, String> = match read {
        Ok(Ok(_)) => hello::decode_line(line.strip_suffix(b"\n").unwrap_or(&line)),
        Ok(Err(e)) => Err(format!("reading hello: {e}")),
        Err(_) => Err("no hello within 10s".into()),
    };
    let decision = match (&hello, refusal, &session) {
        (_, Some(reason), _) => Err(format!("{reason}; mint a new join token with towerctl")),
        (Err(e), _, _) => Err(e.clone()),
        (Ok(h), None, _) => ProtocolVersion::CURRENT.check_peer(h.protocol),
    };
    let reply = match &decision {
        Ok(()) => Reply::Welcome(Welcome {
            protocol: ProtocolVersion::CURRENT,
            server_version: tower_proto::VERSION.to_string(),
            keepalive_interval_ms: shared.config.keepalive_interval.as_millis() as u64,
            keepalive_max: shared.config.keepalive_max as u32,
            capabilities: vec![CAP_H2.to_string()],
        }),
        Err(why) => Reply::Refusal(Refusal {
            refused: why.clone(),
        }),
    };
    let _ = stream
        .get_mut()
        .write_all(&hello::encode_line(&reply))
        .await;
    let _ = stream.get_mut().flush().await;
    match (decision, hello, session) {
        (Ok(()), Ok(hello), Some(session)) => {
            tracing::info!(cluster = %session.cluster, agent_version = %hello.agent_version, "agent hello");
            session.set_hello(hello);
            // Keep the channel open; it ends with the connection.
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        (Err(why), _, _) | (_, Err(why), _) => {
            tracing::warn!(reason = %why, "agent refused on control channel");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, why, "en".into())
                .await;
        }
        (Ok(()), Ok(_), None) => {}
    }
}

use tokio::io::AsyncReadExt as _;
