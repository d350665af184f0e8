//! Names used on the wire: SSH subsystem, upstream and capability names.

/// SSH `subsystem` request that opens the control channel (hello, welcome, later messages).
pub const CONTROL_SUBSYSTEM: &str = "tower-control@kubesphere.io";

/// The member cluster's kube-apiserver.
pub const UPSTREAM_KUBE_APISERVER: &str = "kube-apiserver";
/// The member cluster's ks-apiserver (KubeSphere API), optional.
pub const UPSTREAM_KS_APISERVER: &str = "ks-apiserver";

/// Every upstream name an agent may ever serve. Anything else is refused by both sides.
pub const KNOWN_UPSTREAMS: &[&str] = &[UPSTREAM_KUBE_APISERVER, UPSTREAM_KS_APISERVER];

/// The agent serves HTTP/2 (with RFC 8441 extended CONNECT for upgrades) on each
/// forwarded channel. Without it, the server speaks one HTTP/1.1 exchange per channel.
pub const CAP_H2: &str = "h2";

/// The agent honours [`CREDENTIAL_HEADER`](crate::tunnel::CREDENTIAL_HEADER):
/// on such requests it passes the caller's own credential through and adds
/// none. The server never sends a caller's credential to an agent without it.
pub const CAP_CALLER_CREDENTIAL: &str = "caller-credential";

/// The agent acts on a [`Notice`](crate::hello::Notice) to move
/// ([`NOTICE_MOVE`](crate::hello::NOTICE_MOVE)): it opens a new session (which
/// lands on another replica), and drains and closes this one once the new one
/// is up. A server going away asks agents without it to leave by closing
/// their session.
pub const CAP_MOVE: &str = "move";

/// Port value the agent sends in `tcpip-forward`. It is informational: the
/// upstream is chosen by name, never by port.
pub const FORWARD_PORT: u32 = 80;

/// Whether `name` is a valid Kubernetes object name for a cluster (RFC 1123 label).
pub fn is_valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        assert!(is_valid_cluster_name("gondor"));
        assert!(is_valid_cluster_name("member-1"));
        for bad in ["", "..", "a/b", "A", "-x", "x-", "a%2e", &"a".repeat(64)] {
            assert!(!is_valid_cluster_name(bad), "{bad}");
        }
    }
}
