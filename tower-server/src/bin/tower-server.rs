//! `tower-server`: runs the SSH listener for agents and the HTTPS gateway.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tower_server::ControllerConfig;
use tower_server::{Server, ServerConfig};

/// Tower server: accepts agents over SSH and proxies clients to member clusters.
#[derive(Parser, Debug)]
#[command(version = tower_ops::VERSION, about)]
struct Args {
    /// Address the SSH listener for agents binds.
    #[arg(long, env = "TOWER_SSH_LISTEN", default_value = "0.0.0.0:7022")]
    ssh_listen: String,
    /// Address the HTTPS gateway binds.
    #[arg(long, env = "TOWER_GATEWAY_LISTEN", default_value = "0.0.0.0:8443")]
    gateway_listen: String,
    /// Address of the agents' WebSocket port: SSH inside a WebSocket, `ws://`
    /// and `wss://` (with the gateway's serving certificate) on one port, for
    /// agents behind HTTP proxies or allowed out only on 443. Empty: off.
    #[arg(long, env = "TOWER_WEBSOCKET_LISTEN", default_value = "")]
    websocket_listen: String,
    /// State directory: CA, SSH host key, token store.
    #[arg(long, env = "TOWER_STATE_DIR", default_value = "/var/lib/tower")]
    state_dir: PathBuf,
    /// URL clients use to reach the gateway; written into kubeconfigs.
    #[arg(
        long,
        env = "TOWER_GATEWAY_URL",
        default_value = "https://tower.kubesphere-system.svc:8443"
    )]
    gateway_url: String,
    /// Extra DNS names or IPs for the gateway certificate (comma-separated).
    #[arg(
        long,
        env = "TOWER_GATEWAY_HOSTS",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,tower.kubesphere-system.svc"
    )]
    gateway_hosts: Vec<String>,
    /// Keepalive interval towards agents, in seconds.
    #[arg(long, env = "TOWER_KEEPALIVE_INTERVAL", default_value_t = 10.0)]
    keepalive_interval: f64,
    /// Unanswered keepalives before an agent is declared dead.
    #[arg(long, env = "TOWER_KEEPALIVE_MAX", default_value_t = 3)]
    keepalive_max: usize,
    /// Work with Kubernetes: identity in Secrets, tokens from proxy Clusters and
    /// Agents, kubeconfigs and conditions written back. Without it, the server is
    /// standalone and keeps everything in --state-dir.
    #[arg(long, env = "TOWER_KUBERNETES")]
    kubernetes: bool,
    /// Namespace of the server's Secrets, Lease and info ConfigMap (Kubernetes mode).
    #[arg(long, env = "TOWER_NAMESPACE", default_value = "kubesphere-system")]
    namespace: String,
    /// Kubernetes mode: how long a replica's Leases (the leader's, and its own
    /// membership Lease) last unrenewed, in seconds. A replica that stops
    /// renewing (killed, paused, cut off) no longer counts after it.
    #[arg(long, env = "TOWER_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..))]
    lease_duration: u64,
    /// Kubernetes mode: how often the Leases are renewed, in seconds (less
    /// than --lease-duration).
    #[arg(long, env = "TOWER_LEASE_RENEW", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    lease_renew: u64,
    /// This replica's name (Kubernetes mode; the pod name).
    #[arg(long, env = "POD_NAME", default_value = "tower-server")]
    replica: String,
    /// SSH address(es) agents dial, published for `towerctl join` (Kubernetes mode).
    #[arg(long, env = "TOWER_SSH_ADDRESS", value_delimiter = ',')]
    ssh_address: Vec<String>,
    /// Address of the operations endpoints (/healthz, /readyz, /metrics); empty disables them.
    #[arg(long, env = "TOWER_OPS_LISTEN", default_value = "0.0.0.0:9090")]
    ops_listen: String,
    /// Let any client certificate from the tower CA reach every cluster. By
    /// default a certificate reaches only the cluster it was issued for
    /// (`CN=tower:<cluster>`, as in every synthesized kubeconfig).
    #[arg(long, env = "TOWER_GATEWAY_ANY_CLUSTER")]
    gateway_any_cluster: bool,
    /// KubeSphere mode (with --kubernetes): for each Cluster KubeSphere's own
    /// tower would serve (type proxy, joinFederation true), assign ports,
    /// create Service mc-<cluster>, write its endpoints and kubeconfig, and
    /// serve its kube listener (HTTPS) and ks listener (plain HTTP) on them.
    #[arg(long, env = "TOWER_KUBESPHERE", requires = "kubernetes")]
    kubesphere: bool,
    /// KubeSphere mode: the range kube ports come from, FIRST-LAST; each
    /// cluster's ks port is 10000 above its kube port.
    #[arg(long, env = "TOWER_KUBESPHERE_PORTS", default_value = "6000-7000", value_parser = parse_port_range)]
    kubesphere_ports: std::ops::RangeInclusive<u16>,
    /// KubeSphere mode: which Clusters to take. `all`: every one KubeSphere's
    /// tower would serve. `marked`: while a Go tower still serves this host,
    /// only those `towerctl migrate` has annotated
    /// `tower.kubesphere.io/served-by=tower-server`; the others are left to
    /// the Go tower (their agents may connect, nothing of them is written).
    #[arg(long, env = "TOWER_KUBESPHERE_ADOPT", default_value = "all")]
    kubesphere_adopt: tower_server::kube::Adopt,
    /// KubeSphere mode: the labels Services mc-<cluster> select this server's
    /// pods by, KEY=VALUE,... (KubeSphere's tower pods carry the default; while
    /// a Go tower runs, give this server's pods labels of their own).
    #[arg(
        long,
        env = "TOWER_KUBESPHERE_POD_SELECTOR",
        default_value = "app=tower,app.kubernetes.io/name=tower",
        value_parser = parse_selector
    )]
    kubesphere_pod_selector: Selector,
    /// KubeSphere mode: the address the per-cluster listeners bind.
    #[arg(long, env = "TOWER_KUBESPHERE_LISTEN_HOST", default_value = "0.0.0.0")]
    kubesphere_listen_host: std::net::IpAddr,
    /// Requests one client (a client certificate, or none, from one address)
    /// may have in flight to one cluster, watches and exec/port-forward
    /// streams included; past it the client gets 429 with Retry-After.
    #[arg(long, env = "TOWER_CLIENT_STREAMS", default_value_t = tower_server::gateway::DEFAULT_CLIENT_STREAMS)]
    client_streams: usize,
    /// Requests all clients together may have in flight to one cluster (at
    /// most 2047). Each may hold up to 1 MiB of response its client has not
    /// read, so this bounds what one cluster's clients can make the server
    /// hold; past it clients get 429 with Retry-After.
    #[arg(long, env = "TOWER_CLUSTER_STREAMS", default_value_t = tower_server::gateway::DEFAULT_CLUSTER_STREAMS)]
    cluster_streams: usize,
    /// Kubernetes mode: where this replica takes requests other replicas
    /// forward to it (ADDR:PORT; empty: no peer forwarding). With several
    /// replicas, a request reaching one whose cluster's session another
    /// holds is carried there; keep this port off public Services.
    #[arg(long, env = "TOWER_PEER_LISTEN", default_value = "")]
    peer_listen: String,
    /// Kubernetes mode: where other replicas reach this one's peer listener,
    /// HOST[:PORT] (usually the pod IP; a bare host takes the port
    /// --peer-listen bound). Published in this replica's Lease.
    #[arg(long, env = "TOWER_PEER_ADDRESS", default_value = "")]
    peer_address: String,
    /// Kubernetes mode: when stopped, this replica first asks its agents to
    /// move to the other replicas (each opens its new session before it
    /// leaves this one), at most this many a second.
    #[arg(long, env = "TOWER_HAND_OFF_RATE", default_value_t = 100)]
    hand_off_rate: u32,
    /// Kubernetes mode: the longest a stopping replica waits for its agents
    /// to move, in seconds (0: no hand-off, sessions are closed at once).
    /// Keep it under the pod's termination grace period, less 10 s.
    #[arg(long, env = "TOWER_HAND_OFF_TIMEOUT", default_value_t = 20)]
    hand_off_timeout: u64,
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
    /// Print the bound ports on stdout (`ssh=… gateway=…`), for scripts binding port 0.
    #[arg(long, env = "TOWER_PRINT_PORTS", hide = true)]
    print_ports: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tower_ops::init_logging(args.log_format, "info");
    tower_ops::splice::start(args.splice_nice)
        .map_err(|e| anyhow::anyhow!("starting the threads that copy upgraded streams: {e}"))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = ServerConfig::new(&args.state_dir, &args.gateway_url);
    config.gateway_hosts = args.gateway_hosts;
    config.keepalive_interval = Duration::from_secs_f64(args.keepalive_interval);
    config.keepalive_max = args.keepalive_max;
    config.gateway_client_bound_to_cluster = !args.gateway_any_cluster;
    config.cluster_listen_host = args.kubesphere_listen_host;
    config.client_streams = args.client_streams;
    config.cluster_streams = args.cluster_streams;
    config.hand_off_rate = args.hand_off_rate;
    config.hand_off_timeout = Duration::from_secs(args.hand_off_timeout);
    let ssh = tokio::net::TcpListener::bind(&args.ssh_listen)
        .await
        .with_context(|| format!("binding SSH listener {}", args.ssh_listen))?;
    let gateway = tokio::net::TcpListener::bind(&args.gateway_listen)
        .await
        .with_context(|| format!("binding gateway {}", args.gateway_listen))?;
    let ops = if args.ops_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&args.ops_listen)
                .await
                .with_context(|| format!("binding ops endpoints {}", args.ops_listen))?,
        )
    };
    let websocket = if args.websocket_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&args.websocket_listen)
                .await
                .with_context(|| format!("binding WebSocket port {}", args.websocket_listen))?,
        )
    };
    let peer = if args.peer_listen.is_empty() {
        None
    } else {
        anyhow::ensure!(
            args.kubernetes,
            "--peer-listen needs --kubernetes: replicas find each other through Leases"
        );
        anyhow::ensure!(
            !args.peer_address.is_empty(),
            "--peer-listen needs --peer-address (where other replicas reach this one, usually the pod IP)"
        );
        let listener = tokio::net::TcpListener::bind(&args.peer_listen)
            .await
            .with_context(|| format!("binding peer listener {}", args.peer_listen))?;
        config.peer_address = Some(tower_server::peer::peer_address(
            &args.peer_address,
            listener.local_addr()?.port(),
        ));
        Some(listener)
    };
    let mut ports = format!(
        "ssh={} gateway={}",
        ssh.local_addr()?.port(),
        gateway.local_addr()?.port()
    );
    if let Some(ws) = &websocket {
        ports.push_str(&format!(" websocket={}", ws.local_addr()?.port()));
    }
    if let Some(peer) = &peer {
        ports.push_str(&format!(" peer={}", peer.local_addr()?.port()));
    }
    if let Some(ops) = &ops {
        ports.push_str(&format!(" ops={}", ops.local_addr()?.port()));
    }
    let listeners = tower_server::Listeners {
        ssh,
        gateway,
        websocket,
        peer,
    };
    let shutdown = tower_ops::shutdown_on_signal();
    if args.kubernetes {
        if args.print_ports {
            // The identity comes from Secrets inside the run; the ports are bound.
            println!("{ports}");
        }
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (in-cluster or $KUBECONFIG)")?;
        anyhow::ensure!(
            args.lease_renew < args.lease_duration,
            "--lease-renew ({}s) must be shorter than --lease-duration ({}s)",
            args.lease_renew,
            args.lease_duration
        );
        let mut ctrl = ControllerConfig::new(args.namespace, args.replica);
        ctrl.lease_duration = Duration::from_secs(args.lease_duration);
        ctrl.lease_renew = Duration::from_secs(args.lease_renew);
        ctrl.ssh_addresses = args.ssh_address;
        if args.kubesphere {
            ctrl.kubesphere = Some(tower_server::kube::KubeSphereConfig {
                ports: args.kubesphere_ports,
                adopt: args.kubesphere_adopt,
                pod_selector: args.kubesphere_pod_selector.0,
            });
        }
        return tower_server::run_listeners_with_kubernetes(
            config, ctrl, client, listeners, ops, shutdown,
        )
        .await;
    }
    let server = Server::open(config)
        .with_context(|| format!("opening state dir {}", args.state_dir.display()))?;
    if args.print_ports {
        // After the state dir is open: the host key and CA exist by now.
        println!("{ports}");
    }
    if let Some(ops) = ops {
        let (server, shutdown) = (server.clone(), shutdown.clone());
        tokio::spawn(async move { server.serve_ops(ops, shutdown).await });
    }
    server.run_with(listeners, shutdown).await
}

/// `FIRST-LAST`, both ports, FIRST <= LAST, and LAST + 10000 still a port.
fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 6000-7000"))?;
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("{p:?}: not a port: {e}"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a == 0 || a > b {
        return Err(format!("{s:?}: FIRST must be at least 1 and at most LAST"));
    }
    if b.checked_add(tower_server::kube::KS_PORT_OFFSET).is_none() {
        return Err(format!(
            "{s:?}: LAST + {} must be a port (at most 65535)",
            tower_server::kube::KS_PORT_OFFSET
        ));
    }
    Ok(a..=b)
}

/// Labels as `KEY=VALUE,...`.
#[derive(Clone, Debug)]
struct Selector(Vec<(String, String)>);

fn parse_selector(s: &str) -> Result<Selector, String> {
    let labels = s
        .split(',')
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| format!("{l:?}: expected KEY=VALUE"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return Err(format!("{l:?}: the label key is empty"));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if labels.is_empty() {
        return Err("at least one KEY=VALUE: a Service selecting every pod would be wrong".into());
    }
    Ok(Selector(labels))
}
