//! End-to-end tests of the control-plane integration against the test bed: a
//! host cluster with the Cluster and Agent CRDs, a Tower server in Kubernetes
//! mode writing kubeconfigs and conditions, towerctl, and real agent processes
//! next to a member cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tower_proto::token::{Claims, JoinToken, Secret};
use tower_server::crd::{Agent, Cluster, ClusterSpec, Connection};
use tower_tests::fixture::{self, KubeTowerServer, agent_credential, eventually};
use tower_tests::testbed::{ControlPlane, Process, Testbed};

tower_tests::shared_env!(Env, "control-plane", start_env);

struct Env {
    bed: Testbed,
    host: ControlPlane,
    member: ControlPlane,
    _server: KubeTowerServer,
    sa_token_file: PathBuf,
    dir: tempfile::TempDir,
}

async fn start_env() -> anyhow::Result<Env> {
    let bed = fixture::start_logged_bed("tower-e2e.log").await?;
    let mut clusters = bed.clusters(&["host", "member"]).await?;
    let member = clusters.pop().expect("member");
    let host = clusters.pop().expect("host");
    let dir = tempfile::tempdir()?;
    let server = KubeTowerServer::start(&host, dir.path(), "tower-server-0", |_| {}).await?;
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await?;
    server.wait_published(&host).await?;
    Ok(Env {
        bed,
        host,
        member,
        _server: server,
        sa_token_file,
        dir,
    })
}

fn towerctl(env: &Env, args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(fixture::workspace_bin("tower-server", "towerctl").unwrap())
            .arg("--kubeconfig")
            .arg(env.host.admin_kubeconfig())
            .args(args)
            .env_remove("TOWER_STATE_DIR")
            .current_dir(env.dir.path())
            .output()
            .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn cluster(client: &Client, name: &str) -> Option<Cluster> {
    Api::<Cluster>::all(client.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

/// Waits until the Cluster's AgentAvailable condition has `status`; returns it.
/// Joins `name` with towerctl and starts its agent; waits for the Cluster to be
/// available. A client of the host, and the agent.
async fn join(env: &Env, name: &str) -> (Client, Process) {
    let client = env.host.client().await.unwrap();
    let (ok, out, err) = towerctl(env, &["join", name]);
    assert!(ok, "{err}");
    let agent = spawn_agent(
        env,
        &join_token_from_install_line(env.dir.path(), &out),
        name,
    );
    wait_available(&client, name, "True", Duration::from_secs(20)).await;
    (client, agent)
}

/// Whether Cluster `name` gets a kubeconfig in its connection within 15 s.
async fn kubeconfig_written(client: &Client, name: &str) -> bool {
    eventually(Duration::from_secs(15), || async {
        let c = cluster(client, name).await?;
        c.spec.connection?.kubeconfig.map(|_| ())
    })
    .await
    .is_some()
}

/// Creates `c` on the host.
/// A proxy Cluster as the KubeSphere console creates it: type proxy, the
/// token KubeSphere set, joinFederation and enable on.
fn console_cluster(name: &str, token: &str) -> Cluster {
    Cluster::new(
        name,
        ClusterSpec {
            join_federation: Some(true),
            enable: Some(true),
            provider: Some("kubesphere".into()),
            connection: Some(Connection {
                type_: Some("proxy".into()),
                token: Some(token.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

async fn create_cluster(client: &Client, c: &Cluster) {
    Api::<Cluster>::all(client.clone())
        .create(&PostParams::default(), c)
        .await
        .unwrap();
}

async fn wait_available(client: &Client, name: &str, status: &str, timeout: Duration) -> Cluster {
    let found = eventually(timeout, || async {
        let c = cluster(client, name).await?;
        (c.condition("AgentAvailable")?.status == status).then_some(c)
    })
    .await;
    match found {
        Some(c) => c,
        None => panic!(
            "cluster {name}: AgentAvailable never became {status}; now {:?}",
            cluster(client, name).await.and_then(|c| c.status)
        ),
    }
}

fn spawn_agent(env: &Env, token: &str, tag: &str) -> Process {
    let file = env.dir.path().join(format!("{tag}.token"));
    std::fs::write(&file, token).unwrap();
    fixture::spawn_agent_process(
        &file,
        &env.member,
        &env.sa_token_file,
        &env.dir.path().join(format!("{tag}.log")),
    )
    .unwrap()
}

/// The join token an install line reads from its file (`--set-file
/// joinToken=<file>`, relative to `dir`); the file is its owner's alone.
fn join_token_from_install_line(dir: &Path, line: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    assert!(!line.contains("--set joinToken"), "a token inline: {line}");
    let file = dir.join(
        line.split("--set-file joinToken=")
            .nth(1)
            .expect("the install line reads joinToken from a file")
            .trim(),
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
    std::fs::read_to_string(file).unwrap()
}

/// Writes `Cluster.spec.connection.kubeconfig` to a file; returns its path.
fn kubeconfig_file(c: &Cluster, dir: &Path, name: &str) -> PathBuf {
    let bytes = c
        .spec
        .connection
        .as_ref()
        .and_then(|x| x.kubeconfig.clone())
        .expect("kubeconfig written")
        .0;
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lifecycle_join_kill_return_revoke() {
    let env = env();
    let client = env.host.client().await.unwrap();
    let (ok, out, err) = towerctl(env, &["join", "rivendell"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("helm upgrade --install tower-agent"),
        "{out}"
    );
    let token = join_token_from_install_line(env.dir.path(), &out);
    // The controller writes the kubeconfig and a False condition before any agent.
    let c = wait_available(&client, "rivendell", "False", Duration::from_secs(15)).await;
    assert_eq!(
        c.condition("AgentAvailable").unwrap().reason.as_deref(),
        Some("AgentDisconnected")
    );

    let mut agent = spawn_agent(env, &token, "rivendell-1");
    let started = Instant::now();
    let c = wait_available(&client, "rivendell", "True", Duration::from_secs(20)).await;
    eprintln!(
        "lifecycle: join -> AgentAvailable=True in {:.2?}",
        started.elapsed()
    );
    let kubeconfig = kubeconfig_file(&c, env.dir.path(), "rivendell");
    let ns = fixture::kubectl(&kubeconfig, &["get", "ns", "-o", "name"], None)
        .await
        .unwrap();
    assert!(ns.contains("namespace/default"));
    let a = Api::<Agent>::all(client.clone())
        .get("rivendell")
        .await
        .unwrap();
    let status = a.status.clone().unwrap();
    assert_eq!(status.agent_version.as_deref(), Some(tower_proto::VERSION));
    assert!(
        status.connected_since.is_some()
            && status.serving_replica.as_deref() == Some("tower-server-0")
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Connected" && c.status == "True")
    );
    assert_eq!(
        status.kubeconfig.as_ref().map(|k| &k.0),
        c.spec
            .connection
            .as_ref()
            .unwrap()
            .kubeconfig
            .as_ref()
            .map(|k| &k.0)
    );
    let (ok, table, _) = towerctl(env, &["status"]);
    assert!(
        ok && table
            .lines()
            .any(|l| l.starts_with("rivendell") && l.contains("proxy") && l.contains("True")),
        "{table}"
    );

    // Agent killed: False with a reason.
    let killed = Instant::now();
    agent.kill9();
    let c = wait_available(&client, "rivendell", "False", Duration::from_secs(10)).await;
    eprintln!(
        "lifecycle: agent kill -9 -> AgentAvailable=False in {:.2?}",
        killed.elapsed()
    );
    let cond = c.condition("AgentAvailable").unwrap();
    assert_eq!(cond.reason.as_deref(), Some("AgentDisconnected"));
    assert!(
        cond.message
            .as_deref()
            .unwrap_or_default()
            .contains("agent")
    );

    // Agent back: True.
    let _agent = spawn_agent(env, &token, "rivendell-2");
    wait_available(&client, "rivendell", "True", Duration::from_secs(20)).await;

    // Revoke: disconnected within 5 s, and it stays out.
    let revoked = Instant::now();
    let (ok, out, err) = towerctl(env, &["revoke", "rivendell"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let c = wait_available(&client, "rivendell", "False", Duration::from_secs(5)).await;
    eprintln!(
        "lifecycle: revoke -> AgentAvailable=False in {:.2?}",
        revoked.elapsed()
    );
    assert_eq!(
        c.condition("AgentAvailable").unwrap().reason.as_deref(),
        Some("AgentPaused")
    );
    assert!(
        fixture::kubectl(&kubeconfig, &["get", "ns", "--request-timeout=5s"], None)
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = cluster(&client, "rivendell").await.unwrap();
    assert_eq!(c.condition("AgentAvailable").unwrap().status, "False");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubesphere_console_flow() {
    let env = env();
    let client = env.host.client().await.unwrap();
    // As the KubeSphere console creates it: type proxy, token set by KubeSphere.
    let ks_token = "ks0generated0token0for0lothlorien0abcdef";
    let c = console_cluster("lothlorien", ks_token);
    create_cluster(&client, &c).await;
    let c = wait_available(&client, "lothlorien", "False", Duration::from_secs(15)).await;
    let conn = c.spec.connection.clone().unwrap();
    assert!(conn.kubeconfig.is_some(), "kubeconfig written");
    assert_eq!(
        conn.token.as_deref(),
        Some(ks_token),
        "KubeSphere's token is kept"
    );
    assert!(
        conn.kubernetes_api_endpoint
            .unwrap()
            .ends_with("/clusters/lothlorien")
    );

    // An agent started with that token (plus the server's published address) connects.
    let info = Api::<ConfigMap>::namespaced(client.clone(), "kubesphere-system")
        .get("tower-server")
        .await
        .unwrap();
    let data = info.data.unwrap();
    let join = JoinToken {
        claims: Claims {
            servers: data["sshAddresses"]
                .split(',')
                .map(str::to_string)
                .collect(),
            host_key: data["hostKeyFingerprint"].clone(),
            cluster: "lothlorien".into(),
            id: "cluster".into(),
            expires: None,
        },
        secret: Secret::new(ks_token),
    };
    let _agent = spawn_agent(env, &join.encode(), "lothlorien");
    let c = wait_available(&client, "lothlorien", "True", Duration::from_secs(20)).await;
    let kubeconfig = kubeconfig_file(&c, env.dir.path(), "lothlorien");
    let v = fixture::kubectl(&kubeconfig, &["get", "--raw", "/version"], None)
        .await
        .unwrap();
    assert!(v.contains("v1.35"));
    // Deleting the Cluster ends the live session within 5 s.
    let deleted = Instant::now();
    Api::<Cluster>::all(client.clone())
        .delete("lothlorien", &Default::default())
        .await
        .unwrap();
    let gone = eventually(Duration::from_secs(5), || async {
        fixture::kubectl(
            &kubeconfig,
            &["get", "--raw", "/version", "--request-timeout=2s"],
            None,
        )
        .await
        .err()
    })
    .await;
    assert!(gone.is_some(), "the session outlived its Cluster");
    eprintln!(
        "console flow: Cluster deleted -> tunnel refused in {:.2?}",
        deleted.elapsed()
    );
}

/// One consumer suite, given only a Cluster's `spec.connection.kubeconfig`.
async fn consumer_suite(c: &Cluster, dir: &Path, tag: &str) -> anyhow::Result<Vec<String>> {
    let path = kubeconfig_file(c, dir, tag);
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = Client::try_from(config)?;
    let ns_name = format!("consumer-{tag}");
    let mut seen = Vec::new();
    // kube-rs: namespace, ConfigMap CRUD, list, watch.
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(ns_name.clone()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns_name);
    let watch = {
        let cms = cms.clone();
        tokio::spawn(async move {
            let stream = watcher(cms, watcher::Config::default());
            tokio::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev
                    && cm.name_any() == "probe"
                {
                    return true;
                }
            }
            false
        })
    };
    let cm = k8s_openapi::api::core::v1::ConfigMap {
        metadata: ObjectMeta {
            name: Some("probe".into()),
            ..Default::default()
        },
        data: Some([("k".to_string(), "v".to_string())].into()),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await?;
    seen.push(format!("get={:?}", cms.get("probe").await?.data));
    seen.push(format!(
        "list={}",
        cms.list(&Default::default()).await?.items.len()
    ));
    seen.push(format!(
        "watch={}",
        tokio::time::timeout(Duration::from_secs(10), watch).await??
    ));
    // kubectl.
    let out = fixture::kubectl(
        &path,
        &[
            "get",
            "configmap",
            "probe",
            "-n",
            &ns_name,
            "-o",
            "jsonpath={.data.k}",
        ],
        None,
    )
    .await?;
    seen.push(format!("kubectl-get={out}"));
    fixture::kubectl(
        &path,
        &["delete", "configmap", "probe", "-n", &ns_name],
        None,
    )
    .await?;
    seen.push(format!(
        "after-delete={}",
        cms.get_opt("probe").await?.is_some()
    ));
    let version = fixture::kubectl(&path, &["version", "-o", "json"], None).await?;
    let v: serde_json::Value = serde_json::from_str(&version)?;
    seen.push(format!("server={}", v["serverVersion"]["gitVersion"]));
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_proxy_clusters_behave_the_same() {
    let env = env();
    let client = env.host.client().await.unwrap();
    // A direct Cluster: the member's own admin kubeconfig, as KubeSphere stores it.
    let direct_kubeconfig = std::fs::read(env.member.admin_kubeconfig()).unwrap();
    let direct = Cluster::new(
        "direct-member",
        ClusterSpec {
            enable: Some(true),
            connection: Some(Connection {
                type_: Some("direct".into()),
                kubeconfig: Some(k8s_openapi::ByteString(direct_kubeconfig.clone())),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    create_cluster(&client, &direct).await;
    // A proxy Cluster for the same member, joined with towerctl.
    let (ok, out, err) = towerctl(env, &["join", "proxy-member"]);
    assert!(ok, "{err}");
    let _agent = spawn_agent(
        env,
        &join_token_from_install_line(env.dir.path(), &out),
        "proxy-member",
    );
    let proxy = wait_available(&client, "proxy-member", "True", Duration::from_secs(20)).await;
    let direct = cluster(&client, "direct-member").await.unwrap();

    let d = consumer_suite(&direct, env.dir.path(), "direct")
        .await
        .unwrap();
    let p = consumer_suite(&proxy, env.dir.path(), "proxy")
        .await
        .unwrap();
    eprintln!("equivalence: direct {d:?}\n             proxy  {p:?}");
    assert_eq!(d, p, "the same consumer code saw different behaviour");

    // Tower never touched the direct Cluster.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let direct = cluster(&client, "direct-member").await.unwrap();
    assert!(direct.status.is_none(), "{:?}", direct.status);
    assert_eq!(
        direct
            .spec
            .connection
            .clone()
            .unwrap()
            .kubeconfig
            .unwrap()
            .0,
        direct_kubeconfig
    );
    assert!(
        direct
            .managed_fields()
            .iter()
            .all(|m| m.manager.as_deref() != Some(tower_server::crd::FIELD_MANAGER)),
        "tower-server wrote to a direct cluster"
    );
}

/// Counts on `writes` every change that `api`'s watch of object "quiet" sees
/// after resource version `rv0`.
fn count_writes<K>(
    api: Api<K>,
    rv0: String,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let cfg = watcher::Config::default().fields("metadata.name=quiet");
        let s = watcher(api, cfg);
        tokio::pin!(s);
        while let Some(Ok(ev)) = s.next().await {
            if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = ev
                && o.resource_version() != Some(rv0.clone())
            {
                writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_minute_writes_nothing() {
    let env = env();
    let (client, _agent) = join(env, "quiet").await;
    // Let the join settle, then count every write to this Cluster and Agent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rv = |o: Option<String>| o.unwrap_or_default();
    let c0 = rv(cluster(&client, "quiet").await.unwrap().resource_version());
    let agents: Api<Agent> = Api::all(client.clone());
    let a0 = rv(agents.get("quiet").await.unwrap().resource_version());
    let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cw = count_writes(Api::<Cluster>::all(client.clone()), c0, writes.clone());
    let aw = count_writes(agents.clone(), a0, writes.clone());
    tokio::time::sleep(Duration::from_secs(60)).await;
    cw.abort();
    aw.abort();
    let n = writes.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("quiet minute: {n} writes to Cluster/Agent \"quiet\"");
    assert_eq!(n, 0, "the controller wrote during a quiet minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_agent_object_ends_the_session() {
    let env = env();
    let (client, _agent) = join(env, "moria").await;
    let deleted = Instant::now();
    Api::<Agent>::all(client.clone())
        .delete("moria", &Default::default())
        .await
        .unwrap();
    // The server ends the session and tells the agent why (the agent may come
    // back afterwards: the Cluster still carries its token).
    let log = env.dir.path().join("moria.log");
    let ended = eventually(Duration::from_secs(5), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("agent object deleted").then_some(())
        }
    })
    .await;
    assert!(
        ended.is_some(),
        "session not ended within 5 s; agent log:\n{}",
        tower_tests::testbed::log_tail(&log, 20)
    );
    eprintln!(
        "agent object deleted -> session ended in {:.2?}",
        deleted.elapsed()
    );
}

/// Client certificates in kubeconfigs are renewed before they expire, and
/// renewal does not touch the agent's session (no reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_certificates_renew_without_reconnects() {
    let env = env();
    let host = env.bed.cluster("host-renew").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _server = KubeTowerServer::start(&host, dir.path(), "renew-0", |c| {
        c.client_cert_validity = Duration::from_secs(40);
        c.renew_before = Duration::from_secs(32);
        c.resync = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let client = host.client().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kubesphere-system");
    eventually(Duration::from_secs(30), || {
        let cms = cms.clone();
        async move { cms.get_opt("tower-server").await.ok().flatten() }
    })
    .await
    .expect("server info published");
    let out =
        std::process::Command::new(fixture::workspace_bin("tower-server", "towerctl").unwrap())
            .arg("--kubeconfig")
            .arg(host.admin_kubeconfig())
            .args(["join", "edoras", "--output", "edoras.token"])
            .env_remove("TOWER_STATE_DIR")
            .current_dir(env.dir.path())
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = join_token_from_install_line(env.dir.path(), &String::from_utf8_lossy(&out.stdout));
    let _agent = spawn_agent(env, &token, "edoras");
    let first = wait_available(&client, "edoras", "True", Duration::from_secs(20)).await;
    let kubeconfig = |c: &Cluster| {
        c.spec
            .connection
            .as_ref()
            .unwrap()
            .kubeconfig
            .clone()
            .unwrap()
            .0
    };
    let agents: Api<Agent> = Api::all(client.clone());
    let since = agents
        .get("edoras")
        .await
        .unwrap()
        .status
        .unwrap()
        .connected_since;
    // 40 s certificates renewed when under 32 s remain: within ~10 s.
    let renewed = eventually(Duration::from_secs(20), || async {
        let c = cluster(&client, "edoras").await?;
        (kubeconfig(&c) != kubeconfig(&first)).then_some(c)
    })
    .await
    .expect("kubeconfig was not renewed");
    let path = kubeconfig_file(&renewed, env.dir.path(), "edoras-renewed");
    let ns = fixture::kubectl(&path, &["get", "ns", "-o", "name"], None)
        .await
        .unwrap();
    assert!(ns.contains("namespace/default"), "renewed kubeconfig works");
    let after = agents.get("edoras").await.unwrap().status.unwrap();
    assert_eq!(
        after.connected_since, since,
        "renewal reconnected the agent"
    );
    assert_eq!(
        after.kubeconfig.map(|k| k.0),
        Some(kubeconfig(&renewed)),
        "Agent status mirrors the renewed kubeconfig"
    );
    // Renewal is not a write loop: the next renewal is ~8 s away, so 3 s are quiet.
    let rv = renewed.resource_version();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cluster(&client, "edoras").await.unwrap().resource_version(),
        rv
    );
}

/// Two replicas: exactly one holds the Lease and writes; when it stops, the
/// other takes over and keeps writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_elects_one_writer_and_fails_over() {
    use k8s_openapi::api::coordination::v1::Lease;
    let env = env();
    let host = env.bed.cluster("host-ha").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = KubeTowerServer::start(&host, dir.path(), "replica-a", |_| {})
        .await
        .unwrap();
    let b = KubeTowerServer::start(&host, dir.path(), "replica-b", |_| {})
        .await
        .unwrap();
    let client = host.client().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kubesphere-system");
    let holder = || async {
        leases
            .get_opt("tower-server-leader")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let first = eventually(Duration::from_secs(15), holder)
        .await
        .expect("a leader");
    assert!(first == "replica-a" || first == "replica-b", "{first}");
    // Both replicas share one identity (CA and host key from the same Secrets).
    let clusters: Api<Cluster> = Api::all(client.clone());
    let join = |name: &'static str| {
        let clusters = clusters.clone();
        async move {
            let c = Cluster::new(
                name,
                ClusterSpec {
                    connection: Some(Connection {
                        type_: Some("proxy".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
            clusters.create(&PostParams::default(), &c).await.unwrap();
        }
    };
    join("ha-one").await;
    assert!(
        kubeconfig_written(&client, "ha-one").await,
        "the leader did not write"
    );
    // Stop the leader; the other takes over within the lease duration.
    let stopped = Instant::now();
    if first == "replica-a" {
        a.stop()
    } else {
        b.stop()
    }
    let second = eventually(Duration::from_secs(15), || async {
        holder().await.filter(|h| *h != first)
    })
    .await
    .expect("no failover");
    eprintln!(
        "lease: {first} stopped, {second} took over in {:.2?}",
        stopped.elapsed()
    );
    join("ha-two").await;
    assert!(
        kubeconfig_written(&client, "ha-two").await,
        "the new leader did not write"
    );
}

/// Two replicas, the agent connected to the one that does not lead: every
/// replica keeps a Lease of its own; the follower reports the session on the
/// Agent and the leader says the Cluster is available, naming the follower.
/// When the follower goes, its Lease goes with it and the leader says the
/// agent is gone, though the Agent still names the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_follower_counts_and_its_loss_is_seen() {
    use k8s_openapi::api::coordination::v1::Lease;
    use tower_proto::token::{Claims, JoinToken, Secret};
    let env = env();
    let host = env.bed.cluster("host-members").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tune = |c: &mut tower_server::ControllerConfig| c.resync = Duration::from_secs(30);
    let a = KubeTowerServer::start(&host, dir.path(), "replica-a", tune)
        .await
        .unwrap();
    let b = KubeTowerServer::start(&host, dir.path(), "replica-b", tune)
        .await
        .unwrap();
    let client = host.client().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kubesphere-system");
    let leader = eventually(Duration::from_secs(15), || async {
        leases
            .get_opt("tower-server-leader")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    })
    .await
    .expect("a leader");
    let (follower, follower_name) = if leader == "replica-a" {
        (&b, "replica-b")
    } else {
        (&a, "replica-a")
    };
    for replica in ["replica-a", "replica-b"] {
        let lease = eventually(Duration::from_secs(15), || async {
            leases
                .get_opt(&format!("tower-server-{replica}"))
                .await
                .ok()
                .flatten()
        })
        .await
        .unwrap_or_else(|| panic!("no Lease of {replica}"));
        assert_eq!(
            lease.metadata.labels.unwrap()["tower.kubesphere.io/replica"],
            replica
        );
        assert_eq!(
            lease.spec.unwrap().holder_identity.as_deref(),
            Some(replica)
        );
    }
    let token = "follower0cluster0token0abcdefghijklmnop";
    let clusters: Api<Cluster> = Api::all(client.clone());
    clusters
        .create(&PostParams::default(), &console_cluster("isengard", token))
        .await
        .unwrap();
    let info = a.wait_published(&host).await.unwrap().data.unwrap();
    let join = JoinToken {
        claims: Claims {
            servers: vec![follower.ssh_addr.to_string()],
            host_key: info["hostKeyFingerprint"].clone(),
            cluster: "isengard".into(),
            id: "cluster".into(),
            expires: None,
        },
        secret: Secret::new(token),
    };
    let _agent = spawn_agent(env, &join.encode(), "isengard-follower");
    let agents: Api<tower_server::crd::Agent> = Api::all(client.clone());
    let available = eventually(Duration::from_secs(30), || async {
        let c = cluster(&client, "isengard").await?;
        (c.condition("AgentAvailable")?.status == "True").then_some(c)
    })
    .await;
    let Some(c) = available else {
        panic!(
            "isengard never available through the follower {follower_name}: Cluster {:?}\nAgent {:?}\nagent log:\n{}",
            cluster(&client, "isengard").await.and_then(|c| c.status),
            agents.get_opt("isengard").await,
            read_log(&env.dir.path().join("isengard-follower.log"))
        );
    };
    // Which replica holds it is the Agent's to say (a move changes no Cluster).
    let cond = c.condition("AgentAvailable").unwrap();
    assert_eq!(cond.reason.as_deref(), Some("AgentConnected"), "{cond:?}");
    let serving = eventually(Duration::from_secs(15), || async {
        agents
            .get_opt("isengard")
            .await
            .ok()??
            .status?
            .serving_replica
    })
    .await;
    assert_eq!(serving.as_deref(), Some(follower_name));
    // A quiet while: the leader does not take it back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = cluster(&client, "isengard").await.unwrap();
    assert_eq!(c.condition("AgentAvailable").unwrap().status, "True");

    let stopped = Instant::now();
    follower.stop();
    wait_available(&client, "isengard", "False", Duration::from_secs(30)).await;
    eprintln!(
        "the follower stopped; the leader saw its agent gone in {:.2?}",
        stopped.elapsed()
    );
}

/// A tower-server replica as a process in Kubernetes mode against `host`
/// (Leases of 4 s renewed every second); the process and its SSH port.
async fn spawn_replica(host: &ControlPlane, dir: &Path, name: &str) -> (Process, u16) {
    let log = dir.join(format!("{name}.log"));
    let mut cmd =
        std::process::Command::new(fixture::workspace_bin("tower-server", "tower-server").unwrap());
    cmd.args([
        "--kubernetes",
        "--namespace",
        "kubesphere-system",
        "--ssh-listen",
        "127.0.0.1:0",
        "--gateway-listen",
        "127.0.0.1:0",
        "--ops-listen",
        "",
        "--lease-duration",
        "4",
        "--lease-renew",
        "1",
        "--print-ports",
    ])
    .arg("--state-dir")
    .arg(dir.join(name))
    .env("KUBECONFIG", host.admin_kubeconfig())
    .env("POD_NAME", name)
    .env("RUST_LOG", "info");
    let process = Process::spawn(name, cmd, &log).unwrap();
    let port = eventually(Duration::from_secs(20), || async {
        read_log(&log)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("ssh="))
            .and_then(|p| p.parse().ok())
    })
    .await
    .unwrap_or_else(|| panic!("{name} printed no ports:\n{}", read_log(&log)));
    (process, port)
}

/// A replica that stops renewing its Lease (SIGSTOP: alive, half-open, its
/// agent's session still open as far as anyone can tell) stops counting when
/// the Lease lapses: the leader reads its cluster unavailable although the
/// Agent still says that replica serves it; resumed, it counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_lapses_with_its_lease() {
    let env = env();
    let host = env.bed.cluster("host-lapse").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixture::kube::prepare_host(&host).await.unwrap();
    let client = host.client().await.unwrap();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kubesphere-system");
    let (mut leader, _) = spawn_replica(&host, dir.path(), "replica-p").await;
    let holder = eventually(Duration::from_secs(20), || async {
        leases
            .get_opt("tower-server-leader")
            .await
            .ok()??
            .spec?
            .holder_identity
    })
    .await;
    assert_eq!(holder.as_deref(), Some("replica-p"));
    let (mut follower, ssh) = spawn_replica(&host, dir.path(), "replica-q").await;
    let info = eventually(Duration::from_secs(20), || async {
        Api::<ConfigMap>::namespaced(client.clone(), "kubesphere-system")
            .get_opt("tower-server")
            .await
            .ok()??
            .data
    })
    .await
    .expect("server info published");
    let token = "lapse0cluster0token0abcdefghijklmnopqr";
    Api::<Cluster>::all(client.clone())
        .create(&PostParams::default(), &console_cluster("fangorn", token))
        .await
        .unwrap();
    let join = JoinToken {
        claims: Claims {
            servers: vec![format!("127.0.0.1:{ssh}")],
            host_key: info["hostKeyFingerprint"].clone(),
            cluster: "fangorn".into(),
            id: "cluster".into(),
            expires: None,
        },
        secret: Secret::new(token),
    };
    let _agent = spawn_agent(env, &join.encode(), "fangorn-follower");
    wait_available(&client, "fangorn", "True", Duration::from_secs(30)).await;
    let serving = Api::<Agent>::all(client.clone())
        .get("fangorn")
        .await
        .unwrap()
        .status
        .and_then(|s| s.serving_replica);
    assert_eq!(serving.as_deref(), Some("replica-q"));
    // The welcome named the replica that took the agent.
    let agent_log = read_log(&env.dir.path().join("fangorn-follower.log"));
    assert!(agent_log.contains("server_id=replica-q"), "{agent_log}");

    // SIGSTOP: nothing more from replica-q, its session not closed.
    let stopped = Instant::now();
    // SAFETY: a plain kill(2) on a child we spawned.
    unsafe { libc::kill(follower.pid() as libc::pid_t, libc::SIGSTOP) };
    wait_available(&client, "fangorn", "False", Duration::from_secs(20)).await;
    let lapsed = stopped.elapsed();
    let agent = Api::<Agent>::all(client.clone())
        .get("fangorn")
        .await
        .unwrap()
        .status
        .unwrap();
    eprintln!(
        "replica-q paused; the leader read fangorn unavailable after {lapsed:.2?}; the Agent says {:?} serves it",
        agent.serving_replica
    );
    assert!(
        lapsed >= Duration::from_secs(2),
        "unavailable before the Lease could lapse ({lapsed:?})"
    );
    // SAFETY: as above.
    unsafe { libc::kill(follower.pid() as libc::pid_t, libc::SIGCONT) };
    follower.kill9();
    leader.kill9();
}

/// Starts the real agent binary with exactly the flags KubeSphere 3.4's agent
/// Deployment gives the Go agent (`pkg/kapis/cluster/v1alpha1/handler.go`,
/// `generateDefaultDeployment`), `--proxy-server` pointing at `proxy_server`.
/// What a pod gets from its mounts comes as their env twins: the service
/// account's CA and token, and its namespace.
fn spawn_kubesphere_shaped_agent(
    env: &Env,
    name: &str,
    token: &str,
    proxy_server: &str,
    log: &Path,
) -> Process {
    let mut cmd =
        std::process::Command::new(fixture::workspace_bin("tower-agent", "tower-agent").unwrap());
    let kubernetes = env.member.url.trim_start_matches("https://");
    cmd.args([
        format!("--name={name}"),
        format!("--token={token}"),
        format!("--proxy-server={proxy_server}"),
        "--keepalive=10s".into(),
        "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80".into(),
        format!("--kubernetes-service={kubernetes}"),
        "--v=0".into(),
    ])
    .env("TOWER_KUBE_CA_FILE", env.member.ca_file())
    .env("TOWER_KUBE_TOKEN_FILE", &env.sa_token_file)
    .env("POD_NAMESPACE", "kubesphere-system")
    .env("TOWER_OPS_LISTEN", "")
    .env("TOWER_BACKOFF_MAX", "1")
    .env("RUST_LOG", "info");
    Process::spawn("tower-agent", cmd, log).unwrap()
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// KubeSphere's agent manifest with only the image changed: the Go agent's
/// flags, the Cluster's bare token, `--proxy-server http://…` (the server's
/// WebSocket port) and no host key. The agent pins the key on first use in a
/// Secret of its namespace, saying loudly that the contact was unverified;
/// restarted, it uses that pin quietly; a server with another key is refused
/// with a message that says how to re-pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubesphere_agent_flags_connect_and_pin_the_host_key_on_first_use() {
    let env = env();
    let client = env.host.client().await.unwrap();
    let ks_token = "ks0generated0token0for0mirkwood0abcdefgh";
    let c = console_cluster("mirkwood", ks_token);
    create_cluster(&client, &c).await;
    let member = env.member.client().await.unwrap();
    fixture::create_namespace(&member, "kubesphere-system", true)
        .await
        .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(member.clone(), "kubesphere-system");
    let proxy_server = format!("http://{}", env._server.ws_addr);
    let log = env.dir.path().join("mirkwood-agent.log");
    let mut agent = spawn_kubesphere_shaped_agent(env, "mirkwood", ks_token, &proxy_server, &log);
    let c = wait_available(&client, "mirkwood", "True", Duration::from_secs(30)).await;
    let kubeconfig = kubeconfig_file(&c, env.dir.path(), "mirkwood");
    let out = fixture::kubectl(
        &kubeconfig,
        &["get", "namespace", "kube-system", "-o", "name"],
        None,
    )
    .await
    .unwrap();
    assert_eq!(out.trim(), "namespace/kube-system");
    let text = read_log(&log);
    assert!(
        text.contains("FIRST CONTACT WITH THE SERVER WAS NOT VERIFIED"),
        "the unverified first contact is not logged loudly:\n{text}"
    );
    assert!(!text.contains(ks_token), "the token reached the log");
    let info = Api::<ConfigMap>::namespaced(client.clone(), "kubesphere-system")
        .get("tower-server")
        .await
        .unwrap();
    let fingerprint = info.data.unwrap()["hostKeyFingerprint"].clone();
    let pin = secrets.get("tower-agent-host-key").await.unwrap();
    assert_eq!(
        String::from_utf8(pin.data.unwrap()["hostKey"].0.clone()).unwrap(),
        fingerprint,
        "the pin Secret holds the server's key"
    );

    // Restarted: the stored pin is used, nothing is trusted on first use.
    agent.terminate();
    let log2 = env.dir.path().join("mirkwood-agent-2.log");
    let mut agent = spawn_kubesphere_shaped_agent(env, "mirkwood", ks_token, &proxy_server, &log2);
    eventually(Duration::from_secs(20), || async {
        read_log(&log2).contains("tunnel established").then_some(())
    })
    .await
    .expect("the restarted agent did not connect");
    assert!(
        !read_log(&log2).contains("FIRST CONTACT"),
        "{}",
        read_log(&log2)
    );
    agent.terminate();

    // Another server (another host key) at the address: refused, with how to re-pin.
    let other_dir = env.dir.path().join("impostor");
    let impostor = fixture::TowerServer::start(&other_dir).await.unwrap();
    let log3 = env.dir.path().join("mirkwood-agent-3.log");
    let impostor_url = format!("http://{}", impostor.ws_addr);
    let mut agent = spawn_kubesphere_shaped_agent(env, "mirkwood", ks_token, &impostor_url, &log3);
    let refused = eventually(Duration::from_secs(20), || async {
        let text = read_log(&log3);
        (text.matches("host key mismatch").count() >= 2).then_some(text)
    })
    .await
    .unwrap_or_else(|| panic!("no repeated refusal:\n{}", read_log(&log3)));
    assert!(
        refused.contains("kubectl -n kubesphere-system delete secret tower-agent-host-key"),
        "the refusal does not say how to re-pin:\n{refused}"
    );
    assert!(refused.contains(&fingerprint), "{refused}");
    assert!(!impostor.is_connected("mirkwood"));
    assert!(!refused.contains("tunnel established"), "{refused}");
    agent.terminate();
}
