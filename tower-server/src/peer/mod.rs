//! Peer forwarding between replicas: a replica that receives a request for a
//! cluster whose session another replica holds carries it there, over
//! mutually authenticated HTTP/2, after it has done routing, authorization and
//! shares itself.
//!
//! - Who owns a cluster comes from what the owner recorded: the Agent's
//!   `status.servingReplica`, believed only while that replica's Lease is
//!   valid ([`OwnerBook`], kept by the controller).
//! - Replicas prove themselves with a client certificate from the tower CA
//!   whose common name starts with [`PEER_CN_PREFIX`]; the gateway refuses that
//!   name and the peer listener accepts nothing else, so no gateway client can
//!   send a forwarded request and no replica takes a gateway client's request
//!   for a peer's.
//! - The owner verifies on arrival that it holds the session. It never
//!   forwards again: without the session it answers `421` naming the owner it
//!   believes in ([`OWNER_HEADER`]), and the entry tries that one once, when
//!   the request can be sent again ([`link`]).
//! - Upgrades (exec, attach, port-forward, WebSocket) cross as extended
//!   CONNECT, the encoding the tunnel itself uses ([`tower_proto::tunnel`]).
//! - Both ends count the bytes their peer connections carry ([`Counted`]).
//!
//! [`link`] is the entry's side, [`serve`] the owner's.

mod link;
mod serve;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{Metrics, PeerBytesLabel};

pub(crate) use link::Peers;
pub(crate) use serve::{serve, tls};

/// Common-name prefix of a replica's peer certificate (`tower-peer:<replica>`).
pub const PEER_CN_PREFIX: &str = "tower-peer:";
/// Request header naming the cluster of a forwarded request.
pub const CLUSTER_HEADER: &str = "x-tower-peer-cluster";
/// Header of a `421` from a replica without the session: the replica it
/// believes holds it.
pub const OWNER_HEADER: &str = "x-tower-peer-owner";

/// A replica that holds a cluster's session, as its Lease says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub replica: String,
    /// Where its peer listener is (host:port).
    pub address: String,
}

/// Who owns what, as the controller sees it.
pub trait OwnerBook: Send + Sync {
    /// The replica recorded as holding `cluster`'s session, if its Lease is
    /// valid and it has a peer address.
    fn owner(&self, cluster: &str) -> Option<Owner>;
    /// `replica`, if its Lease is valid and it has a peer address.
    fn replica(&self, replica: &str) -> Option<Owner>;
    /// Every replica whose Lease is valid and that has a peer address.
    fn replicas(&self) -> Vec<Owner>;
    /// Whether `cluster`'s session was held lately though no valid owner is
    /// recorded now: the replica recorded lost its Lease, or the record
    /// stopped saying Connected less than [`PROBE_WINDOW`] ago. Its agent is
    /// likely on another replica that has not recorded itself yet.
    fn lately_held(&self, cluster: &str) -> bool;
}

/// How long after a cluster's session was last recorded the replicas are
/// asked for it when no valid owner is recorded (see
/// [`OwnerBook::lately_held`]).
pub const PROBE_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

/// A peer connection that adds the bytes it carries (HTTP/2, inside TLS) to
/// the `peer_bytes` counters, by direction.
pub(crate) struct Counted<T> {
    inner: T,
    sent: Counter,
    received: Counter,
}

impl<T> Counted<T> {
    pub(crate) fn new(inner: T, metrics: Arc<Metrics>) -> Self {
        let counter = |direction| {
            metrics
                .peer_bytes
                .get_or_create(&PeerBytesLabel { direction })
                .clone()
        };
        Self {
            inner,
            sent: counter("sent"),
            received: counter("received"),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.received.inc_by((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.sent.inc_by(n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.sent.inc_by(n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `host:port` for `address` (`HOST[:PORT]`, an IPv6 host bare or in
/// brackets), with `port` when it names none.
pub fn peer_address(address: &str, port: u16) -> String {
    let address = address.trim();
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        return std::net::SocketAddr::new(ip, port).to_string();
    }
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return address.to_string();
    }
    if let Some(inner) = address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        return format!("[{inner}]:{port}");
    }
    match address.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => address.to_string(),
        _ => format!("{address}:{port}"),
    }
}

/// The host part of a `host:port` peer address (brackets removed).
pub(crate) fn address_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_host_takes_the_bound_port() {
        assert_eq!(peer_address("10.0.0.5", 9444), "10.0.0.5:9444");
        assert_eq!(peer_address("10.0.0.5:7000", 9444), "10.0.0.5:7000");
        assert_eq!(peer_address("fd00::5", 9444), "[fd00::5]:9444");
        assert_eq!(peer_address("[fd00::5]", 9444), "[fd00::5]:9444");
        assert_eq!(peer_address("[fd00::5]:7000", 9444), "[fd00::5]:7000");
        assert_eq!(peer_address("tower-0.peers", 9444), "tower-0.peers:9444");
        assert_eq!(peer_address("tower-0.peers:1", 9444), "tower-0.peers:1");
        assert_eq!(address_host("[fd00::5]:7000"), "fd00::5");
        assert_eq!(address_host("10.0.0.5:9444"), "10.0.0.5");
    }
}
