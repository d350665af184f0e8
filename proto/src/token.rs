//! The join token: everything an agent needs to find, pin and prove itself to a server.
//!
//! Format: `tower1.<base64url(JSON claims)>.<base64url(secret)>`. The claims are
//! public (servers, host-key fingerprint, cluster, token id, expiry); the secret is
//! 32 bytes from the OS CSPRNG, base64url-encoded (a KubeSphere-set
//! `spec.connection.token` of at least 22 such characters is accepted too). The
//! server stores only SHA-256 of the secret.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::Digest;

const PREFIX: &str = "tower1";
/// Minimum secret length in characters of the base64url alphabet
/// (22 characters carry at least 128 bits when drawn from a CSPRNG).
pub const MIN_SECRET_CHARS: usize = 22;
/// Longest token accepted by the parser, to bound work on hostile input.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("join token is malformed: {0}")]
    Malformed(&'static str),
    #[error("join token version is not supported (expected {PREFIX})")]
    Version,
    #[error("join token secret is shorter than 128 bits")]
    WeakSecret,
}

/// A credential that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Fresh 256-bit secret from the OS CSPRNG, base64url-encoded.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        getrandom(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the secret, lowercase hex: what a server stores.
    pub fn digest(&self) -> String {
        digest_hex(self.0.as_bytes())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// SHA-256 of `data`, lowercase hex.
pub fn digest_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fingerprint a join token pins a server's host key by, as OpenSSH
/// prints it: `SHA256:` and the unpadded base64 of the SHA-256 of the key's
/// SSH wire encoding (`public_key_blob`).
pub fn host_key_fingerprint(public_key_blob: &[u8]) -> String {
    use base64::Engine;
    let digest = sha2::Sha256::digest(public_key_blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    // /dev/urandom is the OS CSPRNG on Linux; failing to read it is unrecoverable.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("reading the OS CSPRNG (/dev/urandom)");
}

/// A short random identifier (token ids).
pub fn random_id() -> String {
    let mut bytes = [0u8; 6];
    getrandom(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The public part of a join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// SSH addresses of the server (`host:port`), tried in order.
    pub servers: Vec<String>,
    /// The server's host-key fingerprint (`SHA256:…`); any other key is refused.
    pub host_key: String,
    /// The member cluster's name; also the SSH user.
    pub cluster: String,
    /// Identifies the token in the server's store (public).
    pub id: String,
    /// Expiry, seconds since the Unix epoch; informational for the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

/// A join token: claims plus secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub claims: Claims,
    pub secret: Secret,
}

impl JoinToken {
    /// Encodes the token into its single-line text form.
    pub fn encode(&self) -> String {
        let claims = serde_json::to_vec(&self.claims).expect("claims serialize");
        format!(
            "{PREFIX}.{}.{}",
            URL_SAFE_NO_PAD.encode(claims),
            self.secret.expose()
        )
    }

    /// Parses a token, rejecting anything malformed or weak.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let mut parts = text.split('.');
        let (Some(prefix), Some(claims), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        if prefix != PREFIX {
            return Err(TokenError::Version);
        }
        let claims = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&claims)
            .map_err(|_| TokenError::Malformed("claims are not valid JSON"))?;
        if !secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TokenError::Malformed(
                "secret must use the base64url alphabet",
            ));
        }
        if secret.len() < MIN_SECRET_CHARS {
            return Err(TokenError::WeakSecret);
        }
        if claims.servers.is_empty() {
            return Err(TokenError::Malformed("no server address"));
        }
        if !crate::names::is_valid_cluster_name(&claims.cluster) {
            return Err(TokenError::Malformed(
                "cluster name is not a valid DNS label",
            ));
        }
        if !claims.host_key.starts_with("SHA256:") {
            return Err(TokenError::Malformed(
                "host key fingerprint must be SHA256:…",
            ));
        }
        if claims.id.is_empty() || claims.id.len() > 64 || claims.id.contains(':') {
            return Err(TokenError::Malformed("bad token id"));
        }
        Ok(Self {
            claims,
            secret: Secret(secret.to_string()),
        })
    }

    /// What the agent presents as its SSH password: `<id>:<secret>`.
    pub fn credential(&self) -> Secret {
        Secret(format!("{}:{}", self.claims.id, self.secret.expose()))
    }
}

/// Splits an SSH password into `(token id, secret)`; `None` when there is no id
/// (a bare secret, as KubeSphere stores in `spec.connection.token`).
pub fn split_credential(password: &str) -> (Option<&str>, Secret) {
    match password.split_once(':') {
        Some((id, secret)) => (Some(id), Secret(secret.to_string())),
        None => (None, Secret(password.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            claims: Claims {
                servers: vec!["127.0.0.1:7022".into()],
                host_key: "SHA256:abc".into(),
                cluster: "gondor".into(),
                id: random_id(),
                expires: Some(1),
            },
            secret: Secret::generate(),
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        assert_eq!(JoinToken::parse(&t.encode()).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!(" {}\n", t.encode())).unwrap(), t);
    }

    #[test]
    fn secret_is_never_printed() {
        let t = sample();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(t.secret.expose()));
        assert!(!format!("{:?}", t.credential()).contains(t.secret.expose()));
    }

    #[test]
    fn rejects_bad_input() {
        let t = sample();
        let enc = t.encode();
        assert_eq!(
            JoinToken::parse(""),
            Err(TokenError::Malformed("expected three dot-separated parts"))
        );
        assert_eq!(
            JoinToken::parse(&enc.replacen("tower1", "tower9", 1)),
            Err(TokenError::Version)
        );
        assert!(JoinToken::parse(&format!("{enc}.x")).is_err());
        let short = format!(
            "{}.{}",
            enc.rsplit_once('.').unwrap().0,
            URL_SAFE_NO_PAD.encode([1u8; 8])
        );
        assert_eq!(JoinToken::parse(&short), Err(TokenError::WeakSecret));
        assert!(JoinToken::parse(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert!(JoinToken::parse("tower1.!!!.abc").is_err());
    }

    #[test]
    fn credential_split() {
        let t = sample();
        let cred = t.credential();
        let (id, secret) = split_credential(cred.expose());
        assert_eq!(id, Some(t.claims.id.as_str()));
        assert_eq!(secret, t.secret);
        assert_eq!(split_credential("bare").0, None);
    }
}
