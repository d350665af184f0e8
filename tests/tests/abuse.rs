//! Bad input and abuse against the real server and agent: slowloris on the
//! gateway, oversized heads, `Impersonate-*` headers, garbage, half-open and
//! flooding connections on the SSH port, brute-forced and refused tokens,
//! resource leaks after heavy use, and secrets in logs.
//!
//! The tests share one member cluster and two small upstreams (an echo and a
//! header dump), on their own runtime thread. The two tests that measure file
//! descriptors and tasks (flood, leaks) hold [`MEASURE`] exclusively so that
//! no other test of this binary opens or closes anything meanwhile.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower_agent::{AgentState, TokenSource, UpstreamConfig};
use tower_proto::names::UPSTREAM_KS_APISERVER;
use tower_tests::fixture::http::{body_json, get_h1 as req, get_h2 as req_h2, next_data};
use tower_tests::fixture::{
    self, HttpsUpstream, Member, ServerProcess, TowerAgent, TowerServer, Tunnel, agent_credential,
    fd_count, gateway_h1, gateway_h2, kube_upstream, raw,
};
use tower_tests::testbed::{self, ControlPlane, Testbed};

/// Held shared by ordinary tests and exclusively by the ones that count
/// descriptors and tasks.
static MEASURE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Env {
    _bed: Testbed,
    member: ControlPlane,
    sa_token: String,
    sa_token_file: PathBuf,
    echo: HttpsUpstream,
    dump: HttpsUpstream,
    _dir: tempfile::TempDir,
}

tower_tests::shared_env!(Env, "abuse", start_env);

async fn start_env() -> anyhow::Result<Env> {
    let started = Instant::now();
    let bed = fixture::start_logged_bed("tower-abuse.log").await?;
    let member = bed.cluster("member").await?;
    fixture::build_binaries().await?;
    let dir = tempfile::tempdir()?;
    let (sa_token, sa_token_file) = agent_credential(&member, dir.path()).await?;
    let echo = HttpsUpstream::echo(dir.path()).await?;
    let dump = HttpsUpstream::header_dump(dir.path()).await?;
    eprintln!("abuse env ready in {:.2?}", started.elapsed());
    Ok(Env {
        _bed: bed,
        member,
        sa_token,
        sa_token_file,
        echo,
        dump,
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
}

// === helpers ===

/// A server (with `configure` applied) and an in-process agent for `cluster`
/// serving the member's kube-apiserver and `ks` as ks-apiserver.
async fn tunnel(
    dir: &Path,
    cluster: &str,
    ks: UpstreamConfig,
    configure: impl FnOnce(&mut fixture::ServerConfig),
) -> Tunnel {
    let env = env();
    let upstreams = vec![kube_upstream(&env.member, &env.sa_token_file), ks];
    Tunnel::start_configured(dir, cluster, upstreams, configure)
        .await
        .unwrap()
}

/// [`tunnel`] with the header dump as ks-apiserver and the test settings: the
/// server, the agent, and the gateway's address, CA and client identity.
async fn dump_tunnel(
    dir: &Path,
    cluster: &str,
) -> (TowerServer, TowerAgent, SocketAddr, String, raw::Identity) {
    let env = env();
    let ks = env
        .dump
        .upstream(UPSTREAM_KS_APISERVER, Some(&env.sa_token_file));
    let t = tunnel(dir, cluster, ks, |_| {}).await;
    (t.server, t.agent, t.gw, t.ca, t.id)
}

/// Reads until the peer closes (EOF or error) or `limit`; returns what was
/// read and when it closed.
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(start.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The first line of a raw HTTP/1.1 response, read up to the blank line.
async fn response_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !head.ends_with(b"\r\n\r\n") {
        assert!(Instant::now() < deadline, "no response head within 10s");
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            other => panic!(
                "connection ended before a response head ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

use tower_tests::fixture::raw::connect_from;

// === gateway: handshake floods ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_handshakes_are_capped_per_source_and_clients_still_get_in() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "handshakes";
    let Tunnel {
        server: _server,
        agent: _agent,
        gw,
        ca,
        id,
        ..
    } = tunnel(
        dir.path(),
        cluster,
        env.echo
            .upstream(UPSTREAM_KS_APISERVER, Some(&env.sa_token_file)),
        |c| {
            c.gateway_tls_timeout = Duration::from_secs(30);
            c.max_gateway_handshakes = 8;
            c.max_gateway_handshakes_per_source = 4;
        },
    )
    .await;
    // One source opens 6 connections and never starts TLS: 4 are held (until
    // the TLS timeout), the other 2 are closed at once.
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let mut s = connect_from([127, 0, 0, 21], gw).await.unwrap();
        match until_closed(&mut s, Duration::from_millis(300)).await.1 {
            Some(_) => refused += 1,
            None => flood.push(s),
        }
    }
    assert_eq!((flood.len(), refused), (4, 2), "per-source cap of 4");
    // Four quieter sources fill the overall cap of 8.
    let mut quiet = Vec::new();
    for source in 22..26 {
        let mut s = connect_from([127, 0, 0, source], gw).await.unwrap();
        assert!(
            until_closed(&mut s, Duration::from_millis(300))
                .await
                .1
                .is_none(),
            "source {source} was refused below the overall cap"
        );
        quiet.push(s);
    }
    // A real client still gets in: it takes the busiest source's oldest slot.
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        raw::get(gw, &ca, &id, &format!("/clusters/{cluster}/version")),
    )
    .await
    .expect("a client was locked out by a handshake flood")
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let got_in = started.elapsed();
    let mut evicted = 0;
    for s in &mut flood {
        if until_closed(s, Duration::from_millis(200))
            .await
            .1
            .is_some()
        {
            evicted += 1;
        }
    }
    assert_eq!(
        evicted, 1,
        "the busiest source's oldest handshake makes room"
    );
    for s in &mut quiet {
        assert!(
            until_closed(s, Duration::from_millis(100))
                .await
                .1
                .is_none()
        );
    }
    eprintln!(
        "gateway handshakes: 2 of 6 from one source refused at once, the overall cap full, \
         a client served in {got_in:.2?} by evicting 1 flood connection"
    );
}

// === gateway: slowloris ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_but_watches_and_upgrades_are_not() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(1);
    let cluster = "slowloris";
    let Tunnel {
        server: _server,
        agent: _agent,
        gw,
        ca,
        id,
        ..
    } = tunnel(
        dir.path(),
        cluster,
        env.echo
            .upstream(UPSTREAM_KS_APISERVER, Some(&env.sa_token_file)),
        |c| {
            c.gateway_header_read_timeout = timeout;
            c.gateway_tls_timeout = timeout;
        },
    )
    .await;
    let bound = timeout + Duration::from_millis(1500);

    // Anonymous: a TCP connection that never starts TLS is closed at the TLS timeout.
    let mut silent = TcpStream::connect(gw).await.unwrap();
    let (_, closed) = until_closed(&mut silent, Duration::from_secs(10)).await;
    let tls_cut = closed.expect("a silent TCP connection was held for 10s");
    assert!(tls_cut <= bound, "{tls_cut:?}");

    // With a client certificate: a head trickled one header every 200 ms is
    // cut at the header timeout, however much it keeps sending.
    let mut slow = raw::connect(gw, &ca, Some(&id), false).await.unwrap();
    slow.write_all(format!("GET /clusters/{cluster}/version HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .await
        .unwrap();
    let start = Instant::now();
    let mut cut_at = None;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let line = format!("X-Slow-{i}: {}\r\n", "a".repeat(10));
        if slow.write_all(line.as_bytes()).await.is_err() || slow.flush().await.is_err() {
            cut_at = Some(start.elapsed());
            break;
        }
        let mut probe = [0u8; 64];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
            assert!(!matches!(r, Ok(n) if n > 0), "an answer to a partial head");
            cut_at = Some(start.elapsed());
            break;
        }
    }
    let slowloris_cut = cut_at.expect("a slowloris head was accepted for 10s");
    assert!(slowloris_cut <= bound, "{slowloris_cut:?}");

    // An idle keep-alive connection goes the same way after a complete request.
    let mut idle = raw::connect(gw, &ca, Some(&id), false).await.unwrap();
    idle.write_all(
        format!("GET /clusters/{cluster}/version HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (got, closed) = until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let idle_cut = closed.expect("an idle keep-alive connection was held for 10s");

    // A watch lives well past the header timeout and still delivers events.
    let mut h1 = gateway_h1(gw, &ca, &id).await.unwrap();
    let w = h1
        .send_request(req(&format!(
            "/clusters/{cluster}/api/v1/namespaces/default/configmaps?watch=true"
        )))
        .await
        .unwrap();
    assert_eq!(w.status(), 200);
    let mut body = w.into_body();
    tokio::time::sleep(timeout * 3).await;
    let api: Api<ConfigMap> = Api::namespaced(env.member.client().await.unwrap(), "default");
    api.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some("after-the-timeout".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("after-the-timeout") {
        seen.extend_from_slice(&next_data(&mut body, Duration::from_secs(10)).await);
    }

    // An upgraded stream idles past the timeout and still carries bytes.
    let mut up = raw::connect(gw, &ca, Some(&id), false).await.unwrap();
    up.write_all(
        format!(
            "POST /kapis/clusters/{cluster}/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
             Upgrade: echo\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert!(response_head(&mut up).await.starts_with("HTTP/1.1 101"));
    tokio::time::sleep(timeout * 3).await;
    up.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), up.read_exact(&mut back))
        .await
        .expect("the upgraded stream went silent")
        .unwrap();
    assert_eq!(&back, b"still here");
    eprintln!(
        "slowloris (timeouts {timeout:?}): silent TCP cut at {tls_cut:.2?}, trickled head cut at \
         {slowloris_cut:.2?}, idle keep-alive closed at {idle_cut:.2?}; a watch and an upgraded \
         stream idle for {:?} kept working",
        timeout * 3
    );
}

// === gateway: oversized heads ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_clear_errors() {
    use tower_server::gateway::{MAX_HEADER_BYTES, MAX_HEADERS, MAX_URI_LEN};
    let _shared = MEASURE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = "oversize";
    let (_server, _agent, gw, ca, id) = dump_tunnel(dir.path(), cluster).await;
    let base = format!("/kapis/clusters/{cluster}/dump");

    // HTTP/1.1: hyper answers 431 / 414 and closes.
    let raw_status = |head: String| {
        let ca = ca.clone();
        let id = &id;
        async move {
            let mut tls = raw::connect(gw, &ca, Some(id), false).await.unwrap();
            // The server may answer and close before all of it is written.
            let _ = tls.write_all(head.as_bytes()).await;
            let line = response_head(&mut tls).await;
            let (_, closed) = until_closed(&mut tls, Duration::from_secs(5)).await;
            (line, closed.is_some())
        }
    };
    let big_header = format!(
        "GET {base} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "h".repeat(MAX_HEADER_BYTES + 1024)
    );
    let (line, closed) = raw_status(big_header).await;
    assert!(line.starts_with("HTTP/1.1 431"), "{line}");
    assert!(closed);
    let long_uri = format!(
        "GET {base}?q={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "u".repeat(MAX_URI_LEN)
    );
    let (line, closed) = raw_status(long_uri).await;
    assert!(line.starts_with("HTTP/1.1 414"), "{line}");
    assert!(closed);
    let many: String = (0..=MAX_HEADERS)
        .map(|i| format!("X-H{i}: v\r\n"))
        .collect();
    let (line, _) = raw_status(format!("GET {base} HTTP/1.1\r\nHost: x\r\n{many}\r\n")).await;
    assert!(line.starts_with("HTTP/1.1 431"), "{line}");

    // HTTP/2: a longer :path cannot even be built (the `http` crate's limit),
    // and h2 resets a stream whose :path does not parse.
    assert!(
        format!("{base}?q={}", "u".repeat(MAX_URI_LEN))
            .parse::<http::Uri>()
            .is_err()
    );
    let mut h2 = gateway_h2(gw, &ca, &id).await.unwrap();
    // An oversized HTTP/2 header list: 431 or a refused stream, never a hang,
    // and the connection stays usable.
    let mut big = req_h2(&base);
    big.headers_mut().insert(
        "x-big",
        "h".repeat(MAX_HEADER_BYTES + 1024).parse().unwrap(),
    );
    let h2_big = tokio::time::timeout(Duration::from_secs(10), h2.send_request(big))
        .await
        .expect("an oversized HTTP/2 head hung");
    let h2_big = match h2_big {
        Ok(resp) => {
            assert_eq!(resp.status(), 431);
            "431".to_string()
        }
        Err(e) => format!("stream refused ({e})"),
    };

    // Just inside the limits, everything reaches the upstream intact, over both
    // protocols: nothing in the tunnel has a smaller limit than the gateway.
    let query = "q".repeat(MAX_URI_LEN - base.len() - 1024);
    let header = "v".repeat(MAX_HEADER_BYTES / 2);
    let mut h1 = gateway_h1(gw, &ca, &id).await.unwrap();
    let mut r = req(&format!("{base}?{query}"));
    r.headers_mut().insert("x-large", header.parse().unwrap());
    let resp = h1.send_request(r).await.unwrap();
    assert_eq!(resp.status(), 200);
    let info = body_json(resp).await;
    assert_eq!(info["path"], format!("/kapis/dump?{query}"));
    assert_eq!(info["headers"]["x-large"][0], header);
    let mut r = req_h2(&format!("{base}?{query}"));
    r.headers_mut().insert("x-large", header.parse().unwrap());
    let resp = h2.send_request(r).await.unwrap();
    assert_eq!(resp.status(), 200);
    let info = body_json(resp).await;
    assert_eq!(info["headers"]["x-large"][0], header);
    eprintln!(
        "oversized heads: HTTP/1.1 header > {MAX_HEADER_BYTES} B -> 431, URI > {MAX_URI_LEN} B -> \
         414, > {MAX_HEADERS} headers -> 431 (all closed); HTTP/2 header list -> {h2_big}; \
         a {} B URI and a {} B header passed through the tunnel intact",
        base.len() + 1 + query.len(),
        header.len()
    );
}

// === gateway: impersonation ===

/// `kubectl --as` through the tunnel behaves as on a direct cluster:
/// `Impersonate-*` reaches the member (never the caller's `Authorization`),
/// and the member's RBAC judges it under the agent's identity. A
/// cluster-admin agent may impersonate; one without that right gets the
/// member's `403`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_judged_by_the_member() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "impostor";
    let (server, _agent, gw, ca, id) = dump_tunnel(dir.path(), cluster).await;
    let impersonate = |r: &mut hyper::Request<Full<Bytes>>| {
        let h = r.headers_mut();
        h.insert("impersonate-user", "jane".parse().unwrap());
        h.append("impersonate-group", "developers".parse().unwrap());
        h.append("impersonate-group", "testers".parse().unwrap());
        h.insert("impersonate-extra-scopes", "all".parse().unwrap());
        h.insert("authorization", "Bearer caller-token".parse().unwrap());
    };

    // What arrives at an upstream, over both protocols: the impersonation as
    // sent, with the agent's credential and never the caller's.
    let mut h1 = gateway_h1(gw, &ca, &id).await.unwrap();
    let mut h2 = gateway_h2(gw, &ca, &id).await.unwrap();
    let path = format!("/kapis/clusters/{cluster}/dump");
    for proto in ["HTTP/1.1", "HTTP/2"] {
        let resp = if proto == "HTTP/2" {
            let mut r = req_h2(&path);
            impersonate(&mut r);
            h2.send_request(r).await.unwrap()
        } else {
            let mut r = req(&path);
            impersonate(&mut r);
            h1.send_request(r).await.unwrap()
        };
        assert_eq!(resp.status(), 200);
        let info = body_json(resp).await;
        let headers = &info["headers"];
        assert_eq!(
            headers["impersonate-user"],
            serde_json::json!(["jane"]),
            "{proto}"
        );
        assert_eq!(
            headers["impersonate-group"],
            serde_json::json!(["developers", "testers"]),
            "{proto}"
        );
        assert_eq!(
            headers["impersonate-extra-scopes"],
            serde_json::json!(["all"]),
            "{proto}"
        );
        assert_eq!(
            headers["authorization"],
            serde_json::json!([format!("Bearer {}", env.sa_token)]),
            "{proto}: the upstream must see the agent's credential only"
        );
    }

    // The real apiserver, with a cluster-admin agent: the member applies the
    // impersonation, as it would for a direct cluster-admin client.
    let review = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
    })
    .to_string();
    let post = |cluster: &str, h2: bool| {
        let uri = format!("/clusters/{cluster}/apis/authentication.k8s.io/v1/selfsubjectreviews");
        let uri = if h2 {
            format!("https://127.0.0.1{uri}")
        } else {
            uri
        };
        let mut r = hyper::Request::post(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(review.clone())))
            .unwrap();
        if !h2 {
            r.headers_mut().insert("host", "127.0.0.1".parse().unwrap());
        }
        impersonate(&mut r);
        r
    };
    for (proto, resp) in [
        (
            "HTTP/1.1",
            h1.send_request(post(cluster, false)).await.unwrap(),
        ),
        (
            "HTTP/2",
            h2.send_request(post(cluster, true)).await.unwrap(),
        ),
    ] {
        assert_eq!(resp.status(), 201, "{proto}");
        let v = body_json(resp).await;
        assert_eq!(v["status"]["userInfo"]["username"], "jane", "{proto}: {v}");
        let groups = v["status"]["userInfo"]["groups"].to_string();
        assert!(
            groups.contains("developers") && groups.contains("testers"),
            "{proto}: {groups}"
        );
    }
    // kubectl --as, as a user would: the member answers for the impersonated
    // user (who may not delete nodes), not for the agent.
    let kubeconfig = server.kubeconfig_file(cluster).unwrap();
    let whoami = fixture::kubectl(
        &kubeconfig,
        &["auth", "whoami", "--as=jane", "-o", "json"],
        None,
    )
    .await
    .unwrap();
    assert!(whoami.contains("\"username\": \"jane\""), "{whoami}");
    let can = fixture::kubectl(
        &kubeconfig,
        &["auth", "can-i", "delete", "nodes", "--as=system:anonymous"],
        None,
    )
    .await;
    assert!(
        can.as_ref().is_err_and(|e| format!("{e:#}").contains("no")),
        "system:anonymous may delete nodes? {can:?}"
    );

    // An agent whose service account may not impersonate: the member's 403.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain_token = env
        .member
        .service_account_token("tower-system", "tower-agent-plain", false)
        .await
        .unwrap();
    let plain_file = plain_dir.path().join("plain-token");
    std::fs::write(&plain_file, &plain_token).unwrap();
    let plain = Tunnel::start(
        plain_dir.path(),
        "impostor-plain",
        vec![kube_upstream(&env.member, &plain_file)],
    )
    .await
    .unwrap();
    let mut p2 = gateway_h2(plain.gw, &plain.ca, &plain.id).await.unwrap();
    let resp = p2.send_request(post("impostor-plain", true)).await.unwrap();
    assert_eq!(resp.status(), 403);
    let v = body_json(resp).await;
    assert_eq!(v["reason"], "Forbidden", "{v}");
    assert!(v["message"].to_string().contains("impersonate"), "{v}");

    // The upgrade path (extended CONNECT inside the tunnel) carries them too.
    let echo_dir = tempfile::tempdir().unwrap();
    let Tunnel {
        server,
        agent: _agent,
        ..
    } = tunnel(
        echo_dir.path(),
        "impostor-up",
        env.echo
            .upstream(UPSTREAM_KS_APISERVER, Some(&env.sa_token_file)),
        |_| {},
    )
    .await;
    let id = server.identity("impostor-up").unwrap();
    let mut up = raw::connect(
        server.gateway_addr,
        server.server.ca_pem(),
        Some(&id),
        false,
    )
    .await
    .unwrap();
    up.write_all(
        b"POST /kapis/clusters/impostor-up/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
          Upgrade: echo\r\nImpersonate-User: jane\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), up.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let info_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-echo-info:"))
        .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(info_line.split_once(':').unwrap().1.trim()).unwrap();
    assert_eq!(info["impersonate"], "jane", "{info}");
    assert_eq!(
        info["authorization"],
        format!("Bearer {}", env.sa_token),
        "{info}"
    );
}

// === gateway: what a client certificate grants ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_bound_to_its_cluster_when_configured() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    for bound in [true, false] {
        let server = TowerServer::start_configured(&dir.path().join(format!("s-{bound}")), |c| {
            c.gateway_client_bound_to_cluster = bound;
        })
        .await
        .unwrap();
        let mut agents = Vec::new();
        for cluster in ["east", "west"] {
            let token = server.mint(cluster, None).unwrap();
            agents.push(env.on_member().agent(&token).unwrap());
            assert!(
                server
                    .wait_connected(cluster, true, Duration::from_secs(20))
                    .await
            );
        }
        let ca = server.server.ca_pem().to_string();
        let east = server.identity("east").unwrap();
        let get = |path: &'static str| {
            let (ca, east) = (ca.clone(), &east);
            async move {
                raw::get(server.gateway_addr, &ca, east, path)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(get("/clusters/east/version").await.0, 200);
        let (west, body) = get("/clusters/west/version").await;
        let (nowhere, _) = get("/clusters/nowhere/version").await;
        let (kapis, _) = get("/api/clusters/west/v1/namespaces").await;
        // A path without a cluster: a bound certificate's own cluster; an
        // unbound one names none, so it is not found.
        let (plain, plain_body) = get("/version").await;
        let plain_body = String::from_utf8_lossy(&plain_body).to_string();
        if bound {
            assert_eq!(plain, 200, "{plain_body}");
            assert!(plain_body.contains("gitVersion"), "{plain_body}");
        } else {
            assert_eq!(plain, 404, "{plain_body}");
        }
        if bound {
            for (s, what) in [
                (west, "west"),
                (nowhere, "an unknown cluster"),
                (kapis, "west (KubeSphere form)"),
            ] {
                assert_eq!(s, 403, "east's certificate reached {what}");
            }
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                (v["kind"].as_str(), v["reason"].as_str()),
                (Some("Status"), Some("Forbidden"))
            );
            eprintln!(
                "bound client certificates: east's kubeconfig got 403 for west and for an unknown cluster: {}",
                v["message"]
            );
        } else {
            assert_eq!((west, nowhere, kapis), (200, 404, 200));
            eprintln!("unbound (the default): east's kubeconfig reaches west too (200)");
        }
        for a in agents {
            a.stop().await;
        }
    }
}

// === SSH: deadlines, garbage, floods ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_ssh_connections_are_cut_at_the_deadline() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(2);
    let cluster = "deadline";
    let Tunnel { server, agent, .. } = tunnel(
        dir.path(),
        cluster,
        env.echo.upstream(UPSTREAM_KS_APISERVER, None),
        |c| c.ssh_auth_timeout = deadline,
    )
    .await;
    let ssh = server.ssh_addr;
    let limit = Duration::from_secs(10);
    let bound = deadline + Duration::from_millis(1500);

    // Half-open: connect, send nothing.
    let silent = (0..20).map(|_| async {
        let mut s = TcpStream::connect(ssh).await.unwrap();
        until_closed(&mut s, limit).await
    });
    // A version line, then nothing (stuck before key exchange completes).
    let stuck = async {
        let mut s = TcpStream::connect(ssh).await.unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        until_closed(&mut s, limit).await
    };
    // A version line dripped one byte every 300 ms.
    let drip = async {
        let mut s = TcpStream::connect(ssh).await.unwrap();
        let start = Instant::now();
        for b in b"SSH-2.0-drip-drip-drip-drip-drip-drip-drip-drip-drip\r\n" {
            if s.write_all(&[*b]).await.is_err() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (_, closed) = until_closed(&mut s, limit).await;
        start
            .elapsed()
            .min(closed.map_or(limit, |c| c + start.elapsed()))
    };
    // Garbage instead of a version line.
    let garbage = async {
        let mut s = TcpStream::connect(ssh).await.unwrap();
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = s.write_all(&junk).await;
        until_closed(&mut s, limit).await
    };
    let (silent, stuck, drip, garbage) =
        tokio::join!(futures::future::join_all(silent), stuck, drip, garbage);
    let silent_max = silent
        .iter()
        .map(|(_, c)| c.expect("a half-open connection was held for 10s"))
        .max()
        .unwrap();
    let stuck = stuck.1.expect("a stalled handshake was held for 10s");
    let garbage = garbage.1.expect("a garbage connection was held for 10s");
    assert!(silent_max <= bound, "{silent_max:?}");
    assert!(stuck <= bound, "{stuck:?}");
    assert!(drip <= bound, "{drip:?}");
    assert!(garbage <= bound, "{garbage:?}");
    // The authenticated agent is well past the deadline and still connected.
    assert!(server.server.registry().is_connected(cluster));
    assert!(matches!(
        *agent.agent.state().borrow(),
        AgentState::Connected { .. }
    ));
    eprintln!(
        "ssh auth deadline {deadline:?}: 20 half-open connections cut by {silent_max:.2?}, a stalled \
         handshake at {stuck:.2?}, a dripped version line at {drip:.2?}, garbage at {garbage:.2?}; \
         the authenticated agent stayed"
    );
}

/// The agents' WebSocket port passes the same intake as raw SSH: one
/// deadline covers the TLS and WebSocket handshakes and SSH authentication,
/// so a peer that stalls at any step is cut, and a port that is not spoken
/// to properly is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_websocket_connections_are_cut_at_the_deadline() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(2);
    let cluster = "ws-deadline";
    let Tunnel { server, agent, .. } = tunnel(
        dir.path(),
        cluster,
        env.echo.upstream(UPSTREAM_KS_APISERVER, None),
        |c| c.ssh_auth_timeout = deadline,
    )
    .await;
    let ws = server.ws_addr;
    let limit = Duration::from_secs(10);
    let bound = deadline + Duration::from_millis(1500);
    let upgrade = format!(
        "GET / HTTP/1.1\r\nHost: {ws}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {}\r\n\r\n",
        tower_proto::transport::WEBSOCKET_SUBPROTOCOL
    );
    let case = |first: Vec<u8>, drip: bool| async move {
        let mut s = TcpStream::connect(ws).await.unwrap();
        let start = Instant::now();
        if drip {
            for b in first {
                if s.write_all(&[b]).await.is_err() {
                    return Some(start.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } else {
            let _ = s.write_all(&first).await;
        }
        until_closed(&mut s, limit).await.1.map(|_| start.elapsed())
    };
    let (silent, tls_stall, dripped, upgraded, garbage) = tokio::join!(
        futures::future::join_all((0..10).map(|_| case(Vec::new(), false))),
        // The start of a TLS record, then nothing.
        case(vec![0x16, 0x03, 0x01], false),
        // The upgrade request, one byte every 100 ms.
        case(upgrade.clone().into_bytes(), true),
        // A complete upgrade, then no SSH at all.
        case(upgrade.clone().into_bytes(), false),
        // Not HTTP.
        case(
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            false
        ),
    );
    for (what, took) in silent.into_iter().map(|t| ("silent", t)).chain([
        ("a stalled TLS handshake", tls_stall),
        ("a dripped upgrade", dripped),
        ("an upgrade without SSH", upgraded),
        ("garbage", garbage),
    ]) {
        let took = took.unwrap_or_else(|| panic!("{what} was held for {limit:?}"));
        assert!(took <= bound, "{what}: closed after {took:?}");
    }
    assert!(server.server.registry().is_connected(cluster));
    assert!(matches!(
        *agent.agent.state().borrow(),
        AgentState::Connected { .. }
    ));
}

/// The real server binary (default limits: 256 unauthenticated connections,
/// 32 per source, 20 s to authenticate) flooded from 12 source addresses with
/// half-open, garbage and churning connections: its descriptors stay bounded,
/// a legitimate agent still gets in within seconds, and everything returns to
/// baseline when the flood stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_flood_keeps_resources_bounded_and_agents_get_in() {
    let _exclusive = MEASURE.write().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("state"), &dir.path().join("server.log"))
        .await
        .unwrap();
    let ssh = server.ssh_addr;
    let cluster = "flooded";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, server.mint(cluster, None).unwrap().encode()).unwrap();
    let id = server.identity(cluster).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = server.fds();

    let stop = CancellationToken::new();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for source in 2..14u8 {
        let stop = stop.clone();
        let attempts = attempts.clone();
        flooders.push(tokio::spawn(async move {
            // Half-open connections, kept up to 40 per source and churned.
            let mut held = std::collections::VecDeque::new();
            for i in 0..400 {
                if stop.is_cancelled() {
                    break;
                }
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut s) = connect_from([127, 0, 0, source], ssh).await {
                    if i % 3 == 0 {
                        let _ = s.write_all(b"\x00\xffnot ssh at all\r\n").await;
                    } else if i % 3 == 1 {
                        let _ = s.write_all(b"SSH-2.0-").await;
                    }
                    held.push_back(s);
                    if held.len() > 40 {
                        held.pop_front();
                    }
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            held.len()
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut peak = server.fds();
    // A legitimate agent arrives in the middle of the flood.
    let started = Instant::now();
    let _agent = env
        .on_member()
        .agent_process(&token_file, &dir.path().join("agent.log"))
        .unwrap();
    let mut got_in = None;
    while started.elapsed() < Duration::from_secs(20) {
        peak = peak.max(server.fds());
        if let Ok(Ok((200, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            raw::get(
                server.gateway_addr,
                server.ca_pem(),
                &id,
                &format!("/clusters/{cluster}/version"),
            ),
        )
        .await
        {
            got_in = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got_in = got_in.unwrap_or_else(|| {
        let keep = std::env::temp_dir().join("tower-flood-failure");
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(dir.path().join("agent.log"), keep.join("agent.log"));
        let _ = std::fs::copy(&server.log, keep.join("server.log"));
        panic!(
            "a legitimate agent could not get in during the flood (logs copied to {}); agent \
             log:\n{}",
            keep.display(),
            testbed::log_tail(&dir.path().join("agent.log"), 15),
        )
    });
    for _ in 0..20 {
        peak = peak.max(server.fds());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for f in flooders {
        f.await.unwrap();
    }
    let sent = attempts.load(std::sync::atomic::Ordering::Relaxed);
    // Bounded: the unauthenticated cap, the agent's connection, and slack.
    assert!(
        peak <= baseline + 256 + 32,
        "server descriptors peaked at {peak} (baseline {baseline})"
    );
    assert!(got_in <= Duration::from_secs(10), "{got_in:?}");
    // The flood's connections are gone once it stops.
    let settle = Instant::now();
    let mut now = server.fds();
    while settle.elapsed() < Duration::from_secs(10) && now > baseline + 8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = server.fds();
    }
    assert!(
        now <= baseline + 8,
        "server descriptors {now} after the flood (baseline {baseline})"
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", server.process.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "ssh flood: {sent} connection attempts from 12 sources; server fds baseline {baseline}, \
         peak {peak}, {now} after ({:.2?} to settle); a legitimate agent was serving {got_in:.2?} \
         after it started; server {rss}",
        settle.elapsed()
    );
}

// === SSH: auth abuse ===

/// OpenSSH client settings shared by the auth tests.
struct SshClient {
    known_hosts: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl SshClient {
    fn new(server: &TowerServer, dir: &Path) -> Self {
        let host_key = std::fs::read_to_string(fixture::host_key_file(&server.state_dir)).unwrap();
        let public = tower_certs::HostKey::from_openssh(&host_key)
            .unwrap()
            .public_key()
            .to_openssh()
            .unwrap();
        let known_hosts = dir.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{} {public}\n", server.ssh_addr.port()),
        )
        .unwrap();
        Self {
            known_hosts,
            dir: dir.to_path_buf(),
            port: server.ssh_addr.port(),
        }
    }

    fn command(&self, user: &str, password: &str, source: &str) -> tokio::process::Command {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cred = self.dir.join(format!("cred-{n}"));
        let askpass = self.dir.join(format!("askpass-{n}.sh"));
        std::fs::write(&cred, password).unwrap();
        std::fs::write(&askpass, format!("#!/bin/sh\ncat '{}'\n", cred.display())).unwrap();
        std::fs::set_permissions(
            &askpass,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.args(["-N", "-T", "-F", "/dev/null", "-b", source])
            .args([
                "-o",
                &format!("UserKnownHostsFile={}", self.known_hosts.display()),
            ])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=no"])
            .args([
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "PubkeyAuthentication=no",
            ])
            .args(["-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10"])
            .args(["-p", &self.port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        ssh
    }

    /// Runs a login that must be refused; returns its stderr and duration.
    async fn refused(&self, user: &str, password: &str, source: &str) -> (String, Duration) {
        let start = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            self.command(user, password, source).output(),
        )
        .await
        .expect("ssh hung")
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(255), "login was not refused: {err}");
        (err, start.elapsed())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_rate_limited_per_source() {
    let _shared = MEASURE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TowerServer::start(&dir.path().join("server"))
        .await
        .unwrap();
    let cluster = "bruteforce";
    let token = server.mint(cluster, None).unwrap();
    let good = token.credential().expose().to_string();
    let ssh = SshClient::new(&server, dir.path());

    // Ten wrong guesses from 127.0.0.3.
    let mut slowest_wrong = Duration::ZERO;
    let mut fastest_wrong = Duration::MAX;
    for i in 0..10 {
        let guess = format!("{}:guess-{i}-{}", token.claims.id, "x".repeat(40));
        let (err, took) = ssh.refused(cluster, &guess, "127.0.0.3").await;
        assert!(err.contains("Permission denied"), "{err}");
        slowest_wrong = slowest_wrong.max(took);
        fastest_wrong = fastest_wrong.min(took);
    }
    // Now even the right credential is refused from that source…
    let (err, blocked_took) = ssh.refused(cluster, &good, "127.0.0.3").await;
    assert!(err.contains("Permission denied"), "{err}");
    assert!(server.server.registry().get(cluster).is_none());
    // …and looks exactly like any refusal, while another source gets in.
    let mut ok = ssh.command(cluster, &good, "127.0.0.4").spawn().unwrap();
    let start = Instant::now();
    while server.server.registry().get(cluster).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the right credential from another source was refused"
        );
        if let Ok(Some(status)) = ok.try_wait() {
            panic!("ssh from 127.0.0.4 exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = ok.kill().await;
    if let Some(log) = fixture::log_file() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(text.contains("too many failures from this source"));
    }
    eprintln!(
        "brute force: 10 wrong guesses from one source each took {fastest_wrong:.2?}..{slowest_wrong:.2?} \
         (rejections are held to 300 ms); then the right credential from that source was refused \
         like any guess ({blocked_took:.2?}), and accepted from another source in {:.2?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_tell_an_anonymous_peer_nothing() {
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(2);
    let server = TowerServer::start_configured(&dir.path().join("server"), |c| {
        c.ssh_auth_timeout = deadline;
    })
    .await
    .unwrap();
    let valid = server.mint("known", None).unwrap();
    let expired = server.mint("stale", Some(Duration::ZERO)).unwrap();
    let revoked = server.mint("gone", None).unwrap();
    server.revoke("gone").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ssh = SshClient::new(&server, dir.path());
    let wrong = |id: &str| format!("{id}:{}", tower_proto::Secret::generate().expose());
    let cases = [
        ("nobody", wrong("0123456789ab")),
        ("known", wrong(&valid.claims.id)),
        ("stale", wrong(&expired.claims.id)),
        ("gone", wrong(&revoked.claims.id)),
        ("known", "no-id-just-a-secret".to_string()),
    ];
    let mut answers = HashSet::new();
    for (i, (user, password)) in cases.iter().enumerate() {
        // Distinct sources, so the rate limit does not colour the answers.
        let source = format!("127.0.0.{}", 20 + i);
        let (err, _) = ssh.refused(user, password, &source).await;
        answers.insert(err.replace(&format!("{user}@"), "USER@"));
    }
    assert_eq!(answers.len(), 1, "refusals differ: {answers:?}");

    // Holding the right secret of an expired token: let in only far enough to
    // read the reason, then cut at the deadline even if it never asks.
    let start = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        ssh.command("stale", expired.credential().expose(), "127.0.0.30")
            .output(),
    )
    .await
    .expect("an expired-token holder was held for 20s")
    .unwrap();
    let lingered = start.elapsed();
    assert!(
        lingered <= deadline + Duration::from_secs(2),
        "{lingered:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.server.registry().get("stale").is_none());

    // The real agent learns exactly why, in its log.
    let token_file = dir.path().join("stale.token");
    std::fs::write(&token_file, expired.encode()).unwrap();
    let log = dir.path().join("agent-stale.log");
    let _agent = env.on_member().agent_process(&token_file, &log).unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("token expired")
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the agent never logged why: {}",
            testbed::log_tail(&log, 10)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reason = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .find(|l| l.contains("token expired"))
        .unwrap()
        .to_string();
    eprintln!(
        "refusals: 5 wrong credentials (unknown cluster, wrong secret, expired, revoked, bare) got \
         the same answer: {:?}; an expired-token holder was out after {lingered:.2?}; the agent \
         logged: {}",
        answers.iter().next().unwrap().trim(),
        reason.trim()
    );
}

// === leaks ===

/// Counts that must return to where they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    fds: usize,
    server_tasks: usize,
    channels: usize,
    sessions: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_return_to_baseline_after_heavy_use() {
    const REQUESTS: usize = 10_000;
    const H1_REQUESTS: usize = 200;
    const WATCH_CYCLES: usize = 1_000;
    const RECONNECTS: usize = 100;
    let _exclusive = MEASURE.write().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // The server runs on a runtime of its own, so its tasks are counted alone.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let state = dir.path().join("server");
    let server = server_rt
        .spawn(async move { TowerServer::start(&state).await })
        .await
        .unwrap()
        .unwrap();
    let cluster = "leaky";
    let token = TokenSource::Literal(server.mint(cluster, None).unwrap().encode());
    let mut agent = TowerAgent::start(token.clone(), &env.member, &env.sa_token_file).unwrap();
    assert!(
        server
            .wait_connected(cluster, true, Duration::from_secs(20))
            .await
    );
    let gw = server.gateway_addr;
    let ca = server.server.ca_pem().to_string();
    let id = server.identity(cluster).unwrap();
    let version = format!("/clusters/{cluster}/version");
    let watch = format!("/clusters/{cluster}/api/v1/namespaces?watch=true");
    let measure = || {
        let session = server.server.registry().get(cluster);
        Resources {
            fds: fd_count(None),
            server_tasks: server_rt.metrics().num_alive_tasks(),
            channels: session.map_or(0, |s| s.open_channels()),
            sessions: server.server.registry().all().len(),
        }
    };
    // The same light use before the baseline and before the final count.
    let light_use = || async {
        let mut h2 = gateway_h2(gw, &ca, &id).await.unwrap();
        for _ in 0..10 {
            let r = h2.send_request(req_h2(&version)).await.unwrap();
            assert_eq!(r.status(), 200);
            r.into_body().collect().await.unwrap();
        }
    };
    let settle = || async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    };
    light_use().await;
    settle().await;
    let baseline = measure();

    // Requests: one HTTP/2 connection, 64 in flight; and fresh HTTP/1.1 connections.
    let phase = Instant::now();
    let h2 = gateway_h2(gw, &ca, &id).await.unwrap();
    let statuses = futures::stream::iter(0..REQUESTS)
        .map(|_| {
            let mut h2 = h2.clone();
            let version = version.clone();
            async move {
                let r = h2.send_request(req_h2(&version)).await.unwrap();
                let s = r.status().as_u16();
                r.into_body().collect().await.unwrap();
                s
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));
    for _ in 0..H1_REQUESTS {
        let (s, _) = raw::get(gw, &ca, &id, &version).await.unwrap();
        assert_eq!(s, 200);
    }
    let requests_took = phase.elapsed();

    // Watches opened, read until their first event, and dropped mid-stream.
    let phase = Instant::now();
    futures::stream::iter(0..WATCH_CYCLES)
        .map(|i| {
            let mut h2 = h2.clone();
            let (watch, ca, id) = (watch.clone(), ca.clone(), &id);
            async move {
                let resp = if i % 10 == 0 {
                    // Every tenth over its own HTTP/1.1 connection, closed with it.
                    let mut h1 = gateway_h1(gw, &ca, id).await.unwrap();
                    h1.send_request(req(&watch)).await.unwrap()
                } else {
                    h2.send_request(req_h2(&watch)).await.unwrap()
                };
                assert_eq!(resp.status(), 200);
                let mut body = resp.into_body();
                let mut seen = Vec::new();
                while !String::from_utf8_lossy(&seen).contains("ADDED") {
                    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                        .await
                        .expect("a watch went silent")
                        .unwrap()
                        .unwrap();
                    if let Ok(d) = frame.into_data() {
                        seen.extend_from_slice(&d);
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    drop(h2);
    let watches_took = phase.elapsed();

    // Agent reconnects: graceful stops, and every tenth an abrupt end.
    let phase = Instant::now();
    for i in 0..RECONNECTS {
        if i % 10 == 0 {
            agent.kill();
        } else {
            agent.stop().await;
        }
        assert!(
            server
                .wait_connected(cluster, false, Duration::from_secs(10))
                .await,
            "reconnect {i}: the old session lingered"
        );
        agent = TowerAgent::start(token.clone(), &env.member, &env.sa_token_file).unwrap();
        assert!(
            server
                .wait_connected(cluster, true, Duration::from_secs(10))
                .await,
            "reconnect {i}: the agent did not come back"
        );
    }
    let reconnects_took = phase.elapsed();

    light_use().await;
    let wait = Instant::now();
    let mut after = measure();
    while wait.elapsed() < Duration::from_secs(15)
        && (after.fds > baseline.fds
            || after.server_tasks > baseline.server_tasks
            || after.channels != baseline.channels
            || after.sessions != baseline.sessions)
    {
        settle().await;
        after = measure();
    }
    eprintln!(
        "leaks: {REQUESTS} HTTP/2 + {H1_REQUESTS} HTTP/1.1 requests in {requests_took:.2?}, \
         {WATCH_CYCLES} watch open/close cycles in {watches_took:.2?}, {RECONNECTS} agent \
         reconnects in {reconnects_took:.2?}; baseline {baseline:?}, after {after:?} \
         ({:.2?} to settle; whole test {:.2?})",
        wait.elapsed(),
        started.elapsed()
    );
    assert!(after.fds <= baseline.fds, "descriptors leaked");
    assert!(after.server_tasks <= baseline.server_tasks, "tasks leaked");
    assert_eq!(after.channels, baseline.channels, "tunnel channels leaked");
    assert_eq!(after.sessions, baseline.sessions, "sessions leaked");
    agent.stop().await;
    drop(server);
    server_rt.shutdown_background();
}

// === secrets ===

/// Every `window`-byte slice of `secret` (or the whole of it when shorter).
fn windows(secret: &[u8], window: usize) -> Vec<Vec<u8>> {
    if secret.len() <= window {
        return vec![secret.to_vec()];
    }
    secret.windows(window).map(<[u8]>::to_vec).collect()
}

/// The base64 body lines of a PEM or OpenSSH private key, without the first
/// line (which carries the algorithm, not key bytes).
fn key_lines(pem: &str) -> Vec<Vec<u8>> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        .skip(1)
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// A full run — a server process and an in-process one, agents by file and by
/// literal, a caller credential, wrong, expired and revoked tokens, towerctl —
/// leaves no byte of any secret in any log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_secret() {
    use base64::Engine;
    let _shared = MEASURE.read().await;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |what: &str, bytes: Vec<Vec<u8>>| {
        for b in bytes {
            needles.push((what.to_string(), b));
        }
    };
    const W: usize = 16;
    let caller_secret = format!("caller-{}", tower_proto::Secret::generate().expose());
    add("caller bearer token", windows(caller_secret.as_bytes(), W));
    let sa_signature = env.sa_token.rsplit('.').next().unwrap();
    add(
        "service-account token",
        vec![env.sa_token.as_bytes().to_vec()],
    );
    add("service-account token", windows(sa_signature.as_bytes(), W));

    // 1. The server binary, the agent binary and towerctl on one state dir.
    let state = dir.path().join("process-state");
    let server = ServerProcess::start(&state, &dir.path().join("server.log"))
        .await
        .unwrap();
    let towerctl = fixture::workspace_bin("tower-server", "towerctl").unwrap();
    let mut towerctl_stderr = String::new();
    let mut run_towerctl = |args: &[&str]| {
        let out = std::process::Command::new(&towerctl)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap();
        towerctl_stderr.push_str(&String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "towerctl {args:?}: {towerctl_stderr}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let addr = server.ssh_addr.to_string();
    let minted = run_towerctl(&["token", "vault", "--server", &addr, "--ttl", "1h"]);
    let minted = tower_proto::JoinToken::parse(&minted).unwrap();
    let listed = run_towerctl(&["tokens"]);
    run_towerctl(&["kubeconfig", "vault", "--gateway-url", "https://127.0.0.1"]);
    let token_file = dir.path().join("vault.token");
    std::fs::write(&token_file, minted.encode()).unwrap();
    let _agent = env
        .on_member()
        .agent_process(&token_file, &dir.path().join("agent-vault.log"))
        .unwrap();
    let id = server.identity("vault").unwrap();
    let ca = server.ca_pem().to_string();
    let start = Instant::now();
    loop {
        let mut h1 = match gateway_h1(server.gateway_addr, &ca, &id).await {
            Ok(h1) => h1,
            Err(e) => panic!("{e:#}"),
        };
        let mut r = req("/clusters/vault/api/v1/namespaces/default");
        r.headers_mut().insert(
            "authorization",
            format!("Bearer {caller_secret}").parse().unwrap(),
        );
        if h1.send_request(r).await.unwrap().status() == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "vault never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A wrong secret and an expired token, through the agent binary.
    let mut wrong = server.mint("vault", None).unwrap();
    wrong.secret = tower_proto::Secret::generate();
    let expired = server.mint("vault-old", Some(Duration::ZERO)).unwrap();
    let mut refused = Vec::new();
    for (name, t) in [("wrong", &wrong), ("expired", &expired)] {
        let f = dir.path().join(format!("{name}.token"));
        std::fs::write(&f, t.encode()).unwrap();
        let log = dir.path().join(format!("agent-{name}.log"));
        refused.push(env.on_member().agent_process(&f, &log).unwrap());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    run_towerctl(&["revoke", "vault"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(refused);
    for t in [&minted, &wrong, &expired] {
        add(
            "join-token secret",
            windows(t.secret.expose().as_bytes(), W),
        );
        add(
            "join-token credential",
            vec![t.credential().expose().as_bytes().to_vec()],
        );
    }
    assert!(!listed.contains(minted.secret.expose()));

    // 2. In-process: a server and an agent reading its token from a file.
    let inproc = TowerServer::start(&dir.path().join("inproc"))
        .await
        .unwrap();
    let t = inproc.mint("ledger", None).unwrap();
    let f = dir.path().join("ledger.token");
    std::fs::write(&f, t.encode()).unwrap();
    let agent = TowerAgent::start(TokenSource::File(f), &env.member, &env.sa_token_file).unwrap();
    assert!(
        inproc
            .wait_connected("ledger", true, Duration::from_secs(20))
            .await
    );
    let iid = inproc.identity("ledger").unwrap();
    let (s, _) = raw::get(
        inproc.gateway_addr,
        inproc.server.ca_pem(),
        &iid,
        "/clusters/ledger/api/v1/namespaces",
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    inproc.revoke("ledger").unwrap();
    assert!(
        inproc
            .wait_connected("ledger", false, Duration::from_secs(5))
            .await
    );
    agent.stop().await;
    add(
        "join-token secret",
        windows(t.secret.expose().as_bytes(), W),
    );

    // Keys: host keys (the raw Ed25519 seed in the usual encodings, and the
    // file's lines), CAs, the kubeconfig client keys.
    for st in [&state, &inproc.state_dir] {
        let host = std::fs::read_to_string(fixture::host_key_file(st)).unwrap();
        add("SSH host key", key_lines(&host));
        let key = tower_certs::HostKey::from_openssh(&host).unwrap();
        let seed = key
            .private_key()
            .key_data()
            .ed25519()
            .unwrap()
            .private
            .to_bytes();
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        add("SSH host key", windows(hex.as_bytes(), 2 * W));
        for enc in [
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(seed),
        ] {
            add("SSH host key", windows(enc.as_bytes(), W + 8));
        }
        add(
            "CA key",
            key_lines(&std::fs::read_to_string(st.join("ca.key")).unwrap()),
        );
    }
    add("client key", key_lines(&id.key_pem));
    add("client key", key_lines(&iid.key_pem));

    // Everything logged: this process (server and agents, debug level), the
    // binaries' logs, towerctl's stderr.
    let mut logs: Vec<(String, Vec<u8>)> =
        vec![("towerctl stderr".into(), towerctl_stderr.into_bytes())];
    if let Some(log) = fixture::log_file() {
        logs.push((log.display().to_string(), std::fs::read(&log).unwrap()));
    }
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            logs.push((
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    // One pass per log: index the needles by their first 8 bytes.
    let mut index: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    for (i, (_, n)) in needles.iter().enumerate() {
        assert!(n.len() >= 8);
        let key = u64::from_le_bytes(n[..8].try_into().unwrap());
        index.entry(key).or_default().push(i);
    }
    let mut scanned = 0;
    for (name, text) in &logs {
        assert!(
            !text.is_empty() || name.contains("towerctl"),
            "{name} is empty"
        );
        scanned += text.len();
        for at in 0..text.len().saturating_sub(7) {
            let key = u64::from_le_bytes(text[at..at + 8].try_into().unwrap());
            let Some(candidates) = index.get(&key) else {
                continue;
            };
            for &i in candidates {
                let (what, needle) = &needles[i];
                if text[at..].starts_with(needle) {
                    let from = at.saturating_sub(80);
                    let to = (at + needle.len() + 80).min(text.len());
                    panic!(
                        "{name} holds part of a {what}: …{}…",
                        String::from_utf8_lossy(&text[from..to])
                    );
                }
            }
        }
    }
    eprintln!(
        "secrets: scanned {} logs ({} KiB) for {} needles (join-token secrets and credentials, a \
         caller's bearer token, the service-account token, host keys, CA and client keys): none found",
        logs.len(),
        scanned / 1024,
        needles.len()
    );
}
