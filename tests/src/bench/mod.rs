//! Direct-vs-tunnel benchmarks: the measuring code behind `tower-bench` and its smoke test.
//!
//! Every figure is measured straight to the member and through the gateway in
//! one run, with the same client, and reported as a ratio.
//!
//! The figures ([`Figure`]):
//! - small-GET latency p50/p99 (a ConfigMap GET) at 1 and at N concurrent clients;
//! - large-LIST throughput;
//! - N concurrent watches: event-delivery latency p50/p99 and a count of lost events;
//! - pure tunnel capacity against a fast in-process HTTPS upstream, versus raw loopback TCP;
//! - resident memory of a separate `tower-server` process per idle agent;
//! - reconnect time of N agents after that server process restarts;
//! - another client's small-GET latency while one client holds its full share
//!   of unread streams, and the server process's memory meanwhile;
//! - small-GET latency beside a port-forward moving bulk data, the port-forward
//!   straight to the member or through the tunnel, and its rate (kwok plays the node);
//! - the agent's transports: small-GET latency and large-LIST throughput with
//!   the agent on SSH inside a WebSocket (`ws://`, `wss://`) versus raw SSH.
//!
//! Clients are raw hyper HTTP/2 clients over rustls, built the same way for both
//! paths; only the endpoint differs. Direct requests carry the agent's own
//! service-account token, so the apiserver does the same work either way.
//! The request-path figures run the server and agents in this process; the
//! memory and reconnect figures run the real `tower-server` binary.

use std::time::{Duration, Instant};

mod client;
mod env;
mod idle;
mod latency;
pub mod port_forward;
mod report;
mod share;
mod throughput;
mod transport;
mod watch;

pub use client::{Endpoint, H2};
pub use env::Env;
pub use latency::get_latencies;
pub use report::{Report, Row, loadavg, machine, percentile};
pub use throughput::{bulk_h1, bulk_h2, process_cpu, raw_tcp};
pub use watch::{WatchOutcome, watch_phase};

/// Cluster served by the agent in front of the member kube-apiserver.
pub(crate) const CLUSTER: &str = "bench";
/// Cluster served by the agent in front of the synthetic byte upstream.
pub(crate) const SYNTH: &str = "synth";
/// Namespace of the benchmark objects on the member.
pub(crate) const NS: &str = "bench";
/// HTTP/2 streams per client connection for watches: the test bed's
/// kube-apiserver advertises `SETTINGS_MAX_CONCURRENT_STREAMS` = 100, and a
/// watch holds its stream open.
pub(crate) const WATCHES_PER_CONN: usize = 100;
/// Windows of the benchmark's HTTP/2 client (those of client-go's transport).
pub(crate) const CLIENT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CLIENT_CONN_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MIB: f64 = 1024.0 * 1024.0;

/// One benchmark figure (a group of rows in the report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    Get,
    List,
    Watch,
    Tunnel,
    Memory,
    Reconnect,
    Share,
    PortForward,
    Transport,
}

impl Figure {
    pub const ALL: [Figure; 9] = [
        Figure::Get,
        Figure::List,
        Figure::Watch,
        Figure::Tunnel,
        Figure::Memory,
        Figure::Reconnect,
        Figure::Share,
        Figure::PortForward,
        Figure::Transport,
    ];

    pub fn parse(s: &str) -> Option<Figure> {
        Some(match s {
            "get" => Figure::Get,
            "list" => Figure::List,
            "watch" => Figure::Watch,
            "tunnel" => Figure::Tunnel,
            "memory" => Figure::Memory,
            "reconnect" => Figure::Reconnect,
            "share" => Figure::Share,
            "port-forward" => Figure::PortForward,
            "transport" => Figure::Transport,
            _ => return None,
        })
    }

    pub(crate) fn needs_testbed(self) -> bool {
        matches!(
            self,
            Figure::Get | Figure::List | Figure::Watch | Figure::Transport
        )
    }
}

/// How big each figure is.
#[derive(Clone, Debug)]
pub struct Size {
    pub name: &'static str,
    /// GETs per round at one client.
    pub get_serial: usize,
    /// Concurrent clients for the second GET figure, and GETs per client per round.
    pub get_clients: usize,
    pub get_per_client: usize,
    /// Rounds, alternating direct and tunnel.
    pub get_rounds: usize,
    /// Bytes of ConfigMaps to LIST, and the size of each.
    pub list_bytes: usize,
    pub list_object_bytes: usize,
    pub list_rounds: usize,
    /// Concurrent watches, events written, and the pause between events.
    pub watches: usize,
    pub watch_events: usize,
    pub watch_interval: Duration,
    /// Bytes through one stream; streams and bytes per stream for the parallel case.
    pub bulk_single: u64,
    pub bulk_streams: usize,
    pub bulk_per_stream: u64,
    pub bulk_rounds: usize,
    /// Idle-agent counts at which server memory is read.
    pub idle_agents: Vec<usize>,
    /// Agents that reconnect after the server restarts.
    pub reconnect_agents: usize,
    /// Small GETs per round, and rounds, quiet and beside a full share.
    pub share_gets: usize,
    pub share_rounds: usize,
    /// Small GETs per round, and rounds, beside a port-forward straight and through the tunnel.
    pub pf_gets: usize,
    pub pf_rounds: usize,
}

impl Size {
    /// The published figures.
    pub fn full() -> Self {
        Size {
            name: "full",
            get_serial: 500,
            get_clients: 64,
            get_per_client: 50,
            get_rounds: 4,
            list_bytes: 52 * 1024 * 1024,
            list_object_bytes: 16 * 1024,
            list_rounds: 9,
            watches: 1000,
            watch_events: 30,
            watch_interval: Duration::from_millis(100),
            bulk_single: 512 * 1024 * 1024,
            bulk_streams: 16,
            bulk_per_stream: 32 * 1024 * 1024,
            bulk_rounds: 3,
            idle_agents: vec![1, 100, 1000],
            reconnect_agents: 100,
            share_gets: 500,
            share_rounds: 4,
            pf_gets: 400,
            pf_rounds: 3,
        }
    }

    /// Every figure at a tiny size: seconds, for the smoke test.
    pub fn small() -> Self {
        Size {
            name: "small",
            get_serial: 20,
            get_clients: 64,
            get_per_client: 2,
            get_rounds: 1,
            list_bytes: 1024 * 1024,
            list_object_bytes: 16 * 1024,
            list_rounds: 1,
            watches: 20,
            watch_events: 5,
            watch_interval: Duration::from_millis(20),
            bulk_single: 4 * 1024 * 1024,
            bulk_streams: 16,
            bulk_per_stream: 256 * 1024,
            bulk_rounds: 1,
            idle_agents: vec![1, 5],
            reconnect_agents: 5,
            share_gets: 20,
            share_rounds: 1,
            pf_gets: 20,
            pf_rounds: 1,
        }
    }
}

/// Runs the `figures` at `size`, printing rows as they come.
pub async fn run(size: &Size, figures: &[Figure]) -> anyhow::Result<Report> {
    let mut report = Report::default();
    eprintln!("tower-bench: size {}; {}", size.name, machine());
    let env = Env::start(figures).await?;
    if figures.iter().any(|f| f.needs_testbed()) {
        env::setup_namespace(env.member()).await?;
    }
    for fig in figures {
        let started = Instant::now();
        eprintln!("\n== {fig:?}");
        match fig {
            Figure::Get => latency::small_get(&env, size, &mut report).await?,
            Figure::List => throughput::large_list(&env, size, &mut report).await?,
            Figure::Watch => watch::watches(&env, size, &mut report).await?,
            Figure::Tunnel => throughput::tunnel_capacity(&env, size, &mut report).await?,
            Figure::Share => share::beside_a_full_share(size, &mut report).await?,
            Figure::PortForward => port_forward::beside_a_port_forward(size, &mut report).await?,
            Figure::Transport => transport::websocket_vs_ssh(&env, size, &mut report).await?,
            Figure::Memory | Figure::Reconnect => {}
        }
        if !matches!(fig, Figure::Memory | Figure::Reconnect) {
            eprintln!("   ({fig:?} took {:.1?})", started.elapsed());
        }
    }
    let memory = figures.contains(&Figure::Memory);
    let reconnect = figures.contains(&Figure::Reconnect);
    if memory || reconnect {
        let started = Instant::now();
        eprintln!("\n== Memory and reconnect (separate tower-server process)");
        idle::agents_on_a_server_process(&env, size, memory, reconnect, &mut report).await?;
        eprintln!("   (took {:.1?})", started.elapsed());
    }
    report
        .notes
        .push(format!("load average after: {}", loadavg()));
    Ok(report)
}
