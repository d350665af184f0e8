//! kube-proxy for a client outside the test bed's Rust code (kubectl, a child process): a
//! loopback port that stands for one `<ClusterIP>:<port>`. Every accepted connection is
//! resolved afresh through the [`ServiceDialer`] and spliced byte for byte, so a change of the
//! Service's selector or targetPort takes effect for new connections while established ones
//! keep their destination, as with kube-proxy's DNAT and conntrack (kubernetes
//! pkg/proxy/iptables/proxier.go). A connection that cannot be resolved or dialled is closed
//! at once, as kube-proxy's `REJECT` does.
//!
//! [`kubeconfig_via`] points a kubeconfig at such a port while keeping the ClusterIP as the
//! TLS server name, so the client verifies the same identity it would inside the cluster.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ServiceDialer;

/// A running proxy for one Service address; stops when dropped.
pub struct ServiceProxy {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl ServiceProxy {
    /// Listens on `127.0.0.1:0` and forwards each connection to wherever `host:port` (a
    /// ClusterIP, or a Service DNS name) leads through `dialer` at the moment it is accepted.
    pub async fn start(dialer: ServiceDialer, host: &str, port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the service proxy")?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let host = host.to_string();
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((sock, _)) => sock,
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let dialer = dialer.clone();
                let host = host.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut backend = match dialer.connect(&host, port).await {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::debug!(%host, port, error = %format!("{e:#}"), "service proxy: rejected");
                            return; // dropping the client closes it
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut backend) => {}
                    }
                });
            }
        });
        Ok(Self { addr, shutdown })
    }

    /// Where clients connect (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every connection through it.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `kubeconfig_yaml` (YAML or JSON) with every cluster's `server` pointed at `proxy_addr`
/// (`https://<proxy_addr>`, any path kept) and its `tls-server-name` set to the host the
/// server named (unless one is set already), so kubectl and kube-rs verify the certificate
/// for the ClusterIP while connecting through a [`ServiceProxy`]. Returns YAML.
pub fn kubeconfig_via(kubeconfig_yaml: &str, proxy_addr: SocketAddr) -> anyhow::Result<String> {
    let mut config: serde_json::Value =
        yaml_serde::from_str(kubeconfig_yaml).context("parsing the kubeconfig")?;
    if let Some(clusters) = config["clusters"].as_array_mut() {
        for entry in clusters {
            let cluster = &mut entry["cluster"];
            let Some(server) = cluster["server"].as_str().map(str::to_string) else {
                continue;
            };
            let uri: http::Uri = server
                .parse()
                .with_context(|| format!("parsing {server}"))?;
            let host = uri
                .host()
                .with_context(|| format!("{server} names no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let path = uri
                .path_and_query()
                .map(|p| p.as_str())
                .filter(|p| *p != "/")
                .unwrap_or("");
            cluster["server"] = format!("https://{proxy_addr}{path}").into();
            if cluster.get("tls-server-name").is_none_or(|v| v.is_null()) {
                cluster["tls-server-name"] = host.into();
            }
        }
    }
    Ok(yaml_serde::to_string(&config)?)
}
