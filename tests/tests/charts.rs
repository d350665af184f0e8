//! The Helm charts against the test bed, with helm v4 built from the Go module
//! proxy and kubectl/kube-apiserver v1.35:
//!
//! - `helm lint --strict` is clean for both charts (several value sets);
//! - `helm template … | kubectl apply --dry-run=server -f -` passes against a
//!   host apiserver (server chart, with the chart's CRDs applied for real) and a
//!   member apiserver (agent chart);
//! - the CRDs in `charts/tower-server/crds/` are byte-for-byte what `towerctl
//!   crds` generates from the Rust types;
//! - the CRDs the chart installs serve the controller's types (`Cluster`,
//!   `Agent`) without losing a field;
//! - a server running with only the chart's RBAC does its whole job: identity
//!   Secrets, Lease, info ConfigMap, tokens, kubeconfigs, conditions, Agent
//!   status and `tokenRef` Secrets, and an agent connects through it;
//! - both charts run the images `scripts/images.sh` builds (name, tag,
//!   overrides), as their user 65532 with a read-only root filesystem;
//! - the defaults run highly available: 3 replicas, rolling updates that
//!   never drop below them, a PodDisruptionBudget, spread over nodes, and the
//!   peer port with its settings on the pods but in no Service; the spread
//!   defaults give way to the values that replace them;
//! - KubeSphere mode (`values-kubesphere.yaml`) renders Deployment and Service
//!   `tower` with KubeSphere's pod labels and its RBAC, and the defaults render
//!   none of it;
//! - README.md's "Replacing the Go tower in KubeSphere" runs verbatim: over a
//!   stand-in of ks-installer's Go tower, Helm adopts Service `tower` (type,
//!   address, node port and ports[0] kept), a member's join token is built from
//!   its Cluster, the member swaps the Go agent for tower-agent, and the
//!   rollback restores the Go tower; in between, a KubeSphere-mode server with
//!   only the release's RBAC takes the Go tower's Cluster over and an agent
//!   with that token connects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret as KubeSecret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::CustomResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_agent::TokenSource;
use tower_proto::token::{Claims, JoinToken, Secret};
use tower_server::ControllerConfig;
use tower_server::crd::{
    Agent, AgentSpec, AgentStatus, Cluster, ClusterSpec, ClusterStatus, Condition, Connection,
    TokenRef,
};
use tower_server::kube::AGENT_TOKEN_ID;
use tower_tests::fixture::{self, TowerAgent, agent_credential, eventually};
use tower_tests::testbed::{ControlPlane, Testbed, helm_bin, install_crypto_provider};

const KUBE_VERSION: &str = "v1.35.8";
const SERVER_NS: &str = "kubesphere-system";
const CRD_FIX: &str =
    "cargo run -p tower-server --bin towerctl -- crds --output-dir charts/tower-server/crds";

fn charts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts")
}

fn chart(name: &str) -> String {
    charts_dir().join(name).display().to_string()
}

/// Runs helm with private config, cache and data directories; returns
/// (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    let home = tempfile::tempdir().expect("helm home");
    let out = std::process::Command::new(helm_bin())
        .args(args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template` for v1.35; panics with helm's stderr on failure.
fn template(release: &str, chart_name: &str, namespace: &str, extra: &[&str]) -> String {
    let chart = chart(chart_name);
    let mut args = vec![
        "template",
        release,
        chart.as_str(),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = helm(&args);
    assert!(ok, "helm {} failed:\n{err}", args.join(" "));
    out
}

/// A join token as `towerctl join` prints it in its helm line.
fn realistic_join_token(cluster: &str) -> String {
    JoinToken {
        claims: Claims {
            servers: vec!["tower.example.com:7022".into(), "10.0.0.7:7022".into()],
            host_key: "SHA256:Y2hhcnRzLXRlc3QtaG9zdC1rZXktZmluZ2VycHJpbnQ".into(),
            cluster: cluster.into(),
            id: "cluster".into(),
            expires: None,
        },
        secret: Secret::generate(),
    }
    .encode()
}

/// Writes `status` through `name`'s status subresource; the object read back.
async fn status_round_trip<K>(api: &Api<K>, name: &str, status: &impl serde::Serialize) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap();
    api.get(name).await.unwrap()
}

// === the shared test bed: a host and a member ===

struct Env {
    _bed: Testbed,
    host: ControlPlane,
    member: ControlPlane,
}

tower_tests::shared_env!(Env, "charts", start_env);

async fn start_env() -> anyhow::Result<Env> {
    let started = Instant::now();
    let bed = fixture::start_logged_bed("tower-charts.log").await?;
    let mut clusters = bed.clusters(&["host", "member"]).await?;
    let member = clusters.pop().expect("member");
    let host = clusters.pop().expect("host");
    // The chart's CRDs, for real, as `helm install` would put them.
    let crds = charts_dir().join("tower-server/crds").display().to_string();
    host.run_kubectl(&["apply", "--server-side", "-f", &crds], None)
        .await?;
    host.run_kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/clusters.cluster.kubesphere.io",
            "crd/agents.tower.kubesphere.io",
        ],
        None,
    )
    .await?;
    for cp in [&host, &member] {
        create_namespace(cp, SERVER_NS).await?;
    }
    eprintln!(
        "charts: test bed (host with CRDs, member) ready in {:.2?}",
        started.elapsed()
    );
    Ok(Env {
        _bed: bed,
        host,
        member,
    })
}

async fn create_namespace(cp: &ControlPlane, name: &str) -> anyhow::Result<()> {
    let manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
    cp.run_kubectl(&["apply", "-f", "-"], Some(&manifest))
        .await
        .map(drop)
}

/// `kubectl apply --dry-run=server -f -` with `manifest`; returns kubectl's output.
async fn dry_run(cp: &ControlPlane, manifest: &str) -> String {
    match cp
        .run_kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(manifest))
        .await
    {
        Ok(out) => out,
        Err(e) => panic!("server-side dry run failed: {e:#}\nmanifest:\n{manifest}"),
    }
}

/// `kubectl auth can-i … --as <user>` on `cp`: true for "yes".
async fn can_i(cp: &ControlPlane, user: &str, args: &[&str]) -> bool {
    let out = cp
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as={user}"))
        .output()
        .await
        .expect("kubectl auth can-i");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!(
            "kubectl auth can-i {}: unexpected answer {answer:?}; stderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The status code of a plain HTTP/1.1 `GET path` to `addr`.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1)?.parse().ok()
}

// === lint ===

#[test]
fn helm_lint_is_clean_for_both_charts() {
    let started = Instant::now();
    let cases: &[(&str, &[&str])] = &[
        ("tower-server", &[]),
        (
            "tower-server",
            &[
                "--set",
                "replicaCount=2,service.type=LoadBalancer,service.nodePorts.ssh=30722",
                "--set",
                "sshAddress={tower.example.com:7022},gateway.url=https://tower.example.com",
                "--set",
                "rbac.tokenRefSecretNames={agent-tokens},rbac.tokenRefNamespaces={tower-tokens}",
                "--set",
                "podDisruptionBudget.minAvailable=1",
            ],
        ),
        (
            "tower-server",
            &[
                "--set",
                "strategy.type=Recreate,peer.listenHost=::,peer.port=9555",
                "--set-json",
                "affinity={}",
                "--set-json",
                "topologySpreadConstraints=[]",
            ],
        ),
        (
            "tower-server",
            &[
                "-f",
                "tower-server/values-kubesphere.yaml",
                "--set",
                "sshAddress={203.0.113.10:8080},kubesphere.listenHost=0.0.0.0",
            ],
        ),
        (
            "tower-server",
            &[
                "-f",
                "tower-server/values-migrate.yaml",
                "--set",
                "sshAddress={ws://203.0.113.20:8080}",
            ],
        ),
        ("tower-agent", &[]),
        ("tower-agent", &["--set", "joinToken=tower1.abc.def"]),
        (
            "tower-agent",
            &[
                "--set",
                "rbac.mode=restricted,existingSecret.name=my-token,existingSecret.key=token",
                "--set",
                "ksApiserver.url=https://ks-apiserver.kubesphere-system.svc",
            ],
        ),
    ];
    for (name, sets) in cases {
        let chart = chart(name);
        let mut args = vec!["lint", "--strict", "--kube-version", KUBE_VERSION, &chart];
        // Values files are named relative to charts/.
        let sets: Vec<String> = sets
            .iter()
            .map(|s| {
                if s.ends_with(".yaml") {
                    charts_dir().join(s).display().to_string()
                } else {
                    s.to_string()
                }
            })
            .collect();
        args.extend(sets.iter().map(String::as_str));
        let (ok, out, err) = helm(&args);
        assert!(ok, "helm {} failed:\n{out}\n{err}", args.join(" "));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm {}:\n{out}\n{err}",
            args.join(" ")
        );
        for bad in ["[WARNING]", "[ERROR]"] {
            assert!(
                !out.contains(bad) && !err.contains(bad),
                "helm {} reports {bad}:\n{out}\n{err}",
                args.join(" ")
            );
        }
    }
    // A wrong RBAC mode is refused, not silently turned into cluster-admin.
    let chart = chart("tower-agent");
    let (ok, out, err) = helm(&["template", "x", &chart, "--set", "rbac.mode=everything"]);
    assert!(!ok, "rbac.mode=everything rendered:\n{out}");
    assert!(err.contains("rbac.mode must be"), "{err}");
    eprintln!(
        "charts: helm lint (8 value sets) in {:.2?}",
        started.elapsed()
    );
}

// === the charts speak the binaries' flags ===

/// Every `TOWER_*`/`POD_NAME` variable and `--flag` a chart's Deployment sets
/// is one the binary's `--help` lists.
#[test]
fn chart_settings_are_the_binaries_flags() {
    let cases = [
        (
            "tower-server",
            template(
                "tower-server",
                "tower-server",
                SERVER_NS,
                &[
                    "--set",
                    "sshAddress={tower.example.com:7022}",
                    "--show-only",
                    "templates/deployment.yaml",
                ],
            ),
        ),
        (
            "tower-server",
            template(
                "tower",
                "tower-server",
                SERVER_NS,
                &[
                    "-f",
                    &charts_dir().join(KS_VALUES).display().to_string(),
                    "--set",
                    "sshAddress={203.0.113.10:8080},kubesphere.listenHost=0.0.0.0",
                    "--show-only",
                    "templates/deployment.yaml",
                ],
            ),
        ),
        (
            "tower-server",
            template(
                "tower-server",
                "tower-server",
                SERVER_NS,
                &[
                    "-f",
                    &charts_dir()
                        .join("tower-server/values-migrate.yaml")
                        .display()
                        .to_string(),
                    "--set",
                    "sshAddress={ws://203.0.113.20:8080}",
                    "--show-only",
                    "templates/deployment.yaml",
                ],
            ),
        ),
        (
            "tower-agent",
            template(
                "tower-agent",
                "tower-agent",
                SERVER_NS,
                &[
                    "--set",
                    "kubeApiserver=https://10.0.0.1,ksApiserver.url=https://ks,ksApiserver.caFile=/ca",
                    "--show-only",
                    "templates/deployment.yaml",
                ],
            ),
        ),
    ];
    for (bin, deployment) in cases {
        let help = std::process::Command::new(fixture::workspace_bin(bin, bin).unwrap())
            .arg("--help")
            .output()
            .expect("running --help");
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let mut checked = 0;
        for line in deployment.lines().map(str::trim) {
            if let Some(var) = line.strip_prefix("- name: ")
                && (var.starts_with("TOWER_") || var == "POD_NAME")
            {
                assert!(
                    help.contains(&format!("[env: {var}")),
                    "the {bin} chart sets {var}, which `{bin} --help` does not list:\n{help}"
                );
                checked += 1;
            }
            if let Some(flag) = line.strip_prefix("- --") {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("--{flag}")),
                    "the {bin} chart passes --{flag}, which `{bin} --help` does not list"
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 4,
            "{bin}: too few settings found in\n{deployment}"
        );
    }
}

// === CRD drift ===

#[test]
fn chart_crds_match_the_rust_types() {
    let towerctl = fixture::workspace_bin("tower-server", "towerctl").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&towerctl)
        .args(["crds", "--output-dir"])
        .arg(dir.path())
        .output()
        .expect("running towerctl crds");
    assert!(
        out.status.success(),
        "towerctl crds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("reading {}: {e}", d.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect()
    };
    let generated = list(dir.path());
    let chart = list(&charts_dir().join("tower-server/crds"));
    assert!(!generated.is_empty(), "towerctl crds wrote nothing");
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&chart),
        names(&generated),
        "charts/tower-server/crds/ holds other files than `towerctl crds` generates; \
         remove the stale ones and run:\n  {CRD_FIX}"
    );
    for (name, bytes) in &generated {
        assert!(
            chart[name] == *bytes,
            "charts/tower-server/crds/{name} differs from the Rust types in \
             tower-server/src/crd.rs; regenerate it with:\n  {CRD_FIX}"
        );
    }
}

// === server-side dry runs ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_chart_dry_runs_on_the_host() {
    let env = env();
    let started = Instant::now();
    create_namespace(&env.host, "tower-tokens").await.unwrap();
    let defaults = template("tower-server", "tower-server", SERVER_NS, &[]);
    let out = dry_run(&env.host, &defaults).await;
    for object in [
        "serviceaccount/tower-server",
        "clusterrole.rbac.authorization.k8s.io/tower-server",
        "clusterrolebinding.rbac.authorization.k8s.io/tower-server",
        "role.rbac.authorization.k8s.io/tower-server",
        "rolebinding.rbac.authorization.k8s.io/tower-server",
        "service/tower",
        "deployment.apps/tower-server",
        "poddisruptionbudget.policy/tower-server",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(object) && l.ends_with("(server dry run)")),
            "{object} missing from the dry run:\n{out}"
        );
    }
    // The rendered Deployment carries what the server needs.
    for needle in [
        "- --kubernetes",
        "fieldPath: metadata.name",
        "fieldPath: metadata.namespace",
        "name: TOWER_GATEWAY_URL",
        "value: \"https://tower.kubesphere-system.svc:8443\"",
        "path: /healthz",
        "path: /readyz",
        "containerPort: 9090",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
    ] {
        assert!(defaults.contains(needle), "{needle:?} not rendered");
    }
    let tuned = template(
        "tower",
        "tower-server",
        SERVER_NS,
        &[
            "--set",
            "replicaCount=2,service.type=LoadBalancer,service.nodePorts.ssh=30722",
            "--set",
            "service.externalTrafficPolicy=Local,service.loadBalancerSourceRanges={10.0.0.0/8}",
            "--set",
            "sshAddress={tower.example.com:7022},gateway.url=https://tower.example.com",
            "--set",
            "rbac.tokenRefSecretNames={agent-tokens},rbac.tokenRefNamespaces={tower-tokens}",
            "--set",
            "podDisruptionBudget.minAvailable=1",
        ],
    );
    let out = dry_run(&env.host, &tuned).await;
    assert!(
        out.contains("role.rbac.authorization.k8s.io/tower-tower-server-token-refs"),
        "{out}"
    );
    // The HA settings replaced or turned off, as the apiserver takes them:
    // Recreate without rollingUpdate, an IPv6 peer listener, spread of one's own.
    let own_spread = r#"topologySpreadConstraints=[{"maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "tower-server"}}}]"#;
    let replaced = template(
        "tower-ha",
        "tower-server",
        SERVER_NS,
        &[
            "--set",
            "replicaCount=1,strategy.type=Recreate,peer.listenHost=::",
            "--set-json",
            "affinity={}",
            "--set-json",
            own_spread,
        ],
    );
    let out = dry_run(&env.host, &replaced).await;
    assert!(
        out.contains("deployment.apps/tower-ha-tower-server"),
        "{out}"
    );
    let disabled = template(
        "tower-solo",
        "tower-server",
        SERVER_NS,
        &[
            "--set",
            "replicaCount=1,peer.enabled=false,podDisruptionBudget.enabled=false",
            "--set-json",
            "affinity={}",
            "--set-json",
            "topologySpreadConstraints=[]",
        ],
    );
    let out = dry_run(&env.host, &disabled).await;
    assert!(
        out.contains("deployment.apps/tower-solo-tower-server")
            && !out.contains("poddisruptionbudget"),
        "{out}"
    );
    assert!(tuned.contains("value: \"tower.example.com:7022\""));
    assert!(
        tuned.contains(",tower.example.com\""),
        "gateway URL host in the certificate hosts"
    );
    eprintln!(
        "charts: server chart dry runs (4 value sets) in {:.2?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_chart_dry_runs_on_a_member() {
    let env = env();
    let started = Instant::now();
    // The helm line `towerctl join` prints, token and all.
    let token = realistic_join_token("gondor");
    let set_token = format!("joinToken={token}");
    let defaults = template(
        "tower-agent",
        "tower-agent",
        SERVER_NS,
        &["--set", &set_token],
    );
    let out = dry_run(&env.member, &defaults).await;
    for object in [
        "serviceaccount/tower-agent",
        "secret/tower-agent-join-token",
        "clusterrolebinding.rbac.authorization.k8s.io/tower-agent",
        "deployment.apps/tower-agent",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(object) && l.ends_with("(server dry run)")),
            "{object} missing from the dry run:\n{out}"
        );
    }
    assert!(defaults.contains("name: cluster-admin"));
    assert!(defaults.contains("value: /etc/tower/join/joinToken"));
    // `--set joinToken=…` reaches the Secret unchanged.
    let secret = template(
        "tower-agent",
        "tower-agent",
        SERVER_NS,
        &["--set", &set_token, "--show-only", "templates/secret.yaml"],
    );
    let secret: serde_json::Value = yaml_serde::from_str(&secret).unwrap();
    let stored = secret["data"]["joinToken"]
        .as_str()
        .expect("data.joinToken");
    let stored = base64::engine::general_purpose::STANDARD
        .decode(stored)
        .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), token);
    assert!(JoinToken::parse(&token).is_ok());

    // Restricted RBAC, an existing Secret, ks-apiserver, in the release namespace.
    create_namespace(&env.member, "tower-agent-ro")
        .await
        .unwrap();
    let restricted = template(
        "ro",
        "tower-agent",
        "tower-agent-ro",
        &[
            "--set",
            "namespace=,rbac.mode=restricted,existingSecret.name=my-token",
            "--set",
            "ksApiserver.url=https://ks-apiserver.kubesphere-system.svc",
        ],
    );
    assert!(!restricted.contains("kind: Secret"), "{restricted}");
    let out = dry_run(&env.member, &restricted).await;
    assert!(
        out.contains("clusterrole.rbac.authorization.k8s.io/ro-tower-agent"),
        "{out}"
    );
    assert!(out.contains("deployment.apps/ro-tower-agent"), "{out}");

    // Installed for real, the restricted role reads but never writes or sees Secrets.
    env.member
        .run_kubectl(&["apply", "-f", "-"], Some(&restricted))
        .await
        .unwrap();
    let user = "system:serviceaccount:tower-agent-ro:ro-tower-agent";
    for (args, want) in [
        (&["list", "pods", "-A"][..], true),
        (&["watch", "deployments.apps", "-A"], true),
        (&["get", "nodes"], true),
        (&["get", "/version"], true),
        (&["get", "secrets", "-n", "kube-system"], false),
        (&["create", "deployments.apps", "-n", "default"], false),
        (&["delete", "pods", "-n", "default"], false),
        (
            &["create", "pods", "--subresource=exec", "-n", "default"],
            false,
        ),
    ] {
        assert_eq!(
            can_i(&env.member, user, args).await,
            want,
            "restricted agent: can-i {}",
            args.join(" ")
        );
    }
    eprintln!(
        "charts: agent chart dry runs (2 value sets) and restricted RBAC in {:.2?}",
        started.elapsed()
    );
}

// === the CRDs serve the controller's types ===

fn ts(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_crds_serve_the_controllers_types() {
    let env = env();
    let client = env.host.client().await.unwrap();

    // What the apiserver serves is the types' own schema.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for want in [Cluster::crd(), Agent::crd()] {
        let name = want.metadata.name.clone().unwrap();
        let served = crds.get(&name).await.unwrap();
        let schema = |c: &CustomResourceDefinition| {
            serde_json::to_value(&c.spec.versions[0].schema).unwrap()
        };
        assert_eq!(
            schema(&served),
            schema(&want),
            "{name}: the served schema is not the Rust types'"
        );
        assert_eq!(served.spec.group, want.spec.group);
        assert_eq!(served.spec.scope, want.spec.scope);
    }

    // A Cluster with every field set survives the round trip (nothing pruned).
    let clusters: Api<Cluster> = Api::all(client.clone());
    let spec = ClusterSpec {
        join_federation: Some(true),
        enable: Some(true),
        provider: Some("kubesphere".into()),
        connection: Some(Connection {
            type_: Some("direct".into()),
            kubesphere_api_endpoint: Some("https://ks.example.com".into()),
            kubernetes_api_endpoint: Some("https://k8s.example.com:6443".into()),
            external_kubernetes_api_endpoint: Some("https://ext.example.com:6443".into()),
            kubeconfig: Some(ByteString(b"apiVersion: v1\nkind: Config\n".to_vec())),
            token: Some("ks-token".into()),
            kubernetes_api_server_port: Some(6443),
            kubesphere_api_server_port: Some(30880),
        }),
        external_kube_api_enabled: Some(false),
        config: Some(ByteString(b"monitoring: true\n".to_vec())),
    };
    let name = "charts-roundtrip";
    let created = clusters
        .create(&PostParams::default(), &Cluster::new(name, spec.clone()))
        .await
        .unwrap();
    assert_eq!(created.spec, spec);
    let status = ClusterStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            last_update_time: Some(ts(1_700_000_000)),
            last_transition_time: Some(ts(1_700_000_100)),
            reason: Some("Ready".into()),
            message: Some("cluster is ready".into()),
        }],
        kubernetes_version: Some(KUBE_VERSION.into()),
        kube_sphere_version: Some("v4.1.3".into()),
        node_count: Some(3),
        zones: Some(vec!["zone-a".into(), "zone-b".into()]),
        region: Some("region-1".into()),
        configz: Some([("monitoring".to_string(), true)].into()),
        uid: Some("6f3c2a8e-0000-4000-8000-000000000001".into()),
    };
    // KubeSphere's Cluster CRD has no status subresource: status goes
    // through the main resource, and `/status` does not exist.
    let no_subresource = clusters
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": { "uid": "x" } })),
        )
        .await;
    assert!(
        matches!(&no_subresource, Err(kube::Error::Api(s)) if s.code == 404),
        "{no_subresource:?}"
    );
    clusters
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .unwrap();
    let got = clusters.get(name).await.unwrap();
    assert_eq!(got.spec, spec, "Cluster spec fields were dropped");
    assert_eq!(
        got.status,
        Some(status),
        "Cluster status fields were dropped"
    );

    // An Agent likewise, spec and status.
    let agents: Api<Agent> = Api::all(client.clone());
    let spec = AgentSpec {
        token_ref: Some(TokenRef {
            namespace: SERVER_NS.into(),
            name: "charts-roundtrip-token".into(),
            key: "token".into(),
        }),
        paused: Some(true),
    };
    agents
        .create(&PostParams::default(), &Agent::new(name, spec.clone()))
        .await
        .unwrap();
    let status = AgentStatus {
        conditions: vec![Condition {
            type_: "Connected".into(),
            status: "False".into(),
            last_update_time: Some(ts(1_700_000_200)),
            last_transition_time: Some(ts(1_700_000_200)),
            reason: Some("AgentPaused".into()),
            message: Some("paused".into()),
        }],
        kubeconfig: Some(ByteString(b"apiVersion: v1\nkind: Config\n".to_vec())),
        agent_version: Some(tower_proto::VERSION.into()),
        connected_since: Some(ts(1_700_000_000)),
        last_heartbeat: Some(ts(1_700_000_150)),
        rtt_millis: Some(7),
        serving_replica: Some("tower-server-0".into()),
    };
    let got = status_round_trip(&agents, name, &status).await;
    assert_eq!(got.spec, spec, "Agent spec fields were dropped");
    assert_eq!(got.status, Some(status), "Agent status fields were dropped");

    // kubectl shows the printer columns.
    let table = env
        .host
        .run_kubectl(&["get", "agents.tower.kubesphere.io", name], None)
        .await
        .unwrap();
    assert!(
        table.contains("CONNECTED") && table.contains("RTT-MS") && table.contains("False"),
        "{table}"
    );
    let table = env
        .host
        .run_kubectl(&["get", "clusters.cluster.kubesphere.io", name], None)
        .await
        .unwrap();
    assert!(
        table.contains("FEDERATED") && table.contains(KUBE_VERSION),
        "{table}"
    );
    let _ = clusters.delete(name, &Default::default()).await;
    let _ = agents.delete(name, &Default::default()).await;
}

// === the server works with exactly the chart's RBAC ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_runs_with_only_the_charts_rbac() {
    let env = env();
    let started = Instant::now();
    let host = &env.host;
    let admin = host.client().await.unwrap();
    // Install the rendered chart for real (nothing runs its pods here).
    // The tokenRef Secret this test uses is named, as the chart's README
    // advises: the server may then watch it.
    let manifest = template(
        "tower-server",
        "tower-server",
        SERVER_NS,
        &["--set", "rbac.tokenRefSecretNames={charts-rbac-token}"],
    );
    host.run_kubectl(&["apply", "-f", "-"], Some(&manifest))
        .await
        .unwrap();
    let user = "system:serviceaccount:kubesphere-system:tower-server";

    // Least privilege: what it may and may not do.
    let ns = ["-n", SERVER_NS];
    for (args, want) in [
        (vec!["watch", "clusters.cluster.kubesphere.io"], true),
        (vec!["patch", "clusters.cluster.kubesphere.io"], true),
        (
            vec![
                "patch",
                "clusters.cluster.kubesphere.io",
                "--subresource=status",
            ],
            true,
        ),
        (
            vec![
                "patch",
                "agents.tower.kubesphere.io",
                "--subresource=status",
            ],
            true,
        ),
        (vec!["create", "clusters.cluster.kubesphere.io"], false),
        (vec!["delete", "clusters.cluster.kubesphere.io"], false),
        (vec!["delete", "agents.tower.kubesphere.io"], false),
        (
            vec![
                "update",
                "agents.tower.kubesphere.io",
                "--subresource=status",
            ],
            false,
        ),
        (vec!["get", "secrets/tower-ca", ns[0], ns[1]], true),
        (vec!["create", "secrets", ns[0], ns[1]], true),
        (vec!["list", "secrets", ns[0], ns[1]], false),
        (
            vec!["watch", "secrets/charts-rbac-token", ns[0], ns[1]],
            true,
        ),
        (vec!["get", "secrets/other", ns[0], ns[1]], false),
        (vec!["delete", "secrets/tower-ca", ns[0], ns[1]], false),
        (vec!["update", "secrets/tower-ca", ns[0], ns[1]], false),
        (vec!["get", "secrets", "-n", "default"], false),
        (
            vec![
                "update",
                "leases.coordination.k8s.io/tower-server-leader",
                ns[0],
                ns[1],
            ],
            true,
        ),
        (
            vec![
                "update",
                "leases.coordination.k8s.io/kube-scheduler",
                ns[0],
                ns[1],
            ],
            false,
        ),
        // Membership: a Lease per replica, names known only at run time.
        (
            vec!["list", "leases.coordination.k8s.io", ns[0], ns[1]],
            true,
        ),
        (
            vec![
                "patch",
                "leases.coordination.k8s.io/tower-server-replica-x",
                ns[0],
                ns[1],
            ],
            true,
        ),
        (
            vec!["list", "leases.coordination.k8s.io", "-n", "default"],
            false,
        ),
        (vec!["create", "agents.tower.kubesphere.io"], true),
        (vec!["delete", "agents.tower.kubesphere.io"], false),
        (vec!["patch", "configmaps/tower-server", ns[0], ns[1]], true),
        (vec!["patch", "configmaps/other", ns[0], ns[1]], false),
        (vec!["list", "pods", "-A"], false),
    ] {
        assert_eq!(
            can_i(host, user, &args).await,
            want,
            "tower-server: can-i {}",
            args.join(" ")
        );
    }

    // A proxy Cluster without a token, and its Agent with a tokenRef Secret.
    let name = "charts-rbac";
    let ref_token = Secret::generate();
    Api::<KubeSecret>::namespaced(admin.clone(), SERVER_NS)
        .create(
            &PostParams::default(),
            &KubeSecret {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-token")),
                    ..Default::default()
                },
                string_data: Some([("token".to_string(), ref_token.expose().to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let clusters: Api<Cluster> = Api::all(admin.clone());
    clusters
        .create(
            &PostParams::default(),
            &Cluster::new(
                name,
                ClusterSpec {
                    enable: Some(true),
                    connection: Some(Connection {
                        type_: Some("proxy".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap();
    let agents: Api<Agent> = Api::all(admin.clone());
    agents
        .create(
            &PostParams::default(),
            &Agent::new(
                name,
                AgentSpec {
                    token_ref: Some(TokenRef {
                        namespace: SERVER_NS.into(),
                        name: format!("{name}-token"),
                        key: "token".into(),
                    }),
                    paused: None,
                },
            ),
        )
        .await
        .unwrap();

    // The server, in-process, with nothing but the chart's service account.
    install_crypto_provider();
    let sa_token = host
        .service_account_token(SERVER_NS, "tower-server", false)
        .await
        .unwrap();
    let sa_client = host.client_with_token(&sa_token).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ssh = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ssh_addr = ssh.local_addr().unwrap();
    let gateway_addr = gateway.local_addr().unwrap();
    let ops_addr = ops.local_addr().unwrap();
    let mut config =
        fixture::ServerConfig::new(dir.path().join("state"), format!("https://{gateway_addr}"));
    config.store_poll = Duration::from_millis(250);
    let replica = "tower-server-rbac-0";
    let mut ctrl = ControllerConfig::new(SERVER_NS, replica);
    ctrl.ssh_addresses = vec![ssh_addr.to_string()];
    ctrl.lease_renew = Duration::from_secs(1);
    ctrl.lease_duration = Duration::from_secs(4);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tower_server::run_with_kubernetes(
        config,
        ctrl,
        sa_client,
        ssh,
        gateway,
        Some(ops),
        shutdown.clone(),
    ));
    let _stop = shutdown.clone().drop_guard();
    let fail = |what: &str| {
        let what = what.to_string();
        let finished = server.is_finished();
        async move {
            let log = fixture::log_file()
                .map(|p| tower_tests::testbed::log_tail(&p, 40))
                .unwrap_or_default();
            panic!("{what} (server task finished: {finished}); log tail:\n{log}")
        }
    };

    // Identity Secrets, Lease, info ConfigMap.
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), SERVER_NS);
    let Some(info) = eventually(Duration::from_secs(30), || async {
        cms.get_opt("tower-server").await.ok().flatten()?.data
    })
    .await
    else {
        return fail("the server never published its info ConfigMap").await;
    };
    assert_eq!(info["sshAddresses"], ssh_addr.to_string());
    let secrets: Api<KubeSecret> = Api::namespaced(admin.clone(), SERVER_NS);
    for s in ["tower-ca", "tower-ssh-host-key"] {
        assert!(
            secrets.get_opt(s).await.unwrap().is_some(),
            "Secret {s} missing"
        );
    }
    let lease = Api::<Lease>::namespaced(admin.clone(), SERVER_NS)
        .get("tower-server-leader")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(replica)
    );

    // The proxy Cluster: a generated token, a kubeconfig, AgentAvailable=False.
    let cluster_with = |status: &'static str| {
        let clusters = clusters.clone();
        move || {
            let clusters = clusters.clone();
            async move {
                let c = clusters.get_opt(name).await.ok().flatten()?;
                let ready = c.token().is_some()
                    && c.spec.connection.as_ref()?.kubeconfig.is_some()
                    && c.condition("AgentAvailable")?.status == status;
                ready.then_some(c)
            }
        }
    };
    if eventually(Duration::from_secs(30), cluster_with("False"))
        .await
        .is_none()
    {
        return fail(&format!(
            "Cluster {name} never got a token, a kubeconfig and AgentAvailable=False: {:?}",
            clusters.get_opt(name).await
        ))
        .await;
    }

    // An agent with the tokenRef token (read from the Secret by the server) connects.
    let member_dir = tempfile::tempdir().unwrap();
    let (_, upstream_token) = agent_credential(&env.member, member_dir.path())
        .await
        .unwrap();
    let join = JoinToken {
        claims: Claims {
            servers: vec![ssh_addr.to_string()],
            host_key: info["hostKeyFingerprint"].clone(),
            cluster: name.into(),
            id: AGENT_TOKEN_ID.into(),
            expires: None,
        },
        secret: ref_token,
    };
    let agent = TowerAgent::start(
        TokenSource::Literal(join.encode()),
        &env.member,
        &upstream_token,
    )
    .unwrap();
    let Some(cluster) = eventually(Duration::from_secs(30), cluster_with("True")).await else {
        return fail(&format!(
            "the agent never became available: {:?}",
            clusters.get_opt(name).await
        ))
        .await;
    };
    let Some(status) = eventually(Duration::from_secs(15), || async {
        let s = agents.get_opt(name).await.ok().flatten()?.status?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "Connected" && c.status == "True")
            .then_some(s)
    })
    .await
    else {
        return fail("the Agent status never said Connected=True").await;
    };
    assert_eq!(status.serving_replica.as_deref(), Some(replica));
    assert_eq!(status.agent_version.as_deref(), Some(tower_proto::VERSION));

    // And the Cluster's kubeconfig reaches the member through the tunnel.
    let kubeconfig = dir.path().join("charts-rbac.kubeconfig");
    std::fs::write(
        &kubeconfig,
        &cluster.spec.connection.unwrap().kubeconfig.unwrap().0,
    )
    .unwrap();
    let ns = fixture::kubectl(&kubeconfig, &["get", "ns", "-o", "name"], None)
        .await
        .unwrap();
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    // The probe paths the chart's Deployment uses.
    for path in ["/healthz", "/readyz"] {
        let ok = eventually(Duration::from_secs(10), || async {
            (http_status(ops_addr, path).await == Some(200)).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "GET {path} on the ops port never answered 200"
        );
    }
    // Rotating the tokenRef Secret cuts the agent within seconds: the server
    // watches the Secret (the chart grants list/watch on it by name) instead
    // of reading it at the next resync, a minute away.
    let rotated = Secret::generate();
    let rotated_at = Instant::now();
    secrets
        .patch(
            &format!("{name}-token"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "stringData": { "token": rotated.expose() } })),
        )
        .await
        .unwrap();
    if eventually(Duration::from_secs(15), cluster_with("False"))
        .await
        .is_none()
    {
        return fail("rotating the tokenRef Secret did not end the agent's session within 15 s")
            .await;
    }
    eprintln!(
        "charts: tokenRef Secret rotated; the old token's session ended in {:.2?}",
        rotated_at.elapsed()
    );
    eprintln!(
        "charts: server with only the chart's RBAC: identity, lease, token, kubeconfig, tokenRef agent in {:.2?}",
        started.elapsed()
    );
    agent.stop().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = clusters.delete(name, &Default::default()).await;
    let _ = agents.delete(name, &Default::default()).await;
}

// === KubeSphere mode and the takeover of ks-installer's Go tower ===

const KS_VALUES: &str = "tower-server/values-kubesphere.yaml";
/// The labels KubeSphere's objects select Tower's pods by: the `mc-<cluster>`
/// Services and ks-installer's Deployment `tower` and (in part) Service `tower`.
const KS_POD_LABELS: [(&str, &str); 2] = [("app", "tower"), ("app.kubernetes.io/name", "tower")];

/// The documents of a rendered manifest, by `(kind, name)`.
fn documents(manifest: &str) -> BTreeMap<(String, String), serde_json::Value> {
    manifest
        .split("\n---")
        .filter_map(|doc| yaml_serde::from_str::<serde_json::Value>(doc).ok())
        .filter(|v| v.is_object())
        .map(|v| {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ((kind, name), v)
        })
        .collect()
}

fn doc<'a>(
    docs: &'a BTreeMap<(String, String), serde_json::Value>,
    kind: &str,
    name: &str,
) -> &'a serde_json::Value {
    docs.get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "{kind} {name} not rendered; have {:?}",
                docs.keys().collect::<Vec<_>>()
            )
        })
}

/// `value` (a JSON object of strings) as a map.
fn string_map(value: &serde_json::Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn ks_labels() -> BTreeMap<String, String> {
    KS_POD_LABELS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The container's env as name -> value (plain values only).
fn container_env(deployment: &serde_json::Value) -> BTreeMap<String, String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Whether a rendered (Cluster)Role grants `verb` on `group`/`resource`.
fn grants(role: &serde_json::Value, group: &str, resource: &str, verb: &str) -> bool {
    let has =
        |v: &serde_json::Value, s: &str| v.as_array().is_some_and(|a| a.iter().any(|x| x == s));
    role["rules"].as_array().is_some_and(|rules| {
        rules.iter().any(|r| {
            has(&r["apiGroups"], group)
                && has(&r["resources"], resource)
                && has(&r["verbs"], verb)
                && r.get("resourceNames").is_none()
        })
    })
}

#[test]
fn takeover_values_render_kubesphere_mode() {
    let values = charts_dir().join(KS_VALUES).display().to_string();
    let manifest = template(
        "tower",
        "tower-server",
        SERVER_NS,
        &["-f", &values, "--set", "sshAddress={203.0.113.10:8080}"],
    );
    let docs = documents(&manifest);

    // Deployment `tower`: KubeSphere's selector and pod labels, KubeSphere mode on.
    let deployment = doc(&docs, "Deployment", "tower");
    assert_eq!(deployment["metadata"]["namespace"], SERVER_NS);
    assert_eq!(
        string_map(&deployment["spec"]["selector"]["matchLabels"]),
        ks_labels(),
        "the Deployment's selector must be ks-installer's, so mc- Services and Service tower select its pods"
    );
    let pod_labels = string_map(&deployment["spec"]["template"]["metadata"]["labels"]);
    for (k, v) in KS_POD_LABELS {
        assert_eq!(
            pod_labels.get(k).map(String::as_str),
            Some(v),
            "pod label {k}"
        );
    }
    let env = container_env(deployment);
    assert_eq!(env["TOWER_KUBESPHERE"], "true");
    assert_eq!(env["TOWER_KUBESPHERE_PORTS"], "6000-7000");
    assert!(
        !env.contains_key("TOWER_KUBESPHERE_LISTEN_HOST"),
        "server default unless set"
    );
    assert_eq!(env["TOWER_SSH_ADDRESS"], "203.0.113.10:8080");
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--kubernetes"),
        "--kubesphere needs --kubernetes"
    );
    assert!(
        args.contains(&"--kubesphere"),
        "an image without KubeSphere mode must refuse to start, not ignore TOWER_KUBESPHERE"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "tower"
    );

    // Service `tower`: the Go tower's type, its port 8080 first and leading to
    // the agents' WebSocket port, selecting the pods above.
    let service = doc(&docs, "Service", "tower");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(
        ports[0]["port"], 8080,
        "ports[0] is what members' --proxy-server names"
    );
    assert_eq!(ports[0]["targetPort"], "websocket");
    assert_eq!(ports[0]["protocol"], "TCP");
    let container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap();
    assert!(
        container_ports
            .iter()
            .any(|p| p["name"] == "websocket" && p["containerPort"] == 8080),
        "targetPort websocket names the WebSocket listener"
    );
    assert!(
        manifest_env(deployment, "TOWER_WEBSOCKET_LISTEN").as_deref() == Some("0.0.0.0:8080"),
        "the server listens on the WebSocket port"
    );
    assert_eq!(string_map(&service["spec"]["selector"]), ks_labels());
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Cluster");
    assert_eq!(
        service["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "helm uninstall must not release the LoadBalancer address"
    );
    assert_eq!(
        string_map(&doc(&docs, "PodDisruptionBudget", "tower")["spec"]["selector"]["matchLabels"]),
        ks_labels()
    );

    // RBAC for KubeSphere mode.
    let cluster_role = doc(&docs, "ClusterRole", "tower");
    for verb in ["get", "list", "watch", "update", "patch"] {
        assert!(
            grants(cluster_role, "cluster.kubesphere.io", "clusters", verb),
            "clusters {verb}"
        );
    }
    assert!(grants(
        cluster_role,
        "cluster.kubesphere.io",
        "clusters/status",
        "patch"
    ));
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            assert!(
                grants(cluster_role, group, "events", verb),
                "events.{group} {verb}"
            );
        }
    }
    assert!(!grants(
        cluster_role,
        "cluster.kubesphere.io",
        "clusters",
        "delete"
    ));
    let role = doc(&docs, "Role", "tower");
    assert_eq!(role["metadata"]["namespace"], SERVER_NS);
    for verb in ["get", "list", "watch", "create", "update", "patch"] {
        assert!(grants(role, "", "services", verb), "services {verb}");
    }
    assert!(!grants(role, "", "services", "delete"));
    for kind in ["ServiceAccount", "ClusterRoleBinding", "RoleBinding"] {
        doc(&docs, kind, "tower");
    }
    // The notes steer KubeSphere members away from `towerctl join`.
    let chart = chart("tower-server");
    let (ok, out, err) = helm(&[
        "install",
        "tower",
        &chart,
        "--dry-run=client",
        "-n",
        SERVER_NS,
        "-f",
        &values,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("KubeSphere mode:") && out.contains("Do not run `towerctl join`"),
        "{out}"
    );
}

/// Both charts run the images `scripts/images.sh` builds (`image.repository`
/// and the chart's `appVersion`, which is the binaries' version too), with
/// `image.repository`/`image.tag` overrides, as those images' user 65532 and
/// with a read-only root filesystem.
#[test]
fn charts_run_the_images_of_images_sh_read_only_as_its_user() {
    let workspace = std::fs::read_to_string(charts_dir().join("../Cargo.toml")).unwrap();
    let cargo_version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("workspace version");
    let token = realistic_join_token("gondor");
    let set_token = format!("joinToken={token}");
    for (name, extra) in [
        ("tower-server", vec![]),
        ("tower-agent", vec!["--set", set_token.as_str()]),
    ] {
        let chart_yaml: serde_json::Value = yaml_serde::from_str(
            &std::fs::read_to_string(charts_dir().join(name).join("Chart.yaml")).unwrap(),
        )
        .unwrap();
        let app_version = chart_yaml["appVersion"].as_str().unwrap();
        assert_eq!(
            app_version, cargo_version,
            "{name}: appVersion is the image tag and the binaries' --version"
        );
        let image_of = |args: &[&str]| {
            let mut all = extra.clone();
            all.extend_from_slice(args);
            let docs = documents(&template(name, name, SERVER_NS, &all));
            doc(&docs, "Deployment", name).clone()
        };
        let deployment = image_of(&[]);
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(
            container["image"],
            format!("kubesphere/{name}:{app_version}"),
            "{name}: the reference scripts/images.sh writes into its archive"
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
        // The image's entrypoint is the binary: the chart sets no command.
        assert!(container.get("command").is_none(), "{name}: {container}");
        let pushed = image_of(&[
            "--set",
            &format!("image.repository=registry.example:5000/tower/{name},image.tag=0.1.0-rc1"),
        ]);
        assert_eq!(
            pushed["spec"]["template"]["spec"]["containers"][0]["image"],
            format!("registry.example:5000/tower/{name}:0.1.0-rc1")
        );
    }
}

/// values-migrate.yaml: KubeSphere mode beside a running Go tower. Nothing of
/// it is named like the Go tower's objects, its pods do not carry the labels
/// the Go tower's `mc-` Services select, and the server adopts only marked
/// Clusters, pointing their Services at exactly its pods' labels.
#[test]
fn migrate_values_render_beside_the_go_tower() {
    let values = charts_dir()
        .join("tower-server/values-migrate.yaml")
        .display()
        .to_string();
    let manifest = template(
        "tower-server",
        "tower-server",
        SERVER_NS,
        &[
            "-f",
            &values,
            "--set",
            "sshAddress={ws://203.0.113.20:8080}",
        ],
    );
    let docs = documents(&manifest);
    assert!(
        !docs.keys().any(|(_, name)| name == "tower"),
        "an object named like the Go tower's: {:?}",
        docs.keys().collect::<Vec<_>>()
    );
    let deployment = doc(&docs, "Deployment", "tower-server");
    let pod_labels = string_map(&deployment["spec"]["template"]["metadata"]["labels"]);
    assert_ne!(
        pod_labels.get("app").map(String::as_str),
        Some("tower"),
        "the Go tower's mc- Services would select these pods"
    );
    let env = container_env(deployment);
    assert_eq!(env["TOWER_KUBESPHERE"], "true");
    assert_eq!(env["TOWER_KUBESPHERE_ADOPT"], "marked");
    let selector: BTreeMap<String, String> = env["TOWER_KUBESPHERE_POD_SELECTOR"]
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(
        selector,
        string_map(&deployment["spec"]["selector"]["matchLabels"]),
        "moved Clusters' Services must select exactly this release's pods"
    );
    for (k, v) in &selector {
        assert_eq!(pod_labels.get(k), Some(v), "pod label {k}");
    }
    let service = doc(&docs, "Service", "tower-server");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert!(grants(
        doc(&docs, "Role", "tower-server"),
        "",
        "services",
        "patch"
    ));
}

#[test]
fn default_values_render_no_kubesphere_bits() {
    let manifest = template("tower-server", "tower-server", SERVER_NS, &[]);
    let docs = documents(&manifest);
    let deployment = doc(&docs, "Deployment", "tower-server");
    let selector = string_map(&deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(
        selector,
        [
            (
                "app.kubernetes.io/instance".to_string(),
                "tower-server".to_string()
            ),
            (
                "app.kubernetes.io/name".to_string(),
                "tower-server".to_string()
            ),
        ]
        .into(),
        "the default selector must not change: it is immutable on existing releases"
    );
    assert!(
        !manifest.contains("app: tower"),
        "KubeSphere's pod label outside KubeSphere mode"
    );
    assert!(
        !manifest.contains("--kubesphere"),
        "KubeSphere mode outside KubeSphere mode"
    );
    assert!(
        !manifest.contains("TOWER_KUBESPHERE"),
        "KubeSphere mode outside KubeSphere mode"
    );
    assert!(!manifest.contains("resource-policy"));
    let service = doc(&docs, "Service", "tower");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    let ports: Vec<_> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        ports,
        [("websocket", 8080), ("ssh", 7022), ("gateway", 8443)],
        "the default Service: WebSocket first, raw SSH, the gateway"
    );
    assert_eq!(string_map(&service["spec"]["selector"]), selector);
    let cluster_role = doc(&docs, "ClusterRole", "tower-server");
    assert!(!grants(
        cluster_role,
        "cluster.kubesphere.io",
        "clusters",
        "update"
    ));
    assert!(!grants(cluster_role, "", "events", "create"));
    assert!(!grants(
        doc(&docs, "Role", "tower-server"),
        "",
        "services",
        "get"
    ));
    assert!(
        !manifest.contains("\"services\""),
        "no Service rights outside KubeSphere mode"
    );
}

// === high availability: any replica serves any cluster ===

/// The pod spec of a rendered Deployment.
fn pod_spec(deployment: &serde_json::Value) -> &serde_json::Value {
    &deployment["spec"]["template"]["spec"]
}

/// The defaults run three replicas that stay available through rolling
/// updates and drains, spread over nodes, with the peer listener on every pod
/// and in no Service; in every value set the chart ships.
#[test]
fn default_values_run_highly_available() {
    let migrate = charts_dir()
        .join("tower-server/values-migrate.yaml")
        .display()
        .to_string();
    let kubesphere = charts_dir().join(KS_VALUES).display().to_string();
    for (release, values) in [
        ("tower-server", vec![]),
        (
            "tower",
            vec!["-f", &kubesphere, "--set", "sshAddress={203.0.113.10:8080}"],
        ),
        (
            "tower-server",
            vec![
                "-f",
                &migrate,
                "--set",
                "sshAddress={ws://203.0.113.20:8080}",
            ],
        ),
    ] {
        let manifest = template(release, "tower-server", SERVER_NS, &values);
        let docs = documents(&manifest);
        let what = format!("{release} {values:?}");
        let deployment = docs
            .iter()
            .find(|((kind, _), _)| kind == "Deployment")
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("{what}: no Deployment"));
        let spec = &deployment["spec"];
        assert_eq!(spec["replicas"], 3, "{what}");
        assert_eq!(spec["strategy"]["type"], "RollingUpdate", "{what}");
        assert_eq!(
            spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{what}: a rolling update must not drop below replicaCount"
        );
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1, "{what}");
        let selector = &spec["selector"]["matchLabels"];

        // A PDB over the same pods, letting one go at a time.
        let pdb = docs
            .iter()
            .find(|((kind, _), _)| kind == "PodDisruptionBudget")
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("{what}: no PodDisruptionBudget"));
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{what}");
        assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector, "{what}");

        // Spread over nodes, preferred, never required, over this release's pods.
        let pod = pod_spec(deployment);
        let spread = pod["topologySpreadConstraints"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no topologySpreadConstraints"));
        assert_eq!(spread.len(), 1, "{what}");
        assert_eq!(spread[0]["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(spread[0]["whenUnsatisfiable"], "ScheduleAnyway");
        assert_eq!(spread[0]["maxSkew"], 1);
        assert_eq!(
            &spread[0]["labelSelector"]["matchLabels"], selector,
            "{what}"
        );
        assert_eq!(spread[0]["matchLabelKeys"][0], "pod-template-hash");
        let anti = &pod["affinity"]["podAntiAffinity"];
        assert!(
            anti.get("requiredDuringSchedulingIgnoredDuringExecution")
                .is_none(),
            "{what}: required anti-affinity would leave replicas pending on small clusters"
        );
        let preferred = anti["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no preferred podAntiAffinity"));
        let term = &preferred[0]["podAffinityTerm"];
        assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(&term["labelSelector"]["matchLabels"], selector, "{what}");

        // The peer listener: a named container port, its settings, the pod IP.
        let container = &pod["containers"][0];
        let ports = container["ports"].as_array().unwrap();
        assert!(
            ports.iter().any(|p| p["name"] == "peer"
                && p["containerPort"] == 9444
                && p["protocol"] == "TCP"),
            "{what}: no container port peer/9444: {ports:?}"
        );
        let env = container["env"].as_array().unwrap();
        let position = |name: &str| {
            env.iter()
                .position(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("{what}: no env {name}"))
        };
        assert_eq!(
            env[position("POD_IP")]["valueFrom"]["fieldRef"]["fieldPath"],
            "status.podIP"
        );
        assert_eq!(
            manifest_env(deployment, "TOWER_PEER_LISTEN").as_deref(),
            Some("0.0.0.0:9444"),
            "{what}"
        );
        assert_eq!(
            manifest_env(deployment, "TOWER_PEER_ADDRESS").as_deref(),
            Some("$(POD_IP)"),
            "{what}"
        );
        assert!(
            position("POD_IP") < position("TOWER_PEER_ADDRESS"),
            "{what}: $(POD_IP) expands only variables defined before it"
        );

        // Peers find each other through their Leases: no Service has the port.
        let services: Vec<_> = docs
            .iter()
            .filter(|((kind, _), _)| kind == "Service")
            .collect();
        assert!(!services.is_empty(), "{what}");
        for ((_, name), service) in services {
            for port in service["spec"]["ports"].as_array().unwrap() {
                assert!(
                    port["name"] != "peer"
                        && port["port"] != 9444
                        && port["targetPort"] != "peer"
                        && port["targetPort"] != 9444,
                    "{what}: Service {name} exposes the peer port: {port}"
                );
            }
        }
    }
}

/// Each HA default gives way: `[]`/`{}` drop the spread, values of one's own
/// replace it, Recreate comes without rollingUpdate, `peer.enabled=false`
/// drops every peer setting, an IPv6 listen host is bracketed, and a
/// PodDisruptionBudget that would block every drain is refused.
#[test]
fn high_availability_defaults_give_way_to_values() {
    let deployment_of = |args: &[&str]| {
        let docs = documents(&template("tower-server", "tower-server", SERVER_NS, args));
        doc(&docs, "Deployment", "tower-server").clone()
    };
    let none = deployment_of(&[
        "--set-json",
        "affinity={}",
        "--set-json",
        "topologySpreadConstraints=[]",
        "--set",
        "strategy.type=Recreate",
    ]);
    let pod = pod_spec(&none);
    assert!(pod.get("affinity").is_none(), "{pod}");
    assert!(pod.get("topologySpreadConstraints").is_none(), "{pod}");
    assert_eq!(
        none["spec"]["strategy"],
        serde_json::json!({ "type": "Recreate" }),
        "the apiserver refuses rollingUpdate beside Recreate"
    );

    let own = deployment_of(&[
        "--set-json",
        r#"affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions":
            [{"key": "tier", "operator": "In", "values": ["infra"]}]}]}}}"#,
        "--set-json",
        r#"topologySpreadConstraints=[{"maxSkew": 2,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "tower-server"}}}]"#,
    ]);
    let pod = pod_spec(&own);
    assert!(pod["affinity"].get("podAntiAffinity").is_none(), "{pod}");
    assert!(pod["affinity"].get("nodeAffinity").is_some(), "{pod}");
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    assert_eq!(spread.len(), 1, "{pod}");
    assert_eq!(spread[0]["topologyKey"], "topology.kubernetes.io/zone");

    let solo = deployment_of(&["--set", "replicaCount=1,peer.enabled=false"]);
    assert_eq!(solo["spec"]["replicas"], 1);
    let text = solo.to_string();
    for absent in [
        "TOWER_PEER_LISTEN",
        "TOWER_PEER_ADDRESS",
        "POD_IP",
        "\"peer\"",
    ] {
        assert!(!text.contains(absent), "peer off, yet {absent}: {text}");
    }

    let ipv6 = deployment_of(&["--set", "peer.listenHost=::,peer.port=9555"]);
    assert_eq!(
        manifest_env(&ipv6, "TOWER_PEER_LISTEN").as_deref(),
        Some("[::]:9555")
    );
    assert!(
        pod_spec(&ipv6)["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "peer" && p["containerPort"] == 9555)
    );

    // minAvailable: below replicaCount renders, at it is refused.
    let pdb = |sets: &str| {
        helm(&[
            "template",
            "tower-server",
            &chart("tower-server"),
            "--namespace",
            SERVER_NS,
            "--kube-version",
            KUBE_VERSION,
            "--set",
            sets,
            "--show-only",
            "templates/pdb.yaml",
        ])
    };
    let (ok, out, err) = pdb("podDisruptionBudget.minAvailable=2");
    assert!(ok && out.contains("minAvailable: 2"), "{out}{err}");
    let (ok, out, err) = pdb("podDisruptionBudget.minAvailable=3");
    assert!(!ok, "minAvailable 3 of 3 rendered:\n{out}");
    assert!(err.contains("would block every node drain"), "{err}");
    let (ok, out, err) = pdb("replicaCount=1");
    assert!(ok && out.contains("maxUnavailable: 1"), "{out}{err}");
}

/// The ```sh block after `<!-- readme-test: <name> -->` in README.md.
fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(charts_dir().join("../README.md")).expect("README.md");
    let marker = format!("<!-- readme-test: {name} -->");
    let rest = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let rest = rest
        .trim_start()
        .strip_prefix("```sh\n")
        .expect("a ```sh block after the marker");
    rest.split_once("\n```")
        .expect("end of the block")
        .0
        .to_string()
}

/// Runs `script` with bash (errexit, pipefail) in `dir`, with the test bed's
/// kubectl and helm first on PATH and `kubeconfig`; returns stdout.
fn run_script(dir: &Path, kubeconfig: &Path, script: &str) -> String {
    run_script_with(dir, kubeconfig, script, &[])
}

/// [`run_script`] with extra environment variables.
fn run_script_with(dir: &Path, kubeconfig: &Path, script: &str, vars: &[(&str, &str)]) -> String {
    let path = format!(
        "{}:{}",
        tower_tests::testbed::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CONFIG_HOME", dir.join(".helm/config"))
        .env("HELM_CACHE_HOME", dir.join(".helm/cache"))
        .env("HELM_DATA_HOME", dir.join(".helm/data"))
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Go tower as ks-installer 3.4.1 deploys it (the shape of
/// roles/ks-multicluster/templates/tower.yaml.j2: names, labels, selectors,
/// port, Service type), an `mc-` Service as the Go tower keeps one, and a
/// proxy Cluster it has set up.
const GO_TOWER: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: tower
  namespace: kubesphere-system
  labels: {app: tower, app.kubernetes.io/name: tower}
spec:
  replicas: 1
  selector:
    matchLabels: {app: tower, app.kubernetes.io/name: tower}
  template:
    metadata:
      labels: {app: tower, app.kubernetes.io/name: tower}
    spec:
      serviceAccountName: kubesphere
      containers:
        - name: tower
          image: kubesphere/tower:v3.4.1
          command: [/proxy, --ca-cert=/ca.crt, --ca-key=/ca.key, --v=4]
          readinessProbe:
            httpGet: {path: /health, port: 8080}
---
apiVersion: v1
kind: Service
metadata:
  name: tower
  namespace: kubesphere-system
  labels: {app: tower}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Cluster
  selector: {app: tower}
  ports:
    - {port: 8080, protocol: TCP, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata:
  name: mc-member1
  namespace: kubesphere-system
  labels: {app: mc-member1, app.kubernetes.io/name: mc-member1}
spec:
  selector: {app: tower, app.kubernetes.io/name: tower}
  ports:
    - {name: kubernetes, port: 6443, protocol: TCP, targetPort: 6931}
    - {name: kubesphere, port: 80, protocol: TCP, targetPort: 16931}
---
apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: member1
spec:
  enable: true
  joinFederation: true
  connection:
    type: proxy
    token: 0f3c9a0d6e1b4b7c8e2a1d3f5b7c9e0a2c4e6f8a0b2d4f6a8c0e2a4c6e8a0b2d
    kubernetesAPIServerPort: 6931
    kubesphereAPIServerPort: 16931
status:
  conditions:
    - {type: Initialized, status: "True", reason: Initialized, message: Cluster has been initialized}
"#;
const LB_IP: &str = "203.0.113.10";
/// The kube port the Go tower gave member1 (its ks port is 10000 above).
const GO_KUBE_PORT: u16 = 6931;

/// A member's Go agent as KubeSphere 3.4's ks-apiserver generates it
/// (pkg/kapis/cluster/v1alpha1/handler.go, generateDefaultDeployment).
const GO_AGENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: cluster-agent
  namespace: kubesphere-system
spec:
  selector:
    matchLabels: {app: agent, app.kubernetes.io/part-of: tower}
  template:
    metadata:
      labels: {app: agent, app.kubernetes.io/part-of: tower}
    spec:
      serviceAccountName: kubesphere
      containers:
        - name: agent
          image: kubesphere/tower:v3.4.1
          command: [/agent, --name=member1, --proxy-server=http://203.0.113.10:8080, --keepalive=10s]
"#;

async fn get_json(cp: &ControlPlane, what: &str) -> serde_json::Value {
    let out = cp
        .run_kubectl(&["-n", SERVER_NS, "get", what, "-o", "json"], None)
        .await
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// README.md's "Replacing the Go tower in KubeSphere", its blocks run verbatim
/// against a control plane of its own (namespace kubesphere-system, as in a
/// KubeSphere host) holding the Go tower's objects: back up, take over, build
/// a member's join token, switch the member (the shared member control plane)
/// to tower-agent, verify, roll back. Between takeover and rollback the server
/// runs in-process in KubeSphere mode with only the release's service account:
/// it keeps the Go tower's ports and mc- Service, publishes its ConfigMap, and
/// an agent with the README-built token makes the member available. No kubelet runs here, so it checks the
/// objects: Service `tower` keeps its type, address, node port and ports[0],
/// and selects the pods of Tower's Deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_takeover_of_the_go_tower() {
    let env = env();
    let started = Instant::now();
    let ks = env._bed.cluster("ks-takeover").await.unwrap();
    create_namespace(&ks, SERVER_NS).await.unwrap();
    // KubeSphere's Cluster CRD is there before Tower (the chart's stands in).
    let crds = charts_dir().join("tower-server/crds").display().to_string();
    ks.run_kubectl(&["apply", "--server-side", "-f", &crds], None)
        .await
        .unwrap();
    ks.run_kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/clusters.cluster.kubesphere.io",
        ],
        None,
    )
    .await
    .unwrap();
    // ks-installer applies with client-side `kubectl apply`.
    ks.run_kubectl(&["apply", "-f", "-"], Some(GO_TOWER))
        .await
        .unwrap();
    // What a cloud controller would write: the LoadBalancer's address.
    let ingress = format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}"}}]}}}}}}"#);
    ks.run_kubectl(
        &[
            "-n",
            SERVER_NS,
            "patch",
            "service",
            "tower",
            "--subresource=status",
            "--type=merge",
            "-p",
            &ingress,
        ],
        None,
    )
    .await
    .unwrap();
    let before = get_json(&ks, "service/tower").await;
    let node_port = before["spec"]["ports"][0]["nodePort"].clone();
    let cluster_ip = before["spec"]["clusterIP"].clone();
    assert!(node_port.is_u64() && cluster_ip.is_string(), "{before}");
    // What a member's --proxy-server is built from (handler.go populateProxyAddress).
    let proxy_server = |svc: &serde_json::Value| {
        format!(
            "http://{}:{}",
            svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .unwrap_or("-"),
            svc["spec"]["ports"][0]["port"]
        )
    };
    let want_proxy_server = format!("http://{LB_IP}:8080");
    assert_eq!(proxy_server(&before), want_proxy_server);

    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(charts_dir(), dir.path().join("charts")).unwrap();
    let kubeconfig = ks.admin_kubeconfig();

    // 1. Back up.
    let out = run_script(dir.path(), kubeconfig, &readme_block("backup"));
    assert_eq!(out.trim(), format!("LoadBalancer 8080 {LB_IP}"));
    for f in [
        "go-tower-backup.yaml",
        "go-tower-deployment.json",
        "clusters-backup.yaml",
    ] {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(
            text.contains("tower") || text.contains("member1"),
            "{f}: {text}"
        );
    }

    // 2. Take over.
    run_script(dir.path(), kubeconfig, &readme_block("takeover"));
    let service = get_json(&ks, "service/tower").await;
    let deployment = get_json(&ks, "deployment/tower").await;
    assert_eq!(
        service["metadata"]["uid"], before["metadata"]["uid"],
        "the Service was recreated"
    );
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["clusterIP"], cluster_ip);
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports[0]["port"], 8080, "{service}");
    assert_eq!(ports[0]["targetPort"], "websocket");
    assert_eq!(ports[0]["nodePort"], node_port, "the node port moved");
    assert_eq!(ports.len(), 2, "{service}");
    assert_eq!(
        proxy_server(&service),
        want_proxy_server,
        "members' --proxy-server changed"
    );
    assert_eq!(
        service["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );
    let selector = string_map(&service["spec"]["selector"]);
    assert_eq!(selector, ks_labels());
    let pod_labels = string_map(&deployment["spec"]["template"]["metadata"]["labels"]);
    let mc = get_json(&ks, "service/mc-member1").await;
    for (who, sel) in [
        ("tower", &selector),
        ("mc-member1", &string_map(&mc["spec"]["selector"])),
    ] {
        assert!(
            sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "Service {who} ({sel:?}) does not select Tower's pods ({pod_labels:?})"
        );
    }
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(
        containers.len(),
        1,
        "the Go container survived: {deployment}"
    );
    assert_eq!(containers[0]["name"], "tower-server");
    assert!(
        containers[0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "websocket")
    );
    let env_vars = container_env(&deployment);
    assert_eq!(env_vars["TOWER_KUBESPHERE"], "true");
    assert_eq!(env_vars["TOWER_SSH_ADDRESS"], format!("ws://{LB_IP}:8080"));
    assert_eq!(env_vars["TOWER_WEBSOCKET_LISTEN"], "0.0.0.0:8080");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "tower"
    );
    // The release's RBAC, live.
    let user = "system:serviceaccount:kubesphere-system:tower";
    for (args, want) in [
        (&["update", "clusters.cluster.kubesphere.io"][..], true),
        (&["patch", "clusters.cluster.kubesphere.io"], true),
        (&["create", "services", "-n", SERVER_NS], true),
        (&["update", "services/mc-member1", "-n", SERVER_NS], true),
        (&["delete", "services/mc-member1", "-n", SERVER_NS], false),
        (&["create", "services", "-n", "default"], false),
        (&["create", "events", "-n", "default"], true),
        (&["create", "events.events.k8s.io", "-n", "default"], true),
    ] {
        assert_eq!(
            can_i(&ks, user, args).await,
            want,
            "tower: can-i {}",
            args.join(" ")
        );
    }

    // Tower in KubeSphere mode, in-process, with nothing but the release's
    // service account: it takes over the Go tower's Cluster (ports kept,
    // mc- Service as it is) and publishes ConfigMap tower-server.
    install_crypto_provider();
    let sa_token = ks
        .service_account_token(SERVER_NS, "tower", false)
        .await
        .unwrap();
    let sa_client = ks.client_with_token(&sa_token).await.unwrap();
    let ssh = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ssh_addr = ssh.local_addr().unwrap();
    let mut config = fixture::ServerConfig::new(
        dir.path().join("state"),
        format!("https://{}", gateway.local_addr().unwrap()),
    );
    config.store_poll = Duration::from_millis(250);
    config.cluster_listen_host = std::net::Ipv4Addr::LOCALHOST.into();
    let mut ctrl = ControllerConfig::new(SERVER_NS, "tower-0");
    // TOWER_SSH_ADDRESS as the chart passes it (two addresses here).
    ctrl.ssh_addresses = vec![
        format!("ws://{LB_IP}:8080"),
        "ws://tower.example.com:8080".into(),
    ];
    ctrl.kubesphere = Some(tower_server::kube::KubeSphereConfig {
        ports: 6000..=7000,
        ..Default::default()
    });
    ctrl.lease_renew = Duration::from_secs(1);
    ctrl.lease_duration = Duration::from_secs(4);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tower_server::run_with_kubernetes(
        config,
        ctrl,
        sa_client,
        ssh,
        gateway,
        None,
        shutdown.clone(),
    ));
    let _stop = shutdown.clone().drop_guard();
    let admin = ks.client().await.unwrap();
    let clusters: Api<Cluster> = Api::all(admin.clone());
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), SERVER_NS);
    let taken_over = eventually(Duration::from_secs(30), || async {
        cms.get_opt("tower-server").await.ok().flatten()?.data?;
        let c = clusters.get_opt("member1").await.ok().flatten()?;
        c.condition("AgentAvailable")?;
        c.spec.connection.as_ref()?.kubeconfig.as_ref()?;
        Some(c)
    })
    .await;
    let Some(member1) = taken_over else {
        let log = fixture::log_file()
            .map(|p| tower_tests::testbed::log_tail(&p, 40))
            .unwrap_or_default();
        panic!(
            "Tower (KubeSphere mode, the chart's RBAC) never took Cluster member1 over \
             (server finished: {}): {:?}\nlog tail:\n{log}",
            server.is_finished(),
            clusters.get_opt("member1").await
        );
    };
    let connection = member1.spec.connection.clone().unwrap();
    assert_eq!(
        (
            connection.kubernetes_api_server_port,
            connection.kubesphere_api_server_port
        ),
        (Some(GO_KUBE_PORT), Some(GO_KUBE_PORT + 10_000)),
        "the Go tower's ports changed"
    );
    let mc = get_json(&ks, "service/mc-member1").await;
    assert_eq!(
        string_map(&mc["spec"]["selector"]),
        tower_server::kube::POD_LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    );
    let targets: Vec<_> = mc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].clone(), p["targetPort"].clone()))
        .collect();
    assert_eq!(
        targets,
        [
            (6443.into(), GO_KUBE_PORT.into()),
            (80.into(), (GO_KUBE_PORT + 10_000).into())
        ]
    );

    // 3. A member's join token, from its Cluster's token and what Tower
    // publishes in ConfigMap tower-server.
    let host_key =
        cms.get("tower-server").await.unwrap().data.unwrap()["hostKeyFingerprint"].clone();
    let script = format!(
        "{}\ncat \"$CLUSTER.join-token\"",
        readme_block("join-token")
    );
    let token = run_script(dir.path(), kubeconfig, &script);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let file = dir.path().join("member1.join-token");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the token file is its owner's alone");
    }
    let token = JoinToken::parse(&token).unwrap_or_else(|e| panic!("{e}: {token}"));
    assert_eq!(
        token.claims.servers,
        [
            format!("ws://{LB_IP}:8080"),
            "ws://tower.example.com:8080".into()
        ]
    );
    assert_eq!(token.claims.host_key, host_key);
    assert_eq!(token.claims.cluster, "member1");
    assert_eq!(token.claims.id, tower_server::kube::CLUSTER_TOKEN_ID);
    assert_eq!(
        token.secret.expose(),
        "0f3c9a0d6e1b4b7c8e2a1d3f5b7c9e0a2c4e6f8a0b2d4f6a8c0e2a4c6e8a0b2d"
    );
    // The token authenticates: an agent with it (dialling this process's SSH
    // listener instead of the LoadBalancer) makes the member available.
    let member_dir = tempfile::tempdir().unwrap();
    let (_, upstream_token) = agent_credential(&env.member, member_dir.path())
        .await
        .unwrap();
    let local = JoinToken {
        claims: Claims {
            servers: vec![ssh_addr.to_string()],
            ..token.claims.clone()
        },
        secret: token.secret.clone(),
    };
    let agent = TowerAgent::start(
        TokenSource::Literal(local.encode()),
        &env.member,
        &upstream_token,
    )
    .unwrap();
    let available = eventually(Duration::from_secs(30), || async {
        let c = clusters.get_opt("member1").await.ok().flatten()?;
        (c.condition("AgentAvailable")?.status == "True").then_some(())
    })
    .await;
    assert!(
        available.is_some(),
        "an agent with the README's join token never made member1 available: {:?}",
        clusters.get_opt("member1").await
    );
    // 4. Verify, as the README does.
    let verify = eventually(Duration::from_secs(15), || async {
        let out = run_script(dir.path(), kubeconfig, &readme_block("verify"));
        (out.contains("Initialized=True")
            && out.contains("AgentAvailable=True")
            && out.contains("member1"))
        .then_some(out)
    })
    .await;
    assert!(
        verify.is_some(),
        "{}",
        run_script(dir.path(), kubeconfig, &readme_block("verify"))
    );
    let events = ks
        .run_kubectl(
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                "involvedObject.kind=Cluster,involvedObject.name=member1",
            ],
            None,
        )
        .await
        .unwrap();
    assert!(
        events.contains("member1"),
        "no Event on Cluster member1: {events}"
    );
    agent.stop().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;

    // On the member: tower-agent in, KubeSphere's Go agent (the Deployment
    // ks-apiserver generates, handler.go generateDefaultDeployment) out.
    env.member
        .run_kubectl(&["apply", "-f", "-"], Some(GO_AGENT))
        .await
        .unwrap();
    run_script_with(
        dir.path(),
        env.member.admin_kubeconfig(),
        &readme_block("member"),
        &[("CLUSTER", "member1")],
    );
    let deployments = env
        .member
        .run_kubectl(&["-n", SERVER_NS, "get", "deployments", "-o", "name"], None)
        .await
        .unwrap();
    assert!(
        deployments.contains("deployment.apps/tower-agent")
            && !deployments.contains("cluster-agent"),
        "{deployments}"
    );
    let agent = get_json(&env.member, "deployment/tower-agent").await;
    assert_eq!(
        container_env(&agent)["TOWER_KS_APISERVER"],
        "http://ks-apiserver.kubesphere-system.svc"
    );
    let stored = get_json(&env.member, "secret/tower-agent-join-token").await;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(stored["data"]["joinToken"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), token.encode());

    // 5. Roll back.
    run_script(dir.path(), kubeconfig, &readme_block("rollback"));
    let service = get_json(&ks, "service/tower").await;
    let deployment = get_json(&ks, "deployment/tower").await;
    assert_eq!(
        service["metadata"]["uid"], before["metadata"]["uid"],
        "the Service was recreated"
    );
    assert_eq!(
        string_map(&service["spec"]["selector"]),
        string_map(&before["spec"]["selector"])
    );
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "{service}");
    assert_eq!(ports[0]["targetPort"], 8080);
    assert_eq!(ports[0]["nodePort"], node_port);
    assert_eq!(proxy_server(&service), want_proxy_server);
    assert!(
        service["metadata"]["labels"]
            .get("app.kubernetes.io/managed-by")
            .is_none()
    );
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["name"], "tower");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "kubesphere"
    );
    eprintln!(
        "charts: README takeover, KubeSphere-mode server, join token, member switch and rollback in {:.2?}",
        started.elapsed()
    );
}

/// The value of env var `name` of the first container of `deployment`.
fn manifest_env(deployment: &serde_json::Value, name: &str) -> Option<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_string)
}
