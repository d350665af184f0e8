//! The test bed: real etcd, kube-apiserver and kubectl processes on loopback, for end-to-end tests.
//!
//! - [`bin_dir`] builds (or reuses) the control-plane binaries with `tests/testbed/build.sh`.
//! - [`Testbed`] owns a temporary directory and one etcd; [`Testbed::cluster`] starts a
//!   [`ControlPlane`] (a kube-apiserver with its own CA, certificates and `--etcd-prefix`) on it.
//! - [`FakeNode`] is a node of a cluster whose kubelet is kwok, for exec, logs, cp and
//!   port-forward.
//! - [`kubesphere`] is a KubeSphere 3.4 stand-in (dispatcher, member ks-apiserver, cluster
//!   controller, webhook, kube-proxy, the Go tower) for tests of tower in KubeSphere mode.
//! - [`Kubelet`] runs a member's tower-agent and Go agent Deployments (there are no pods).
//! - [`Process`] is a child process that cannot outlive the test process: it is killed on
//!   drop, at exit, and (through `PR_SET_PDEATHSIG`) when the test process dies.
//!
//! Environment:
//! - `TOWER_TESTBED_BIN`: use this bin directory instead of running `build.sh`.
//! - `TOWER_TESTBED_ROOT`: create test bed directories under this directory (default: the
//!   system temp dir).
//! - `TOWER_KEEP_TESTBED=1`: keep test bed directories (logs, certs, kubeconfigs) after use.
//! - `RUST_LOG`: filter for [`init_tracing`].

mod bed;
mod cluster;
pub mod kubelet;
pub mod kubesphere;
mod kwok;
mod probe;
mod process;

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once, OnceLock};

pub use bed::Testbed;
pub use cluster::{ControlPlane, SERVICE_ACCOUNT_ISSUER};
pub use kubelet::Kubelet;
pub use kwok::{FakeNode, kwok_dir};
pub use process::{Process, ThreadStat, threads};

/// The directory holding `etcd`, `kube-apiserver` and `kubectl`.
///
/// Runs `tests/testbed/build.sh` once per process (a no-op when its cache is warm) unless
/// `TOWER_TESTBED_BIN` names the directory. Panics if the build fails.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TOWER_TESTBED_BIN").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let (script, stdout) = run_build_script("build.sh");
        let dir = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| PathBuf::from(l.trim()))
            .unwrap_or_else(|| panic!("test bed: {} printed no bin dir", script.display()));
        for bin in ["etcd", "kube-apiserver", "kubectl"] {
            assert!(
                dir.join(bin).exists(),
                "test bed: {} reported {} but {bin} is missing there",
                script.display(),
                dir.display()
            );
        }
        dir
    })
}

/// Runs `tests/testbed/<name>` (its progress on stderr); returns the script's
/// path and its stdout, or panics saying it failed.
fn run_build_script(name: &str) -> (PathBuf, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/testbed")
        .join(name);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("test bed: cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "test bed: {} failed ({}); its progress is on stderr above",
        script.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (script, stdout)
}

/// `kubectl` v1.35 from [`bin_dir`].
pub fn kubectl_bin() -> PathBuf {
    bin_dir().join("kubectl")
}

/// The older `kubectl` (v1.32) users still run, built once by
/// `tests/testbed/build-kubectl-old.sh` into the test-bed cache.
pub fn old_kubectl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let (script, stdout) = run_build_script("build-kubectl-old.sh");
        let bin = PathBuf::from(stdout.trim());
        assert!(
            bin.exists(),
            "test bed: {} reported {}, which is missing",
            script.display(),
            bin.display()
        );
        bin
    })
    .clone()
}

/// A free TCP port on 127.0.0.1.
///
/// Never hands out the same port twice in one process, so parallel tests do not collide with
/// each other; another process can still take it before it is bound, which is why starts retry.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Installs a `tracing` subscriber (filtered by `RUST_LOG`, writing through the test
/// harness's capture) once per process.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// Makes `ring` the process-wide rustls crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The last `n` lines of a log file (or a note saying it could not be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Random lowercase hex from the OS CSPRNG, for tokens and unique names.
pub(crate) fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// `helm` v4 from [`bin_dir`] (built from `tests/testbed/go/helm`). Panics if it is missing.
pub fn helm_bin() -> PathBuf {
    let helm = bin_dir().join("helm");
    assert!(
        helm.exists(),
        "test bed: {} is missing; run tests/testbed/build.sh",
        helm.display()
    );
    helm
}
