//! Admission of connections that have not proved who they are yet (SSH before
//! authentication, gateway before its TLS handshake): caps overall and per
//! source with fair eviction, and log throttling, so that a flood stays
//! bounded and cannot lock legitimate peers out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The key a source is counted under: an IPv4 address, or the /64 of an IPv6
/// address (one host usually owns a whole /64, so counting single IPv6
/// addresses would let it rotate past every per-source limit).
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

// === impl Admission ===

/// Caps on connections that have not authenticated yet, overall and per
/// source. When the overall cap is full, a newcomer from a source holding fewer
/// connections than the busiest source takes the place of that source's oldest
/// one (which is cut), so a flood from a few sources cannot lock a legitimate
/// agent out: it needs as many distinct sources as the overall cap.
pub(crate) struct Admission {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<AdmissionState>,
    /// Logged (throttled) when [`Admission::admit_peer`] drops a connection.
    refusal: &'static str,
    refused: Throttled,
}

#[derive(Default)]
struct AdmissionState {
    next_id: u64,
    total: usize,
    /// Per source, its pending connections oldest first: id and cut switch.
    sources: HashMap<IpAddr, std::collections::VecDeque<(u64, CancellationToken)>>,
}

/// An unauthenticated slot, given back on drop. `cut` ends the connection
/// (the deadline, an eviction, or shutdown use it).
pub(crate) struct Pending {
    admission: Arc<Admission>,
    source: IpAddr,
    id: u64,
    pub(crate) cut: CancellationToken,
}

impl Admission {
    /// Caps of `max_total` overall and `max_per_source`; `refusal` is the
    /// warning logged when a connection is dropped.
    pub(crate) fn new(max_total: usize, max_per_source: usize, refusal: &'static str) -> Self {
        Self {
            max_total,
            max_per_source,
            state: Mutex::default(),
            refusal,
            refused: Throttled::default(),
        }
    }

    /// A slot for a connection from `peer`; `None` (with a throttled warning)
    /// when it must be dropped.
    pub(crate) fn admit_peer(self: &Arc<Self>, peer: SocketAddr) -> Option<Pending> {
        let pending = self.admit(peer.ip());
        if pending.is_none() {
            self.refused.warn(peer, self.refusal);
        }
        pending
    }

    /// A slot for a connection from `ip`, or `None` when it must be dropped.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Pending> {
        let source = source_key(ip);
        let mut state = self.state.lock().expect("admission poisoned");
        let here = state.sources.get(&source).map_or(0, |q| q.len());
        if here >= self.max_per_source || self.max_total == 0 {
            return None;
        }
        if state.total >= self.max_total {
            let (busiest, held) = state
                .sources
                .iter()
                .map(|(s, q)| (*s, q.len()))
                .max_by_key(|(_, n)| *n)?;
            if held <= here + 1 {
                return None;
            }
            let queue = state.sources.get_mut(&busiest)?;
            let (_, cut) = queue.pop_front()?;
            if queue.is_empty() {
                state.sources.remove(&busiest);
            }
            state.total -= 1;
            cut.cancel();
        }
        let id = state.next_id;
        state.next_id += 1;
        let cut = CancellationToken::new();
        state
            .sources
            .entry(source)
            .or_default()
            .push_back((id, cut.clone()));
        state.total += 1;
        Some(Pending {
            admission: self.clone(),
            source,
            id,
            cut,
        })
    }

    /// Unauthenticated connections held now, overall.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().expect("admission poisoned").total
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut state = self.admission.state.lock().expect("admission poisoned");
        let Some(queue) = state.sources.get_mut(&self.source) else {
            return;
        };
        let Some(at) = queue.iter().position(|(id, _)| *id == self.id) else {
            return; // evicted: already forgotten
        };
        queue.remove(at);
        if queue.is_empty() {
            state.sources.remove(&self.source);
        }
        state.total -= 1;
    }
}

// === impl Throttled ===

/// A warning logged at most once a second, with how many were suppressed, so
/// that a flood cannot turn into a log flood.
#[derive(Default)]
pub(crate) struct Throttled {
    last: Mutex<Option<Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttled {
    pub(crate) fn warn(&self, peer: SocketAddr, what: &str) {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().expect("throttle poisoned");
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(%peer, suppressed, "{what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_ipv4_addresses_or_ipv6_prefixes() {
        assert_eq!(source_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:ffff:1:2:3")),
            source_key(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:3::1")),
            source_key(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn admission_caps_per_source_and_overall() {
        let a = Arc::new(Admission::new(4, 3, "test"));
        let from_a: Vec<_> = (0..3).map(|_| a.admit(ip("10.0.0.1")).unwrap()).collect();
        assert!(a.admit(ip("10.0.0.1")).is_none(), "per-source cap");
        let b1 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.held(), 4);
        // Full. A newcomer from a quieter source evicts the busiest source's oldest.
        let c1 = a.admit(ip("10.0.0.3")).unwrap();
        assert!(
            from_a[0].cut.is_cancelled(),
            "oldest of the busiest source cut"
        );
        assert!(!from_a[1].cut.is_cancelled() && !b1.cut.is_cancelled());
        assert_eq!(a.held(), 4);
        // Now A holds 2, B 1, C 1: a second from B would tie with A, so it is refused.
        assert!(a.admit(ip("10.0.0.2")).is_none());
        // A fresh source still gets in by evicting from A.
        let d1 = a.admit(ip("10.0.0.4")).unwrap();
        assert!(from_a[1].cut.is_cancelled());
        // Every source holds one: nobody is evicted for a fifth source.
        assert!(a.admit(ip("10.0.0.5")).is_none());
        drop(from_a); // two evicted (already forgotten) and one live
        assert_eq!(a.held(), 3);
        drop((b1, c1, d1));
        assert_eq!(a.held(), 0);
        assert!(a.state.lock().unwrap().sources.is_empty());
    }
}
