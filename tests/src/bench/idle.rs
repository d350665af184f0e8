//! Idle agents on a separate `tower-server` process: its memory per agent,
//! and how fast the agents are back after it restarts.

use std::time::{Duration, Instant};

use tower_agent::{AgentState, TokenSource};
use tower_proto::names::UPSTREAM_KUBE_APISERVER;

use super::Size;
use super::env::Env;
use super::report::{Report, percentile};
use crate::fixture::{ProcessSettings, ServerProcess, TowerAgent, workspace_bin};

pub(crate) async fn agents_on_a_server_process(
    env: &Env,
    size: &Size,
    memory: bool,
    reconnect: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let bin = workspace_bin("tower-server", "tower-server")?;
    eprintln!(
        "   tower-server binary {} ready in {:.1?}",
        bin.display(),
        started.elapsed()
    );
    let state = env.dir.path().join("server-process");
    let log = env.dir.path().join("server-process.log");
    // Production settings: the figures are those of a server as deployed.
    let mut server = ServerProcess::start_with(&state, &log, ProcessSettings::Production).await?;
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
    let names: Vec<String> = (0..most).map(|i| format!("idle-{i:05}")).collect();
    let tokens: Vec<String> = server
        .mint_all(&names)?
        .iter()
        .map(|t| t.encode())
        .collect();
    eprintln!("   minted {most} join tokens in {:.1?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = server.rss_kib()?;
    eprintln!(
        "   tower-server pid {}: {base} KiB resident with no agent",
        server.pid()
    );
    let upstream = env.synth.upstream(UPSTREAM_KUBE_APISERVER, None);
    let mut agents: Vec<TowerAgent> = Vec::new();
    let mut prev = (0usize, base);
    for &target in &targets {
        let started = Instant::now();
        let first = agents.len();
        while agents.len() < target {
            // Waves of at most 100 handshakes.
            let wave_end = (agents.len() + 100).min(target);
            let wave_start = agents.len();
            for token in &tokens[wave_start..wave_end] {
                agents.push(TowerAgent::start_production(
                    TokenSource::Literal(token.clone()),
                    vec![upstream.clone()],
                )?);
            }
            futures::future::try_join_all(
                agents[wave_start..wave_end]
                    .iter()
                    .map(|a| a.expect_state(Duration::from_secs(60), connected)),
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
            stop(a).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let back: Vec<_> = agents
            .iter()
            .map(|a| {
                let mut rx = a.agent.state();
                tokio::spawn(async move {
                    rx.wait_for(|s| !connected(s)).await.ok()?;
                    rx.wait_for(connected).await.ok()?;
                    Some(Instant::now())
                })
            })
            .collect();
        let down = Instant::now();
        server.terminate().await;
        let stopped = down.elapsed();
        server.respawn().await?;
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
            stop(a).await;
        }
        server.terminate().await;
    } else {
        for a in agents.drain(..) {
            stop(a).await;
        }
        server.terminate().await;
    }
    Ok(())
}

fn connected(s: &AgentState) -> bool {
    matches!(s, AgentState::Connected { .. })
}

/// Stops an idle agent, waiting 10 s at most.
async fn stop(agent: TowerAgent) {
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.stop()).await;
}
