//! `tower-agent`: dials the Tower server and serves the member's upstreams.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tower_agent::{Agent, AgentConfig, TokenSource, UpstreamConfig};
use tower_proto::names::{UPSTREAM_KS_APISERVER, UPSTREAM_KUBE_APISERVER};

/// Tower agent: connects a member cluster to the Tower server over SSH.
#[derive(Parser, Debug)]
#[command(version = tower_ops::VERSION, about)]
struct Args {
    /// File holding the join token (re-read on every reconnect).
    #[arg(long, env = "TOWER_JOIN_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The join token itself (prefer --token-file; this is visible in the process list).
    #[arg(long, env = "TOWER_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// kube-apiserver URL as seen from the agent.
    #[arg(
        long,
        env = "TOWER_KUBE_APISERVER",
        default_value = "https://kubernetes.default.svc"
    )]
    kube_apiserver: String,
    /// CA bundle that verifies kube-apiserver.
    #[arg(long, env = "TOWER_KUBE_CA_FILE", default_value = concat!("/var/run/secrets/kubernetes.io/serviceaccount", "/ca.crt"))]
    kube_ca_file: PathBuf,
    /// Bearer token file for kube-apiserver (the mounted service-account token).
    #[arg(long, env = "TOWER_KUBE_TOKEN_FILE", default_value = concat!("/var/run/secrets/kubernetes.io/serviceaccount", "/token"))]
    kube_token_file: PathBuf,
    /// ks-apiserver URL; when set, the agent also serves ks-apiserver.
    #[arg(long, env = "TOWER_KS_APISERVER")]
    ks_apiserver: Option<String>,
    /// CA bundle for ks-apiserver (defaults to --kube-ca-file).
    #[arg(long, env = "TOWER_KS_CA_FILE")]
    ks_ca_file: Option<PathBuf>,
    /// Keepalive interval towards the server, in seconds.
    #[arg(long, env = "TOWER_KEEPALIVE_INTERVAL", default_value_t = 10.0)]
    keepalive_interval: f64,
    /// Unanswered keepalives before the server is declared gone.
    #[arg(long, env = "TOWER_KEEPALIVE_MAX", default_value_t = 3)]
    keepalive_max: usize,
    /// Address of the operations endpoints (/healthz, /readyz, /metrics); empty disables them.
    #[arg(long, env = "TOWER_OPS_LISTEN", default_value = "0.0.0.0:9090")]
    ops_listen: String,
    /// Longest wait between reconnect attempts, in seconds.
    #[arg(long, env = "TOWER_BACKOFF_MAX", default_value_t = 5.0)]
    backoff_max: f64,
    /// On SIGTERM, how long requests already in the tunnel may take to finish,
    /// in seconds; new ones are refused meanwhile and watches are cut.
    #[arg(long, env = "TOWER_DRAIN_TIMEOUT", default_value_t = 5.0)]
    drain_timeout: f64,
    /// How long a request (not a watch or an upgrade) may wait for the
    /// upstream's response head, in seconds; then the client gets a 504 Status.
    #[arg(long, env = "TOWER_UPSTREAM_TIMEOUT", default_value_t = 120.0)]
    upstream_timeout: f64,
    /// Requests served at once on one tunnel channel (one upstream connection
    /// at most for each); the server queues any more until one ends.
    #[arg(long, env = "TOWER_MAX_STREAMS", default_value_t = tower_proto::tunnel::H2_MAX_STREAMS)]
    max_streams: u32,
    /// Log lines as `text` (coloured only on a terminal) or `json`.
    #[arg(long, env = "TOWER_LOG_FORMAT", default_value = "text")]
    log_format: tower_ops::LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tower_ops::init_logging(args.log_format, "info");
    let token = match (args.token_file, args.token) {
        (Some(f), _) => TokenSource::File(f),
        (None, Some(t)) => TokenSource::Literal(t),
        (None, None) => anyhow::bail!(
            "no join token: pass --token-file (or TOWER_JOIN_TOKEN_FILE); `towerctl token` mints one"
        ),
    };
    let mut upstreams = vec![UpstreamConfig {
        name: UPSTREAM_KUBE_APISERVER.into(),
        url: args.kube_apiserver,
        ca_file: Some(args.kube_ca_file.clone()),
        token_file: Some(args.kube_token_file.clone()),
    }];
    if let Some(url) = args.ks_apiserver {
        upstreams.push(UpstreamConfig {
            name: UPSTREAM_KS_APISERVER.into(),
            url,
            ca_file: Some(args.ks_ca_file.unwrap_or(args.kube_ca_file)),
            token_file: Some(args.kube_token_file),
        });
    }
    let mut config = AgentConfig::new(token, upstreams);
    config.keepalive_interval = Duration::from_secs_f64(args.keepalive_interval);
    config.keepalive_max = args.keepalive_max;
    config.backoff_max = Duration::from_secs_f64(args.backoff_max);
    config.drain_timeout = Duration::from_secs_f64(args.drain_timeout);
    config.upstream_timeout = Duration::from_secs_f64(args.upstream_timeout);
    config.max_streams = args.max_streams;
    let agent = std::sync::Arc::new(Agent::new(config)?);
    let shutdown = tower_ops::shutdown_on_signal();
    if !args.ops_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&args.ops_listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding ops endpoints {}: {e}", args.ops_listen))?;
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { agent.serve_ops(listener, shutdown).await });
    }
    agent.run(shutdown).await;
    Ok(())
}
