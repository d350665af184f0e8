//! exec, logs, cp and port-forward through the tunnel, against a member whose node's kubelet
//! is kwok ([`FakeNode`]): kubectl 1.32 and 1.35, each over WebSocket and over SPDY, directly
//! and through the tunnel, must give identical results, and the agent's death must end a
//! stream within a second.
//!
//! One environment is shared: a member with a fake node and pod `box`, the real `tower-server`
//! and `tower-agent` binaries, and the port-forward target (`fixture::exchange`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tower_tests::fixture::exchange::{PortForward, exchange, pattern, spawn_exchange_server};
use tower_tests::fixture::{self, ProcessSettings, ServerProcess, agent_credential};
use tower_tests::testbed::{self, ControlPlane, FakeNode, Process, Testbed};

const CLUSTER: &str = "ithilien";
const POD: &str = "box";
const MB: usize = 1_000_000;

struct Env {
    _bed: Testbed,
    member: ControlPlane,
    node: FakeNode,
    /// The port-forward target.
    target: SocketAddr,
    server: ServerProcess,
    _agent: Process,
    /// Through the tunnel, with the kubeconfig the server synthesizes.
    tunnel: PathBuf,
    sa_token_file: PathBuf,
    dir: tempfile::TempDir,
}

tower_tests::shared_env!(Env, "streaming", start_env);

async fn start_env() -> anyhow::Result<Env> {
    let started = Instant::now();
    let bed = fixture::start_logged_bed("tower-streaming.log").await?;
    let member = bed.cluster("member").await?;
    let target_addr = spawn_exchange_server().await?;
    let node = FakeNode::start(&member, target_addr).await?;
    node.pod(&member, "default", POD).await?;
    let dir = tempfile::tempdir()?;
    fixture::build_binaries().await?;
    let server = ServerProcess::start_with(
        &dir.path().join("state"),
        &dir.path().join("server.log"),
        ProcessSettings::Test,
    )
    .await?;
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await?;
    let agent = start_agent(&server, &member, &sa_token_file, dir.path(), CLUSTER).await?;
    let tunnel = server.kubeconfig_file(CLUSTER)?;
    eprintln!("streaming env ready in {:.2?}", started.elapsed());
    Ok(Env {
        _bed: bed,
        member,
        node,
        target: target_addr,
        server,
        _agent: agent,
        tunnel,
        sa_token_file,
        dir,
    })
}

/// Starts the real agent for `cluster` on the member and waits until the cluster answers.
async fn start_agent(
    server: &ServerProcess,
    member: &ControlPlane,
    sa_token_file: &Path,
    dir: &Path,
    cluster: &str,
) -> anyhow::Result<Process> {
    let token_file = dir.join(format!("{cluster}.token"));
    std::fs::write(&token_file, server.mint(cluster, None)?.encode())?;
    let log = dir.join(format!("agent-{cluster}.log"));
    let agent = fixture::spawn_agent_process(&token_file, member, sa_token_file, &log)?;
    let limit = Duration::from_secs(30);
    let waited = fixture::http::until_ok(
        server.gateway_addr,
        server.ca_pem(),
        &server.identity(cluster)?,
        &format!("/clusters/{cluster}/version"),
        limit,
    )
    .await;
    anyhow::ensure!(
        waited < limit,
        "{cluster} never answered; agent log:\n{}",
        testbed::log_tail(&log, 20)
    );
    Ok(agent)
}

// === the matrix: kubectl version × stream protocol × route ===

#[derive(Clone, Copy, Debug)]
struct Client {
    /// "1.32" or "1.35".
    version: &'static str,
    /// WebSocket (kubectl's default) or SPDY.
    websockets: bool,
}

const CLIENTS: [Client; 4] = [
    Client {
        version: "1.35",
        websockets: true,
    },
    Client {
        version: "1.35",
        websockets: false,
    },
    Client {
        version: "1.32",
        websockets: true,
    },
    Client {
        version: "1.32",
        websockets: false,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Direct,
    Tunnel,
}

impl Route {
    fn kubeconfig(self) -> &'static Path {
        match self {
            Route::Direct => env().member.admin_kubeconfig(),
            Route::Tunnel => env().tunnel.as_path(),
        }
    }
}

impl Client {
    fn bin(&self) -> PathBuf {
        match self.version {
            "1.35" => testbed::kubectl_bin(),
            _ => testbed::old_kubectl_bin(),
        }
    }

    fn command(&self, route: Route, args: &[&str]) -> tokio::process::Command {
        self.command_at(route.kubeconfig(), args)
    }

    /// kubectl with `kubeconfig` and this client's stream protocol.
    fn command_at(&self, kubeconfig: &Path, args: &[&str]) -> tokio::process::Command {
        let ws = if self.websockets { "true" } else { "false" };
        let mut cmd = tokio::process::Command::new(self.bin());
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                kubeconfig
                    .with_extension(format!("cache-{}", self.version))
                    .display()
            ))
            .args(args)
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", ws)
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", ws)
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl `args` with `stdin` to its end (at most 120 s).
    async fn run(&self, route: Route, args: &[&str], stdin: Option<&[u8]>) -> Outcome {
        let mut cmd = self.command(route, args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning kubectl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            // kwok passes no stdin EOF on, so the command reads a known length.
            pipe.write_all(input)
                .await
                .expect("writing kubectl's stdin");
        }
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} ({self:?}, {route:?}) hung for 120 s"))
            .expect("kubectl output");
        Outcome {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: without_websocket_noise(&String::from_utf8_lossy(&out.stderr)),
        }
    }
}

/// `stderr` without the line kubectl's WebSocket client logs now and then, directly as
/// through the tunnel, when a frame arrives for a stream it has already closed
/// (`websocket.go:…] Unknown stream id 1, discarding message`).
fn without_websocket_noise(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !(l.contains("websocket.go:") && l.contains("Unknown stream id")))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// What a kubectl run gave.
#[derive(Clone, PartialEq, Eq)]
struct Outcome {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.stdout.len() > 200 {
            format!(
                "<{} bytes, sha256 {}>",
                self.stdout.len(),
                sha256(&self.stdout)
            )
        } else {
            String::from_utf8_lossy(&self.stdout).into_owned()
        };
        f.debug_struct("Outcome")
            .field("code", &self.code)
            .field("stdout", &shown)
            .field("stderr", &self.stderr)
            .finish()
    }
}

/// Runs `check` for every client over both routes; asserts the tunnel's result equals the
/// direct one for each client, and returns the direct results.
async fn same_both_ways<T, F, Fut>(what: &str, mut check: F) -> Vec<(Client, T)>
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut(Client, Route) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = Vec::new();
    for client in CLIENTS {
        let started = Instant::now();
        let direct = check(client, Route::Direct).await;
        let direct_took = started.elapsed();
        let started = Instant::now();
        let tunnel = check(client, Route::Tunnel).await;
        eprintln!(
            "{what}: kubectl {} {}: direct {direct_took:.2?}, tunnel {:.2?}",
            client.version,
            if client.websockets {
                "WebSocket"
            } else {
                "SPDY"
            },
            started.elapsed()
        );
        assert_eq!(
            tunnel, direct,
            "{what} with kubectl {client:?}: the tunnel differs from direct"
        );
        out.push((client, direct));
    }
    out
}

fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === exec ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_matches_direct() {
    let _ = env();
    // stdin in, stdout and stderr apart.
    let results = same_both_ways("exec with stdin", |client, route| async move {
        client
            .run(
                route,
                &[
                    "exec",
                    "-i",
                    POD,
                    "--",
                    "sh",
                    "-c",
                    "head -c 12 | tr a-z A-Z; echo to-stderr >&2",
                ],
                Some(b"hello tunnel"),
            )
            .await
    })
    .await;
    for (client, got) in results {
        assert_eq!(got.code, Some(0), "{client:?}: {got:?}");
        assert_eq!(got.stdout, b"HELLO TUNNEL", "{client:?}: {got:?}");
        assert_eq!(got.stderr, "to-stderr\n", "{client:?}: {got:?}");
    }

    // 50 MB of output.
    let script = format!("yes tower-exec-stream | head -c {}", 50 * MB);
    let expected: Vec<u8> = b"tower-exec-stream\n"
        .iter()
        .copied()
        .cycle()
        .take(50 * MB)
        .collect();
    let expected = sha256(&expected);
    let results = same_both_ways("exec 50 MB", |client, route| {
        let script = script.clone();
        async move {
            let got = client
                .run(route, &["exec", POD, "--", "sh", "-c", &script], None)
                .await;
            (got.code, got.stdout.len(), sha256(&got.stdout), got.stderr)
        }
    })
    .await;
    for (client, (code, len, digest, stderr)) in results {
        assert_eq!(
            (code, len, digest.as_str(), stderr.as_str()),
            (Some(0), 50 * MB, expected.as_str(), ""),
            "{client:?}"
        );
    }

    // A failing command: kwok reports its exit as an internal error, the same both ways.
    let results = same_both_ways("exec exit 3", |client, route| async move {
        client
            .run(route, &["exec", POD, "--", "sh", "-c", "exit 3"], None)
            .await
    })
    .await;
    for (client, got) in results {
        assert_ne!(got.code, Some(0), "{client:?}: {got:?}");
        assert!(got.stderr.contains("exit status 3"), "{client:?}: {got:?}");
    }
}

// === logs ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_follow_match_direct() {
    let env = env();
    env.node.write_log("stdout", "first line").unwrap();
    env.node
        .write_log("stderr", "second line, from stderr")
        .unwrap();
    let expected = "first line\nsecond line, from stderr\n";
    // Logs are a plain streamed GET; the stream protocol does not matter.
    for client in [CLIENTS[0], CLIENTS[2]] {
        for route in [Route::Direct, Route::Tunnel] {
            let got = client.run(route, &["logs", POD], None).await;
            assert_eq!(got.code, Some(0), "{client:?} {route:?}: {got:?}");
            assert!(
                String::from_utf8_lossy(&got.stdout).starts_with(expected),
                "{client:?} {route:?}: {got:?}"
            );
            follow(env, client, route).await;
        }
    }
}

/// `logs -f`: lines written after it starts arrive while it runs.
async fn follow(env: &Env, client: Client, route: Route) {
    let mut cmd = client.command(route, &["logs", "-f", "--tail=1", POD]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning kubectl logs -f");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{client:?} {route:?}: logs -f showed nothing in 20 s"))
        .unwrap();
    assert!(
        first.is_some(),
        "{client:?} {route:?}: logs -f ended at once"
    );
    for i in 0..3 {
        let line = format!("followed {} {route:?} {i}", client.version);
        env.node.write_log("stdout", &line).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{client:?} {route:?}: {line:?} never arrived"))
            .unwrap();
        assert_eq!(got.as_deref(), Some(line.as_str()), "{client:?} {route:?}");
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "{client:?} {route:?}: logs -f ended"
    );
    child.kill().await.unwrap();
}

// === cp ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_matches_direct() {
    let env = env();
    let local = env.dir.path().join("cp-20mb.bin");
    let content = pattern(7, 20 * MB);
    std::fs::write(&local, &content).unwrap();
    let expected = sha256(&content);
    let local_str = local.display().to_string();
    let mut n = 0;
    same_both_ways("cp 20 MB each way", |client, route| {
        n += 1;
        let in_pod = env.node.work_dir().join(format!("cp-{n}"));
        std::fs::create_dir_all(&in_pod).unwrap();
        let back = env.dir.path().join(format!("cp-back-{n}.bin"));
        let local_str = local_str.clone();
        async move {
            let target = format!("{POD}:{}", in_pod.join("in.bin").display());
            let up = client.run(route, &["cp", &local_str, &target], None).await;
            let up_got = std::fs::read(in_pod.join("in.bin")).unwrap_or_default();
            let down = client
                .run(route, &["cp", &target, &back.display().to_string()], None)
                .await;
            let down_got = std::fs::read(&back).unwrap_or_default();
            (
                (up.code, up.stderr, up_got.len(), sha256(&up_got)),
                (down.code, down_got.len(), sha256(&down_got)),
            )
        }
    })
    .await
    .into_iter()
    .for_each(|(client, (up, down))| {
        assert_eq!(up.0, Some(0), "{client:?} cp to the pod: {up:?}");
        assert_eq!(
            (up.2, up.3.as_str()),
            (20 * MB, expected.as_str()),
            "{client:?}"
        );
        assert_eq!(
            down,
            (Some(0), 20 * MB, expected.clone()),
            "{client:?} cp from the pod"
        );
    });
}

// === port-forward ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_matches_direct() {
    let _ = env();
    same_both_ways("port-forward 20 MB each way", |client, route| async move {
        let forward = PortForward::spawn(port_forward_command(client, route.kubeconfig(), POD))
            .await
            .unwrap_or_else(|e| panic!("{client:?} {route:?}: {e:#}"));
        let got = exchange(forward.local, 20 * MB, Duration::from_secs(60)).await;
        drop(forward);
        got.map_err(|e| format!("{e:#}"))
    })
    .await
    .into_iter()
    .for_each(|(client, got)| {
        assert_eq!(got, Ok(true), "{client:?}: SHA-256 of what crossed");
    });
}

/// `kubectl port-forward --address=127.0.0.1 pod/<pod> :8080` for `client`.
fn port_forward_command(client: Client, kubeconfig: &Path, pod: &str) -> tokio::process::Command {
    let mut cmd = client.command_at(kubeconfig, &["port-forward", "--address=127.0.0.1"]);
    cmd.arg(format!("pod/{pod}")).arg(":8080");
    cmd
}

// === the agent goes away mid-stream ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_death_ends_exec_and_port_forward_within_a_second() {
    let env = env();
    // Direct, for comparison: what each client shows when the far end (here, the kubelet)
    // dies under its stream.
    let mut node = FakeNode::start(&env.member, env.target).await.unwrap();
    node.pod(&env.member, "default", "doomed").await.unwrap();
    let streams = start_streams(env.member.admin_kubeconfig(), "doomed").await;
    let killed = Instant::now();
    node.kill();
    let direct = end_streams(streams, killed, "direct, kubelet killed").await;

    for (signal, cluster) in [("TERM", "agent-term"), ("KILL", "agent-kill")] {
        let dir = env.dir.path();
        let mut agent = start_agent(&env.server, &env.member, &env.sa_token_file, dir, cluster)
            .await
            .unwrap();
        let kubeconfig = env.server.kubeconfig_file(cluster).unwrap();
        let streams = start_streams(&kubeconfig, POD).await;
        let sent = Instant::now();
        match signal {
            "TERM" => agent.terminate(),
            _ => agent.kill9(),
        }
        let ended = end_streams(streams, sent, &format!("agent SIG{signal}")).await;
        for ((what, took, error), (_, _, direct_error)) in ended.iter().zip(&direct) {
            assert!(
                *took <= Duration::from_secs(1),
                "agent SIG{signal}: {what} took {took:.2?} to end"
            );
            // Never a silent end where the client shows an error directly; a port-forward and
            // a WebSocket exec always end with one (directly, a WebSocket exec whose kubelet
            // dies ends with status 0 and no message; kubectl's SPDY exec does so whenever its
            // connection closes, direct or not).
            let must_fail = !direct_error.is_empty()
                || !what.contains("SPDY")
                || what.starts_with("port-forward");
            assert!(
                !(must_fail && error.is_empty()),
                "agent SIG{signal}: {what} ended with no error (directly: {direct_error:?})"
            );
        }
    }
}

/// An exec and a port-forward in flight on `pod`, for each client.
async fn start_streams(kubeconfig: &Path, pod: &'static str) -> Vec<Stream> {
    futures::future::join_all(CLIENTS.iter().flat_map(|&client| {
        [
            Box::pin(Stream::exec(client, kubeconfig.to_path_buf(), pod))
                as std::pin::Pin<Box<dyn std::future::Future<Output = Stream>>>,
            Box::pin(Stream::port_forward(client, kubeconfig.to_path_buf(), pod)),
        ]
    }))
    .await
}

/// Waits for every stream to end; returns what ended, after how long, with what error.
async fn end_streams(
    streams: Vec<Stream>,
    since: Instant,
    when: &str,
) -> Vec<(String, Duration, String)> {
    let ended = futures::future::join_all(streams.into_iter().map(|s| s.ended(since))).await;
    for (what, took, error) in &ended {
        eprintln!("{when}: {what} ended after {took:.2?}: {error:?}");
    }
    ended
}

/// A stream in flight through the tunnel, for the agent-death test.
enum Stream {
    /// `kubectl exec` printing a line every 100 ms.
    Exec {
        what: String,
        child: tokio::process::Child,
        stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    },
    /// `kubectl port-forward` and a connection through it in the middle of an exchange.
    PortForward {
        what: String,
        forward: PortForward,
        exchange: tokio::task::JoinHandle<anyhow::Result<bool>>,
    },
}

impl Stream {
    async fn exec(client: Client, kubeconfig: PathBuf, pod: &str) -> Stream {
        let script = "while :; do echo tick; sleep 0.1; done";
        let mut cmd = client.command_at(&kubeconfig, &["exec", pod, "--", "sh", "-c", script]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning kubectl exec");
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let tick = tokio::time::timeout(Duration::from_secs(20), stdout.next_line()).await;
        assert!(
            matches!(tick, Ok(Ok(Some(ref l))) if l == "tick"),
            "{client:?}: exec did not start: {tick:?}"
        );
        Stream::Exec {
            what: format!("exec ({} {})", client.version, proto(client)),
            child,
            stdout,
        }
    }

    async fn port_forward(client: Client, kubeconfig: PathBuf, pod: &str) -> Stream {
        let forward = PortForward::spawn(port_forward_command(client, &kubeconfig, pod))
            .await
            .unwrap_or_else(|e| panic!("{client:?}: {e:#}"));
        // Far more than it can move before the agent goes: it is mid-transfer then.
        let exchange = tokio::spawn(exchange(forward.local, 4_000 * MB, Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        Stream::PortForward {
            what: format!("port-forward ({} {})", client.version, proto(client)),
            forward,
            exchange,
        }
    }

    /// How long after `since` the stream ended, and the error its user saw.
    async fn ended(self, since: Instant) -> (String, Duration, String) {
        let limit = Duration::from_secs(10);
        match self {
            Stream::Exec {
                what,
                mut child,
                mut stdout,
            } => {
                let drained = async { while let Ok(Some(_)) = stdout.next_line().await {} };
                let status = tokio::time::timeout(limit, async {
                    drained.await;
                    child.wait().await
                })
                .await;
                let took = since.elapsed();
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut stderr))
                            .await;
                }
                let error = match status {
                    Err(_) => format!("still running after {limit:?}"),
                    Ok(Ok(s)) if s.success() => String::new(),
                    Ok(Ok(s)) => format!("{s}: {}", stderr.trim()),
                    Ok(Err(e)) => e.to_string(),
                };
                (what, took, error)
            }
            Stream::PortForward {
                what,
                mut forward,
                exchange,
            } => {
                let got = tokio::time::timeout(limit, exchange).await;
                let took = since.elapsed();
                let exited =
                    tokio::time::timeout(Duration::from_secs(2), forward.child.wait()).await;
                let mut stderr = String::new();
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    forward.stderr.read_to_string(&mut stderr),
                )
                .await;
                let error = match got {
                    Err(_) => format!("the connection was still open after {limit:?}"),
                    // 4 GB cannot have crossed: a finished exchange is a failure.
                    Ok(Ok(Ok(_))) => String::new(),
                    Ok(Ok(Err(e))) => format!(
                        "connection: {e:#}; kubectl {}: {}",
                        match exited {
                            Ok(Ok(s)) => s.to_string(),
                            _ => "still running".into(),
                        },
                        stderr.trim()
                    ),
                    Ok(Err(e)) => format!("exchange task: {e}"),
                };
                (what, took, error)
            }
        }
    }
}

fn proto(client: Client) -> &'static str {
    if client.websockets {
        "WebSocket"
    } else {
        "SPDY"
    }
}
