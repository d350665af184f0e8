//! `towerctl migrate`: moves KubeSphere members from a running Go tower to
//! tower-server, one Cluster at a time, reaching each member only through its
//! Cluster's current kubeconfig.
//!
//! For each Cluster the Go tower serves, in an order that keeps KubeSphere's
//! Cluster webhook satisfied (it admits an UPDATE only through a kubeconfig
//! that reaches the member at that moment) and never lets the two towers
//! write the same Cluster:
//! 1. a fresh credential (a host Secret and the Agent's `tokenRef`), and
//!    tower-agent installed in the member through the current kubeconfig;
//!    wait until tower-server reports its session on the Agent;
//! 2. the Go agent's Deployment deleted through the same path; wait until
//!    that path goes dead (the Go tower has no session left, so it can write
//!    nothing more but its refused "disconnected" update), then a short
//!    settle;
//! 3. Service `mc-<cluster>` pointed at tower-server's pods (same ClusterIP,
//!    ports and endpoints), then one Cluster write: the mark
//!    `tower.kubesphere.io/served-by=tower-server` and the kubeconfig
//!    tower-server published on the Agent, which reaches the member now;
//! 4. wait until tower-server reports the Cluster available.
//!
//! Every step is read back from the cluster before it is taken, so the
//! command can be killed anywhere and run again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret as KubeSecret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use tower_proto::token::{Claims, JoinToken, Secret};
use tower_server::crd::{Agent, CONDITION_CONNECTED, Cluster};
use tower_server::kube::{
    AGENT_TOKEN_ID, SERVED_BY_ANNOTATION, SERVED_BY_TOWER_SERVER, SERVER_INFO_CONFIGMAP,
    SERVICE_PREFIX, marked,
};

/// Field manager of what `migrate` writes.
const MANAGER: &str = "towerctl-migrate";
/// Where the member's agent runs (KubeSphere's own namespace, as the Go agent).
const MEMBER_NAMESPACE: &str = "kubesphere-system";
/// Name of tower-agent's Deployment and Secret in the member.
const AGENT_DEPLOYMENT: &str = "tower-agent";
const AGENT_SECRET: &str = "tower-agent-join";
/// The service account KubeSphere 3.4's agent manifest runs the Go agent as
/// (`pkg/kapis/cluster/v1alpha1/handler.go`, `generateDefaultDeployment`).
const GO_AGENT_SERVICE_ACCOUNT: &str = "kubesphere";
/// Reason tower-server gives a True `AgentAvailable` (the Go tower gives none).
const TOWER_SERVER_AVAILABLE_REASON: &str = "AgentConnected";
/// How often waits look again, and say how long they have waited.
const POLL: Duration = Duration::from_millis(500);
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// What `towerctl migrate` was asked to do.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The Clusters to move (or --all).
    pub clusters: Vec<String>,
    /// Every Cluster the Go tower serves (type proxy, joinFederation true).
    #[arg(long, conflicts_with = "clusters")]
    pub all: bool,
    /// Print what each Cluster is at and what would be done; change nothing.
    #[arg(long, env = "TOWER_DRY_RUN")]
    pub dry_run: bool,
    /// tower-agent image to run in each member.
    #[arg(long, env = "TOWER_AGENT_IMAGE", default_value = concat!("kubesphere/tower-agent:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    /// How long each wait may take (the new agent's session, the Go agent's
    /// exit, the take-over), e.g. 5m, 90s.
    #[arg(long, env = "TOWER_MIGRATE_TIMEOUT", default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Pause between the Go agent's exit and the switch, for the Go tower's
    /// last (disconnected) update to be over before tower-server writes.
    #[arg(long, env = "TOWER_MIGRATE_SETTLE", default_value = "2s", value_parser = super::parse_duration)]
    pub settle: Duration,
    /// Reach HOST:PORT (a Cluster's endpoint, usually a ClusterIP) at
    /// ADDR:PORT instead, keeping HOST as the TLS name; for running outside
    /// the host cluster, e.g. through `kubectl port-forward svc/mc-<c>`.
    /// Repeatable.
    #[arg(long = "connect-to", value_name = "HOST:PORT=ADDR:PORT", value_parser = parse_connect_to)]
    pub connect_to: Vec<(String, SocketAddr)>,
}

fn parse_connect_to(s: &str) -> Result<(String, SocketAddr), String> {
    let (from, to) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected HOST:PORT=ADDR:PORT"))?;
    let to = to
        .parse::<SocketAddr>()
        .map_err(|e| format!("{to:?}: not ADDR:PORT: {e}"))?;
    Ok((from.to_string(), to))
}

/// What tower-server published about itself.
struct ServerInfo {
    servers: Vec<String>,
    host_key: String,
    pod_selector: Vec<(String, String)>,
}

struct Ctx<'a> {
    host: Client,
    namespace: &'a str,
    args: &'a MigrateArgs,
    info: ServerInfo,
}

/// Runs `towerctl migrate`.
pub async fn run(host: Client, namespace: &str, args: &MigrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.all || !args.clusters.is_empty(),
        "name the Clusters to move, or pass --all"
    );
    let info = server_info(&host, namespace).await?;
    let clusters: Api<Cluster> = Api::all(host.clone());
    let names: Vec<String> = if args.all {
        let mut names: Vec<String> = clusters
            .list(&ListParams::default())
            .await
            .context("listing Clusters")?
            .into_iter()
            .filter(|c| c.is_proxy() && c.joins_federation())
            .map(|c| c.name_any())
            .collect();
        names.sort();
        names
    } else {
        args.clusters.clone()
    };
    let ctx = Ctx {
        host,
        namespace,
        args,
        info,
    };
    let total = names.len();
    if total == 0 {
        eprintln!("no Cluster of type proxy with joinFederation: nothing to move");
        return Ok(());
    }
    let mut failed = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let step = Step {
            cluster: name,
            at: format!("[{}/{total}] {name}", i + 1),
            started: Instant::now(),
        };
        let result = if args.dry_run {
            plan(&ctx, &step).await
        } else {
            migrate_one(&ctx, &step).await
        };
        match result {
            Ok(()) => {}
            Err(e) => {
                eprintln!("{}: FAILED: {e:#}", step.at);
                failed.push(name.clone());
            }
        }
    }
    if args.dry_run {
        eprintln!("dry run: nothing was changed");
    }
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {total} Cluster(s) not moved: {}; run the same command again to go on from where each stopped",
        failed.len(),
        failed.join(", ")
    );
    if !args.dry_run {
        eprintln!(
            "all {total} Cluster(s) are served by tower-server. Once no Cluster is left to the Go tower, remove it and restart tower-server with --kubesphere-adopt=all"
        );
    }
    Ok(())
}

/// One Cluster's progress lines.
struct Step<'a> {
    cluster: &'a str,
    at: String,
    started: Instant,
}

impl Step<'_> {
    fn say(&self, what: impl std::fmt::Display) {
        eprintln!(
            "{} (+{:.1}s): {what}",
            self.at,
            self.started.elapsed().as_secs_f64()
        );
    }
}

async fn server_info(host: &Client, namespace: &str) -> anyhow::Result<ServerInfo> {
    let data = Api::<ConfigMap>::namespaced(host.clone(), namespace)
        .get_opt(SERVER_INFO_CONFIGMAP)
        .await?
        .and_then(|cm| cm.data)
        .with_context(|| {
            format!(
                "tower-server has not published ConfigMap {namespace}/{SERVER_INFO_CONFIGMAP}; \
                 is it running in namespace {namespace} (--namespace)?"
            )
        })?;
    match data.get("kubesphereAdopt").map(String::as_str) {
        Some("marked") => {}
        Some(other) => anyhow::bail!(
            "tower-server takes {other} Clusters (--kubesphere-adopt={other}): with a Go tower still serving them both would write the same Clusters. \
             Restart tower-server with --kubesphere-adopt=marked (chart value kubesphere.adopt=marked) and run this again"
        ),
        None => anyhow::bail!(
            "tower-server is not in KubeSphere mode (no kubesphereAdopt in its ConfigMap); \
             start it with --kubesphere --kubesphere-adopt=marked"
        ),
    }
    let (servers, host_key) = super::published_agent_access(&data)?;
    let pod_selector: Vec<(String, String)> = data
        .get("kubespherePodSelector")
        .map(|s| {
            s.split(',')
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(
        !pod_selector.is_empty(),
        "tower-server published no pod selector for mc- Services"
    );
    Ok(ServerInfo {
        servers,
        host_key,
        pod_selector,
    })
}

/// Moves one Cluster, from wherever an earlier run left it.
async fn migrate_one(ctx: &Ctx<'_>, step: &Step<'_>) -> anyhow::Result<()> {
    let name = step.cluster;
    let cluster = get_cluster(ctx, name).await?;
    if !marked(&cluster) {
        // 1. tower-agent, with a credential of its own.
        if agent_connected(ctx, name).await? {
            step.say("tower-agent's session is up on tower-server");
        } else {
            let member = member_client(ctx, &cluster, CurrentPath::Go).await?;
            let go = go_agent_deployments(&member, name).await.with_context(|| {
                format!("cannot reach the member through Cluster {name}'s current kubeconfig (the Go tower); is its agent connected?")
            })?;
            let join = ensure_credential(ctx, name).await?;
            step.say(format!(
                "installing tower-agent ({}) in the member",
                ctx.args.agent_image
            ));
            install_agent(&member, &join, ctx.args, go.into_iter().next()).await?;
            wait(
                step,
                ctx.args.timeout,
                "tower-agent's session on tower-server",
                || async { agent_connected(ctx, name).await.ok().filter(|c| *c) },
            )
            .await?;
            step.say("tower-agent's session is up on tower-server");
        }
        // 2. The Go agent goes; with it the Go tower's last chance to write.
        remove_go_agent(ctx, step, &cluster).await?;
        step.say(format!(
            "settling {:?} for the Go tower's last update",
            ctx.args.settle
        ));
        tokio::time::sleep(ctx.args.settle).await;
        // 3. The switch.
        switch_service(ctx, step).await?;
        switch_cluster(ctx, step).await?;
    } else {
        step.say("already marked for tower-server");
    }
    // 4. tower-server's own report.
    wait(
        step,
        ctx.args.timeout,
        "tower-server to report the Cluster available",
        || async {
            let c = get_cluster(ctx, name).await.ok()?;
            let cond = c.condition("AgentAvailable")?;
            (cond.status == "True" && cond.reason.as_deref() == Some(TOWER_SERVER_AVAILABLE_REASON))
                .then_some(())
        },
    )
    .await?;
    // A Go agent that came back meanwhile would reach only a Go tower that
    // serves this Cluster no more; remove it through the new path too.
    let cluster = get_cluster(ctx, name).await?;
    let member = member_client(ctx, &cluster, CurrentPath::TowerServer).await?;
    for d in go_agents(&member, name).await? {
        delete_deployment(&member, &d).await?;
        step.say(format!("deleted leftover Go agent Deployment {d}"));
    }
    step.say("done: served by tower-server");
    Ok(())
}

/// `--dry-run`: where the Cluster is and what would be done.
async fn plan(ctx: &Ctx<'_>, step: &Step<'_>) -> anyhow::Result<()> {
    let name = step.cluster;
    let cluster = get_cluster(ctx, name).await?;
    if marked(&cluster) {
        step.say("already marked for tower-server; would only check that tower-server reports it available");
        return Ok(());
    }
    if agent_connected(ctx, name).await? {
        step.say("tower-agent's session is up; would not reinstall it");
    } else {
        step.say(format!(
            "would create Secret {}/tower-agent-{name} and Agent {name} (tokenRef), and install tower-agent ({}) in the member",
            ctx.namespace, ctx.args.agent_image
        ));
    }
    match member_client(ctx, &cluster, CurrentPath::Go).await {
        Ok(member) => match go_agents(&member, name).await {
            Ok(go) if go.is_empty() => step.say("the member shows no Go agent Deployment"),
            Ok(go) => step.say(format!(
                "would delete Go agent Deployment(s) {} and wait for the Go tower's path to close",
                go.join(", ")
            )),
            Err(e) => step.say(format!(
                "the member does not answer through its current kubeconfig ({e:#}); would go on as if its Go agent were gone"
            )),
        },
        Err(e) => step.say(format!("no usable current kubeconfig: {e:#}")),
    }
    step.say(format!(
        "would point Service {}/{SERVICE_PREFIX}{name} at {}, then write the mark {SERVED_BY_ANNOTATION}={SERVED_BY_TOWER_SERVER} with tower-server's kubeconfig",
        ctx.namespace,
        selector_text(&ctx.info.pod_selector)
    ));
    Ok(())
}

fn selector_text(selector: &[(String, String)]) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn get_cluster(ctx: &Ctx<'_>, name: &str) -> anyhow::Result<Cluster> {
    let c = Api::<Cluster>::all(ctx.host.clone())
        .get_opt(name)
        .await?
        .with_context(|| format!("Cluster {name:?} not found"))?;
    anyhow::ensure!(
        c.is_proxy() && c.joins_federation(),
        "Cluster {name} is not one a Go tower serves (type proxy with joinFederation true)"
    );
    Ok(c)
}

async fn agent_connected(ctx: &Ctx<'_>, name: &str) -> anyhow::Result<bool> {
    let agent = Api::<Agent>::all(ctx.host.clone()).get_opt(name).await?;
    Ok(agent.and_then(|a| a.status).is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_CONNECTED && c.status == "True")
    }))
}

/// Polls `check` until it gives a value, saying every so often what it waits for.
async fn wait<T, F, Fut>(
    step: &Step<'_>,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut next_report = start + REPORT_EVERY;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("gave up waiting for {what} after {timeout:?} (--timeout)");
        }
        if Instant::now() >= next_report {
            step.say(format!(
                "still waiting for {what} ({}s)",
                start.elapsed().as_secs()
            ));
            next_report += REPORT_EVERY;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The host Secret and the Agent's `tokenRef` that make the agent's
/// credential (kept when they exist), and the join token built on them.
async fn ensure_credential(ctx: &Ctx<'_>, name: &str) -> anyhow::Result<JoinToken> {
    let secret_name = format!("tower-agent-{name}");
    let secrets: Api<KubeSecret> = Api::namespaced(ctx.host.clone(), ctx.namespace);
    let token = match secrets.get_opt(&secret_name).await?.and_then(|s| s.data) {
        Some(data) if data.get("token").is_some_and(|t| !t.0.is_empty()) => {
            String::from_utf8(data["token"].0.clone())
                .with_context(|| format!("Secret {secret_name}: token is not text"))?
        }
        _ => {
            let token = Secret::generate().expose().to_string();
            let obj = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": secret_name,
                    "namespace": ctx.namespace,
                    "labels": { "app.kubernetes.io/managed-by": "towerctl", "tower.kubesphere.io/cluster": name },
                },
                "type": "Opaque",
                "stringData": { "token": token },
            });
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&obj),
                )
                .await
                .with_context(|| format!("creating Secret {}/{secret_name}", ctx.namespace))?;
            token
        }
    };
    let agent = serde_json::json!({
        "apiVersion": "tower.kubesphere.io/v1alpha1",
        "kind": "Agent",
        "metadata": { "name": name },
        "spec": { "tokenRef": { "namespace": ctx.namespace, "name": secret_name, "key": "token" } },
    });
    Api::<Agent>::all(ctx.host.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&agent),
        )
        .await
        .with_context(|| format!("applying Agent {name} (are tower's CRDs installed?)"))?;
    Ok(JoinToken {
        claims: Claims {
            servers: ctx.info.servers.clone(),
            host_key: ctx.info.host_key.clone(),
            cluster: name.to_string(),
            id: AGENT_TOKEN_ID.into(),
            expires: None,
        },
        secret: Secret::new(token),
    })
}

/// A Go agent Deployment found in the member.
struct GoAgent {
    name: String,
    service_account: Option<String>,
    kubesphere_service: Option<String>,
}

/// The member's Go agent Deployments for `cluster`: in KubeSphere's
/// namespace, running with `--proxy-server` and `--name=<cluster>` (KubeSphere
/// 3.4 names it `cluster-agent`), never tower-agent's own.
async fn go_agent_deployments(member: &Client, cluster: &str) -> anyhow::Result<Vec<GoAgent>> {
    let list = Api::<Deployment>::namespaced(member.clone(), MEMBER_NAMESPACE)
        .list(&ListParams::default())
        .await?;
    let mut found = Vec::new();
    for d in list {
        if d.name_any() == AGENT_DEPLOYMENT {
            continue;
        }
        let Some(pod) = d.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
            continue;
        };
        for c in &pod.containers {
            let argv: Vec<&str> = c
                .command
                .iter()
                .flatten()
                .chain(c.args.iter().flatten())
                .map(String::as_str)
                .collect();
            let flag = |f: &str| {
                argv.iter().enumerate().find_map(|(i, a)| {
                    a.strip_prefix(&format!("{f}="))
                        .map(str::to_string)
                        .or_else(|| {
                            (*a == f)
                                .then(|| argv.get(i + 1).map(|s| s.to_string()))
                                .flatten()
                        })
                })
            };
            if flag("--proxy-server").is_some() && flag("--name").as_deref() == Some(cluster) {
                found.push(GoAgent {
                    name: d.name_any(),
                    service_account: pod.service_account_name.clone(),
                    kubesphere_service: flag("--kubesphere-service"),
                });
                break;
            }
        }
    }
    Ok(found)
}

async fn go_agents(member: &Client, cluster: &str) -> anyhow::Result<Vec<String>> {
    Ok(go_agent_deployments(member, cluster)
        .await?
        .into_iter()
        .map(|g| g.name)
        .collect())
}

/// Applies tower-agent's Secret and Deployment in the member.
async fn install_agent(
    member: &Client,
    join: &JoinToken,
    args: &MigrateArgs,
    go: Option<GoAgent>,
) -> anyhow::Result<()> {
    // What the Go agent ran as and dialled, when it is there to ask.
    let service_account = go
        .as_ref()
        .and_then(|g| g.service_account.clone())
        .unwrap_or_else(|| GO_AGENT_SERVICE_ACCOUNT.into());
    let kubesphere_service = go
        .as_ref()
        .and_then(|g| g.kubesphere_service.clone())
        .unwrap_or_else(|| "ks-apiserver.kubesphere-system.svc:80".into());
    Api::<Namespace>::all(member.clone())
        .get(MEMBER_NAMESPACE)
        .await
        .with_context(|| format!("the member has no namespace {MEMBER_NAMESPACE}"))?;
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": AGENT_SECRET, "namespace": MEMBER_NAMESPACE, "labels": labels() },
        "type": "Opaque",
        "stringData": { "joinToken": join.encode() },
    });
    Api::<KubeSecret>::namespaced(member.clone(), MEMBER_NAMESPACE)
        .patch(
            AGENT_SECRET,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .context("writing tower-agent's Secret in the member")?;
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": AGENT_DEPLOYMENT, "namespace": MEMBER_NAMESPACE, "labels": labels() },
        "spec": {
            "replicas": 1,
            // One agent per member: a second would take the first's session over.
            "strategy": { "type": "Recreate" },
            "selector": { "matchLabels": { "app.kubernetes.io/name": AGENT_DEPLOYMENT } },
            "template": {
                "metadata": { "labels": labels() },
                "spec": {
                    "serviceAccountName": service_account,
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
                    "containers": [{
                        "name": "tower-agent",
                        "image": args.agent_image,
                        "env": [
                            { "name": "TOWER_JOIN_TOKEN", "valueFrom": { "secretKeyRef": { "name": AGENT_SECRET, "key": "joinToken" } } },
                            { "name": "TOWER_KUBESPHERE_SERVICE", "value": kubesphere_service },
                            { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                            { "name": "TOWER_OPS_LISTEN", "value": "0.0.0.0:9090" },
                        ],
                        "ports": [{ "name": "ops", "containerPort": 9090, "protocol": "TCP" }],
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "ops" } },
                        "resources": {
                            "requests": { "cpu": "100m", "memory": "64Mi" },
                            "limits": { "cpu": "1", "memory": "200M" },
                        },
                        "securityContext": {
                            "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false,
                            "capabilities": { "drop": ["ALL"] },
                        },
                    }],
                },
            },
        },
    });
    Api::<Deployment>::namespaced(member.clone(), MEMBER_NAMESPACE)
        .patch(
            AGENT_DEPLOYMENT,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&deployment),
        )
        .await
        .context("writing tower-agent's Deployment in the member")?;
    Ok(())
}

fn labels() -> serde_json::Value {
    serde_json::json!({
        "app.kubernetes.io/name": AGENT_DEPLOYMENT,
        "app.kubernetes.io/managed-by": "towerctl",
    })
}

async fn delete_deployment(member: &Client, name: &str) -> anyhow::Result<()> {
    match Api::<Deployment>::namespaced(member.clone(), MEMBER_NAMESPACE)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting Deployment {MEMBER_NAMESPACE}/{name}")),
    }
}

/// Deletes the Go agent through the Go tower's path and waits until that
/// path is dead: then the Go tower holds no session for the Cluster.
async fn remove_go_agent(ctx: &Ctx<'_>, step: &Step<'_>, cluster: &Cluster) -> anyhow::Result<()> {
    let name = step.cluster;
    let member = member_client(ctx, cluster, CurrentPath::Go).await?;
    let go = match go_agents(&member, name).await {
        Ok(go) => go,
        Err(e) => {
            step.say(format!(
                "the Go tower's path no longer answers ({e:#}): its agent is gone; going on"
            ));
            return Ok(());
        }
    };
    if go.is_empty() {
        step.say("the member shows no Go agent Deployment");
    }
    for d in &go {
        delete_deployment(&member, d).await?;
        step.say(format!("deleted the Go agent's Deployment {d}"));
    }
    wait(
        step,
        ctx.args.timeout,
        "the Go tower's path to close",
        || async {
            // Short timeouts: a dead path may hang rather than refuse.
            let probe =
                tokio::time::timeout(Duration::from_secs(5), member.apiserver_version()).await;
            (!matches!(probe, Ok(Ok(_)))).then_some(())
        },
    )
    .await?;
    step.say("the Go tower's path is closed");
    Ok(())
}

/// Points Service `mc-<cluster>` at tower-server's pods, its selector replaced
/// whole (ClusterIP, ports and endpoints stay).
async fn switch_service(ctx: &Ctx<'_>, step: &Step<'_>) -> anyhow::Result<()> {
    let name = format!("{SERVICE_PREFIX}{}", step.cluster);
    let services: Api<Service> = Api::namespaced(ctx.host.clone(), ctx.namespace);
    let svc = services.get_opt(&name).await?.with_context(|| {
        format!(
            "Service {}/{name} not found (the Go tower creates it)",
            ctx.namespace
        )
    })?;
    let current = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let wanted = &ctx.info.pod_selector;
    let same =
        current.len() == wanted.len() && wanted.iter().all(|(k, v)| current.get(k) == Some(v));
    if same {
        return Ok(());
    }
    let mut selector = serde_json::Map::new();
    for k in current.keys() {
        selector.insert(k.clone(), serde_json::Value::Null);
    }
    for (k, v) in wanted {
        selector.insert(k.clone(), v.clone().into());
    }
    services
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "spec": { "selector": selector } })),
        )
        .await
        .with_context(|| format!("pointing Service {name} at tower-server"))?;
    step.say(format!(
        "Service {name} now selects {}",
        selector_text(wanted)
    ));
    Ok(())
}

/// The one Cluster write: the mark and tower-server's kubeconfig, retried
/// while KubeSphere's webhook cannot yet reach the member through it.
async fn switch_cluster(ctx: &Ctx<'_>, step: &Step<'_>) -> anyhow::Result<()> {
    let name = step.cluster;
    let clusters: Api<Cluster> = Api::all(ctx.host.clone());
    let last_error = std::cell::RefCell::new(String::new());
    wait(
        step,
        ctx.args.timeout,
        "the Cluster write to be admitted",
        || {
            let clusters = clusters.clone();
            let last_error = &last_error;
            async move {
                let cluster = match get_cluster(ctx, name).await {
                    Ok(c) => c,
                    Err(e) => {
                        *last_error.borrow_mut() = format!("{e:#}");
                        return None;
                    }
                };
                if marked(&cluster) {
                    return Some(());
                }
                let kubeconfig = match published_kubeconfig(ctx, &cluster).await {
                    Ok(k) => k,
                    Err(e) => {
                        *last_error.borrow_mut() = format!("{e:#}");
                        return None;
                    }
                };
                let patch = serde_json::json!({
                    "metadata": {
                        "resourceVersion": cluster.resource_version(),
                        "annotations": { SERVED_BY_ANNOTATION: SERVED_BY_TOWER_SERVER },
                    },
                    "spec": { "connection": { "kubeconfig": ByteString(kubeconfig) } },
                });
                match clusters
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => Some(()),
                    Err(e) => {
                        let e = e.to_string();
                        if e != *last_error.borrow() {
                            step.say(format!("the Cluster write was refused, retrying: {e}"));
                        }
                        *last_error.borrow_mut() = e;
                        None
                    }
                }
            }
        },
    )
    .await
    .with_context(|| format!("last answer: {}", last_error.borrow()))?;
    step.say(format!(
        "Cluster {name} marked {SERVED_BY_ANNOTATION}={SERVED_BY_TOWER_SERVER}, with tower-server's kubeconfig"
    ));
    Ok(())
}

/// The kubeconfig tower-server published on the Agent for this Cluster: its
/// server must be the Cluster's endpoint.
async fn published_kubeconfig(ctx: &Ctx<'_>, cluster: &Cluster) -> anyhow::Result<Vec<u8>> {
    let name = cluster.name_any();
    let endpoint = cluster
        .spec
        .connection
        .as_ref()
        .and_then(|c| c.kubernetes_api_endpoint.clone())
        .filter(|e| !e.is_empty())
        .with_context(|| format!("Cluster {name} has no kubernetesAPIEndpoint"))?;
    let kubeconfig = Api::<Agent>::all(ctx.host.clone())
        .get_opt(&name)
        .await?
        .and_then(|a| a.status)
        .and_then(|s| s.kubeconfig)
        .map(|k| k.0)
        .filter(|k| !k.is_empty())
        .with_context(|| {
            format!("tower-server has not published a kubeconfig on Agent {name} yet")
        })?;
    let parsed = Kubeconfig::from_yaml(&String::from_utf8_lossy(&kubeconfig))?;
    let server = parsed
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone());
    anyhow::ensure!(
        server.as_deref() == Some(endpoint.as_str()),
        "the kubeconfig on Agent {name} names server {server:?}, not the Cluster's endpoint {endpoint}"
    );
    Ok(kubeconfig)
}

/// Which kubeconfig reaches the member.
#[derive(Clone, Copy)]
enum CurrentPath {
    /// The Cluster's as it is (the Go tower's, before the switch).
    Go,
    /// The Cluster's after the switch (tower-server's).
    TowerServer,
}

/// A client of the member through the Cluster's kubeconfig, with
/// `--connect-to` applied and short timeouts.
async fn member_client(
    ctx: &Ctx<'_>,
    cluster: &Cluster,
    path: CurrentPath,
) -> anyhow::Result<Client> {
    let name = cluster.name_any();
    let which = match path {
        CurrentPath::Go => "current",
        CurrentPath::TowerServer => "new",
    };
    let bytes = cluster
        .kubeconfig()
        .with_context(|| format!("Cluster {name} has no kubeconfig"))?;
    let kc = Kubeconfig::from_yaml(&String::from_utf8_lossy(bytes))
        .with_context(|| format!("Cluster {name}'s {which} kubeconfig does not parse"))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("Cluster {name}'s {which} kubeconfig is not usable"))?;
    let host = config
        .cluster_url
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = config.cluster_url.port_u16().unwrap_or(443);
    if let Some((_, to)) =
        ctx.args.connect_to.iter().find(|(from, _)| {
            *from == format!("{host}:{port}") || *from == format!("[{host}]:{port}")
        })
    {
        config.tls_server_name = Some(host.clone());
        config.cluster_url = format!("https://{to}").parse()?;
    }
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(15));
    Ok(Client::try_from(config)?)
}
