//! Tower under test: a server started in-process on loopback, agents started
//! in-process against test-bed clusters, and helpers to reach members through
//! the gateway with kubectl and with raw HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_agent::{Agent, AgentConfig, AgentStatus, TokenSource, UpstreamConfig};
use tower_proto::JoinToken;
use tower_proto::names::UPSTREAM_KUBE_APISERVER;
use tower_server::tokens::FileStore;
use tower_server::{Server, ServerConfig};

use crate::testbed::{ControlPlane, install_crypto_provider, kubectl_bin};

/// Keepalive used in tests: a dead peer is noticed within about 1.5 s.
pub const TEST_KEEPALIVE: Duration = Duration::from_millis(500);
pub const TEST_KEEPALIVE_MAX: usize = 3;

/// A running Tower server.
pub struct TowerServer {
    pub server: Server,
    pub state_dir: PathBuf,
    pub ssh_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TowerServer {
    /// Starts a server with its state in `state_dir`, on fresh loopback ports.
    pub async fn start(state_dir: &Path) -> anyhow::Result<Self> {
        let ssh = TcpListener::bind("127.0.0.1:0").await?;
        let gateway = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(state_dir, ssh, gateway).await
    }

    async fn start_on(
        state_dir: &Path,
        ssh: TcpListener,
        gateway: TcpListener,
    ) -> anyhow::Result<Self> {
        install_crypto_provider();
        let ssh_addr = ssh.local_addr()?;
        let gateway_addr = gateway.local_addr()?;
        let mut config = ServerConfig::new(state_dir, format!("https://{gateway_addr}"));
        config.keepalive_interval = TEST_KEEPALIVE;
        config.keepalive_max = TEST_KEEPALIVE_MAX;
        config.store_poll = Duration::from_millis(250);
        let server = Server::open(config)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.clone().run(ssh, gateway, shutdown.clone()));
        Ok(Self {
            server,
            state_dir: state_dir.to_path_buf(),
            ssh_addr,
            gateway_addr,
            shutdown,
            task: Some(task),
        })
    }

    pub fn gateway_url(&self) -> String {
        format!("https://{}", self.gateway_addr)
    }

    /// Mints a join token for `cluster` (as `towerctl token` does).
    pub fn mint(&self, cluster: &str, ttl: Option<Duration>) -> anyhow::Result<JoinToken> {
        FileStore::open(&self.state_dir)?.mint(
            cluster,
            vec![self.ssh_addr.to_string()],
            self.server.host_key_fingerprint(),
            ttl,
        )
    }

    /// Revokes every token of `cluster` (as `towerctl revoke` does).
    pub fn revoke(&self, cluster: &str) -> anyhow::Result<()> {
        FileStore::open(&self.state_dir)?.revoke_cluster(cluster)?;
        Ok(())
    }

    /// Writes the synthesized kubeconfig for `cluster` to a file and returns its path.
    pub fn kubeconfig_file(&self, cluster: &str) -> anyhow::Result<PathBuf> {
        let path = self.state_dir.join(format!("kubeconfig-{cluster}.yaml"));
        std::fs::write(&path, self.server.kubeconfig(cluster)?)?;
        Ok(path)
    }

    pub async fn wait_connected(&self, cluster: &str, want: bool, timeout: Duration) -> bool {
        self.server
            .registry()
            .wait_connected(cluster, want, timeout)
            .await
    }

    /// Stops the server abruptly (listeners and sessions closed).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Stops, then starts again with the same state and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let ssh = bind_retry(self.ssh_addr).await?;
        let gateway = bind_retry(self.gateway_addr).await?;
        *self = Self::start_on(&self.state_dir.clone(), ssh, gateway).await?;
        Ok(())
    }
}

impl Drop for TowerServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind_retry(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Ok(l);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("rebinding {addr}"))
}

/// A running in-process agent.
pub struct TowerAgent {
    pub agent: Arc<Agent>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl TowerAgent {
    /// Starts an agent for `member`, authenticating upstream with the
    /// service-account token in `sa_token_file`.
    pub fn start(
        token: TokenSource,
        member: &ControlPlane,
        sa_token_file: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(token, vec![kube_upstream(member, sa_token_file)])
    }

    pub fn start_with(token: TokenSource, upstreams: Vec<UpstreamConfig>) -> anyhow::Result<Self> {
        Self::start_configured(token, upstreams, |_| {})
    }

    /// Like [`TowerAgent::start_with`], with `tweak` applied to the test
    /// settings last.
    pub fn start_configured(
        token: TokenSource,
        upstreams: Vec<UpstreamConfig>,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> anyhow::Result<Self> {
        install_crypto_provider();
        let mut config = AgentConfig::new(token, upstreams);
        config.keepalive_interval = TEST_KEEPALIVE;
        config.keepalive_max = TEST_KEEPALIVE_MAX;
        config.backoff_min = Duration::from_millis(100);
        config.backoff_max = Duration::from_secs(1);
        tweak(&mut config);
        let agent = Arc::new(Agent::new(config)?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let agent = agent.clone();
            let shutdown = shutdown.clone();
            async move { agent.run(shutdown).await }
        });
        Ok(Self {
            agent,
            shutdown,
            task,
        })
    }

    /// Waits for a status matching `pred`; returns the last status seen.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let mut rx = self.agent.status();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await;
        rx.borrow().clone()
    }

    /// Ends the agent abruptly, as a crash would: its TCP connection is dropped
    /// without an SSH disconnect.
    pub fn kill(self) {
        self.task.abort();
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// The kube-apiserver upstream of `member`, with a bearer token file.
pub fn kube_upstream(member: &ControlPlane, sa_token_file: &Path) -> UpstreamConfig {
    UpstreamConfig {
        name: UPSTREAM_KUBE_APISERVER.into(),
        url: member.url.clone(),
        ca_file: Some(member.ca_file().to_path_buf()),
        token_file: Some(sa_token_file.to_path_buf()),
    }
}

/// Mints a cluster-admin service-account token on `member` for the agent and
/// writes it to `<dir>/agent-token`.
pub async fn agent_credential(
    member: &ControlPlane,
    dir: &Path,
) -> anyhow::Result<(String, PathBuf)> {
    let token = member
        .service_account_token("tower-system", "tower-agent", true)
        .await?;
    let path = dir.join("agent-token");
    std::fs::write(&path, &token)?;
    Ok((token, path))
}

/// kubectl v1.35 against `kubeconfig`, returning stdout or an error with stderr.
pub async fn kubectl(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(kubectl_bin());
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!(
            "--cache-dir={}",
            kubeconfig.with_extension("cache").display()
        ))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning kubectl")?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .context("kubectl did not finish within 120s")??;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A raw HTTPS client for the gateway: TLS with an optional client certificate.
pub mod raw {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http1;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    /// Client identity for [`connect`].
    pub struct Identity {
        pub cert_pem: String,
        pub key_pem: String,
    }

    /// Connects to the gateway at `addr`, verifying it with `ca_pem`.
    pub async fn connect(
        addr: std::net::SocketAddr,
        ca_pem: &str,
        identity: Option<&Identity>,
        alpn_h2: bool,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in tower_certs::parse_certs(ca_pem)? {
            roots.add(c)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder.with_client_auth_cert(
                tower_certs::parse_certs(&id.cert_pem)?,
                tower_certs::parse_key(&id.key_pem)?,
            )?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = if alpn_h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
        Ok(TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?)
    }

    /// One HTTP/1.1 GET over a fresh connection; returns status and body.
    pub async fn get(
        addr: std::net::SocketAddr,
        ca_pem: &str,
        identity: &Identity,
        path: &str,
    ) -> anyhow::Result<(u16, Bytes)> {
        let tls = connect(addr, ca_pem, Some(identity), false).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Client identity of a synthesized kubeconfig.
pub fn identity_from_kubeconfig(yaml: &str) -> anyhow::Result<raw::Identity> {
    use base64::Engine;
    let doc: serde_json::Value = yaml_serde::from_str(yaml)?;
    let user = &doc["users"][0]["user"];
    let decode = |k: &str| -> anyhow::Result<String> {
        let b = base64::engine::general_purpose::STANDARD
            .decode(user[k].as_str().context("missing field")?)?;
        Ok(String::from_utf8(b)?)
    };
    Ok(raw::Identity {
        cert_pem: decode("client-certificate-data")?,
        key_pem: decode("client-key-data")?,
    })
}

/// A small HTTPS upstream for routing and upgrade tests: answers every request
/// with JSON `{method, path, authorization}` and, on `Upgrade: echo`, switches
/// protocols and echoes bytes back. A path under `/hang` never answers.
pub struct EchoUpstream {
    pub url: String,
    pub ca_file: PathBuf,
    shutdown: CancellationToken,
}

impl EchoUpstream {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::TokioIo;
        install_crypto_provider();
        let ca = tower_certs::Ca::generate("echo-ca")?;
        let serving = ca.issue_server(&["127.0.0.1", "localhost"], Duration::from_secs(3600))?;
        let ca_file = dir.join("echo-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem())?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                tower_certs::parse_certs(&serving.cert_pem)?,
                tower_certs::parse_key(&serving.key_pem)?,
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |mut req: hyper::Request<hyper::body::Incoming>| async move {
                            let upgrade = req
                                .headers()
                                .get("upgrade")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let info = serde_json::json!({
                                "method": req.method().as_str(),
                                "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                                "authorization": req.headers().get("authorization").and_then(|v| v.to_str().ok()),
                                "impersonate": req.headers().get("impersonate-user").and_then(|v| v.to_str().ok()),
                            });
                            if req.uri().path().starts_with("/hang") {
                                std::future::pending::<()>().await;
                            }
                            if upgrade.as_deref() == Some("echo") {
                                let on = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(up) = on.await {
                                        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                let resp = hyper::Response::builder()
                                    .status(101)
                                    .header("connection", "Upgrade")
                                    .header("upgrade", "echo")
                                    .header("x-echo-info", info.to_string())
                                    .body(
                                        Full::new(bytes::Bytes::new())
                                            .map_err(|n| match n {})
                                            .boxed(),
                                    )
                                    .expect("valid response");
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut info = info;
                            info["body_len"] = body.len().into();
                            Ok(hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(
                                    Full::new(bytes::Bytes::from(info.to_string()))
                                        .map_err(|n| match n {})
                                        .boxed(),
                                )
                                .expect("valid response"))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Self {
            url,
            ca_file,
            shutdown,
        })
    }

    /// This upstream as the agent's `name` upstream, with a bearer token file.
    pub fn upstream(&self, name: &str, token_file: Option<&Path>) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            url: self.url.clone(),
            ca_file: Some(self.ca_file.clone()),
            token_file: token_file.map(Path::to_path_buf),
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

static LOG_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sends this process's tracing output (server and agent, at debug level) to
/// `path`, so tests can scan what was logged. The first call wins.
pub fn log_to_file(path: &Path) {
    let path = path.to_path_buf();
    if LOG_FILE.set(path.clone()).is_err() {
        return;
    }
    let file = std::fs::File::create(&path).expect("creating the log file");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        "debug,h2=info,hyper=info,hyper_util=info,rustls=info,tokio_rustls=info".into()
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

/// The file given to [`log_to_file`], if any.
pub fn log_file() -> Option<PathBuf> {
    LOG_FILE.get().cloned()
}

/// A binary of this workspace, built on first use (a no-op when it is fresh).
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().expect("poisoned");
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["build", "-q", "-p", package, "--bin", name])
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building {name} failed");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let bin = [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} missing after build next to {}", dir.display()));
    built.push((name.to_string(), bin.clone()));
    bin
}

/// The `tower-agent` binary.
pub fn agent_bin() -> PathBuf {
    workspace_bin("tower-agent", "tower-agent")
}

/// Starts the real `tower-agent` binary for `member` as a child process.
pub fn spawn_agent_process(
    token_file: &Path,
    member: &ControlPlane,
    sa_token_file: &Path,
    log: &Path,
) -> anyhow::Result<crate::testbed::Process> {
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.arg("--token-file")
        .arg(token_file)
        .arg("--kube-apiserver")
        .arg(&member.url)
        .arg("--kube-ca-file")
        .arg(member.ca_file())
        .arg("--kube-token-file")
        .arg(sa_token_file)
        .arg("--keepalive-interval")
        .arg(TEST_KEEPALIVE.as_secs_f64().to_string())
        .arg("--keepalive-max")
        .arg(TEST_KEEPALIVE_MAX.to_string())
        .arg("--backoff-max")
        .arg("1")
        .arg("--ops-listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "info");
    crate::testbed::Process::spawn("tower-agent", cmd, log)
}

/// A Tower server in Kubernetes mode against a test-bed host cluster, started
/// in-process on loopback. Its tasks live on the runtime that started it.
pub struct KubeTowerServer {
    pub ssh_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub namespace: String,
    shutdown: CancellationToken,
}

impl KubeTowerServer {
    /// Applies the chart's CRDs to `host`, creates the namespace, and starts the
    /// server with its controller. `tune` adjusts the controller settings.
    pub async fn start(
        host: &ControlPlane,
        dir: &Path,
        replica: &str,
        tune: impl FnOnce(&mut tower_server::ControllerConfig),
    ) -> anyhow::Result<Self> {
        install_crypto_provider();
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tower-server/crds");
        host.run_kubectl(
            &["apply", "--server-side", "-f", &crds.display().to_string()],
            None,
        )
        .await?;
        host.run_kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "crd/clusters.cluster.kubesphere.io",
                "crd/agents.tower.kubesphere.io",
            ],
            None,
        )
        .await?;
        let namespace = "kubesphere-system".to_string();
        let _ = host
            .run_kubectl(&["create", "namespace", &namespace], None)
            .await;
        let ssh = TcpListener::bind("127.0.0.1:0").await?;
        let gateway = TcpListener::bind("127.0.0.1:0").await?;
        let ssh_addr = ssh.local_addr()?;
        let gateway_addr = gateway.local_addr()?;
        let mut config = ServerConfig::new(dir.join(replica), format!("https://{gateway_addr}"));
        config.keepalive_interval = TEST_KEEPALIVE;
        config.keepalive_max = TEST_KEEPALIVE_MAX;
        config.store_poll = Duration::from_millis(250);
        let mut ctrl = tower_server::ControllerConfig::new(&namespace, replica);
        ctrl.ssh_addresses = vec![ssh_addr.to_string()];
        ctrl.lease_renew = Duration::from_secs(1);
        ctrl.lease_duration = Duration::from_secs(4);
        tune(&mut ctrl);
        let client = host.client().await?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tower_server::run_with_kubernetes(config, ctrl, client, ssh, gateway, None, stop)
                    .await
            {
                tracing::error!(error = %e, "kubernetes-mode server failed");
            }
        });
        Ok(Self {
            ssh_addr,
            gateway_addr,
            namespace,
            shutdown,
        })
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for KubeTowerServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `probe` every 100 ms until it returns `Some`, or `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === faults and abuse: configured servers, server processes, counters ===

impl TowerServer {
    /// Like [`TowerServer::start`], with `configure` applied to the test
    /// settings first (timeouts, caps). [`TowerServer::restart`] goes back to
    /// the plain test settings.
    pub async fn start_configured(
        state_dir: &Path,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Self> {
        install_crypto_provider();
        let ssh = TcpListener::bind("127.0.0.1:0").await?;
        let gateway = TcpListener::bind("127.0.0.1:0").await?;
        let ssh_addr = ssh.local_addr()?;
        let gateway_addr = gateway.local_addr()?;
        let mut config = ServerConfig::new(state_dir, format!("https://{gateway_addr}"));
        config.keepalive_interval = TEST_KEEPALIVE;
        config.keepalive_max = TEST_KEEPALIVE_MAX;
        config.store_poll = Duration::from_millis(250);
        configure(&mut config);
        let server = Server::open(config)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.clone().run(ssh, gateway, shutdown.clone()));
        Ok(Self {
            server,
            state_dir: state_dir.to_path_buf(),
            ssh_addr,
            gateway_addr,
            shutdown,
            task: Some(task),
        })
    }

    /// The client identity of this server's kubeconfig for `cluster`.
    pub fn identity(&self, cluster: &str) -> anyhow::Result<raw::Identity> {
        identity_from_kubeconfig(&self.server.kubeconfig(cluster)?)
    }
}

/// Mints a join token in the state dir `state_dir` (as `towerctl token` does)
/// that sends the agent to `servers`, e.g. a relay in front of the server.
pub fn mint_in(
    state_dir: &Path,
    cluster: &str,
    servers: Vec<String>,
    ttl: Option<Duration>,
) -> anyhow::Result<JoinToken> {
    let host_key =
        tower_certs::HostKey::load_or_create(&state_dir.join(tower_server::HOST_KEY_FILE))?;
    FileStore::open(state_dir)?.mint(cluster, servers, host_key.fingerprint(), ttl)
}

/// The real `tower-server` binary as a child process (killable with -9), with
/// the test keepalive and debug logs.
pub struct ServerProcess {
    pub process: crate::testbed::Process,
    pub state_dir: PathBuf,
    pub ssh_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub log: PathBuf,
    /// The state dir opened in-process: CA (for client identities), kubeconfigs.
    pub view: Server,
}

impl ServerProcess {
    /// Creates the state in `state_dir` (CA, host key) and starts the binary on
    /// fresh loopback ports.
    pub async fn start(state_dir: &Path, log: &Path) -> anyhow::Result<Self> {
        install_crypto_provider();
        let view = Server::open(ServerConfig::new(state_dir, "https://127.0.0.1"))?;
        let (process, ssh_addr, gateway_addr) = Self::spawn(state_dir, log, None).await?;
        Ok(Self {
            process,
            state_dir: state_dir.to_path_buf(),
            ssh_addr,
            gateway_addr,
            log: log.to_path_buf(),
            view,
        })
    }

    async fn spawn(
        state_dir: &Path,
        log: &Path,
        ports: Option<(SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<(crate::testbed::Process, SocketAddr, SocketAddr)> {
        let bin = workspace_bin("tower-server", "tower-server");
        let (ssh, gateway) = ports.map_or_else(
            || ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
            |(s, g)| (s.to_string(), g.to_string()),
        );
        let mut last = None;
        for _ in 0..20 {
            let offset = std::fs::metadata(log).map_or(0, |m| m.len());
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("--state-dir")
                .arg(state_dir)
                .args(["--ssh-listen", &ssh, "--gateway-listen", &gateway])
                .args(["--gateway-url", "https://127.0.0.1"])
                .args([
                    "--keepalive-interval",
                    &TEST_KEEPALIVE.as_secs_f64().to_string(),
                ])
                .args(["--keepalive-max", &TEST_KEEPALIVE_MAX.to_string()])
                .args(["--ops-listen", "127.0.0.1:0"])
                .arg("--print-ports")
                .env(
                    "RUST_LOG",
                    "debug,h2=info,hyper=info,hyper_util=info,rustls=info,tokio_rustls=info",
                );
            let mut process = crate::testbed::Process::spawn("tower-server", cmd, log)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline && process.is_running() {
                let fresh = std::fs::read(log)
                    .map(|b| {
                        String::from_utf8_lossy(&b[(offset as usize).min(b.len())..]).into_owned()
                    })
                    .unwrap_or_default();
                if let Some(line) = fresh.lines().find(|l| l.starts_with("ssh=")) {
                    let port = |key: &str| -> anyhow::Result<u16> {
                        let v = line
                            .split_whitespace()
                            .find_map(|kv| kv.strip_prefix(key))
                            .context("no port")?;
                        Ok(v.parse()?)
                    };
                    let ssh_addr = SocketAddr::from(([127, 0, 0, 1], port("ssh=")?));
                    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], port("gateway=")?));
                    return Ok((process, ssh_addr, gateway_addr));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last = Some(crate::testbed::log_tail(log, 20));
            process.kill9();
            // A port still held (ports given): try again shortly.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!(
            "tower-server did not start; log tail:\n{}",
            last.unwrap_or_default()
        )
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the binary again with the same state and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill9();
        let (process, _, _) = Self::spawn(
            &self.state_dir,
            &self.log,
            Some((self.ssh_addr, self.gateway_addr)),
        )
        .await?;
        self.process = process;
        Ok(())
    }

    /// Mints a join token for `cluster` pointing at this server.
    pub fn mint(&self, cluster: &str, ttl: Option<Duration>) -> anyhow::Result<JoinToken> {
        mint_in(
            &self.state_dir,
            cluster,
            vec![self.ssh_addr.to_string()],
            ttl,
        )
    }

    /// The client identity of a kubeconfig for `cluster`.
    pub fn identity(&self, cluster: &str) -> anyhow::Result<raw::Identity> {
        identity_from_kubeconfig(&self.view.kubeconfig(cluster)?)
    }

    pub fn ca_pem(&self) -> &str {
        self.view.ca_pem()
    }

    /// Open file descriptors of the server process.
    pub fn fds(&self) -> usize {
        fd_count(Some(self.process.pid()))
    }
}

/// Open file descriptors of process `pid` (this process when `None`).
pub fn fd_count(pid: Option<u32>) -> usize {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/fd"),
        None => "/proc/self/fd".to_string(),
    };
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// An HTTP/2 connection to the gateway with a client identity.
pub async fn gateway_h2(
    addr: SocketAddr,
    ca_pem: &str,
    identity: &raw::Identity,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>> {
    let tls = raw::connect(addr, ca_pem, Some(identity), true).await?;
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_header_list_size(1024 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An HTTP/1.1 connection to the gateway with a client identity.
pub async fn gateway_h1(
    addr: SocketAddr,
    ca_pem: &str,
    identity: &raw::Identity,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>> {
    let tls = raw::connect(addr, ca_pem, Some(identity), false).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// Starts a test binary's shared environment once, on a runtime thread of its
/// own that lives as long as the process, so the environment's tasks outlive
/// each test's runtime. Panics with the start error.
pub fn shared_env<T, F, Fut>(
    cell: &'static std::sync::OnceLock<T>,
    name: &str,
    start: F,
) -> &'static T
where
    T: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + 'static,
{
    cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{name}-env"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let _ = tx.send(start().await);
                    std::future::pending::<()>().await;
                });
            })
            .expect("environment thread");
        match rx.recv() {
            Ok(Ok(env)) => env,
            Ok(Err(e)) => panic!("starting the {name} environment: {e:#}"),
            Err(_) => panic!("the {name} environment thread died while starting"),
        }
    })
}
