//! No head-of-line blocking: one watch whose client never reads, flooded with
//! events, must not slow 200 concurrent small GETs to the same cluster, and the
//! server's memory must stay bounded.
//!
//! This file is its own test binary so that no other test shares the machine
//! while it measures.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use tower_tests::fixture::http::get_h1;
use tower_tests::fixture::{Tunnel, agent_credential, gateway_h1, kube_upstream, kubectl, raw};
use tower_tests::testbed::Testbed;

struct Gateway {
    addr: std::net::SocketAddr,
    ca: String,
    id: raw::Identity,
}

/// Latencies of `n` concurrent GETs of `path` over one HTTP/2 connection, sorted.
async fn concurrent_gets(gw: &Gateway, n: usize, path: &str) -> Vec<Duration> {
    let tls = raw::connect(gw.addr, &gw.ca, Some(&gw.id), true)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let uri = format!("https://127.0.0.1{path}");
    let futs = (0..n).map(|_| {
        let mut sender = sender.clone();
        let uri = uri.clone();
        async move {
            let start = Instant::now();
            let req = hyper::Request::get(uri)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
            start.elapsed()
        }
    });
    let mut out = futures::future::join_all(futs).await;
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn rounds(gw: &Gateway, path: &str) -> Vec<Duration> {
    let mut all = Vec::new();
    for _ in 0..5 {
        all.extend(concurrent_gets(gw, 200, path).await);
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watch_does_not_block_other_requests() {
    let bed = Testbed::start().await.unwrap();
    let member = bed.cluster("member").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await.unwrap();
    let upstreams = vec![kube_upstream(&member, &sa_token_file)];
    let Tunnel {
        server,
        agent: _agent,
        gw: addr,
        ca,
        id,
        ..
    } = Tunnel::start_configured(dir.path(), "gondor", upstreams, |c| {
        // 200 concurrent GETs from one client: more than its default share.
        c.client_streams = 256;
    })
    .await
    .unwrap();
    let kubeconfig = server.kubeconfig_file("gondor").unwrap();
    kubectl(&kubeconfig, &["create", "namespace", "hol"], None)
        .await
        .unwrap();
    kubectl(
        &kubeconfig,
        &[
            "create",
            "configmap",
            "small",
            "-n",
            "hol",
            "--from-literal=a=1",
        ],
        None,
    )
    .await
    .unwrap();
    let gw = Gateway { addr, ca, id };
    let path = "/clusters/gondor/api/v1/namespaces/hol/configmaps/small";
    concurrent_gets(&gw, 50, path).await; // warm up
    let base = rounds(&gw, path).await;

    // A watch whose client never reads its body.
    let mut sender = gateway_h1(gw.addr, &gw.ca, &gw.id).await.unwrap();
    let req = get_h1("/clusters/gondor/api/v1/namespaces/hol/configmaps?watch=true");
    let stalled = sender.send_request(req).await.unwrap();
    assert_eq!(stalled.status(), 200);
    let rss_before = rss_kib();

    // Flood it with ~40 MiB of events, far more than any window or socket buffer.
    let api: Api<ConfigMap> = Api::namespaced(member.client().await.unwrap(), "hol");
    let blob = "y".repeat(400 * 1024);
    for i in 0..100 {
        let name = format!("flood-{}", i % 10);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            data: Some([("v".to_string(), format!("{i}{blob}"))].into()),
            ..Default::default()
        };
        api.patch(
            &name,
            &PatchParams::apply("hol-test").force(),
            &Patch::Apply(&cm),
        )
        .await
        .unwrap();
    }
    let loaded = rounds(&gw, path).await;
    let rss_after = rss_kib();
    let session = server.server.registry().get("gondor").unwrap();
    let (b50, b99, l50, l99) = (
        pct(&base, 0.5),
        pct(&base, 0.99),
        pct(&loaded, 0.5),
        pct(&loaded, 0.99),
    );
    eprintln!(
        "HOL: 5 rounds of 200 concurrent GETs: without a stalled watch p50 {b50:.2?} p99 {b99:.2?}; \
         with a stalled, flooded watch p50 {l50:.2?} p99 {l99:.2?} (p99 ratio {:.2}); \
         test-process RSS (server + agent + clients) {rss_before} -> {rss_after} KiB; tunnel channels open: {}",
        l99.as_secs_f64() / b99.as_secs_f64(),
        session.open_channels()
    );
    // Within 2x (plus 5 ms for scheduling noise on a 2-core machine).
    assert!(
        l99 <= b99 * 2 + Duration::from_millis(5),
        "p99 {l99:?} vs baseline {b99:?}"
    );
    // The stalled stream holds at most its flow-control windows, not the 40 MiB flood.
    assert!(
        rss_after.saturating_sub(rss_before) < 32 * 1024,
        "RSS grew {} KiB",
        rss_after.saturating_sub(rss_before)
    );
    // The watch really is still open and stalled, not closed early.
    let mut body = stalled.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
    assert!(
        matches!(frame, Ok(Some(Ok(_)))),
        "the stalled watch should still deliver data once read"
    );
}
