//! `towerctl migrate` against the test bed: a KubeSphere 3.4 host (its
//! controller, Cluster webhook and kube-proxy stand-ins) where a Go tower
//! stand-in serves three members, each running KubeSphere's `cluster-agent`
//! Deployment under a kubelet stand-in. tower-server runs beside it adopting
//! only marked Clusters; the real `towerctl` binary moves the members over,
//! is killed half-way once and run again, while a client keeps reading each
//! member through its Cluster's current kubeconfig, as KubeSphere's
//! controllers do.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use tower_server::crd::{Agent, Cluster};
use tower_tests::fixture::{self, KubeTowerServer, eventually};
use tower_tests::testbed::kubelet::Kubelet;
use tower_tests::testbed::kubesphere::{
    self, GoTower, KUBESPHERE_NAMESPACE, ServiceDialer, ServiceProxy, kubeconfig_via,
};
use tower_tests::testbed::{ControlPlane, Testbed};

/// Kube ports of this suite (ks ports are 10000 above).
const PORTS: std::ops::RangeInclusive<u16> = 16400..=16499;
const MEMBERS: [&str; 3] = ["rohan", "gondor", "arnor"];
const JWT_SECRET: &[u8] = b"migrate-test-jwt-secret-0123456789";
/// Where the Go tower's pod is; tower-server's pods are on 127.0.0.1.
const GO_POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The labels tower-server's pods carry while the Go tower runs.
const SERVER_POD_LABELS: [(&str, &str); 1] = [("app.kubernetes.io/name", "tower-server")];
/// The longest a member may be unreachable through its Cluster's kubeconfig.
const MAX_OUTAGE: Duration = Duration::from_secs(10);

struct Member {
    name: &'static str,
    plane: ControlPlane,
    kubelet: Kubelet,
    /// kube-proxy for the member's `mc-` Service, port 6443.
    proxy: ServiceProxy,
    cluster_ip: String,
    kube_system_uid: String,
}

/// A member as KubeSphere's 3.4 console and the Go tower leave it: Cluster
/// created by the console, set up by the Go tower, KubeSphere's agent
/// Deployment applied in the member and running, the member Ready.
async fn go_member(
    name: &'static str,
    plane: ControlPlane,
    kube_port: u16,
    host: &Client,
    go: &GoTower,
    dialer: &ServiceDialer,
    dir: &Path,
) -> Member {
    // ks-installer gives members KubeSphere's namespace and its cluster-admin
    // service account `kubesphere`, which the agent manifest runs as.
    plane
        .service_account_token(KUBESPHERE_NAMESPACE, "kubesphere", true)
        .await
        .unwrap();
    kubesphere::create_agent_cluster(host, name).await.unwrap();
    go.add_member(name, &plane, kube_port).await.unwrap();
    let c = cluster(host, name).await.unwrap();
    let token = c.spec.connection.as_ref().unwrap().token.clone().unwrap();
    let kubelet = Kubelet::start(&plane, Some(go.clone()), &dir.join(name))
        .await
        .unwrap();
    apply_go_agent(&plane, name, &token).await;
    let c = eventually(Duration::from_secs(60), || async {
        let c = cluster(host, name).await?;
        let ready = c.condition("Ready")?.status == "True";
        let uid = c.status.as_ref()?.uid.clone().filter(|u| !u.is_empty());
        (ready && uid.is_some() && c.condition("AgentAvailable")?.status == "True").then_some(c)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{name} never became Ready through the Go tower: {:?}",
            go.writes()
        )
    });
    let endpoint = c
        .spec
        .connection
        .as_ref()
        .unwrap()
        .kubernetes_api_endpoint
        .clone()
        .unwrap();
    let uri: http::Uri = endpoint.parse().unwrap();
    let cluster_ip = uri.host().unwrap().to_string();
    let proxy = ServiceProxy::start(dialer.clone(), &cluster_ip, 6443)
        .await
        .unwrap();
    let kube_system_uid = plane
        .run_kubectl(
            &["get", "ns", "kube-system", "-o", "jsonpath={.metadata.uid}"],
            None,
        )
        .await
        .unwrap();
    Member {
        name,
        plane,
        kubelet,
        proxy,
        cluster_ip,
        kube_system_uid,
    }
}

/// KubeSphere 3.4's agent Deployment for `name`, applied in the member.
async fn apply_go_agent(plane: &ControlPlane, name: &str, token: &str) {
    let d = kubesphere::go_agent_deployment(name, token);
    Api::<Deployment>::namespaced(plane.client().await.unwrap(), KUBESPHERE_NAMESPACE)
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
}

async fn cluster(client: &Client, name: &str) -> Option<Cluster> {
    Api::<Cluster>::all(client.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

fn kubeconfig_of(c: &Cluster) -> Vec<u8> {
    c.spec
        .connection
        .as_ref()
        .and_then(|x| x.kubeconfig.as_ref())
        .map(|k| k.0.clone())
        .unwrap_or_default()
}

fn is_marked(c: &Cluster) -> bool {
    tower_server::kube::marked(c)
}

/// What a client reading a member through its Cluster's current kubeconfig saw.
#[derive(Default)]
struct Reads {
    ok: u64,
    failed: u64,
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    longest_outage: Duration,
    last_error: String,
}

/// Reads `kube-system` of the member every 200 ms through the Cluster's
/// kubeconfig as it is at that moment (re-read from the host each time), via
/// the kube-proxy stand-in, with no retries: what KubeSphere's controllers see.
fn watch_reachability(
    host: Client,
    dialer: ServiceDialer,
    name: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> Arc<Mutex<Reads>> {
    let reads = Arc::new(Mutex::new(Reads::default()));
    let out = reads.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let result = async {
                let c = cluster(&host, name)
                    .await
                    .ok_or_else(|| "no Cluster".to_string())?;
                let (client, _) = dialer
                    .client(&kubeconfig_of(&c))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
                tokio::time::timeout(Duration::from_secs(3), api.get("kube-system"))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())
            }
            .await;
            let now = Instant::now();
            {
                let mut r = out.lock().unwrap();
                match result {
                    Ok(_) => {
                        r.ok += 1;
                        if let Some(since) = r.failing_since.take() {
                            r.longest_outage = r.longest_outage.max(now - since);
                        }
                    }
                    Err(e) => {
                        r.failed += 1;
                        r.failing_since.get_or_insert(now);
                        r.last_error = e;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    reads
}

/// One Cluster event: its resourceVersion, whether it was marked, and the
/// field managers on it.
#[derive(Clone, Debug)]
struct Seen {
    name: String,
    rv: u64,
    marked: bool,
    managers: Vec<String>,
}

/// Records every Cluster event from now on.
fn record_cluster_events(host: Client) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let api = Api::<Cluster>::all(host);
        let mut rv = "0".to_string();
        loop {
            let Ok(stream) = api.watch(&WatchParams::default(), &rv).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut stream = stream.boxed();
            while let Some(Ok(ev)) = stream.next().await {
                let c = match ev {
                    WatchEvent::Added(c) | WatchEvent::Modified(c) => c,
                    _ => continue,
                };
                rv = c.resource_version().unwrap_or_default();
                out.lock().unwrap().push(Seen {
                    name: c.name_any(),
                    rv: rv.parse().unwrap_or(0),
                    marked: is_marked(&c),
                    managers: c
                        .managed_fields()
                        .iter()
                        .filter_map(|m| m.manager.clone())
                        .collect(),
                });
            }
        }
    });
    seen
}

struct Towerctl {
    bin: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    connect_to: Vec<String>,
}

impl Towerctl {
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--namespace", KUBESPHERE_NAMESPACE, "migrate"])
            .args(args)
            .args(["--timeout", "90s", "--settle", "1s"]);
        for c in &self.connect_to {
            cmd.arg("--connect-to").arg(c);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = self.command(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("towerctl migrate {args:?}:\n{text}");
        (out.status.success(), text)
    }
}

async fn deployment_exists(plane: &ControlPlane, name: &str) -> bool {
    Api::<Deployment>::namespaced(plane.client().await.unwrap(), KUBESPHERE_NAMESPACE)
        .get_opt(name)
        .await
        .unwrap()
        .is_some()
}

/// The migration, start to end: dry run; one Cluster alone; then all,
/// killed (kill -9) right after the second member's Go agent is deleted, and
/// run again. Each member stays reachable through its Cluster's kubeconfig
/// but for a few seconds; the two towers never write the same Cluster;
/// afterwards each Cluster carries tower-server's kubeconfig and conditions,
/// its Service selects tower-server, and the members run tower-agent only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towerctl_migrate_moves_every_member_from_the_go_tower() {
    let bed: Testbed = fixture::start_logged_bed("tower-migrate.log")
        .await
        .unwrap();
    let mut planes = bed
        .clusters(&["host", MEMBERS[0], MEMBERS[1], MEMBERS[2]])
        .await
        .unwrap();
    let host_plane = planes.remove(0);
    let dir = tempfile::tempdir().unwrap();
    let host = host_plane.client().await.unwrap();
    let ks_host = kubesphere::KubeSphereHost::start(
        &host_plane,
        JWT_SECRET,
        kubesphere::ControllerOptions::default(),
        kubesphere::WebhookOptions::default(),
    )
    .await
    .unwrap();
    let dialer = ks_host.dialer.clone();
    dialer.add_pod(&SERVER_POD_LABELS, IpAddr::V4(Ipv4Addr::LOCALHOST));
    let go = GoTower::start(
        host.clone(),
        dialer.clone(),
        GO_POD_IP,
        KUBESPHERE_NAMESPACE,
    )
    .await
    .unwrap();
    let server = KubeTowerServer::start(&host_plane, dir.path(), "tower-server-0", |c| {
        c.kubesphere = Some(tower_server::kube::KubeSphereConfig {
            ports: PORTS,
            adopt: tower_server::kube::Adopt::Marked,
            pod_selector: SERVER_POD_LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        c.resync = Duration::from_secs(20);
    })
    .await
    .unwrap();
    server.wait_published(&host_plane).await.unwrap();
    let events = record_cluster_events(host.clone());

    let mut members = Vec::new();
    for (i, plane) in planes.into_iter().enumerate() {
        let port = *PORTS.start() + 1 + i as u16;
        members.push(go_member(MEMBERS[i], plane, port, &host, &go, &dialer, dir.path()).await);
    }
    let go_ca = go.ca_pem().to_string();

    // Before: kubectl through each Cluster's kubeconfig reaches its member.
    for m in &members {
        let c = cluster(&host, m.name).await.unwrap();
        let kc = kubeconfig_via(
            &String::from_utf8(kubeconfig_of(&c)).unwrap(),
            m.proxy.addr(),
        )
        .unwrap();
        let uid = kubectl_uid(&m.plane, &kc, dir.path()).await;
        assert_eq!(uid, m.kube_system_uid, "{} before the migration", m.name);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let reads: HashMap<&str, Arc<Mutex<Reads>>> = members
        .iter()
        .map(|m| {
            (
                m.name,
                watch_reachability(host.clone(), dialer.clone(), m.name, stop.clone()),
            )
        })
        .collect();

    let towerctl = Towerctl {
        bin: fixture::workspace_bin("tower-server", "towerctl").unwrap(),
        kubeconfig: host_plane.admin_kubeconfig().to_path_buf(),
        connect_to: members
            .iter()
            .map(|m| format!("{}:6443={}", m.cluster_ip, m.proxy.addr()))
            .collect(),
    };

    // Dry run: a plan, and nothing changed.
    let (ok, text) = towerctl.run(&["--all", "--dry-run"]);
    assert!(ok, "dry run failed:\n{text}");
    for m in &members {
        assert!(text.contains(&format!("] {}", m.name)), "{text}");
        assert!(
            text.contains("would delete Go agent Deployment(s) cluster-agent"),
            "{text}"
        );
    }
    assert!(text.contains("dry run: nothing was changed"), "{text}");
    assert!(
        Api::<Agent>::all(host.clone())
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "the dry run created Agents"
    );
    for m in &members {
        assert!(!deployment_exists(&m.plane, "tower-agent").await);
        assert!(deployment_exists(&m.plane, "cluster-agent").await);
    }

    // One Cluster alone.
    let (ok, text) = towerctl.run(&[members[0].name]);
    assert!(ok, "migrating {} failed:\n{text}", members[0].name);
    assert!(is_marked(&cluster(&host, members[0].name).await.unwrap()));
    for m in &members[1..] {
        let c = cluster(&host, m.name).await.unwrap();
        assert!(!is_marked(&c), "{} moved too early", m.name);
        assert!(
            String::from_utf8_lossy(&kubeconfig_of(&c)).contains(&base64_of(&go_ca)),
            "{}'s kubeconfig changed before its turn",
            m.name
        );
    }

    // All of them, killed right after the second member's Go agent is deleted.
    let log = dir.path().join("towerctl-killed.log");
    let mut killed =
        tower_tests::testbed::Process::spawn("towerctl", towerctl.command(&["--all"]), &log)
            .unwrap();
    let second = &members[1];
    let gone = eventually(Duration::from_secs(120), || async {
        (!deployment_exists(&second.plane, "cluster-agent").await).then_some(())
    })
    .await;
    killed.kill9();
    eprintln!(
        "towerctl killed:\n{}",
        String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default())
    );
    assert!(
        gone.is_some(),
        "towerctl never deleted {}'s Go agent",
        second.name
    );
    assert!(
        !is_marked(&cluster(&host, second.name).await.unwrap()),
        "killed too late: {} was switched already",
        second.name
    );
    let (ok, text) = towerctl.run(&["--all"]);
    assert!(ok, "the second run failed:\n{text}");
    assert!(text.contains("already marked for tower-server"), "{text}");
    assert!(
        !text.contains("installing tower-agent"),
        "the second run reinstalled an agent the first had installed:\n{text}"
    );

    // After: every Cluster is tower-server's.
    let tower_ca = server_ca(&host).await;
    for m in &members {
        let c = cluster(&host, m.name).await.unwrap();
        assert!(is_marked(&c), "{}", m.name);
        let available = c.condition("AgentAvailable").unwrap();
        assert_eq!(
            (available.status.as_str(), available.reason.as_deref()),
            ("True", Some("AgentConnected")),
            "{}",
            m.name
        );
        assert_eq!(c.condition("Initialized").unwrap().status, "True");
        let kubeconfig = String::from_utf8(kubeconfig_of(&c)).unwrap();
        assert!(kubeconfig.contains(&base64_of(&tower_ca)), "{}", m.name);
        assert!(!kubeconfig.contains(&base64_of(&go_ca)), "{}", m.name);
        let connection = c.spec.connection.as_ref().unwrap();
        assert_eq!(
            connection.kubernetes_api_endpoint.as_deref(),
            Some(format!("https://{}:6443", m.cluster_ip).as_str()),
            "{}: the endpoint moved",
            m.name
        );
        let svc = Api::<Service>::namespaced(host.clone(), KUBESPHERE_NAMESPACE)
            .get(&format!("mc-{}", m.name))
            .await
            .unwrap();
        let selector: BTreeMap<String, String> = svc.spec.unwrap().selector.unwrap();
        assert_eq!(
            selector,
            SERVER_POD_LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            "{}",
            m.name
        );
        assert!(
            !deployment_exists(&m.plane, "cluster-agent").await,
            "{}",
            m.name
        );
        assert!(m.kubelet.running("tower-agent"), "{}", m.name);
        assert!(!go.serving(m.name), "{}: the Go tower still serves", m.name);
        let kc = kubeconfig_via(&kubeconfig, m.proxy.addr()).unwrap();
        let uid = kubectl_uid(&m.plane, &kc, dir.path()).await;
        assert_eq!(uid, m.kube_system_uid, "{} after the migration", m.name);
    }
    // Reads through each Cluster's kubeconfig: never more than a few seconds out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for m in &members {
        let r = reads[m.name].lock().unwrap();
        eprintln!(
            "{}: {} reads ok, {} failed, longest outage {:?} (last error: {})",
            m.name, r.ok, r.failed, r.longest_outage, r.last_error
        );
        assert!(
            r.failing_since.is_none(),
            "{} still unreachable: {}",
            m.name,
            r.last_error
        );
        assert!(
            r.longest_outage <= MAX_OUTAGE,
            "{} was unreachable for {:?}: {}",
            m.name,
            r.longest_outage,
            r.last_error
        );
    }
    // The two towers never wrote the same Cluster: every Go tower write that
    // went through came before the Cluster was marked, and tower-server wrote
    // nothing to a Cluster before it was.
    let seen = events.lock().unwrap().clone();
    for m in &members {
        let marked_at = seen
            .iter()
            .filter(|s| s.name == m.name && s.marked)
            .map(|s| s.rv)
            .min()
            .unwrap_or_else(|| panic!("{} was never seen marked", m.name));
        for w in go.writes().iter().filter(|w| w.cluster == m.name) {
            if let Ok(rv) = &w.result {
                assert!(
                    rv.parse::<u64>().unwrap() < marked_at,
                    "{}: the Go tower wrote ({}) after the mark",
                    m.name,
                    w.what
                );
            }
        }
        for s in seen.iter().filter(|s| s.name == m.name && !s.marked) {
            assert!(
                !s.managers.iter().any(|x| x == "tower-server"),
                "{}: tower-server wrote it before the mark: {s:?}",
                m.name
            );
        }
    }
    eprintln!("Go tower writes: {:#?}", go.writes());
    server.stop();
    ks_host.stop().await.unwrap();
}

fn base64_of(pem: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(pem.as_bytes())
}

/// tower-server's CA, as published in its ConfigMap.
async fn server_ca(host: &Client) -> String {
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
        host.clone(),
        KUBESPHERE_NAMESPACE,
    )
    .get("tower-server")
    .await
    .unwrap();
    cm.data.unwrap()["ca.crt"].clone()
}

/// kubectl with `kubeconfig` (YAML): the member's kube-system UID.
async fn kubectl_uid(plane: &ControlPlane, kubeconfig: &str, dir: &Path) -> String {
    let path = dir.join(format!("kc-{}.yaml", rand_suffix()));
    std::fs::write(&path, kubeconfig).unwrap();
    let out = plane
        .kubectl()
        .arg("--kubeconfig")
        .arg(&path)
        .args(["get", "ns", "kube-system", "-o", "jsonpath={.metadata.uid}"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rand_suffix() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
