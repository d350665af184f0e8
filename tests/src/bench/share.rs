//! Fair shares under attack: another client's small-GET latency on a cluster
//! while one client holds its full share of unread streams, against a real
//! `tower-server` process, and that process's memory meanwhile.
//!
//! The "direct" column is the same client with nobody attacking, the "tunnel"
//! column the same client beside the full share; both go through the tunnel.
//! Rounds alternate quiet and attacked, so drift affects both alike.

use std::time::{Duration, Instant};

use tower_agent::TokenSource;
use tower_proto::names::UPSTREAM_KUBE_APISERVER;
use tower_server::gateway::DEFAULT_CLIENT_STREAMS;

use super::report::{Report, percentile};
use super::{MIB, Size};
use crate::fixture::http::{H2Client, fetch, open_unread, until_ok};
use crate::fixture::{HttpsUpstream, ProcessSettings, ServerProcess, TowerAgent, gateway_h2_from};

/// Bytes each unread stream asks for: far more than its window.
const UNREAD_BYTES: u64 = 16 * 1024 * 1024;

pub(crate) async fn beside_a_full_share(size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start_with(
        &dir.path().join("state"),
        &dir.path().join("server.log"),
        ProcessSettings::Production,
    )
    .await?;
    let upstream = HttpsUpstream::bytes(dir.path()).await?;
    let token = server.mint("share", None)?;
    let _agent = TowerAgent::start_with(
        TokenSource::Literal(token.encode()),
        vec![upstream.upstream(UPSTREAM_KUBE_APISERVER, None)],
    )?;
    let id = server.identity("share")?;
    let (gw, ca) = (server.gateway_addr, server.ca_pem().to_string());
    let limit = Duration::from_secs(30);
    anyhow::ensure!(
        until_ok(gw, &ca, &id, "/clusters/share/version", limit).await < limit,
        "the cluster never answered"
    );
    let victim = gateway_h2_from([127, 0, 0, 2], gw, &ca, &id).await?;
    gets(&victim, 50).await?; // warm-up
    let (mut quiet, mut attacked) = (Vec::new(), Vec::new());
    let rss_quiet = server.rss_kib()?;
    let mut rss_attacked = 0;
    let unread = format!("/clusters/share/bytes?n={UNREAD_BYTES}");
    for round in 0..size.share_rounds {
        quiet.extend(gets(&victim, size.share_gets).await?);
        let attacker = gateway_h2_from([127, 0, 0, 1], gw, &ca, &id).await?;
        let held = open_unread(&attacker, &unread, DEFAULT_CLIENT_STREAMS).await;
        let admitted = held.iter().filter(|r| r.status() == 200).count();
        anyhow::ensure!(
            admitted == DEFAULT_CLIENT_STREAMS,
            "round {round}: {admitted} unread streams admitted"
        );
        tokio::time::sleep(Duration::from_millis(500)).await; // the windows fill
        attacked.extend(gets(&victim, size.share_gets).await?);
        rss_attacked = rss_attacked.max(server.rss_kib()?);
        drop(held);
        drop(attacker);
        tokio::time::sleep(Duration::from_millis(500)).await; // the share is given back
    }
    quiet.sort();
    attacked.sort();
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (q, a) = (percentile(&quiet, p), percentile(&attacked, p));
        let ratio = a.as_secs_f64() / q.as_secs_f64();
        let (goal, met) = if label == "p99" {
            ("≤ 1.25×".to_string(), Some(ratio <= 1.25))
        } else {
            (String::new(), None)
        };
        report.row(
            format!(
                "small GET {label}, quiet vs beside one client's full share ({DEFAULT_CLIENT_STREAMS} unread streams)"
            ),
            ms(q),
            ms(a),
            Some(ratio),
            goal,
            met,
        );
    }
    let bound_mib = 128.0;
    let grown = (rss_attacked.saturating_sub(rss_quiet)) as f64 * 1024.0 / MIB;
    report.row(
        "tower-server RSS, quiet vs holding one client's full share",
        format!("{:.0} MiB", rss_quiet as f64 * 1024.0 / MIB),
        format!("{:.0} MiB", rss_attacked as f64 * 1024.0 / MIB),
        None,
        format!("< +{bound_mib:.0} MiB"),
        Some(grown < bound_mib),
    );
    report.counts.push((
        format!(
            "small GETs answered beside a full share ({} rounds)",
            size.share_rounds
        ),
        (size.share_gets * size.share_rounds) as u64,
        attacked.len() as u64,
    ));
    Ok(())
}

/// `n` sequential small GETs on `client`; their latencies.
async fn gets(client: &H2Client, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let got = fetch(client, "/clusters/share/version", Duration::from_secs(10)).await;
        anyhow::ensure!(matches!(got, Ok((200, _))), "small GET: {got:?}");
        out.push(started.elapsed());
    }
    Ok(out)
}
