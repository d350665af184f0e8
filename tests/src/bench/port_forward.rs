//! Small GETs beside a port-forward moving bulk data: sequential GETs through the tunnel
//! while a `kubectl port-forward` (to a pod on a kwok node) exchanges data with its target,
//! the port-forward going straight to the member ("direct") or through the tunnel.
//!
//! [`PortForwardBed`] is shared with `tests/tests/port_forward_load.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::BodyExt as _;

use super::Size;
use super::report::{Report, median_f64, percentile};
use crate::fixture::exchange::{PortForward, exchange_with, spawn_exchange_server};
use crate::fixture::http::{get_h2, until_ok};
use crate::fixture::{self, ProcessSettings, ServerProcess, agent_credential};
use crate::testbed::{self, ControlPlane, FakeNode, Process, Testbed};

const CLUSTER: &str = "anorien";
/// One exchange of the pump, each way.
const PUMP_BYTES: usize = 4_000_000;
/// The paced pump's rate, each way (bytes a second).
pub const PACE: u64 = 10_000_000;

/// How the port-forward beside the GETs moves its data: 4 MB each way per exchange, one
/// exchange after another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pump {
    /// Its client sends and reads at [`PACE`] each way, while its target sends each
    /// exchange's 4 MB at once: every buffer between them fills at full speed first (a
    /// burst, [`BURST`]), then the data moves at the client's pace.
    Paced,
    /// Client and target both send at [`PACE`] each way: the same rate, no bursts.
    Steady,
    /// Client and target at full speed: on two cores it takes the whole machine.
    Full,
}

impl Pump {
    /// The client's rate each way.
    fn client(self) -> Option<u64> {
        (self != Pump::Full).then_some(PACE)
    }

    /// The target's rate.
    fn target(self) -> Option<u64> {
        (self == Pump::Steady).then_some(PACE)
    }

    pub fn label(self) -> String {
        let mb = PACE / 1_000_000;
        match self {
            Pump::Paced => format!("paced, {mb} MB/s each way, the target sending at once"),
            Pump::Steady => format!("steady, {mb} MB/s each way, the target paced too"),
            Pump::Full => "full speed".to_string(),
        }
    }
}

/// How long after the pump begins an exchange its burst lasts: the target sends its 4 MB at
/// once and the buffers between it and the paced client fill at full speed (about 45 ms
/// through the tunnel, measured).
pub const BURST: Duration = Duration::from_millis(50);

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// What [`PortForwardBed::gets_beside_pump`] saw.
pub struct BesidePump {
    /// The GETs' latencies, sorted.
    pub took: Vec<Duration>,
    /// The pump's average rate over its whole run, the GETs' time included (MB/s, both
    /// ways together).
    pub mb_s: f64,
    /// Of the slowest 1% of the GETs, how many began within [`BURST`] after the pump began
    /// an exchange, and how many that slowest 1% is.
    pub slow_in_burst: (usize, usize),
}

/// A member with a kwok node and pod `pump`, the real server and agent, and an HTTP/2
/// connection through the gateway for the GETs.
pub struct PortForwardBed {
    pub member: ControlPlane,
    /// Through the tunnel.
    pub kubeconfig: PathBuf,
    h2: H2,
    path: String,
    _agent: Process,
    _server: ServerProcess,
    _node: FakeNode,
    _dir: tempfile::TempDir,
    _bed: Testbed,
}

impl PortForwardBed {
    pub async fn start() -> anyhow::Result<Self> {
        let bed = Testbed::start().await?;
        let member = bed.cluster("member").await?;
        let target_addr = spawn_exchange_server().await?;
        let node = FakeNode::start(&member, target_addr).await?;
        node.pod(&member, "default", "pump").await?;
        let dir = tempfile::tempdir()?;
        fixture::build_binaries().await?;
        let server = ServerProcess::start_with(
            &dir.path().join("state"),
            &dir.path().join("server.log"),
            ProcessSettings::Production,
        )
        .await?;
        let (_, sa_token_file) = agent_credential(&member, dir.path()).await?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, server.mint(CLUSTER, None)?.encode())?;
        let agent = fixture::spawn_agent_process(
            &token_file,
            &member,
            &sa_token_file,
            &dir.path().join("agent.log"),
        )?;
        let id = server.identity(CLUSTER)?;
        let limit = Duration::from_secs(30);
        let version = format!("/clusters/{CLUSTER}/version");
        anyhow::ensure!(
            until_ok(server.gateway_addr, server.ca_pem(), &id, &version, limit).await < limit,
            "{CLUSTER} never answered"
        );
        let h2 = fixture::gateway_h2(server.gateway_addr, server.ca_pem(), &id).await?;
        let kubeconfig = server.kubeconfig_file(CLUSTER)?;
        let mut bed = Self {
            member,
            kubeconfig,
            h2,
            path: format!("/clusters/{CLUSTER}/api/v1/namespaces/default"),
            _agent: agent,
            _server: server,
            _node: node,
            _dir: dir,
            _bed: bed,
        };
        bed.gets(50).await?; // warm up
        Ok(bed)
    }

    /// The server's and the agent's process ids, by name.
    pub fn tower_pids(&self) -> [(&'static str, u32); 2] {
        [
            ("tower-server", self._server.pid()),
            ("tower-agent", self._agent.pid()),
        ]
    }

    /// Latencies of `n` sequential small GETs through the tunnel, sorted.
    pub async fn gets(&mut self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let mut took: Vec<Duration> = self.timed_gets(n).await?.into_iter().map(|t| t.1).collect();
        took.sort();
        Ok(took)
    }

    /// `n` sequential small GETs through the tunnel: when each began, and how long it took.
    async fn timed_gets(&mut self, n: usize) -> anyhow::Result<Vec<(Instant, Duration)>> {
        let mut timed = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let resp = self.h2.send_request(get_h2(&self.path)).await?;
            anyhow::ensure!(resp.status() == 200, "small GET: {}", resp.status());
            resp.into_body().collect().await?;
            timed.push((started, started.elapsed()));
        }
        Ok(timed)
    }

    /// A port-forward with `kubeconfig` and nothing beside it: `exchanges` exchanges of
    /// 4 MB each way at full speed, one after another, after one to warm up. Its rate in
    /// MB/s, both ways together.
    pub async fn pump_alone(&self, kubeconfig: &Path, exchanges: usize) -> anyhow::Result<f64> {
        anyhow::ensure!(exchanges > 0, "no exchanges asked for");
        let forward = forward_to_pump(kubeconfig).await?;
        let exchange = || async {
            let ok = exchange_with(
                forward.local,
                PUMP_BYTES,
                None,
                None,
                Duration::from_secs(60),
            )
            .await?;
            anyhow::ensure!(ok, "the pump's data arrived damaged");
            anyhow::Ok(())
        };
        exchange().await?;
        let started = Instant::now();
        for _ in 0..exchanges {
            exchange().await?;
        }
        Ok((exchanges * PUMP_BYTES * 2) as f64 / 1e6 / started.elapsed().as_secs_f64())
    }

    /// [`PortForwardBed::gets`] while a port-forward with `kubeconfig` exchanges 4 MB each
    /// way again and again as `pump` says, on a thread of its own.
    pub async fn gets_beside_pump(
        &mut self,
        kubeconfig: &Path,
        pump: Pump,
        n: usize,
    ) -> anyhow::Result<BesidePump> {
        let forward = forward_to_pump(kubeconfig).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let pumped = Arc::new(AtomicUsize::new(0));
        let begun: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let pump = std::thread::spawn({
            let (stop, pumped, local) = (stop.clone(), pumped.clone(), forward.local);
            let begun = begun.clone();
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    for _ in 0..500 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        begun.lock().expect("poisoned").push(Instant::now());
                        let ok = exchange_with(
                            local,
                            PUMP_BYTES,
                            pump.client(),
                            pump.target(),
                            Duration::from_secs(60),
                        )
                        .await?;
                        anyhow::ensure!(ok, "the pump's data arrived damaged");
                        pumped.fetch_add(1, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                })
            }
        });
        // Let it reach its speed: one exchange done.
        let pumping = Instant::now();
        while pumped.load(Ordering::Relaxed) == 0 && pumping.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(
            pumped.load(Ordering::Relaxed) > 0,
            "the pump finished no exchange in 30 s"
        );
        let got = self.timed_gets(n).await;
        stop.store(true, Ordering::Relaxed);
        let pumped_ok = tokio::task::spawn_blocking(move || pump.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the pump panicked"))?;
        // The pump's average over its whole run, the GETs' time included.
        let moved = pumped.load(Ordering::Relaxed) * PUMP_BYTES * 2;
        let during = pumping.elapsed();
        drop(forward);
        pumped_ok.context("the pump")?;
        let mut timed = got?;
        timed.sort_by_key(|t| std::cmp::Reverse(t.1));
        let slowest = &timed[..timed.len().div_ceil(100)];
        let begun = begun.lock().expect("poisoned").clone();
        let in_burst = slowest
            .iter()
            .filter(|(at, _)| {
                begun
                    .iter()
                    .any(|b| *b <= *at && at.duration_since(*b) < BURST)
            })
            .count();
        let mut took: Vec<Duration> = timed.iter().map(|t| t.1).collect();
        took.sort();
        Ok(BesidePump {
            took,
            mb_s: moved as f64 / 1e6 / during.as_secs_f64(),
            slow_in_burst: (in_burst, slowest.len()),
        })
    }
}

/// A `kubectl port-forward` with `kubeconfig` to the pump's pod.
async fn forward_to_pump(kubeconfig: &Path) -> anyhow::Result<PortForward> {
    let mut cmd = tokio::process::Command::new(testbed::kubectl_bin());
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["port-forward", "--address=127.0.0.1", "pod/pump", ":8080"]);
    PortForward::spawn(cmd).await
}

/// The benchmark figure: rounds alternate the pump straight to the member and through the
/// tunnel, paced and at full speed.
pub(crate) async fn beside_a_port_forward(size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let mut bed = PortForwardBed::start().await?;
    let alone = bed.gets(size.pf_gets).await?;
    let straight_kubeconfig = bed.member.admin_kubeconfig().to_path_buf();
    let tunnel_kubeconfig = bed.kubeconfig.clone();
    for pump in [Pump::Paced, Pump::Steady, Pump::Full] {
        let label = pump.label();
        let (mut direct, mut tunnel) = (Vec::new(), Vec::new());
        let (mut direct_rate, mut tunnel_rate) = (0.0, 0.0);
        let mut in_burst = [(0, 0); 2];
        for _ in 0..size.pf_rounds {
            for (i, kubeconfig) in [&straight_kubeconfig, &tunnel_kubeconfig]
                .iter()
                .enumerate()
            {
                let got = bed.gets_beside_pump(kubeconfig, pump, size.pf_gets).await?;
                let (into, rate) = if i == 0 {
                    (&mut direct, &mut direct_rate)
                } else {
                    (&mut tunnel, &mut tunnel_rate)
                };
                into.extend(got.took);
                *rate += got.mb_s / size.pf_rounds as f64;
                in_burst[i].0 += got.slow_in_burst.0;
                in_burst[i].1 += got.slow_in_burst.1;
            }
        }
        report.notes.push(format!(
            "beside a port-forward ({label}): of the slowest 1% of GETs, {} of {} (direct) and \
             {} of {} (tunnel) began within {BURST:?} after the pump began an exchange",
            in_burst[0].0, in_burst[0].1, in_burst[1].0, in_burst[1].1
        ));
        direct.sort();
        tunnel.sort();
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        for (p_label, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (d, t) = (percentile(&direct, p), percentile(&tunnel, p));
            let ratio = t.as_secs_f64() / d.as_secs_f64();
            let (goal, met) = if p_label == "p99" {
                ("≤ 1.25×".to_string(), Some(ratio <= 1.25))
            } else {
                (String::new(), None)
            };
            report.row(
                format!("small GET {p_label} beside a port-forward ({label})"),
                ms(d),
                ms(t),
                Some(ratio),
                goal,
                met,
            );
        }
        report.row(
            format!("port-forward both ways ({label})"),
            format!("{direct_rate:.1} MB/s"),
            format!("{tunnel_rate:.1} MB/s"),
            Some(tunnel_rate / direct_rate),
            String::new(),
            None,
        );
    }
    let (mut direct_rate, mut tunnel_rate) = (Vec::new(), Vec::new());
    for _ in 0..size.pf_rounds {
        direct_rate.push(bed.pump_alone(&straight_kubeconfig, 10).await?);
        tunnel_rate.push(bed.pump_alone(&tunnel_kubeconfig, 10).await?);
    }
    let (d, t) = (median_f64(direct_rate), median_f64(tunnel_rate));
    report.row(
        "port-forward both ways, alone (full speed)".to_string(),
        format!("{d:.1} MB/s"),
        format!("{t:.1} MB/s"),
        Some(t / d),
        String::new(),
        None,
    );
    report.notes.push(format!(
        "small GETs through the tunnel with no port-forward: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&alone, 0.5).as_secs_f64() * 1e3,
        percentile(&alone, 0.99).as_secs_f64() * 1e3
    ));
    Ok(())
}
