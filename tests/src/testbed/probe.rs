//! Minimal HTTP/1.0 GETs (plain and TLS) for readiness probes, with no client-side logging.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// `GET http://addr/path`; returns the status code and body.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    exchange(stream, addr, path, None).await
}

/// `GET https://127.0.0.1:port/path`, verifying the server against `ca_pem` and sending
/// `Authorization: Bearer <token>`; returns the status code and body.
pub(crate) async fn https_get(
    port: u16,
    ca_pem: &str,
    token: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tower_certs::parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let tcp = tokio::net::TcpStream::connect((ip, port)).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::IpAddress(ip.into()), tcp)
        .await
        .context("TLS handshake")?;
    exchange(tls, &format!("127.0.0.1:{port}"), path, Some(token)).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    // A TLS peer may close without close_notify; what was read so far is still the response.
    if let Err(e) = stream.read_to_end(&mut buf).await
        && buf.is_empty()
    {
        return Err(e.into());
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) => Ok((code, body.to_string())),
        None => bail!("GET {path}: malformed response {:?}", head.lines().next()),
    }
}
