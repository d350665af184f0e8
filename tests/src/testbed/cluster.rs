//! [`ControlPlane`]: one kube-apiserver (a "cluster") with its own CA, certificates,
//! service-account keys, static admin token and admin kubeconfig, on a [`Testbed`]'s etcd.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tower_certs::{Ca, ClientIdentity};

use super::bed::{ADDR_IN_USE, START_ATTEMPTS, StartError, log_since};
use super::probe::https_get;
use super::{Process, Testbed, bin_dir, free_port, kubectl_bin, log_tail, random_hex};

/// How long a kube-apiserver may take to report `/readyz` ok.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Issuer and audience of the cluster's service-account tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";

/// A running kube-apiserver on loopback, with everything needed to talk to it.
///
/// Dropping it kills the apiserver (its data stays in etcd until the [`Testbed`] goes).
pub struct ControlPlane {
    /// The name given to [`Testbed::cluster`].
    pub name: String,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The cluster CA certificate (PEM) that signs the serving and client certificates.
    pub ca_pem: String,
    port: u16,
    etcd_prefix: String,
    dir: PathBuf,
    ca_file: PathBuf,
    kubeconfig: PathBuf,
    admin_token: String,
    log: PathBuf,
    process: Option<Process>,
    bed: Testbed,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("etcd_prefix", &self.etcd_prefix)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    pub(crate) async fn start(bed: Testbed, name: &str) -> anyhow::Result<ControlPlane> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let unique = format!("{}-{}", NEXT.fetch_add(1, Ordering::Relaxed), random_hex(3));
        let slug: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = bed.dir().join(format!("{slug}-{unique}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

        let ca = Ca::generate(&format!("tower-testbed-{name}-ca"))?;
        let serving = ca.issue_server(&["localhost", "127.0.0.1"], CERT_VALIDITY)?;
        let admin = ca.issue_client(
            &ClientIdentity {
                common_name: "admin".into(),
                organizations: vec!["system:masters".into()],
            },
            CERT_VALIDITY,
        )?;
        // kube-apiserver reads only public keys (PEM `PUBLIC KEY`) from
        // --service-account-key-file, so the pair is written as two files.
        let sa_key = rcgen::KeyPair::generate()?;
        let admin_token = random_hex(24);
        let write = |file: &str, contents: &str, mode: u32| {
            tower_certs::write(&dir.join(file), contents, mode)
                .with_context(|| format!("writing {file}"))
        };
        write("ca.crt", ca.cert_pem(), 0o644)?;
        write("ca.key", ca.key_pem(), 0o600)?;
        write("apiserver.crt", &serving.cert_pem, 0o644)?;
        write("apiserver.key", &serving.key_pem, 0o600)?;
        write("admin.crt", &admin.cert_pem, 0o644)?;
        write("admin.key", &admin.key_pem, 0o600)?;
        write("sa.key", &sa_key.serialize_pem(), 0o600)?;
        write("sa.pub", &sa_key.public_key_pem(), 0o644)?;
        write("admin.token", &admin_token, 0o600)?;
        write(
            "tokens.csv",
            &format!("{admin_token},admin,admin,\"system:masters\"\n"),
            0o600,
        )?;

        let mut cp = ControlPlane {
            name: name.to_string(),
            url: String::new(),
            ca_pem: ca.cert_pem().to_string(),
            port: 0,
            etcd_prefix: format!("/registry-{slug}-{unique}"),
            ca_file: dir.join("ca.crt"),
            kubeconfig: dir.join("admin.kubeconfig"),
            log: dir.join("kube-apiserver.log"),
            dir,
            admin_token,
            process: None,
            bed,
        };
        let started = Instant::now();
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            cp.port = free_port();
            cp.url = format!("https://127.0.0.1:{}", cp.port);
            cp.write_admin_kubeconfig(&admin.cert_pem, &admin.key_pem)?;
            match cp.launch().await {
                Ok(()) => {
                    tracing::info!(name, url = %cp.url, elapsed = ?started.elapsed(), "kube-apiserver ready");
                    return Ok(cp);
                }
                Err(StartError::PortTaken) => {
                    tracing::warn!(name, port = cp.port, attempt, "port taken, retrying");
                    last_err = Some(anyhow::anyhow!(
                        "kube-apiserver {name} could not bind (attempt {attempt}/{START_ATTEMPTS}); log tail:\n{}",
                        log_tail(&cp.log, 30)
                    ));
                }
                Err(StartError::Exited) => bail!(
                    "kube-apiserver {name} exited during start; log tail ({}):\n{}",
                    cp.log.display(),
                    log_tail(&cp.log, 30)
                ),
                Err(StartError::Timeout) => bail!(cp.timeout_message()),
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn apiserver_args(&self) -> Vec<OsString> {
        let d = |file: &str| self.dir.join(file).into_os_string();
        let flag = |name: &str, value: OsString| {
            let mut arg = OsString::from(format!("--{name}="));
            arg.push(value);
            arg
        };
        vec![
            flag("etcd-servers", self.bed.etcd_url().into()),
            flag("etcd-prefix", self.etcd_prefix.clone().into()),
            flag("etcd-compaction-interval", "0".into()),
            flag("secure-port", self.port.to_string().into()),
            flag("bind-address", "127.0.0.1".into()),
            flag("advertise-address", "127.0.0.1".into()),
            // The endpoint reconciler would try to publish 127.0.0.1 (invalid in Endpoints).
            flag("endpoint-reconciler-type", "none".into()),
            flag("cert-dir", d("cert-dir")),
            flag("tls-cert-file", d("apiserver.crt")),
            flag("tls-private-key-file", d("apiserver.key")),
            flag("client-ca-file", d("ca.crt")),
            flag("token-auth-file", d("tokens.csv")),
            flag("service-account-key-file", d("sa.pub")),
            flag("service-account-signing-key-file", d("sa.key")),
            flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER.into()),
            flag("api-audiences", SERVICE_ACCOUNT_ISSUER.into()),
            flag("authorization-mode", "RBAC".into()),
            flag("disable-admission-plugins", "ServiceAccount".into()),
            flag("service-cluster-ip-range", "10.0.0.0/24".into()),
            flag("enable-priority-and-fairness", "false".into()),
            // One apiserver stands in for up to 1,000 members at once (the
            // replica tests): 400 requests in flight (the default) would
            // answer 429 to load that 1,000 real members would share.
            flag("max-requests-inflight", "4000".into()),
            flag("profiling", "false".into()),
        ]
    }

    /// Spawns the apiserver with the current port and waits for `/readyz`.
    async fn launch(&mut self) -> Result<(), StartError> {
        let mut cmd = Command::new(bin_dir().join("kube-apiserver"));
        cmd.args(self.apiserver_args());
        let log_start = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let name = format!("kube-apiserver-{}", self.name);
        self.process = Some(Process::spawn(&name, cmd, &self.log).map_err(StartError::Other)?);
        let result = match self.wait_ready().await {
            Err(StartError::Exited) if log_since(&self.log, log_start).contains(ADDR_IN_USE) => {
                Err(StartError::PortTaken)
            }
            result => result,
        };
        if result.is_err() {
            self.process = None; // kills it
        }
        result
    }

    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !self.process.as_mut().is_some_and(Process::is_running) {
                return Err(StartError::Exited);
            }
            let probe = https_get(self.port, &self.ca_pem, &self.admin_token, "/readyz");
            if let Ok(Ok((200, _))) = tokio::time::timeout(Duration::from_secs(5), probe).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn timeout_message(&self) -> String {
        format!(
            "kube-apiserver {} at {} not ready after {READY_TIMEOUT:?}; log tail ({}):\n{}",
            self.name,
            self.url,
            self.log.display(),
            log_tail(&self.log, 30)
        )
    }

    fn write_admin_kubeconfig(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let user = serde_json::json!({
            "client-certificate-data": tower_certs::base64(cert_pem.as_bytes()),
            "client-key-data": tower_certs::base64(key_pem.as_bytes()),
        });
        let yaml = self.kubeconfig_yaml("admin", user)?;
        tower_certs::write(&self.kubeconfig, &yaml, 0o600)?;
        Ok(())
    }

    fn kubeconfig_yaml(&self, user_name: &str, user: serde_json::Value) -> anyhow::Result<String> {
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": self.name,
                "cluster": {
                    "server": self.url,
                    "certificate-authority-data": tower_certs::base64(self.ca_pem.as_bytes()),
                },
            }],
            "users": [{ "name": user_name, "user": user }],
            "contexts": [{
                "name": self.name,
                "context": { "cluster": self.name, "user": user_name, "namespace": "default" },
            }],
            "current-context": self.name,
        });
        Ok(yaml_serde::to_string(&config)?)
    }

    /// This cluster's directory (certificates, keys, kubeconfig, apiserver log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (client certificate CN=admin, O=system:masters).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster CA certificate file, what a client uses to verify the apiserver.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A static bearer token for user `admin` in group `system:masters`.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The file holding [`ControlPlane::admin_token`].
    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.join("admin.token")
    }

    /// This cluster's `--etcd-prefix`.
    pub fn etcd_prefix(&self) -> &str {
        &self.etcd_prefix
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The apiserver's pid, or `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// The apiserver's log (stdout and stderr, across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// The test bed this cluster runs on.
    pub fn testbed(&self) -> &Testbed {
        &self.bed
    }

    /// An admin `kube::Client` built from [`ControlPlane::admin_kubeconfig`].
    ///
    /// Create clients per test: a client is bound to the tokio runtime that uses it.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        client_from_kubeconfig(kubeconfig).await
    }

    /// A kubeconfig (YAML) for this cluster that authenticates with a bearer `token`.
    pub fn token_kubeconfig(&self, token: &str) -> anyhow::Result<String> {
        self.kubeconfig_yaml("token-user", serde_json::json!({ "token": token }))
    }

    /// A `kube::Client` that authenticates with a bearer `token`.
    pub async fn client_with_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::from_yaml(&self.token_kubeconfig(token)?)?;
        client_from_kubeconfig(kubeconfig).await
    }

    /// `kubectl` v1.35 preset with `--kubeconfig=<admin kubeconfig>` and a private cache dir.
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(kubectl_bin());
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .kill_on_drop(true);
        cmd
    }

    /// Runs [`ControlPlane::kubectl`] with `args` (and `stdin`, if any); returns stdout, or
    /// an error with stderr if it exits non-zero.
    pub async fn run_kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use std::process::Stdio;
        use tokio::io::AsyncWriteExt as _;
        let mut cmd = self.kubectl();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning kubectl")?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes()).await?;
            drop(pipe);
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Creates `namespace` (if missing) and ServiceAccount `name` in it (if missing), and
    /// mints a token for it with the TokenRequest API (one hour, default audiences).
    ///
    /// With `cluster_admin`, also binds the ServiceAccount to `cluster-admin`.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        cluster_admin: bool,
    ) -> anyhow::Result<String> {
        let client = self.client().await?;
        let pp = PostParams::default();
        let meta = |name: &str, namespace: Option<&str>| ObjectMeta {
            name: Some(name.to_string()),
            namespace: namespace.map(str::to_string),
            ..Default::default()
        };
        ignore_conflict(
            Api::<Namespace>::all(client.clone())
                .create(
                    &pp,
                    &Namespace {
                        metadata: meta(namespace, None),
                        ..Default::default()
                    },
                )
                .await,
        )
        .with_context(|| format!("creating namespace {namespace}"))?;
        let service_accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
        ignore_conflict(
            service_accounts
                .create(
                    &pp,
                    &ServiceAccount {
                        metadata: meta(name, Some(namespace)),
                        ..Default::default()
                    },
                )
                .await,
        )
        .with_context(|| format!("creating service account {namespace}/{name}"))?;
        if cluster_admin {
            let binding = format!("{namespace}-{name}-cluster-admin");
            ignore_conflict(
                Api::<ClusterRoleBinding>::all(client.clone())
                    .create(
                        &pp,
                        &ClusterRoleBinding {
                            metadata: meta(&binding, None),
                            role_ref: RoleRef {
                                api_group: "rbac.authorization.k8s.io".into(),
                                kind: "ClusterRole".into(),
                                name: "cluster-admin".into(),
                            },
                            subjects: Some(vec![Subject {
                                kind: "ServiceAccount".into(),
                                name: name.into(),
                                namespace: Some(namespace.into()),
                                ..Default::default()
                            }]),
                        },
                    )
                    .await,
            )
            .with_context(|| format!("creating cluster role binding {binding}"))?;
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let response = service_accounts
            .create_token_request(name, &pp, &request)
            .await
            .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
        let token = response
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .context("TokenRequest returned no token")?;
        Ok(token)
    }

    /// Kills the apiserver (SIGKILL); etcd and this cluster's data stay.
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill9();
        }
    }

    /// Starts the apiserver again on the same port with the same certificates, and waits
    /// until it is ready. Stops it first if it is running.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        match self.launch().await {
            Ok(()) => Ok(()),
            Err(StartError::Other(e)) => Err(e),
            Err(StartError::Exited | StartError::PortTaken) => bail!(
                "kube-apiserver {} exited while restarting on port {}; log tail:\n{}",
                self.name,
                self.port,
                log_tail(&self.log, 30)
            ),
            Err(StartError::Timeout) => bail!(self.timeout_message()),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() && self.process.is_some() {
            eprintln!(
                "--- kube-apiserver {} ({}) log tail, dropped while panicking:\n{}\n---",
                self.name,
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
    }
}

async fn client_from_kubeconfig(kubeconfig: Kubeconfig) -> anyhow::Result<kube::Client> {
    super::install_crypto_provider();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn ignore_conflict<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
