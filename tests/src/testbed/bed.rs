//! [`Testbed`]: a temporary directory plus one etcd that every cluster of the bed shares.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::probe::http_get;
use super::process::{forget_at_exit, remove_at_exit};
use super::{ControlPlane, Process, bin_dir, free_port, install_crypto_provider, log_tail};

/// How many times a start is retried with fresh ports when the process dies early
/// (typically because another process took a port between [`free_port`] and bind).
pub(crate) const START_ATTEMPTS: usize = 3;

/// What Go servers log when their port is taken.
pub(crate) const ADDR_IN_USE: &str = "address already in use";

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A temporary directory and one etcd on loopback; clusters are started with [`Testbed::cluster`].
///
/// Dropping the test bed (and every [`ControlPlane`] started from it, which keep it alive)
/// kills etcd and removes the directory, unless `TOWER_KEEP_TESTBED=1`.
#[derive(Clone)]
pub struct Testbed {
    pub(crate) shared: Arc<Shared>,
}

/// State shared by a test bed and its clusters. Field order is drop order: etcd dies before
/// its data directory is removed.
pub(crate) struct Shared {
    etcd: Process,
    pub(crate) etcd_url: String,
    pub(crate) root: Root,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("dir", &self.shared.root.path)
            .field("etcd_url", &self.shared.etcd_url)
            .finish()
    }
}

impl Testbed {
    /// Creates the test bed directory and starts etcd on free loopback ports.
    pub async fn start() -> anyhow::Result<Testbed> {
        install_crypto_provider();
        let root = Root::create()?;
        let etcd_bin = bin_dir().join("etcd");
        let log = root.path.join("etcd.log");
        let data_dir = root.path.join("etcd-data");
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            let client_url = format!("http://127.0.0.1:{}", free_port());
            let peer_url = format!("http://127.0.0.1:{}", free_port());
            let _ = std::fs::remove_dir_all(&data_dir);
            let mut cmd = Command::new(&etcd_bin);
            cmd.arg("--name=default")
                .arg(format!("--data-dir={}", data_dir.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=default={peer_url}"))
                .arg("--unsafe-no-fsync")
                .arg("--log-level=warn");
            let log_start = std::fs::metadata(&log).map_or(0, |m| m.len());
            let mut etcd = Process::spawn("etcd", cmd, &log)?;
            let result = match wait_etcd_healthy(&mut etcd, &client_url).await {
                Err(StartError::Exited) if log_since(&log, log_start).contains(ADDR_IN_USE) => {
                    Err(StartError::PortTaken)
                }
                result => result,
            };
            match result {
                Ok(()) => {
                    tracing::info!(dir = %root.path.display(), %client_url, "test bed etcd ready");
                    return Ok(Testbed {
                        shared: Arc::new(Shared {
                            etcd,
                            etcd_url: client_url,
                            root,
                        }),
                    });
                }
                Err(StartError::PortTaken) => {
                    tracing::warn!(%client_url, %peer_url, attempt, "etcd port taken, retrying");
                    last_err = Some(anyhow::anyhow!(
                        "etcd could not bind (attempt {attempt}/{START_ATTEMPTS}); log tail:\n{}",
                        log_tail(&log, 30)
                    ));
                }
                Err(StartError::Exited) => {
                    bail!(
                        "etcd exited during start; log tail:\n{}",
                        log_tail(&log, 30)
                    );
                }
                Err(StartError::Other(e)) => return Err(e),
                Err(StartError::Timeout) => {
                    bail!(
                        "etcd at {client_url} not healthy after {ETCD_READY_TIMEOUT:?}; log tail:\n{}",
                        log_tail(&log, 30)
                    );
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// Starts a kube-apiserver named `name` on this bed's etcd (with its own `--etcd-prefix`).
    pub async fn cluster(&self, name: &str) -> anyhow::Result<ControlPlane> {
        ControlPlane::start(self.clone(), name).await
    }

    /// Starts one cluster per name, concurrently.
    pub async fn clusters(&self, names: &[&str]) -> anyhow::Result<Vec<ControlPlane>> {
        futures::future::try_join_all(names.iter().map(|name| self.cluster(name))).await
    }

    /// The test bed directory (etcd data and log, one subdirectory per cluster).
    pub fn dir(&self) -> &Path {
        &self.shared.root.path
    }

    /// etcd's client URL (`http://127.0.0.1:PORT`).
    pub fn etcd_url(&self) -> &str {
        &self.shared.etcd_url
    }

    pub fn etcd_pid(&self) -> u32 {
        self.shared.etcd.pid()
    }

    pub fn etcd_log_path(&self) -> &Path {
        self.shared.etcd.log_path()
    }
}

pub(crate) enum StartError {
    /// The process died because a port was taken; the caller may retry with new ports.
    PortTaken,
    /// The process died for another reason.
    Exited,
    /// The process did not become ready in time.
    Timeout,
    /// Spawning or preparing failed.
    Other(anyhow::Error),
}

async fn wait_etcd_healthy(etcd: &mut Process, url: &str) -> Result<(), StartError> {
    let addr = url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + ETCD_READY_TIMEOUT;
    loop {
        if !etcd.is_running() {
            return Err(StartError::Exited);
        }
        if let Ok(Ok((200, body))) =
            tokio::time::timeout(Duration::from_secs(2), http_get(&addr, "/health")).await
            && body.contains("\"health\":\"true\"")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(StartError::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What was appended to a log file after byte `offset` (lossy UTF-8).
pub(crate) fn log_since(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

// === impl Root ===

/// The test bed directory: under `TOWER_TESTBED_ROOT` (or the temp dir), removed on drop and
/// at exit unless `TOWER_KEEP_TESTBED=1`.
pub(crate) struct Root {
    pub(crate) path: PathBuf,
    keep: bool,
}

impl Root {
    fn create() -> anyhow::Result<Root> {
        let base = std::env::var_os("TOWER_TESTBED_ROOT")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let path = tempfile::Builder::new()
            .prefix("tower-testbed-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a test bed directory in {}", base.display()))?
            .keep();
        let keep = std::env::var("TOWER_KEEP_TESTBED").is_ok_and(|v| v == "1");
        if !keep {
            remove_at_exit(&path);
        }
        Ok(Root { path, keep })
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("test bed kept at {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
            forget_at_exit(&self.path);
        }
    }
}
