//! `towerctl`: mint and revoke join tokens and print kubeconfigs, against a
//! server's state directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tower_server::store::FileStore;
use tower_server::{HOST_KEY_FILE, kubeconfig};

/// Manage Tower join tokens and kubeconfigs.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The server's state directory (CA, host key, token store).
    #[arg(
        long,
        global = true,
        env = "TOWER_STATE_DIR",
        default_value = "/var/lib/tower"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mint a join token for a member cluster and print it.
    Token {
        /// The member cluster's name (a DNS label).
        cluster: String,
        /// SSH address(es) agents dial, host:port (repeat or comma-separate).
        #[arg(
            long,
            env = "TOWER_SERVER_ADDR",
            value_delimiter = ',',
            required = true
        )]
        server: Vec<String>,
        /// Token lifetime, e.g. 24h, 30m, 7d; none means it never expires.
        #[arg(long, env = "TOWER_TOKEN_TTL")]
        ttl: Option<String>,
    },
    /// Revoke every token of a cluster; its live session ends within seconds.
    Revoke { cluster: String },
    /// List tokens (ids and state; never secrets).
    Tokens,
    /// Print a kubeconfig that reaches a cluster through the gateway.
    Kubeconfig {
        cluster: String,
        /// Gateway URL clients use.
        #[arg(
            long,
            env = "TOWER_GATEWAY_URL",
            default_value = "https://tower.kubesphere-system.svc:8443"
        )]
        gateway_url: String,
    },
}

fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad TTL {s:?}; use e.g. 30m, 24h, 7d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("bad TTL unit in {s:?}; use s, m, h or d"),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = || {
        FileStore::open(&args.state_dir)
            .with_context(|| format!("opening token store in {}", args.state_dir.display()))
    };
    match args.command {
        Command::Token {
            cluster,
            server,
            ttl,
        } => {
            let host_key =
                tower_certs::HostKey::load_or_create(&args.state_dir.join(HOST_KEY_FILE))?;
            let ttl = ttl.as_deref().map(parse_ttl).transpose()?;
            let token = store()?.mint(&cluster, server, host_key.fingerprint(), ttl)?;
            println!("{}", token.encode());
            eprintln!(
                "join token for cluster {cluster} (id {}); give it to the agent, e.g. as TOWER_JOIN_TOKEN",
                token.claims.id
            );
        }
        Command::Revoke { cluster } => {
            let n = store()?.revoke_cluster(&cluster)?;
            if n == 0 {
                anyhow::bail!(
                    "cluster {cluster:?} has no active token; `towerctl tokens` lists them"
                );
            }
            println!("revoked {n} token(s) of cluster {cluster}");
        }
        Command::Tokens => {
            println!("{:<14} {:<24} {:<8} EXPIRES", "ID", "CLUSTER", "STATE");
            for t in store()?.list()? {
                let state = if t.revoked { "revoked" } else { "active" };
                let expires = t.expires.map_or("never".to_string(), |e| e.to_string());
                println!("{:<14} {:<24} {:<8} {expires}", t.id, t.cluster, state);
            }
        }
        Command::Kubeconfig {
            cluster,
            gateway_url,
        } => {
            anyhow::ensure!(
                tower_proto::names::is_valid_cluster_name(&cluster),
                "cluster name {cluster:?} is not a valid DNS label"
            );
            let ca = tower_certs::Ca::load_or_create(&args.state_dir, "tower-ca")?;
            print!(
                "{}",
                kubeconfig::render(
                    &ca,
                    &gateway_url,
                    &cluster,
                    &kubeconfig::default_identity(&cluster)
                )?
            );
        }
    }
    Ok(())
}
