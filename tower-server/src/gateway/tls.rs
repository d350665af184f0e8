//! The gateway's TLS: its serving certificate, and client certificates
//! verified against the tower CA.

use std::sync::Arc;

/// Builds the gateway's rustls config: tower CA verifies client certificates.
pub(crate) fn config(
    ca_pem: &str,
    serving: &tower_certs::CertifiedKey,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in tower_certs::parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            tower_certs::parse_certs(&serving.cert_pem)?,
            tower_certs::parse_key(&serving.key_pem)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
