//! Tests of the KubeSphere 3.4 stand-in itself (`tower_tests::testbed::kubesphere`), against a
//! host and a member cluster of the test bed: the member ks-apiserver's JWT check, the
//! dispatcher's forwarding (Host, Authorization, cluster segment, WebSocket) and its trust
//! roots, the Cluster webhook's refusal, the cluster controller's writes, the kube-proxy
//! stand-ins (pods behind selectors, a proxy for kubectl), the Go tower and the kubelet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DynamicObject, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower_tests::fixture::{self, HttpsUpstream, eventually};
use tower_tests::testbed::kubesphere::{
    self, ClusterController, ClusterWebhook, ConsoleCluster, ControllerOptions, Dispatcher,
    GoTower, KUBESPHERE_NAMESPACE, MemberKs, MemberKsConfig, ServiceDialer, ServiceProxy,
    SyncOutcome, TERMINAL_PATH_PREFIX, WHOAMI_PATH, WebhookOptions, clusters_api, kubeconfig_via,
    mint_jwt,
};
use tower_tests::testbed::{ControlPlane, Kubelet, Testbed};

const SECRET: &[u8] = b"kubesphere-jwt-secret-for-tests";
/// The controller under test sees only its own Cluster (the host is shared by the tests).
const CONTROLLER_TEST_GROUP: &str = "cluster.kubesphere.io/group=controller-test";

tower_tests::shared_env!(Env, "kubesphere-standin", start_env);

struct Env {
    _bed: Testbed,
    host: ControlPlane,
    member: ControlPlane,
    member_uid: String,
}

async fn start_env() -> anyhow::Result<Env> {
    let bed = fixture::start_logged_bed("kubesphere-standin.log").await?;
    let mut clusters = bed.clusters(&["host", "member"]).await?;
    let member = clusters.pop().expect("member");
    let host = clusters.pop().expect("host");
    kubesphere::install_cluster_crd(&host).await?;
    let member_uid = Api::<Namespace>::all(member.client().await?)
        .get("kube-system")
        .await?
        .metadata
        .uid
        .expect("kube-system has a uid");
    Ok(Env {
        _bed: bed,
        host,
        member,
        member_uid,
    })
}

// === helpers ===

/// One HTTP/1.1 request over a fresh connection: status, and body as JSON (or a string).
async fn request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        sender.send_request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {path} hung"))
    .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
    (status, value)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The member's kubeconfig with its admin token, base64 as in `spec.connection.kubeconfig`.
fn member_kubeconfig(env: &Env) -> String {
    tower_certs::base64(
        env.member
            .token_kubeconfig(env.member.admin_token())
            .unwrap()
            .as_bytes(),
    )
}

/// Creates Service `mc-<name>` in kubesphere-system with `ports` (port, targetPort); returns
/// its ClusterIP.
async fn create_service(client: &kube::Client, name: &str, ports: &[(u16, u16)]) -> String {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .enumerate()
        .map(|(i, (port, target))| {
            serde_json::json!({ "name": format!("p{i}"), "port": port, "targetPort": target })
        })
        .collect();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": format!("mc-{name}"), "namespace": KUBESPHERE_NAMESPACE },
        "spec": { "selector": { "app": "tower" }, "ports": ports },
    }))
    .unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), KUBESPHERE_NAMESPACE)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    svc.spec.unwrap().cluster_ip.unwrap()
}

/// Creates a Cluster from JSON (status included: the CRD has no status subresource).
async fn create_cluster(client: &kube::Client, obj: serde_json::Value) -> DynamicObject {
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    clusters_api(client.clone())
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

fn ready_condition() -> serde_json::Value {
    serde_json::json!([{ "type": "Ready", "status": "True", "reason": "Ready" }])
}

async fn get_cluster(client: &kube::Client, name: &str) -> serde_json::Value {
    serde_json::to_value(clusters_api(client.clone()).get(name).await.unwrap()).unwrap()
}

async fn replace_cluster(
    client: &kube::Client,
    obj: &serde_json::Value,
) -> kube::Result<DynamicObject> {
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    let obj: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    clusters_api(client.clone())
        .replace(&name, &PostParams::default(), &obj)
        .await
}

// === member ks-apiserver ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_ks_verifies_and_refuses_jwts() {
    let env = env();
    let ks = MemberKs::start(MemberKsConfig::for_member(&env.member, SECRET))
        .await
        .unwrap();
    let alice = mint_jwt(SECRET, "alice", Duration::from_secs(600));

    let (s, body) = request(
        ks.addr(),
        WHOAMI_PATH,
        &[("authorization", &bearer(&alice))],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["username"], "alice");
    assert_eq!(body["tokenType"], "access_token");

    let forged = mint_jwt(b"another secret", "alice", Duration::from_secs(600));
    let (s, body) = request(
        ks.addr(),
        WHOAMI_PATH,
        &[("authorization", &bearer(&forged))],
    )
    .await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Unauthorized");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Unauthorized: token signature is invalid"),
        "{body}"
    );

    let expired = mint_jwt(SECRET, "alice", Duration::ZERO);
    let (s, body) = request(
        ks.addr(),
        WHOAMI_PATH,
        &[("authorization", &bearer(&expired))],
    )
    .await;
    assert_eq!(s, 401, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    let (s, body) = request(ks.addr(), WHOAMI_PATH, &[("authorization", "Basic YTpi")]).await;
    assert_eq!(s, 401, "{body}");

    // No Authorization: anonymous, refused by authorization.
    let (s, body) = request(ks.addr(), "/api/v1/namespaces/kube-system", &[]).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["reason"], "Forbidden");

    // Kube paths go to the member apiserver with the stand-in's own credential.
    let (s, body) = request(
        ks.addr(),
        "/api/v1/namespaces/kube-system",
        &[("authorization", &bearer(&alice))],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["metadata"]["uid"], env.member_uid.as_str());

    let log = ks.requests();
    assert_eq!(log.len(), 6, "{log:#?}");
    assert_eq!(log[0].user.as_deref(), Some("alice"));
    assert!(log[0].authorization);
    assert!(log[1].authorization && log[1].user.is_none() && log[1].status == 401);
    assert!(!log[4].authorization && log[4].user.is_none() && log[4].status == 403);
    assert_eq!(log[5].user.as_deref(), Some("alice"));
    assert_eq!(log[5].status, 200);
}

// === dispatcher ===

#[test]
fn dispatcher_parses_the_cluster_as_ks_apiserver_does() {
    use kubesphere::cluster_of_path;
    assert_eq!(
        cluster_of_path("/kapis/clusters/c1/x/v1/y").as_deref(),
        Some("c1")
    );
    assert_eq!(
        cluster_of_path("/api/clusters/c1/v1/pods").as_deref(),
        Some("c1")
    );
    assert_eq!(
        cluster_of_path("/apis/clusters/c1/apps/v1/deployments").as_deref(),
        Some("c1")
    );
    assert_eq!(cluster_of_path("/kapi/clusters/c1").as_deref(), Some("c1"));
    // The bare form is not a cluster request for ks-apiserver.
    assert_eq!(cluster_of_path("/clusters/c1/api/v1/pods"), None);
    assert_eq!(cluster_of_path("/api/clusters"), None);
    assert_eq!(cluster_of_path("/api/v1/clusters/c1"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_forwards_keeping_host_and_authorization_and_splices_websocket() {
    let env = env();
    let host = env.host.client().await.unwrap();
    let dialer = ServiceDialer::new(host.clone());
    let ks = MemberKs::start(MemberKsConfig::for_member(&env.member, SECRET))
        .await
        .unwrap();
    // The Service tower would create, with the ks port leading straight to the member's
    // ks-apiserver stand-in.
    let ip = create_service(&host, "disp", &[(6443, 1), (80, ks.addr().port())]).await;
    create_cluster(
        &host,
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": { "name": "disp" },
            "spec": { "joinFederation": true, "connection": {
                "type": "proxy",
                "kubernetesAPIEndpoint": format!("https://{ip}:6443"),
                "kubesphereAPIEndpoint": format!("http://{ip}:80"),
                "kubeconfig": member_kubeconfig(env),
            }},
            "status": { "conditions": ready_condition() },
        }),
    )
    .await;
    create_cluster(
        &host,
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": { "name": "disp-unready" },
            "spec": { "connection": { "type": "proxy", "kubesphereAPIEndpoint": format!("http://{ip}:80") } },
        }),
    )
    .await;
    create_cluster(
        &host,
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": { "name": "disp-direct" },
            "spec": { "connection": { "type": "direct", "kubeconfig": member_kubeconfig(env) } },
            "status": { "conditions": ready_condition() },
        }),
    )
    .await;
    let dispatcher = Dispatcher::start(host.clone(), dialer, Some(SECRET.to_vec()))
        .await
        .unwrap();
    let bob = mint_jwt(SECRET, "bob", Duration::from_secs(600));
    let auth = bearer(&bob);

    let whoami = WHOAMI_PATH.replacen("/kapis/", "/kapis/clusters/disp/", 1);
    let (s, body) = request(
        dispatcher.addr(),
        &format!("{whoami}?x=1"),
        &[("host", "console.example:30880"), ("authorization", &auth)],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["username"], "bob");
    assert_eq!(body["host"], "console.example:30880");
    assert_eq!(body["path"], format!("{WHOAMI_PATH}?x=1"));

    let (s, body) = request(
        dispatcher.addr(),
        "/api/clusters/disp/v1/namespaces/kube-system",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["metadata"]["uid"], env.member_uid.as_str());

    // A WebSocket terminal, spliced both ways.
    let mut tcp = tokio::net::TcpStream::connect(dispatcher.addr())
        .await
        .unwrap();
    let terminal = TERMINAL_PATH_PREFIX.replacen("/kapis/", "/kapis/clusters/disp/", 1);
    let head = format!(
        "GET {terminal}default/pods/p/exec HTTP/1.1\r\n\
         Host: console.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("101 in time")
            .unwrap();
        assert!(n > 0, "closed before the response head");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 101"), "{text}");
    assert!(
        text.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );
    tcp.write_all(b"hello, terminal").await.unwrap();
    let mut echo = vec![0u8; 15];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echo, b"hello, terminal");

    // What the source answers for unknown and unready clusters, and for the bare form.
    let (s, body) = request(
        dispatcher.addr(),
        "/kapis/clusters/nope/x/v1/y",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["ErrStatus"]["message"], "cluster nope not exists");
    let (s, body) = request(
        dispatcher.addr(),
        "/kapis/clusters/disp-unready/x/v1/y",
        &[],
    )
    .await;
    assert_eq!(s, 500, "{body}");
    assert!(
        body.as_str()
            .unwrap()
            .contains("cluster disp-unready is not ready"),
        "{body}"
    );
    let (s, _) = request(
        dispatcher.addr(),
        "/clusters/disp/api/v1/namespaces",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(s, 404);
    // A direct cluster without a ks endpoint: through the member kube-apiserver's service
    // proxy, where this member has no ks-apiserver Service.
    let (s, body) = request(
        dispatcher.addr(),
        "/kapis/clusters/disp-direct/version",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(s, 404, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("ks-apiserver"),
        "{body}"
    );
    // A token the host cannot verify stops at the host.
    let forged = bearer(&mint_jwt(b"other", "bob", Duration::from_secs(600)));
    let before = ks.requests().len();
    let (s, _) = request(dispatcher.addr(), &whoami, &[("authorization", &forged)]).await;
    assert_eq!(s, 401);
    assert_eq!(ks.requests().len(), before);

    let log = ks.requests();
    assert_eq!(log[0].host.as_deref(), Some("console.example:30880"));
    assert!(
        log.iter()
            .all(|r| r.authorization && r.user.as_deref() == Some("bob")),
        "{log:#?}"
    );
    assert!(log[2].upgrade && log[2].status == 101, "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_refuses_an_https_endpoint_of_a_private_ca() {
    let env = env();
    let host = env.host.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let upstream = HttpsUpstream::start(dir.path(), "private-ks", None, move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { hyper::Response::new(http_body_util::Full::new(Bytes::new()).boxed()) }
    })
    .await
    .unwrap();
    let ip = create_service(&host, "private", &[(443, upstream.addr.port())]).await;
    create_cluster(
        &host,
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": { "name": "private" },
            "spec": { "connection": {
                "type": "proxy",
                "kubesphereAPIEndpoint": format!("https://{ip}:443"),
                "kubeconfig": member_kubeconfig(env),
            }},
            "status": { "conditions": ready_condition() },
        }),
    )
    .await;
    let dispatcher = Dispatcher::start(host.clone(), ServiceDialer::new(host), None)
        .await
        .unwrap();
    let (s, body) = request(dispatcher.addr(), "/kapis/clusters/private/x/v1/y", &[]).await;
    assert_eq!(s, 500, "{body}");
    assert!(
        body.as_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("certificate"),
        "{body}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

// === webhook ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_refuses_an_update_whose_kubeconfig_misses_the_member() {
    let env = env();
    let host = env.host.client().await.unwrap();
    let webhook = ClusterWebhook::start(
        host.clone(),
        ServiceDialer::new(host.clone()),
        WebhookOptions {
            configuration_name: "cluster.kubesphere.io-standin-test".into(),
            object_selector: Some(("standin-test".into(), "webhook".into())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    create_cluster(
        &host,
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": { "name": "hooked", "labels": { "standin-test": "webhook" } },
            "spec": { "connection": { "type": "proxy", "kubeconfig": member_kubeconfig(env) } },
            "status": { "uid": env.member_uid },
        }),
    )
    .await;

    let mut c = get_cluster(&host, "hooked").await;
    c["metadata"]["labels"]["touched"] = "1".into();
    replace_cluster(&host, &c)
        .await
        .expect("same member: allowed");
    assert_eq!((webhook.admissions(), webhook.refusals()), (1, 0));

    let mut c = get_cluster(&host, "hooked").await;
    let unreachable = env
        .member
        .token_kubeconfig("x")
        .unwrap()
        .replace(&env.member.url, "https://127.0.0.1:1");
    c["spec"]["connection"]["kubeconfig"] = tower_certs::base64(unreachable.as_bytes()).into();
    let err = replace_cluster(&host, &c)
        .await
        .expect_err("unreachable: refused");
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code, 403, "{status:?}");
    assert!(status.message.contains("denied the request"), "{status:?}");

    let other = env.host.token_kubeconfig(env.host.admin_token()).unwrap();
    c["spec"]["connection"]["kubeconfig"] = tower_certs::base64(other.as_bytes()).into();
    let err = replace_cluster(&host, &c)
        .await
        .expect_err("another cluster: refused");
    assert!(
        err.to_string()
            .contains(kubesphere::webhook::DIFFERENT_CLUSTER),
        "{err}"
    );
    assert_eq!((webhook.admissions(), webhook.refusals()), (3, 2));

    webhook.unregister().await.unwrap();
    c["spec"]["connection"]["kubeconfig"] = tower_certs::base64(unreachable.as_bytes()).into();
    replace_cluster(&host, &c)
        .await
        .expect("no webhook: allowed");
    assert_eq!(webhook.admissions(), 3);
}

// === controller ===

/// The controller's write counts once they stop moving for 700 ms.
async fn settled(controller: &ClusterController) -> kubesphere::WriteCounts {
    let mut last = controller.writes();
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = controller.writes();
        if now == last {
            return last;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_writes_status_through_the_main_resource() {
    let env = env();
    let host = env.host.client().await.unwrap();
    let dialer = ServiceDialer::new(host.clone());
    let controller = ClusterController::start(
        host.clone(),
        dialer.clone(),
        ControllerOptions {
            resync: Duration::from_secs(3600),
            label_selector: Some(CONTROLLER_TEST_GROUP.into()),
            ..Default::default()
        },
    );
    // Added as the console adds an agent member: no kubeconfig yet, so only the finalizer.
    let console = ConsoleCluster {
        group: Some("controller-test".into()),
        ..ConsoleCluster::new("ctl", "admin")
    };
    console.create(&host).await.unwrap();
    let has_finalizer = eventually(Duration::from_secs(10), || async {
        let c = get_cluster(&host, "ctl").await;
        c["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == kubesphere::CLUSTER_FINALIZER))
            .then_some(())
    })
    .await;
    assert!(has_finalizer.is_some(), "no finalizer");
    assert!(get_cluster(&host, "ctl").await["status"]["uid"].is_null());

    // Tower's part, here by hand: the kubeconfig and a condition of its own.
    let mut c = get_cluster(&host, "ctl").await;
    c["spec"]["connection"]["kubeconfig"] = member_kubeconfig(env).into();
    c["status"] =
        serde_json::json!({ "conditions": [{ "type": "AgentAvailable", "status": "True" }] });
    replace_cluster(&host, &c).await.unwrap();

    let synced = eventually(Duration::from_secs(15), || async {
        let c = get_cluster(&host, "ctl").await;
        (c["status"]["uid"] == env.member_uid.as_str() && kubesphere::is_cluster_ready(&c))
            .then_some(c)
    })
    .await
    .expect("the controller wrote uid and Ready");
    assert_eq!(
        synced["spec"]["connection"]["kubernetesAPIEndpoint"],
        env.member.url.as_str(),
        "the endpoint, empty, became the kubeconfig's server"
    );
    assert!(
        synced["status"]["kubernetesVersion"]
            .as_str()
            .unwrap()
            .starts_with("v1.")
    );
    let types: Vec<&str> = synced["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["AgentAvailable", "Federated", "Ready"],
        "merged, not replaced"
    );
    let managers: Vec<&str> = synced["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert!(managers.contains(&"controller-manager"), "{managers:?}");

    // Settle: its own endpoint write is a spec change, which the real one syncs again too.
    let last = settled(&controller).await;
    assert_eq!(last.finalizer, 1, "{last:?}");
    assert_eq!(last.status, 1, "{last:?}");

    // Nothing changed, yet the faithful controller writes again: timestamps only.
    // Timestamps have whole seconds, so within the second of the last write
    // the new ones are equal and the apiserver makes the update a no-op: wait
    // for the next second, as the real controller's periodic resync would.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rv = get_cluster(&host, "ctl").await["metadata"]["resourceVersion"].clone();
    let outcome = controller.reconcile_now("ctl").await.unwrap();
    assert_eq!(outcome, SyncOutcome::Written { substantive: false });
    let after = controller.writes();
    assert_eq!(after.status, last.status);
    assert_eq!(after.timestamps_only, last.timestamps_only + 1);
    let rv2 = get_cluster(&host, "ctl").await["metadata"]["resourceVersion"].clone();
    assert_ne!(rv, rv2);
    controller.stop();

    // The quiet variant does not.
    let quiet = ClusterController::start(
        host.clone(),
        dialer,
        ControllerOptions {
            resync: Duration::from_secs(3600),
            skip_timestamp_only_writes: true,
            label_selector: Some(CONTROLLER_TEST_GROUP.into()),
            ..Default::default()
        },
    );
    assert_eq!(
        quiet.reconcile_now("ctl").await.unwrap(),
        SyncOutcome::Unchanged
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(quiet.writes().total(), 0);
    assert_eq!(
        get_cluster(&host, "ctl").await["metadata"]["resourceVersion"],
        rv2
    );
    quiet.stop();

    // With the controller gone, only a helper removes the finalizer so the Cluster can go.
    clusters_api(host.clone())
        .delete("ctl", &Default::default())
        .await
        .unwrap();
    kubesphere::remove_finalizer(&host, "ctl").await.unwrap();
    let gone = eventually(Duration::from_secs(10), || async {
        clusters_api(host.clone())
            .get_opt("ctl")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the Cluster stayed");
}

// === kube-proxy stand-in ===

/// Serves HTTPS on `listener` with a certificate for `ip` only, answering `/version`.
fn serve_version(listener: tokio::net::TcpListener, ca: &tower_certs::Ca, ip: &str) {
    let serving = ca.issue_server(&[ip], Duration::from_secs(3600)).unwrap();
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            tower_certs::parse_certs(&serving.cert_pem).unwrap(),
            tower_certs::parse_key(&serving.key_pem).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    let body =
                        serde_json::json!({ "major": "9", "minor": "9", "gitVersion": "v9.9.9" });
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_dialer_keeps_the_cluster_ip_as_tls_identity() {
    tower_tests::testbed::install_crypto_provider();
    let env = env();
    let host = env.host.client().await.unwrap();
    let dialer = ServiceDialer::new(host.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ip = create_service(&host, "dial", &[(6443, port)]).await;
    let ca = tower_certs::Ca::generate("dial-ca").unwrap();
    // The certificate names the ClusterIP only: verification passes only if the ClusterIP
    // stays the TLS server name while the connection goes to 127.0.0.1.
    serve_version(listener, &ca, &ip);

    assert_eq!(
        dialer.resolve(&ip, 6443).await.unwrap(),
        SocketAddr::from(([127, 0, 0, 1], port))
    );
    assert!(
        dialer.resolve(&ip, 80).await.is_err(),
        "no such Service port"
    );
    assert_eq!(
        dialer
            .resolve(&format!("mc-dial.{KUBESPHERE_NAMESPACE}.svc"), 6443)
            .await
            .unwrap()
            .port(),
        port
    );

    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{ "name": "c", "cluster": {
            "server": format!("https://{ip}:6443"),
            "certificate-authority-data": tower_certs::base64(ca.cert_pem().as_bytes()),
        }}],
        "users": [{ "name": "u", "user": { "token": "t" } }],
        "contexts": [{ "name": "c", "context": { "cluster": "c", "user": "u" } }],
        "current-context": "c",
    })
    .to_string();
    let (client, server) = dialer.client(kubeconfig.as_bytes()).await.unwrap();
    assert_eq!(server, format!("https://{ip}:6443"));
    assert_eq!(
        client.apiserver_version().await.unwrap().git_version,
        "v9.9.9"
    );

    let rewritten = dialer
        .rewrite_kubeconfig(kubeconfig.as_bytes())
        .await
        .unwrap();
    assert!(
        rewritten.contains(&format!("https://127.0.0.1:{port}")),
        "{rewritten}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kubeconfig");
    std::fs::write(&file, &rewritten).unwrap();
    let out = fixture::kubectl(&file, &["get", "--raw", "/version"], None)
        .await
        .unwrap();
    assert!(out.contains("v9.9.9"), "{out}");
}

// === controller and webhook together ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_refuses_the_controllers_not_ready_while_the_member_is_unreachable() {
    let env = env();
    let host = env.host.client().await.unwrap();
    let dialer = ServiceDialer::new(host.clone());
    let webhook = ClusterWebhook::start(
        host.clone(),
        dialer.clone(),
        WebhookOptions {
            configuration_name: "cluster.kubesphere.io-standin-interplay".into(),
            object_selector: Some(("standin-test".into(), "interplay".into())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let controller = ClusterController::start(
        host.clone(),
        dialer,
        ControllerOptions {
            resync: Duration::from_secs(3600),
            label_selector: Some("standin-test=interplay".into()),
            ..Default::default()
        },
    );
    // The member behind a Service, as tower's kube listener would be.
    let ip = create_service(&host, "gone", &[(6443, env.member.port())]).await;
    let kubeconfig = env
        .member
        .token_kubeconfig(env.member.admin_token())
        .unwrap()
        .replace(&env.member.url, &format!("https://{ip}:6443"));
    let mut kubeconfig: serde_json::Value = yaml_serde::from_str(&kubeconfig).unwrap();
    // The member's serving certificate names 127.0.0.1, not the ClusterIP.
    kubeconfig["clusters"][0]["cluster"]["tls-server-name"] = "127.0.0.1".into();
    create_cluster(
        &host,
        serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": { "name": "gone", "labels": { "standin-test": "interplay" } },
            "spec": { "joinFederation": true, "connection": {
                "type": "proxy",
                "kubeconfig": tower_certs::base64(kubeconfig.to_string().as_bytes()),
            }},
        }),
    )
    .await;
    eventually(Duration::from_secs(15), || async {
        let c = get_cluster(&host, "gone").await;
        (c["status"]["uid"] == env.member_uid.as_str() && kubesphere::is_cluster_ready(&c))
            .then_some(())
    })
    .await
    .expect("Ready with the member's uid");

    settled(&controller).await;
    // The member drops off: the Service now leads nowhere.
    let services = Api::<Service>::namespaced(host.clone(), KUBESPHERE_NAMESPACE);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    services
        .patch(
            "mc-gone",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({
                "spec": { "ports": [{ "name": "p0", "port": 6443, "targetPort": dead_port }] }
            })),
        )
        .await
        .unwrap();
    let before = controller.writes();
    let refusals = webhook.refusals();
    let err = controller
        .reconcile_now("gone")
        .await
        .expect_err("the join fails and so does its status Update");
    // The sync returns the refused Update's error (cluster_controller.go ~439-445).
    assert!(format!("{err:#}").contains("denied the request"), "{err:#}");
    let after = controller.writes();
    assert_eq!(after.refused, before.refused + 1, "{after:?}");
    assert_eq!(after.total(), before.total(), "{after:?}");
    assert!(webhook.refusals() > refusals);
    // So the Cluster still says Ready (kubesphere/kubesphere#5125).
    assert!(kubesphere::is_cluster_ready(
        &get_cluster(&host, "gone").await
    ));
    controller.stop();
    webhook.unregister().await.unwrap();
}

// === all host parts together ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubesphere_host_starts_and_stops_cleanly() {
    let env = env();
    let ks = kubesphere::KubeSphereHost::start(
        &env.host,
        SECRET,
        ControllerOptions {
            label_selector: Some("standin-test=bundle".into()),
            ..Default::default()
        },
        WebhookOptions {
            configuration_name: "cluster.kubesphere.io-standin-bundle".into(),
            object_selector: Some(("standin-test".into(), "bundle".into())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (s, body) = request(
        ks.dispatcher.addr(),
        "/kapis/clusters/none-such/x/v1/y",
        &[],
    )
    .await;
    assert_eq!(s, 400, "{body}");
    ks.stop().await.unwrap();
    let configs =
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(
            env.host.client().await.unwrap(),
        );
    assert!(
        configs
            .get_opt("cluster.kubesphere.io-standin-bundle")
            .await
            .unwrap()
            .is_none()
    );
}

// === pods behind selectors, the Go tower, the kubelet ===

/// The tests that run a [`Kubelet`] on the member take turns: a kubelet runs every
/// Deployment of the member's `kubesphere-system`, whoever created it.
static KUBELET_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_dialer_leads_a_selector_to_its_pod() {
    let env = env();
    let host = env.host.client().await.unwrap();
    let dialer = ServiceDialer::new(host.clone());
    let ip = create_service(&host, "pods", &[(6443, 6101)]).await;
    // No pod registered: the test bed's loopback, as before.
    assert_eq!(
        dialer.resolve(&ip, 6443).await.unwrap(),
        SocketAddr::from(([127, 0, 0, 1], 6101))
    );
    // A clone shares the registry.
    dialer.clone().add_pod(
        &[("app", "tower"), ("tier", "go")],
        "127.0.0.2".parse().unwrap(),
    );
    dialer.add_pod(&[("app", "other")], "127.0.0.3".parse().unwrap());
    assert_eq!(
        dialer.resolve(&ip, 6443).await.unwrap(),
        SocketAddr::from(([127, 0, 0, 2], 6101))
    );
    let services = Api::<Service>::namespaced(host.clone(), KUBESPHERE_NAMESPACE);
    let select = |selector: serde_json::Value| {
        let services = services.clone();
        async move {
            services
                .patch(
                    "mc-pods",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(
                        serde_json::json!({ "spec": { "selector": selector } }),
                    ),
                )
                .await
                .unwrap();
        }
    };
    select(serde_json::json!({ "app": "other" })).await;
    assert_eq!(
        dialer.resolve(&ip, 6443).await.unwrap(),
        SocketAddr::from(([127, 0, 0, 3], 6101))
    );
    // Every pair must match.
    select(serde_json::json!({ "app": "tower", "tier": "rust" })).await;
    let err = dialer.resolve(&ip, 6443).await.expect_err("no pod matches");
    assert!(
        err.to_string().contains(&format!(
            "Service {KUBESPHERE_NAMESPACE}/mc-pods has no ready endpoints"
        )),
        "{err:#}"
    );
    dialer.remove_pod("127.0.0.3".parse().unwrap());
    select(serde_json::json!({ "app": "tower", "tier": "go" })).await;
    assert_eq!(
        dialer.resolve(&ip, 6443).await.unwrap(),
        SocketAddr::from(([127, 0, 0, 2], 6101))
    );
}

/// A condition of a Cluster (as JSON), if present.
fn condition<'a>(cluster: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    cluster["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// kubectl `args` with the kubeconfig `yaml` (written to `dir`).
async fn kubectl_with(dir: &std::path::Path, yaml: &str, args: &[&str]) -> anyhow::Result<String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let file = dir.join(format!("kc-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&file, yaml).unwrap();
    fixture::kubectl(&file, args, None).await
}

/// Whether `GET /version` over TLS at `addr`, verifying the server as `ip` with `ca_pem`, and
/// with no credential, answers 200.
async fn answers_version(addr: SocketAddr, ca_pem: &str, ip: &str) -> bool {
    let attempt = async {
        let mut roots = rustls::RootCertStore::empty();
        for cert in tower_certs::parse_certs(ca_pem)? {
            roots.add(cert)?;
        }
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(
                rustls::pki_types::ServerName::try_from(ip.to_string())?,
                tcp,
            )
            .await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/version")
            .header("host", format!("{ip}:6443"))
            .body(Full::new(Bytes::new()))?;
        anyhow::Ok(sender.send_request(req).await?.status().as_u16())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Ok(200))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_tower_serves_a_member_while_its_go_agent_runs() {
    tower_tests::testbed::install_crypto_provider();
    let _turn = KUBELET_TURN.lock().await;
    let env = env();
    let host = env.host.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dialer = ServiceDialer::new(host.clone());
    let go = GoTower::start(
        host.clone(),
        dialer.clone(),
        "127.0.0.2".parse().unwrap(),
        KUBESPHERE_NAMESPACE,
    )
    .await
    .unwrap();
    let name = "go-towered";
    ConsoleCluster::new(name, "admin")
        .create(&host)
        .await
        .unwrap();
    let port = tower_tests::testbed::free_port();
    go.add_member(name, &env.member, port).await.unwrap();

    // The one-time set-up, in one Update by `proxy`.
    let c = get_cluster(&host, name).await;
    let conn = &c["spec"]["connection"];
    assert_eq!(conn["kubernetesAPIServerPort"], port, "{c}");
    assert_eq!(conn["kubesphereAPIServerPort"], port + 10_000, "{c}");
    let token = conn["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64, "{token}");
    let svc = Api::<Service>::namespaced(host.clone(), KUBESPHERE_NAMESPACE)
        .get(&format!("mc-{name}"))
        .await
        .unwrap();
    let labels = svc.metadata.labels.clone().unwrap();
    assert_eq!(labels["app"], format!("mc-{name}"));
    assert_eq!(labels["app.kubernetes.io/name"], format!("mc-{name}"));
    let spec = svc.spec.unwrap();
    let selector = spec.selector.unwrap();
    assert_eq!(
        (
            selector["app"].as_str(),
            selector["app.kubernetes.io/name"].as_str()
        ),
        ("tower", "tower")
    );
    let ports: Vec<(String, i32)> = spec
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.port))
        .collect();
    assert_eq!(
        ports,
        [("kubernetes".into(), 6443), ("kubesphere".into(), 80)]
    );
    let ip = spec.cluster_ip.unwrap();
    assert_eq!(conn["kubernetesAPIEndpoint"], format!("https://{ip}:6443"));
    assert_eq!(conn["kubesphereAPIEndpoint"], format!("http://{ip}:80"));
    assert_eq!(
        condition(&c, "Initialized").unwrap()["status"],
        "True",
        "{c}"
    );
    assert!(
        c["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["manager"] == "proxy"),
        "{c}"
    );
    let writes = go.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].what, "setup");
    assert_eq!(
        writes[0].result.as_deref(),
        Ok(c["metadata"]["resourceVersion"].as_str().unwrap())
    );
    // The kube port leads to the Go tower's pod.
    assert_eq!(
        dialer.resolve(&ip, 6443).await.unwrap(),
        SocketAddr::from(([127, 0, 0, 2], port))
    );

    // KubeSphere's agent Deployment in the member (ks-installer made its service account).
    env.member
        .service_account_token(KUBESPHERE_NAMESPACE, "kubesphere", true)
        .await
        .unwrap();
    let deployments = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(
        env.member.client().await.unwrap(),
        KUBESPHERE_NAMESPACE,
    );
    deployments
        .create(
            &PostParams::default(),
            &kubesphere::go_agent_deployment(name, &token),
        )
        .await
        .unwrap();
    let kubelet = Kubelet::start(&env.member, Some(go.clone()), dir.path())
        .await
        .unwrap();
    let c = eventually(Duration::from_secs(15), || async {
        let c = get_cluster(&host, name).await;
        (condition(&c, "AgentAvailable")?["status"] == "True").then_some(c)
    })
    .await
    .unwrap_or_else(|| panic!("AgentAvailable never True: {:?}", go.writes()));
    let available = condition(&c, "AgentAvailable").unwrap();
    assert_eq!(
        available["message"],
        "Agent has connected to proxy successfully."
    );
    assert_eq!(condition(&c, "Initialized").unwrap()["status"], "True");
    assert!(kubelet.running("cluster-agent"));
    assert!(go.serving(name));
    let kubeconfig = {
        use base64::Engine as _;
        let b64 = c["spec"]["connection"]["kubeconfig"].as_str().unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };
    let parsed: serde_json::Value = yaml_serde::from_str(&kubeconfig).unwrap();
    let entry = &parsed["clusters"][0]["cluster"];
    assert_eq!(entry["server"], format!("https://{ip}:6443"));
    assert_eq!(
        entry["certificate-authority-data"],
        tower_certs::base64(go.ca_pem().as_bytes())
    );

    // Real kubectl through kube-proxy, verifying the Go CA's certificate for the ClusterIP.
    let proxy = ServiceProxy::start(dialer.clone(), &ip, 6443)
        .await
        .unwrap();
    let via = kubeconfig_via(&kubeconfig, proxy.addr()).unwrap();
    assert!(via.contains(&format!("https://{}", proxy.addr())), "{via}");
    let uid = kubectl_with(
        dir.path(),
        &via,
        &["get", "ns", "kube-system", "-o", "jsonpath={.metadata.uid}"],
    )
    .await
    .unwrap();
    assert_eq!(
        uid, env.member_uid,
        "the member, reached through the Go tower"
    );
    assert!(answers_version(proxy.addr(), go.ca_pem(), &ip).await);
    // The Go tower's open proxy: no client certificate and a made-up token, still the
    // member's admin.
    let mut stranger: serde_json::Value = yaml_serde::from_str(&via).unwrap();
    stranger["users"][0]["user"] = serde_json::json!({ "token": "made-up" });
    let ns = kubectl_with(
        dir.path(),
        &yaml_serde::to_string(&stranger).unwrap(),
        &["get", "ns", "-o", "name"],
    )
    .await
    .unwrap();
    assert!(ns.contains("namespace/kube-system"), "{ns}");

    // The Go agent goes: its path stops answering, and AgentAvailable goes False.
    let deleted = std::time::Instant::now();
    deployments
        .delete("cluster-agent", &Default::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        (!answers_version(proxy.addr(), go.ca_pem(), &ip).await).then_some(())
    })
    .await
    .expect("the Go tower's path still answers 5 s after the agent went");
    eprintln!(
        "the path stopped answering {:?} after the delete",
        deleted.elapsed()
    );
    let c = eventually(Duration::from_secs(10), || async {
        let c = get_cluster(&host, name).await;
        (condition(&c, "AgentAvailable")?["status"] == "False").then_some(c)
    })
    .await
    .unwrap_or_else(|| panic!("AgentAvailable never False: {:?}", go.writes()));
    assert_eq!(
        condition(&c, "AgentAvailable").unwrap()["message"],
        "Agent has not connected to proxy."
    );
    assert!(!go.serving(name));
    assert!(!kubelet.running("cluster-agent"));
    let whats: Vec<(&str, bool)> = go
        .writes()
        .iter()
        .map(|w| (w.what, w.result.is_ok()))
        .collect();
    assert_eq!(
        whats,
        [("setup", true), ("connected", true), ("disconnected", true)]
    );
    kubelet.stop();
    go.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_runs_tower_agent_deployments() {
    let _turn = KUBELET_TURN.lock().await;
    let env = env();
    let member = env.member.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The service account exists (whoever applies the Deployment creates it); no grant.
    env.member
        .service_account_token(KUBESPHERE_NAMESPACE, "agent-standin", false)
        .await
        .unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let bad_name = format!("Not_A_Cluster_{nanos}");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "agent-standin", "namespace": KUBESPHERE_NAMESPACE },
        "stringData": { "bad": bad_name, "good": "standin-member" },
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(member.clone(), KUBESPHERE_NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let deployment = |name: &str, key: &str| -> k8s_openapi::api::apps::v1::Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": KUBESPHERE_NAMESPACE },
            "spec": {
                "selector": { "matchLabels": { "app": name } },
                "strategy": { "type": "Recreate" },
                "template": {
                    "metadata": { "labels": { "app": name } },
                    "spec": {
                        "serviceAccountName": "agent-standin",
                        "terminationGracePeriodSeconds": 10,
                        "containers": [{
                            "name": "tower-agent",
                            "image": "kubesphere/tower-agent:x",
                            "args": ["--token=not-a-real-token", "--proxy-server=127.0.0.1:1", "--backoff-max=1"],
                            "env": [
                                { "name": "TOWER_CLUSTER_NAME", "valueFrom": {
                                    "secretKeyRef": { "name": "agent-standin", "key": key } } },
                            ],
                        }],
                    },
                },
            },
        }))
        .unwrap()
    };
    let deployments = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(
        member.clone(),
        KUBESPHERE_NAMESPACE,
    );
    let pp = PostParams::default();
    deployments
        .create(&pp, &deployment("agent-crashing", "bad"))
        .await
        .unwrap();
    deployments
        .create(&pp, &deployment("agent-running", "good"))
        .await
        .unwrap();
    let kubelet = Kubelet::start(&env.member, None, dir.path()).await.unwrap();

    // The real binary, with the Secret's value in its environment: it refuses the name, exits,
    // and is started again.
    eventually(Duration::from_secs(120), || async {
        (kubelet.restarts("agent-crashing") >= 2).then_some(())
    })
    .await
    .expect("the crashing agent is restarted");
    let log = std::fs::read_to_string(kubelet.log_path("agent-crashing", 1)).unwrap();
    assert!(
        log.contains(&format!(
            "--name \"{bad_name}\" is not a valid cluster name"
        )),
        "{log}"
    );
    // The other one runs, trying to reach its server.
    eventually(Duration::from_secs(30), || async {
        kubelet.running("agent-running").then_some(())
    })
    .await
    .expect("the agent runs");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(kubelet.running("agent-running"));
    assert_eq!(kubelet.restarts("agent-running"), 0);

    // A template change is a new pod (Recreate): a new log, restarts from zero.
    deployments
        .patch(
            "agent-crashing",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({
                "spec": { "template": { "metadata": { "annotations": { "rev": "2" } } } }
            })),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        kubelet.log_path("agent-crashing", 2).exists().then_some(())
    })
    .await
    .expect("a second pod");

    // Scaled to 0: SIGTERM, and it is gone; deleted: likewise.
    deployments
        .patch(
            "agent-running",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({ "spec": { "replicas": 0 } })),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        (!kubelet.running("agent-running")).then_some(())
    })
    .await
    .expect("scaled to 0: stopped");
    let log = std::fs::read_to_string(kubelet.log_path("agent-running", 1)).unwrap();
    assert!(!log.contains("container exited"), "{log}");
    for name in ["agent-crashing", "agent-running"] {
        deployments.delete(name, &Default::default()).await.unwrap();
    }
    eventually(Duration::from_secs(10), || async {
        (!kubelet.running("agent-crashing") && kubelet.restarts("agent-crashing") == 0)
            .then_some(())
    })
    .await
    .expect("deleted: stopped");
    kubelet.stop();
}
