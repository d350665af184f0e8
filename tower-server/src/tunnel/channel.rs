//! A tunnel channel as a byte stream: counted while open, its bytes metered,
//! vectored writes gathered into one SSH packet.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tower_proto::tunnel::Gather;

use crate::metrics::{DirectionLabel, Metrics};

/// An SSH channel as a byte stream, counted while open, its bytes metered,
/// the slices of a vectored write sent as one packet ([`Gather`]).
pub struct ChannelIo {
    inner: Gather<russh::ChannelStream<russh::server::Msg>>,
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    to_agent: prometheus_client::metrics::counter::Counter,
    from_agent: prometheus_client::metrics::counter::Counter,
}

impl ChannelIo {
    pub(super) fn new(
        inner: russh::ChannelStream<russh::server::Msg>,
        open: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        metrics.channels.inc();
        let to_agent = metrics
            .bytes
            .get_or_create(&DirectionLabel {
                direction: "to_agent",
            })
            .clone();
        let from_agent = metrics
            .bytes
            .get_or_create(&DirectionLabel {
                direction: "from_agent",
            })
            .clone();
        Self {
            inner: Gather::new(inner),
            open,
            metrics,
            to_agent,
            from_agent,
        }
    }
}

impl Drop for ChannelIo {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.channels.dec();
    }
}

impl tokio::io::AsyncRead for ChannelIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.from_agent.inc_by((buf.filled().len() - before) as u64);
        poll
    }
}

impl tokio::io::AsyncWrite for ChannelIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.to_agent.inc_by(*n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.to_agent.inc_by(*n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
