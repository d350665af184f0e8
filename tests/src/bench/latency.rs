//! Small-GET latency, direct and through the tunnel, at 1 and at N clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;

use super::client::Endpoint;
use super::env::Env;
use super::report::{Report, ms, percentile};
use super::{NS, Size};

pub(crate) async fn small_get(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
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
