//! Transports: how the agent's SSH connection reaches the server. Both ends
//! share one seam, [`Transport`]: raw TCP ([`Tcp`]) or SSH inside a WebSocket
//! ([`WebSocket`]), for members that may leave only through an HTTP proxy or
//! only on port 443.
//!
//! A transport works on a byte stream that is already connected (a TCP
//! socket, a socket through an HTTP CONNECT proxy, or TLS on either) and
//! turns it into the byte stream SSH runs on. TLS (`wss://`) is a layer
//! below, chosen by the [`ServerAddr`]; the SSH host key stays pinned on
//! every transport, so TLS adds to the server's authentication, never
//! replaces it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{self, Message, protocol::WebSocketConfig};

/// A byte stream a transport runs on or yields.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The WebSocket subprotocol of SSH carried by Tower.
pub const WEBSOCKET_SUBPROTOCOL: &str = "tower-ssh.kubesphere.io";

/// The subprotocol of KubeSphere's Go tower (its agents speak another SSH
/// dialect); a server answering with it is the Go tower, not tower-server.
pub const GO_TOWER_SUBPROTOCOL: &str = "kubesphere-v1";

/// The raw SSH port when an address names none.
pub const DEFAULT_SSH_PORT: u16 = 7022;

/// Largest WebSocket message or frame either end accepts. Senders here send
/// at most [`MAX_WRITE`] bytes per message.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Most bytes of one write sent as one WebSocket message.
const MAX_WRITE: usize = 32 * 1024;

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server answered the WebSocket upgrade with something other than 101.
    #[error("the server refused the WebSocket upgrade: HTTP {status}{}", body_suffix(.body))]
    Refused { status: u16, body: String },
    /// The server is KubeSphere's Go tower.
    #[error(
        "the server is KubeSphere's Go tower (WebSocket subprotocol {GO_TOWER_SUBPROTOCOL}), not tower-server; \
         point the agent at tower-server's WebSocket port"
    )]
    GoTower,
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// Where an agent reaches its server: `ssh://host:port` or a bare
/// `host:port` (raw SSH), `ws://host[:port][/path]` or
/// `wss://host[:port][/path]` (SSH inside a WebSocket; `http://` and
/// `https://` are read as `ws://` and `wss://`, the form KubeSphere's
/// `--proxy-server` takes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Ssh {
        host: String,
        port: u16,
    },
    WebSocket {
        tls: bool,
        host: String,
        port: u16,
        path: String,
    },
}

/// A server address that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("server address {addr:?}: {why}")]
pub struct AddrError {
    addr: String,
    why: &'static str,
}

impl ServerAddr {
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let err = |why| AddrError {
            addr: text.to_string(),
            why,
        };
        let text = text.trim();
        let (scheme, rest) = match text.split_once("://") {
            Some((s, r)) => (Some(s.to_ascii_lowercase()), r),
            None => (None, text),
        };
        let (tls, websocket, default_port) = match scheme.as_deref() {
            None | Some("ssh") => (false, false, DEFAULT_SSH_PORT),
            Some("ws" | "http") => (false, true, 80),
            Some("wss" | "https") => (true, true, 443),
            Some(_) => return Err(err("the scheme must be ssh, ws, wss, http or https")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !websocket && !path.is_empty() && path != "/" {
            return Err(err("an SSH address takes no path"));
        }
        if authority.contains('@') {
            return Err(err("credentials do not belong in a server address"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| err("bad host or port"))?;
        let port = port.unwrap_or(default_port);
        if host.is_empty() {
            return Err(err("no host"));
        }
        if !websocket && scheme.is_none() && !authority.contains(':') {
            // A bare name is most likely a mistake (which port?); say so.
            return Err(err("a bare address needs a port (host:port)"));
        }
        Ok(if websocket {
            ServerAddr::WebSocket {
                tls,
                host,
                port,
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                },
            }
        } else {
            ServerAddr::Ssh { host, port }
        })
    }

    pub fn host(&self) -> &str {
        match self {
            ServerAddr::Ssh { host, .. } | ServerAddr::WebSocket { host, .. } => host,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            ServerAddr::Ssh { port, .. } | ServerAddr::WebSocket { port, .. } => *port,
        }
    }

    /// `host:port`, with brackets around an IPv6 address: what TCP dials and
    /// what HTTP CONNECT asks for.
    pub fn authority(&self) -> String {
        let host = self.host();
        if host.contains(':') {
            format!("[{host}]:{}", self.port())
        } else {
            format!("{host}:{}", self.port())
        }
    }

    /// Whether TLS runs below the transport (`wss://`).
    pub fn tls(&self) -> bool {
        matches!(self, ServerAddr::WebSocket { tls: true, .. })
    }

    /// The transport this address asks for.
    pub fn transport(&self) -> &'static dyn Transport {
        match self {
            ServerAddr::Ssh { .. } => &Tcp,
            ServerAddr::WebSocket { .. } => &WebSocket,
        }
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Ssh { .. } => write!(f, "ssh://{}", self.authority()),
            ServerAddr::WebSocket { tls, path, .. } => {
                let scheme = if *tls { "wss" } else { "ws" };
                write!(f, "{scheme}://{}{path}", self.authority())
            }
        }
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => None, // unbracketed IPv6
        Some((host, port)) => Some((host.to_string(), Some(port.parse().ok()?))),
        None => Some((authority.to_string(), None)),
    }
}

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send + 'a>>;

/// How SSH bytes ride on a connected byte stream, at both ends.
pub trait Transport: Send + Sync {
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// The agent's end: sets the transport up on `io`, connected to `addr`.
    fn connect<'a>(&'a self, io: BoxIo, addr: &'a ServerAddr) -> Fut<'a, BoxIo>;
    /// The server's end: accepts the transport on `io`.
    fn accept(&self, io: BoxIo) -> Fut<'_, BoxIo>;
}

/// Raw SSH on the stream itself.
pub struct Tcp;

impl Transport for Tcp {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn connect<'a>(&'a self, io: BoxIo, _addr: &'a ServerAddr) -> Fut<'a, BoxIo> {
        Box::pin(async move { Ok(io) })
    }

    fn accept(&self, io: BoxIo) -> Fut<'_, BoxIo> {
        Box::pin(async move { Ok(io) })
    }
}

/// SSH inside a WebSocket (RFC 6455), binary messages, subprotocol
/// [`WEBSOCKET_SUBPROTOCOL`].
pub struct WebSocket;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(MAX_WRITE)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

impl Transport for WebSocket {
    fn name(&self) -> &'static str {
        "websocket"
    }

    fn connect<'a>(&'a self, io: BoxIo, addr: &'a ServerAddr) -> Fut<'a, BoxIo> {
        Box::pin(async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            // The URL's scheme only names the handshake's form; TLS, if any,
            // is already below `io`.
            let mut request = addr
                .to_string()
                .into_client_request()
                .map_err(|e| TransportError::Handshake(e.to_string()))?;
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                http::HeaderValue::from_static(WEBSOCKET_SUBPROTOCOL),
            );
            request.headers_mut().insert(
                http::header::USER_AGENT,
                http::HeaderValue::from_static(concat!("tower-agent/", env!("CARGO_PKG_VERSION"))),
            );
            let (ws, _response) =
                tokio_tungstenite::client_async_with_config(request, io, Some(ws_config()))
                    .await
                    .map_err(client_error)?;
            Ok(byte_stream(ws))
        })
    }

    fn accept(&self, io: BoxIo) -> Fut<'_, BoxIo> {
        Box::pin(async move {
            use tungstenite::handshake::server::{ErrorResponse, Request, Response};
            #[allow(clippy::result_large_err)] // the library's callback type
            let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                let offered = req
                    .headers()
                    .get_all("Sec-WebSocket-Protocol")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|p| p.trim() == WEBSOCKET_SUBPROTOCOL);
                if !offered {
                    let mut refusal = ErrorResponse::new(Some(format!(
                        "this port carries Tower agents' SSH connections: a WebSocket with subprotocol {WEBSOCKET_SUBPROTOCOL}\n"
                    )));
                    *refusal.status_mut() = http::StatusCode::BAD_REQUEST;
                    return Err(refusal);
                }
                resp.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    http::HeaderValue::from_static(WEBSOCKET_SUBPROTOCOL),
                );
                Ok(resp)
            };
            let ws = tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(ws_config()))
                .await
                .map_err(|e| TransportError::Handshake(e.to_string()))?;
            Ok(byte_stream(ws))
        })
    }
}

fn client_error(e: tungstenite::Error) -> TransportError {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(256)])
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            TransportError::Refused {
                status: resp.status().as_u16(),
                body,
            }
        }
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_),
        ) => TransportError::Handshake(format!(
            "the server did not agree to subprotocol {WEBSOCKET_SUBPROTOCOL}; is it tower-server?"
        )),
        tungstenite::Error::Io(e) => TransportError::Io(e),
        other => TransportError::Handshake(other.to_string()),
    }
}

/// A WebSocket as a byte stream: one binary message per write, sent at once.
///
/// SSH never flushes, so nothing may wait in a buffer: each write is flushed
/// as it is accepted. A flush the socket cannot take yet is finished by the
/// next write, flush *or read*: the SSH session always has a read pending, so
/// its task is woken when the socket can take the rest. (A pump task between
/// a pipe and the WebSocket would do the same at the cost of two more task
/// hops per message.)
struct WsIo<S> {
    ws: tokio_tungstenite::WebSocketStream<S>,
    /// The rest of the last message received.
    unread: bytes::Bytes,
    /// A message was accepted whose flush has not finished.
    flush_pending: bool,
}

fn to_io(e: tungstenite::Error) -> std::io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            std::io::ErrorKind::BrokenPipe.into()
        }
        other => std::io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Drives a pending flush; errors surface on the next write.
    fn drive_flush(&mut self, cx: &mut std::task::Context<'_>) {
        if self.flush_pending
            && let std::task::Poll::Ready(_) = Pin::new(&mut self.ws).poll_flush(cx)
        {
            self.flush_pending = false;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        this.drive_flush(cx);
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match futures::ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.unread = data,
                // The peer closed, or spoke text: the stream ends.
                Some(Ok(Message::Close(_) | Message::Text(_))) | None => {
                    return Poll::Ready(Ok(()));
                }
                // Pings are answered by the library.
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = &mut *self;
        futures::ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_WRITE);
        let msg = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
        Pin::new(&mut this.ws).start_send(msg).map_err(to_io)?;
        match Pin::new(&mut this.ws).poll_flush(cx) {
            Poll::Ready(Ok(())) => this.flush_pending = false,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(to_io(e))),
            Poll::Pending => this.flush_pending = true,
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        futures::ready!(Pin::new(&mut this.ws).poll_flush(cx)).map_err(to_io)?;
        this.flush_pending = false;
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match futures::ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => std::task::Poll::Ready(Ok(())),
            Err(e) => std::task::Poll::Ready(Err(to_io(e))),
        }
    }
}

fn byte_stream<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> BoxIo
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::new(WsIo {
        ws,
        unread: bytes::Bytes::new(),
        flush_pending: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn addresses() {
        let ssh = |h: &str, p| ServerAddr::Ssh {
            host: h.into(),
            port: p,
        };
        let ws = |tls, h: &str, p, path: &str| ServerAddr::WebSocket {
            tls,
            host: h.into(),
            port: p,
            path: path.into(),
        };
        for (text, want) in [
            ("127.0.0.1:7022", ssh("127.0.0.1", 7022)),
            ("ssh://tower.example:22", ssh("tower.example", 22)),
            ("ssh://tower.example", ssh("tower.example", 7022)),
            ("[::1]:7022", ssh("::1", 7022)),
            ("ws://10.0.0.1:8080", ws(false, "10.0.0.1", 8080, "/")),
            ("http://10.0.0.1:8080", ws(false, "10.0.0.1", 8080, "/")),
            ("wss://tower.example", ws(true, "tower.example", 443, "/")),
            (
                "https://tower.example/agents",
                ws(true, "tower.example", 443, "/agents"),
            ),
            ("wss://[::1]:8443/x", ws(true, "::1", 8443, "/x")),
        ] {
            let got = ServerAddr::parse(text).unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(ServerAddr::parse(&got.to_string()).unwrap(), want, "{got}");
        }
        assert_eq!(
            ServerAddr::parse("wss://[::1]:8443/x").unwrap().authority(),
            "[::1]:8443"
        );
        for bad in [
            "ftp://x:1",
            "tower.example",
            "ssh://x:1/path",
            "ws://user:pw@x:1",
            "x:notaport",
            "::1:7022",
            "ws://:80",
        ] {
            assert!(ServerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    /// SSH-sized writes in both directions at once arrive intact and in order.
    #[tokio::test]
    async fn websocket_carries_bytes_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = WebSocket.accept(Box::new(tcp)).await.unwrap();
            // Echo until EOF.
            let mut buf = vec![0u8; 5000];
            loop {
                let n = io.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                io.write_all(&buf[..n]).await.unwrap();
            }
            io.shutdown().await.unwrap();
        });
        let addr = ServerAddr::parse(&format!("ws://127.0.0.1:{port}/")).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr.authority())
            .await
            .unwrap();
        let io = WebSocket.connect(Box::new(tcp), &addr).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(io);
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(32 * 1024 + 17) {
                wr.write_all(chunk).await.unwrap();
            }
            wr
        });
        let mut got = vec![0u8; expect.len()];
        rd.read_exact(&mut got).await.unwrap();
        // Closing ends the server's echo loop; nothing more arrives.
        let mut wr = writer.await.unwrap();
        wr.shutdown().await.unwrap();
        server.await.unwrap();
        assert_eq!(rd.read(&mut [0u8; 1]).await.unwrap(), 0);
        assert!(got == expect, "echoed bytes differ");
    }

    /// A plain HTTP request, or a WebSocket without Tower's subprotocol, gets
    /// a 400 that says what the port is for.
    #[tokio::test]
    async fn websocket_refuses_other_clients() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let _ = WebSocket.accept(Box::new(tcp)).await;
                });
            }
        });
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Protocol: kubesphere-v1\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(WEBSOCKET_SUBPROTOCOL), "{answer}");
    }
}
