//! Serving TLS: a serving certificate from the tower CA, and client
//! certificates verified against the same CA.

use std::sync::Arc;

/// Whether a listener insists on a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientCert {
    /// The path gateway: a handshake without a certificate fails.
    Required,
    /// A cluster's kube listener: a certificate is verified when presented;
    /// without one the caller must bring its own bearer token.
    Optional,
    /// The agents' WebSocket port: agents prove who they are inside SSH.
    None,
}

/// Builds a listener's rustls config: the tower CA verifies client
/// certificates; HTTP/2 and HTTP/1.1 are offered.
pub(crate) fn config(
    ca_pem: &str,
    serving: &tower_certs::CertifiedKey,
    client: ClientCert,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in tower_certs::parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?;
    let builder = match client {
        ClientCert::Required => builder.with_client_cert_verifier(verifier.build()?),
        ClientCert::Optional => {
            builder.with_client_cert_verifier(verifier.allow_unauthenticated().build()?)
        }
        ClientCert::None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(
        tower_certs::parse_certs(&serving.cert_pem)?,
        tower_certs::parse_key(&serving.key_pem)?,
    )?;
    config.alpn_protocols = match client {
        // A WebSocket upgrade is HTTP/1.1.
        ClientCert::None => vec![b"http/1.1".to_vec()],
        _ => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(config)
}
