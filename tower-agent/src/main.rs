//! `tower-agent`: dials the Tower server and serves the member's upstreams.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tower_agent::pin::PinStoreConfig;
use tower_agent::{Agent, AgentConfig, Proxy, ProxySettings, TokenSource, UpstreamConfig};
use tower_proto::names::{UPSTREAM_KS_APISERVER, UPSTREAM_KUBE_APISERVER};

/// Tower agent: connects a member cluster to the Tower server over SSH (raw,
/// or inside a WebSocket through HTTP proxies).
///
/// Two ways to say who it is: a join token from `towerctl join` (it names the
/// server and pins its host key), or KubeSphere's agent flags (`--name`,
/// `--token` with the Cluster's bare token, `--proxy-server`), which pin
/// nothing: then the server's key is pinned on first use and kept in a Secret.
#[derive(Parser, Debug)]
#[command(version = tower_ops::VERSION, about)]
struct Args {
    /// File holding the join token (re-read on every reconnect).
    #[arg(long, env = "TOWER_JOIN_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The join token itself (prefer --token-file; this is visible in the
    /// process list). With --name, the Cluster's bare token
    /// (`spec.connection.token`), as KubeSphere's agent manifest passes it.
    #[arg(long, env = "TOWER_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster's name: the token is then KubeSphere's bare cluster token
    /// and --proxy-server names the server (KubeSphere's agent flags).
    #[arg(long, env = "TOWER_CLUSTER_NAME")]
    name: Option<String>,
    /// Server addresses (comma-separated), overriding the join token's:
    /// `ssh://host:port` or `host:port` (raw SSH), `ws://…` or `wss://…`
    /// (SSH inside a WebSocket; `http://` and `https://` read as those).
    #[arg(
        long,
        visible_alias = "proxy-server",
        env = "TOWER_SERVER",
        value_delimiter = ','
    )]
    server: Vec<String>,
    /// CA bundle that verifies a `wss://` server's TLS certificate (default:
    /// the system's roots). The SSH host key is checked as well, always.
    #[arg(long, env = "TOWER_SERVER_CA_FILE")]
    server_ca_file: Option<PathBuf>,
    /// HTTP proxy for every server address, raw SSH included:
    /// `http://[user:password@]host:port`. Without it, `wss://` addresses use
    /// HTTPS_PROXY and `ws://` ones HTTP_PROXY, minus NO_PROXY.
    #[arg(long, env = "TOWER_PROXY", hide_env_values = true)]
    proxy: Option<String>,
    /// The server's SSH host-key fingerprint (`SHA256:…`, tower-server logs
    /// it at start), for --name: pins it instead of trusting on first use.
    #[arg(long, env = "TOWER_HOST_KEY")]
    host_key: Option<String>,
    /// With --name and no --host-key: keep the first-use pin in this file
    /// instead of a Secret.
    #[arg(
        long,
        env = "TOWER_HOST_KEY_PIN_FILE",
        conflicts_with = "host_key_pin_secret"
    )]
    host_key_pin_file: Option<PathBuf>,
    /// With --name and no --host-key: the Secret of the agent's namespace
    /// that keeps the first-use pin.
    #[arg(
        long,
        env = "TOWER_HOST_KEY_PIN_SECRET",
        default_value = "tower-agent-host-key"
    )]
    host_key_pin_secret: String,
    /// The agent's namespace, for the pin Secret (default: the service
    /// account's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// kube-apiserver as `host:port` (KubeSphere's agent flag); sets
    /// --kube-apiserver to https://host:port.
    #[arg(
        long,
        env = "TOWER_KUBERNETES_SERVICE",
        conflicts_with = "kube_apiserver"
    )]
    kubernetes_service: Option<String>,
    /// ks-apiserver as `host:port` (KubeSphere's agent flag); sets
    /// --ks-apiserver to http://host:port.
    #[arg(
        long,
        env = "TOWER_KUBESPHERE_SERVICE",
        conflicts_with = "ks_apiserver"
    )]
    kubesphere_service: Option<String>,
    /// Keepalive interval as a duration (`10s`, `1m`; KubeSphere's agent
    /// flag); the same as --keepalive-interval.
    #[arg(long, env = "TOWER_KEEPALIVE", value_parser = parse_duration, conflicts_with = "keepalive_interval")]
    keepalive: Option<Duration>,
    /// Log verbosity of KubeSphere's Go agent; accepted and ignored (use RUST_LOG).
    #[arg(long = "v", hide = true)]
    _verbosity: Option<String>,
    /// kube-apiserver URL as seen from the agent.
    #[arg(long, env = "TOWER_KUBE_APISERVER")]
    kube_apiserver: Option<String>,
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
    /// Keepalive interval towards the server, in seconds [default: 10].
    #[arg(long, env = "TOWER_KEEPALIVE_INTERVAL")]
    keepalive_interval: Option<f64>,
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
    /// How many steps of CPU priority (nice) below the rest of the process
    /// the threads copying upgraded streams (exec, attach, port-forward, cp)
    /// run, 0–19, so that on a busy machine requests are served first; 0
    /// copies them on the main threads at the same priority. Use 0 under a
    /// CPU limit: the lower priority costs bulk copies CPU per byte, and a
    /// throttled process stops its request threads too.
    #[arg(long, env = "TOWER_SPLICE_NICE", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    splice_nice: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tower_ops::init_logging(args.log_format, "info");
    tower_ops::splice::start(args.splice_nice)
        .map_err(|e| anyhow::anyhow!("starting the threads that copy upgraded streams: {e}"))?;
    let token = match (&args.name, args.token_file, args.token) {
        (Some(cluster), file, literal) => {
            anyhow::ensure!(
                tower_proto::names::is_valid_cluster_name(cluster),
                "--name {cluster:?} is not a valid cluster name"
            );
            let token = match (file, literal) {
                (Some(f), _) => std::fs::read_to_string(&f)
                    .map_err(|e| anyhow::anyhow!("reading --token-file {}: {e}", f.display()))?,
                (None, Some(t)) => t,
                (None, None) => {
                    anyhow::bail!("--name needs the cluster's token: --token or --token-file")
                }
            };
            anyhow::ensure!(
                !args.server.is_empty(),
                "--name needs the server's address: --proxy-server (or --server)"
            );
            TokenSource::Bare {
                cluster: cluster.clone(),
                token,
                servers: args.server.clone(),
            }
        }
        (None, Some(f), _) => TokenSource::File(f),
        (None, None, Some(t)) => TokenSource::Literal(t),
        (None, None, None) => anyhow::bail!(
            "no join token: pass --token-file (or TOWER_JOIN_TOKEN_FILE); `towerctl join` writes one"
        ),
    };
    let kube_apiserver = match (args.kube_apiserver, args.kubernetes_service) {
        (Some(url), _) => url,
        (None, Some(hostport)) => format!("https://{hostport}"),
        (None, None) => "https://kubernetes.default.svc".into(),
    };
    let ks_apiserver = args.ks_apiserver.or(args
        .kubesphere_service
        .map(|hostport| format!("http://{hostport}")));
    let mut upstreams = vec![UpstreamConfig {
        name: UPSTREAM_KUBE_APISERVER.into(),
        url: kube_apiserver,
        ca_file: Some(args.kube_ca_file.clone()),
        token_file: Some(args.kube_token_file.clone()),
    }];
    if let Some(url) = ks_apiserver {
        upstreams.push(UpstreamConfig {
            name: UPSTREAM_KS_APISERVER.into(),
            url,
            ca_file: Some(args.ks_ca_file.unwrap_or(args.kube_ca_file)),
            token_file: Some(args.kube_token_file),
        });
    }
    let bare = matches!(token, TokenSource::Bare { .. });
    let mut config = AgentConfig::new(token, upstreams);
    if !args.server.is_empty() && !bare {
        config.servers_override = Some(args.server);
    }
    config.keepalive_interval = args
        .keepalive
        .or(args.keepalive_interval.map(Duration::from_secs_f64))
        .unwrap_or(Duration::from_secs(10));
    config.server_ca_file = args.server_ca_file;
    let explicit = args.proxy.as_deref().map(Proxy::parse).transpose()?;
    config.proxy = ProxySettings::from_env(explicit)?;
    config.host_key = args.host_key;
    if bare && config.host_key.is_none() {
        config.pin_store = Some(match args.host_key_pin_file {
            Some(f) => PinStoreConfig::File(f),
            None => {
                let namespace = match args.namespace {
                    Some(ns) => ns,
                    None => std::fs::read_to_string(SA_NAMESPACE_FILE)
                        .map(|ns| ns.trim().to_string())
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "the host-key pin Secret needs the agent's namespace: pass --namespace \
                                 (or POD_NAMESPACE), or --host-key-pin-file, or --host-key \
                                 (reading {SA_NAMESPACE_FILE}: {e})"
                            )
                        })?,
                };
                PinStoreConfig::Secret {
                    namespace,
                    name: args.host_key_pin_secret,
                }
            }
        });
    }
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

/// Where a pod's service-account namespace is mounted.
const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// A Go-style duration: `10s`, `1m30s`, `500ms`, `2h` (or plain seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs))
            .ok_or_else(|| format!("{s:?}: not a duration"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: a number needs a unit (h, m, s, ms)"))?;
        let (num, after) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| format!("{s:?}: not a duration"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use h, m, s or ms)")),
        };
        total += Duration::from_secs_f64(value * scale);
        rest = after;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2.5").unwrap(), Duration::from_millis(2500));
        for bad in ["", "x", "10q", "s", "-1"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// The exact flags KubeSphere 3.4 puts in its agent Deployment parse.
    #[test]
    fn kubesphere_agent_flags() {
        let args = Args::try_parse_from([
            "/agent",
            "--name=gondor",
            "--token=abc123",
            "--proxy-server=http://10.0.0.1:8080",
            "--keepalive=10s",
            "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80",
            "--kubernetes-service=kubernetes.default.svc:443",
            "--v=0",
        ])
        .unwrap();
        assert_eq!(args.name.as_deref(), Some("gondor"));
        assert_eq!(args.server, ["http://10.0.0.1:8080"]);
        assert_eq!(args.keepalive, Some(Duration::from_secs(10)));
    }
}
