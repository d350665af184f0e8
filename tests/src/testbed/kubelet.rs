//! A kubelet stand-in for one member cluster of the test bed, which runs no pods: it watches
//! (polls, every 250 ms) the Deployments of `kubesphere-system` and "runs" the two kinds a
//! tower migration deals with, standing in for the Deployment and ReplicaSet controllers and
//! the kubelet together (kubernetes pkg/controller/deployment, pkg/kubelet):
//!
//! - tower-agent (first container's image contains `tower-agent`): the real binary
//!   ([`workspace_bin`]) as a [`Process`], its argv the container's `command` (less an
//!   entrypoint `/agent` or `…tower-agent`) and `args`, its environment the container's `env`
//!   and `envFrom` (`value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`) resolved as the
//!   kubelet resolves them at container start (pkg/kubelet/kubelet_pods.go
//!   `makeEnvironmentVariables`), plus what the pod's mounts and the cluster's DNS would give,
//!   as files and environment twins (below).
//! - KubeSphere 3.4's Go agent (image contains `kubesphere/tower`; the `cluster-agent`
//!   Deployment of kubesphere v3.4.1 pkg/kapis/cluster/v1alpha1/handler.go ~184-253): its
//!   session with the [`GoTower`] stand-in, opened ~300 ms after the pod starts with the
//!   `--name` and `--token` of its command, and closed ~300 ms after the pod is told to stop.
//!
//! A Deployment runs one pod while it has `replicas` >= 1 (unset is 1) and no
//! `deletionTimestamp`; replicas above one still run one pod. A change of the pod template is
//! rolled out as `strategy: Recreate` (pkg/controller/deployment/recreate.go): the old pod is
//! stopped (SIGTERM, SIGKILL after `terminationGracePeriodSeconds`, default 30) before the new
//! one starts. A container that exits is started again after 1 s and counted in
//! [`Kubelet::restarts`] (restartPolicy Always, without the back-off's growth); a new pod starts
//! from zero restarts, as a new pod's `restartCount` does. A container that cannot be created
//! (a missing Secret or ServiceAccount) is retried every second, not counted.
//!
//! What a pod gets besides its spec, since there is no pod network, volume or DNS here:
//! - its ServiceAccount's token (TokenRequest, as the projected volume gets it) in
//!   `<dir>/<pod>.pod/serviceaccount/{token,ca.crt,namespace}`; the ServiceAccount must exist
//!   (the ServiceAccount admission plugin refuses pods without one; nothing is granted here);
//! - `secret`, `configMap` and `emptyDir` volumes written under `<dir>/<pod>.pod/<volume>/`,
//!   and every argument or env value that names a mount path (or the service-account mount
//!   `/var/run/secrets/kubernetes.io/serviceaccount`) rewritten to that directory;
//! - `kubernetes.default.svc[.cluster.local][:443]` in arguments and env values rewritten to
//!   the member's kube-apiserver on loopback (cluster DNS plus kube-proxy);
//! - env twins, a container's own `env` winning: `TOWER_KUBE_CA_FILE` (the member's CA file),
//!   `TOWER_KUBE_TOKEN_FILE` (the token above), `TOWER_KUBE_APISERVER` (the member's URL, for
//!   `kubernetes.default.svc`, unless the container names its kube-apiserver itself),
//!   `POD_NAMESPACE` (what the mounted `namespace` file says) and `RUST_LOG=info`; and
//!   `TOWER_OPS_LISTEN` always empty (every pod shares loopback here, so ops ports would clash).
//!
//! Left out: `$(VAR)` expansion in command and args, probes, init containers, more than the
//! first container, projected and other volume kinds.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::kubesphere::{GoTower, KUBESPHERE_NAMESPACE};
use super::{ControlPlane, Process};
use crate::fixture::workspace_bin;

/// How often the Deployments are read.
const POLL: Duration = Duration::from_millis(250);
/// Between a container's exit and its restart.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How long the Go agent takes to connect after its pod starts, and its pod to go after it is
/// told to stop.
const GO_AGENT_DELAY: Duration = Duration::from_millis(300);
/// Where a pod's service-account token is mounted.
const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Names of the member's kube-apiserver inside the cluster, longest first.
const KUBERNETES_NAMES: [&str; 3] = [
    "kubernetes.default.svc.cluster.local",
    "kubernetes.default.svc",
    "kubernetes.default",
];

/// A running kubelet stand-in; stops everything it runs on [`Kubelet::stop`] or drop.
pub struct Kubelet {
    inner: Arc<Inner>,
    shutdown: CancellationToken,
}

struct Inner {
    client: kube::Client,
    member_url: String,
    member_port: u16,
    ca_file: PathBuf,
    ca_pem: String,
    go_tower: Option<GoTower>,
    dir: PathBuf,
    /// The current pod of each Deployment.
    pods: Mutex<HashMap<String, Pod>>,
}

/// One pod of a Deployment, run by a task of its own.
struct Pod {
    template_hash: u64,
    running: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    TowerAgent,
    GoAgent,
}

impl Kubelet {
    /// Starts running the Deployments of `kubesphere-system` in `member`; Go agents talk to
    /// `go_tower` (without one they are not run). Logs and pod files go to `dir`
    /// (`<deployment>-<n>.log` for the n-th pod of a Deployment).
    pub async fn start(
        member: &ControlPlane,
        go_tower: Option<GoTower>,
        dir: &Path,
    ) -> anyhow::Result<Kubelet> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let inner = Arc::new(Inner {
            client: member.client().await?,
            member_url: member.url.clone(),
            member_port: member.port(),
            ca_file: member.ca_file().to_path_buf(),
            ca_pem: member.ca_pem.clone(),
            go_tower,
            dir: dir.to_path_buf(),
            pods: Mutex::new(HashMap::new()),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(sync_loop(inner.clone(), shutdown.clone()));
        Ok(Kubelet { inner, shutdown })
    }

    /// Whether `deployment`'s pod is running now: its tower-agent process is alive, or its Go
    /// agent's session is open.
    pub fn running(&self, deployment: &str) -> bool {
        lock(&self.inner.pods)
            .get(deployment)
            .is_some_and(|p| p.running.load(Ordering::SeqCst))
    }

    /// Restarts of `deployment`'s current pod (0 without a pod).
    pub fn restarts(&self, deployment: &str) -> u32 {
        lock(&self.inner.pods)
            .get(deployment)
            .map_or(0, |p| p.restarts.load(Ordering::SeqCst))
    }

    /// The log of the `n`-th pod (from 1) of `deployment`.
    pub fn log_path(&self, deployment: &str, n: u32) -> PathBuf {
        self.inner.dir.join(format!("{deployment}-{n}.log"))
    }

    /// Stops every pod (SIGTERM to processes, Go agent sessions closed) and the polling.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Deployments read, compared with the pods run: stop pods whose Deployment went, scaled
/// to 0 or changed its template; start a pod for each Deployment without one once its old pod
/// has gone (Recreate).
async fn sync_loop(inner: Arc<Inner>, shutdown: CancellationToken) {
    let api = Api::<Deployment>::namespaced(inner.client.clone(), KUBESPHERE_NAMESPACE);
    let mut generation: HashMap<String, u32> = HashMap::new();
    let mut terminating: HashMap<String, Vec<JoinHandle<()>>> = HashMap::new();
    loop {
        if let Ok(list) = api.list(&ListParams::default()).await {
            let mut desired: HashMap<String, (u64, Kind, Deployment)> = HashMap::new();
            for d in list.items {
                let Some(name) = d.metadata.name.clone() else {
                    continue;
                };
                let Some(spec) = d.spec.as_ref() else {
                    continue;
                };
                if d.metadata.deletion_timestamp.is_some() || spec.replicas.unwrap_or(1) < 1 {
                    continue;
                }
                let Some(kind) = kind_of(spec.template.spec.as_ref()) else {
                    continue;
                };
                if kind == Kind::GoAgent && inner.go_tower.is_none() {
                    continue;
                }
                desired.insert(name, (template_hash(&spec.template), kind, d));
            }
            {
                let mut pods = lock(&inner.pods);
                let gone: Vec<String> = pods
                    .iter()
                    .filter(|(name, pod)| {
                        desired
                            .get(*name)
                            .is_none_or(|(hash, _, _)| *hash != pod.template_hash)
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in gone {
                    if let Some(pod) = pods.remove(&name) {
                        pod.stop.cancel();
                        terminating.entry(name).or_default().push(pod.task);
                    }
                }
            }
            terminating.retain(|_, tasks| {
                tasks.retain(|t| !t.is_finished());
                !tasks.is_empty()
            });
            for (name, (hash, kind, deployment)) in desired {
                if terminating.contains_key(&name) || lock(&inner.pods).contains_key(&name) {
                    continue;
                }
                let n = generation.entry(name.clone()).or_insert(0);
                *n += 1;
                let pod = start_pod(&inner, &shutdown, deployment, kind, hash, *n);
                lock(&inner.pods).insert(name, pod);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    // Every pod's token is a child of `shutdown`: wait for them to stop.
    let tasks: Vec<JoinHandle<()>> = lock(&inner.pods).drain().map(|(_, p)| p.task).collect();
    for task in tasks.into_iter().chain(terminating.into_values().flatten()) {
        let _ = task.await;
    }
}

fn kind_of(spec: Option<&PodSpec>) -> Option<Kind> {
    let image = spec?.containers.first()?.image.as_deref()?;
    if image.contains("tower-agent") {
        Some(Kind::TowerAgent)
    } else if image.contains("kubesphere/tower") {
        Some(Kind::GoAgent)
    } else {
        None
    }
}

/// A hash of the pod template (`pod-template-hash` stands for the same thing).
fn template_hash(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> u64 {
    let json = serde_json::to_string(template).unwrap_or_default();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    json.hash(&mut hasher);
    hasher.finish()
}

fn start_pod(
    inner: &Arc<Inner>,
    shutdown: &CancellationToken,
    deployment: Deployment,
    kind: Kind,
    template_hash: u64,
    n: u32,
) -> Pod {
    let running = Arc::new(AtomicBool::new(false));
    let restarts = Arc::new(AtomicU32::new(0));
    let stop = shutdown.child_token();
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let pod_name = format!("{name}-{n}");
    let task = match kind {
        Kind::TowerAgent => tokio::spawn(run_tower_agent(
            inner.clone(),
            deployment,
            pod_name,
            running.clone(),
            restarts.clone(),
            stop.clone(),
        )),
        Kind::GoAgent => tokio::spawn(run_go_agent(
            inner.clone(),
            deployment,
            pod_name,
            running.clone(),
            stop.clone(),
        )),
    };
    Pod {
        template_hash,
        running,
        restarts,
        stop,
        task,
    }
}

/// Appends a kubelet line to a pod's log.
fn note(log: &Path, line: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "kubelet stand-in: {line}");
    }
}

/// A tower-agent pod: start the container, restart it when it exits, stop it when told.
async fn run_tower_agent(
    inner: Arc<Inner>,
    deployment: Deployment,
    pod_name: String,
    running: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    stop: CancellationToken,
) {
    let log = inner.dir.join(format!("{pod_name}.log"));
    let grace = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
    loop {
        match inner.spawn_tower_agent(&deployment, &pod_name, &log).await {
            Ok(mut process) => {
                running.store(true, Ordering::SeqCst);
                let stopped = loop {
                    tokio::select! {
                        _ = stop.cancelled() => break true,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {
                            if !process.is_running() {
                                break false;
                            }
                        }
                    }
                };
                if stopped {
                    process.terminate();
                    let deadline = tokio::time::Instant::now() + grace;
                    while process.is_running() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    process.kill9();
                    running.store(false, Ordering::SeqCst);
                    return;
                }
                running.store(false, Ordering::SeqCst);
                restarts.fetch_add(1, Ordering::SeqCst);
                note(&log, "container exited; restarting in 1s");
            }
            Err(e) => note(&log, &format!("cannot start the container: {e:#}")),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESTART_DELAY) => {}
        }
    }
}

/// A Go agent pod: its session opens once the pod is up (retried while refused, as the agent
/// reconnects), and closes after the pod is told to stop.
async fn run_go_agent(
    inner: Arc<Inner>,
    deployment: Deployment,
    pod_name: String,
    running: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let Some(go) = inner.go_tower.clone() else {
        return;
    };
    let log = inner.dir.join(format!("{pod_name}.log"));
    let argv: Vec<String> = first_container(&deployment)
        .map(|c| {
            c.command
                .iter()
                .flatten()
                .chain(c.args.iter().flatten())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let flag = |name: &str| {
        argv.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
    };
    let (Some(name), token) = (flag("name"), flag("token").unwrap_or_default()) else {
        note(&log, "the Go agent has no --name; not connecting");
        return;
    };
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(GO_AGENT_DELAY) => {}
    }
    loop {
        match go.agent_connects(&name, &token).await {
            Ok(()) => break,
            Err(e) => note(&log, &format!("Go agent {name}: {e:#}")),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESTART_DELAY) => {}
        }
    }
    note(&log, &format!("Go agent {name}: connected"));
    running.store(true, Ordering::SeqCst);
    stop.cancelled().await;
    tokio::time::sleep(GO_AGENT_DELAY).await;
    if let Err(e) = go.set_agent_connected(&name, false).await {
        note(&log, &format!("Go agent {name}: {e:#}"));
    }
    note(&log, &format!("Go agent {name}: disconnected"));
    running.store(false, Ordering::SeqCst);
}

fn first_container(deployment: &Deployment) -> Option<&Container> {
    deployment
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()
}

impl Inner {
    /// Creates the container's environment and files and starts the tower-agent binary.
    async fn spawn_tower_agent(
        &self,
        deployment: &Deployment,
        pod_name: &str,
        log: &Path,
    ) -> anyhow::Result<Process> {
        let namespace = deployment
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| KUBESPHERE_NAMESPACE.into());
        let pod_spec = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("no pod spec")?;
        let container = pod_spec.containers.first().context("no container")?;
        let sa = pod_spec
            .service_account_name
            .clone()
            .or_else(|| pod_spec.service_account.clone())
            .unwrap_or_else(|| "default".into());
        let pod_dir = self.dir.join(format!("{pod_name}.pod"));

        // The service-account volume.
        let token = self.service_account_token(&namespace, &sa).await?;
        let sa_dir = pod_dir.join("serviceaccount");
        std::fs::create_dir_all(&sa_dir)?;
        tower_certs::write(&sa_dir.join("token"), &token, 0o600)?;
        tower_certs::write(&sa_dir.join("ca.crt"), &self.ca_pem, 0o644)?;
        tower_certs::write(&sa_dir.join("namespace"), &namespace, 0o644)?;
        let mut mounts: Vec<(String, PathBuf)> = vec![(SA_MOUNT.into(), sa_dir.clone())];
        for mount in container.volume_mounts.iter().flatten() {
            let local = self
                .volume(&namespace, pod_spec, &mount.name, &pod_dir)
                .await?;
            let local = match mount.sub_path.as_deref().filter(|p| !p.is_empty()) {
                Some(sub) => local.join(sub),
                None => local,
            };
            mounts.push((mount.mount_path.clone(), local));
        }
        // Longest mount path first, so nested mounts win.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let localize = |value: &str| -> String {
            let mut value = value.to_string();
            for (path, local) in &mounts {
                if let Some(pos) = value.find(path.as_str()) {
                    let rest = &value[pos + path.len()..];
                    if rest.is_empty() || rest.starts_with('/') {
                        value = format!("{}{}{rest}", &value[..pos], local.display());
                        break;
                    }
                }
            }
            self.resolve_dns(&value)
        };

        // argv: the entrypoint is the binary itself.
        let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
        if argv
            .first()
            .is_some_and(|c| c == "/agent" || c.ends_with("tower-agent"))
        {
            argv.remove(0);
        }
        argv.extend(container.args.iter().flatten().cloned());
        let argv: Vec<String> = argv.iter().map(|a| localize(a)).collect();

        // The container's own environment.
        let mut own: Vec<(String, String)> = Vec::new();
        for from in container.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(secret) = &from.secret_ref {
                self.secret_data(&namespace, &secret.name, secret.optional.unwrap_or(false))
                    .await?
            } else if let Some(cm) = &from.config_map_ref {
                self.config_map_data(&namespace, &cm.name, cm.optional.unwrap_or(false))
                    .await?
            } else {
                BTreeMap::new()
            };
            own.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
        }
        for var in container.env.iter().flatten() {
            let value = match &var.value_from {
                None => var.value.clone().unwrap_or_default(),
                Some(source) => {
                    if let Some(r) = &source.secret_key_ref {
                        let data = self
                            .secret_data(&namespace, &r.name, r.optional.unwrap_or(false))
                            .await?;
                        match data.get(&r.key) {
                            Some(v) => v.clone(),
                            None if r.optional.unwrap_or(false) => continue,
                            None => bail!(
                                "couldn't find key {} in Secret {namespace}/{}",
                                r.key,
                                r.name
                            ),
                        }
                    } else if let Some(r) = &source.config_map_key_ref {
                        let data = self
                            .config_map_data(&namespace, &r.name, r.optional.unwrap_or(false))
                            .await?;
                        match data.get(&r.key) {
                            Some(v) => v.clone(),
                            None if r.optional.unwrap_or(false) => continue,
                            None => bail!(
                                "couldn't find key {} in ConfigMap {namespace}/{}",
                                r.key,
                                r.name
                            ),
                        }
                    } else if let Some(r) = &source.field_ref {
                        match r.field_path.as_str() {
                            "metadata.namespace" => namespace.clone(),
                            "metadata.name" => pod_name.to_string(),
                            "spec.serviceAccountName" => sa.clone(),
                            "spec.nodeName" => "testbed".into(),
                            "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                            other => {
                                bail!("fieldRef {other} is not supported by the kubelet stand-in")
                            }
                        }
                    } else {
                        bail!("env {}: unsupported valueFrom", var.name);
                    }
                }
            };
            own.push((var.name.clone(), value));
        }
        let own: Vec<(String, String)> = own.into_iter().map(|(k, v)| (k, localize(&v))).collect();

        let has_flag = |flags: &[&str]| {
            argv.iter().any(|a| {
                flags
                    .iter()
                    .any(|f| a == f || a.starts_with(&format!("{f}=")))
            })
        };
        let has_env = |names: &[&str]| own.iter().any(|(k, _)| names.contains(&k.as_str()));
        let mut env: Vec<(String, String)> = vec![("RUST_LOG".into(), "info".into())];
        if !has_flag(&["--kube-ca-file"]) {
            env.push((
                "TOWER_KUBE_CA_FILE".into(),
                self.ca_file.display().to_string(),
            ));
        }
        if !has_flag(&["--kube-token-file"]) {
            env.push((
                "TOWER_KUBE_TOKEN_FILE".into(),
                sa_dir.join("token").display().to_string(),
            ));
        }
        if !has_flag(&["--kube-apiserver", "--kubernetes-service"])
            && !has_env(&["TOWER_KUBE_APISERVER", "TOWER_KUBERNETES_SERVICE"])
        {
            env.push(("TOWER_KUBE_APISERVER".into(), self.member_url.clone()));
        }
        if !has_flag(&["--namespace"]) {
            env.push(("POD_NAMESPACE".into(), namespace.clone()));
        }
        env.extend(own);
        env.push(("TOWER_OPS_LISTEN".into(), String::new()));

        let bin =
            tokio::task::spawn_blocking(|| workspace_bin("tower-agent", "tower-agent")).await??;
        let mut cmd = std::process::Command::new(bin);
        cmd.args(&argv).envs(env).current_dir(&pod_dir);
        note(log, &format!("starting tower-agent {}", argv.join(" ")));
        Process::spawn(pod_name, cmd, log)
    }

    /// A token of ServiceAccount `namespace/name`, which must exist.
    async fn service_account_token(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace);
        if api.get_opt(name).await?.is_none() {
            bail!(
                "error looking up service account {namespace}/{name}: serviceaccount \"{name}\" not found"
            );
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3607),
                ..Default::default()
            },
            ..Default::default()
        };
        let response = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
        response
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .context("TokenRequest returned no token")
    }

    async fn secret_data(
        &self,
        namespace: &str,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await?;
        let Some(secret) = secret else {
            if optional {
                return Ok(BTreeMap::new());
            }
            bail!("secret \"{name}\" not found");
        };
        let mut data: BTreeMap<String, String> = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect();
        data.extend(secret.string_data.unwrap_or_default());
        Ok(data)
    }

    async fn config_map_data(
        &self,
        namespace: &str,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await?;
        match cm {
            Some(cm) => Ok(cm.data.unwrap_or_default()),
            None if optional => Ok(BTreeMap::new()),
            None => bail!("configmap \"{name}\" not found"),
        }
    }

    /// Writes volume `name` of the pod under `pod_dir` and returns its directory.
    async fn volume(
        &self,
        namespace: &str,
        pod_spec: &PodSpec,
        name: &str,
        pod_dir: &Path,
    ) -> anyhow::Result<PathBuf> {
        let volume = pod_spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .with_context(|| format!("no volume {name}"))?;
        let dir = pod_dir.join(format!("volume-{name}"));
        std::fs::create_dir_all(&dir)?;
        let (data, items) = if let Some(secret) = &volume.secret {
            let secret_name = secret.secret_name.clone().unwrap_or_default();
            (
                self.secret_data(namespace, &secret_name, secret.optional.unwrap_or(false))
                    .await?,
                secret.items.clone(),
            )
        } else if let Some(cm) = &volume.config_map {
            (
                self.config_map_data(namespace, &cm.name, cm.optional.unwrap_or(false))
                    .await?,
                cm.items.clone(),
            )
        } else if volume.empty_dir.is_some() {
            return Ok(dir);
        } else {
            bail!("volume {name}: only secret, configMap and emptyDir volumes are supported");
        };
        let files: Vec<(String, String)> = match items {
            Some(items) => items
                .into_iter()
                .filter_map(|i| data.get(&i.key).map(|v| (i.path, v.clone())))
                .collect(),
            None => data.into_iter().collect(),
        };
        for (path, value) in files {
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            tower_certs::write(&file, &value, 0o600)?;
        }
        Ok(dir)
    }

    /// Cluster DNS and kube-proxy for `kubernetes.default.svc`: the member's apiserver.
    fn resolve_dns(&self, value: &str) -> String {
        let target = format!("127.0.0.1:{}", self.member_port);
        for name in KUBERNETES_NAMES {
            for form in [format!("{name}:443"), name.to_string()] {
                if let Some(pos) = value.find(&form) {
                    let rest = &value[pos + form.len()..];
                    // A whole host (and port): not followed by more of a name or a port.
                    let whole = rest
                        .chars()
                        .next()
                        .is_none_or(|c| !(c.is_ascii_alphanumeric() || ".-:".contains(c)));
                    if whole {
                        return format!("{}{target}{rest}", &value[..pos]);
                    }
                }
            }
        }
        value.to_string()
    }
}
