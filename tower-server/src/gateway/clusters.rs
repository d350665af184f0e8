//! The per-cluster listeners of KubeSphere mode. KubeSphere reaches a proxy
//! member at two addresses of its own, one port each, and its dispatcher keeps
//! the caller's Host header, so only a distinct port can tell clusters apart:
//! - the kube listener (port P): HTTPS, a serving certificate for the
//!   cluster's endpoint address and `mc-<cluster>` names, client certificates
//!   optional ([`super::identity::kube_listener_credential`]);
//! - the ks listener (port P+10000): plain HTTP to the member's ks-apiserver,
//!   the caller's `Authorization` passed through unchanged.
//!
//! Every replica serves every cluster's listeners (the `mc-` Services select
//! all tower pods); the controller says which to keep.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{ClientCert, Entry, TlsSource, serve_listener, tls_config};
use crate::server::Shared;

/// Lifetime of a kube listener's serving certificate; re-issued with the
/// process or when the cluster's names change.
const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A cluster's two ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterPorts {
    /// The kube listener (`spec.connection.kubernetesAPIServerPort`).
    pub kube: u16,
    /// The ks listener (`spec.connection.kubesphereAPIServerPort`).
    pub ks: u16,
}

/// The bound listeners, by cluster.
#[derive(Default)]
pub(crate) struct ClusterListeners {
    bound: Mutex<HashMap<String, Bound>>,
}

struct Bound {
    ports: ClusterPorts,
    hosts: Vec<String>,
    tls: TlsSource,
    stop: CancellationToken,
}

impl ClusterListeners {
    /// Makes sure `cluster`'s listeners are bound on `ports` with a serving
    /// certificate for `hosts`: binds them the first time, rebinds on new
    /// ports, re-issues the certificate on new names.
    pub(crate) fn ensure(
        &self,
        shared: &Arc<Shared>,
        cluster: &str,
        ports: ClusterPorts,
        hosts: Vec<String>,
    ) -> anyhow::Result<()> {
        let mut bound = self.bound.lock().expect("poisoned");
        if let Some(b) = bound.get_mut(cluster) {
            if b.ports == ports {
                if b.hosts != hosts {
                    *b.tls.write().expect("poisoned") = Arc::new(serving_tls(shared, &hosts)?);
                    b.hosts = hosts;
                    tracing::info!(%cluster, hosts = ?b.hosts, "kube listener serves a new certificate");
                }
                return Ok(());
            }
            b.stop.cancel();
            bound.remove(cluster);
        }
        let host = shared.config.cluster_listen_host;
        let kube = bind(host, ports.kube)
            .with_context(|| format!("binding cluster {cluster:?}'s kube listener"))?;
        let ks = bind(host, ports.ks)
            .with_context(|| format!("binding cluster {cluster:?}'s ks listener"))?;
        let tls: TlsSource = Arc::new(RwLock::new(Arc::new(serving_tls(shared, &hosts)?)));
        let stop = shared.shutdown.child_token();
        let name: Arc<str> = Arc::from(cluster);
        shared.tasks.spawn(serve_listener(
            shared.clone(),
            kube,
            Some(tls.clone()),
            Entry::Kube(name.clone()),
            stop.clone(),
        ));
        shared.tasks.spawn(serve_listener(
            shared.clone(),
            ks,
            None,
            Entry::Ks(name),
            stop.clone(),
        ));
        tracing::info!(%cluster, kube = ports.kube, ks = ports.ks, "cluster listeners bound");
        bound.insert(
            cluster.to_string(),
            Bound {
                ports,
                hosts,
                tls,
                stop,
            },
        );
        Ok(())
    }

    /// Closes the listeners of every cluster `keep` says no to.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.bound.lock().expect("poisoned").retain(|cluster, b| {
            let kept = keep(cluster);
            if !kept {
                tracing::info!(%cluster, "closing cluster listeners");
                b.stop.cancel();
            }
            kept
        });
    }

    /// The ports `cluster`'s listeners are bound on.
    pub(crate) fn ports(&self, cluster: &str) -> Option<ClusterPorts> {
        self.bound
            .lock()
            .expect("poisoned")
            .get(cluster)
            .map(|b| b.ports)
    }
}

fn bind(host: IpAddr, port: u16) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(host, port);
    let std = std::net::TcpListener::bind(addr).with_context(|| format!("on {addr}"))?;
    std.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std)?)
}

fn serving_tls(shared: &Shared, hosts: &[String]) -> anyhow::Result<rustls::ServerConfig> {
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let serving = shared.ca.issue_server(&hosts, SERVING_VALIDITY)?;
    tls_config(shared.ca.cert_pem(), &serving, ClientCert::Optional)
}
