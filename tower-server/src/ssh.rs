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
use tokio_util::sync::CancellationToken;
use tower_proto::hello::{self, ProtocolVersion, Refusal, Reply, Welcome};
use tower_proto::names::{CAP_H2, CONTROL_SUBSYSTEM, FORWARD_PORT, KNOWN_UPSTREAMS};
use tower_proto::{Hello, token};

use crate::Shared;
use crate::admission::{Admission, Pending, Throttled, source_key};
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
        tokio::spawn(connection(
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

// === impl Cuttable ===

/// A socket that can be cut from outside: once `cut` fires, every read and
/// write fails, which ends the russh session wherever it waits (russh has no
/// abort, and dropping its future leaves the session task running).
struct Cuttable<S> {
    inner: S,
    cut: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    is_cut: bool,
}

impl<S> Cuttable<S> {
    fn new(inner: S, cut: CancellationToken) -> Self {
        Self {
            inner,
            cut: Box::pin(cut.cancelled_owned()),
            is_cut: false,
        }
    }

    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        use std::future::Future;
        if !self.is_cut && self.cut.as_mut().poll(cx).is_ready() {
            self.is_cut = true;
        }
        if self.is_cut {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection cut by the server",
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.is_cut {
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
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
    /// Set after a credential matched: cluster, token id, and a refusal reason if
    /// the token matched but is expired or revoked.
    authed: Option<(String, String, Option<&'static str>)>,
    session: Option<Arc<Session>>,
    pending: HashMap<ChannelId, Channel<Msg>>,
    /// Cancelled once a valid credential is accepted; ends the auth deadline.
    authenticated: CancellationToken,
}

impl Connection {
    fn new(
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
            Verdict::Valid { token_id } => {
                self.authed = Some((user.to_string(), token_id, None));
                Ok(Auth::Accept)
            }
            verdict @ (Verdict::Expired | Verdict::Revoked) => {
                self.shared.metrics.auth_failures.inc();
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
        self.authenticated.cancel();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
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

    #[tokio::test]
    async fn a_cut_socket_fails_reads_and_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let mut a = Cuttable::new(a, cut.clone());
        a.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            a.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut.cancel();
        let r = tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("a blocked read ends when cut")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionAborted);
    }
}
