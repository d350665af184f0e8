//! Tower's certificate authority and the key material minted from it.
//!
//! - [`Ca`]: a self-signed CA that issues gateway serving certificates and the
//!   client certificates placed in synthesized kubeconfigs. The test bed uses the
//!   same type for its throwaway cluster CAs.
//! - [`HostKey`]: the server's persistent Ed25519 SSH host key and its SHA-256
//!   fingerprint, which travels inside join tokens so agents can pin it.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

pub use russh::keys::{HashAlg, PrivateKey, PublicKey};

/// Errors from minting, loading or storing key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("SSH key error: {0}")]
    SshKey(#[from] russh::keys::ssh_key::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid PEM: {0}")]
    Pem(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A certificate and its private key, both PEM-encoded.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Subject of a client certificate: Kubernetes reads CN as the user and O as groups.
#[derive(Clone, Debug)]
pub struct ClientIdentity {
    pub common_name: String,
    pub organizations: Vec<String>,
}

// === impl Ca ===

/// A certificate authority that can issue serving and client certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let issuer = Issuer::new(params, key);
        Ok(Self {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// Loads a CA from its PEM certificate and PEM (PKCS#8) private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Loads `ca.crt`/`ca.key` from `dir`, or generates and writes them (key mode 0600).
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Self> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert = read(&cert_path)?;
            let key = read(&key_path)?;
            return Self::from_pem(&cert, &key);
        }
        let ca = Self::generate(common_name)?;
        write(&cert_path, &ca.cert_pem, 0o644)?;
        write(&key_path, &ca.key_pem, 0o600)?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a TLS serving certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, hosts: &[&str], validity: Duration) -> Result<CertifiedKey> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            hosts.first().copied().unwrap_or("tower"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*h).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// Issues a TLS client certificate for `identity`.
    pub fn issue_client(
        &self,
        identity: &ClientIdentity,
        validity: Duration,
    ) -> Result<CertifiedKey> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.common_name.as_str());
        for org in &identity.organizations {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    fn sign(&self, mut params: CertificateParams, validity: Duration) -> Result<CertifiedKey> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + validity;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

// === impl HostKey ===

/// The server's SSH host key (Ed25519).
#[derive(Clone)]
pub struct HostKey {
    key: PrivateKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl HostKey {
    /// Generates a fresh Ed25519 host key from the OS CSPRNG.
    pub fn generate() -> Result<Self> {
        use std::io::Read;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|source| Error::Io {
                path: "/dev/urandom".into(),
                source,
            })?;
        let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
        Ok(Self {
            key: PrivateKey::from(pair),
        })
    }

    /// Parses an OpenSSH-format private key.
    pub fn from_openssh(pem: &str) -> Result<Self> {
        Ok(Self {
            key: PrivateKey::from_openssh(pem)?,
        })
    }

    /// Loads the key at `path`, or generates one and writes it there (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if path.exists() {
            return Self::from_openssh(&read(path)?);
        }
        let key = Self::generate()?;
        write(path, &key.to_openssh()?, 0o600)?;
        Ok(key)
    }

    pub fn to_openssh(&self) -> Result<String> {
        Ok(self
            .key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)?
            .to_string())
    }

    pub fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The `SHA256:…` fingerprint, as OpenSSH prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.public_key())
    }
}

/// The fingerprint a join token pins `key` by
/// ([`tower_proto::token::host_key_fingerprint`]).
pub fn fingerprint(key: &PublicKey) -> String {
    let blob = key
        .to_bytes()
        .expect("an in-memory public key always encodes");
    tower_proto::token::host_key_fingerprint(&blob)
}

/// Base64 (standard, padded) of `data`, as kubeconfig `*-data` fields expect.
pub fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `contents` to `path` with the given Unix mode, creating parent dirs.
pub fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Parses PEM certificates into DER for rustls.
pub fn parse_certs(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem(e.to_string()))
}

/// Parses a PEM private key for rustls.
pub fn parse_key(pem: &str) -> Result<rustls_pki_types::PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| Error::Pem(e.to_string()))?
        .ok_or_else(|| Error::Pem("no private key found".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_and_issues() {
        let ca = Ca::generate("tower-test").unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let server = again
            .issue_server(&["localhost", "127.0.0.1"], Duration::from_secs(3600))
            .unwrap();
        assert!(server.cert_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(parse_certs(&server.cert_pem).unwrap().len(), 1);
        parse_key(&server.key_pem).unwrap();
        let client = ca
            .issue_client(
                &ClientIdentity {
                    common_name: "admin".into(),
                    organizations: vec!["system:masters".into()],
                },
                Duration::from_secs(3600),
            )
            .unwrap();
        assert!(!format!("{client:?}").contains("PRIVATE"));
    }

    #[test]
    fn host_key_persists_with_stable_fingerprint() {
        let dir = std::env::temp_dir().join(format!("tower-certs-{}", std::process::id()));
        let path = dir.join("host_key");
        let a = HostKey::load_or_create(&path).unwrap();
        let b = HostKey::load_or_create(&path).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.fingerprint().starts_with("SHA256:"));
        // The same text OpenSSH (and ssh-key) print.
        assert_eq!(
            a.fingerprint(),
            a.public_key().fingerprint(HashAlg::Sha256).to_string()
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
