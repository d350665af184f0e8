//! N concurrent watches: event-delivery latency and lost events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use tokio::task::JoinSet;

use super::client::Endpoint;
use super::env::Env;
use super::report::{Report, ms, percentile};
use super::{NS, Size, WATCHES_PER_CONN};

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

pub(crate) async fn watches(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
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
