//! End-to-end tests of the tunnel core against the real test bed: kubectl and
//! raw HTTP clients reach a member kube-apiserver through the gateway, the SSH
//! session and the agent.
//!
//! Most tests share one environment (a member cluster, a server, an agent for
//! cluster "gondor" and an echo upstream as ks-apiserver), which runs on its own
//! runtime thread so it outlives each test's runtime. Tests that kill or restart
//! parts start their own server and agent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tower_agent::{AgentState, TokenSource};
use tower_proto::JoinToken;
use tower_proto::names::{UPSTREAM_KS_APISERVER, UPSTREAM_KUBE_APISERVER};
use tower_tests::fixture::http::{assert_status, get_h1};
use tower_tests::fixture::{
    self, HttpsUpstream, Member, TowerAgent, TowerServer, agent_credential,
    identity_from_kubeconfig, kube_upstream, kubectl, raw,
};
use tower_tests::testbed::{self, ControlPlane, Testbed};

struct Env {
    _bed: Testbed,
    member: ControlPlane,
    server: TowerServer,
    _agent: TowerAgent,
    _echo: HttpsUpstream,
    kubeconfig: PathBuf,
    sa_token: String,
    sa_token_file: PathBuf,
    dir: tempfile::TempDir,
}

const CLUSTER: &str = "gondor";

tower_tests::shared_env!(Env, "tunnel", start_env);

async fn start_env() -> anyhow::Result<Env> {
    let started = Instant::now();
    let bed = fixture::start_logged_bed("tower-e2e.log").await?;
    let member = bed.cluster("member").await?;
    let dir = tempfile::tempdir()?;
    let server = TowerServer::start(&dir.path().join("server")).await?;
    let token = server.mint(CLUSTER, None)?;
    let token_file = dir.path().join("join-token");
    std::fs::write(&token_file, token.encode())?;
    let (sa_token, sa_token_file) = agent_credential(&member, dir.path()).await?;
    let echo = HttpsUpstream::echo(dir.path()).await?;
    let agent = TowerAgent::start_with(
        TokenSource::File(token_file),
        vec![
            kube_upstream(&member, &sa_token_file),
            echo.upstream(UPSTREAM_KS_APISERVER, Some(&sa_token_file)),
        ],
    )?;
    anyhow::ensure!(
        server
            .wait_connected(CLUSTER, true, Duration::from_secs(20))
            .await,
        "agent did not connect"
    );
    let kubeconfig = server.kubeconfig_file(CLUSTER)?;
    // The suite runs this file once per transport (TOWER_TEST_TRANSPORT).
    // The server registers the session a moment before the agent says so.
    let state = agent
        .wait_state(Duration::from_secs(10), |s| {
            matches!(s, tower_agent::AgentState::Connected { .. })
        })
        .await;
    let tower_agent::AgentState::Connected { server: reached } = state else {
        anyhow::bail!("the agent is not connected: {state:?}")
    };
    anyhow::ensure!(
        reached == server.agent_address(fixture::test_transport()),
        "the agent reached {reached}, not the {:?} address",
        fixture::test_transport()
    );
    eprintln!(
        "tunnel env ready in {:.2?}, the agent on {reached}",
        started.elapsed()
    );
    Ok(Env {
        _bed: bed,
        member,
        server,
        _agent: agent,
        _echo: echo,
        kubeconfig,
        sa_token,
        sa_token_file,
        dir,
    })
}

impl Env {
    /// The member and the agent's credential on it.
    fn on_member(&self) -> Member<'_> {
        Member {
            cluster: &self.member,
            sa_token_file: &self.sa_token_file,
        }
    }
}

fn identity(env: &Env) -> raw::Identity {
    identity_from_kubeconfig(&std::fs::read_to_string(&env.kubeconfig).unwrap()).unwrap()
}

/// kubectl straight to the member, as its admin.
async fn member_kubectl(args: &[&str]) -> String {
    env().member.run_kubectl(args, None).await.unwrap()
}

/// A raw TLS connection (HTTP/1.1) to the shared gateway, with the shared
/// client identity.
async fn gateway_tls(env: &Env) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let (gw, ca) = (env.server.gateway_addr, env.server.server.ca_pem());
    raw::connect(gw, ca, Some(&identity(env)), false)
        .await
        .unwrap()
}

async fn tk(args: &[&str], stdin: Option<&str>) -> String {
    kubectl(&env().kubeconfig, args, stdin)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_through_the_tunnel() {
    let env = env();
    let version = tk(&["get", "--raw", "/version"], None).await;
    assert!(version.contains("v1.35"), "{version}");
    tk(&["create", "namespace", "crud"], None).await;
    assert!(tk(&["get", "ns"], None).await.contains("crud"));

    // Start a watch first; it must see ADDED, MODIFIED and DELETED.
    let mut watch = tokio::process::Command::new(testbed::kubectl_bin());
    watch
        .arg(format!("--kubeconfig={}", env.kubeconfig.display()))
        .args([
            "get",
            "cm",
            "-n",
            "crud",
            "-w",
            "--output-watch-events",
            "-o",
            "custom-columns=EVENT:.type,NAME:.object.metadata.name",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut watch = watch.spawn().unwrap();
    let stdout = watch.stdout.take().unwrap();
    let events = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("demo") {
                seen.push(
                    line.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
                if seen.iter().any(|e| e == "DELETED") {
                    break;
                }
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;

    tk(
        &[
            "create",
            "configmap",
            "demo",
            "-n",
            "crud",
            "--from-literal=a=1",
        ],
        None,
    )
    .await;
    let manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n  namespace: crud\ndata:\n  a: \"2\"\n";
    tk(&["apply", "-f", "-"], Some(manifest)).await;
    tk(
        &[
            "patch",
            "configmap",
            "demo",
            "-n",
            "crud",
            "--type=merge",
            "-p",
            r#"{"data":{"b":"3"}}"#,
        ],
        None,
    )
    .await;
    let got = tk(
        &[
            "get",
            "configmap",
            "demo",
            "-n",
            "crud",
            "-o",
            "jsonpath={.data}",
        ],
        None,
    )
    .await;
    assert!(
        got.contains("\"a\":\"2\"") && got.contains("\"b\":\"3\""),
        "{got}"
    );
    tk(&["delete", "configmap", "demo", "-n", "crud"], None).await;

    let seen = tokio::time::timeout(Duration::from_secs(20), events)
        .await
        .expect("watch saw DELETED in time")
        .unwrap();
    for want in ["ADDED", "MODIFIED", "DELETED"] {
        assert!(
            seen.iter().any(|e| e == want),
            "watch saw {seen:?}, missing {want}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_list_is_byte_identical_to_direct() {
    let env = env();
    let client = env.member.client().await.unwrap();
    tk(&["create", "namespace", "biglist"], None).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "biglist");
    let value = "x".repeat(10 * 1024);
    futures::stream::iter(0..2000)
        .map(|i| {
            let api = api.clone();
            let value = value.clone();
            async move {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("cm-{i:04}")),
                        ..Default::default()
                    },
                    data: Some([("v".to_string(), value)].into()),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm).await.map(|_| ())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    // Pin both LISTs to one etcd revision: other tests write concurrently.
    let first = member_kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/biglist/configmaps?limit=1",
    ])
    .await;
    let rv: serde_json::Value = serde_json::from_str(&first).unwrap();
    let rv = rv["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!(
        "/api/v1/namespaces/biglist/configmaps?resourceVersion={rv}&resourceVersionMatch=Exact"
    );
    let path = path.as_str();
    let tunnel = tk(&["get", "--raw", path], None).await;
    let direct = member_kubectl(&["get", "--raw", path]).await;
    assert!(
        tunnel.len() >= 20 * 1024 * 1024,
        "list is {} bytes",
        tunnel.len()
    );
    assert!(
        tunnel == direct,
        "tunnelled LIST differs from direct ({} vs {} bytes)",
        tunnel.len(),
        direct.len()
    );
    eprintln!(
        "LIST of {} bytes identical through the tunnel",
        tunnel.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_forms_and_errors() {
    let env = env();
    let id = identity(env);
    let ca = env.server.server.ca_pem().to_string();
    let gw = env.server.gateway_addr;
    let get = |path: &'static str| {
        let ca = ca.clone();
        let id = &id;
        async move { raw::get(gw, &ca, id, path).await.unwrap() }
    };
    // kube-apiserver forms.
    let (s, b) = get("/clusters/gondor/version").await;
    assert_eq!(s, 200, "{b:?}");
    assert!(String::from_utf8_lossy(&b).contains("v1.35"));
    let (s, b) = get("/api/clusters/gondor/v1/namespaces/default").await;
    assert_eq!(s, 200, "{b:?}");
    assert!(String::from_utf8_lossy(&b).contains("\"name\":\"default\""));
    let (s, b) = get("/apis/clusters/gondor/apps/v1").await;
    assert_eq!(s, 200, "{b:?}");
    assert!(String::from_utf8_lossy(&b).contains("APIResourceList"));
    // ks-apiserver form reaches the ks upstream with the segment removed and the
    // agent's own credential.
    let (s, b) = get("/kapis/clusters/gondor/resources.kubesphere.io/v1alpha3/nodes?limit=1").await;
    assert_eq!(s, 200, "{b:?}");
    let info: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        info["path"],
        "/kapis/resources.kubesphere.io/v1alpha3/nodes?limit=1"
    );
    assert_eq!(info["authorization"], format!("Bearer {}", env.sa_token));

    // No cluster in the path (kubectl 1.32 `get --raw`, plain `kubectl
    // proxy`): the certificate's own cluster, paths as the member knows them.
    let (s, b) = get("/version").await;
    assert_eq!(s, 200, "{b:?}");
    assert!(String::from_utf8_lossy(&b).contains("v1.35"));
    let (s, b) = get("/api/v1/namespaces/default").await;
    assert_eq!(s, 200, "{b:?}");
    assert!(String::from_utf8_lossy(&b).contains("\"name\":\"default\""));
    let (s, b) = get("/kapis/resources.kubesphere.io/v1alpha3/nodes?limit=1").await;
    assert_eq!(s, 200, "{b:?}");
    let info: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        info["path"],
        "/kapis/resources.kubesphere.io/v1alpha3/nodes?limit=1"
    );
    let (s, _) = get("/api/../version").await;
    assert_eq!(s, 400, "traversal without a cluster");

    // Unknown cluster: 404 Status. Known but disconnected: 503 Status. (Each
    // asked with a certificate issued for that cluster: gondor's certificate
    // gets 403 for both, without learning which exists.)
    let for_cluster = |cluster: &str, path: &'static str| {
        let ca = ca.clone();
        let id = env.server.identity(cluster).unwrap();
        async move { raw::get(gw, &ca, &id, path).await.unwrap() }
    };
    let (s, b) = for_cluster("mordor", "/clusters/mordor/version").await;
    assert_eq!(s, 404);
    assert_status(&b, 404, "NotFound");
    env.server.mint("rohan", None).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, b) = for_cluster("rohan", "/clusters/rohan/version").await;
    assert_eq!(s, 503);
    assert_status(&b, 503, "ServiceUnavailable");
    for other in ["/clusters/mordor/version", "/clusters/rohan/version"] {
        let (s, b) = get(other).await;
        assert_eq!(s, 403, "{other}");
        assert_status(&b, 403, "Forbidden");
    }
    for bad in [
        "/clusters/../gondor/version",
        "/clusters/gondor/../../version",
        "/clusters/gondor/%2e%2e/version",
        "/clusters/gondor%2F..%2Fx/version",
        "/clusters//version",
    ] {
        let (s, b) = get(bad).await;
        assert_eq!(s, 400, "{bad}: {}", String::from_utf8_lossy(&b));
        assert_status(&b, 400, "BadRequest");
    }
}

/// kubectl 1.32's `get --raw` (kubernetes/kubectl#1676) and `kubectl proxy`
/// without `--append-server-path` (1.32 and 1.35) drop the kubeconfig
/// server's `/clusters/<c>` path: the gateway serves the certificate's own
/// cluster for such paths, so both work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_kubectl_raw_and_a_plain_kubectl_proxy_reach_the_cluster() {
    let env = env();
    let old = testbed::old_kubectl_bin();
    let version = fixture::kubectl_at(&old, &env.kubeconfig, &["get", "--raw", "/version"], None)
        .await
        .unwrap();
    assert!(version.contains("v1.35"), "{version}");
    for bin in [old, testbed::kubectl_bin()] {
        plain_kubectl_proxy(env, &bin).await;
    }
}

async fn plain_kubectl_proxy(env: &Env, bin: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let port = testbed::free_port();
    let mut proxy = std::process::Command::new(bin);
    proxy
        .arg(format!("--kubeconfig={}", env.kubeconfig.display()))
        .args(["proxy", "--address=127.0.0.1", &format!("--port={port}")]);
    let _proxy =
        testbed::Process::spawn("kubectl-proxy", proxy, &dir.path().join("proxy.log")).unwrap();
    let get = |path: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let resp = sender.send_request(get_h1(path)).await?;
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await?
            .to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).to_string()))
    };
    let up = fixture::eventually(Duration::from_secs(10), || async {
        get("/version").await.ok()
    })
    .await;
    let (status, body) = up.unwrap_or_else(|| panic!("{} proxy never answered", bin.display()));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("v1.35"), "{body}");
    let (status, body) = get("/api/v1/namespaces/default").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"name\":\"default\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_requires_a_tower_client_certificate() {
    let env = env();
    let ca = env.server.server.ca_pem().to_string();
    let gw = env.server.gateway_addr;
    // No client certificate: the handshake (or the first read) fails.
    let no_cert = async {
        let tls = raw::connect(gw, &ca, None, false).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/clusters/gondor/version")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        anyhow::Ok(sender.send_request(req).await?.status())
    };
    assert!(
        no_cert.await.is_err(),
        "a request without a client certificate got an answer"
    );
    // A certificate from another CA.
    let other = tower_certs::Ca::generate("other").unwrap();
    let cert = other
        .issue_client(
            &tower_certs::ClientIdentity {
                common_name: "intruder".into(),
                organizations: vec![],
            },
            Duration::from_secs(600),
        )
        .unwrap();
    let foreign = raw::Identity {
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
    };
    assert!(
        raw::get(gw, &ca, &foreign, "/clusters/gondor/version")
            .await
            .is_err()
    );
    // kubectl with the other CA's cert fails too.
    let mut yaml: serde_json::Value =
        yaml_serde::from_str(&std::fs::read_to_string(&env.kubeconfig).unwrap()).unwrap();
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    yaml["users"][0]["user"]["client-certificate-data"] = b64(&foreign.cert_pem).into();
    yaml["users"][0]["user"]["client-key-data"] = b64(&foreign.key_pem).into();
    let bad = env.dir.path().join("foreign-kubeconfig");
    std::fs::write(&bad, yaml_serde::to_string(&yaml).unwrap()).unwrap();
    assert!(
        kubectl(
            &bad,
            &["get", "--raw", "/version", "--request-timeout=10s"],
            None
        )
        .await
        .is_err()
    );
}

/// Starts an agent of the shared environment with `token`; its error once it
/// failed (10 s at most).
async fn failed_agent(token: &JoinToken) -> (TowerAgent, String) {
    let agent = env().on_member().agent(token).unwrap();
    let status = agent
        .wait_state(Duration::from_secs(10), |s| {
            matches!(s, AgentState::Failed(_))
        })
        .await;
    let AgentState::Failed(msg) = status else {
        panic!("unexpected {status:?}")
    };
    (agent, msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_wrong_host_key() {
    let env = env();
    let mut token = env.server.mint("harad", None).unwrap();
    token.claims.host_key = tower_certs::HostKey::generate().unwrap().fingerprint();
    let (agent, msg) = failed_agent(&token).await;
    assert!(msg.contains("host key mismatch"), "{msg}");
    assert!(msg.contains(&token.claims.host_key), "{msg}");
    assert!(!env.server.is_connected("harad"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_expired_and_revoked_tokens_are_refused() {
    let env = env();
    // Wrong secret.
    let mut wrong = env.server.mint("umbar", None).unwrap();
    wrong.secret = tower_proto::Secret::generate();
    let (agent, msg) = failed_agent(&wrong).await;
    assert!(msg.contains("refused the join token"), "{msg}");
    agent.stop().await;
    assert!(!env.server.is_connected("umbar"));

    // Expired: the agent learns why.
    let expired = env.server.mint("dale", Some(Duration::ZERO)).unwrap();
    let (agent, msg) = failed_agent(&expired).await;
    assert!(msg.contains("expired"), "{msg}");
    agent.stop().await;
    assert!(!env.server.is_connected("dale"));

    // Revoked while connected: the session ends within 5 s.
    let token = env.server.mint("erebor", None).unwrap();
    let agent = env.on_member().agent(&token).unwrap();
    assert!(
        env.server
            .wait_connected("erebor", true, Duration::from_secs(10))
            .await
    );
    let revoked_at = Instant::now();
    env.server.revoke("erebor").unwrap();
    assert!(
        env.server
            .wait_connected("erebor", false, Duration::from_secs(5))
            .await,
        "session outlived revocation"
    );
    let took = revoked_at.elapsed();
    let s = agent
        .wait_state(
            Duration::from_secs(5),
            |s| matches!(s, AgentState::Failed(m) if m.contains("revoked")),
        )
        .await;
    assert!(
        matches!(&s, AgentState::Failed(m) if m.contains("revoked")),
        "{s:?}"
    );
    eprintln!("revocation ended the session in {took:.2?}");
    // It stays out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!env.server.is_connected("erebor"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_names_outside_its_allow_list() {
    let env = env();
    let token = env.server.mint("lorien", None).unwrap();
    // This agent serves kube-apiserver only.
    let agent = env.on_member().agent(&token).unwrap();
    assert!(
        env.server
            .wait_connected("lorien", true, Duration::from_secs(10))
            .await
    );
    let session = env.server.server.registry().get("lorien").unwrap();
    // Ask the agent directly for channels it never offered.
    for name in [
        "ks-apiserver",
        "127.0.0.1",
        "kubernetes.default.svc",
        "metadata.google.internal",
    ] {
        let r = session.open_channel_unchecked(name, 443).await;
        assert!(r.is_err(), "agent accepted a channel for {name}");
    }
    // The gateway does not even try for an upstream the agent does not serve.
    let id = env.server.identity("lorien").unwrap();
    let (s, b) = raw::get(
        env.server.gateway_addr,
        env.server.server.ca_pem(),
        &id,
        "/kapis/clusters/lorien/x",
    )
    .await
    .unwrap();
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_credential_never_reaches_the_host_side() {
    let env = env();
    // Traffic that uses the credential on the member side.
    tk(&["get", "ns"], None).await;
    let id = identity(env);
    raw::get(
        env.server.gateway_addr,
        env.server.server.ca_pem(),
        &id,
        "/kapis/clusters/gondor/x",
    )
    .await
    .unwrap();
    // The server's state holds no trace of it.
    let needle = env.sa_token.as_bytes();
    for file in walk(&env.server.state_dir) {
        // Other tests mint and revoke in this state dir meanwhile: a store
        // file written aside and renamed over may be gone by now.
        let bytes = match std::fs::read(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r.unwrap(),
        };
        assert!(
            !contains(&bytes, needle),
            "{} holds the member credential",
            file.display()
        );
    }
    // Nor does anything logged in this process (server and agent share it).
    if let Some(log) = fixture::log_file() {
        let bytes = std::fs::read(&log).unwrap();
        assert!(
            !contains(&bytes, needle),
            "the member credential was logged"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_watch_passes_through_the_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env();
    tk(&["create", "namespace", "ws"], None).await;
    tk(
        &[
            "create",
            "configmap",
            "hello",
            "-n",
            "ws",
            "--from-literal=a=1",
        ],
        None,
    )
    .await;
    let mut tls = gateway_tls(env).await;
    let req = "GET /clusters/gondor/api/v1/namespaces/ws/configmaps?watch=true HTTP/1.1\r\n\
               Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
               Origin: https://127.0.0.1\r\n\r\n";
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !String::from_utf8_lossy(&buf).contains("ADDED") && Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(15), tls.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );
    assert!(
        text.contains("ADDED") && text.contains("\"hello\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_upgrade_round_trips_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env();
    let mut tls = gateway_tls(env).await;
    let req = "POST /kapis/clusters/gondor/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\
               Connection: Upgrade\r\nUpgrade: echo\r\nContent-Length: 0\r\n\r\n";
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("\\\"method\\\":\\\"POST\\\"") || head.contains("\"method\":\"POST\""),
        "{head}"
    );
    for round in 0..20 {
        let msg = format!("round {round}: {}", "z".repeat(round * 1000));
        tls.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_answers_with_200_reaches_the_client_as_200() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env();
    let mut tls = gateway_tls(env).await;
    // The echo upstream switches only for `Upgrade: echo`; this one it
    // answers with a plain 200 and its JSON.
    let req = "GET /kapis/clusters/gondor/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\
               Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"path\"") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"path\":\"/kapis/echo\""), "{text}");
    assert!(!text.to_ascii_lowercase().contains("x-tower-"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_kill_restart_and_in_flight() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let mut server = TowerServer::start(&dir.path().join("server"))
        .await
        .unwrap();
    let token = server.mint("ithilien", None).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.encode()).unwrap();
    let kubeconfig = server.kubeconfig_file("ithilien").unwrap();

    // A real agent process.
    let mut agent = env
        .on_member()
        .agent_process(&token_file, &dir.path().join("agent.log"))
        .unwrap();
    assert!(
        server
            .wait_connected("ithilien", true, Duration::from_secs(20))
            .await,
        "agent process did not connect"
    );
    kubectl(&kubeconfig, &["get", "ns"], None).await.unwrap();

    // An in-flight watch, then kill -9 of the agent.
    let id = identity_from_kubeconfig(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    let ca = server.ca_pem();
    let mut sender = fixture::gateway_h1(server.gateway_addr, &ca, &id)
        .await
        .unwrap();
    let req = get_h1("/clusters/ithilien/api/v1/namespaces?watch=true");
    let watch = sender.send_request(req).await.unwrap();
    assert_eq!(watch.status(), 200);
    let body = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = watch.into_body();
        loop {
            match body.frame().await {
                None => return "eof".to_string(),
                Some(Err(e)) => return format!("error: {e}"),
                Some(Ok(_)) => {}
            }
        }
    });
    let killed = Instant::now();
    agent.kill9();
    assert!(
        server
            .wait_connected("ithilien", false, Duration::from_secs(5))
            .await
    );
    let detected = killed.elapsed();
    let ended = tokio::time::timeout(Duration::from_secs(10), body)
        .await
        .expect("in-flight watch hung")
        .unwrap();
    eprintln!(
        "agent kill -9: disconnect noticed in {detected:.2?}; in-flight watch ended with {ended}"
    );
    // A new request now gets a clean 503 Status.
    let (s, b) = raw::get(
        server.gateway_addr,
        server.server.ca_pem(),
        &id,
        "/clusters/ithilien/version",
    )
    .await
    .unwrap();
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));

    // The agent comes back; then the server restarts and the agent returns within 5 s.
    let _agent = env
        .on_member()
        .agent_process(&token_file, &dir.path().join("agent2.log"))
        .unwrap();
    assert!(
        server
            .wait_connected("ithilien", true, Duration::from_secs(20))
            .await
    );
    server.restart().await.unwrap();
    let restarted = Instant::now();
    assert!(
        server
            .wait_connected("ithilien", true, Duration::from_secs(5))
            .await,
        "agent not back within 5 s of a server restart"
    );
    eprintln!(
        "agent back {:.2?} after the server restarted",
        restarted.elapsed()
    );
    kubectl(&kubeconfig, &["get", "ns"], None).await.unwrap();
}

/// OpenSSH's `ssh -N -R` stands in as a minimal agent: it forwards the logical
/// name `kube-apiserver` to a local `kubectl proxy` (which adds the member
/// credential), and the server falls back to one HTTP/1.1 exchange per channel
/// because no hello arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_client_stands_in_as_an_agent() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let token = env.server.mint("shire", None).unwrap();

    // kubectl proxy on the member side, authenticating with the service account.
    let proxy_port = testbed::free_port();
    let sa_kubeconfig = dir.path().join("sa-kubeconfig");
    std::fs::write(
        &sa_kubeconfig,
        env.member.token_kubeconfig(&env.sa_token).unwrap(),
    )
    .unwrap();
    let mut proxy = std::process::Command::new(testbed::kubectl_bin());
    proxy
        .arg(format!("--kubeconfig={}", sa_kubeconfig.display()))
        .args([
            "proxy",
            "--address=127.0.0.1",
            &format!("--port={proxy_port}"),
            "--accept-hosts=^kube-apiserver$",
        ]);
    let _proxy =
        testbed::Process::spawn("kubectl-proxy", proxy, &dir.path().join("proxy.log")).unwrap();

    // Pin the server's host key for ssh, and hand it the credential via SSH_ASKPASS.
    let host_key = std::fs::read_to_string(fixture::host_key_file(&env.server.state_dir)).unwrap();
    let public = tower_certs::HostKey::from_openssh(&host_key)
        .unwrap()
        .public_key()
        .to_openssh()
        .unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {public}\n", env.server.ssh_addr.port()),
    )
    .unwrap();
    let askpass = dir.path().join("askpass.sh");
    let cred_file = dir.path().join("credential");
    std::fs::write(&cred_file, token.credential().expose()).unwrap();
    std::fs::write(
        &askpass,
        format!("#!/bin/sh\ncat '{}'\n", cred_file.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut ssh = std::process::Command::new("ssh");
    ssh.args(["-N", "-T", "-F", "/dev/null"])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
        ])
        .args([
            "-o",
            "ServerAliveInterval=1",
            "-o",
            "NumberOfPasswordPrompts=1",
        ])
        .args(["-p", &env.server.ssh_addr.port().to_string()])
        .args(["-R", &format!("kube-apiserver:80:127.0.0.1:{proxy_port}")])
        .arg("shire@127.0.0.1")
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .stdin(std::process::Stdio::null());
    let _ssh = testbed::Process::spawn("openssh", ssh, &dir.path().join("ssh.log")).unwrap();
    assert!(
        env.server
            .wait_connected("shire", true, Duration::from_secs(15))
            .await,
        "OpenSSH client did not connect: {}",
        testbed::log_tail(&dir.path().join("ssh.log"), 20)
    );
    let session = env.server.server.registry().get("shire").unwrap();
    assert!(
        !session.speaks_h2(),
        "no hello, so plain HTTP/1.1 per channel"
    );

    let kubeconfig = env.server.kubeconfig_file("shire").unwrap();
    let ns = kubectl(&kubeconfig, &["get", "ns", "-o", "name"], None)
        .await
        .unwrap();
    assert!(ns.contains("namespace/default"), "{ns}");
    let version = kubectl(&kubeconfig, &["get", "--raw", "/version"], None)
        .await
        .unwrap();
    assert!(version.contains("v1.35"), "{version}");
    assert_eq!(
        session.open_channels(),
        0,
        "per-request channels are closed after use"
    );
}

/// `towerctl` against the server's state dir: mint a token, list, print a
/// kubeconfig, revoke; the real agent binary connects with the minted token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towerctl_mints_lists_and_revokes() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let towerctl = fixture::workspace_bin("tower-server", "towerctl").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&towerctl)
            .arg("--state-dir")
            .arg(&env.server.state_dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let server_addr = env.server.ssh_addr.to_string();
    let token_file = dir.path().join("token");
    let (ok, out, err) = run(&[
        "token",
        "mirkwood",
        "--server",
        &server_addr,
        "--ttl",
        "1h",
        "--output",
        token_file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // Written to its file, its owner's alone, and nowhere else.
    let owner_only = |file: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777 == 0o600
    };
    assert!(owner_only(&token_file), "the token file is not 0600");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let parsed = tower_proto::JoinToken::parse(&token).unwrap();
    assert!(!out.contains(parsed.secret.expose()), "secret on stdout");
    assert_eq!(
        parsed.claims.host_key,
        env.server.server.host_key_fingerprint()
    );
    assert!(!err.contains(parsed.secret.expose()), "secret on stderr");
    let (ok, list, _) = run(&["tokens"]);
    assert!(
        ok && list.contains("mirkwood") && list.contains(&parsed.claims.id),
        "{list}"
    );
    assert!(!list.contains(parsed.secret.expose()), "secret listed");
    // An existing, world-readable file is narrowed to 0600 before it is written.
    let kubeconfig_file = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig_file, "").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&kubeconfig_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (ok, out, err) = run(&[
        "kubeconfig",
        "mirkwood",
        "--gateway-url",
        &env.server.gateway_url(),
        "-o",
        kubeconfig_file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.is_empty(), "the kubeconfig also went to stdout");
    assert!(
        owner_only(&kubeconfig_file),
        "the kubeconfig file is not 0600"
    );
    let _agent = env
        .on_member()
        .agent_process(&token_file, &dir.path().join("agent.log"))
        .unwrap();
    assert!(
        env.server
            .wait_connected("mirkwood", true, Duration::from_secs(20))
            .await
    );
    let ns = kubectl(&kubeconfig_file, &["get", "ns", "-o", "name"], None)
        .await
        .unwrap();
    assert!(ns.contains("namespace/default"));

    let (ok, out, err) = run(&["revoke", "mirkwood"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked 1"), "{out}");
    assert!(
        env.server
            .wait_connected("mirkwood", false, Duration::from_secs(5))
            .await,
        "revocation did not end the session"
    );
    let (ok, _, err) = run(&["revoke", "mirkwood"]);
    assert!(!ok && err.contains("no active token"), "{err}");
    // Bad input gets a clear error.
    let (ok, _, err) = run(&["token", "Bad_Name", "--server", &server_addr]);
    assert!(!ok && err.contains("not a valid DNS label"), "{err}");
    let (ok, _, err) = run(&["token", "x", "--server", &server_addr, "--ttl", "5y"]);
    assert!(!ok && err.contains("TTL"), "{err}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "ops")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

/// `/healthz`, `/readyz` and `/metrics` on the server and the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_report_health_and_metrics() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let server = TowerServer::start(&dir.path().join("server"))
        .await
        .unwrap();
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_ops = ops.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let (s, sd) = (server.server.clone(), shutdown.clone());
        async move { s.serve_ops(ops, sd).await }
    });
    let token = server.mint("osgiliath", None).unwrap();
    let agent = env.on_member().agent(&token).unwrap();
    let agent_ops_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_ops = agent_ops_listener.local_addr().unwrap();
    tokio::spawn({
        let (a, sd) = (agent.agent.clone(), shutdown.clone());
        async move { a.serve_ops(agent_ops_listener, sd).await }
    });
    assert!(
        server
            .wait_connected("osgiliath", true, Duration::from_secs(10))
            .await
    );
    let kubeconfig = server.kubeconfig_file("osgiliath").unwrap();
    kubectl(&kubeconfig, &["get", "ns"], None).await.unwrap();
    // One refused authentication.
    let mut bad = server.mint("osgiliath-2", None).unwrap();
    bad.secret = tower_proto::Secret::generate();
    let refused = env.on_member().agent(&bad).unwrap();
    refused
        .wait_state(Duration::from_secs(5), |s| {
            matches!(s, AgentState::Failed(_))
        })
        .await;
    refused.stop().await;

    assert_eq!(http_get(server_ops, "/healthz").await.0, 200);
    assert_eq!(http_get(server_ops, "/readyz").await.0, 200);
    let (code, metrics) = http_get(server_ops, "/metrics").await;
    assert_eq!(code, 200);
    for want in [
        "tower_server_sessions 1",
        "tower_server_channels ",
        "tower_server_tunnel_bytes_total{direction=\"to_agent\"}",
        "tower_server_tunnel_bytes_total{direction=\"from_agent\"}",
        "tower_server_channel_open_seconds_count ",
        "tower_server_gateway_responses_total{code=\"2xx\"}",
        match fixture::test_transport() {
            fixture::TestTransport::Ssh => {
                "tower_server_agent_connections_total{transport=\"ssh\"}"
            }
            fixture::TestTransport::Ws => "tower_server_agent_connections_total{transport=\"ws\"}",
            fixture::TestTransport::Wss => {
                "tower_server_agent_connections_total{transport=\"wss\"}"
            }
        },
    ] {
        assert!(metrics.contains(want), "missing {want:?} in:\n{metrics}");
    }
    let failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("tower_server_auth_failures_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(failures >= 1, "{metrics}");

    assert_eq!(http_get(agent_ops, "/readyz").await.0, 200);
    let (_, agent_metrics) = http_get(agent_ops, "/metrics").await;
    assert!(
        agent_metrics.contains("tower_agent_connected 1"),
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("tower_agent_requests_total{upstream=\"kube-apiserver\"}"),
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("tower_agent_reconnects_total 0"),
        "{agent_metrics}"
    );
    // The agent is not ready while the server is gone.
    let mut server = server;
    server.stop().await;
    let not_ready = fixture::eventually(Duration::from_secs(5), || async {
        (http_get(agent_ops, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    assert!(not_ready.is_some());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_gets_504_but_a_watch_may_wait() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let echo = HttpsUpstream::echo(dir.path()).await.unwrap();
    let cluster = "ithilien";
    let token = env.server.mint(cluster, None).unwrap();
    let agent = TowerAgent::start_configured(
        TokenSource::Literal(token.encode()),
        vec![echo.upstream(UPSTREAM_KUBE_APISERVER, None)],
        |c| c.upstream_timeout = Duration::from_secs(1),
    )
    .unwrap();
    assert!(
        env.server
            .wait_connected(cluster, true, Duration::from_secs(10))
            .await
    );
    let id = env.server.identity(cluster).unwrap();
    let ca = env.server.server.ca_pem().to_string();
    let gw = env.server.gateway_addr;
    // A short request: a 504 Status once the agent's upstream timeout passes.
    let asked = Instant::now();
    let (s, b) = tokio::time::timeout(
        Duration::from_secs(10),
        raw::get(gw, &ca, &id, "/clusters/ithilien/hang"),
    )
    .await
    .expect("a hung upstream hung the client")
    .unwrap();
    let took = asked.elapsed();
    assert_eq!(s, 504, "{}", String::from_utf8_lossy(&b));
    assert_status(&b, 504, "Timeout");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    // A watch is long-running: no response-head timeout.
    let watch = tokio::time::timeout(
        Duration::from_secs(3),
        raw::get(gw, &ca, &id, "/clusters/ithilien/hang?watch=true"),
    )
    .await;
    assert!(
        watch.is_err(),
        "a watch was cut by the short-request timeout"
    );
    eprintln!("hung upstream: 504 Status after {took:.2?}; a watch still waiting after 3 s");
    agent.stop().await;
}
