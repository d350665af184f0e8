//! kube-proxy stand-in: the test bed runs no kube-proxy, so a Service's ClusterIP routes
//! nowhere. [`ServiceDialer`] does what kube-proxy's DNAT does for a Service whose endpoints
//! are on this machine: `<ClusterIP>:<port>` becomes `<pod IP>:<targetPort>`, looked up in the
//! host cluster's Services. The destination changes, nothing else: a TLS client still verifies
//! the server as the ClusterIP (`tls-server-name`).
//!
//! The test bed has no pods either, so the dialer also keeps a registry of "pods" (labels and
//! a loopback IP such as `127.0.0.2`, [`ServiceDialer::add_pod`]) standing in for the
//! endpoints controller: a Service's selector picks the first registered pod whose labels
//! contain all of it (kubernetes pkg/controller/endpointslice: the selector is
//! `labels.Set(spec.selector)`, every pair must match), and a selector that matches no pod is
//! refused as kube-proxy refuses a Service port without endpoints (kubernetes
//! pkg/proxy/iptables/proxier.go: a `REJECT` rule, "has no endpoints"). A selector change
//! takes effect for the next connection, as with kube-proxy. With no pod registered at all,
//! every selector leads to `127.0.0.1`, where the test bed's in-process servers listen.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::net::TcpStream;

/// Resolves and dials Service addresses of one host cluster as kube-proxy would.
///
/// Clones share one pod registry.
#[derive(Clone)]
pub struct ServiceDialer {
    host: kube::Client,
    pods: Arc<Mutex<Vec<Pod>>>,
}

/// A registered "pod": its labels and its IP.
#[derive(Clone, Debug)]
struct Pod {
    labels: BTreeMap<String, String>,
    ip: IpAddr,
}

/// Where a URL's host and port lead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// The host as written in the URL (a ClusterIP, a DNS name, `127.0.0.1`): the TLS name.
    pub host: String,
    /// The port as written in the URL (or the scheme's default).
    pub port: u16,
    /// Where a connection really goes.
    pub addr: SocketAddr,
}

impl ServiceDialer {
    /// A dialer that looks Services up through `host`, a client of the host cluster.
    pub fn new(host: kube::Client) -> Self {
        Self {
            host,
            pods: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Registers a ready pod with `labels` at `ip` (a loopback address the pod's servers
    /// listen on), seen by every clone of this dialer. Pods are matched in the order added.
    pub fn add_pod(&self, labels: &[(&str, &str)], ip: IpAddr) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.lock_pods().push(Pod { labels, ip });
    }

    /// Removes every registered pod at `ip` (the pod is gone).
    pub fn remove_pod(&self, ip: IpAddr) {
        self.lock_pods().retain(|p| p.ip != ip);
    }

    fn lock_pods(&self) -> std::sync::MutexGuard<'_, Vec<Pod>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The IP a Service with `selector` leads to: `127.0.0.1` when it has no selector or no
    /// pod is registered, else the first registered pod the selector matches (all of its
    /// key=value pairs), else an error (no ready endpoints).
    fn endpoint_ip(
        &self,
        name: &str,
        selector: Option<&BTreeMap<String, String>>,
    ) -> anyhow::Result<IpAddr> {
        let localhost = IpAddr::from(Ipv4Addr::LOCALHOST);
        let Some(selector) = selector.filter(|s| !s.is_empty()) else {
            return Ok(localhost);
        };
        let pods = self.lock_pods();
        if pods.is_empty() {
            return Ok(localhost);
        }
        pods.iter()
            .find(|pod| {
                selector
                    .iter()
                    .all(|(k, v)| pod.labels.get(k).is_some_and(|l| l == v))
            })
            .map(|pod| pod.ip)
            .with_context(|| format!("Service {name} has no ready endpoints"))
    }

    /// Where a connection to `host:port` goes.
    ///
    /// - An IP that is some Service's ClusterIP: `<pod IP>:<targetPort>` of the Service port
    ///   numbered `port` (a numeric targetPort; none means the same port), or an error when the
    ///   Service has no such port (kube-proxy rejects it). The pod IP is that of the first
    ///   registered pod the Service's selector matches ([`ServiceDialer::add_pod`]; an error
    ///   when none does), or `127.0.0.1` when no pod is registered or the Service has no
    ///   selector.
    /// - `<svc>.<ns>.svc[.cluster.local]`: that Service's ClusterIP, then as above.
    /// - `localhost` or any other IP: itself (routed normally, as kube-proxy leaves it).
    pub async fn resolve(&self, host: &str, port: u16) -> anyhow::Result<SocketAddr> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host == "localhost" {
            return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
        }
        let services = Api::<Service>::all(self.host.clone())
            .list(&ListParams::default())
            .await
            .context("listing the host's Services")?;
        let ip: IpAddr = match host.parse() {
            Ok(ip) => ip,
            Err(_) => {
                let mut labels = host.split('.');
                let (Some(name), Some(namespace), Some("svc")) =
                    (labels.next(), labels.next(), labels.next())
                else {
                    bail!(
                        "cannot resolve {host}: only Service names and IPs resolve in the test bed"
                    );
                };
                let svc = services
                    .items
                    .iter()
                    .find(|s| {
                        s.metadata.name.as_deref() == Some(name)
                            && s.metadata.namespace.as_deref() == Some(namespace)
                    })
                    .with_context(|| format!("no Service {namespace}/{name} for {host}"))?;
                svc.spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse().ok())
                    .with_context(|| format!("Service {namespace}/{name} has no ClusterIP"))?
            }
        };
        let owner = services.items.iter().find(|s| {
            s.spec.as_ref().is_some_and(|spec| {
                spec.cluster_ip.as_deref() == Some(&ip.to_string())
                    || spec
                        .cluster_ips
                        .as_ref()
                        .is_some_and(|ips| ips.iter().any(|i| *i == ip.to_string()))
            })
        });
        let Some(svc) = owner else {
            return Ok(SocketAddr::new(ip, port));
        };
        let name = format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or_default(),
            svc.metadata.name.as_deref().unwrap_or_default()
        );
        let service_port = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| ports.iter().find(|p| p.port == i32::from(port)))
            .with_context(|| format!("Service {name} ({ip}) has no port {port}"))?;
        let target = match &service_port.target_port {
            None => port,
            Some(IntOrString::Int(p)) => u16::try_from(*p)
                .with_context(|| format!("Service {name}: targetPort {p} out of range"))?,
            Some(IntOrString::String(named)) => {
                bail!("Service {name}: named targetPort {named} has no endpoint in the test bed")
            }
        };
        let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
        let ip = self.endpoint_ip(&name, selector)?;
        Ok(SocketAddr::new(ip, target))
    }

    /// The scheme, host, port and real destination of `url` (`http[s]://host[:port][/…]`).
    pub async fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let uri: http::Uri = url.parse().with_context(|| format!("parsing {url}"))?;
        let scheme = uri.scheme_str().unwrap_or("http").to_string();
        let host = uri
            .host()
            .with_context(|| format!("{url} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let addr = self.resolve(&host, port).await?;
        Ok(Endpoint {
            scheme,
            host,
            port,
            addr,
        })
    }

    /// A TCP connection to `host:port` through [`ServiceDialer::resolve`].
    pub async fn connect(&self, host: &str, port: u16) -> anyhow::Result<TcpStream> {
        let addr = self.resolve(host, port).await?;
        TcpStream::connect(addr)
            .await
            .with_context(|| format!("dial {host}:{port} (-> {addr})"))
    }

    /// `kubeconfig` (YAML or JSON) rewritten for a client on this machine: every cluster's
    /// `server` becomes `https://127.0.0.1:<targetPort>` and its `tls-server-name` the host it
    /// named (unless one is set already), so kubectl verifies the same identity it would
    /// through kube-proxy.
    pub async fn rewrite_kubeconfig(&self, kubeconfig: &[u8]) -> anyhow::Result<String> {
        let mut config: serde_json::Value =
            yaml_serde::from_slice(kubeconfig).context("parsing the kubeconfig")?;
        if let Some(clusters) = config["clusters"].as_array_mut() {
            for entry in clusters {
                let cluster = &mut entry["cluster"];
                let Some(server) = cluster["server"].as_str().map(str::to_string) else {
                    continue;
                };
                let endpoint = self.endpoint(&server).await?;
                if endpoint.addr.ip().is_loopback() && endpoint.addr.port() == endpoint.port {
                    continue;
                }
                cluster["server"] = format!("{}://{}", endpoint.scheme, endpoint.addr).into();
                if cluster.get("tls-server-name").is_none_or(|v| v.is_null()) {
                    cluster["tls-server-name"] = endpoint.host.into();
                }
            }
        }
        Ok(yaml_serde::to_string(&config)?)
    }

    /// A `kube::Client` from `kubeconfig` through [`ServiceDialer::rewrite_kubeconfig`]; also
    /// the `server` the kubeconfig's current context names (client-go's `rest.Config.Host`).
    pub async fn client(&self, kubeconfig: &[u8]) -> anyhow::Result<(kube::Client, String)> {
        let original = Kubeconfig::from_yaml(std::str::from_utf8(kubeconfig)?)
            .context("parsing the kubeconfig")?;
        let server = current_server(&original).context("the kubeconfig names no server")?;
        let rewritten = Kubeconfig::from_yaml(&self.rewrite_kubeconfig(kubeconfig).await?)?;
        crate::testbed::install_crypto_provider();
        let mut config =
            kube::Config::from_custom_kubeconfig(rewritten, &KubeConfigOptions::default()).await?;
        // client-go retries a request only when the answer carries Retry-After
        // (k8s.io/client-go rest/request.go, `checkWait` / `IsRetryableError`):
        // a plain 503 is an error at once. kube-rs would retry 429/503/504 on
        // its own; KubeSphere's controller and webhook do not.
        config.default_retry = false;
        Ok((kube::Client::try_from(config)?, server))
    }
}

/// The `server` of the kubeconfig's current context's cluster.
pub fn current_server(kubeconfig: &Kubeconfig) -> Option<String> {
    let context_name = kubeconfig.current_context.as_deref()?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)?
        .context
        .as_ref()?;
    kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)?
        .cluster
        .as_ref()?
        .server
        .clone()
}
