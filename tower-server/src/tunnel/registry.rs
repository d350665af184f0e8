//! Live sessions by cluster name, and notice of every change to them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::Session;
use crate::metrics::Metrics;

/// Live sessions by cluster name. At most one session per cluster: a new one
/// replaces (and disconnects) the old.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    changed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// A registry that reports into `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            ..Default::default()
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Adds `session`, returning the one it replaced.
    pub fn insert(&self, session: Arc<Session>) -> Option<Arc<Session>> {
        let _ = session.metrics.set(self.metrics.clone());
        let _ = session.registry_changed.set(self.changed.clone());
        let mut sessions = self.lock();
        let old = sessions.insert(session.cluster.clone(), session.clone());
        self.metrics.sessions.set(sessions.len() as i64);
        drop(sessions);
        self.changed.send_modify(|g| *g += 1);
        old
    }

    /// Removes the session for `cluster` if it is still `id`.
    pub fn remove(&self, cluster: &str, id: u64) {
        let mut sessions = self.lock();
        if sessions.get(cluster).is_some_and(|s| s.id == id) {
            sessions.remove(cluster);
            self.metrics.sessions.set(sessions.len() as i64);
            drop(sessions);
            self.changed.send_modify(|g| *g += 1);
        }
    }

    pub fn get(&self, cluster: &str) -> Option<Arc<Session>> {
        self.lock().get(cluster).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().values().cloned().collect()
    }

    /// A receiver that changes whenever a session comes, goes, changes
    /// upstreams or first measures its round trip.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Notifies a change to observers (upstream added or removed).
    pub fn touch(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Whether `cluster` has a session serving kube-apiserver.
    pub fn is_connected(&self, cluster: &str) -> bool {
        self.get(cluster).is_some_and(|s| {
            s.upstreams()
                .iter()
                .any(|u| u == tower_proto::names::UPSTREAM_KUBE_APISERVER)
        })
    }

    /// Whether `cluster`'s session here was asked to move to another replica.
    pub fn is_moving(&self, cluster: &str) -> bool {
        self.get(cluster).is_some_and(|s| s.is_moving())
    }

    /// The session for `cluster` once it can answer for `upstream`: its
    /// agent forwards it, or said in its hello that it never will (the
    /// session then refuses it). A session whose forwarding requests have not
    /// all arrived yet is not ready: requests go where its cluster was served
    /// before (a moving agent's previous session).
    pub fn ready(&self, cluster: &str, upstream: &str) -> Option<Arc<Session>> {
        self.get(cluster).filter(|s| {
            let forwarded = s.upstreams();
            forwarded.iter().any(|u| u == upstream)
                || match s.hello() {
                    Some(hello) => !hello.upstreams.iter().any(|u| u == upstream),
                    // OpenSSH as an agent says no hello.
                    None => !forwarded.is_empty(),
                }
        })
    }

    /// Waits until `is_connected(cluster) == want`, or `timeout`.
    pub async fn wait_connected(&self, cluster: &str, want: bool, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                if self.is_connected(cluster) == want {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && self.is_connected(cluster) == want
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().expect("registry poisoned")
    }
}
