//! KubeSphere mode end to end against the test bed: a host cluster with the
//! KubeSphere-shaped Cluster CRD, a Tower server in KubeSphere mode, and
//! agents next to a member cluster. The set-up KubeSphere's own tower does,
//! the per-cluster kube and ks listeners and whose identity reaches the
//! member through each, and a quiet Cluster staying unwritten.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tower_agent::TokenSource;
use tower_proto::names::UPSTREAM_KS_APISERVER;
use tower_proto::token::{Claims, JoinToken, Secret};
use tower_server::crd::{Cluster, ClusterSpec, Connection};
use tower_tests::fixture::{
    self, HttpsUpstream, KubeTowerServer, TowerAgent, agent_credential, eventually, kube_upstream,
};
use tower_tests::testbed::{ControlPlane, Testbed, kubesphere};

tower_tests::shared_env!(Env, "kubesphere", start_env);

/// Kube ports of this suite (ks ports are 10000 above), clear of other suites.
const PORTS: std::ops::RangeInclusive<u16> = 16100..=16199;

struct Env {
    _bed: Testbed,
    host: ControlPlane,
    member: ControlPlane,
    server: KubeTowerServer,
    sa_token_file: PathBuf,
    /// The member's ks-apiserver: answers `{method, path, authorization}`.
    ks: HttpsUpstream,
    dir: tempfile::TempDir,
}

async fn start_env() -> anyhow::Result<Env> {
    let bed = fixture::start_logged_bed("tower-kubesphere.log").await?;
    let mut clusters = bed.clusters(&["host", "member"]).await?;
    let member = clusters.pop().expect("member");
    let host = clusters.pop().expect("host");
    let dir = tempfile::tempdir()?;
    let server = KubeTowerServer::start(&host, dir.path(), "tower-server-0", |c| {
        c.kubesphere = Some(tower_server::kube::KubeSphereConfig {
            ports: PORTS,
            ..Default::default()
        });
        c.resync = Duration::from_secs(20);
    })
    .await?;
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await?;
    let ks = HttpsUpstream::echo(dir.path()).await?;
    server.wait_published(&host).await?;
    Ok(Env {
        _bed: bed,
        host,
        member,
        server,
        sa_token_file,
        ks,
        dir,
    })
}

async fn cluster(client: &Client, name: &str) -> Option<Cluster> {
    Api::<Cluster>::all(client.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

/// A Cluster as KubeSphere's console creates one for an agent connection.
async fn create_proxy_cluster(client: &Client, name: &str) {
    let c = Cluster {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: ClusterSpec {
            join_federation: Some(true),
            enable: Some(true),
            provider: Some("tower-test".into()),
            connection: Some(Connection {
                type_: Some("proxy".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    };
    Api::<Cluster>::all(client.clone())
        .create(&PostParams::default(), &c)
        .await
        .unwrap();
}

/// Creates proxy Cluster `name` and waits for tower's set-up (`Initialized`);
/// the Cluster and its connection.
async fn create_initialized(client: &Client, name: &str) -> (Cluster, Connection) {
    create_proxy_cluster(client, name).await;
    let c = wait_condition(client, name, "Initialized", "True", Duration::from_secs(20)).await;
    let conn = c.spec.connection.clone().unwrap();
    (c, conn)
}

async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    timeout: Duration,
) -> Cluster {
    let found = eventually(timeout, || async {
        let c = cluster(client, name).await?;
        (c.condition(type_)?.status == status).then_some(c)
    })
    .await;
    match found {
        Some(c) => c,
        None => panic!(
            "cluster {name}: {type_} never became {status}; now {:?}",
            cluster(client, name).await.and_then(|c| c.status)
        ),
    }
}

/// An in-process agent for `name` with the Cluster's own token, serving the
/// member's kube-apiserver and the ks stand-in.
async fn start_agent(env: &Env, name: &str, token: &str) -> TowerAgent {
    let ks = env
        .ks
        .upstream(UPSTREAM_KS_APISERVER, Some(&env.sa_token_file));
    start_agent_with(env, name, token, ks).await
}

/// Like [`start_agent`], with `ks` as its ks-apiserver upstream.
async fn start_agent_with(
    env: &Env,
    name: &str,
    token: &str,
    ks: tower_agent::UpstreamConfig,
) -> TowerAgent {
    let client = env.host.client().await.unwrap();
    let info = Api::<ConfigMap>::namespaced(client, "kubesphere-system")
        .get("tower-server")
        .await
        .unwrap();
    let data = info.data.unwrap();
    let join = JoinToken {
        claims: Claims {
            servers: vec![env.server.ssh_addr.to_string()],
            host_key: data["hostKeyFingerprint"].clone(),
            cluster: name.into(),
            id: "cluster".into(),
            expires: None,
        },
        secret: Secret::new(token),
    };
    TowerAgent::start_with(
        TokenSource::Literal(join.encode()),
        vec![kube_upstream(&env.member, &env.sa_token_file), ks],
    )
    .unwrap()
}

/// One HTTP/1.1 request over a fresh connection (TLS with `ca_pem` when
/// given, with `identity` as client certificate); status and body.
async fn request(
    addr: SocketAddr,
    tls: Option<(&str, Option<&fixture::raw::Identity>)>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Bytes) {
    let mut req = hyper::Request::get(path).header("host", "console.example");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = match tls {
        Some((ca, identity)) => {
            let io = fixture::raw::connect(addr, ca, identity, false)
                .await
                .unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        }
        None => {
            let io = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        }
    };
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

const SELF_SUBJECT_REVIEW: &str =
    r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_listeners_and_identity_by_credential() {
    let env = env();
    let client = env.host.client().await.unwrap();
    // The one-time set-up, before any agent.
    let (_, conn) = create_initialized(&client, "minas").await;
    let token = conn.token.clone().expect("a token is generated when empty");
    assert!(token.len() >= 32, "{token}");
    let kube_port = conn.kubernetes_api_server_port.unwrap();
    assert!(PORTS.contains(&kube_port), "{kube_port}");
    assert_eq!(conn.kubesphere_api_server_port, Some(kube_port + 10_000));
    let svc = Api::<Service>::namespaced(client.clone(), "kubesphere-system")
        .get("mc-minas")
        .await
        .unwrap();
    let spec = svc.spec.clone().unwrap();
    let ip = spec.cluster_ip.clone().unwrap();
    let selector = spec.selector.clone().unwrap();
    assert_eq!(selector["app"], "tower");
    assert_eq!(selector["app.kubernetes.io/name"], "tower");
    let ports: Vec<(i32, String)> = spec
        .ports
        .unwrap()
        .iter()
        .map(|p| {
            let target = match p.target_port.clone().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
            };
            (p.port, target)
        })
        .collect();
    assert!(ports.contains(&(6443, kube_port.to_string())), "{ports:?}");
    assert!(
        ports.contains(&(80, (kube_port + 10_000).to_string())),
        "{ports:?}"
    );
    let kube_endpoint = format!("https://{ip}:6443");
    assert_eq!(
        conn.kubernetes_api_endpoint.as_deref(),
        Some(kube_endpoint.as_str())
    );
    assert_eq!(
        conn.kubesphere_api_endpoint,
        Some(format!("http://{ip}:80"))
    );
    let kubeconfig: serde_json::Value =
        yaml_serde::from_slice(&conn.kubeconfig.clone().unwrap().0).unwrap();
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["server"],
        kube_endpoint
    );
    let c = wait_condition(
        &client,
        "minas",
        "AgentAvailable",
        "False",
        Duration::from_secs(10),
    )
    .await;
    // `towerctl join` on a Cluster the console made keeps what KubeSphere set.
    let out =
        std::process::Command::new(fixture::workspace_bin("tower-server", "towerctl").unwrap())
            .arg("--kubeconfig")
            .arg(env.host.admin_kubeconfig())
            .args(["join", "minas"])
            .current_dir(env.dir.path())
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let joined = cluster(&client, "minas").await.unwrap();
    assert_eq!(
        joined.spec.join_federation,
        Some(true),
        "towerctl join changed joinFederation"
    );
    assert_eq!(
        joined.token(),
        Some(token.as_str()),
        "towerctl join changed the token"
    );
    let ks_addr: SocketAddr = format!("127.0.0.1:{}", kube_port + 10_000).parse().unwrap();
    let kube_addr: SocketAddr = format!("127.0.0.1:{kube_port}").parse().unwrap();
    let (code, body) = request(ks_addr, None, "/kapis/version", &[]).await;
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));

    // The agent connects with the Cluster's own token.
    let agent = start_agent(env, "minas", &token).await;
    let started = Instant::now();
    wait_condition(
        &client,
        "minas",
        "AgentAvailable",
        "True",
        Duration::from_secs(20),
    )
    .await;
    eprintln!(
        "kubesphere: agent up -> AgentAvailable=True in {:.2?}",
        started.elapsed()
    );

    // kubectl with the Cluster's kubeconfig: the agent's identity.
    let kc = fixture::kube::kubeconfig_through(
        &c,
        env.dir.path(),
        SocketAddr::from(([127, 0, 0, 1], kube_port)),
    );
    let ns = fixture::kubectl(&kc, &["get", "ns", "-o", "name"], None)
        .await
        .unwrap();
    assert!(ns.contains("namespace/default"), "{ns}");
    let review = fixture::kubectl(
        &kc,
        &["create", "-f", "-", "-o", "json"],
        Some(SELF_SUBJECT_REVIEW),
    )
    .await
    .unwrap();
    assert!(
        review.contains("system:serviceaccount:tower-system:tower-agent"),
        "{review}"
    );

    // A bearer-only caller (as kubefed's KubeFedCluster is) keeps its identity.
    let other = env
        .member
        .service_account_token("kubefed-test", "kubefed", false)
        .await
        .unwrap();
    let ca = env.server_ca("minas").await;
    let auth = format!("Bearer {other}");
    let (code, body) = post_review(kube_addr, &ca, &auth).await;
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "system:serviceaccount:kubefed-test:kubefed"
    );
    // A bad bearer token is the member's 401, not the agent's identity.
    let (code, body) = request(
        kube_addr,
        Some((&ca, None)),
        "/api/v1/namespaces",
        &[("authorization", "Bearer not-a-token")],
    )
    .await;
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    // No credential at all: 401 Status from tower, nothing reaches the member.
    let (code, body) = request(kube_addr, Some((&ca, None)), "/api/v1/namespaces", &[]).await;
    assert_eq!(code, 401);
    fixture::http::assert_status(&body, 401, "Unauthorized");

    // The ks listener: plain HTTP, member-relative paths, the caller's
    // Authorization unchanged and nothing added.
    let (code, body) = request(
        ks_addr,
        None,
        "/kapis/tenant.kubesphere.io/v1alpha2/workspaces?limit=1",
        &[("authorization", "Bearer user-jwt")],
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echo["path"],
        "/kapis/tenant.kubesphere.io/v1alpha2/workspaces?limit=1"
    );
    assert_eq!(echo["authorization"], "Bearer user-jwt");
    let (code, body) = request(ks_addr, None, "/kapis/version", &[]).await;
    assert_eq!(code, 200);
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        echo["authorization"].is_null(),
        "the agent added a credential: {echo}"
    );

    // A quiet cluster: nobody writes it, its Agent or its Service.
    let settle = Duration::from_secs(3);
    tokio::time::sleep(settle).await;
    let versions = |client: Client| async move {
        let c = cluster(&client, "minas").await.unwrap().resource_version();
        let a = Api::<tower_server::crd::Agent>::all(client.clone())
            .get_opt("minas")
            .await
            .unwrap()
            .map(|a| a.resource_version());
        let s = Api::<Service>::namespaced(client, "kubesphere-system")
            .get("mc-minas")
            .await
            .unwrap()
            .resource_version();
        (c, a, s)
    };
    let before = versions(client.clone()).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        versions(client.clone()).await,
        before,
        "written during a quiet minute"
    );

    // The agent goes: AgentAvailable False within seconds, and an Event says so.
    agent.kill();
    let gone = Instant::now();
    wait_condition(
        &client,
        "minas",
        "AgentAvailable",
        "False",
        Duration::from_secs(15),
    )
    .await;
    eprintln!(
        "kubesphere: agent killed -> AgentAvailable=False in {:.2?}",
        gone.elapsed()
    );
    let events = env
        .host
        .run_kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"], None)
        .await
        .unwrap();
    assert!(events.contains("AgentDisconnected"), "{events}");
}

async fn post_review(addr: SocketAddr, ca: &str, auth: &str) -> (u16, Bytes) {
    let io = fixture::raw::connect(addr, ca, None, false).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header("host", "127.0.0.1")
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            SELF_SUBJECT_REVIEW.as_bytes(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.into_body().collect().await.unwrap().to_bytes())
}

impl Env {
    /// The tower CA, as kubeconfigs carry it.
    async fn server_ca(&self, name: &str) -> String {
        let client = self.host.client().await.unwrap();
        let c = eventually(Duration::from_secs(10), || async {
            cluster(&client, name).await?.spec.connection?.kubeconfig
        })
        .await
        .unwrap();
        let doc: serde_json::Value = yaml_serde::from_slice(&c.0).unwrap();
        use base64::Engine;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(
                doc["clusters"][0]["cluster"]["certificate-authority-data"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        String::from_utf8(pem).unwrap()
    }
}

/// Reads from `io` until `needle` shows (or 15 s); all that was read.
async fn read_until<R: tokio::io::AsyncRead + Unpin>(io: &mut R, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !String::from_utf8_lossy(&buf).contains(needle) && Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(15), io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_and_upgrades_through_the_cluster_listeners() {
    use tokio::io::AsyncWriteExt;
    let env = env();
    let client = env.host.client().await.unwrap();
    let (_, conn) = create_initialized(&client, "osgiliath").await;
    let kube_port = conn.kubernetes_api_server_port.unwrap();
    let _agent = start_agent(env, "osgiliath", conn.token.as_deref().unwrap()).await;
    let c = wait_condition(
        &client,
        "osgiliath",
        "AgentAvailable",
        "True",
        Duration::from_secs(20),
    )
    .await;
    let kc = fixture::kube::kubeconfig_through(
        &c,
        env.dir.path(),
        SocketAddr::from(([127, 0, 0, 1], kube_port)),
    );
    let k = |args: &'static [&'static str], stdin: Option<&'static str>| {
        let kc = kc.clone();
        async move {
            fixture::kubectl(&kc, args, stdin)
                .await
                .unwrap_or_else(|e| panic!("{e:#}"))
        }
    };

    // CRUD and a watch, as on a direct cluster.
    assert!(
        k(&["get", "--raw", "/version"], None)
            .await
            .contains("v1.35")
    );
    k(&["create", "namespace", "osg"], None).await;
    let mut watch = tokio::process::Command::new(tower_tests::testbed::kubectl_bin());
    watch
        .arg(format!("--kubeconfig={}", kc.display()))
        .args([
            "get",
            "cm",
            "-n",
            "osg",
            "-w",
            "--output-watch-events",
            "-o",
            "custom-columns=EVENT:.type,NAME:.object.metadata.name",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut watch = watch.spawn().unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let events = tokio::spawn(async move { read_until(&mut stdout, "DELETED").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    k(
        &[
            "create",
            "configmap",
            "demo",
            "-n",
            "osg",
            "--from-literal=a=1",
        ],
        None,
    )
    .await;
    k(&["apply", "-f", "-"], Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n  namespace: osg\ndata:\n  a: \"2\"\n")).await;
    let got = k(
        &[
            "get",
            "configmap",
            "demo",
            "-n",
            "osg",
            "-o",
            "jsonpath={.data.a}",
        ],
        None,
    )
    .await;
    assert_eq!(got.trim(), "2");
    k(&["delete", "configmap", "demo", "-n", "osg"], None).await;
    let seen = events.await.unwrap();
    for want in ["ADDED", "MODIFIED", "DELETED"] {
        assert!(seen.contains(want), "watch saw {seen:?}, missing {want}");
    }

    // A WebSocket watch through the kube listener, with the kubeconfig's
    // certificate and with a bearer-only caller.
    let ca = env.server_ca("osgiliath").await;
    let kube_addr: SocketAddr = format!("127.0.0.1:{kube_port}").parse().unwrap();
    let id = fixture::identity_from_kubeconfig(
        &String::from_utf8(conn.kubeconfig.clone().unwrap().0).unwrap(),
    )
    .unwrap();
    let admin = format!("Authorization: Bearer {}\r\n", env.member.admin_token());
    for (identity, auth) in [(Some(&id), String::new()), (None, admin)] {
        let mut tls = fixture::raw::connect(kube_addr, &ca, identity, false)
            .await
            .unwrap();
        let req = format!(
            "GET /api/v1/namespaces?watch=true HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://127.0.0.1\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let text = read_until(&mut tls, "\"osg\"").await;
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.contains("ADDED"), "{text}");
    }

    // The ks listener splices an upgrade (a console terminal's WebSocket).
    let ks_addr: SocketAddr = format!("127.0.0.1:{}", kube_port + 10_000).parse().unwrap();
    let mut tcp = tokio::net::TcpStream::connect(ks_addr).await.unwrap();
    tcp.write_all(b"GET /kapis/terminal HTTP/1.1\r\nHost: console.example\r\nAuthorization: Bearer user-jwt\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut tcp, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping through the ks listener")
        .await
        .unwrap();
    let back = read_until(&mut tcp, "ping through the ks listener").await;
    assert!(back.contains("ping through the ks listener"), "{back}");

    // The Service belongs to the Cluster; deleting the Cluster closes its
    // listeners and ends its session.
    let svc = Api::<Service>::namespaced(client.clone(), "kubesphere-system")
        .get("mc-osgiliath")
        .await
        .unwrap();
    let owner = &svc.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Cluster", "osgiliath")
    );
    assert_eq!(Some(owner.uid.clone()), c.metadata.uid);
    Api::<Cluster>::all(client.clone())
        .delete("osgiliath", &Default::default())
        .await
        .unwrap();
    let closed = eventually(Duration::from_secs(10), || async {
        let kube = tokio::net::TcpStream::connect(kube_addr).await.is_err();
        let ks = tokio::net::TcpStream::connect(ks_addr).await.is_err();
        (kube && ks).then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "the deleted Cluster's listeners still accept"
    );
    let ended = eventually(Duration::from_secs(10), || async {
        let state = _agent.agent.state().borrow().clone();
        (!matches!(state, tower_agent::AgentState::Connected { .. })).then_some(())
    })
    .await;
    assert!(ended.is_some(), "the deleted Cluster's session is still up");
}

/// The KubeSphere stand-in's shared JWT secret (ks-apiserver's `jwtSecret`).
const JWT_SECRET: &[u8] = b"tower-test-jwt-secret-0123456789abcdef";

/// The ks stand-in's request log line for `path`, waiting for it.
async fn ks_request(ks: &kubesphere::MemberKs, path: &str) -> kubesphere::KsRequest {
    eventually(Duration::from_secs(5), || async {
        ks.requests().into_iter().rev().find(|r| r.path == path)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the member's ks-apiserver never saw {path}: {:?}",
            ks.requests()
        )
    })
}

/// Resource versions of the Cluster's modifications seen over `window`.
async fn cluster_modifications(client: &Client, name: &str, window: Duration) -> usize {
    use futures::StreamExt;
    let api = Api::<Cluster>::all(client.clone());
    let rv = api.get(name).await.unwrap().resource_version().unwrap();
    let params = kube::api::WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(window.as_secs() as u32);
    let mut stream = api.watch(&params, &rv).await.unwrap().boxed();
    let mut n = 0;
    while let Some(event) = stream.next().await {
        if let Ok(kube::api::WatchEvent::Modified(_)) = event {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubesphere_console_dispatcher_controller_and_webhook() {
    use tokio::io::AsyncWriteExt;
    let env = env();
    let client = env.host.client().await.unwrap();
    let label = ("tower-test/standin", "edoras");
    let ks_host = kubesphere::KubeSphereHost::start(
        &env.host,
        JWT_SECRET,
        kubesphere::ControllerOptions {
            label_selector: Some(format!("{}={}", label.0, label.1)),
            ..Default::default()
        },
        kubesphere::WebhookOptions {
            object_selector: Some((label.0.into(), label.1.into())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let member_ks = kubesphere::MemberKs::start(kubesphere::MemberKsConfig::for_member(
        &env.member,
        JWT_SECRET,
    ))
    .await
    .unwrap();

    // The console adds the member (agent connection).
    let mut obj = kubesphere::ConsoleCluster::new("edoras", "admin").object();
    obj["metadata"]["labels"] = serde_json::json!({ label.0: label.1 });
    let obj: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
    kubesphere::clusters_api(client.clone())
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
    // Its Agent object (as `towerctl join` makes one), where tower reports the
    // connection whether or not the Cluster may be written.
    Api::<tower_server::crd::Agent>::all(client.clone())
        .create(
            &PostParams::default(),
            &tower_server::crd::Agent::new("edoras", Default::default()),
        )
        .await
        .unwrap();
    let c = wait_condition(
        &client,
        "edoras",
        "Initialized",
        "True",
        Duration::from_secs(20),
    )
    .await;
    let token = c
        .spec
        .connection
        .as_ref()
        .and_then(|c| c.token.clone())
        .unwrap();

    // The member's agent, serving kube-apiserver and the member's ks-apiserver (plain HTTP).
    let ks_upstream = tower_agent::UpstreamConfig {
        name: UPSTREAM_KS_APISERVER.into(),
        url: member_ks.url(),
        ca_file: None,
        token_file: None,
    };
    let agent = start_agent_with(env, "edoras", &token, ks_upstream.clone()).await;
    wait_condition(
        &client,
        "edoras",
        "AgentAvailable",
        "True",
        Duration::from_secs(20),
    )
    .await;
    // KubeSphere's controller reaches the member through tower's kube listener.
    let c = eventually(Duration::from_secs(30), || async {
        let _ = ks_host.controller.reconcile_now("edoras").await;
        let c = cluster(&client, "edoras").await?;
        (c.condition("Ready")?.status == "True" && c.status.as_ref()?.uid.is_some()).then_some(c)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "KubeSphere never saw the member Ready: {:?}",
            ks_host.controller.writes()
        )
    });
    for t in ["Initialized", "AgentAvailable", "Ready"] {
        assert_eq!(
            c.condition(t).unwrap().status,
            "True",
            "{t}: {:?}",
            c.status
        );
    }

    // The console through the dispatcher: the user's JWT reaches the member's
    // ks-apiserver, which verifies it, for /kapis, /api and /apis alike.
    let jwt = kubesphere::mint_jwt(JWT_SECRET, "alice", Duration::from_secs(600));
    let auth = format!("Bearer {jwt}");
    let dispatcher = ks_host.dispatcher.addr();
    let whoami = kubesphere::WHOAMI_PATH.trim_start_matches("/kapis");
    for (path, member_path) in [
        (
            format!("/kapis/clusters/edoras{whoami}"),
            kubesphere::WHOAMI_PATH.to_string(),
        ),
        (
            "/api/clusters/edoras/v1/namespaces/default".to_string(),
            "/api/v1/namespaces/default".to_string(),
        ),
        (
            "/apis/clusters/edoras/apps/v1/namespaces/default/deployments".to_string(),
            "/apis/apps/v1/namespaces/default/deployments".to_string(),
        ),
    ] {
        let (code, body) = request(dispatcher, None, &path, &[("authorization", &auth)]).await;
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
        let seen = ks_request(&member_ks, &member_path).await;
        assert_eq!(seen.user.as_deref(), Some("alice"), "{path}: {seen:?}");
        assert!(seen.authorization);
        assert_eq!(
            seen.host.as_deref(),
            Some("console.example"),
            "the caller's Host is kept, as the Go tower's TCP forwarding kept it"
        );
    }
    // A console terminal: a WebSocket upgrade through the dispatcher.
    let mut tcp = tokio::net::TcpStream::connect(dispatcher).await.unwrap();
    let terminal = format!(
        "/kapis/clusters/edoras{}default/pods/web-0/exec",
        kubesphere::TERMINAL_PATH_PREFIX.trim_start_matches("/kapis")
    );
    tcp.write_all(format!(
        "GET {terminal} HTTP/1.1\r\nHost: console.example\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).as_bytes()).await.unwrap();
    let head = read_until(&mut tcp, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"echo through the console").await.unwrap();
    assert!(
        read_until(&mut tcp, "echo through the console")
            .await
            .contains("echo through the console")
    );
    // A JWT the member does not accept is the member's 401, passed through.
    let ks_port = c
        .spec
        .connection
        .as_ref()
        .unwrap()
        .kubesphere_api_server_port
        .unwrap();
    let ks_addr: SocketAddr = format!("127.0.0.1:{ks_port}").parse().unwrap();
    let forged = kubesphere::mint_jwt(
        b"some-other-secret-entirely-000000",
        "mallory",
        Duration::from_secs(600),
    );
    let (code, _) = request(
        ks_addr,
        None,
        kubesphere::WHOAMI_PATH,
        &[("authorization", &format!("Bearer {forged}"))],
    )
    .await;
    assert_eq!(code, 401);
    let seen = ks_request(&member_ks, kubesphere::WHOAMI_PATH).await;
    assert_eq!(
        (seen.user, seen.status),
        (None, 401),
        "the member refused it itself"
    );

    // A quiet minute: tower writes nothing; KubeSphere's own writes are counted apart.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent_rv = Api::<tower_server::crd::Agent>::all(client.clone())
        .get("edoras")
        .await
        .unwrap()
        .resource_version();
    let ks_before = ks_host.controller.writes().total();
    let modified = cluster_modifications(&client, "edoras", Duration::from_secs(60)).await;
    let ks_writes = ks_host.controller.writes().total() - ks_before;
    eprintln!(
        "kubesphere: quiet minute: {modified} Cluster modifications, {ks_writes} by KubeSphere's controller"
    );
    assert_eq!(
        modified as u64, ks_writes,
        "tower wrote the Cluster during a quiet minute"
    );
    let agent_rv_after = Api::<tower_server::crd::Agent>::all(client.clone())
        .get("edoras")
        .await
        .unwrap()
        .resource_version();
    assert_eq!(
        agent_rv_after, agent_rv,
        "tower wrote the Agent during a quiet minute"
    );
    let c = cluster(&client, "edoras").await.unwrap();
    for t in ["Initialized", "AgentAvailable", "Ready"] {
        assert_eq!(
            c.condition(t).map(|c| c.status.as_str()),
            Some("True"),
            "{t} survived: {:?}",
            c.status
        );
    }

    // The agent drops. KubeSphere's webhook refuses every Cluster update while
    // the member is unreachable, so the drop shows on the Agent and in an Event.
    agent.kill();
    let gone = Instant::now();
    let agents = Api::<tower_server::crd::Agent>::all(client.clone());
    let disconnected = eventually(Duration::from_secs(15), || async {
        let a = agents.get_opt("edoras").await.ok()??;
        let c = a
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Connected")?;
        (c.status == "False").then_some(())
    })
    .await;
    assert!(
        disconnected.is_some(),
        "the Agent's status never said Connected False"
    );
    let event = eventually(Duration::from_secs(15), || async {
        let out = env
            .host
            .run_kubectl(
                &[
                    "get",
                    "events.events.k8s.io",
                    "-A",
                    "--field-selector",
                    "regarding.name=edoras",
                    "-o",
                    "json",
                ],
                None,
            )
            .await
            .ok()?;
        out.contains("AgentDisconnected").then_some(())
    })
    .await;
    assert!(event.is_some(), "no AgentDisconnected Event for edoras");
    eprintln!(
        "kubesphere: agent killed -> Agent status and Event in {:.2?}",
        gone.elapsed()
    );
    let refused = eventually(Duration::from_secs(20), || async {
        (ks_host.webhook.refusals() > 0).then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "the webhook never refused a write while the member was away"
    );
    // ... and tower counts the refusals in its metrics.
    let refusals = eventually(Duration::from_secs(10), || async {
        fixture::http::metric(
            env.server.ops_addr,
            "tower_server_cluster_write_refusals_total",
        )
        .await
        .unwrap()
        .filter(|n| *n > 0.0)
    })
    .await;
    assert!(refusals.is_some(), "no refused Cluster write in /metrics");

    // The member comes back: the condition is right again.
    let _agent = start_agent_with(env, "edoras", &token, ks_upstream).await;
    wait_condition(
        &client,
        "edoras",
        "AgentAvailable",
        "True",
        Duration::from_secs(30),
    )
    .await;
    let _ = ks_host.controller.reconcile_now("edoras").await;
    let c = cluster(&client, "edoras").await.unwrap();
    assert_eq!(c.condition("Ready").unwrap().status, "True");

    // Deleting the Cluster: KubeSphere removes its finalizer with an UPDATE
    // its webhook admits only if the member is reachable through tower, so
    // tower serves the Cluster until the object is gone, then lets go.
    let ports = c.spec.connection.as_ref().unwrap();
    let kube_addr: SocketAddr = format!("127.0.0.1:{}", ports.kubernetes_api_server_port.unwrap())
        .parse()
        .unwrap();
    assert!(
        c.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == kubesphere::CLUSTER_FINALIZER),
        "KubeSphere's finalizer is on the Cluster"
    );
    Api::<Cluster>::all(client.clone())
        .delete("edoras", &Default::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    let gone = eventually(Duration::from_secs(30), || async {
        cluster(&client, "edoras").await.is_none().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the Cluster never went away: {:?}",
        cluster(&client, "edoras").await.map(|c| c.metadata)
    );
    let closed = eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(kube_addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "the deleted Cluster's kube listener still accepts"
    );
    eprintln!(
        "kubesphere: Cluster deleted through KubeSphere's finalizer in {:.2?}",
        deleted.elapsed()
    );
    ks_host.stop().await.unwrap();
}
