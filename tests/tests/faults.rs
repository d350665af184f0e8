//! Faults: the agent killed with -9 in the middle of a large LIST and of a
//! watch, an agent restart, the server killed with -9 and restarted, the member
//! apiserver going down and coming back, and a network blackhole between agent
//! and server. In every case each client sees a clean error or a completed
//! response within a bounded time, never a hang, and service resumes.
//!
//! The tests share one member cluster (with a ~24 MiB namespace for LISTs), on
//! its own runtime thread so that it outlives each test's runtime. Each test
//! starts its own server and agent; the apiserver test starts its own cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_agent::AgentState;
use tower_tests::fixture::http::{
    Ending, assert_answers, assert_status, finish, get_h1 as get, get_h2, read_some, status_of,
    stream_h1, until_ok, watch_namespaces,
};
use tower_tests::fixture::{
    self, ConfigMaps, Member, ServerProcess, TEST_KEEPALIVE, TEST_KEEPALIVE_MAX, TowerServer,
    Tunnel, agent_credential, gateway_h1, gateway_h2, kube_upstream, raw,
};
use tower_tests::testbed::{ControlPlane, Testbed};

struct Env {
    bed: Testbed,
    member: ControlPlane,
    sa_token_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// The namespace holding the large LIST: `BIG_ITEMS` ConfigMaps of `BIG_ITEM` bytes.
const BIG_NS: &str = "faults-biglist";
const BIG_ITEMS: usize = 48;
const BIG_ITEM: usize = 512 * 1024;

/// The window in which a dead peer must be noticed: keepalive interval × (max + 1).
fn keepalive_window() -> Duration {
    TEST_KEEPALIVE * (TEST_KEEPALIVE_MAX as u32 + 1)
}

tower_tests::shared_env!(Env, "faults", start_env);

async fn start_env() -> anyhow::Result<Env> {
    let started = Instant::now();
    let bed = fixture::start_logged_bed("tower-faults.log").await?;
    let member = bed.cluster("member").await?;
    fixture::build_binaries().await?;
    let dir = tempfile::tempdir()?;
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await?;
    // The large LIST: 48 × 512 KiB, far more than every window and socket buffer
    // between apiserver and client.
    let client = member.client().await?;
    fixture::create_namespace(&client, BIG_NS, false).await?;
    let api: Api<ConfigMap> = Api::namespaced(client, BIG_NS);
    ConfigMaps {
        count: BIG_ITEMS,
        name: &|i| format!("big-{i:03}"),
        labels: &[],
        value: &"f".repeat(BIG_ITEM),
        concurrency: 8,
        existing_ok: false,
    }
    .create(&api)
    .await?;
    eprintln!("faults env ready in {:.2?}", started.elapsed());
    Ok(Env {
        bed,
        member,
        sa_token_file,
        _dir: dir,
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

    /// A server in `dir` and an in-process agent for `cluster` serving the member.
    async fn tunnel(&self, dir: &tempfile::TempDir, cluster: &str) -> Tunnel {
        let upstreams = vec![self.on_member().upstream()];
        Tunnel::start(dir.path(), cluster, upstreams).await.unwrap()
    }
}

// === agent kill -9 / SIGTERM ===

/// A server in-process and the real agent binary for `cluster`, connected.
struct ProcessAgent {
    dir: tempfile::TempDir,
    server: TowerServer,
    agent: tower_tests::testbed::Process,
    id: raw::Identity,
    ca: String,
}

impl ProcessAgent {
    async fn start(cluster: &str) -> Self {
        let env = env();
        let dir = tempfile::tempdir().unwrap();
        let server = TowerServer::start(&dir.path().join("server"))
            .await
            .unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, server.mint(cluster, None).unwrap().encode()).unwrap();
        let agent = env
            .on_member()
            .agent_process(&token_file, &dir.path().join("agent.log"))
            .unwrap();
        server
            .expect_connected(cluster, true, Duration::from_secs(20))
            .await
            .unwrap();
        let (_, ca, id) = server.client_for(cluster).unwrap();
        Self {
            dir,
            server,
            agent,
            id,
            ca,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_drains_a_large_list_and_cuts_watches() {
    let cluster = "list-drain";
    let ProcessAgent {
        dir,
        server,
        mut agent,
        id,
        ca,
    } = ProcessAgent::start(cluster).await;
    let gw = server.gateway_addr;
    let path = format!("/clusters/{cluster}/api/v1/namespaces/{BIG_NS}/configmaps");

    // A watch, and a large LIST of which the client has read only 256 KiB.
    let (_watch, wb, seen) = watch_namespaces(gw, &ca, &id, cluster).await;
    let (_list, body, got) = stream_h1(gw, &ca, &id, &path, 256 * 1024, None).await;

    // SIGTERM: the agent drains. The LIST still arrives whole, new requests get
    // 503 Status (never a cut or a 502), the watch ends, and the agent exits.
    let stopped = Instant::now();
    agent.terminate();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_answers(
        gw,
        &ca,
        &id,
        &format!("/clusters/{cluster}/version"),
        503,
        "ServiceUnavailable",
    )
    .await;
    let list = match tokio::time::timeout(Duration::from_secs(30), finish(body, got))
        .await
        .expect("the LIST hung while the agent drained")
    {
        Ending::Complete(list) => list,
        Ending::Error { bytes, error } => panic!(
            "the LIST in flight was cut by a graceful agent stop after {bytes} bytes, \
             {:.2?} after the signal: {error}\nagent log:\n{}",
            stopped.elapsed(),
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        ),
    };
    let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), BIG_ITEMS);
    let listed = stopped.elapsed();
    // Cleanly or with an error, the watch ends: its client re-watches.
    tokio::time::timeout(Duration::from_secs(10), finish(wb, seen))
        .await
        .expect("the watch hung after the agent drained");
    let watch_ended = stopped.elapsed();
    assert!(
        server
            .wait_connected(cluster, false, Duration::from_secs(5))
            .await
    );
    let exited = fixture::eventually(Duration::from_secs(10), || {
        let running = agent.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    assert!(exited.is_some(), "the agent did not exit after draining");
    eprintln!(
        "agent SIGTERM mid LIST: the LIST finished whole {listed:.2?} after the signal, \
         the watch ended at {watch_ended:.2?}, the agent exited at {:.2?}",
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill9_mid_large_list() {
    let cluster = "list-kill";
    let ProcessAgent {
        dir: _dir,
        server,
        mut agent,
        id,
        ca,
    } = ProcessAgent::start(cluster).await;

    // A complete LIST first, to know its size.
    let path = format!("/clusters/{cluster}/api/v1/namespaces/{BIG_NS}/configmaps");
    let mut h1 = gateway_h1(server.gateway_addr, &ca, &id).await.unwrap();
    let resp = h1.send_request(get(&path)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let Ending::Complete(full) = finish(resp.into_body(), Vec::new()).await else {
        panic!("the LIST failed with the agent alive")
    };
    assert!(full.len() > BIG_ITEMS * BIG_ITEM, "{} bytes", full.len());

    // Again, reading only the first 256 KiB; then kill -9 the agent.
    let mut h1 = gateway_h1(server.gateway_addr, &ca, &id).await.unwrap();
    let resp = h1.send_request(get(&path)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let got = read_some(&mut body, 256 * 1024, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    agent.kill9();
    let ending = tokio::time::timeout(Duration::from_secs(30), finish(body, got))
        .await
        .expect("the LIST hung after the agent was killed");
    let ended = killed.elapsed();
    match &ending {
        Ending::Error { bytes, error } => {
            assert!(*bytes < full.len(), "an error after the whole body");
            eprintln!(
                "agent kill -9 mid LIST: the client got an error after {bytes} of {} bytes, \
                 {ended:.2?} after the kill: {error}",
                full.len()
            );
        }
        Ending::Complete(bytes) => {
            // Everything was already past the agent: then it must be whole.
            assert_eq!(bytes.len(), full.len(), "a truncated LIST looked complete");
            let list: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            assert_eq!(list["items"].as_array().unwrap().len(), BIG_ITEMS);
            eprintln!("agent kill -9 mid LIST: the LIST had already left the agent; complete");
        }
    }
    assert!(
        server
            .wait_connected(cluster, false, Duration::from_secs(5))
            .await,
        "the server still lists the killed agent"
    );
    let noticed = killed.elapsed();
    assert_answers(
        server.gateway_addr,
        &ca,
        &id,
        &format!("/clusters/{cluster}/version"),
        503,
        "ServiceUnavailable",
    )
    .await;
    eprintln!("agent kill -9 mid LIST: server dropped the session {noticed:.2?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill9_mid_watch_then_a_new_agent_serves() {
    let env = env();
    let cluster = "watch-kill";
    let ProcessAgent {
        dir,
        server,
        mut agent,
        id,
        ca,
    } = ProcessAgent::start(cluster).await;

    // Two watches in flight, over HTTP/1.1 and HTTP/2.
    let watch = format!("/clusters/{cluster}/api/v1/namespaces?watch=true");
    let mut h1 = gateway_h1(server.gateway_addr, &ca, &id).await.unwrap();
    let w1 = h1.send_request(get(&watch)).await.unwrap();
    let mut h2 = gateway_h2(server.gateway_addr, &ca, &id).await.unwrap();
    let w2 = h2.send_request(get_h2(&watch)).await.unwrap();
    assert_eq!((w1.status().as_u16(), w2.status().as_u16()), (200, 200));
    let (mut b1, mut b2) = (w1.into_body(), w2.into_body());
    let g1 = read_some(&mut b1, 1, Some("ADDED")).await;
    let g2 = read_some(&mut b2, 1, Some("ADDED")).await;

    let killed = Instant::now();
    agent.kill9();
    let (e1, e2) = tokio::time::timeout(
        Duration::from_secs(15),
        futures::future::join(finish(b1, g1), finish(b2, g2)),
    )
    .await
    .expect("a watch hung after the agent was killed");
    let ended = killed.elapsed();
    let describe = |e: &Ending| match e {
        Ending::Complete(_) => "end of stream".to_string(),
        Ending::Error { error, .. } => format!("error ({error})"),
    };
    assert!(
        server
            .wait_connected(cluster, false, Duration::from_secs(5))
            .await
    );
    eprintln!(
        "agent kill -9 mid watch: both watches ended within {ended:.2?} \
         (HTTP/1.1: {}; HTTP/2: {}); server dropped the session {:.2?} after the kill",
        describe(&e1),
        describe(&e2),
        killed.elapsed()
    );
    let version = format!("/clusters/{cluster}/version");
    assert_answers(
        server.gateway_addr,
        &ca,
        &id,
        &version,
        503,
        "ServiceUnavailable",
    )
    .await;

    // A new agent process: service and watches are back.
    let started = Instant::now();
    let _agent = env
        .on_member()
        .agent_process(&dir.path().join("token"), &dir.path().join("agent2.log"))
        .unwrap();
    let back = until_ok(
        server.gateway_addr,
        &ca,
        &id,
        &version,
        Duration::from_secs(20),
    )
    .await;
    let mut h1 = gateway_h1(server.gateway_addr, &ca, &id).await.unwrap();
    let w = h1.send_request(get(&watch)).await.unwrap();
    assert_eq!(w.status(), 200);
    read_some(&mut w.into_body(), 1, Some("ADDED")).await;
    eprintln!(
        "a new agent process served requests {back:.2?} after it was started ({:.2?} incl. the watch)",
        started.elapsed()
    );
}

// === agent restart ===

/// A graceful agent restart while requests flow: every request completes
/// (200, or a 503 Status while no agent is connected) within a bound, the watch
/// ends at once, and service resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_while_requests_flow() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "restart";
    let t = env.tunnel(&dir, cluster).await;
    let (server, agent, token) = (t.server, t.agent, t.token);
    let (gw, ca, id) = (t.gw, t.ca, t.id);

    let (_watch, wb, got) = watch_namespaces(gw, &ca, &id, cluster).await;

    // Requests flow on one HTTP/2 connection throughout the restart.
    let stop = CancellationToken::new();
    let load = {
        let stop = stop.clone();
        let mut h2 = gateway_h2(gw, &ca, &id).await.unwrap();
        let path = format!("/clusters/{cluster}/version");
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<u16, usize>::new();
            let mut slowest = Duration::ZERO;
            for _ in 0..10_000 {
                if stop.is_cancelled() {
                    break;
                }
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(10), async {
                    let resp = h2.send_request(get_h2(&path)).await?;
                    let s = resp.status().as_u16();
                    let body = resp.into_body().collect().await?.to_bytes();
                    anyhow::Ok((s, body))
                })
                .await
                .expect("a request hung for 10s during the agent restart")
                .expect("the gateway connection failed");
                if r.0 != 200 {
                    assert_status(&r.1, r.0, "ServiceUnavailable");
                }
                slowest = slowest.max(t.elapsed());
                *seen.entry(r.0).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (seen, slowest)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Instant::now();
    agent.stop().await;
    let ending = tokio::time::timeout(Duration::from_secs(10), finish(wb, got))
        .await
        .expect("the watch hung after the agent stopped");
    let watch_ended = stopped.elapsed();
    assert!(
        server
            .wait_connected(cluster, false, Duration::from_secs(2))
            .await,
        "a graceful agent stop should end the session at once"
    );
    let gone = stopped.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let _agent = env.on_member().agent(&token).unwrap();
    assert!(
        server
            .wait_connected(cluster, true, Duration::from_secs(10))
            .await
    );
    let back = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (seen, slowest) = load.await.unwrap();
    assert!(seen.get(&200).copied().unwrap_or(0) > 10, "{seen:?}");
    assert!(seen.get(&503).copied().unwrap_or(0) > 0, "{seen:?}");
    assert!(
        seen.keys().all(|s| *s == 200 || *s == 503),
        "unexpected statuses {seen:?}"
    );
    eprintln!(
        "agent restart: watch ended {watch_ended:.2?} after stop ({}), session gone in {gone:.2?}, \
         new agent connected in {back:.2?}; requests during it: {seen:?}, slowest {slowest:.2?}",
        match ending {
            Ending::Complete(_) => "end of stream".to_string(),
            Ending::Error { error, .. } => format!("error: {error}"),
        }
    );
}

// === server kill -9 and restart ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_kill9_and_restart() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        ServerProcess::start(&dir.path().join("server"), &dir.path().join("server.log"))
            .await
            .unwrap();
    let cluster = "phoenix";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, server.mint(cluster, None).unwrap().encode()).unwrap();
    let _agent = env
        .on_member()
        .agent_process(&token_file, &dir.path().join("agent.log"))
        .unwrap();
    let id = server.identity(cluster).unwrap();
    let ca = server.ca_pem().to_string();
    let gw = server.gateway_addr;
    let version = format!("/clusters/{cluster}/version");
    until_ok(gw, &ca, &id, &version, Duration::from_secs(20)).await;

    // Watches in flight over both protocols, then kill -9 of the server.
    let watch = format!("/clusters/{cluster}/api/v1/namespaces?watch=true");
    let mut h1 = gateway_h1(gw, &ca, &id).await.unwrap();
    let w1 = h1.send_request(get(&watch)).await.unwrap();
    let mut h2 = gateway_h2(gw, &ca, &id).await.unwrap();
    let w2 = h2.send_request(get_h2(&watch)).await.unwrap();
    let (mut b1, mut b2) = (w1.into_body(), w2.into_body());
    let g1 = read_some(&mut b1, 1, Some("ADDED")).await;
    let g2 = read_some(&mut b2, 1, Some("ADDED")).await;
    let killed = Instant::now();
    server.kill9();
    let (e1, e2) = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join(finish(b1, g1), finish(b2, g2)),
    )
    .await
    .expect("a watch hung after the server was killed");
    assert!(matches!(e1, Ending::Error { .. }), "{e1:?}");
    assert!(matches!(e2, Ending::Error { .. }), "{e2:?}");
    let watches_ended = killed.elapsed();
    // While it is down, new clients are refused at once.
    let down = tokio::time::timeout(Duration::from_secs(5), raw::get(gw, &ca, &id, &version))
        .await
        .expect("a request to a dead server hung");
    assert!(down.is_err(), "{down:?}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    server.restart().await.unwrap();
    let listening = restarted.elapsed();
    let back = until_ok(gw, &ca, &id, &version, Duration::from_secs(15)).await;
    let mut h1 = gateway_h1(gw, &ca, &id).await.unwrap();
    let w = h1.send_request(get(&watch)).await.unwrap();
    assert_eq!(w.status(), 200);
    read_some(&mut w.into_body(), 1, Some("ADDED")).await;
    eprintln!(
        "server kill -9: watches failed {watches_ended:.2?} after the kill; restarted process \
         listening in {listening:.2?}; the agent was back and serving {:.2?} after the restart",
        listening + back
    );
}

// === member apiserver down ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_apiserver_down_gives_503_until_it_is_back() {
    let env = env();
    let mut flaky = env.bed.cluster("flaky").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, sa_token_file) = agent_credential(&flaky, dir.path()).await.unwrap();
    let cluster = "flaky";
    let upstreams = vec![kube_upstream(&flaky, &sa_token_file)];
    let Tunnel {
        server,
        agent: _agent,
        gw,
        ca,
        id,
        ..
    } = Tunnel::start(dir.path(), cluster, upstreams).await.unwrap();
    let version = format!("/clusters/{cluster}/version");
    let (s, _) = status_of(gw, &ca, &id, &version).await;
    assert_eq!(s, 200);

    let (_watch, wb, got) = watch_namespaces(gw, &ca, &id, cluster).await;

    let stopped = Instant::now();
    flaky.stop().await;
    let ending = tokio::time::timeout(Duration::from_secs(15), finish(wb, got))
        .await
        .expect("the watch hung after the apiserver died");
    let watch_ended = stopped.elapsed();
    // Every request while it is down: a prompt 503 Status, over both protocols.
    let mut h2 = gateway_h2(gw, &ca, &id).await.unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let (s, b) = status_of(gw, &ca, &id, &version).await;
        assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
        assert_status(&b, 503, "ServiceUnavailable");
        let resp = tokio::time::timeout(Duration::from_secs(15), h2.send_request(get_h2(&version)))
            .await
            .expect("an HTTP/2 request hung")
            .unwrap();
        assert_eq!(resp.status(), 503);
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        assert_status(&b, 503, "ServiceUnavailable");
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The tunnel itself stayed up.
    assert!(server.server.registry().is_connected(cluster));

    let restarted = Instant::now();
    flaky.restart().await.unwrap();
    let ready = restarted.elapsed();
    let back = until_ok(gw, &ca, &id, &version, Duration::from_secs(20)).await;
    eprintln!(
        "member apiserver down: in-flight watch ended {watch_ended:.2?} after the kill ({}); \
         requests got 503 Status (slowest pair {slowest:.2?}); apiserver ready {ready:.2?} after \
         restart, 200 through the tunnel {back:.2?} later",
        match ending {
            Ending::Complete(_) => "end of stream".to_string(),
            Ending::Error { error, .. } => format!("error: {error}"),
        }
    );
}

// === network blackhole ===

/// A TCP relay between agent and server that can stop forwarding without
/// closing anything: no FIN, no RST, bytes simply stop moving (and are held,
/// not dropped, so the relay heals like a real network path does).
struct Relay {
    addr: SocketAddr,
    flowing: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (flowing, _) = watch::channel(true);
        let stop = CancellationToken::new();
        let relay = Relay {
            addr,
            flowing: flowing.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(async move {
            // Bounded: an agent reconnects a few dozen times at most in a test.
            for _ in 0..1000 {
                let (client, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let rx = flowing.subscribe();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut rx2 = rx.clone();
                    // A connection made during a blackhole gets nowhere until it heals.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = rx2.wait_for(|f| *f) => if r.is_err() { return },
                    }
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::join!(
                        pump(cr, uw, rx.clone(), stop.clone()),
                        pump(ur, cw, rx, stop)
                    );
                });
            }
        });
        relay
    }

    fn blackhole(&self) {
        self.flowing.send_replace(false);
    }

    fn heal(&self) {
        self.flowing.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = flowing.wait_for(|f| *f) => if r.is_err() { return },
        }
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = from.read(&mut buf) => n.unwrap_or(0),
        };
        // Whatever was read while the path was up is held through a blackhole.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = flowing.wait_for(|f| *f) => if r.is_err() { return },
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_blackhole_is_detected_and_heals() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let server = TowerServer::start(&dir.path().join("server"))
        .await
        .unwrap();
    let relay = Relay::start(server.ssh_addr).await;
    let cluster = "blackhole";
    let token = fixture::mint_in(
        &server.state_dir,
        cluster,
        vec![relay.addr.to_string()],
        None,
    )
    .unwrap();
    let upstreams = vec![kube_upstream(&env.member, &env.sa_token_file)];
    let agent = server
        .connect_agent(cluster, &token, upstreams, Duration::from_secs(20))
        .await
        .unwrap();
    let (gw, ca, id) = server.client_for(cluster).unwrap();
    let version = format!("/clusters/{cluster}/version");
    let (s, _) = status_of(gw, &ca, &id, &version).await;
    assert_eq!(s, 200);
    // A watch and a large LIST in flight when the path goes dark.
    let (_watch, wb, wgot) = watch_namespaces(gw, &ca, &id, cluster).await;
    let mut h1b = gateway_h1(gw, &ca, &id).await.unwrap();
    let l = h1b
        .send_request(get(&format!(
            "/clusters/{cluster}/api/v1/namespaces/{BIG_NS}/configmaps"
        )))
        .await
        .unwrap();
    let mut lb = l.into_body();
    let lgot = read_some(&mut lb, 64 * 1024, None).await;

    let dark = Instant::now();
    relay.blackhole();
    let in_flight = tokio::spawn(async move {
        let (w, l) = futures::future::join(finish(wb, wgot), finish(lb, lgot)).await;
        (w, l, dark.elapsed())
    });
    assert!(
        server
            .wait_connected(cluster, false, Duration::from_secs(10))
            .await,
        "the server did not notice the blackhole within 10s"
    );
    let server_noticed = dark.elapsed();
    let agent_status = agent
        .wait_state(Duration::from_secs(10), |s| {
            matches!(s, AgentState::Failed(_) | AgentState::Connecting)
        })
        .await;
    let agent_noticed = dark.elapsed();
    let (we, le, ended) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight requests hung through the blackhole")
        .unwrap();
    assert!(
        !matches!(&le, Ending::Complete(b) if b.len() < BIG_ITEMS * BIG_ITEM),
        "a truncated LIST looked complete"
    );
    assert_answers(gw, &ca, &id, &version, 503, "ServiceUnavailable").await;
    // The keepalive window, plus scheduling slack on a 2-core machine.
    let bound = keepalive_window() + Duration::from_millis(1500);
    assert!(
        server_noticed <= bound,
        "server noticed the dead agent after {server_noticed:?}; bound {bound:?}"
    );

    // Keep it dark a while (the agent's redials get nowhere), then heal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let healed = Instant::now();
    relay.heal();
    assert!(
        server
            .wait_connected(cluster, true, Duration::from_secs(20))
            .await,
        "the agent did not come back after the blackhole healed"
    );
    let reconnected = healed.elapsed();
    let back = until_ok(gw, &ca, &id, &version, Duration::from_secs(10)).await;
    eprintln!(
        "blackhole: server dropped the agent {server_noticed:.2?} after the path went dark \
         (keepalive window {:?}); agent noticed by {agent_noticed:.2?} ({agent_status:?}); \
         in-flight watch and LIST ended by {ended:.2?} ({} / {}); after healing the agent was \
         back in {reconnected:.2?} and serving {:.2?} later",
        keepalive_window(),
        short(&we),
        short(&le),
        back
    );
    drop(relay);
}

fn short(e: &Ending) -> String {
    match e {
        Ending::Complete(b) => format!("complete, {} bytes", b.len()),
        Ending::Error { bytes, error } => format!("error after {bytes} bytes: {error}"),
    }
}
