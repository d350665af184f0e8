//! The benchmark's HTTP/2 client: one per [`Endpoint`], the member directly
//! or the gateway, built the same way for both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{CLIENT_CONN_WINDOW, CLIENT_STREAM_WINDOW};
use crate::fixture::raw;

/// Where a client sends requests: the member directly, or the gateway.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ca_pem: String,
    /// Client certificate and key (the gateway requires one).
    pub identity: Option<(String, String)>,
    pub bearer: Option<HeaderValue>,
    /// Path prefix: empty for direct, `/clusters/<name>` through the gateway.
    pub prefix: String,
}

/// One HTTP/2 connection to an [`Endpoint`].
#[derive(Clone)]
pub struct H2 {
    sender: http2::SendRequest<Empty<Bytes>>,
    ep: Arc<Endpoint>,
}

impl Endpoint {
    pub async fn connect(self: &Arc<Self>) -> anyhow::Result<H2> {
        let identity = self.identity.as_ref().map(|(c, k)| raw::Identity {
            cert_pem: c.clone(),
            key_pem: k.clone(),
        });
        let tls = tokio::time::timeout(
            Duration::from_secs(20),
            raw::connect(self.addr, &self.ca_pem, identity.as_ref(), true),
        )
        .await
        .context("TLS connect timed out")??;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(CLIENT_STREAM_WINDOW)
            .initial_connection_window_size(CLIENT_CONN_WINDOW)
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2 {
            sender,
            ep: self.clone(),
        })
    }
}

impl H2 {
    /// Sends a GET of `path` (below the endpoint's prefix); returns the response head.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<hyper::Response<Incoming>> {
        let mut req = Request::get(format!("https://127.0.0.1{}{path}", self.ep.prefix));
        if let Some(b) = &self.ep.bearer {
            req = req.header(header::AUTHORIZATION, b.clone());
        }
        let req = req.body(Empty::new())?;
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }

    /// GETs `path`, expects 200, reads the whole body; returns its length.
    pub async fn get_drain(&mut self, path: &str) -> anyhow::Result<u64> {
        let resp = self.get(path).await?;
        let status = resp.status();
        let n = drain(resp.into_body()).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status}");
        Ok(n)
    }
}

pub(crate) async fn drain(mut body: Incoming) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}
