//! Hostile peers against the real `tower-server` binary: what an attacker who
//! gets past (or as far as) SSH authentication can make the server hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client;
use tower_server::gateway::RETRY_AFTER_SECONDS;
use tower_tests::fixture::http::{H2Client, fetch, open_unread};
use tower_tests::fixture::{ProcessBed, ServerProcess};

/// An SSH client that accepts any host key: the attacker's.
use tower_tests::fixture::rogue::Rogue as Attacker;

/// Connects to `server` as `cluster` with `credential`, opens a session
/// channel and pushes data into it (no subsystem, nothing the server reads)
/// until `push_for` has passed or the server stops taking it. Returns the bytes
/// pushed and the handle (the connection stays open while it is held).
async fn flood_session_channel(
    server: std::net::SocketAddr,
    cluster: &str,
    credential: &str,
    push_for: Duration,
) -> (u64, Option<client::Handle<Attacker>>) {
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let Ok(mut handle) = client::connect(config, server, Attacker).await else {
        return (0, None);
    };
    match handle.authenticate_password(cluster, credential).await {
        Ok(auth) if auth.success() => {}
        _ => return (0, Some(handle)),
    }
    let Ok(channel) = handle.channel_open_session().await else {
        return (0, Some(handle));
    };
    let chunk = vec![0x5au8; 32 * 1024];
    let mut pushed = 0u64;
    let deadline = Instant::now() + push_for;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), channel.data(&chunk[..])).await {
            Ok(Ok(())) => pushed += chunk.len() as u64,
            Ok(Err(_)) => break,
            Err(_) => {} // the window is shut: the server reads nothing more
        }
    }
    (pushed, Some(handle))
}

/// Baseline fds and RSS (KiB) of `server`, after a moment of quiet.
async fn baseline(server: &ServerProcess) -> (usize, u64) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    (server.fds(), server.rss_kib().unwrap())
}

/// Attack 1 of the hostile-peers issue: peers holding an expired token's
/// secret (the server lets them in to read their refusal) open a session
/// channel and push data nobody asked for, 100 of them from one source. The
/// server holds at most a bounded amount for them, and at the authentication
/// deadline every one is gone: fds back to the baseline while the attackers
/// still hold their sockets open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_session_channels_cost_little_and_end_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = ServerProcess::start(&dir.path().join("state"), &log)
        .await
        .unwrap();
    let token = server
        .mint("eriador", Some(Duration::from_secs(1)))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // expired: refused, but let in
    let (fds0, rss0) = baseline(&server).await;
    let started = Instant::now();
    let addr = server.ssh_addr;
    let credential = token.credential().expose().to_string();
    let attacks: Vec<_> = (0..100)
        .map(|_| {
            let credential = credential.clone();
            tokio::spawn(async move {
                flood_session_channel(addr, "eriador", &credential, Duration::from_secs(4)).await
            })
        })
        .collect();
    let mut pushed = 0u64;
    let mut held = Vec::new();
    for a in attacks {
        let (n, handle) = a.await.unwrap();
        pushed += n;
        held.extend(handle);
    }
    let rss_peak = server.rss_kib().unwrap();
    eprintln!(
        "attack 1: {} connections held, {} MiB pushed; server rss {} -> {} MiB, fds {} -> {}",
        held.len(),
        pushed >> 20,
        rss0 >> 10,
        rss_peak >> 10,
        fds0,
        server.fds()
    );
    assert!(
        rss_peak < rss0 + 64 * 1024,
        "the server holds {} MiB for channels nobody reads",
        (rss_peak - rss0) >> 10
    );
    // The authentication deadline (20 s) cuts every one of them, though the
    // attackers keep their sockets open.
    let deadline = Duration::from_secs(20) + Duration::from_secs(5);
    let back =
        tower_tests::fixture::eventually(deadline.saturating_sub(started.elapsed()), || async {
            (server.fds() <= fds0 + 2).then_some(())
        })
        .await;
    let (fds1, rss1) = (server.fds(), server.rss_kib().unwrap());
    eprintln!(
        "attack 1: after {:.1?}: fds {fds1} (baseline {fds0}), rss {} MiB (baseline {})",
        started.elapsed(),
        rss1 >> 10,
        rss0 >> 10
    );
    assert!(back.is_some(), "fds still at {fds1} (baseline {fds0})");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("did not end after its socket was cut"),
        "a cut session kept running"
    );
    drop(held);
}

/// A peer with a valid token (an agent) floods its session channel before
/// asking for the control subsystem: the server closes that channel after a
/// small allowance, keeps the connection usable, and answers an `exec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_channel_flooded_by_an_agent_is_closed_and_exec_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = ServerProcess::start(&dir.path().join("state"), &log)
        .await
        .unwrap();
    let token = server.mint("arnor", None).unwrap();
    let credential = token.credential().expose().to_string();
    let (rss0, _) = (server.rss_kib().unwrap(), ());
    let (pushed, handle) = flood_session_channel(
        server.ssh_addr,
        "arnor",
        &credential,
        Duration::from_secs(3),
    )
    .await;
    let handle = handle.expect("connected");
    let rss1 = server.rss_kib().unwrap();
    eprintln!(
        "agent flood: {} MiB pushed; server rss {} -> {} MiB",
        pushed >> 20,
        rss0 >> 10,
        rss1 >> 10
    );
    assert!(
        rss1 < rss0 + 32 * 1024,
        "the server holds {} MiB",
        (rss1 - rss0) >> 10
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("closing a session channel that carries data before its subsystem request"),
        "the flooded channel was not closed"
    );
    // One session channel per connection; an exec on a new connection's
    // channel gets a failure, not silence.
    assert!(
        handle.channel_open_session().await.is_err(),
        "a second session channel"
    );
    let config = Arc::new(client::Config::default());
    let mut h = client::connect(config, server.ssh_addr, Attacker)
        .await
        .unwrap();
    assert!(
        h.authenticate_password("arnor", credential.as_str())
            .await
            .unwrap()
            .success()
    );
    let mut channel = h.channel_open_session().await.unwrap();
    channel.exec(true, "id").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match channel.wait().await {
                Some(russh::ChannelMsg::Failure) => return true,
                Some(russh::ChannelMsg::Success) => return false,
                None => return false,
                Some(_) => {}
            }
        }
    })
    .await;
    assert_eq!(answer, Ok(true), "exec got no failure answer");
}

// === fair shares: attacks 2 and 3 ===

/// Streams a client opens and never reads in the share tests: each would
/// fill its whole tunnel stream window.
const UNREAD: &str = "/bytes?n=16777216";

/// How many of `responses` have status `code`.
fn count(responses: &[hyper::Response<hyper::body::Incoming>], code: u16) -> usize {
    responses
        .iter()
        .filter(|r| r.status().as_u16() == code)
        .count()
}

/// Small-GET latencies (ms, sorted) of `n` sequential requests.
async fn small_gets(client: &H2Client, path: &str, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let (status, _) = fetch(client, path, Duration::from_secs(10)).await.unwrap();
        assert_eq!(status, 200);
        out.push(started.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn p(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Attack 2 of the hostile-peers issue: one client opens 300 streams for
/// large responses and reads none. It gets its share (64) and `429` for the
/// rest; another client of the same cluster still gets whole responses,
/// large ones included, and the server holds a bounded amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_stalls_only_itself() {
    let bed = ProcessBed::start(&[], &["rohan"], &[]).await;
    let victim = bed.client([127, 0, 0, 2], "rohan").await;
    let before = small_gets(&victim, "/clusters/rohan/version", 100).await;
    let (fds0, rss0) = baseline(&bed.server).await;

    let attacker = bed.client([127, 0, 0, 1], "rohan").await;
    let mut held = open_unread(&attacker, &format!("/clusters/rohan{UNREAD}"), 300).await;
    let (admitted, refused) = (count(&held, 200), count(&held, 429));
    tokio::time::sleep(Duration::from_secs(1)).await; // every window fills
    let rss_held = bed.server.rss_kib().unwrap();
    eprintln!(
        "attack 2: {admitted} streams admitted, {refused} refused; server rss {} -> {} MiB, fds {fds0} -> {}",
        rss0 >> 10,
        rss_held >> 10,
        bed.server.fds()
    );
    // The same cluster still answers another client in full, large
    // responses too: the tunnel's connection window is not used up.
    for _ in 0..3 {
        assert_eq!(
            fetch(
                &victim,
                "/clusters/rohan/bytes?n=8388608",
                Duration::from_secs(20)
            )
            .await,
            Ok((200, 8 << 20))
        );
    }
    assert_eq!(
        (admitted, refused),
        (64, 236),
        "a client gets its share and 429 past it"
    );
    let refusal = held.swap_remove(held.iter().position(|r| r.status() == 429).unwrap());
    assert_eq!(
        refusal.headers()["retry-after"],
        RETRY_AFTER_SECONDS.to_string().as_str()
    );
    let body = http_body_util::BodyExt::collect(refusal.into_body())
        .await
        .unwrap()
        .to_bytes();
    tower_tests::fixture::http::assert_status(&body, 429, "TooManyRequests");
    assert!(
        String::from_utf8_lossy(&body).contains("--client-streams"),
        "the refusal names its knob: {}",
        String::from_utf8_lossy(&body)
    );

    let during = small_gets(&victim, "/clusters/rohan/version", 100).await;
    eprintln!(
        "attack 2: other client's small GET p50 {:.2} -> {:.2} ms, p99 {:.2} -> {:.2} ms",
        p(&before, 0.5),
        p(&during, 0.5),
        p(&before, 0.99),
        p(&during, 0.99)
    );
    let rss_peak = bed.server.rss_kib().unwrap();
    assert!(
        rss_peak < rss0 + 128 * 1024,
        "the server holds {} MiB for one client's share",
        (rss_peak - rss0) >> 10
    );
    drop(held);
    drop(attacker);
    // Its share given back, the client is served again. The server learns
    // of the dropped streams as their resets arrive, so a request sent at
    // once may still meet the old share; within the Retry-After it may not.
    let again = bed.client([127, 0, 0, 1], "rohan").await;
    let dropped = Instant::now();
    let status = loop {
        let status = fetch(&again, "/clusters/rohan/version", Duration::from_secs(10))
            .await
            .map(|r| r.0);
        if status != Ok(429) || dropped.elapsed() > Duration::from_secs(RETRY_AFTER_SECONDS) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "attack 2: share given back {} ms after the client went",
        dropped.elapsed().as_millis()
    );
    assert_eq!(
        status,
        Ok(200),
        "the share is given back within Retry-After"
    );
}

/// The cluster's share: four clients from four addresses, 40 unread streams
/// each against a share of 32 per client and 96 per cluster. The cluster
/// takes 96, the rest and any newcomer get `429` naming the cluster's share,
/// and another cluster's clients see nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_s_share_bounds_all_its_clients_and_spares_other_clusters() {
    let bed = ProcessBed::start(
        &[
            ("TOWER_CLIENT_STREAMS", "32"),
            ("TOWER_CLUSTER_STREAMS", "96"),
        ],
        &["rohan", "gondor"],
        &[],
    )
    .await;
    let (_, rss0) = baseline(&bed.server).await;
    let mut held = Vec::new();
    let mut attackers = Vec::new();
    for source in 2..=5u8 {
        let attacker = bed.client([127, 0, 0, source], "rohan").await;
        held.extend(open_unread(&attacker, &format!("/clusters/rohan{UNREAD}"), 40).await);
        attackers.push(attacker);
    }
    assert_eq!((count(&held, 200), count(&held, 429)), (96, 64));
    let newcomer = bed.client([127, 0, 0, 9], "rohan").await;
    let mut c = newcomer.clone();
    let refused = c
        .send_request(tower_tests::fixture::http::get_h2(
            "/clusters/rohan/version",
        ))
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let body = http_body_util::BodyExt::collect(refused.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("--cluster-streams"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let other = bed.client([127, 0, 0, 9], "gondor").await;
    for _ in 0..3 {
        assert_eq!(
            fetch(
                &other,
                "/clusters/gondor/bytes?n=8388608",
                Duration::from_secs(20)
            )
            .await,
            Ok((200, 8 << 20))
        );
    }
    let rss = bed.server.rss_kib().unwrap();
    eprintln!(
        "cluster share: 96 unread streams held; server rss {} -> {} MiB",
        rss0 >> 10,
        rss >> 10
    );
    assert!(rss < rss0 + 160 * 1024, "{} MiB held", (rss - rss0) >> 10);
    drop(held);
}

/// Attack 3 of the hostile-peers issue: 1,000 slow requests on one gateway
/// connection. The client's share (64) reaches the agent, the rest get
/// `429` at once, and the agent holds one upstream connection per admitted
/// request, not per request sent. With the server's shares raised past the
/// agent's `--max-streams`, the agent's own bound holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_reach_the_agent_only_as_far_as_the_shares() {
    let bed = ProcessBed::start(&[], &["rohan"], &[]).await;
    let agent_fds = || tower_tests::fixture::fd_count(Some(bed.agents[0].pid()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds0 = agent_fds();
    let client = bed.client([127, 0, 0, 1], "rohan").await;
    let (answered, held) = open_slow(&client, 1000).await;
    let (fds, refused) = (agent_fds(), answered.iter().filter(|s| **s == 429).count());
    eprintln!("attack 3: 1000 slow requests, {refused} refused; agent fds {fds0} -> {fds}");
    assert_eq!(refused, 1000 - 64);
    assert!(fds <= fds0 + 64 + 4, "the agent holds {} fds", fds - fds0);
    drop(held);
    drop(client);

    let bed = ProcessBed::start(
        &[
            ("TOWER_CLIENT_STREAMS", "400"),
            ("TOWER_CLUSTER_STREAMS", "400"),
        ],
        &["rohan"],
        &["--max-streams", "50"],
    )
    .await;
    let agent_fds = || tower_tests::fixture::fd_count(Some(bed.agents[0].pid()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds0 = agent_fds();
    let client = bed.client([127, 0, 0, 1], "rohan").await;
    let (_, _held) = open_slow(&client, 300).await;
    let fds = agent_fds();
    eprintln!("agent --max-streams 50: 300 slow requests; agent fds {fds0} -> {fds}");
    assert!(fds <= fds0 + 50 + 4, "the agent holds {} fds", fds - fds0);
}

/// Sends `n` slow requests (a watch the upstream never answers) on `client`
/// and waits 3 s; returns the statuses answered by then and the requests,
/// which stay in flight until the set is dropped.
async fn open_slow(client: &H2Client, n: usize) -> (Vec<u16>, tokio::task::JoinSet<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let mut c = client.clone();
        let tx = tx.clone();
        let req = tower_tests::fixture::http::get_h2("/clusters/rohan/hang?watch=true");
        set.spawn(async move {
            if let Ok(resp) = c.send_request(req).await {
                let _ = tx.send(resp.status().as_u16());
                // Held open: a response head alone does not end the request.
                std::future::pending::<()>().await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut answered = Vec::new();
    while let Ok(status) = rx.try_recv() {
        answered.push(status);
    }
    (answered, set)
}

// === a malicious agent ===

/// A malicious agent with a valid token answers with a 1 MiB and a 16 MiB
/// response head, bodies that never end to a client that reads none, and
/// asks for 2,000 channels. Each client gets a `502` Status or its own
/// stalled stream, the cluster keeps answering, and the server holds a
/// bounded amount throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_agent_cannot_exhaust_the_server() {
    use tower_tests::fixture::http::{assert_status, until_ok};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("state"), &dir.path().join("server.log"))
        .await
        .unwrap();
    let token = server.mint("mordor", None).unwrap();
    let rogue = tower_tests::fixture::rogue::RogueAgent::connect(&token)
        .await
        .unwrap();
    let id = server.identity("mordor").unwrap();
    let limit = Duration::from_secs(20);
    let ok = until_ok(
        server.gateway_addr,
        server.ca_pem(),
        &id,
        "/clusters/mordor/version",
        limit,
    );
    assert!(ok.await < limit, "the rogue's cluster never answered");
    // An honest cluster beside it.
    let upstream = tower_tests::fixture::HttpsUpstream::bytes(dir.path())
        .await
        .unwrap();
    let gondor = server.mint("gondor", None).unwrap();
    let _agent = tower_tests::fixture::TowerAgent::start_with(
        tower_agent::TokenSource::Literal(gondor.encode()),
        vec![upstream.upstream("kube-apiserver", None)],
    )
    .unwrap();
    let gondor_id = server.identity("gondor").unwrap();
    let ok = until_ok(
        server.gateway_addr,
        server.ca_pem(),
        &gondor_id,
        "/clusters/gondor/version",
        limit,
    );
    assert!(ok.await < limit, "the honest cluster never answered");
    let honest = tower_tests::fixture::gateway_h2(server.gateway_addr, server.ca_pem(), &gondor_id)
        .await
        .unwrap();
    let (fds0, rss0) = baseline(&server).await;
    let client = tower_tests::fixture::gateway_h2(server.gateway_addr, server.ca_pem(), &id)
        .await
        .unwrap();
    let get = |path: &'static str| {
        let mut c = client.clone();
        async move {
            let resp = tokio::time::timeout(
                Duration::from_secs(20),
                c.send_request(tower_tests::fixture::http::get_h2(path)),
            )
            .await
            .expect("an answer within 20 s")
            .unwrap();
            let status = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (status, body)
        }
    };

    for path in [
        "/clusters/mordor/huge-headers",
        "/clusters/mordor/endless-headers",
    ] {
        let (status, body) = get(path).await;
        assert_status(&body, status, "InternalError");
        assert_eq!(status, 502, "{path}: {}", String::from_utf8_lossy(&body));
        assert_eq!(get("/clusters/mordor/version").await.0, 200, "after {path}");
    }
    let rss_heads = server.rss_kib().unwrap();

    let granted = rogue.ask_for_channels(2000).await;
    assert_eq!(granted, 0, "channels granted to an agent");
    assert_eq!(
        get("/clusters/mordor/version").await.0,
        200,
        "after 2,000 channel requests"
    );
    let rss_channels = server.rss_kib().unwrap();

    // Bodies that never end, to a client that reads none: each holds its
    // stream window, and an honest cluster on the same server answers in
    // full meanwhile.
    let unread = open_unread(&client, "/clusters/mordor/endless-body", 32).await;
    assert_eq!(count(&unread, 200), 32);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        assert_eq!(
            fetch(
                &honest,
                "/clusters/gondor/bytes?n=8388608",
                Duration::from_secs(20)
            )
            .await,
            Ok((200, 8 << 20))
        );
    }
    let (fds, rss) = (server.fds(), server.rss_kib().unwrap());
    eprintln!(
        "malicious agent: server rss {} MiB; after huge heads {}, after 2,000 channel requests {}, after 32 endless bodies {}; fds {fds0} -> {fds}",
        rss0 >> 10,
        rss_heads >> 10,
        rss_channels >> 10,
        rss >> 10
    );
    assert!(
        rss_heads < rss0 + 16 * 1024,
        "{} MiB after huge heads",
        (rss_heads - rss0) >> 10
    );
    assert!(rss < rss0 + 80 * 1024, "{} MiB held", (rss - rss0) >> 10);
    assert!(fds <= fds0 + 2, "fds {fds0} -> {fds}");
    drop(unread);
}
