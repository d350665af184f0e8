//! Join tokens: which exist, for which cluster, and whether they are still good.
//!
//! The server only ever holds a SHA-256 digest of each secret and compares
//! digests in constant time. [`TokenStore`] is the interface the server uses;
//! [`FileStore`] is the embedded, file-backed implementation (`--state-dir`),
//! shared with `towerctl`, which writes the file while the server re-reads it.
//! In Kubernetes mode the tokens come from Cluster and Agent objects instead
//! (`crate::kube::KubeTokenStore`).

mod file;

pub use file::{FileStore, TokenRecord};

use tower_proto::token::Secret;

/// The outcome of checking a presented credential or a live session's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Good; carries the token id that matched.
    Valid { token_id: String },
    /// No token for this cluster matches.
    Unknown,
    /// The token matched but has expired.
    Expired,
    /// The token matched but was revoked.
    Revoked,
}

impl Verdict {
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Valid { .. } => "valid",
            Verdict::Unknown => "unknown or wrong token",
            Verdict::Expired => "token expired",
            Verdict::Revoked => "token revoked",
        }
    }
}

/// What the server needs from a token store.
pub trait TokenStore: Send + Sync + 'static {
    /// Checks a presented credential for `cluster`. `id` is `None` for a bare
    /// secret (KubeSphere's `spec.connection.token`).
    fn check(&self, cluster: &str, id: Option<&str>, secret: &Secret) -> Verdict;
    /// Re-checks a token that authenticated a live session.
    fn recheck(&self, cluster: &str, token_id: &str) -> Verdict;
    /// Whether `cluster` is known at all (has any token, even a revoked one).
    fn knows(&self, cluster: &str) -> bool;
    /// Reloads the backing data if it changed; called periodically.
    fn refresh(&self) -> anyhow::Result<()>;
}
