//! ks-controller-manager's cluster controller stand-in (kubesphere v3.4.1
//! pkg/controller/cluster/cluster_controller.go): what it does to Cluster objects, the part a
//! tower must coexist with. A watch enqueues a Cluster when it appears or its spec changes
//! (~178-188), a resync enqueues every Cluster each period (~212-221, default 120 s,
//! pkg/simple/client/multicluster/options.go ~28), and one sync (~303-546) adds the finalizer,
//! reaches the member through `spec.connection.kubeconfig` (via the [`ServiceDialer`]), and
//! writes `kubernetesAPIEndpoint` if empty, `Federated`, `Ready`, `kubernetesVersion`,
//! `nodeCount`, `configz`, `kubeSphereVersion` and `uid` with an Update of the whole object
//! (resourceVersion-guarded; KubeSphere's CRD has no status subresource).
//!
//! Conditions merge by type: the condition of the same type is taken out and the new one
//! appended at the end, every other condition kept in order (`updateClusterCondition`,
//! ~696-713). Each condition is stamped `metav1.Now()` for both times on every sync, so the
//! real `!reflect.DeepEqual(oldCluster.Status, cluster.Status)` (~529) is always true and the
//! real controller Updates every Cluster on every successful sync, changed or not. The
//! stand-in does the same and counts such writes apart ([`WriteCounts::timestamps_only`]).
//!
//! Left out: kubefed (the join is reduced to its preflight GET in the member, which is what
//! fails when the member is unreachable, `join.go` ~105-166), the member's `kubesphere-config`
//! ConfigMap (~537-575), user annotations (~826-876), notification clean-up, and the
//! `KubeConfigCertExpiresInSevenDays` expiry date (written without a date for direct
//! clusters).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::runtime::watcher;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::dispatcher::base64_decode;
use super::{CLUSTER_FINALIZER, HOST_CLUSTER_LABEL, ServiceDialer, clusters_api};

/// `maxRetries` (~80): a failing Cluster is retried this many times, then dropped until the
/// next resync or spec change.
const MAX_RETRIES: u32 = 15;
/// `proxyFormat` (~89): ks-apiserver reached through the member kube-apiserver's service proxy.
const PROXY_FORMAT: &str = "/api/v1/namespaces/kubesphere-system/services/:ks-apiserver:80/proxy/";

/// How the stand-in runs.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// The resync period (`clusterControllerResyncPeriod`, default 120 s).
    pub resync: Duration,
    /// The field manager of its Updates, so `managedFields` tell its writes apart.
    pub field_manager: String,
    /// Not faithful: skip an Update whose only change is condition timestamps (the real
    /// controller writes it). For tests that want a quiet KubeSphere.
    pub skip_timestamp_only_writes: bool,
    /// With the host's own kubeconfig: create the `host` Cluster when no Cluster carries the
    /// host label (`reconcileHostCluster`, ~245-287). `None`: do not.
    pub host_kubeconfig: Option<Vec<u8>>,
    /// Not in KubeSphere: watch and resync only the Clusters this label selector matches, so
    /// tests sharing a host keep their Clusters apart. `None`: every Cluster.
    pub label_selector: Option<String>,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(120),
            field_manager: "controller-manager".into(),
            skip_timestamp_only_writes: false,
            host_kubeconfig: None,
            label_selector: None,
        }
    }
}

/// The stand-in's Updates of Cluster objects, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Syncs run (successful or not).
    pub syncs: u64,
    /// Updates that added or removed the finalizer.
    pub finalizer: u64,
    /// Status Updates that changed a value (a condition's status, reason or message, a
    /// version, the uid, the endpoint, …).
    pub status: u64,
    /// Status Updates whose only change was condition timestamps or order.
    pub timestamps_only: u64,
    /// Updates the apiserver refused (conflict, webhook denial, …).
    pub refused: u64,
    /// Syncs that skipped a timestamps-only Update ([`ControllerOptions::skip_timestamp_only_writes`]).
    pub skipped_unchanged: u64,
}

impl WriteCounts {
    /// Every accepted Update.
    pub fn total(&self) -> u64 {
        self.finalizer + self.status + self.timestamps_only
    }
}

/// What one sync did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing to do (no such Cluster, `joinFederation` false, no kubeconfig, being deleted).
    Skipped(String),
    /// The status Update was made; `substantive` is false when only timestamps changed.
    Written { substantive: bool },
    /// No Update: only timestamps would have changed (never with the real behaviour).
    Unchanged,
    /// The join failed and Federated/Ready went False in a successful Update;
    /// not retried (~439-445).
    JoinFailed(String),
}

#[derive(Default)]
struct Counters {
    syncs: AtomicU64,
    finalizer: AtomicU64,
    status: AtomicU64,
    timestamps_only: AtomicU64,
    refused: AtomicU64,
    skipped_unchanged: AtomicU64,
}

struct Inner {
    host: kube::Client,
    dialer: ServiceDialer,
    options: ControllerOptions,
    counters: Counters,
    /// One sync at a time (the workqueue never hands one key to two workers).
    sync_lock: Mutex<()>,
    queue: mpsc::UnboundedSender<String>,
}

/// A running cluster-controller stand-in; stops when dropped.
pub struct ClusterController {
    inner: Arc<Inner>,
    shutdown: CancellationToken,
}

impl ClusterController {
    /// Starts the watch, the resync loop and the worker.
    pub fn start(host: kube::Client, dialer: ServiceDialer, options: ControllerOptions) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            host,
            dialer,
            options,
            counters: Counters::default(),
            sync_lock: Mutex::new(()),
            queue: tx,
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(watch(inner.clone(), shutdown.clone()));
        tokio::spawn(resync(inner.clone(), shutdown.clone()));
        tokio::spawn(work(inner.clone(), rx, shutdown.clone()));
        Self { inner, shutdown }
    }

    /// Syncs Cluster `name` now and says what it did.
    pub async fn reconcile_now(&self, name: &str) -> anyhow::Result<SyncOutcome> {
        self.inner.sync(name).await
    }

    /// The writes so far.
    pub fn writes(&self) -> WriteCounts {
        let c = &self.inner.counters;
        WriteCounts {
            syncs: c.syncs.load(Ordering::SeqCst),
            finalizer: c.finalizer.load(Ordering::SeqCst),
            status: c.status.load(Ordering::SeqCst),
            timestamps_only: c.timestamps_only.load(Ordering::SeqCst),
            refused: c.refused.load(Ordering::SeqCst),
            skipped_unchanged: c.skipped_unchanged.load(Ordering::SeqCst),
        }
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for ClusterController {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The informer's event handlers (~178-188): enqueue on add, on a spec change, on deletion
/// (a deletionTimestamp or the delete itself).
async fn watch(inner: Arc<Inner>, shutdown: CancellationToken) {
    let api = clusters_api(inner.host.clone());
    let mut specs: HashMap<String, serde_json::Value> = HashMap::new();
    let mut config = watcher::Config::default();
    if let Some(selector) = &inner.options.label_selector {
        config = config.labels(selector);
    }
    let mut events = watcher(api, config).boxed();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => match e {
                Some(Ok(e)) => e,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        match event {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                let Some(name) = obj.metadata.name.clone() else {
                    continue;
                };
                let spec = obj.data.get("spec").cloned().unwrap_or_default();
                let deleting = obj.metadata.deletion_timestamp.is_some();
                let changed = specs.get(&name) != Some(&spec);
                specs.insert(name.clone(), spec);
                if changed || deleting {
                    let _ = inner.queue.send(name);
                }
            }
            watcher::Event::Delete(obj) => {
                if let Some(name) = obj.metadata.name {
                    specs.remove(&name);
                    let _ = inner.queue.send(name);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// `wait.Until(..., resyncPeriod)` (~212-221): at once, then every period, the host cluster
/// and then every Cluster into the queue.
async fn resync(inner: Arc<Inner>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = inner.reconcile_host_cluster().await {
            tracing::warn!(error = %format!("{e:#}"), "ks stand-in: reconcile host cluster");
        }
        let mut params = ListParams::default();
        if let Some(selector) = &inner.options.label_selector {
            params = params.labels(selector);
        }
        if let Ok(list) = clusters_api(inner.host.clone()).list(&params).await {
            for c in list.items {
                if let Some(name) = c.metadata.name {
                    let _ = inner.queue.send(name);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(inner.options.resync) => {}
        }
    }
}

/// The worker (~227-243) with the queue's dedup and `handleErr`'s rate-limited retries
/// (~679-694; `DefaultControllerRateLimiter`: 5 ms × 2^n).
async fn work(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
) {
    let mut failures: HashMap<String, u32> = HashMap::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv() => match n { Some(n) => n, None => return },
        };
        let mut batch = vec![first];
        while let Ok(n) = rx.try_recv() {
            batch.push(n);
        }
        let mut seen = HashSet::new();
        batch.retain(|n| seen.insert(n.clone()));
        for name in batch {
            match inner.sync(&name).await {
                Ok(_) => {
                    failures.remove(&name);
                }
                Err(e) => {
                    let n = failures.entry(name.clone()).or_insert(0);
                    tracing::debug!(cluster = %name, error = %format!("{e:#}"), retry = *n, "ks stand-in: sync failed");
                    if *n < MAX_RETRIES {
                        let delay = Duration::from_millis(5u64 << *n);
                        *n += 1;
                        let queue = inner.queue.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = queue.send(name);
                        });
                    } else {
                        failures.remove(&name);
                    }
                }
            }
        }
    }
}

impl Inner {
    /// `syncCluster` (~303-546).
    async fn sync(&self, name: &str) -> anyhow::Result<SyncOutcome> {
        let _one_at_a_time = self.sync_lock.lock().await;
        self.counters.syncs.fetch_add(1, Ordering::SeqCst);
        let api = clusters_api(self.host.clone());
        let Some(obj) = api.get_opt(name).await? else {
            return Ok(SyncOutcome::Skipped("not found".into()));
        };
        let mut cluster = serde_json::to_value(&obj)?;

        // ~329-372: the finalizer, added with an Update; on deletion, removed.
        let has_finalizer = cluster["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == CLUSTER_FINALIZER));
        if cluster["metadata"]["deletionTimestamp"].is_null() {
            if !has_finalizer {
                let finalizers = cluster["metadata"]
                    .as_object_mut()
                    .context("metadata")?
                    .entry("finalizers")
                    .or_insert_with(|| serde_json::json!([]));
                if let Some(list) = finalizers.as_array_mut() {
                    list.push(CLUSTER_FINALIZER.into());
                }
                cluster = self.update(&api, name, &cluster, Write::Finalizer).await?;
            }
        } else {
            if has_finalizer {
                if let Some(list) = cluster["metadata"]["finalizers"].as_array_mut() {
                    list.retain(|x| x != CLUSTER_FINALIZER);
                }
                self.update(&api, name, &cluster, Write::Finalizer).await?;
            }
            return Ok(SyncOutcome::Skipped("being deleted".into()));
        }

        let old = cluster.clone();
        // ~379-387
        if cluster["spec"]["joinFederation"] != true {
            return Ok(SyncOutcome::Skipped("joinFederation is false".into()));
        }
        let kubeconfig = cluster["spec"]["connection"]["kubeconfig"]
            .as_str()
            .and_then(base64_decode)
            .unwrap_or_default();
        if kubeconfig.is_empty() {
            return Ok(SyncOutcome::Skipped("the kubeconfig is empty".into()));
        }
        // ~389-402
        let (member, server) = self
            .dialer
            .client(&kubeconfig)
            .await
            .with_context(|| format!("failed to create cluster config for {name}"))?;

        // ~411-460: join federation; on failure Federated and Ready go False in one Update.
        if let Err(e) = join_preflight(&member, name).await {
            let reason = format!("{e:#}");
            set_condition(
                &mut cluster,
                condition(
                    "Federated",
                    "False",
                    &reason,
                    "Cluster can not join federation control plane",
                ),
            );
            set_condition(
                &mut cluster,
                condition(
                    "Ready",
                    "False",
                    "Cluster join federation control plane failed",
                    "Cluster is Not Ready now",
                ),
            );
            // ~439-445: the sync returns the Update's own result, not the join
            // error: a status write that succeeds ends the sync without a retry,
            // and a status-only change starts no new sync (~180-186), so Ready
            // waits for the next resync (or `reconcile_now`).
            return match self.update(&api, name, &cluster, Write::Status(&old)).await {
                Ok(_) => Ok(SyncOutcome::JoinFailed(format!("{e:#}"))),
                Err(update) => {
                    tracing::debug!(cluster = name, error = %format!("{update:#}"), "ks stand-in: failed to update cluster status");
                    Err(update)
                }
            };
        }
        set_condition(
            &mut cluster,
            condition(
                "Federated",
                "True",
                "",
                "Cluster has joined federation control plane successfully",
            ),
        );

        // ~465-467: the endpoint only when empty, to the kubeconfig's server.
        let endpoint = &mut cluster["spec"]["connection"]["kubernetesAPIEndpoint"];
        if endpoint.as_str().unwrap_or_default().is_empty() {
            *endpoint = server.into();
        }
        // ~469-504: facts from the member; a failure here ends the sync without a write.
        let version = member
            .apiserver_version()
            .await
            .context("Failed to get kubernetes version")?;
        let nodes = Api::<Node>::all(member.clone())
            .list(&ListParams::default())
            .await
            .context("Failed to get cluster nodes")?;
        let configz = fetch_json(
            &member,
            "kapis/config.kubesphere.io/v1alpha2/configs/configz",
        )
        .await;
        let ks_version = fetch_json(&member, "kapis/version").await;
        let kube_system = Api::<Namespace>::all(member.clone())
            .get("kube-system")
            .await?;
        let status = cluster
            .as_object_mut()
            .context("object")?
            .entry("status")
            .or_insert_with(|| serde_json::json!({}));
        status["kubernetesVersion"] = version.git_version.into();
        // `nodeCount,omitempty`
        match nodes.items.len() {
            0 => {
                if let Some(s) = status.as_object_mut() {
                    s.remove("nodeCount");
                }
            }
            n => status["nodeCount"] = n.into(),
        }
        if let Some(configz) = configz.filter(|c| c.is_object()) {
            status["configz"] = configz;
        }
        if let Some(info) = ks_version {
            // tryFetchKubeSphereVersion (~628-665)
            let v = match info["gitVersion"].as_str().unwrap_or_default() {
                "v0.0.0" => "v3.0.0",
                "" => "unknown",
                v => v,
            };
            status["kubeSphereVersion"] = v.into();
        }
        status["uid"] = kube_system.metadata.uid.unwrap_or_default().into();
        // ~514-527
        set_condition(
            &mut cluster,
            condition("Ready", "True", "Ready", "Cluster is available now"),
        );
        set_expiry_condition(&mut cluster);

        // ~529-535: `metav1.Now()` above differs from what was read at nanosecond precision,
        // so the real comparison always finds a change and always Updates.
        let substantive = !same_but_timestamps(&old, &cluster);
        if !substantive && self.options.skip_timestamp_only_writes {
            self.counters
                .skipped_unchanged
                .fetch_add(1, Ordering::SeqCst);
            return Ok(SyncOutcome::Unchanged);
        }
        self.update(&api, name, &cluster, Write::Status(&old))
            .await?;
        Ok(SyncOutcome::Written { substantive })
    }

    /// An Update of the whole object, counted.
    async fn update(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        cluster: &serde_json::Value,
        kind: Write<'_>,
    ) -> anyhow::Result<serde_json::Value> {
        let obj: DynamicObject = serde_json::from_value(cluster.clone())?;
        let pp = PostParams {
            field_manager: Some(self.options.field_manager.clone()),
            ..Default::default()
        };
        match api.replace(name, &pp, &obj).await {
            Ok(written) => {
                let counter = match kind {
                    Write::Finalizer => &self.counters.finalizer,
                    Write::Status(old) if same_but_timestamps(old, cluster) => {
                        &self.counters.timestamps_only
                    }
                    Write::Status(_) | Write::Spec => &self.counters.status,
                };
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::to_value(&written)?)
            }
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::SeqCst);
                Err(e.into())
            }
        }
    }

    /// `reconcileHostCluster` (~245-287), only with [`ControllerOptions::host_kubeconfig`].
    async fn reconcile_host_cluster(&self) -> anyhow::Result<()> {
        let Some(kubeconfig) = &self.options.host_kubeconfig else {
            return Ok(());
        };
        let api = clusters_api(self.host.clone());
        let hosts = api
            .list(&ListParams::default().labels(HOST_CLUSTER_LABEL))
            .await?;
        let encoded = tower_certs::base64(kubeconfig);
        match hosts.items.len() {
            0 => {
                let obj: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": "cluster.kubesphere.io/v1alpha1",
                    "kind": "Cluster",
                    "metadata": {
                        "name": "host",
                        "annotations": {
                            "kubesphere.io/description": "The description was created by KubeSphere automatically. It is recommended that you use the Host Cluster to manage clusters only and deploy workloads on Member Clusters.",
                        },
                        "labels": { HOST_CLUSTER_LABEL: "", "kubesphere.io/managed": "true" },
                    },
                    "spec": {
                        "joinFederation": true,
                        "enable": true,
                        "provider": "kubesphere",
                        "connection": { "type": "direct", "kubeconfig": encoded },
                    },
                }))?;
                let pp = PostParams {
                    field_manager: Some(self.options.field_manager.clone()),
                    ..Default::default()
                };
                api.create(&pp, &obj).await?;
            }
            1 => {
                let mut host = serde_json::to_value(&hosts.items[0])?;
                let name = hosts.items[0].metadata.name.clone().unwrap_or_default();
                let managed = host["metadata"]["labels"]["kubesphere.io/managed"] == "true";
                if managed && host["spec"]["connection"]["kubeconfig"] != encoded {
                    host["spec"]["connection"]["kubeconfig"] = encoded.into();
                    self.update(&api, &name, &host, Write::Spec).await?;
                }
            }
            n => {
                anyhow::bail!("there MUST not be more than one host clusters, while there are {n}")
            }
        }
        Ok(())
    }
}

enum Write<'a> {
    /// The finalizer added or removed.
    Finalizer,
    /// The host Cluster's kubeconfig (counted with status writes).
    Spec,
    /// The status (and the endpoint), against the object as read.
    Status(&'a serde_json::Value),
}

/// kubefed's `performPreflightChecks` (join.go ~149-166): the joining cluster's service
/// account `kube-federation-system/<name>-kubesphere` is read; not found is fine, any other
/// error fails the join.
async fn join_preflight(member: &kube::Client, name: &str) -> anyhow::Result<()> {
    let sa = format!("{name}-kubesphere");
    Api::<ServiceAccount>::namespaced(member.clone(), "kube-federation-system")
        .get_opt(&sa)
        .await
        .with_context(|| {
            format!("reading service account kube-federation-system/{sa} in the joining cluster")
        })?;
    Ok(())
}

/// `tryToFetchKubeSphereComponents` / `tryFetchKubeSphereVersion` (~598-665): ks-apiserver
/// through the member kube-apiserver's service proxy, 5 s timeout; `None` on any failure.
async fn fetch_json(member: &kube::Client, path: &str) -> Option<serde_json::Value> {
    let req = http::Request::get(format!("{PROXY_FORMAT}{path}"))
        .body(Vec::new())
        .ok()?;
    let text = tokio::time::timeout(Duration::from_secs(5), member.request_text(req))
        .await
        .ok()?
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// A condition stamped now for both times, as every one the controller builds.
fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
    let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default();
    let mut c = serde_json::json!({
        "type": type_,
        "status": status,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    });
    // `reason,omitempty`, `message,omitempty`
    if !reason.is_empty() {
        c["reason"] = reason.into();
    }
    if !message.is_empty() {
        c["message"] = message.into();
    }
    c
}

/// `updateClusterCondition` (~696-713): drop the condition of the same type, append the new
/// one; every other condition stays, in order.
fn set_condition(cluster: &mut serde_json::Value, cond: serde_json::Value) {
    let Some(obj) = cluster.as_object_mut() else {
        return;
    };
    let status = obj.entry("status").or_insert_with(|| serde_json::json!({}));
    let list = status.as_object_mut().map(|s| {
        s.entry("conditions")
            .or_insert_with(|| serde_json::json!([]))
    });
    if let Some(serde_json::Value::Array(list)) = list {
        list.retain(|c| c["type"] != cond["type"]);
        list.push(cond);
    }
}

/// `updateKubeConfigExpirationDateCondition` (~790-824): not for the host, not for proxy
/// clusters (their certificates are tower's); the stand-in writes no expiry date.
fn set_expiry_condition(cluster: &mut serde_json::Value) {
    let is_host = cluster["metadata"]["labels"]
        .as_object()
        .is_some_and(|l| l.contains_key(HOST_CLUSTER_LABEL));
    if is_host || cluster["spec"]["connection"]["type"] == "proxy" {
        return;
    }
    set_condition(
        cluster,
        condition(
            "KubeConfigCertExpiresInSevenDays",
            "False",
            "KubeConfigCertExpiresInSevenDays",
            "",
        ),
    );
}

/// Whether two Cluster objects differ in nothing but condition timestamps and order.
fn same_but_timestamps(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    fn normal(v: &serde_json::Value) -> serde_json::Value {
        let mut v = v.clone();
        if let Some(meta) = v["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
            meta.remove("managedFields");
            meta.remove("generation");
        }
        if let Some(list) = v["status"]["conditions"].as_array_mut() {
            for c in list.iter_mut() {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastUpdateTime");
                    c.remove("lastTransitionTime");
                }
            }
            list.sort_by(|x, y| x["type"].as_str().cmp(&y["type"].as_str()));
        }
        v
    }
    normal(a) == normal(b)
}

/// Removes KubeSphere's finalizer from Cluster `name`, for tests that delete a Cluster after
/// the controller stopped (nothing else would ever remove it). A missing Cluster is fine.
pub async fn remove_finalizer(host: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api = clusters_api(host.clone());
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let finalizers: Vec<String> = obj
        .metadata
        .finalizers
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != CLUSTER_FINALIZER)
        .collect();
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.metadata.resource_version,
        }
    });
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}
