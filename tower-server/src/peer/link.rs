//! The entry's side of peer forwarding: one HTTP/2 connection per peer,
//! opened on first use and kept while it answers pings, and the forwarded
//! request with its single retry when the hinted owner turns out stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tower_proto::http::{Body, full};
use tower_proto::tunnel;

use super::{CLUSTER_HEADER, OWNER_HEADER, Owner, OwnerBook, PEER_CN_PREFIX, address_host};
use crate::metrics::Metrics;
use crate::tunnel::ForwardError;

/// Connecting to a peer (TCP, TLS and HTTP/2 handshakes) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pings on every peer connection, busy or idle: a peer that stops answering
/// (paused, half-open) is given up within interval + timeout, and the
/// requests on it end with an error instead of hanging.
const PING_INTERVAL: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Request bodies up to this size are read before forwarding, so that a
/// request whose owner turned out stale can be sent to the real one.
const REPLAY_BODY_LIMIT: u64 = 256 * 1024;
/// Replicas a request is sent to, at most, while each says it holds no
/// session (each answers without forwarding it on).
const MAX_TRIED: usize = 3;
/// Flow-control window of one peer connection: every forwarded stream from
/// this replica to one peer shares it.
const CONN_WINDOW: u32 = 64 * 1024 * 1024;

type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// This replica as an entry: who owns a cluster and the way to it.
pub(crate) struct Peers {
    replica: String,
    /// The client side of peer TLS; `None` when peer forwarding is off.
    tls: Option<Arc<rustls::ClientConfig>>,
    book: OnceLock<Arc<dyn OwnerBook>>,
    links: Mutex<HashMap<String, Slot>>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
}

impl Peers {
    /// Peer forwarding for `replica`, on when `enabled` (it has a peer
    /// listener); its peer certificate is issued from `ca`.
    pub(crate) fn new(
        ca: &tower_certs::Ca,
        replica: &str,
        enabled: bool,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> anyhow::Result<Self> {
        let tls = if enabled {
            Some(Arc::new(client_tls(ca, replica)?))
        } else {
            None
        };
        Ok(Self {
            replica: replica.to_string(),
            tls,
            book: OnceLock::new(),
            links: Default::default(),
            metrics,
            tasks,
        })
    }

    /// Whether requests may be forwarded to peers.
    pub(crate) fn enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// Sets where owners are looked up (once; later calls are ignored).
    pub(crate) fn set_book(&self, book: Arc<dyn OwnerBook>) {
        let _ = self.book.set(book);
    }

    /// Another replica recorded as holding `cluster`'s session, if forwarding
    /// is on and its Lease is valid.
    pub(crate) fn owner(&self, cluster: &str) -> Option<Owner> {
        if !self.enabled() {
            return None;
        }
        let owner = self.book.get()?.owner(cluster);
        if owner.is_none() {
            self.metrics.owner_lookup_misses.inc();
        }
        owner.filter(|o| o.replica != self.replica)
    }

    /// A replica to ask for `cluster`'s session when no valid owner is
    /// recorded but it was held lately (its agent is likely reconnecting to,
    /// or has reached, a replica that has not recorded itself yet). A
    /// replica without it answers `421` and the request goes on to the next,
    /// as for a stale owner.
    pub(crate) fn probe(&self, cluster: &str) -> Option<Owner> {
        if !self.enabled() {
            return None;
        }
        let book = self.book.get()?;
        if !book.lately_held(cluster) {
            return None;
        }
        let others: Vec<Owner> = book
            .replicas()
            .into_iter()
            .filter(|o| o.replica != self.replica)
            .collect();
        // Spread the first asked over the others, per cluster.
        let start = cluster.bytes().map(usize::from).sum::<usize>();
        let first = others.get(start % others.len().max(1)).cloned();
        if first.is_some() {
            self.metrics.probes.inc();
        }
        first
    }

    /// The owner this replica believes in, for a `421` hint.
    pub(crate) fn hint(&self, cluster: &str) -> Option<String> {
        self.book
            .get()?
            .owner(cluster)
            .map(|o| o.replica)
            .filter(|r| *r != self.replica)
    }

    /// Forwards `req` (path-and-query URI, headers as the member should get
    /// them) for `cluster`'s `upstream` to `owner`. When the owner no longer
    /// holds the session (it names another replica), or cannot be reached
    /// (its agent is likely reconnecting to another one), the request goes
    /// to the next replica, if it can be sent again (a body of at most
    /// 256 KiB) and surely did not reach the owner, or is safe to repeat.
    pub(crate) async fn send(
        &self,
        owner: &Owner,
        cluster: &str,
        upstream: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let (req, replay) = replayable(req, cluster).await?;
        let safe = is_safe(&req);
        let mut tried = vec![owner.replica.clone()];
        let mut outcome = self.send_to(owner, cluster, upstream, req).await;
        loop {
            let hint = match &outcome {
                Ok(resp) if resp.status() == StatusCode::MISDIRECTED_REQUEST => resp
                    .headers()
                    .get(OWNER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                Err(Unsent::NotSent(_)) => None,
                Err(Unsent::Lost(_)) if safe => None,
                _ => break,
            };
            let Some(replay) = &replay else { break };
            let Some(next) = self.next_owner(hint.as_deref(), &tried) else {
                break;
            };
            match &outcome {
                Ok(_) => {
                    tracing::debug!(%cluster, tried = ?tried, owner = %next.replica, "owner hint was stale; trying another replica")
                }
                Err(_) => {
                    tracing::debug!(%cluster, tried = ?tried, owner = %next.replica, "owner unreachable; trying another replica")
                }
            }
            tried.push(next.replica.clone());
            outcome = self
                .send_to(&next, cluster, upstream, replay.request())
                .await;
        }
        let resp = outcome.map_err(Unsent::into_error)?;
        if resp.status() == StatusCode::MISDIRECTED_REQUEST {
            self.count("moved");
            return Err(ForwardError::Moved {
                cluster: cluster.to_string(),
            });
        }
        self.count(if tried.len() > 1 {
            "retried"
        } else {
            "forwarded"
        });
        Ok(resp)
    }

    /// Where to try next after the replicas in `tried` said they hold no
    /// session: the one the last of them named, else any other valid
    /// replica; never this one, and at most [`MAX_TRIED`] in all.
    fn next_owner(&self, hint: Option<&str>, tried: &[String]) -> Option<Owner> {
        if tried.len() >= MAX_TRIED {
            return None;
        }
        let book = self.book.get()?;
        let fresh = |r: &str| r != self.replica && !tried.iter().any(|t| t == r);
        hint.filter(|h| fresh(h))
            .and_then(|h| book.replica(h))
            .or_else(|| book.replicas().into_iter().find(|o| fresh(&o.replica)))
    }

    /// Like [`Peers::send`] for an upgrade to `protocol`, sent as extended
    /// CONNECT. `Ok(Err(resp))` is the member's refusal, to relay as it is.
    pub(crate) async fn send_upgrade(
        &self,
        owner: &Owner,
        cluster: &str,
        upstream: &str,
        mut req: Request<Body>,
        protocol: &str,
    ) -> Result<Result<Response<Incoming>, Response<Incoming>>, ForwardError> {
        tunnel::encode_upgrade(&mut req, protocol, true);
        let resp = self.send(owner, cluster, upstream, req).await?;
        if tunnel::upgrade_accepted(resp.status(), resp.version()) {
            Ok(Ok(resp))
        } else {
            let (mut parts, body) = resp.into_parts();
            tunnel::decode_upgrade_refusal(&mut parts);
            Ok(Err(Response::from_parts(parts, body)))
        }
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .peer_requests
            .get_or_create(&crate::metrics::PeerLabel { result })
            .inc();
    }

    async fn send_to(
        &self,
        owner: &Owner,
        cluster: &str,
        upstream: &str,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, Unsent> {
        let unreachable = |reason: String| {
            self.count("unreachable");
            tracing::warn!(%cluster, replica = %owner.replica, address = %owner.address, %reason, "peer unreachable");
            ForwardError::Peer {
                cluster: cluster.to_string(),
                replica: owner.replica.clone(),
                reason,
            }
        };
        let mut sender = self
            .sender(&owner.address)
            .await
            .map_err(|r| Unsent::NotSent(unreachable(r)))?;
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        // As in the tunnel: the authority names the upstream.
        *req.uri_mut() = format!("https://{upstream}{pq}")
            .parse()
            .expect("upstream names and routed paths form valid URIs");
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().insert(
            HeaderName::from_static(CLUSTER_HEADER),
            HeaderValue::from_str(cluster)
                .map_err(|e| Unsent::NotSent(unreachable(e.to_string())))?,
        );
        sender.try_send_request(req).await.map_err(|mut e| {
            // hyper hands the request back when it never left this replica.
            if e.take_message().is_some() {
                Unsent::NotSent(unreachable(e.into_error().to_string()))
            } else {
                Unsent::Lost(unreachable(e.into_error().to_string()))
            }
        })
    }

    /// The connection to the peer at `address`, opened when there is none or
    /// it closed.
    async fn sender(&self, address: &str) -> Result<http2::SendRequest<Body>, String> {
        let slot = self
            .links
            .lock()
            .expect("poisoned")
            .entry(address.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_mut()
            && !sender.is_closed()
            && sender.ready().await.is_ok()
        {
            return Ok(sender.clone());
        }
        *slot = None;
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(address))
            .await
            .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))??;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self, address: &str) -> Result<http2::SendRequest<Body>, String> {
        let tls = self.tls.clone().ok_or("peer forwarding is off")?;
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(address_host(address).to_string())
            .map_err(|e| format!("peer address {address:?}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut builder = tunnel::h2_client(CONN_WINDOW);
        builder
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true);
        let (mut sender, conn) = builder
            .handshake(TokioIo::new(super::Counted::new(tls, self.metrics.clone())))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        let metrics = self.metrics.clone();
        metrics.peer_connections.inc();
        let peer = address.to_string();
        self.tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(address = %peer, error = %e, "peer connection ended");
            }
            metrics.peer_connections.dec();
        });
        sender.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
        tracing::debug!(%address, "peer connection open");
        Ok(sender)
    }
}

/// The rustls client config of peer links: the tower CA as the only root and
/// this replica's peer certificate.
fn client_tls(ca: &tower_certs::Ca, replica: &str) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in tower_certs::parse_certs(ca.cert_pem())? {
        roots.add(cert)?;
    }
    let cert = ca.issue_client(
        &tower_certs::ClientIdentity {
            common_name: format!("{PEER_CN_PREFIX}{replica}"),
            organizations: Vec::new(),
        },
        Duration::from_secs(365 * 24 * 3600),
    )?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tower_certs::parse_certs(&cert.cert_pem)?,
            tower_certs::parse_key(&cert.key_pem)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Why a forwarded request got no answer.
enum Unsent {
    /// It never left this replica (no connection to the peer).
    NotSent(ForwardError),
    /// It was sent, and the connection failed before an answer: the peer may
    /// have acted on it.
    Lost(ForwardError),
}

impl Unsent {
    fn into_error(self) -> ForwardError {
        match self {
            Unsent::NotSent(e) | Unsent::Lost(e) => e,
        }
    }
}

/// Whether sending `req` twice does no more than sending it once.
fn is_safe(req: &Request<Body>) -> bool {
    matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

/// A request that can be sent again: its head and a body read whole.
struct Replay {
    parts: http::request::Parts,
    body: bytes::Bytes,
}

impl Replay {
    fn request(&self) -> Request<Body> {
        let mut req = Request::new(full(self.body.clone()));
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.headers_mut() = self.parts.headers.clone();
        *req.extensions_mut() = self.parts.extensions.clone();
        req
    }
}

/// `req`, and a way to send it again when its owner turns out stale:
/// bodiless requests, and bodies of known length up to
/// [`REPLAY_BODY_LIMIT`], read first. A longer or unsized body streams and is
/// never sent twice.
async fn replayable(
    req: Request<Body>,
    cluster: &str,
) -> Result<(Request<Body>, Option<Replay>), ForwardError> {
    let (parts, body) = req.into_parts();
    let body = if body.is_end_stream() {
        bytes::Bytes::new()
    } else {
        let small = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n <= REPLAY_BODY_LIMIT);
        if !small {
            return Ok((Request::from_parts(parts, body), None));
        }
        body.collect()
            .await
            .map_err(|e| ForwardError::Peer {
                cluster: cluster.to_string(),
                replica: String::new(),
                reason: format!("reading the request body: {e}"),
            })?
            .to_bytes()
    };
    let replay = Replay { parts, body };
    Ok((replay.request(), Some(replay)))
}
