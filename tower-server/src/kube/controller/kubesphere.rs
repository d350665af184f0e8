//! KubeSphere mode: the set-up KubeSphere's own tower does for each Cluster it
//! serves (`type: proxy` and `joinFederation: true`), and what makes the
//! Cluster reachable the way ks-apiserver, its controllers and kubefed reach
//! a member:
//! - ports: a kube port P in the configured range and a ks port P+10000, no
//!   two Clusters alike, written to `spec.connection` once;
//! - Service `mc-<cluster>` in the server's namespace, 6443→P and 80→P+10000,
//!   selecting the tower pods (`app: tower`, `app.kubernetes.io/name: tower`),
//!   owned by the Cluster so that it goes with it;
//! - `kubernetesAPIEndpoint` `https://<ClusterIP>:6443` and
//!   `kubesphereAPIEndpoint` `http://<ClusterIP>:80`, each written only when
//!   empty;
//! - the kubeconfig with `server` = `kubernetesAPIEndpoint`, replaced only by
//!   one that reaches the same member (KubeSphere's Cluster webhook dials the
//!   member through every new kubeconfig once `status.uid` is set);
//! - the `Initialized` condition once all of that is there.
//!
//! Every replica binds the per-cluster listeners for the ports a Cluster
//! records ([`crate::gateway`]); only the leader writes.
//!
//! While a Go tower still serves the host ([`Adopt::Marked`]), a Cluster it
//! serves is *held*: its agent may connect and its Agent object is written,
//! but the Cluster, its Service and its ports are left to the Go tower until
//! `towerctl migrate` marks it ([`SERVED_BY_ANNOTATION`]).

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::status::{Availability, merge_condition};
use super::{Ctx, merge_params};
use crate::gateway::ClusterPorts;
use crate::kube::crd::{CONDITION_INITIALIZED, Cluster, Condition, FIELD_MANAGER};

/// Offset of a cluster's ks port from its kube port, as KubeSphere's tower has it.
pub const KS_PORT_OFFSET: u16 = 10_000;
/// Prefix of the per-cluster Service's name.
pub const SERVICE_PREFIX: &str = "mc-";
/// The labels KubeSphere's `mc-` Services select the tower pods by.
pub const POD_LABELS: [(&str, &str); 2] = [("app", "tower"), ("app.kubernetes.io/name", "tower")];
/// Service port of the kube listener.
pub const SERVICE_KUBE_PORT: u16 = 6443;
/// Service port of the ks listener.
pub const SERVICE_KS_PORT: u16 = 80;

/// The annotation `towerctl migrate` puts on a Cluster it has moved from a Go
/// tower to tower-server, with value [`SERVED_BY_TOWER_SERVER`].
pub const SERVED_BY_ANNOTATION: &str = "tower.kubesphere.io/served-by";
/// The value of [`SERVED_BY_ANNOTATION`] that hands a Cluster to tower-server.
pub const SERVED_BY_TOWER_SERVER: &str = "tower-server";

/// Which of the Clusters KubeSphere's tower would serve this server takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Adopt {
    /// Every one: no other tower serves this host.
    #[default]
    All,
    /// Only those marked [`SERVED_BY_ANNOTATION`]`=`[`SERVED_BY_TOWER_SERVER`]:
    /// a Go tower serves the rest while `towerctl migrate` moves them.
    Marked,
}

impl Adopt {
    /// As published in the server-info ConfigMap and taken by the flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Adopt::All => "all",
            Adopt::Marked => "marked",
        }
    }
}

impl std::str::FromStr for Adopt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Adopt::All),
            "marked" => Ok(Adopt::Marked),
            other => Err(format!("{other:?} is neither `all` nor `marked`")),
        }
    }
}

/// KubeSphere mode's settings.
#[derive(Clone, Debug)]
pub struct KubeSphereConfig {
    /// Where kube ports come from (ks ports are 10000 above).
    pub ports: RangeInclusive<u16>,
    /// Which Clusters to take.
    pub adopt: Adopt,
    /// The labels the `mc-` Services select this server's pods by
    /// ([`POD_LABELS`] unless the pods carry others while a Go tower runs).
    pub pod_selector: Vec<(String, String)>,
}

impl Default for KubeSphereConfig {
    fn default() -> Self {
        Self {
            ports: 6000..=7000,
            adopt: Adopt::All,
            pod_selector: POD_LABELS
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        }
    }
}

/// Whether `cluster` carries the mark that hands it to tower-server.
pub fn marked(cluster: &Cluster) -> bool {
    cluster
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVED_BY_ANNOTATION))
        .is_some_and(|v| v == SERVED_BY_TOWER_SERVER)
}

/// Whether KubeSphere mode listens for `cluster` (already known to be a
/// managed proxy Cluster): the ones KubeSphere's own tower serves, held ones
/// included, so that their `mc-` Service can be switched to this server
/// before their Cluster is (KubeSphere's webhook admits the switch only
/// through a kubeconfig that reaches the member then).
pub(super) fn listens(ctx: &Ctx, cluster: &Cluster) -> bool {
    ctx.config.kubesphere.is_some() && cluster.joins_federation()
}

/// Whether KubeSphere mode writes `cluster`'s set-up: those it listens for,
/// unless held.
pub(super) fn served(ctx: &Ctx, cluster: &Cluster) -> bool {
    listens(ctx, cluster) && !held(ctx, cluster)
}

/// Whether `cluster` is one a Go tower still serves: KubeSphere mode adopts
/// only marked Clusters and this one (which KubeSphere's tower would serve)
/// is not marked. Nothing of it is written but its Agent's status.
pub(super) fn held(ctx: &Ctx, cluster: &Cluster) -> bool {
    ctx.config
        .kubesphere
        .as_ref()
        .is_some_and(|k| k.adopt == Adopt::Marked)
        && cluster.joins_federation()
        && !marked(cluster)
}

/// The ports the Cluster records, if both are there and valid.
pub(super) fn recorded_ports(cluster: &Cluster) -> Option<ClusterPorts> {
    let c = cluster.spec.connection.as_ref()?;
    let kube = c.kubernetes_api_server_port.filter(|p| *p > 0)?;
    let ks = c.kubesphere_api_server_port.filter(|p| *p > 0)?;
    Some(ClusterPorts { kube, ks })
}

/// The names a cluster's kube listener answers to: its endpoint's host, the
/// `mc-` Service's names, and the gateway's own hosts.
pub(super) fn listener_hosts(ctx: &Ctx, cluster: &Cluster) -> Vec<String> {
    let name = cluster.name_any();
    let svc = format!("{SERVICE_PREFIX}{name}");
    let ns = &ctx.config.namespace;
    let mut hosts = BTreeSet::new();
    if let Some(host) = cluster
        .spec
        .connection
        .as_ref()
        .and_then(|c| c.kubernetes_api_endpoint.as_deref())
        .and_then(|e| e.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_string()))
    {
        hosts.insert(host);
    }
    for h in [
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ] {
        hosts.insert(h);
    }
    hosts.extend(ctx.server.config().gateway_hosts.iter().cloned());
    hosts.into_iter().collect()
}

/// The kubeconfig this server would write into a held Cluster: its Agent's
/// status carries it, for `towerctl migrate` to put into the Cluster together
/// with the mark, in the one write KubeSphere's webhook admits once the
/// Service reaches this server. `current` is kept while it is still good.
pub(super) fn held_kubeconfig(ctx: &Ctx, cluster: &Cluster, current: Vec<u8>) -> Vec<u8> {
    let Some(endpoint) = cluster
        .spec
        .connection
        .as_ref()
        .and_then(|c| c.kubernetes_api_endpoint.as_deref())
        .filter(|e| !e.is_empty())
    else {
        return current;
    };
    if ctx
        .server
        .kubeconfig_still_good_at(&current, endpoint, ctx.config.renew_before)
    {
        return current;
    }
    match ctx.server.kubeconfig_at(
        endpoint,
        &cluster.name_any(),
        ctx.config.client_cert_validity,
    ) {
        Ok(k) => k.into_bytes(),
        Err(e) => {
            tracing::warn!(cluster = %cluster.name_any(), error = %e, "cannot issue the held cluster's kubeconfig");
            current
        }
    }
}

/// Every replica: binds the listeners for the ports the Cluster records.
pub(super) fn ensure_listeners(ctx: &Ctx, cluster: &Cluster) -> anyhow::Result<()> {
    if let Some(ports) = recorded_ports(cluster) {
        ctx.server.ensure_cluster_listeners(
            &cluster.name_any(),
            ports,
            listener_hosts(ctx, cluster),
        )?;
    }
    Ok(())
}

/// What the leader's set-up came to.
pub(super) enum Setup {
    /// It wrote the Cluster; the watch brings it back for the rest.
    Wrote,
    /// Everything is in place: `connection` holds the keys still to write
    /// (with the conditions, in one write), `kubeconfig` the one in force.
    Ready {
        connection: Option<serde_json::Value>,
        kubeconfig: Vec<u8>,
        initialized: bool,
    },
}

/// The leader's one-time set-up of a served Cluster (after its token).
pub(super) async fn setup(
    ctx: &Ctx,
    cluster: &Cluster,
    available: &Availability,
) -> anyhow::Result<Setup> {
    let name = cluster.name_any();
    let Some(ports) = recorded_ports(cluster) else {
        let kube = allocate_port(ctx, cluster)?;
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": cluster.resource_version() },
            "spec": { "connection": {
                "kubernetesAPIServerPort": kube,
                "kubesphereAPIServerPort": kube + KS_PORT_OFFSET,
            }},
        });
        Api::<Cluster>::all(ctx.client.clone())
            .patch(&name, &merge_params(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(cluster = %name, kube, ks = kube + KS_PORT_OFFSET, "assigned the cluster's ports");
        return Ok(Setup::Wrote);
    };
    let cluster_ip = ensure_service(ctx, cluster, ports).await?;
    let connection = cluster.spec.connection.clone().unwrap_or_default();
    let mut patch = serde_json::Map::new();
    let kube_endpoint = match connection
        .kubernetes_api_endpoint
        .as_deref()
        .filter(|e| !e.is_empty())
    {
        Some(e) => e.to_string(),
        None => {
            let e = format!("https://{}:{SERVICE_KUBE_PORT}", url_host(&cluster_ip));
            patch.insert("kubernetesAPIEndpoint".into(), e.clone().into());
            e
        }
    };
    if connection
        .kubesphere_api_endpoint
        .as_deref()
        .is_none_or(str::is_empty)
    {
        let e = format!("http://{}:{SERVICE_KS_PORT}", url_host(&cluster_ip));
        patch.insert("kubesphereAPIEndpoint".into(), e.into());
    }
    let current = connection
        .kubeconfig
        .as_ref()
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let kubeconfig = if ctx.server.kubeconfig_still_good_at(
        &current,
        &kube_endpoint,
        ctx.config.renew_before,
    ) {
        current
    } else if may_replace_kubeconfig(cluster, &current, available) {
        tracing::info!(cluster = %name, server = %kube_endpoint, "writing a fresh kubeconfig");
        let fresh = ctx
            .server
            .kubeconfig_at(&kube_endpoint, &name, ctx.config.client_cert_validity)?
            .into_bytes();
        patch.insert(
            "kubeconfig".into(),
            serde_json::to_value(ByteString(fresh.clone()))?,
        );
        fresh
    } else {
        tracing::info!(
            cluster = %name,
            "the kubeconfig needs replacing, but only one that reaches the member may replace it; waiting for the agent"
        );
        current
    };
    let initialized = !kubeconfig.is_empty();
    Ok(Setup::Ready {
        connection: (!patch.is_empty()).then_some(serde_json::Value::Object(patch)),
        kubeconfig,
        initialized,
    })
}

/// A kubeconfig may be replaced when there is none, when KubeSphere has not
/// tied the Cluster to a member yet (`status.uid` empty), or when the agent is
/// connected, so that the new one reaches the same member.
fn may_replace_kubeconfig(cluster: &Cluster, current: &[u8], available: &Availability) -> bool {
    let uid_set = cluster
        .status
        .as_ref()
        .and_then(|s| s.uid.as_deref())
        .is_some_and(|u| !u.is_empty());
    current.is_empty() || !uid_set || available.connected
}

/// The conditions after set-up: `Initialized` True once it is done.
pub(super) fn initialized_condition(
    existing: &[Condition],
    initialized: bool,
) -> Option<Vec<Condition>> {
    if !initialized {
        return None;
    }
    merge_condition(
        existing,
        CONDITION_INITIALIZED,
        "True",
        "Initialized",
        "ports, Service, endpoints, token and kubeconfig are in place",
    )
}

/// The lowest kube port in the range that no Cluster records or has been
/// given by this process, with its ks port also free.
fn allocate_port(ctx: &Ctx, cluster: &Cluster) -> anyhow::Result<u16> {
    let range = ctx
        .config
        .kubesphere
        .as_ref()
        .map(|k| k.ports.clone())
        .unwrap_or(6000..=7000);
    let mut claimed = ctx.claimed_ports.lock().expect("poisoned");
    let name = cluster.name_any();
    // A claim lasts until its Cluster records ports (or is gone).
    let state = ctx.clusters.state();
    claimed.retain(|_, c| {
        state
            .iter()
            .any(|x| x.name_any() == *c && recorded_ports(x).is_none())
            || *c == name
    });
    if let Some((port, _)) = claimed.iter().find(|(_, c)| **c == name) {
        return Ok(*port);
    }
    let mut used: BTreeSet<u16> = claimed.keys().copied().collect();
    for c in ctx.clusters.state() {
        if let Some(p) = recorded_ports(&c) {
            used.insert(p.kube);
            used.insert(p.ks);
        }
    }
    let port = range
        .filter(|p| p.checked_add(KS_PORT_OFFSET).is_some())
        .find(|p| !used.contains(p) && !used.contains(&(p + KS_PORT_OFFSET)))
        .ok_or_else(|| anyhow::anyhow!("no free port left in the KubeSphere port range for cluster {name:?}; widen --kubesphere-ports"))?;
    claimed.insert(port, name);
    Ok(port)
}

/// Makes Service `mc-<cluster>` match `ports` (applied only when it differs);
/// returns its ClusterIP.
async fn ensure_service(ctx: &Ctx, owner: &Cluster, ports: ClusterPorts) -> anyhow::Result<String> {
    let cluster = owner.name_any();
    let cluster = cluster.as_str();
    let api = Api::<Service>::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let name = format!("{SERVICE_PREFIX}{cluster}");
    let selector = pod_selector(ctx);
    let wanted = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ctx.config.namespace,
            "labels": { "app.kubernetes.io/managed-by": "tower-server", "tower.kubesphere.io/cluster": cluster },
            // The Service goes with its Cluster (garbage collection).
            "ownerReferences": owner.metadata.uid.as_ref().map(|uid| vec![serde_json::json!({
                "apiVersion": "cluster.kubesphere.io/v1alpha1",
                "kind": "Cluster",
                "name": cluster,
                "uid": uid,
            })]).unwrap_or_default(),
        },
        "spec": {
            "selector": selector.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "ports": [
                { "name": "kubernetes", "protocol": "TCP", "port": SERVICE_KUBE_PORT, "targetPort": ports.kube },
                { "name": "kubesphere", "protocol": "TCP", "port": SERVICE_KS_PORT, "targetPort": ports.ks },
            ],
        },
    });
    let existing = api.get_opt(&name).await?;
    if let Some(svc) = &existing
        && service_matches(svc, &selector, ports)
        && let Some(ip) = cluster_ip(svc)
    {
        return Ok(ip);
    }
    if let Some(svc) = &existing {
        // Labels another writer (a Go tower) selected by would stay in an
        // applied selector, which would then match no pod: the selector is
        // replaced whole first, in one write, so it never selects nothing.
        let extra: Vec<&String> = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .into_iter()
            .flatten()
            .filter(|(k, _)| !selector.iter().any(|(w, _)| w == *k))
            .map(|(k, _)| k)
            .collect();
        if !extra.is_empty() {
            let mut patch = serde_json::Map::new();
            for (k, v) in &selector {
                patch.insert(k.clone(), serde_json::json!(v));
            }
            for k in extra {
                patch.insert(k.clone(), serde_json::Value::Null);
            }
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "spec": { "selector": patch } })),
            )
            .await?;
            tracing::info!(%cluster, service = %name, "the cluster's Service now selects this server's pods only");
        }
    }
    let svc = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&wanted),
        )
        .await?;
    tracing::info!(%cluster, service = %name, "applied the cluster's Service");
    cluster_ip(&svc).ok_or_else(|| anyhow::anyhow!("Service {name} has no ClusterIP"))
}

/// The labels `mc-` Services select this server's pods by.
fn pod_selector(ctx: &Ctx) -> Vec<(String, String)> {
    ctx.config
        .kubesphere
        .as_ref()
        .map(|k| k.pod_selector.clone())
        .unwrap_or_else(|| KubeSphereConfig::default().pod_selector)
}

fn service_matches(svc: &Service, selector: &[(String, String)], ports: ClusterPorts) -> bool {
    let Some(spec) = &svc.spec else { return false };
    let current = spec.selector.clone().unwrap_or_default();
    let selector_ok = current.len() == selector.len()
        && selector
            .iter()
            .all(|(k, v)| current.get(k).is_some_and(|x| x == v));
    let port_ok = |port: u16, target: u16| {
        spec.ports.iter().flatten().any(|p| {
            p.port == i32::from(port)
                && p.target_port
                    == Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                            target,
                        )),
                    )
        })
    };
    selector_ok && port_ok(SERVICE_KUBE_PORT, ports.kube) && port_ok(SERVICE_KS_PORT, ports.ks)
}

fn cluster_ip(svc: &Service) -> Option<String> {
    svc.spec
        .as_ref()?
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None")
}

/// `ip` as a URL host (IPv6 in brackets).
fn url_host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}
