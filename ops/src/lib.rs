//! Operations endpoints for the Tower server and agent: `/healthz` (the process
//! runs), `/readyz` (it can do its job, as the caller decides) and `/metrics`
//! (Prometheus text format), on a plain-HTTP listener of their own; and
//! [`accept`], the accept step every listener of the server and agent shares.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use prometheus_client;

pub mod splice;

/// What the endpoints report.
pub struct Ops {
    pub registry: Registry,
    /// Readiness check; `Err` carries the reason shown on `/readyz`.
    pub ready: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// Registers metrics under `prefix` on a `prometheus_client` registry, one
/// line each: `register_metrics!(registry, "prefix", "name": metric => "help", …)`
/// (each metric is cloned; clones share their value).
#[macro_export]
macro_rules! register_metrics {
    ($registry:expr, $prefix:literal, $($name:literal: $metric:expr => $help:literal),* $(,)?) => {{
        let r = $registry.sub_registry_with_prefix($prefix);
        $( r.register($name, $help, $metric.clone()); )*
    }};
}

/// The git revision the binaries were built from: the first 7 characters of
/// the commit `HEAD` pointed at, the `TOWER_REVISION` environment variable of
/// the build when set, or `unknown` (built outside git). Set by `build.rs`.
pub const REVISION: &str = env!("TOWER_REVISION");

/// What every Tower binary's `--version` prints after its name: the workspace
/// version and [`REVISION`], e.g. `0.1.0 (rev a3d6972)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (rev ",
    env!("TOWER_REVISION"),
    ")"
);

/// How a binary writes its log lines (`--log-format`, `TOWER_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event, coloured only when stderr is a terminal
    /// (never in a file or a pod's log).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}; use text or json")),
        }
    }
}

/// Logs to stderr in `format`, at the level `RUST_LOG` asks for
/// (`default_level` otherwise), as every Tower binary does; stdout stays for
/// what a binary prints on purpose (ports, tokens, tables).
pub fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// A token cancelled on SIGINT or SIGTERM: how every Tower binary learns to
/// stop (and, for the agent, to drain).
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal.cancel();
    });
    shutdown
}

/// The next connection on `listener` (named `what` in logs), or `None` once
/// `shutdown` fires. A failed accept (out of file descriptors, say) is logged
/// and retried after a pause instead of ending the listener.
pub async fn accept(
    listener: &TcpListener,
    what: &str,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves the endpoints on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>, shutdown: CancellationToken) {
    let connections = tokio_util::task::TaskTracker::new();
    while let Some((socket, _)) = accept(&listener, "ops", &shutdown).await {
        let (ops, shutdown) = (ops.clone(), shutdown.clone());
        connections.spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let ops = ops.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&ops, req.uri().path())) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(socket), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

fn answer(ops: &Ops, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match (ops.ready)() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &ops.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /healthz, /readyz or /metrics\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_names_the_workspace_version_and_the_revision() {
        assert_eq!(
            super::VERSION,
            format!("{} (rev {})", env!("CARGO_PKG_VERSION"), super::REVISION)
        );
        assert!(!super::REVISION.is_empty());
        // Built in this repository, the revision is HEAD's commit, shortened.
        if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.git")).exists()
            && std::env::var_os("TOWER_REVISION").is_none()
        {
            assert_eq!(super::REVISION.len(), 7, "{}", super::REVISION);
            assert!(super::REVISION.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
}
