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
//! - reconnect time of N agents after that server process restarts.
//!
//! Clients are raw hyper HTTP/2 clients over rustls, built the same way for both
//! paths; only the endpoint differs. Direct requests carry the agent's own
//! service-account token, so the apiserver does the same work either way.
//! The request-path figures run the server and agents in this process; the
//! memory and reconnect figures run the real `tower-server` binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower_agent::{Agent, AgentConfig, AgentStatus, TokenSource, UpstreamConfig};
use tower_proto::names::UPSTREAM_KUBE_APISERVER;

use crate::fixture::{TowerAgent, TowerServer, agent_credential, identity_from_kubeconfig, raw};
use crate::testbed::{ControlPlane, Process, Testbed, install_crypto_provider, log_tail};

/// Cluster served by the agent in front of the member kube-apiserver.
const CLUSTER: &str = "bench";
/// Cluster served by the agent in front of the synthetic byte upstream.
const SYNTH: &str = "synth";
/// Namespace of the benchmark objects on the member.
const NS: &str = "bench";
/// HTTP/2 streams per client connection for watches: the test bed's
/// kube-apiserver advertises `SETTINGS_MAX_CONCURRENT_STREAMS` = 100, and a
/// watch holds its stream open.
const WATCHES_PER_CONN: usize = 100;
/// Windows of the benchmark's HTTP/2 client (those of client-go's transport).
const CLIENT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CLIENT_CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// Chunk the synthetic upstream and the raw-TCP sender write.
const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];
const MIB: f64 = 1024.0 * 1024.0;

/// One benchmark figure (a group of rows in the report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    Get,
    List,
    Watch,
    Tunnel,
    Memory,
    Reconnect,
}

impl Figure {
    pub const ALL: [Figure; 6] = [
        Figure::Get,
        Figure::List,
        Figure::Watch,
        Figure::Tunnel,
        Figure::Memory,
        Figure::Reconnect,
    ];

    pub fn parse(s: &str) -> Option<Figure> {
        Some(match s {
            "get" => Figure::Get,
            "list" => Figure::List,
            "watch" => Figure::Watch,
            "tunnel" => Figure::Tunnel,
            "memory" => Figure::Memory,
            "reconnect" => Figure::Reconnect,
            _ => return None,
        })
    }

    fn needs_testbed(self) -> bool {
        matches!(self, Figure::Get | Figure::List | Figure::Watch)
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
        }
    }
}

// === report ===

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Row {
    pub figure: String,
    pub direct: String,
    pub tunnel: String,
    /// Tunnel over direct (for throughput, tunnel/direct too: higher is better).
    pub ratio: Option<f64>,
    pub goal: String,
    /// Whether the goal is met, when there is one.
    pub met: Option<bool>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Counts that must hold whatever the timing: (what, expected, got).
    pub counts: Vec<(String, u64, u64)>,
    pub notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        figure: impl Into<String>,
        direct: impl Into<String>,
        tunnel: impl Into<String>,
        ratio: Option<f64>,
        goal: impl Into<String>,
        met: Option<bool>,
    ) {
        let row = Row {
            figure: figure.into(),
            direct: direct.into(),
            tunnel: tunnel.into(),
            ratio,
            goal: goal.into(),
            met,
        };
        eprintln!(
            "  {:<48} direct {:>14}  tunnel {:>14}  ratio {:>6}  goal {}",
            row.figure,
            row.direct,
            row.tunnel,
            row.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
            row.goal
        );
        self.rows.push(row);
    }

    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| figure | direct | tunnel | tunnel/direct | goal | met |\n| --- | ---: | ---: | ---: | --- | --- |\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.figure,
                r.direct,
                r.tunnel,
                r.ratio
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "—".into()),
                r.goal,
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                }
            ));
        }
        out
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib_s(bytes_per_s: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_s / MIB)
}

/// Nearest-rank percentile of a sorted slice.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The machine: cores, memory, load average.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({model}), {:.1} GiB memory, load average {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        loadavg()
    )
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// === HTTP/2 client ===

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

async fn drain(mut body: Incoming) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

// === the environment ===

/// The test bed, the in-process server, the agents and the synthetic upstream.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub bed: Option<Testbed>,
    pub member: Option<ControlPlane>,
    pub server: TowerServer,
    pub synth: ByteUpstream,
    pub direct: Option<Arc<Endpoint>>,
    pub tunnel: Option<Arc<Endpoint>>,
    pub synth_tunnel: Arc<Endpoint>,
    _agents: Vec<TowerAgent>,
}

impl Env {
    /// Starts everything `figures` need (the test bed only when a figure uses the apiserver).
    pub async fn start(figures: &[Figure]) -> anyhow::Result<Env> {
        install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let server = TowerServer::start(&dir.path().join("server")).await?;
        let synth = ByteUpstream::start(dir.path()).await?;
        let mut agents = Vec::new();
        let synth_token = server.mint(SYNTH, None)?;
        agents.push(TowerAgent::start_with(
            TokenSource::Literal(synth_token.encode()),
            vec![synth.upstream(UPSTREAM_KUBE_APISERVER)],
        )?);
        let (mut bed, mut member, mut direct, mut tunnel) = (None, None, None, None);
        if figures.iter().any(|f| f.needs_testbed()) {
            let started = Instant::now();
            let b = Testbed::start().await?;
            let m = b.cluster("member").await?;
            let (sa_token, sa_token_file) = agent_credential(&m, dir.path()).await?;
            let token = server.mint(CLUSTER, None)?;
            agents.push(TowerAgent::start(
                TokenSource::Literal(token.encode()),
                &m,
                &sa_token_file,
            )?);
            let port = m.port();
            let mut bearer = HeaderValue::from_str(&format!("Bearer {sa_token}"))?;
            bearer.set_sensitive(true);
            direct = Some(Arc::new(Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                ca_pem: m.ca_pem.clone(),
                identity: None,
                bearer: Some(bearer),
                prefix: String::new(),
            }));
            tunnel = Some(Arc::new(gateway_endpoint(&server, CLUSTER)?));
            eprintln!(
                "test bed up in {:.1?}: member kube-apiserver {}",
                started.elapsed(),
                m.url
            );
            bed = Some(b);
            member = Some(m);
        }
        for name in [SYNTH, CLUSTER] {
            if name == CLUSTER && member.is_none() {
                continue;
            }
            anyhow::ensure!(
                server
                    .wait_connected(name, true, Duration::from_secs(30))
                    .await,
                "agent for {name} did not connect"
            );
        }
        let synth_tunnel = Arc::new(gateway_endpoint(&server, SYNTH)?);
        Ok(Env {
            dir,
            bed,
            member,
            server,
            synth,
            direct,
            tunnel,
            synth_tunnel,
            _agents: agents,
        })
    }

    fn member(&self) -> &ControlPlane {
        self.member.as_ref().expect("started with the test bed")
    }

    fn pair(&self) -> (Arc<Endpoint>, Arc<Endpoint>) {
        (
            self.direct.clone().expect("started with the test bed"),
            self.tunnel.clone().expect("started with the test bed"),
        )
    }
}

fn gateway_endpoint(server: &TowerServer, cluster: &str) -> anyhow::Result<Endpoint> {
    let id = identity_from_kubeconfig(&server.server.kubeconfig(cluster)?)?;
    Ok(Endpoint {
        addr: server.gateway_addr,
        ca_pem: server.server.ca_pem().to_string(),
        identity: Some((id.cert_pem, id.key_pem)),
        bearer: None,
        prefix: format!("/clusters/{cluster}"),
    })
}

/// Runs the `figures` at `size`, printing rows as they come.
pub async fn run(size: &Size, figures: &[Figure]) -> anyhow::Result<Report> {
    let mut report = Report::default();
    eprintln!("tower-bench: size {}; {}", size.name, machine());
    let env = Env::start(figures).await?;
    if figures.iter().any(|f| f.needs_testbed()) {
        setup_namespace(env.member()).await?;
    }
    for fig in figures {
        let started = Instant::now();
        eprintln!("\n== {fig:?}");
        match fig {
            Figure::Get => small_get(&env, size, &mut report).await?,
            Figure::List => large_list(&env, size, &mut report).await?,
            Figure::Watch => watches(&env, size, &mut report).await?,
            Figure::Tunnel => tunnel_capacity(&env, size, &mut report).await?,
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
        agents_on_a_server_process(&env, size, memory, reconnect, &mut report).await?;
        eprintln!("   (took {:.1?})", started.elapsed());
    }
    report
        .notes
        .push(format!("load average after: {}", loadavg()));
    Ok(report)
}

async fn setup_namespace(member: &ControlPlane) -> anyhow::Result<()> {
    let client = member.client().await?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let api: Api<ConfigMap> = Api::namespaced(client, NS);
    for name in ["small", "tick"] {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some([("seq".to_string(), "init".to_string())].into()),
            ..Default::default()
        };
        api.patch(
            name,
            &PatchParams::apply("tower-bench").force(),
            &Patch::Apply(&cm),
        )
        .await?;
    }
    Ok(())
}

// === small GET ===

async fn small_get(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let (direct, tunnel) = env.pair();
    let path = format!("/api/v1/namespaces/{NS}/configmaps/small");
    // Warm up both paths at full concurrency (connections, the agent's upstream
    // pool, apiserver caches), so no round pays for TLS handshakes.
    get_latencies(&direct, size.get_clients, 5, &path).await?;
    get_latencies(&tunnel, size.get_clients, 5, &path).await?;
    for (clients, per_client) in [
        (1, size.get_serial),
        (size.get_clients, size.get_per_client),
    ] {
        let (mut d, mut t) = (Vec::new(), Vec::new());
        for _ in 0..size.get_rounds {
            d.extend(get_latencies(&direct, clients, per_client, &path).await?);
            t.extend(get_latencies(&tunnel, clients, per_client, &path).await?);
        }
        d.sort();
        t.sort();
        for (label, p, goal) in [("p50", 0.50, 1.10), ("p99", 0.99, 1.25)] {
            let (dp, tp) = (percentile(&d, p), percentile(&t, p));
            let ratio = tp.as_secs_f64() / dp.as_secs_f64().max(1e-9);
            report.row(
                format!(
                    "small GET {label}, {clients} client{} ({} GETs each way)",
                    if clients == 1 { "" } else { "s" },
                    d.len()
                ),
                ms(dp),
                ms(tp),
                Some(ratio),
                format!("≤ {goal:.2}"),
                Some(ratio <= goal),
            );
        }
    }
    Ok(())
}

/// Latencies of `per_client` sequential GETs from each of `clients` connections, all at once.
pub async fn get_latencies(
    ep: &Arc<Endpoint>,
    clients: usize,
    per_client: usize,
    path: &str,
) -> anyhow::Result<Vec<Duration>> {
    let conns = futures::future::try_join_all((0..clients).map(|_| ep.connect())).await?;
    let mut set = JoinSet::new();
    for mut c in conns {
        let path = path.to_string();
        set.spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = Instant::now();
                tokio::time::timeout(Duration::from_secs(30), c.get_drain(&path))
                    .await
                    .context("GET timed out")??;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut out = Vec::with_capacity(clients * per_client);
    while let Some(r) = set.join_next().await {
        out.extend(r??);
    }
    Ok(out)
}

// === large LIST ===

async fn large_list(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let (direct, tunnel) = env.pair();
    let client = env.member().client().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, NS);
    let count = size.list_bytes.div_ceil(size.list_object_bytes);
    let value = "x".repeat(size.list_object_bytes);
    let started = Instant::now();
    let results: Vec<kube::Result<()>> = futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let value = value.clone();
            async move {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("list-{i:05}")),
                        labels: Some([("bench".to_string(), "list".to_string())].into()),
                        ..Default::default()
                    },
                    data: Some([("v".to_string(), value)].into()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<kube::Result<Vec<_>>>()?;
    eprintln!(
        "   created {count} ConfigMaps of {} KiB in {:.1?}",
        size.list_object_bytes / 1024,
        started.elapsed()
    );
    let path = format!("/api/v1/namespaces/{NS}/configmaps?labelSelector=bench%3Dlist");
    let (mut dc, mut tc) = (direct.connect().await?, tunnel.connect().await?);
    // Warm-up: one LIST each way.
    let (dn, tn) = (dc.get_drain(&path).await?, tc.get_drain(&path).await?);
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..size.list_rounds {
        for (conn, out) in [(&mut dc, &mut d), (&mut tc, &mut t)] {
            let start = Instant::now();
            let n = tokio::time::timeout(Duration::from_secs(300), conn.get_drain(&path))
                .await
                .context("LIST timed out")??;
            out.push(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    let (dr, tr) = (median_f64(d), median_f64(t));
    let ratio = tr / dr;
    report.row(
        format!(
            "large LIST throughput ({:.1} MiB, {count} objects, median of {})",
            tn as f64 / MIB,
            size.list_rounds
        ),
        mib_s(dr),
        mib_s(tr),
        Some(ratio),
        "≥ 0.90",
        Some(ratio >= 0.90),
    );
    report
        .counts
        .push(("LIST bytes, tunnel vs direct".into(), dn, tn));
    Ok(())
}

// === watches ===

/// What one watch phase saw.
#[derive(Debug, Default)]
pub struct WatchOutcome {
    pub latencies: Vec<Duration>,
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub failed_watches: usize,
    pub setup: Duration,
}

async fn watches(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let (direct, tunnel) = env.pair();
    let api: Api<ConfigMap> = Api::namespaced(env.member().client().await?, NS);
    let mut outcomes = Vec::new();
    for (label, ep) in [("direct", &direct), ("tunnel", &tunnel)] {
        let o = watch_phase(ep, &api, size).await?;
        eprintln!(
            "   {label}: {} watches open in {:.2?}; {} of {} events delivered, {} duplicates, {} watches failed",
            size.watches, o.setup, o.received, o.expected, o.duplicates, o.failed_watches
        );
        outcomes.push(o);
    }
    let (d, t) = (&outcomes[0], &outcomes[1]);
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (dp, tp) = (percentile(&d.latencies, p), percentile(&t.latencies, p));
        let ratio = tp.as_secs_f64() / dp.as_secs_f64().max(1e-9);
        report.row(
            format!("{} watches: event delivery {label}", size.watches),
            ms(dp),
            ms(tp),
            Some(ratio),
            "no goal set",
            None,
        );
    }
    report.row(
        format!(
            "{} watches × {} events: delivered",
            size.watches, size.watch_events
        ),
        format!("{}/{}", d.received, d.expected),
        format!("{}/{}", t.received, t.expected),
        None,
        "zero lost",
        Some(t.received == t.expected && t.failed_watches == 0),
    );
    report.counts.push((
        format!("{} watches: events delivered direct", size.watches),
        d.expected,
        d.received,
    ));
    report.counts.push((
        format!(
            "{} watches: events delivered through the tunnel",
            size.watches
        ),
        t.expected,
        t.received,
    ));
    Ok(())
}

/// Opens `size.watches` watches on the `tick` ConfigMap through `ep`, writes
/// `size.watch_events` updates directly, and measures when each watch sees each.
pub async fn watch_phase(
    ep: &Arc<Endpoint>,
    writer: &Api<ConfigMap>,
    size: &Size,
) -> anyhow::Result<WatchOutcome> {
    let (watchers, events) = (size.watches, size.watch_events);
    let rv = writer
        .get("tick")
        .await?
        .metadata
        .resource_version
        .context("tick has no resourceVersion")?;
    let path = format!(
        "/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dtick&timeoutSeconds=600"
    );
    let conns = futures::future::try_join_all(
        (0..watchers.div_ceil(WATCHES_PER_CONN)).map(|_| ep.connect()),
    )
    .await?;
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..events).map(|_| AtomicU64::new(0)).collect());
    let budget = Duration::from_secs(120) + size.watch_interval * events as u32;
    let deadline = tokio::time::Instant::now() + budget;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(watchers);
    let mut set = JoinSet::new();
    for i in 0..watchers {
        let mut conn = conns[i % conns.len()].clone();
        let (path, sent, ready) = (path.clone(), sent.clone(), ready_tx.clone());
        set.spawn(async move {
            let resp = match tokio::time::timeout_at(deadline, conn.get(&path)).await {
                Ok(Ok(r)) if r.status() == 200 => r,
                _ => {
                    let _ = ready.send(false).await;
                    return (0u64, 0u64, Vec::new(), false);
                }
            };
            let _ = ready.send(true).await;
            drop(ready);
            let mut body = resp.into_body();
            let mut seen = vec![false; events];
            let (mut got, mut dups) = (0u64, 0u64);
            let mut lat = Vec::with_capacity(events);
            let mut buf: Vec<u8> = Vec::new();
            while (got as usize) < events {
                let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(Some(Ok(f))) => f,
                    _ => break,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let now = base.elapsed();
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let Some(seq) = event_seq(&line) else {
                        continue;
                    };
                    if seq >= events {
                        continue;
                    }
                    if seen[seq] {
                        dups += 1;
                        continue;
                    }
                    seen[seq] = true;
                    got += 1;
                    let at = Duration::from_nanos(sent[seq].load(Ordering::SeqCst));
                    lat.push(now.saturating_sub(at));
                }
            }
            (got, dups, lat, true)
        });
    }
    drop(ready_tx);
    let (mut opened, mut failed) = (0, 0);
    for _ in 0..watchers {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(true)) => opened += 1,
            Ok(Some(false)) => failed += 1,
            _ => anyhow::bail!(
                "{watchers} watches did not open within {budget:?}: {opened} opened, {failed} failed"
            ),
        }
    }
    let setup = base.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (seq, at) in sent.iter().enumerate() {
        at.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
        let patch = serde_json::json!({ "data": { "seq": seq.to_string() } });
        writer
            .patch("tick", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tokio::time::sleep(size.watch_interval).await;
    }
    let mut out = WatchOutcome {
        expected: (watchers * events) as u64,
        setup,
        ..Default::default()
    };
    while let Some(r) = set.join_next().await {
        let (got, dups, lat, ok) = r?;
        out.received += got;
        out.duplicates += dups;
        out.latencies.extend(lat);
        if !ok {
            out.failed_watches += 1;
        }
    }
    out.failed_watches = out.failed_watches.max(failed);
    out.latencies.sort();
    Ok(out)
}

/// The `seq` of a MODIFIED watch event line, if it is one.
fn event_seq(line: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v["type"] != "MODIFIED" {
        return None;
    }
    v["object"]["data"]["seq"].as_str()?.parse().ok()
}

// === pure tunnel capacity ===

async fn tunnel_capacity(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let direct_https = Arc::new(Endpoint {
        addr: env.synth.addr,
        ca_pem: env.synth.ca_pem.clone(),
        identity: None,
        bearer: None,
        prefix: String::new(),
    });
    // Warm-up.
    bulk_h2(&env.synth_tunnel, 1, 1024 * 1024).await?;
    bulk_h1(&direct_https, 1, 1024 * 1024).await?;
    for (streams, per_stream) in [
        (1, size.bulk_single),
        (size.bulk_streams, size.bulk_per_stream),
    ] {
        let (mut raw, mut https, mut tun) = (Vec::new(), Vec::new(), Vec::new());
        let (mut https_cpu, mut tun_cpu) = (Vec::new(), Vec::new());
        let gib = (per_stream * streams as u64) as f64 / (1024.0 * MIB);
        for _ in 0..size.bulk_rounds {
            raw.push(raw_tcp(streams, per_stream).await?);
            let cpu = process_cpu();
            https.push(bulk_h1(&direct_https, streams, per_stream).await?);
            https_cpu.push((process_cpu() - cpu).as_secs_f64() / gib);
            let cpu = process_cpu();
            tun.push(bulk_h2(&env.synth_tunnel, streams, per_stream).await?);
            tun_cpu.push((process_cpu() - cpu).as_secs_f64() / gib);
        }
        let (raw, https, tun) = (median_f64(raw), median_f64(https), median_f64(tun));
        let (https_cpu, tun_cpu) = (median_f64(https_cpu), median_f64(tun_cpu));
        let what = format!(
            "{streams} stream{} × {}",
            if streams == 1 { "" } else { "s" },
            if per_stream >= 1024 * 1024 {
                format!("{} MiB", per_stream / 1024 / 1024)
            } else {
                format!("{} KiB", per_stream / 1024)
            }
        );
        let ratio = tun / raw;
        report.row(
            format!("pure tunnel vs raw loopback TCP, {what}"),
            mib_s(raw),
            mib_s(tun),
            Some(ratio),
            "≥ 0.50",
            Some(ratio >= 0.5),
        );
        report.row(
            format!("pure tunnel vs direct HTTPS to the upstream, {what}"),
            mib_s(https),
            mib_s(tun),
            Some(tun / https),
            "",
            None,
        );
        report.row(
            format!("CPU per GiB moved (this whole process), direct HTTPS vs tunnel, {what}"),
            format!("{https_cpu:.2} s"),
            format!("{tun_cpu:.2} s"),
            Some(tun_cpu / https_cpu),
            "",
            None,
        );
    }
    Ok(())
}

/// CPU time (user + system) this process has used: it holds the client,
/// gateway, agent and upstream of the tunnel figures, so CPU per byte measures
/// the tunnel's cost without depending on how busy the machine is.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Bytes/s of `streams` concurrent GETs of `per_stream` bytes over HTTP/2
/// (one connection per stream) to `ep`.
pub async fn bulk_h2(ep: &Arc<Endpoint>, streams: usize, per_stream: u64) -> anyhow::Result<f64> {
    let conns = futures::future::try_join_all((0..streams).map(|_| ep.connect())).await?;
    let path = format!("/bytes?n={per_stream}");
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut c in conns {
        let path = path.clone();
        set.spawn(async move {
            tokio::time::timeout(Duration::from_secs(300), c.get_drain(&path))
                .await
                .context("bulk GET timed out")?
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    anyhow::ensure!(
        total == per_stream * streams as u64,
        "read {total} bytes, wanted {}",
        per_stream * streams as u64
    );
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Like [`bulk_h2`], over HTTP/1.1 (what the synthetic upstream speaks).
pub async fn bulk_h1(ep: &Arc<Endpoint>, streams: usize, per_stream: u64) -> anyhow::Result<f64> {
    let mut senders = Vec::new();
    for _ in 0..streams {
        let tls = raw::connect(ep.addr, &ep.ca_pem, None, false).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        senders.push(sender);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut s in senders {
        set.spawn(async move {
            let req = Request::get(format!("/bytes?n={per_stream}"))
                .header(header::HOST, "127.0.0.1")
                .body(Empty::<Bytes>::new())?;
            let resp = s.send_request(req).await?;
            tokio::time::timeout(Duration::from_secs(300), drain(resp.into_body()))
                .await
                .context("bulk GET timed out")?
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    anyhow::ensure!(total == per_stream * streams as u64, "short read: {total}");
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Bytes/s of `streams` plain loopback TCP connections each carrying `per_stream` bytes.
pub async fn raw_tcp(streams: usize, per_stream: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sender = tokio::spawn(async move {
        let mut set = JoinSet::new();
        for _ in 0..streams {
            let (mut sock, _) = listener.accept().await?;
            sock.set_nodelay(true)?;
            set.spawn(async move {
                let mut left = per_stream;
                while left > 0 {
                    let n = left.min(CHUNK_LEN as u64) as usize;
                    sock.write_all(&CHUNK[..n]).await?;
                    left -= n as u64;
                }
                sock.shutdown().await
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        anyhow::Ok(())
    });
    let mut socks = Vec::new();
    for _ in 0..streams {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut s in socks {
        set.spawn(async move {
            let mut buf = vec![0u8; CHUNK_LEN];
            let mut n = 0u64;
            loop {
                let r = s.read(&mut buf).await?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            std::io::Result::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(300), set.join_next())
        .await
        .context("raw TCP timed out")?
    {
        total += r??;
    }
    let elapsed = start.elapsed();
    sender.await??;
    anyhow::ensure!(total == per_stream * streams as u64, "short read: {total}");
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// A fast HTTPS upstream: `GET /bytes?n=N` streams N bytes in 64 KiB chunks
/// from a static buffer; anything else answers a small JSON document.
pub struct ByteUpstream {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_pem: String,
    pub ca_file: PathBuf,
    shutdown: CancellationToken,
}

impl ByteUpstream {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        install_crypto_provider();
        let ca = tower_certs::Ca::generate("bench-upstream-ca")?;
        let serving = ca.issue_server(&["127.0.0.1", "localhost"], Duration::from_secs(3600))?;
        let ca_file = dir.join("bench-upstream-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem())?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                tower_certs::parse_certs(&serving.cert_pem)?,
                tower_certs::parse_key(&serving.key_pem)?,
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let _ = sock.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(serve_bytes(&req))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            url: format!("https://{addr}"),
            ca_pem: ca.cert_pem().to_string(),
            ca_file,
            shutdown,
        })
    }

    /// This upstream as the agent's `name` upstream (no credential).
    pub fn upstream(&self, name: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            url: self.url.clone(),
            ca_file: Some(self.ca_file.clone()),
            token_file: None,
        }
    }
}

impl Drop for ByteUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

type BenchBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn serve_bytes(req: &Request<Incoming>) -> hyper::Response<BenchBody> {
    let n: Option<u64> = (req.uri().path() == "/bytes")
        .then(|| req.uri().query())
        .flatten()
        .and_then(|q| q.strip_prefix("n="))
        .and_then(|n| n.parse().ok());
    let Some(n) = n else {
        return hyper::Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from_static(b"{\"kind\":\"Status\"}")).boxed())
            .expect("valid response");
    };
    let chunks = n.div_ceil(CHUNK_LEN as u64);
    let stream = futures::stream::iter((0..chunks).map(move |i| {
        let len = (n - i * CHUNK_LEN as u64).min(CHUNK_LEN as u64) as usize;
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(&CHUNK[..len])))
    }));
    hyper::Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, n)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

// === memory and reconnect: a tower-server process ===

/// The `tower-server` binary of this build profile, built if needed.
pub fn server_bin() -> anyhow::Result<PathBuf> {
    let release = !cfg!(debug_assertions);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-q", "-p", "tower-server", "--bin", "tower-server"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    anyhow::ensure!(status.success(), "building tower-server failed");
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe dir")?;
    [
        dir.join("tower-server"),
        dir.join("..").join("tower-server"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("tower-server missing next to {}", dir.display()))
}

/// A `tower-server` child process on loopback.
pub struct ServerProcess {
    process: Process,
    pub ssh_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts the server with its state in `state_dir`, on `ports` (or fresh ones).
    pub async fn start(
        bin: &Path,
        state_dir: &Path,
        ports: Option<(u16, u16)>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let (ssh, gw) = ports.unwrap_or((0, 0));
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("--ssh-listen")
            .arg(format!("127.0.0.1:{ssh}"))
            .arg("--gateway-listen")
            .arg(format!("127.0.0.1:{gw}"))
            .arg("--gateway-url")
            .arg("https://127.0.0.1")
            .arg("--print-ports")
            .arg("--ops-listen=127.0.0.1:0")
            .env("RUST_LOG", "warn");
        let offset = std::fs::metadata(log).map_or(0, |m| m.len());
        let mut process = Process::spawn("tower-server", cmd, log)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read(log).unwrap_or_default();
            let start = (offset as usize).min(text.len());
            let text = String::from_utf8_lossy(&text[start..]).into_owned();
            if let Some((s, g)) = text.lines().find_map(parse_ports) {
                return Ok(Self {
                    process,
                    ssh_addr: SocketAddr::from(([127, 0, 0, 1], s)),
                    gateway_addr: SocketAddr::from(([127, 0, 0, 1], g)),
                    log: log.to_path_buf(),
                });
            }
            anyhow::ensure!(
                process.is_running(),
                "tower-server exited during start:\n{}",
                log_tail(log, 20)
            );
            anyhow::ensure!(
                Instant::now() < deadline,
                "tower-server did not print its ports within 30 s:\n{}",
                log_tail(log, 20)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Resident set size (`VmRSS`) in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")
    }

    /// SIGTERM, then waits (at most 10 s, then SIGKILL) for the process to exit.
    pub async fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.process.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.process.is_running() {
            eprintln!(
                "tower-server ignored SIGTERM for 10 s; killing it. log tail:\n{}",
                log_tail(&self.log, 10)
            );
            self.process.kill9();
        }
    }
}

fn parse_ports(line: &str) -> Option<(u16, u16)> {
    let mut it = line.trim().split(' ');
    let ssh = it.next()?.strip_prefix("ssh=")?.parse().ok()?;
    let gw = it.next()?.strip_prefix("gateway=")?.parse().ok()?;
    Some((ssh, gw))
}

/// An in-process agent with production defaults (keepalive 10 s, backoff 200 ms to 5 s).
struct IdleAgent {
    agent: Arc<Agent>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl IdleAgent {
    fn start(token: String, upstream: UpstreamConfig) -> anyhow::Result<Self> {
        let agent = Arc::new(Agent::new(AgentConfig::new(
            TokenSource::Literal(token),
            vec![upstream],
        ))?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (agent, shutdown) = (agent.clone(), shutdown.clone());
            async move { agent.run(shutdown).await }
        });
        Ok(Self {
            agent,
            shutdown,
            task,
        })
    }

    async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.agent.status();
        let last = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, AgentStatus::Connected { .. })),
        )
        .await;
        let ok = matches!(last, Ok(Ok(_)));
        drop(last);
        anyhow::ensure!(ok, "agent not connected: {:?}", *rx.borrow());
        Ok(())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

async fn agents_on_a_server_process(
    env: &Env,
    size: &Size,
    memory: bool,
    reconnect: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let bin = server_bin()?;
    eprintln!(
        "   tower-server binary {} ready in {:.1?}",
        bin.display(),
        started.elapsed()
    );
    let state = env.dir.path().join("server-process");
    let log = env.dir.path().join("server-process.log");
    // The host key is made here, before the server starts, so that the
    // server loads it (it prints its ports before opening its state dir).
    std::fs::create_dir_all(&state)?;
    let fingerprint =
        tower_certs::HostKey::load_or_create(&state.join(tower_server::HOST_KEY_FILE))?
            .fingerprint();
    let mut server = ServerProcess::start(&bin, &state, None, &log).await?;
    let mut targets: Vec<usize> = if memory {
        size.idle_agents.clone()
    } else {
        Vec::new()
    };
    if reconnect {
        targets.push(size.reconnect_agents);
    }
    targets.sort();
    targets.dedup();
    let most = targets.last().copied().unwrap_or(0);
    let started = Instant::now();
    let store = tower_server::tokens::FileStore::open(&state)?;
    let tokens = (0..most)
        .map(|i| {
            store
                .mint(
                    &format!("idle-{i:05}"),
                    vec![server.ssh_addr.to_string()],
                    fingerprint.clone(),
                    None,
                )
                .map(|t| t.encode())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("   minted {most} join tokens in {:.1?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = server.rss_kib()?;
    eprintln!(
        "   tower-server pid {}: {base} KiB resident with no agent",
        server.pid()
    );
    let upstream = env.synth.upstream(UPSTREAM_KUBE_APISERVER);
    let mut agents: Vec<IdleAgent> = Vec::new();
    let mut prev = (0usize, base);
    for &target in &targets {
        let started = Instant::now();
        let first = agents.len();
        while agents.len() < target {
            // Waves of at most 100 handshakes.
            let wave_end = (agents.len() + 100).min(target);
            let wave_start = agents.len();
            for token in &tokens[wave_start..wave_end] {
                agents.push(IdleAgent::start(token.clone(), upstream.clone())?);
            }
            futures::future::try_join_all(
                agents[wave_start..wave_end]
                    .iter()
                    .map(|a| a.wait_connected(Duration::from_secs(60))),
            )
            .await?;
        }
        let connect = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = server.rss_kib()?;
        let per = rss.saturating_sub(base) as f64 / target as f64;
        eprintln!(
            "   {target} agents ({} new, connected in {connect:.2?}): server {rss} KiB resident, {per:.1} KiB per agent",
            target - first
        );
        if memory && size.idle_agents.contains(&target) {
            report.row(
                format!(
                    "server memory per idle agent, {target} agent{} (RSS growth / agents{})",
                    if target == 1 { "" } else { "s" },
                    if target == 1 {
                        ", one-time costs included"
                    } else {
                        ""
                    }
                ),
                "—",
                format!("{per:.1} KiB"),
                None,
                "≤ 64 KiB",
                Some(per <= 64.0),
            );
            if prev.0 > 0 {
                let marginal = rss.saturating_sub(prev.1) as f64 / (target - prev.0) as f64;
                report.row(
                    format!("server memory per idle agent, marginal {}→{target}", prev.0),
                    "—",
                    format!("{marginal:.1} KiB"),
                    None,
                    "≤ 64 KiB",
                    Some(marginal <= 64.0),
                );
            }
            prev = (target, rss);
        }
        if target == most && most >= 100 {
            report.row(
                format!(
                    "{} more agents connecting (waves of 100): all connected after",
                    target - first
                ),
                "—",
                format!("{:.2} s", connect.as_secs_f64()),
                None,
                "",
                None,
            );
        }
    }
    if reconnect {
        let n = size.reconnect_agents;
        for a in agents.drain(n..) {
            a.stop().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let back: Vec<_> = agents
            .iter()
            .map(|a| {
                let mut rx = a.agent.status();
                tokio::spawn(async move {
                    rx.wait_for(|s| !matches!(s, AgentStatus::Connected { .. }))
                        .await
                        .ok()?;
                    rx.wait_for(|s| matches!(s, AgentStatus::Connected { .. }))
                        .await
                        .ok()?;
                    Some(Instant::now())
                })
            })
            .collect();
        let down = Instant::now();
        server.terminate().await;
        let stopped = down.elapsed();
        let ports = (server.ssh_addr.port(), server.gateway_addr.port());
        let mut server2 = ServerProcess::start(&bin, &state, Some(ports), &log).await?;
        let up = Instant::now();
        let mut times = Vec::new();
        for h in back {
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(Some(at))) => times.push(at.saturating_duration_since(up)),
                _ => anyhow::bail!("an agent did not reconnect within 60 s"),
            }
        }
        times.sort();
        let (med, max) = (percentile(&times, 0.5), times[times.len() - 1]);
        eprintln!(
            "   restart: old server exited {stopped:.2?} after SIGTERM, new one listening {:.2?} after SIGTERM; \
             {n} agents back: median {med:.2?}, max {max:.2?} after it listened",
            up.duration_since(down)
        );
        report.row(
            format!("reconnect after a server restart, {n} agents: median"),
            "—",
            format!("{:.2} s", med.as_secs_f64()),
            None,
            "< 2 s",
            Some(med < Duration::from_secs(2)),
        );
        report.row(
            format!("reconnect after a server restart, {n} agents: max"),
            "—",
            format!("{:.2} s", max.as_secs_f64()),
            None,
            "",
            None,
        );
        report.counts.push((
            "agents back after restart".to_string(),
            n as u64,
            times.len() as u64,
        ));
        for a in agents.drain(..) {
            a.stop().await;
        }
        server2.terminate().await;
    } else {
        for a in agents.drain(..) {
            a.stop().await;
        }
        server.terminate().await;
    }
    Ok(())
}
