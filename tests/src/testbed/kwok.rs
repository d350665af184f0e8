//! [`FakeNode`]: a node on a test-bed cluster whose kubelet is kwok, so that exec, attach,
//! logs, cp and port-forward reach a "container" for real.
//!
//! kwok (built by `tests/testbed/build-kwok.sh`) serves the kubelet API over TLS on
//! loopback. What its pods do is set in its config file:
//! - exec runs the command on this machine, in [`FakeNode::work_dir`];
//! - logs read [`FakeNode::logs_file`] (CRI format; [`FakeNode::write_log`] appends);
//! - port-forward to any pod port connects to the address given to [`FakeNode::start`].
//!
//! kwok does not pass an exec's stdin EOF on, so a command that reads stdin to its end never
//! ends. `kubectl cp` into a pod runs `tar -x` that way; the node's `PATH` therefore starts
//! with a `tar` that reads one-block records, which stops at the end-of-archive marker as
//! real tar stops at EOF. The bytes a client sends are unchanged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

use super::{ControlPlane, Process, free_port, log_tail, random_hex, run_build_script};

/// How long kwok may take to make its node Ready, or a pod Running.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding `kwok` and `stages/`, built once by `tests/testbed/build-kwok.sh`.
pub fn kwok_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let (script, stdout) = run_build_script("build-kwok.sh");
        let dir = PathBuf::from(stdout.trim());
        assert!(
            dir.join("kwok").exists() && dir.join("stages").is_dir(),
            "test bed: {} reported {}, which lacks kwok or stages/",
            script.display(),
            dir.display()
        );
        dir
    })
}

/// A node of a test-bed cluster played by a kwok process; killed on drop.
pub struct FakeNode {
    layout: Layout,
    log_lines: AtomicU64,
    process: Process,
}

/// Where a [`FakeNode`]'s files are, its name and port.
struct Layout {
    name: String,
    port: u16,
    dir: PathBuf,
}

impl FakeNode {
    /// Creates a Node on `cluster` and starts kwok as its kubelet; port-forwards to any of its
    /// pods' ports connect to `forward_to`. Returns once the Node is Ready.
    pub async fn start(cluster: &ControlPlane, forward_to: SocketAddr) -> anyhow::Result<Self> {
        let kwok = kwok_dir();
        let name = format!("kwok-{}", random_hex(3));
        let layout = Layout {
            dir: cluster.dir().join(&name),
            name,
            port: free_port(),
        };
        for sub in ["work", "bin"] {
            std::fs::create_dir_all(layout.dir.join(sub))?;
        }
        let ca = tower_certs::Ca::generate(&format!("{}-kubelet-ca", layout.name))?;
        let serving = ca.issue_server(&["127.0.0.1"], Duration::from_secs(7 * 24 * 3600))?;
        tower_certs::write(&layout.file("kubelet.crt"), &serving.cert_pem, 0o644)?;
        tower_certs::write(&layout.file("kubelet.key"), &serving.key_pem, 0o600)?;
        let tar = find_on_path("tar").context("the fake node's exec needs tar on PATH")?;
        tower_certs::write(
            &layout.file("bin/tar"),
            &format!(
                "#!/bin/sh\n# One-block records: stop at the end-of-archive marker (kwok passes no stdin EOF on).\nexec {} \"$@\" -b 1\n",
                tar.display()
            ),
            0o755,
        )?;
        std::fs::write(layout.logs_file(), "")?;
        std::fs::write(layout.file("kwok.yaml"), layout.config(kwok, forward_to)?)?;
        layout.create_node(cluster).await?;
        let process = layout.spawn(kwok, cluster.admin_kubeconfig())?;
        let node = Self {
            layout,
            log_lines: AtomicU64::new(0),
            process,
        };
        node.layout.wait_ready(cluster).await?;
        Ok(node)
    }

    /// Kills kwok (SIGKILL): the node's kubelet is gone.
    pub fn kill(&mut self) {
        self.process.kill9();
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.layout.name
    }

    /// The kubelet port kwok serves on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.layout.port
    }

    /// Where exec'd commands run; `kubectl cp` paths to a pod are paths on this machine.
    pub fn work_dir(&self) -> PathBuf {
        self.layout.file("work")
    }

    /// The log every container of this node shows (CRI format).
    pub fn logs_file(&self) -> PathBuf {
        self.layout.logs_file()
    }

    /// kwok's own log.
    pub fn kwok_log(&self) -> PathBuf {
        self.layout.file("kwok.log")
    }

    /// Appends `line` to the containers' log on `stream` (`stdout` or `stderr`).
    pub fn write_log(&self, stream: &str, line: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let n = self.log_lines.fetch_add(1, Ordering::Relaxed);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.logs_file())?;
        // CRI: `<RFC3339Nano> <stream> <F(ull)|P(artial)> <text>`.
        writeln!(
            file,
            "2026-01-01T00:{:02}:{:02}.{:09}Z {stream} F {line}",
            n / 60 % 60,
            n % 60,
            n
        )?;
        Ok(())
    }

    /// Creates pod `namespace/name` with one container `main` on this node and waits until it
    /// is Running.
    pub async fn pod(
        &self,
        cluster: &ControlPlane,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(cluster.client().await?, namespace);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "nodeName": self.layout.name,
                "containers": [{ "name": "main", "image": "kwok.invalid/none" }],
            },
        }))?;
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let phase = pods.get(name).await?.status.and_then(|s| s.phase);
            if phase.as_deref() == Some("Running") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "pod {namespace}/{name} on {} not Running after {READY_TIMEOUT:?} (phase {phase:?}); kwok log tail:\n{}",
                    self.layout.name,
                    log_tail(&self.kwok_log(), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Layout {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn logs_file(&self) -> PathBuf {
        self.file("containers.log")
    }

    /// kwok's config: its own stages, plus what exec, logs and port-forward do on every pod.
    fn config(&self, kwok: &Path, forward_to: SocketAddr) -> anyhow::Result<String> {
        let mut docs = Vec::new();
        let mut stages: Vec<_> = std::fs::read_dir(kwok.join("stages"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        stages.sort();
        for stage in stages {
            docs.push(std::fs::read_to_string(&stage)?);
        }
        let cluster_wide = |kind: &str, spec: serde_json::Value| {
            yaml_serde::to_string(&serde_json::json!({
                "apiVersion": "kwok.x-k8s.io/v1alpha1",
                "kind": kind,
                "metadata": { "name": "every-pod" },
                "spec": spec,
            }))
        };
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        docs.push(cluster_wide(
            "ClusterExec",
            serde_json::json!({ "execs": [{ "local": {
                "workDir": self.file("work"),
                "envs": [{ "name": "PATH", "value": path }],
            } }] }),
        )?);
        docs.push(cluster_wide(
            "ClusterLogs",
            serde_json::json!({ "logs": [{ "logsFile": self.logs_file(), "follow": true }] }),
        )?);
        docs.push(cluster_wide(
            "ClusterPortForward",
            serde_json::json!({ "forwards": [{ "target": {
                "address": forward_to.ip().to_string(),
                "port": forward_to.port(),
            } }] }),
        )?);
        Ok(docs
            .iter()
            .map(|d| d.trim_end().trim_start_matches("---\n"))
            .collect::<Vec<_>>()
            .join("\n---\n"))
    }

    /// The Node, with the addresses and kubelet port the apiserver dials.
    async fn create_node(&self, cluster: &ControlPlane) -> anyhow::Result<()> {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": self.name,
                "annotations": { "kwok.x-k8s.io/node": "fake" },
                "labels": { "type": "kwok" },
            },
            "status": {
                "addresses": [
                    { "type": "Hostname", "address": "127.0.0.1" },
                    { "type": "InternalIP", "address": "127.0.0.1" },
                ],
                "daemonEndpoints": { "kubeletEndpoint": { "Port": self.port } },
            },
        }))?;
        Api::<Node>::all(cluster.client().await?)
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {}", self.name))?;
        Ok(())
    }

    fn spawn(&self, kwok: &Path, kubeconfig: &Path) -> anyhow::Result<Process> {
        let path = |file: &str| self.file(file).display().to_string();
        let mut cmd = Command::new(kwok.join("kwok"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--manage-single-node={}", self.name))
            .arg(format!("--server-address=127.0.0.1:{}", self.port))
            .arg(format!("--tls-cert-file={}", path("kubelet.crt")))
            .arg(format!("--tls-private-key-file={}", path("kubelet.key")))
            .arg(format!("--config={}", path("kwok.yaml")))
            .arg("--node-ip=127.0.0.1")
            .arg(format!("--node-port={}", self.port))
            // kwok finds an exec'd command on its own PATH.
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    path("bin"),
                    std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
                ),
            );
        Process::spawn(&self.name, cmd, &self.file("kwok.log"))
    }

    async fn wait_ready(&self, cluster: &ControlPlane) -> anyhow::Result<()> {
        let nodes = Api::<Node>::all(cluster.client().await?);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = nodes
                .get(&self.name)
                .await?
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let serving = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
            if ready && serving {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} not Ready and served on port {} after {READY_TIMEOUT:?}; kwok log tail:\n{}",
                    self.name,
                    self.port,
                    log_tail(&self.file("kwok.log"), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The first executable `name` on `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
