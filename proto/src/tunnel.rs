//! How HTTP travels inside the tunnel: the HTTP/2 settings both ends use on a
//! `forwarded-tcpip` channel, and how an HTTP/1.1 upgrade (exec, attach,
//! port-forward, WebSocket) crosses it.
//!
//! The server is the HTTP/2 client on each channel and the agent its server.
//! An upgrade travels as an RFC 8441 extended CONNECT stream whose `:protocol`
//! is the upgrade's protocol and whose [`METHOD_HEADER`] keeps the original
//! method; the agent turns it back into an HTTP/1.1 `Upgrade` to its upstream
//! and answers `200` once the upstream switched protocols. With a plain SSH
//! client as agent (no hello, no `h2`) each request is one HTTP/1.1 exchange on
//! its own channel, upgrades included.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::{Body, empty};

/// HTTP/2 stream window inside the tunnel: what one stalled consumer can hold.
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 connection window for what the agent receives (request bodies):
/// large, so that stalled streams never starve the others. The server sizes
/// its own receive window from its cluster share instead (see [`h2_client`]).
pub const H2_CONN_WINDOW: u32 = 256 * 1024 * 1024;
/// Largest SSH packet either end sends or takes on a channel (russh's
/// `maximum_packet_size`, both ends).
pub const SSH_MAX_PACKET: u32 = 32 * 1024;
/// An HTTP/2 frame's head.
const H2_FRAME_HEAD: u32 = 9;
/// Largest HTTP/2 frame either end sends inside the tunnel: with its head, one
/// SSH packet exactly (see [`Gather`]).
pub const H2_MAX_FRAME: u32 = SSH_MAX_PACKET - H2_FRAME_HEAD;
/// Buffer each way of a spliced upgrade (exec, attach, port-forward) at both
/// ends: one read fills one HTTP/2 frame, one SSH packet.
pub const SPLICE_BUFFER: usize = H2_MAX_FRAME as usize;
/// Header list the agent accepts inside the tunnel: above the gateway's own
/// limit (256 KiB), so that oversized requests are refused at the gateway with
/// a clear status and never half-way through the tunnel.
pub const H2_MAX_HEADER_LIST: u32 = 1024 * 1024;
/// Response head the server accepts from an agent: the gateway's own limit on
/// a request head (256 KiB). A larger one resets that stream (the client gets
/// `502`); HTTP/2 bounds the CONTINUATION frames of an endless one.
pub const H2_MAX_RESPONSE_HEADER_LIST: u32 = 256 * 1024;
/// Default for the streams the agent serves at once on one channel (its
/// `--max-streams`): the server's default cluster share, so the server's
/// shares decide, and a bound on the agent's upstream connections whatever a
/// server asks.
pub const H2_MAX_STREAMS: u32 = 1024;
/// Reset streams the server side keeps track of on one channel.
pub const H2_MAX_RESET_STREAMS: usize = 1024;

/// Header carrying an upgrade request's original method inside extended CONNECT.
pub const METHOD_HEADER: &str = "x-tower-method";

/// Header the server sets on a request whose caller keeps its own credential
/// (value [`CREDENTIAL_CALLER`]): the agent then passes the caller's
/// `Authorization` through unchanged and adds none of its own. Without it the
/// agent uses its own credential and no caller credential crosses. The server
/// sends it only to agents with [`CAP_CALLER_CREDENTIAL`](crate::names::CAP_CALLER_CREDENTIAL),
/// and removes it from what clients send.
pub const CREDENTIAL_HEADER: &str = "x-tower-credential";
/// The one value of [`CREDENTIAL_HEADER`].
pub const CREDENTIAL_CALLER: &str = "caller";

/// Whether the server asked for the caller's own credential on `req`.
pub fn wants_caller_credential(headers: &http::HeaderMap) -> bool {
    headers
        .get(CREDENTIAL_HEADER)
        .is_some_and(|v| v.as_bytes() == CREDENTIAL_CALLER.as_bytes())
}

/// The server side's HTTP/2 client settings for one channel, receiving
/// responses into a connection window of `conn_window` bytes: the server makes
/// it larger than all the stream windows its cluster share allows, so no
/// number of stalled streams can use it up.
pub fn h2_client(conn_window: u32) -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(conn_window.max(H2_STREAM_WINDOW))
        .max_header_list_size(H2_MAX_RESPONSE_HEADER_LIST)
        .max_frame_size(H2_MAX_FRAME)
        .max_concurrent_reset_streams(H2_MAX_RESET_STREAMS);
    b
}

/// The agent's HTTP/2 server settings for one channel, serving at most
/// `max_streams` streams at once.
pub fn h2_server(max_streams: u32) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .enable_connect_protocol()
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_concurrent_streams(max_streams.max(1));
    b
}

/// The protocol named by an HTTP/1.1 upgrade request (`Connection: upgrade`
/// plus `Upgrade: <protocol>`), if it is one.
pub fn upgrade_protocol(headers: &http::HeaderMap) -> Option<String> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Marks `req` (headers already cleaned) as an upgrade to `protocol`, in the
/// form the channel speaks: extended CONNECT on HTTP/2, `Upgrade` on HTTP/1.1.
pub fn encode_upgrade(req: &mut Request<Body>, protocol: &str, h2: bool) {
    let value = HeaderValue::from_str(protocol).expect("came from a header value");
    if h2 {
        let method = std::mem::replace(req.method_mut(), Method::CONNECT);
        req.extensions_mut().insert(hyper::ext::Protocol::from(
            protocol.to_ascii_lowercase().as_str(),
        ));
        req.headers_mut().insert(
            HeaderName::from_static(METHOD_HEADER),
            HeaderValue::from_str(method.as_str()).expect("methods are valid header values"),
        );
        // A CONNECT stream carries no request body; a length would end it early.
        req.headers_mut().remove(header::CONTENT_LENGTH);
        *req.body_mut() = empty();
    } else {
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        req.headers_mut().insert(header::UPGRADE, value);
    }
}

/// Whether a response to an upgrade sent with [`encode_upgrade`] means the
/// stream switched protocols.
pub fn upgrade_accepted(status: StatusCode, version: Version) -> bool {
    if version == Version::HTTP_2 {
        status == StatusCode::OK
    } else {
        status == StatusCode::SWITCHING_PROTOCOLS
    }
}

/// Header on the agent's answer to an extended CONNECT whose upstream refused
/// the upgrade with a `2xx` status. Over HTTP/2 any `2xx` answer to CONNECT
/// opens a tunnel, so such a refusal travels as `502` with the upstream's own
/// status here ([`encode_upgrade_refusal`]); the server restores it
/// ([`decode_upgrade_refusal`]). A server that does not know the header shows
/// the `502`.
pub const UPGRADE_STATUS_HEADER: &str = "x-tower-upgrade-status";

/// Agent side: makes an upstream's refusal of an upgrade (any status but `101`)
/// safe to send as the answer to an extended CONNECT.
pub fn encode_upgrade_refusal(parts: &mut http::response::Parts) {
    if parts.status.is_success() {
        let code = HeaderValue::from(parts.status.as_u16());
        parts.headers.insert(UPGRADE_STATUS_HEADER, code);
        parts.status = StatusCode::BAD_GATEWAY;
    }
}

/// Server side: the upstream's own status of a refused upgrade, restored.
pub fn decode_upgrade_refusal(parts: &mut http::response::Parts) {
    if let Some(code) = parts
        .headers
        .remove(UPGRADE_STATUS_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|c| parts.status == StatusCode::BAD_GATEWAY && c.is_success())
    {
        parts.status = code;
    }
}

/// The upgrade an extended CONNECT request carries: the original method and
/// the protocol. `None` for any other request.
pub fn decode_upgrade<B>(req: &Request<B>) -> Option<(Method, String)> {
    if req.method() != Method::CONNECT {
        return None;
    }
    let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
    let method = req
        .headers()
        .get(METHOD_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or(Method::GET);
    Some((method, protocol.as_str().to_string()))
}

/// An SSH channel as a byte stream that takes vectored writes, sending the
/// slices of one as one SSH packet.
///
/// Each write on an SSH channel is a packet of its own: padding and MAC, a turn
/// of the session loop, a wakeup of the reader at the other end. HTTP/2 writes
/// a DATA frame as its 9-byte head and its payload; to a stream without
/// vectored writes it writes them one after the other, so every frame cost a
/// packet for its head alone. `Gather` copies the slices of a vectored write,
/// up to [`SSH_MAX_PACKET`] bytes, into one write; with frames of
/// [`H2_MAX_FRAME`] a full frame is one packet.
pub struct Gather<S> {
    inner: S,
    buf: Vec<u8>,
}

impl<S> Gather<S> {
    /// Wraps a channel stream; its buffer grows on the first vectored write
    /// that needs it, to at most [`SSH_MAX_PACKET`].
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gather<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gather<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let max = SSH_MAX_PACKET as usize;
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if first.len() >= max {
            return Pin::new(&mut self.inner).poll_write(cx, first);
        }
        let this = &mut *self;
        this.buf.clear();
        for b in bufs {
            let room = max - this.buf.len();
            if room == 0 {
                break;
            }
            this.buf.extend_from_slice(&b[..b.len().min(room)]);
        }
        Pin::new(&mut this.inner).poll_write(cx, &this.buf)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_2xx_refusal_of_an_upgrade_crosses_as_502_and_comes_back() {
        let (mut parts, ()) = http::Response::builder()
            .status(200)
            .body(())
            .unwrap()
            .into_parts();
        encode_upgrade_refusal(&mut parts);
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
        assert!(!upgrade_accepted(parts.status, Version::HTTP_2));
        decode_upgrade_refusal(&mut parts);
        assert_eq!(parts.status, StatusCode::OK);
        assert!(parts.headers.get(UPGRADE_STATUS_HEADER).is_none());
        // Other refusals cross as they are; a stray header changes nothing.
        let (mut parts, ()) = http::Response::builder()
            .status(403)
            .header(UPGRADE_STATUS_HEADER, "200")
            .body(())
            .unwrap()
            .into_parts();
        encode_upgrade_refusal(&mut parts);
        decode_upgrade_refusal(&mut parts);
        assert_eq!(parts.status, StatusCode::FORBIDDEN);
    }

    use super::*;

    /// Records each write it is given, taking at most `max` bytes of each.
    struct Writes {
        writes: Vec<Vec<u8>>,
        max: usize,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_and_its_head_cross_as_one_write() {
        use tokio::io::AsyncWriteExt as _;
        let max = SSH_MAX_PACKET as usize;
        let mut g = Gather::new(Writes {
            writes: Vec::new(),
            max,
        });
        assert!(g.is_write_vectored());
        // A full frame: its head and payload fill one packet exactly.
        let head = [1u8; H2_FRAME_HEAD as usize];
        let payload = vec![2u8; H2_MAX_FRAME as usize];
        let n = g
            .write_vectored(&[IoSlice::new(&head), IoSlice::new(&payload)])
            .await
            .unwrap();
        assert_eq!(n, max);
        // Small frames gather; what does not fit waits for the next write.
        let n = g
            .write_vectored(&[
                IoSlice::new(&[]),
                IoSlice::new(&head),
                IoSlice::new(&[3u8; 100]),
                IoSlice::new(&vec![4u8; max]),
            ])
            .await
            .unwrap();
        assert_eq!(n, max);
        // A first slice that fills a packet alone goes as it is.
        let big = vec![5u8; max + 10];
        let n = g.write_vectored(&[IoSlice::new(&big)]).await.unwrap();
        assert_eq!(n, max);
        let w = &g.inner.writes;
        assert_eq!(w.len(), 3, "one write each");
        assert_eq!(&w[0][..9], &head);
        assert!(w[0][9..].iter().all(|b| *b == 2));
        assert_eq!(&w[1][..9], &head);
        assert!(w[1][9..109].iter().all(|b| *b == 3));
        assert!(w[1][109..].iter().all(|b| *b == 4));
        assert_eq!(w[2].len(), max);
    }

    #[test]
    fn upgrade_detection() {
        let mut h = http::HeaderMap::new();
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(upgrade_protocol(&h), None);
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert_eq!(upgrade_protocol(&h).as_deref(), Some("websocket"));
    }

    #[test]
    fn an_upgrade_round_trips_through_extended_connect() {
        let mut req = Request::post("/api/v1/namespaces/x/pods/p/exec")
            .header(header::CONTENT_LENGTH, "0")
            .body(empty())
            .unwrap();
        encode_upgrade(&mut req, "SPDY/3.1", true);
        assert_eq!(req.method(), Method::CONNECT);
        assert!(!req.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(
            decode_upgrade(&req),
            Some((Method::POST, "spdy/3.1".to_string()))
        );
        let mut h1 = Request::get("/").body(empty()).unwrap();
        encode_upgrade(&mut h1, "websocket", false);
        assert_eq!(upgrade_protocol(h1.headers()).as_deref(), Some("websocket"));
        assert_eq!(decode_upgrade(&h1), None);
    }
}
