//! `towerctl`: join member clusters, show their status, print kubeconfigs and
//! revoke access. Against a host cluster (kubeconfig/context flags like
//! kubectl), or, with `--state-dir`, against a standalone server's state.

mod migrate;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tower_proto::token::{Claims, JoinToken, Secret};
use tower_server::crd::{Agent, CONDITION_CONNECTED, Cluster};
use tower_server::kube::{CLUSTER_TOKEN_ID, SERVER_INFO_CONFIGMAP};
use tower_server::tokens::FileStore;
use tower_server::{HOST_KEY_FILE, kubeconfig};

/// Field manager for what towerctl writes.
const MANAGER: &str = "towerctl";

/// Join member clusters to Tower and manage their access.
#[derive(Parser, Debug)]
#[command(version = tower_ops::VERSION, about)]
struct Args {
    /// Standalone mode: the server's state directory (CA, host key, token file).
    /// Without it, towerctl works against the host cluster's API.
    #[arg(long, global = true, env = "TOWER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Path to the host cluster's kubeconfig (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Log lines (on stderr, warnings by default) as `text` or `json`.
    #[arg(long, global = true, env = "TOWER_LOG_FORMAT", default_value = "text")]
    log_format: tower_ops::LogFormat,
    /// Kubeconfig context to use.
    #[arg(long, global = true, env = "TOWER_CONTEXT")]
    context: Option<String>,
    /// Namespace where tower-server runs.
    #[arg(
        short,
        long,
        global = true,
        env = "TOWER_NAMESPACE",
        default_value = "kubesphere-system"
    )]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a proxy Cluster, its Agent and token; write the join token to a
    /// file (mode 0600) and print the install command for the member, which
    /// reads the token from that file.
    Join {
        /// The member cluster's name (a DNS label).
        cluster: String,
        /// Where to write the join token (mode 0600); default `<cluster>.join-token`.
        #[arg(long, short = 'o', env = "TOWER_OUTPUT")]
        output: Option<PathBuf>,
        /// Helm chart reference to print in the install command.
        #[arg(long, env = "TOWER_AGENT_CHART", default_value = "charts/tower-agent")]
        chart: String,
    },
    /// Show every cluster: type, connected, agent version, RTT, since.
    Status,
    /// Print the kubeconfig that reaches a cluster through the gateway (or
    /// write it to a file, mode 0600).
    Kubeconfig {
        cluster: String,
        /// Write the kubeconfig here (mode 0600) instead of printing it.
        #[arg(long, short = 'o', env = "TOWER_OUTPUT")]
        output: Option<PathBuf>,
        /// Standalone mode: gateway URL clients use.
        #[arg(
            long,
            env = "TOWER_GATEWAY_URL",
            default_value = "https://tower.kubesphere-system.svc:8443"
        )]
        gateway_url: String,
    },
    /// Revoke a cluster's access: its token stops working and its session ends within seconds.
    Revoke { cluster: String },
    /// Standalone mode: mint a join token for a member cluster.
    Token {
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
        /// Write the token here (mode 0600) instead of printing it.
        #[arg(long, short = 'o', env = "TOWER_OUTPUT")]
        output: Option<PathBuf>,
    },
    /// Standalone mode: list tokens (ids and state; never secrets).
    Tokens,
    /// Move KubeSphere members from a running Go tower to tower-server, with
    /// no hands on any member: installs tower-agent through each Cluster's
    /// current kubeconfig, waits for its session, removes the Go agent and
    /// switches the Cluster over. Needs tower-server with
    /// --kubesphere-adopt=marked; safe to run again after an interruption.
    Migrate(migrate::MigrateArgs),
    /// Print the CRDs generated from the Rust types (or write them into a directory).
    Crds {
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
}

/// Writes `contents` to `path` readable by its owner only (mode 0600, also
/// when the file already existed with a wider mode).
fn write_secret(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes `contents` to `output` (mode 0600) or, without one, to stdout.
fn emit(output: Option<&std::path::Path>, what: &str, contents: &str) -> anyhow::Result<()> {
    match output {
        Some(path) => {
            write_secret(path, contents.as_bytes())?;
            eprintln!("wrote {what} to {} (mode 0600)", path.display());
        }
        None => print!("{contents}"),
    }
    Ok(())
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

/// The agents' server addresses and the host key fingerprint tower-server
/// published in its ConfigMap, for a join token.
fn published_agent_access(
    info: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<(Vec<String>, String)> {
    let servers: Vec<String> = info
        .get("sshAddresses")
        .map(|s| {
            s.split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(
        !servers.is_empty(),
        "tower-server published no address for agents; set --ssh-address on it"
    );
    let host_key = info
        .get("hostKeyFingerprint")
        .cloned()
        .context("tower-server published no host key fingerprint")?;
    Ok((servers, host_key))
}

/// A duration flag (`90s`, `5m`, ...).
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    parse_ttl(s)
}

fn check_name(cluster: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        tower_proto::names::is_valid_cluster_name(cluster),
        "cluster name {cluster:?} is not a valid DNS label (lowercase letters, digits, '-')"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tower_ops::init_logging(args.log_format, "warn");
    tracing::debug!(
        mode = if args.state_dir.is_some() {
            "standalone"
        } else {
            "kubernetes"
        },
        "towerctl starting"
    );
    if let Command::Crds { output_dir } = &args.command {
        return crds(output_dir.as_deref());
    }
    match &args.state_dir {
        Some(dir) => standalone(dir, args.command),
        None => kubernetes(&args).await,
    }
}

fn crds(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    for (file, yaml) in tower_server::crd::crd_yaml() {
        match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                std::fs::write(
                    dir.join(file),
                    format!("# Generated by `towerctl crds`; do not edit.\n{yaml}"),
                )?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

fn standalone(dir: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let store = || {
        FileStore::open(dir).with_context(|| format!("opening token store in {}", dir.display()))
    };
    match command {
        Command::Token {
            cluster,
            server,
            ttl,
            output,
        } => {
            check_name(&cluster)?;
            let host_key = tower_certs::HostKey::load_or_create(&dir.join(HOST_KEY_FILE))?;
            let ttl = ttl.as_deref().map(parse_ttl).transpose()?;
            let token = store()?.mint(&cluster, server, host_key.fingerprint(), ttl)?;
            emit(
                output.as_deref(),
                "the join token",
                &format!("{}\n", token.encode()),
            )?;
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
            output,
        } => {
            check_name(&cluster)?;
            let ca = tower_certs::Ca::load_or_create(dir, "tower-ca")?;
            let rendered = kubeconfig::render(
                &ca,
                &gateway_url,
                &cluster,
                &kubeconfig::default_identity(&cluster),
            )?;
            emit(output.as_deref(), "the kubeconfig", &rendered)?;
        }
        Command::Join { .. } | Command::Status | Command::Migrate(_) => {
            anyhow::bail!(
                "join, status and migrate work against the host cluster; drop --state-dir"
            )
        }
        Command::Crds { .. } => unreachable!("handled before"),
    }
    Ok(())
}

async fn client(args: &Args) -> anyhow::Result<kube::Client> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options).await?
        }
        None => match kube::Config::from_kubeconfig(&options).await {
            Ok(c) => c,
            Err(_) => kube::Config::incluster()
                .context("no kubeconfig found and not running in a cluster")?,
        },
    };
    Ok(kube::Client::try_from(config)?)
}

async fn kubernetes(args: &Args) -> anyhow::Result<()> {
    let client = client(args).await?;
    let clusters: Api<Cluster> = Api::all(client.clone());
    let agents: Api<Agent> = Api::all(client.clone());
    match &args.command {
        Command::Join {
            cluster,
            chart,
            output,
        } => {
            check_name(cluster)?;
            let info: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
            let info = info
                .get_opt(SERVER_INFO_CONFIGMAP)
                .await?
                .and_then(|cm| cm.data)
                .with_context(|| {
                    format!(
                        "tower-server has not published its address (ConfigMap {}/{SERVER_INFO_CONFIGMAP}); \
                         is it running in namespace {}?",
                        args.namespace, args.namespace
                    )
                })?;
            let (servers, host_key) = published_agent_access(&info)?;
            let existing = clusters.get_opt(cluster).await?;
            if let Some(c) = &existing {
                anyhow::ensure!(
                    c.is_proxy(),
                    "cluster {cluster} exists and is not a proxy cluster; refusing to change it"
                );
            }
            let token = existing
                .as_ref()
                .and_then(|c| c.token().map(str::to_string))
                .unwrap_or_else(|| Secret::generate().expose().to_string());
            let mut patch = serde_json::json!({
                "apiVersion": "cluster.kubesphere.io/v1alpha1",
                "kind": "Cluster",
                "metadata": { "name": cluster },
                "spec": {
                    "connection": { "type": "proxy", "token": token },
                },
            });
            if existing.is_none() {
                // A new Cluster; one KubeSphere's console made keeps its own
                // `enable` and `joinFederation` (KubeSphere mode serves it by them).
                patch["spec"]["enable"] = true.into();
                patch["spec"]["joinFederation"] = false.into();
            }
            clusters
                .patch(
                    cluster,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .context("creating the Cluster (are the CRDs installed?)")?;
            set_paused(&agents, cluster, false).await?;
            let join = JoinToken {
                claims: Claims {
                    servers,
                    host_key,
                    cluster: cluster.clone(),
                    id: CLUSTER_TOKEN_ID.into(),
                    expires: None,
                },
                secret: Secret::new(token),
            };
            let output = output
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{cluster}.join-token")));
            write_secret(&output, join.encode().as_bytes())?;
            eprintln!(
                "cluster {cluster} joined as a proxy cluster; its join token is in {} (mode 0600). \
                 Install the agent in the member cluster with:",
                output.display()
            );
            // The token travels in the file, never on a command line.
            println!(
                "helm upgrade --install tower-agent {chart} --namespace kubesphere-system --create-namespace \
                 --set-file joinToken={}",
                output.display()
            );
        }
        Command::Status => {
            let all_agents = agents.list(&Default::default()).await?;
            println!(
                "{:<24} {:<8} {:<10} {:<14} {:<8} SINCE",
                "CLUSTER", "TYPE", "CONNECTED", "AGENT-VERSION", "RTT"
            );
            for c in clusters.list(&Default::default()).await? {
                let name = kube::ResourceExt::name_any(&c);
                let kind = c
                    .spec
                    .connection
                    .as_ref()
                    .and_then(|x| x.type_.clone())
                    .unwrap_or_else(|| "-".into());
                let agent = all_agents
                    .items
                    .iter()
                    .find(|a| kube::ResourceExt::name_any(*a) == name);
                let status = agent.and_then(|a| a.status.clone()).unwrap_or_default();
                let connected = if c.is_proxy() {
                    status
                        .conditions
                        .iter()
                        .find(|x| x.type_ == CONDITION_CONNECTED)
                        .map(|x| x.status.clone())
                        .or_else(|| c.condition("AgentAvailable").map(|x| x.status.clone()))
                        .unwrap_or_else(|| "Unknown".into())
                } else {
                    "-".into()
                };
                let version = status.agent_version.unwrap_or_else(|| "-".into());
                let rtt = status.rtt_millis.map_or("-".into(), |r| format!("{r}ms"));
                let since = status
                    .connected_since
                    .map_or("-".into(), |t| t.0.to_string());
                println!("{name:<24} {kind:<8} {connected:<10} {version:<14} {rtt:<8} {since}");
            }
        }
        Command::Kubeconfig {
            cluster, output, ..
        } => {
            let c = clusters
                .get_opt(cluster)
                .await?
                .with_context(|| format!("cluster {cluster:?} not found"))?;
            let kc = c
                .spec
                .connection
                .and_then(|x| x.kubeconfig)
                .with_context(|| {
                    format!("cluster {cluster} has no kubeconfig yet; is tower-server running?")
                })?;
            emit(
                output.as_deref(),
                "the kubeconfig",
                &String::from_utf8_lossy(&kc.0),
            )?;
        }
        Command::Revoke { cluster } => {
            let c = clusters
                .get_opt(cluster)
                .await?
                .with_context(|| format!("cluster {cluster:?} not found"))?;
            anyhow::ensure!(c.is_proxy(), "cluster {cluster} is not a proxy cluster");
            set_paused(&agents, cluster, true).await?;
            // Rotate the token so the old one is useless even after unpausing.
            let remove = serde_json::json!({ "spec": { "connection": { "token": null } } });
            clusters
                .patch(cluster, &PatchParams::default(), &Patch::Merge(&remove))
                .await?;
            println!(
                "revoked cluster {cluster}: its agent is paused and its token rotated; `towerctl join {cluster}` re-admits it"
            );
        }
        Command::Migrate(m) => migrate::run(client, &args.namespace, m).await?,
        Command::Token { .. } | Command::Tokens => {
            anyhow::bail!("token and tokens work on a standalone server's state; pass --state-dir")
        }
        Command::Crds { .. } => unreachable!("handled before"),
    }
    Ok(())
}

/// Applies `cluster`'s Agent with `paused` (creating it if needed).
async fn set_paused(agents: &Api<Agent>, cluster: &str, paused: bool) -> anyhow::Result<()> {
    let agent = serde_json::json!({
        "apiVersion": "tower.kubesphere.io/v1alpha1",
        "kind": "Agent",
        "metadata": { "name": cluster },
        "spec": { "paused": paused },
    });
    agents
        .patch(
            cluster,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&agent),
        )
        .await?;
    Ok(())
}
