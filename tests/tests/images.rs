//! The OCI images of `scripts/images.sh`, run as a cluster would run them:
//! each archive is unpacked (index.json → manifest → layers) into a root
//! filesystem of its own, and its entrypoint runs there under `chroot` as the
//! image's user, so a library or file the image lacks fails the test. Checked:
//! the image config (non-root user, entrypoint, OCI labels, the charts'
//! default names), `--version`, the server serving `/healthz` and `/readyz`,
//! and the agent image reaching the server image (`/readyz` 200, a request
//! through the gateway answered by the agent's upstream).
//!
//! Needs root (buildah with vfs storage, chroot, chown). Elsewhere, or where
//! buildah cannot be installed, the tests say SKIPPED on stderr and pass,
//! unless `TOWER_REQUIRE_IMAGES=1` (set by `scripts/test.sh` as root) turns
//! that into a failure.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower_server::{Server, ServerConfig};
use tower_tests::fixture::http::until_ok;
use tower_tests::fixture::{HttpsUpstream, eventually, identity_from_kubeconfig, mint_in};
use tower_tests::testbed::{Process, free_port, install_crypto_provider, log_tail};

/// One image, unpacked.
struct Image {
    /// The image name in the archive (`org.opencontainers.image.ref.name`).
    reference: String,
    /// The unpacked layers.
    root: PathBuf,
    /// `config` of the image configuration: User, Entrypoint, Labels, …
    config: serde_json::Value,
}

struct Images {
    server: Image,
    agent: Image,
}

impl Image {
    fn label(&self, name: &str) -> &str {
        self.config["Labels"][name].as_str().unwrap_or_default()
    }

    fn user(&self) -> &str {
        self.config["User"].as_str().unwrap_or_default()
    }

    fn entrypoint(&self) -> Vec<String> {
        self.config["Entrypoint"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The entrypoint with `args`, inside this image's root as its user, with
    /// an empty environment but `env`.
    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(chroot_bin());
        cmd.arg(format!("--userspec={}", self.user()))
            .arg(&self.root)
            .args(self.entrypoint())
            .args(args)
            .env_clear()
            .envs(env.iter().copied());
        cmd
    }

    /// A directory in the image's root owned by the image's user (mode 0700),
    /// as a volume mounted there would be; returns its path on the host.
    fn owned_dir(&self, inside: &str) -> PathBuf {
        let dir = self.root.join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown_tree(&dir, self.uid_gid());
        dir
    }

    fn uid_gid(&self) -> (u32, u32) {
        let (u, g) = self
            .user()
            .split_once(':')
            .unwrap_or((self.user(), self.user()));
        (u.parse().unwrap(), g.parse().unwrap())
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chroot_bin() -> &'static str {
    ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("no chroot(8) on this machine (coreutils)")
}

/// Both images, built by `scripts/images.sh` (cached there) and unpacked,
/// once per test binary; `None` where buildah cannot run, after saying so
/// past the harness's output capture (or failing when
/// `TOWER_REQUIRE_IMAGES` asks for the images).
fn images(test: &str) -> Option<&'static Images> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    match IMAGES.get_or_init(build_and_unpack) {
        Ok(images) => Some(images),
        Err(why) => {
            if std::env::var_os("TOWER_REQUIRE_IMAGES").is_some_and(|v| v != "0") {
                panic!("TOWER_REQUIRE_IMAGES is set, but {test} cannot run: {why}");
            }
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {why}; no image was built or run"
            );
            None
        }
    }
}

fn build_and_unpack() -> Result<Images, String> {
    // SAFETY: a plain system call.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (buildah's vfs storage, chroot and chown need it)".into());
    }
    let script = repo_root().join("scripts/images.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/images.sh");
    match out.status.code() {
        Some(0) => {}
        Some(3) => return Err("buildah is not installed and cannot be installed here".into()),
        _ => panic!(
            "scripts/images.sh failed ({}); its progress is above",
            out.status
        ),
    }
    // One line per image: archive, reference, size.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut archives = stdout.lines().map(|l| {
        let mut f = l.split('\t');
        (
            repo_root().join(f.next().unwrap()),
            f.next().expect("reference").to_string(),
        )
    });
    // Beside the archives, replaced on every run (a static is never dropped,
    // so a temporary directory would stay behind in /tmp).
    let dir = repo_root().join("target/images/unpacked");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let (server, agent) = (archives.next().unwrap(), archives.next().unwrap());
    Ok(Images {
        server: unpack(&server.0, &server.1, &dir.join("server")),
        agent: unpack(&agent.0, &agent.1, &dir.join("agent")),
    })
}

/// Unpacks the one image of the OCI archive `archive` into `dir/rootfs`.
fn unpack(archive: &Path, reference: &str, dir: &Path) -> Image {
    let layout = dir.join("oci");
    std::fs::create_dir_all(&layout).unwrap();
    untar(archive, &layout);
    let blob = |digest: &str| {
        let (algo, hex) = digest.split_once(':').expect("digest");
        layout.join("blobs").join(algo).join(hex)
    };
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let index = json(layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("index.json manifests");
    assert_eq!(manifests.len(), 1, "one image per archive: {index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"], reference,
        "{index}"
    );
    let manifest = json(blob(manifests[0]["digest"].as_str().unwrap()));
    let config = json(blob(manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    for layer in manifest["layers"].as_array().expect("layers") {
        untar(&blob(layer["digest"].as_str().unwrap()), &root);
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    runtime_devices(&root);
    Image {
        reference: reference.to_string(),
        root,
        config: config["config"].clone(),
    }
}

/// The device nodes a container runtime puts in every container's `/dev`
/// (the image has no `/dev`; the binaries read `/dev/urandom`).
fn runtime_devices(root: &Path) {
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    for (name, minor) in [
        ("null", 3),
        ("zero", 5),
        ("full", 7),
        ("random", 8),
        ("urandom", 9),
    ] {
        let path =
            std::ffi::CString::new(dev.join(name).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mknod(2) and chmod(2) on a path we own, a NUL-terminated string.
        let made = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, minor),
            ) == 0
                && libc::chmod(path.as_ptr(), 0o666) == 0
        };
        assert!(
            made,
            "mknod /dev/{name}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `tar -x` (any compression) keeping the archive's numeric owners and modes.
fn untar(archive: &Path, into: &Path) {
    let status = Command::new("tar")
        .args(["--numeric-owner", "--same-owner", "-xpf"])
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .expect("running tar");
    assert!(status.success(), "tar -xf {} failed", archive.display());
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), (uid, gid));
        }
    }
}

/// `value: …` of the first `key:` line in a chart file, unquoted.
fn chart_value(file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let doc: serde_json::Value = yaml_serde::from_str(&text).unwrap();
    match key.split_once('.') {
        Some((a, b)) => doc[a][b].as_str().unwrap().to_string(),
        None => doc[key].as_str().unwrap().to_string(),
    }
}

/// The status code of a plain HTTP GET of an ops endpoint.
async fn ops_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut head))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&head);
    head.split(' ').nth(1)?.parse().ok()
}

/// The real user id of a running process.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

#[test]
fn images_are_named_labelled_and_report_their_version_as_nonroot() {
    let Some(images) = images("images_are_named_labelled_and_report_their_version_as_nonroot")
    else {
        return;
    };
    let git_head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    for (image, name, chart) in [
        (&images.server, "tower-server", "charts/tower-server"),
        (&images.agent, "tower-agent", "charts/tower-agent"),
    ] {
        // The name a chart installed with its defaults pulls.
        let version = chart_value(&format!("{chart}/Chart.yaml"), "appVersion");
        let repository = chart_value(&format!("{chart}/values.yaml"), "image.repository");
        assert_eq!(image.reference, format!("{repository}:{version}"));
        assert_eq!(image.user(), "65532:65532", "{name}: non-root");
        assert_eq!(image.entrypoint(), [format!("/usr/local/bin/{name}")]);
        assert_eq!(image.label("org.opencontainers.image.version"), version);
        assert_eq!(
            image.label("org.opencontainers.image.source"),
            "https://github.com/kubesphere/tower-rs"
        );
        let revision = image.label("org.opencontainers.image.revision").to_string();
        if std::env::var_os("TOWER_REVISION").is_none()
            && let Some(head) = &git_head
        {
            // HEAD when the script ran: HEAD now, or one of its ancestors if a
            // commit landed since (a checkout shared with other work).
            let ancestor = || {
                Command::new("git")
                    .args(["merge-base", "--is-ancestor", &revision, head])
                    .current_dir(repo_root())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            assert!(
                revision == *head || (revision.len() == 40 && ancestor()),
                "{name}: revision label {revision:?}, HEAD is {head}"
            );
        }
        // No shell, and nothing the user could write to but /tmp.
        assert!(!image.root.join("bin/sh").exists(), "{name} has a shell");
        let short = if revision.len() >= 7 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
            &revision[..7]
        } else {
            &revision
        };
        let out = image.command(&["--version"], &[]).output().unwrap();
        assert!(
            out.status.success(),
            "{name} --version inside its image: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("{name} {version} (rev {short})")
        );
        if name == "tower-agent" {
            // KubeSphere's agent Deployment runs `/agent`: only its image changes.
            let out = Command::new(chroot_bin())
                .arg(format!("--userspec={}", image.user()))
                .arg(&image.root)
                .args(["/agent", "--version"])
                .env_clear()
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("{name} {version} (rev {short})"),
                "/agent --version: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_image_serves_and_agent_image_connects_to_it() {
    let Some(images) = images("server_image_serves_and_agent_image_connects_to_it") else {
        return;
    };
    install_crypto_provider();
    let logs = tempfile::tempdir().unwrap();

    // The server, with its state in a directory of its user's (the chart's
    // emptyDir), creating its CA and host key there itself.
    let server_image = &images.server;
    let state = server_image.owned_dir("/var/lib/tower");
    let server_ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server_log = logs.path().join("server.log");
    let mut server = Process::spawn(
        "tower-server (image)",
        server_image.command(
            &[
                "--state-dir=/var/lib/tower",
                "--ssh-listen=127.0.0.1:0",
                "--gateway-listen=127.0.0.1:0",
                "--gateway-url=https://127.0.0.1",
                &format!("--ops-listen={server_ops}"),
                "--keepalive-interval=0.5",
                "--print-ports",
            ],
            &[("RUST_LOG", "info")],
        ),
        &server_log,
    )
    .unwrap();
    let ports = eventually(Duration::from_secs(20), || async {
        let log = std::fs::read_to_string(&server_log).unwrap_or_default();
        log.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            let ssh: u16 = words.next()?.strip_prefix("ssh=")?.parse().ok()?;
            let gateway: u16 = words.next()?.strip_prefix("gateway=")?.parse().ok()?;
            Some((ssh, gateway))
        })
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "tower-server in its image printed no ports (running: {}); log:\n{}",
            server.is_running(),
            log_tail(&server_log, 20)
        )
    });
    let ssh_addr = SocketAddr::from(([127, 0, 0, 1], ports.0));
    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], ports.1));
    assert_eq!(uid_of(server.pid()), 65532, "tower-server runs as nonroot");
    for path in ["/healthz", "/readyz"] {
        let ok = eventually(Duration::from_secs(10), || async {
            (ops_status(server_ops, path).await == Some(200)).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "server {path} never 200; log:\n{}",
            log_tail(&server_log, 20)
        );
    }
    assert!(
        state.join(tower_server::HOST_KEY_FILE).exists(),
        "the server made its host key in its state dir"
    );

    // A join token minted in that state (as towerctl would), readable by the
    // server's user again afterwards.
    let token = mint_in(&state, "minas-tirith", vec![ssh_addr.to_string()], None).unwrap();
    let view = Server::open(ServerConfig::new(&state, "https://127.0.0.1")).unwrap();
    let identity = identity_from_kubeconfig(&view.kubeconfig("minas-tirith").unwrap()).unwrap();
    chown_tree(&state, server_image.uid_gid());

    // The agent, its files copied into its image (the chart mounts them from
    // Secrets and the service account), readable by its user only.
    let agent_image = &images.agent;
    let upstream = HttpsUpstream::bytes(logs.path()).await.unwrap();
    let secrets = agent_image.owned_dir("/etc/tower");
    std::fs::write(secrets.join("join-token"), token.encode()).unwrap();
    std::fs::copy(&upstream.ca_file, secrets.join("ca.crt")).unwrap();
    std::fs::write(secrets.join("sa-token"), "agent-credential").unwrap();
    chown_tree(&secrets, agent_image.uid_gid());
    let agent_ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent_log = logs.path().join("agent.log");
    let agent = Process::spawn(
        "tower-agent (image)",
        agent_image.command(
            &[
                "--token-file=/etc/tower/join-token",
                &format!("--kube-apiserver={}", upstream.url),
                "--kube-ca-file=/etc/tower/ca.crt",
                "--kube-token-file=/etc/tower/sa-token",
                &format!("--ops-listen={agent_ops}"),
                "--keepalive-interval=0.5",
                "--backoff-max=1",
            ],
            &[("RUST_LOG", "info")],
        ),
        &agent_log,
    )
    .unwrap();
    let ready = eventually(Duration::from_secs(30), || async {
        (ops_status(agent_ops, "/readyz").await == Some(200)).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "agent /readyz never 200; agent log:\n{}\nserver log:\n{}",
        log_tail(&agent_log, 20),
        log_tail(&server_log, 20)
    );
    assert_eq!(uid_of(agent.pid()), 65532, "tower-agent runs as nonroot");
    // A request through the server image's gateway, the tunnel and the agent
    // image, answered by the agent's upstream.
    until_ok(
        gateway_addr,
        view.ca_pem(),
        &identity,
        "/clusters/minas-tirith/version",
        Duration::from_secs(20),
    )
    .await;
    drop(agent);
    server.terminate();
}
