//! The agent's transports with the real binaries against the test bed: SSH
//! inside a WebSocket (`ws://`, `wss://`) on the server's agent port, and
//! through a real HTTP CONNECT proxy (tinyproxy, from Debian's packages) with
//! and without proxy auth, and the errors when a proxy or a certificate says
//! no.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tower_tests::fixture::{
    self, ProcessSettings, ServerProcess, agent_credential, eventually, kubectl, workspace_bin,
};
use tower_tests::testbed::{ControlPlane, Process, Testbed};

/// Each test's agents serve their own cluster, so that tests running at
/// once do not replace each other's sessions.
const WS_CLUSTER: &str = "gondor";
const PROXY_CLUSTER: &str = "rohan";

struct Env {
    _bed: Testbed,
    member: ControlPlane,
    server: ServerProcess,
    ws_addr: SocketAddr,
    sa_token_file: PathBuf,
    dir: tempfile::TempDir,
}

tower_tests::shared_env!(Env, "transport", start_env);

async fn start_env() -> anyhow::Result<Env> {
    let bed = fixture::start_logged_bed("tower-e2e.log").await?;
    let member = bed.cluster("member").await?;
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start_env(
        &dir.path().join("server"),
        &dir.path().join("server.log"),
        ProcessSettings::Test,
        &[("TOWER_WEBSOCKET_LISTEN", "127.0.0.1:0")],
    )
    .await?;
    let ws_port = printed_port(&server.log, "websocket=")
        .ok_or_else(|| anyhow::anyhow!("tower-server printed no websocket port"))?;
    let (_, sa_token_file) = agent_credential(&member, dir.path()).await?;
    for cluster in [WS_CLUSTER, PROXY_CLUSTER] {
        let token = server.mint(cluster, None)?.encode();
        std::fs::write(dir.path().join(format!("{cluster}.join-token")), token)?;
    }
    Ok(Env {
        _bed: bed,
        member,
        server,
        ws_addr: SocketAddr::from(([127, 0, 0, 1], ws_port)),
        sa_token_file,
        dir,
    })
}

/// The port after `key` on the server's `--print-ports` line.
fn printed_port(log: &Path, key: &str) -> Option<u16> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.starts_with("ssh="))?;
    line.split(' ')
        .find_map(|part| part.strip_prefix(key))?
        .parse()
        .ok()
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// The real agent binary with `cluster`'s join token, `args` added and
/// `envs` set (no proxy settings inherited from the test's environment).
fn spawn_agent(
    env: &Env,
    cluster: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    log: &Path,
) -> Process {
    let mut cmd = std::process::Command::new(workspace_bin("tower-agent", "tower-agent").unwrap());
    cmd.arg("--token-file")
        .arg(env.dir.path().join(format!("{cluster}.join-token")))
        .arg("--kube-apiserver")
        .arg(&env.member.url)
        .arg("--kube-ca-file")
        .arg(env.member.ca_file())
        .arg("--kube-token-file")
        .arg(&env.sa_token_file)
        .args(["--keepalive-interval", "0.5", "--backoff-max", "1"])
        .args(["--ops-listen", ""])
        .args(args)
        .env("RUST_LOG", "info");
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "TOWER_PROXY"] {
        cmd.env_remove(var).env_remove(var.to_ascii_lowercase());
    }
    cmd.envs(envs.iter().copied());
    Process::spawn("tower-agent", cmd, log).unwrap()
}

/// Waits until the agent logged its tunnel up; returns the log.
async fn established(log: &Path) -> String {
    eventually(Duration::from_secs(20), || async {
        let text = read(log);
        text.contains("tunnel established").then_some(text)
    })
    .await
    .unwrap_or_else(|| panic!("the agent never connected; its log:\n{}", read(log)))
}

/// kubectl through the gateway, as `cluster`, reaches the member.
async fn kubectl_works(env: &Env, cluster: &str) {
    let out = kubectl(
        &env.server.kubeconfig_file(cluster).unwrap(),
        &["get", "namespace", "kube-system", "-o", "name"],
        None,
    )
    .await
    .unwrap();
    assert_eq!(out.trim(), "namespace/kube-system");
}

/// Waits until `log` holds `n` failed attempts; returns the log and when
/// each attempt was logged (seconds since the agent started).
async fn failed_attempts(log: &Path, n: usize) -> String {
    eventually(Duration::from_secs(30), || async {
        let text = read(log);
        (text.matches("tunnel session ended; reconnecting").count() >= n).then_some(text)
    })
    .await
    .unwrap_or_else(|| panic!("fewer than {n} failed attempts logged:\n{}", read(log)))
}

/// The real binaries over `ws://` and `wss://`: the agent connects and
/// kubectl works through it. `wss://` verifies the server's certificate: with
/// a CA that did not sign it, the agent refuses and says which flag to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_connects_over_ws_and_wss() {
    let env = env();
    let ca = env.server.state_dir.join("ca.crt");
    for (i, url) in [
        format!("ws://{}/", env.ws_addr),
        format!("wss://{}/", env.ws_addr),
    ]
    .iter()
    .enumerate()
    {
        let log = env.dir.path().join(format!("agent-ws-{i}.log"));
        let mut agent = spawn_agent(
            env,
            WS_CLUSTER,
            &["--server", url, "--server-ca-file", ca.to_str().unwrap()],
            &[],
            &log,
        );
        let text = established(&log).await;
        assert!(text.contains(&format!("server=\"{url}\"")), "{text}");
        kubectl_works(env, WS_CLUSTER).await;
        agent.terminate();
    }

    // A CA that did not sign the server's certificate.
    let log = env.dir.path().join("agent-wss-wrong-ca.log");
    let url = format!("wss://{}/", env.ws_addr);
    let wrong = env.member.ca_file().to_str().unwrap().to_string();
    let mut agent = spawn_agent(
        env,
        WS_CLUSTER,
        &["--server", &url, "--server-ca-file", &wrong],
        &[],
        &log,
    );
    let text = failed_attempts(&log, 2).await;
    assert!(text.contains("TLS:"), "{text}");
    assert!(text.contains("--server-ca-file"), "{text}");
    assert!(!text.contains("tunnel established"), "{text}");
    agent.terminate();
}

/// A tinyproxy process on loopback; `extra` lines go into its config.
struct Tinyproxy {
    addr: SocketAddr,
    log: PathBuf,
    _process: Process,
}

impl Tinyproxy {
    async fn start(dir: &Path, name: &str, extra: &[String]) -> Tinyproxy {
        let bin = which("tinyproxy").unwrap_or_else(|| {
            panic!(
                "tinyproxy is not installed: scripts/test.sh installs it (Debian package tinyproxy-bin); \
                 or run `apt-get install tinyproxy-bin`"
            )
        });
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = dir.join(format!("{name}.conf"));
        let mut text = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nAllow 127.0.0.1\n\
             LogLevel Info\nDisableViaHeader Yes\nPidFile \"{}\"\n",
            dir.join(format!("{name}.pid")).display()
        );
        for line in extra {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&conf, text).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("-d").arg("-c").arg(&conf);
        let process = Process::spawn("tinyproxy", cmd, &log).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await
        .unwrap_or_else(|| panic!("tinyproxy did not start:\n{}", read(&log)));
        Tinyproxy {
            addr,
            log,
            _process: process,
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Through a real HTTP CONNECT proxy: the agent connects with HTTPS_PROXY
/// (`wss://`), skips it for a NO_PROXY host, and with `--proxy` and proxy
/// basic auth (raw SSH through it too). Wrong proxy credentials and a
/// refused CONNECT give errors that name the proxy and its answer, never the
/// password, and the agent keeps retrying with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connects_through_a_real_http_proxy() {
    let env = env();
    let dir = env.dir.path();
    let ca = env.server.state_dir.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let wss = format!("wss://{}/", env.ws_addr);

    // HTTPS_PROXY, no auth.
    let open = Tinyproxy::start(dir, "proxy-open", &[]).await;
    let proxy_url = format!("http://{}", open.addr);
    let log = dir.join("agent-proxy-env.log");
    let mut agent = spawn_agent(
        env,
        PROXY_CLUSTER,
        &["--server", &wss, "--server-ca-file", ca],
        &[("HTTPS_PROXY", &proxy_url)],
        &log,
    );
    established(&log).await;
    kubectl_works(env, PROXY_CLUSTER).await;
    agent.terminate();
    let proxied = read(&open.log);
    assert!(
        proxied.contains(&format!("{}", env.ws_addr.port())),
        "tinyproxy did not carry the connection:\n{proxied}"
    );

    // NO_PROXY names the server: the (dead) proxy is skipped.
    let log = dir.join("agent-no-proxy.log");
    let mut agent = spawn_agent(
        env,
        PROXY_CLUSTER,
        &["--server", &wss, "--server-ca-file", ca],
        &[
            ("HTTPS_PROXY", "http://127.0.0.1:9"),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
        &log,
    );
    established(&log).await;
    agent.terminate();

    // --proxy with basic auth, for raw SSH as well as wss://.
    let guarded = Tinyproxy::start(dir, "proxy-auth", &["BasicAuth tower s3cret-pw".into()]).await;
    for (i, server) in [env.server.ssh_addr.to_string(), wss.clone()]
        .iter()
        .enumerate()
    {
        let log = dir.join(format!("agent-proxy-auth-{i}.log"));
        let proxy = format!("http://tower:s3cret-pw@{}", guarded.addr);
        let mut agent = spawn_agent(
            env,
            PROXY_CLUSTER,
            &[
                "--server",
                server,
                "--server-ca-file",
                ca,
                "--proxy",
                &proxy,
            ],
            &[],
            &log,
        );
        let text = established(&log).await;
        assert!(
            !text.contains("s3cret-pw"),
            "the proxy password reached the log"
        );
        kubectl_works(env, PROXY_CLUSTER).await;
        agent.terminate();
    }

    // Wrong credentials: refused, named, retried.
    let log = dir.join("agent-proxy-wrong-auth.log");
    let started = Instant::now();
    let proxy = format!("http://tower:not-the-pw@{}", guarded.addr);
    let mut agent = spawn_agent(
        env,
        PROXY_CLUSTER,
        &["--server", &wss, "--proxy", &proxy],
        &[],
        &log,
    );
    let text = failed_attempts(&log, 3).await;
    agent.terminate();
    assert!(
        text.contains(&format!(
            "proxy http://{} wants authentication",
            guarded.addr
        )),
        "{text}"
    );
    // tinyproxy answers 401 where the standard says 407; either is named.
    assert!(
        text.contains("401 Unauthorized") || text.contains("407"),
        "{text}"
    );
    assert!(text.contains("refused the credentials given"), "{text}");
    assert!(
        !text.contains("not-the-pw"),
        "the proxy password reached the log"
    );
    assert!(!text.contains("tunnel established"), "{text}");
    eprintln!("3 refused attempts in {:.1?}", started.elapsed());

    // A proxy that refuses CONNECT to the server's port: 403, named, retried
    // with backoff (not a tight loop).
    let strict = Tinyproxy::start(dir, "proxy-strict", &["ConnectPort 443".into()]).await;
    let log = dir.join("agent-proxy-refused.log");
    let started = Instant::now();
    let proxy = format!("http://{}", strict.addr);
    let mut agent = spawn_agent(
        env,
        PROXY_CLUSTER,
        &["--server", &wss, "--proxy", &proxy],
        &[],
        &log,
    );
    let text = failed_attempts(&log, 4).await;
    let took = started.elapsed();
    agent.terminate();
    assert!(
        text.contains(&format!(
            "proxy http://{} refused to connect to {}",
            strict.addr, env.ws_addr
        )),
        "{text}"
    );
    assert!(text.contains("403"), "{text}");
    // Backoff from 200 ms doubling (jittered) to the 1 s cap: four attempts
    // take well over half a second; a tight loop would take milliseconds.
    assert!(
        took > Duration::from_millis(500),
        "4 attempts in {took:?}: no backoff"
    );
    let after = read(&log)
        .matches("tunnel session ended; reconnecting")
        .count();
    assert!(after < 30, "{after} attempts: retrying too fast");
}
