//! Hostile peers against the real `tower-server` binary: what an attacker who
//! gets past (or as far as) SSH authentication can make the server hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::PublicKeyOrCertificate;
use tower_tests::fixture::ServerProcess;

/// An SSH client that accepts any host key: the attacker's.
struct Attacker;

impl client::Handler for Attacker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

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
