//! HTTP proxies between the agent and its server: which proxy a server
//! address goes through (`--proxy`, or `HTTPS_PROXY`/`HTTP_PROXY` minus
//! `NO_PROXY`), and the HTTP CONNECT that opens the tunnel through it, with
//! basic auth.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_proto::transport::ServerAddr;

/// Longest proxy answer head read.
const MAX_ANSWER: usize = 16 * 1024;
/// How long the proxy has to connect and answer CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP proxy. Its credentials never appear in `Display` or `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    auth: Option<(String, String)>,
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({self}")?;
        if self.auth.is_some() {
            f.write_str(", with credentials")?;
        }
        f.write_str(")")
    }
}

/// Why a proxy setting does not parse.
#[derive(Debug, thiserror::Error)]
#[error("proxy {shown}: {why}")]
pub struct ProxyUrlError {
    /// The setting with any password hidden.
    shown: String,
    why: &'static str,
}

impl Proxy {
    /// `http://[user[:password]@]host[:port]` (port 80 by default; a bare
    /// `host:port` is read as `http://`). User and password may be
    /// percent-encoded.
    pub fn parse(text: &str) -> Result<Self, ProxyUrlError> {
        let text = text.trim();
        let err = |why| ProxyUrlError {
            shown: redact(text),
            why,
        };
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => {
                return Err(err(
                    "only http:// proxies are supported (the tunnel through them is still end-to-end encrypted)",
                ));
            }
            None => text,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(err("a proxy URL takes no path"));
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((auth, hp)) => {
                let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
                let decode = |s: &str| {
                    percent_decode(s).ok_or_else(|| err("bad percent-encoding in credentials"))
                };
                (Some((decode(user)?, decode(pass)?)), hp)
            }
            None => (None, rest),
        };
        // Reuse the server address rules for host and port.
        let addr =
            ServerAddr::parse(&format!("ws://{hostport}")).map_err(|_| err("bad host or port"))?;
        Ok(Proxy {
            host: addr.host().to_string(),
            port: addr.port(),
            auth,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a TCP tunnel through the proxy to `target` (`host:port`).
    pub async fn connect(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let proxy = self.to_string();
        let work = async {
            let mut tcp = TcpStream::connect(self.authority()).await.map_err(|e| {
                ProxyError::Unreachable {
                    proxy: proxy.clone(),
                    source: e,
                }
            })?;
            let _ = tcp.set_nodelay(true);
            let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some((user, pass)) = &self.auth {
                let basic =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                request.push_str(&format!("Proxy-Authorization: Basic {basic}\r\n"));
            }
            request.push_str("\r\n");
            let io_err = |e| ProxyError::Io {
                proxy: proxy.clone(),
                source: e,
            };
            tcp.write_all(request.as_bytes()).await.map_err(io_err)?;
            // Read the answer head byte by byte: what follows it belongs to
            // the server, and must stay in the socket.
            let mut head = Vec::with_capacity(256);
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() >= MAX_ANSWER {
                    return Err(ProxyError::Malformed {
                        proxy: proxy.clone(),
                    });
                }
                let mut b = [0u8; 1];
                if tcp.read(&mut b).await.map_err(io_err)? == 0 {
                    return Err(ProxyError::Closed {
                        proxy: proxy.clone(),
                    });
                }
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let status_line = head.lines().next().unwrap_or_default().trim().to_string();
            let status: Option<u16> = status_line
                .strip_prefix("HTTP/1.")
                .and_then(|s| s.get(2..5))
                .and_then(|s| s.parse().ok());
            match status {
                Some(200..=299) => Ok(tcp),
                // 407 is the standard answer; some proxies (tinyproxy) say 401.
                Some(401 | 407) => Err(ProxyError::AuthRequired {
                    proxy: proxy.clone(),
                    sent: self.auth.is_some(),
                    answer: status_line,
                }),
                Some(_) => Err(ProxyError::Refused {
                    proxy: proxy.clone(),
                    target: target.to_string(),
                    answer: status_line,
                }),
                None => Err(ProxyError::Malformed {
                    proxy: proxy.clone(),
                }),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(ProxyError::Timeout { proxy }))
    }
}

/// Why a CONNECT through a proxy failed. Each names the proxy, never its
/// credentials.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach proxy {proxy}: {source}")]
    Unreachable {
        proxy: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy}: {source}")]
    Io {
        proxy: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused to connect to {target}: {answer:?}")]
    Refused {
        proxy: String,
        target: String,
        answer: String,
    },
    #[error(
        "proxy {proxy} wants authentication ({answer:?}){}",
        if *.sent { "; it refused the credentials given" } else { "; give user:password in the proxy URL" }
    )]
    AuthRequired {
        proxy: String,
        sent: bool,
        answer: String,
    },
    #[error("proxy {proxy} closed the connection before answering CONNECT")]
    Closed { proxy: String },
    #[error("proxy {proxy} answered CONNECT with something that is not HTTP")]
    Malformed { proxy: String },
    #[error("proxy {proxy} did not answer CONNECT within {CONNECT_TIMEOUT:?}")]
    Timeout { proxy: String },
}

/// Which proxy each server address goes through.
#[derive(Clone, Debug, Default)]
pub struct ProxySettings {
    /// `--proxy`: every address, `ssh://` included, goes through it.
    pub all: Option<Proxy>,
    /// `HTTP_PROXY`: `ws://` addresses.
    pub http: Option<Proxy>,
    /// `HTTPS_PROXY`: `wss://` addresses.
    pub https: Option<Proxy>,
    /// `NO_PROXY` entries: hosts the environment's proxies are skipped for.
    pub no_proxy: Vec<String>,
}

impl ProxySettings {
    /// The environment's settings (upper or lower case names), plus `all`.
    pub fn from_env(all: Option<Proxy>) -> Result<Self, ProxyUrlError> {
        let var = |name: &str| {
            std::env::var(name)
                .or_else(|_| std::env::var(name.to_ascii_lowercase()))
                .ok()
                .filter(|v| !v.trim().is_empty())
        };
        let parse = |v: Option<String>| v.map(|v| Proxy::parse(&v)).transpose();
        Ok(Self {
            all,
            http: parse(var("HTTP_PROXY"))?,
            https: parse(var("HTTPS_PROXY"))?,
            no_proxy: var("NO_PROXY")
                .map(|v| {
                    v.split(',')
                        .map(|e| e.trim().to_ascii_lowercase())
                        .filter(|e| !e.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The proxy `addr` goes through, if any. Raw SSH goes only through
    /// `--proxy`: proxies set for web traffic often refuse CONNECT to other
    /// ports.
    pub fn for_addr(&self, addr: &ServerAddr) -> Option<&Proxy> {
        if let Some(p) = &self.all {
            return Some(p);
        }
        let proxy = match addr {
            ServerAddr::Ssh { .. } => None,
            ServerAddr::WebSocket { tls: false, .. } => self.http.as_ref(),
            ServerAddr::WebSocket { tls: true, .. } => self.https.as_ref(),
        }?;
        (!self.bypassed(addr.host())).then_some(proxy)
    }

    /// Whether `NO_PROXY` names `host`: `*`, the host itself, or a domain it
    /// is under (`example.com` and `.example.com` both cover
    /// `a.example.com`).
    fn bypassed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.no_proxy.iter().any(|entry| {
            let entry = entry.trim_start_matches("*.").trim_start_matches('.');
            entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
        })
    }
}

fn redact(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((before, after)) => {
            let scheme = before.split_once("://").map(|(s, _)| s).unwrap_or("http");
            format!("{scheme}://<credentials>@{after}")
        }
        None => text.to_string(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_credentials() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.corp:3128").unwrap();
        assert_eq!(p.to_string(), "http://proxy.corp:3128");
        assert_eq!(p.auth, Some(("alice".to_string(), "s@cret".to_string())));
        assert!(!format!("{p:?}").contains("cret"));
        let p = Proxy::parse("10.0.0.1:8080").unwrap();
        assert_eq!(p.to_string(), "http://10.0.0.1:8080");
        assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
        let e = Proxy::parse("https://bob:hunter2@proxy:443").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(Proxy::parse("http://proxy:3128/path").is_err());
    }

    #[test]
    fn chooses_by_scheme_and_no_proxy() {
        let http = Proxy::parse("http://h:1").unwrap();
        let https = Proxy::parse("http://s:2").unwrap();
        let settings = ProxySettings {
            all: None,
            http: Some(http.clone()),
            https: Some(https.clone()),
            no_proxy: vec!["internal.corp".into(), "10.1.2.3".into()],
        };
        let addr = |s: &str| ServerAddr::parse(s).unwrap();
        assert_eq!(settings.for_addr(&addr("ws://tower:80")), Some(&http));
        assert_eq!(settings.for_addr(&addr("wss://tower")), Some(&https));
        assert_eq!(settings.for_addr(&addr("tower:7022")), None);
        assert_eq!(settings.for_addr(&addr("wss://a.internal.corp")), None);
        assert_eq!(settings.for_addr(&addr("wss://internal.corp")), None);
        assert_eq!(settings.for_addr(&addr("ws://10.1.2.3:80")), None);
        assert_eq!(
            settings.for_addr(&addr("wss://notinternal.corp")),
            Some(&https)
        );
        let all = ProxySettings {
            all: Some(http.clone()),
            ..settings
        };
        assert_eq!(all.for_addr(&addr("tower:7022")), Some(&http));
        assert_eq!(all.for_addr(&addr("wss://a.internal.corp")), Some(&http));
    }
}
