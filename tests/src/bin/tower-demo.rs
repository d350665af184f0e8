//! `tower-demo`: the main job end to end on one machine. Starts a host and a
//! member control plane (real etcd + kube-apiserver), a Tower server, mints a
//! join token, starts the real `tower-agent` binary against the member, and
//! runs kubectl through the tunnel, printing what it does.
//!
//! `cargo run -p tower-tests --bin tower-demo` (add `-- --keep` to leave it
//! running for your own kubectl until Ctrl-C).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tower_tests::fixture::{TowerServer, agent_credential, kubectl, spawn_agent_process};
use tower_tests::testbed::{self, Testbed};

fn step(msg: &str) {
    eprintln!("\n==> {msg}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let started = Instant::now();
    step("building or reusing etcd, kube-apiserver and kubectl (first run: several minutes)");
    let bin = testbed::bin_dir();
    eprintln!("    binaries in {}", bin.display());

    step("starting etcd and two control planes: host and member \"gondor\"");
    let bed = Testbed::start().await?;
    let mut clusters = bed.clusters(&["host", "gondor"]).await?;
    let member = clusters.pop().context("member")?;
    let host = clusters.pop().context("host")?;
    eprintln!("    host   kube-apiserver {}", host.url);
    eprintln!(
        "    member kube-apiserver {} (the agent's side)",
        member.url
    );

    step("starting tower-server (SSH listener for agents + HTTPS gateway)");
    let server = TowerServer::start(&bed.dir().join("tower-server")).await?;
    eprintln!(
        "    ssh {}  gateway {}",
        server.ssh_addr,
        server.gateway_url()
    );
    eprintln!("    host key {}", server.server.host_key_fingerprint());

    step("minting a join token for cluster gondor (towerctl token gondor --server …)");
    let token = server.mint("gondor", Some(Duration::from_secs(3600)))?;
    let token_file = bed.dir().join("gondor.join-token");
    std::fs::write(&token_file, token.encode())?;
    eprintln!(
        "    token id {} written to {}",
        token.claims.id,
        token_file.display()
    );

    step("minting the agent's service-account token on the member (its own credential)");
    let (_, sa_token_file) = agent_credential(&member, bed.dir()).await?;

    step("starting tower-agent (the real binary) next to the member");
    let agent_log = bed.dir().join("tower-agent.log");
    let _agent = spawn_agent_process(&token_file, &member, &sa_token_file, &agent_log)?;
    anyhow::ensure!(
        server
            .wait_connected("gondor", true, Duration::from_secs(30))
            .await,
        "the agent did not connect; its log:\n{}",
        testbed::log_tail(&agent_log, 30)
    );
    eprintln!("    agent connected");

    let kubeconfig = server.kubeconfig_file("gondor")?;
    step(&format!(
        "kubectl through the tunnel, with only the synthesized kubeconfig {}",
        kubeconfig.display()
    ));
    for args in [
        vec!["get", "--raw", "/version"],
        vec!["get", "namespaces"],
        vec![
            "create",
            "configmap",
            "hello-from-tower",
            "--from-literal=greeting=hi",
        ],
        vec!["get", "configmap", "hello-from-tower", "-o", "yaml"],
        vec!["delete", "configmap", "hello-from-tower"],
    ] {
        println!("$ kubectl {}", args.join(" "));
        print!("{}", kubectl(&kubeconfig, &args, None).await?);
    }
    step(&format!("done in {:.1?}", started.elapsed()));
    if keep {
        eprintln!(
            "    try: kubectl --kubeconfig {} get ns   (Ctrl-C to stop)",
            kubeconfig.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
