//! Fair shares of a cluster's tunnel: how many requests one client, and all
//! clients of one cluster together, may have in flight through it at once.
//!
//! Every request through the tunnel is one HTTP/2 stream inside the cluster's
//! channel, and a stream whose client reads nothing holds up to one stream
//! window ([`tower_proto::tunnel::H2_STREAM_WINDOW`]) of unread response in
//! the server, and as much of the tunnel's connection window. The server sizes
//! that connection window from the cluster share ([`tunnel_conn_window`]), so
//! however many streams stall, the others always have a full window left: a
//! client that stops reading slows only itself. A client is one client
//! certificate (or none) from one source address; a request past either share
//! gets `429 TooManyRequests` at once, with `Retry-After`, and costs the
//! tunnel and the agent nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tower_proto::http::{Body, status};
use tower_proto::tunnel::H2_STREAM_WINDOW;

/// Default share of one client on one cluster: requests in flight (watches
/// included).
pub const DEFAULT_CLIENT_STREAMS: usize = 64;
/// Default share of one cluster: requests in flight from all its clients.
/// KubeSphere's ks-apiserver carries every console user's watches to a member,
/// so a cluster's clients together need room for many.
pub const DEFAULT_CLUSTER_STREAMS: usize = 1024;
/// Largest cluster share: the HTTP/2 connection window it implies
/// ([`tunnel_conn_window`]) must stay below 2^31.
pub const MAX_CLUSTER_STREAMS: usize = 2047;
/// What a refused client is told to wait before trying again, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The tunnel's HTTP/2 connection window for a cluster share of
/// `cluster_streams`: one stream window more than all of them can hold, so
/// stalled streams never starve the rest.
pub fn tunnel_conn_window(cluster_streams: usize) -> u32 {
    let streams = cluster_streams.clamp(1, MAX_CLUSTER_STREAMS) as u64 + 1;
    (streams * H2_STREAM_WINDOW as u64).min(i32::MAX as u64) as u32
}

/// Who a share belongs to: a client certificate's name (or none) from one
/// source address, and for a request that carries its caller's own
/// credential, that credential (kept only as a keyed hash): each user behind
/// KubeSphere's ks-apiserver then has a share of their own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    pub(crate) certificate: Option<Arc<str>>,
    pub(crate) source: IpAddr,
    pub(crate) credential: Option<u64>,
}

impl ClientKey {
    /// This client presenting `authorization` as its own credential.
    pub(crate) fn with_credential(&self, authorization: Option<&http::HeaderValue>) -> Self {
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        use std::hash::BuildHasher as _;
        Self {
            credential: authorization
                .map(|v| KEY.get_or_init(Default::default).hash_one(v.as_bytes())),
            ..self.clone()
        }
    }
}

/// Which share a refused request ran out of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exhausted {
    Client(usize),
    Cluster(usize),
}

impl Exhausted {
    /// The metric label.
    pub(crate) fn share(self) -> &'static str {
        match self {
            Exhausted::Client(_) => "client",
            Exhausted::Cluster(_) => "cluster",
        }
    }

    /// The `429` Status a refused client gets.
    pub(crate) fn response(self, cluster: &str) -> Response<Body> {
        let message = match self {
            Exhausted::Client(n) => format!(
                "this client already has {n} requests in flight to cluster {cluster:?} (its share, \
                 tower-server --client-streams); finish or close some, or retry after {RETRY_AFTER_SECONDS}s"
            ),
            Exhausted::Cluster(n) => format!(
                "cluster {cluster:?} already has {n} requests in flight from all its clients \
                 (its share, tower-server --cluster-streams); retry after {RETRY_AFTER_SECONDS}s"
            ),
        };
        let mut resp = status(StatusCode::TOO_MANY_REQUESTS, message);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        resp
    }
}

#[derive(Default)]
struct ClusterUse {
    total: usize,
    clients: HashMap<ClientKey, usize>,
}

/// The shares every gateway entry draws from.
pub(crate) struct Shares {
    client_limit: usize,
    cluster_limit: usize,
    used: Arc<Mutex<HashMap<Arc<str>, ClusterUse>>>,
}

impl Shares {
    pub(crate) fn new(client_limit: usize, cluster_limit: usize) -> Self {
        Self {
            client_limit: client_limit.max(1),
            cluster_limit: cluster_limit.clamp(1, MAX_CLUSTER_STREAMS),
            used: Arc::default(),
        }
    }

    /// One request's place in `cluster`'s share for `client`, held until the
    /// returned [`Share`] is dropped; or which share is used up.
    pub(crate) fn take(&self, cluster: &str, client: ClientKey) -> Result<Share, Exhausted> {
        let mut used = self.used.lock().expect("shares poisoned");
        let entry = used.entry(Arc::from(cluster)).or_default();
        if entry.total >= self.cluster_limit {
            return Err(Exhausted::Cluster(self.cluster_limit));
        }
        let mine = entry.clients.entry(client.clone()).or_default();
        if *mine >= self.client_limit {
            return Err(Exhausted::Client(self.client_limit));
        }
        *mine += 1;
        entry.total += 1;
        let (cluster, _) = used.get_key_value(cluster).expect("just inserted");
        Ok(Share {
            used: self.used.clone(),
            cluster: cluster.clone(),
            client,
        })
    }

    /// Requests in flight to `cluster` (tests and metrics).
    #[cfg(test)]
    fn in_flight(&self, cluster: &str) -> usize {
        let used = self.used.lock().expect("shares poisoned");
        used.get(cluster).map_or(0, |u| u.total)
    }
}

/// A request's place in its shares; given back when dropped.
pub(crate) struct Share {
    used: Arc<Mutex<HashMap<Arc<str>, ClusterUse>>>,
    cluster: Arc<str>,
    client: ClientKey,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut used = self.used.lock().expect("shares poisoned");
        let Some(entry) = used.get_mut(&self.cluster) else {
            return;
        };
        entry.total = entry.total.saturating_sub(1);
        if let Some(mine) = entry.clients.get_mut(&self.client) {
            *mine -= 1;
            if *mine == 0 {
                entry.clients.remove(&self.client);
            }
        }
        if entry.total == 0 {
            used.remove(&self.cluster);
        }
    }
}

/// A response body that holds its request's [`Share`] until the body ends
/// or the client goes away (hyper drops the body).
pub(crate) struct Holding {
    body: Body,
    share: Option<Share>,
}

impl Holding {
    pub(crate) fn wrap(resp: Response<Body>, share: Share) -> Response<Body> {
        use http_body_util::BodyExt;
        resp.map(|body| {
            Holding {
                body,
                share: Some(share),
            }
            .boxed_unsync()
        })
    }
}

impl HttpBody for Holding {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.share = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: Option<&str>, ip: [u8; 4]) -> ClientKey {
        ClientKey {
            certificate: name.map(Arc::from),
            source: IpAddr::from(ip),
            credential: None,
        }
    }

    #[test]
    fn each_caller_credential_has_its_own_share() {
        let shares = Shares::new(1, 3);
        let proxy = client(None, [10, 0, 0, 9]);
        let alice = proxy.with_credential(Some(&http::HeaderValue::from_static("Bearer a")));
        let bob = proxy.with_credential(Some(&http::HeaderValue::from_static("Bearer b")));
        let _a = shares.take("x", alice.clone()).unwrap();
        assert_eq!(shares.take("x", alice).err(), Some(Exhausted::Client(1)));
        let _b = shares.take("x", bob).unwrap();
        let _p = shares.take("x", proxy.with_credential(None)).unwrap();
    }

    #[test]
    fn a_client_gets_its_share_and_no_more_and_others_are_untouched() {
        let shares = Shares::new(2, 3);
        let a = client(Some("tower:x"), [10, 0, 0, 1]);
        let held: Vec<_> = (0..2)
            .map(|_| shares.take("x", a.clone()).unwrap())
            .collect();
        assert_eq!(
            shares.take("x", a.clone()).err(),
            Some(Exhausted::Client(2))
        );
        // The same certificate from another source is another client.
        let b = client(Some("tower:x"), [10, 0, 0, 2]);
        let third = shares.take("x", b.clone()).unwrap();
        // The cluster's share is used up for everyone, other clusters are not.
        assert_eq!(
            shares.take("x", b.clone()).err(),
            Some(Exhausted::Cluster(3))
        );
        assert!(shares.take("y", a.clone()).is_ok());
        drop(held);
        assert_eq!(shares.in_flight("x"), 1);
        assert!(shares.take("x", a).is_ok());
        drop(third);
    }

    #[test]
    fn shares_are_given_back_and_forgotten() {
        let shares = Shares::new(1, 1);
        let a = client(None, [127, 0, 0, 1]);
        drop(shares.take("x", a.clone()).unwrap());
        assert_eq!(shares.in_flight("x"), 0);
        assert!(shares.used.lock().unwrap().is_empty());
        drop(shares.take("x", a).unwrap());
    }

    #[test]
    fn the_connection_window_outlasts_every_stalled_stream() {
        assert_eq!(
            tunnel_conn_window(DEFAULT_CLUSTER_STREAMS),
            (DEFAULT_CLUSTER_STREAMS as u32 + 1) * H2_STREAM_WINDOW
        );
        assert!(tunnel_conn_window(MAX_CLUSTER_STREAMS) <= i32::MAX as u32);
        assert!(
            tunnel_conn_window(MAX_CLUSTER_STREAMS) as u64
                > MAX_CLUSTER_STREAMS as u64 * H2_STREAM_WINDOW as u64
        );
    }
}
