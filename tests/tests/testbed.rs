//! Smoke tests of the test bed harness against the real etcd, kube-apiserver and kubectl.
//!
//! Most tests share one fleet (a test bed with a host cluster and two members) started once
//! per test binary; tests that kill, restart or count processes start their own.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use tokio::sync::OnceCell;
use tower_tests::testbed::{self, ControlPlane, Testbed};

struct Fleet {
    bed: Testbed,
    host: ControlPlane,
    members: Vec<ControlPlane>,
}

impl Fleet {
    fn clusters(&self) -> impl Iterator<Item = &ControlPlane> {
        std::iter::once(&self.host).chain(&self.members)
    }
}

/// The shared fleet. Its processes are spawned by the harness's spawner thread and its
/// directory is removed at exit, so it may outlive the runtime of the test that started it.
async fn fleet() -> &'static Fleet {
    static FLEET: OnceCell<Fleet> = OnceCell::const_new();
    FLEET
        .get_or_init(|| async {
            testbed::init_tracing();
            testbed::bin_dir();
            let started = Instant::now();
            let bed = Testbed::start().await.expect("starting the test bed");
            let mut clusters = bed
                .clusters(&["host", "member1", "member2"])
                .await
                .expect("starting host + 2 members");
            eprintln!(
                "testbed: etcd + host + 2 members ready in {:.2?}",
                started.elapsed()
            );
            let host = clusters.remove(0);
            Fleet {
                bed,
                host,
                members: clusters,
            }
        })
        .await
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testbed.tower.dev
spec:
  group: testbed.tower.dev
  scope: Namespaced
  names:
    kind: Widget
    listKind: WidgetList
    plural: widgets
    singular: widget
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size:
                  type: integer
"#;

const WIDGET: &str = r#"
apiVersion: testbed.tower.dev/v1
kind: Widget
metadata:
  name: w1
  namespace: default
spec:
  size: 3
"#;

/// Retries `f` until it returns `Ok` or `timeout` passes (RBAC and service-account lookups
/// go through informers, so a just-created binding can take a moment to apply).
async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn exercise_cluster(cp: &ControlPlane) -> anyhow::Result<()> {
    // kubectl v1.35 against the admin kubeconfig.
    let namespaces = cp.run_kubectl(&["get", "ns", "-o", "name"], None).await?;
    for ns in ["namespace/default", "namespace/kube-system"] {
        anyhow::ensure!(
            namespaces.contains(ns),
            "{}: no {ns} in {namespaces:?}",
            cp.name
        );
    }

    // A CRD becomes Established and serves objects.
    cp.run_kubectl(&["apply", "-f", "-"], Some(CRD)).await?;
    cp.run_kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd/widgets.testbed.tower.dev",
            "--timeout=60s",
        ],
        None,
    )
    .await?;
    eventually(Duration::from_secs(10), || {
        cp.run_kubectl(&["apply", "-f", "-"], Some(WIDGET))
    })
    .await?;
    let size = cp
        .run_kubectl(
            &["get", "widget", "w1", "-o", "jsonpath={.spec.size}"],
            None,
        )
        .await?;
    anyhow::ensure!(size == "3", "{}: widget size {size:?}", cp.name);

    // kube-rs with the admin kubeconfig creates and reads a ConfigMap.
    let client = cp.client().await?;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), "default");
    let name = format!("smoke-{}", cp.name);
    config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                data: Some([("cluster".to_string(), cp.name.clone())].into()),
                ..Default::default()
            },
        )
        .await?;
    let read = config_maps.get(&name).await?;
    anyhow::ensure!(
        read.data.unwrap_or_default().get("cluster") == Some(&cp.name),
        "{}: ConfigMap data did not round-trip",
        cp.name
    );

    // A ServiceAccount token without RBAC rights authenticates but is forbidden.
    let token = cp
        .service_account_token("tower-smoke", "nobody", false)
        .await?;
    let nobody = cp.client_with_token(&token).await?;
    eventually(Duration::from_secs(10), || async {
        match Api::<ConfigMap>::namespaced(nobody.clone(), "default")
            .list(&ListParams::default())
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
            other => anyhow::bail!("{}: expected 403, got {other:?}", cp.name),
        }
    })
    .await?;

    // The same with cluster-admin bound can list.
    let token = cp
        .service_account_token("tower-smoke", "boss", true)
        .await?;
    let boss = cp.client_with_token(&token).await?;
    eventually(Duration::from_secs(10), || async {
        Ok(Api::<ConfigMap>::namespaced(boss.clone(), "default")
            .list(&ListParams::default())
            .await?)
    })
    .await?;

    // The static admin token is in system:masters.
    let admin = cp.client_with_token(cp.admin_token()).await?;
    Api::<Namespace>::all(admin)
        .get("kube-system")
        .await
        .map_err(|e| anyhow::anyhow!("{}: static admin token: {e}", cp.name))?;
    Ok(())
}

#[tokio::test]
async fn clusters_serve_kubectl_crds_configmaps_and_rbac() {
    let fleet = fleet().await;
    let ports: BTreeSet<u16> = fleet.clusters().map(ControlPlane::port).collect();
    assert_eq!(ports.len(), 3, "clusters share a port");
    let prefixes: BTreeSet<&str> = fleet.clusters().map(ControlPlane::etcd_prefix).collect();
    assert_eq!(prefixes.len(), 3, "clusters share an etcd prefix");
    for cp in fleet.clusters() {
        assert!(cp.ca_file().exists() && cp.admin_kubeconfig().exists());
        assert!(cp.dir().starts_with(fleet.bed.dir()));
    }
    let started = Instant::now();
    futures::future::try_join_all(fleet.clusters().map(exercise_cluster))
        .await
        .unwrap();
    eprintln!("exercised 3 clusters in {:.2?}", started.elapsed());
}

/// What `<bin> --version` prints on stdout.
fn version_output(bin: &std::path::Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn binaries_and_apiserver_report_expected_versions() {
    let bin = testbed::bin_dir();
    let apiserver = version_output(&bin.join("kube-apiserver"));
    assert!(
        apiserver.trim().starts_with("Kubernetes v1.35."),
        "kube-apiserver --version: {apiserver:?}"
    );
    let etcd = version_output(&bin.join("etcd"));
    assert!(
        etcd.lines()
            .next()
            .unwrap_or("")
            .starts_with("etcd Version: 3.6."),
        "etcd --version: {etcd:?}"
    );

    let fleet = fleet().await;
    for cp in fleet.clusters() {
        let info = cp
            .client()
            .await
            .unwrap()
            .apiserver_version()
            .await
            .unwrap();
        assert!(
            info.git_version.starts_with("v1.35."),
            "{}: /version gitVersion {:?}",
            cp.name,
            info.git_version
        );
    }
    let kubectl = fleet
        .host
        .run_kubectl(&["version", "-o", "json"], None)
        .await
        .unwrap();
    let kubectl: serde_json::Value = serde_json::from_str(&kubectl).unwrap();
    for side in ["clientVersion", "serverVersion"] {
        let v = kubectl[side]["gitVersion"].as_str().unwrap_or("");
        assert!(v.starts_with("v1.35."), "kubectl version {side}: {v:?}");
    }
}

#[tokio::test]
async fn stopped_apiserver_restarts_on_same_port_with_its_data() {
    let fleet = fleet().await;
    let mut cp = fleet.bed.cluster("restart").await.unwrap();
    let (url, port) = (cp.url.clone(), cp.port());
    let config_maps = Api::<ConfigMap>::namespaced(cp.client().await.unwrap(), "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("survivor".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    config_maps
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();

    let pid = cp.pid().unwrap();
    cp.stop().await;
    assert_eq!(cp.pid(), None);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "apiserver not reaped"
    );
    let down = cp.client().await.unwrap().apiserver_version().await;
    assert!(
        down.is_err(),
        "apiserver still answers after stop: {down:?}"
    );

    let started = Instant::now();
    cp.restart().await.unwrap();
    eprintln!("restarted kube-apiserver in {:.2?}", started.elapsed());
    assert_eq!((cp.url.as_str(), cp.port()), (url.as_str(), port));
    let config_maps = Api::<ConfigMap>::namespaced(cp.client().await.unwrap(), "default");
    config_maps.get("survivor").await.unwrap();
}

#[tokio::test]
async fn parallel_starts_get_distinct_ports() {
    testbed::init_tracing();
    let (a, b) = tokio::join!(Testbed::start(), Testbed::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.etcd_url(), b.etcd_url());
    assert_ne!(a.dir(), b.dir());
    let (x, y, z) = tokio::join!(a.cluster("par-x"), b.cluster("par-y"), b.cluster("par-z"));
    let clusters = [x.unwrap(), y.unwrap(), z.unwrap()];
    let ports: BTreeSet<u16> = clusters.iter().map(ControlPlane::port).collect();
    assert_eq!(ports.len(), clusters.len(), "ports: {ports:?}");
    for cp in &clusters {
        assert_serves(cp).await;
    }
}

/// `cp`'s kube-apiserver answers a version request.
async fn assert_serves(cp: &ControlPlane) {
    let client = cp.client().await.unwrap();
    client.apiserver_version().await.unwrap();
}

// === no stray processes ===

/// The cmdlines of processes (other than this one) that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits until no process mentions `needle`; kills leftovers (so a failure leaves nothing
/// behind) and panics if any remain after `timeout`.
async fn assert_no_process_mentions(needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let found = processes_mentioning(needle);
        if found.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for (pid, _) in &found {
                // SAFETY: plain kill(2) of a stray test bed process.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
            panic!("stray test bed processes: {found:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const CHILD_READY: &str = "TESTBED_CHILD_READY";

/// Helper for [`no_stray_processes_after_the_test_process_dies`]: run in a child test process
/// (`TOWER_TESTBED_CHILD=panic|kill`), starts a cluster, leaks it as a shared static would be,
/// then panics, or kills its own process so that only PDEATHSIG can clean up.
#[tokio::test]
#[ignore = "run by no_stray_processes_after_the_test_process_dies"]
async fn child_that_panics() {
    let Ok(mode) = std::env::var("TOWER_TESTBED_CHILD") else {
        return;
    };
    let bed = Testbed::start().await.unwrap();
    let cp = bed.cluster("doomed").await.unwrap();
    println!(
        "{CHILD_READY} etcd={} apiserver={}",
        bed.etcd_pid(),
        cp.pid().unwrap()
    );
    std::mem::forget(cp);
    std::mem::forget(bed);
    match mode.as_str() {
        // SAFETY: the test process kills itself; nothing runs after this.
        "kill" => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
        _ => panic!("child test panics on purpose"),
    }
}

#[tokio::test]
async fn no_stray_processes_after_the_test_process_dies() {
    let bin = testbed::bin_dir();
    for mode in ["panic", "kill"] {
        let root = tempfile::Builder::new()
            .prefix("tower-testbed-child-")
            .tempdir()
            .unwrap();
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--ignored", "--exact", "child_that_panics", "--nocapture"])
            .env("TOWER_TESTBED_CHILD", mode)
            .env("TOWER_TESTBED_ROOT", root.path())
            .env("TOWER_TESTBED_BIN", bin)
            .env_remove("TOWER_KEEP_TESTBED")
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("child test timed out")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(CHILD_READY),
            "{mode}: the child never started its cluster:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{mode}: child exited {}", out.status);
        let needle = root.path().to_str().unwrap();
        assert_no_process_mentions(needle, Duration::from_secs(5)).await;
        if mode == "panic" {
            // The exit handler also removed the leaked test bed directory.
            let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
            assert!(left.is_empty(), "{mode}: left behind {left:?}");
        }
    }
}

#[tokio::test]
async fn dropping_the_testbed_kills_everything() {
    testbed::init_tracing();
    let bed = Testbed::start().await.unwrap();
    let cp = bed.cluster("dropped").await.unwrap();
    let pids = [bed.etcd_pid(), cp.pid().unwrap()];
    let dir = bed.dir().to_path_buf();

    // A cluster keeps its test bed (etcd and directory) alive.
    drop(bed);
    assert_serves(&cp).await;

    drop(cp);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still exists"
        );
    }
    if std::env::var("TOWER_KEEP_TESTBED").as_deref() != Ok("1") {
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
    assert_no_process_mentions(dir.to_str().unwrap(), Duration::ZERO).await;
}
