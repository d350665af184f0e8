//! Who a gateway client is (its verified certificate's common name) and which
//! cluster that lets it reach.

use std::sync::Arc;

use http::{Response, StatusCode};
use tower_proto::http::{Body, status};

/// Common-name prefix of the client certificates in synthesized kubeconfigs.
pub const CLIENT_CN_PREFIX: &str = "tower:";

/// The subject common name of the verified client certificate.
pub(super) fn client_name(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Option<Arc<str>> {
    let der = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(cn))
}

/// With `bound` (`gateway_client_bound_to_cluster`), a client certificate
/// reaches only the cluster it was issued for (`CN=tower:<cluster>`, as every
/// synthesized kubeconfig carries): anything else is 403, before the gateway
/// says whether the other cluster exists.
pub(super) fn refuse_other_cluster(
    bound: bool,
    client: Option<&str>,
    cluster: &str,
) -> Option<Response<Body>> {
    if !bound {
        return None;
    }
    let allowed = client.and_then(|cn| cn.strip_prefix(CLIENT_CN_PREFIX));
    if allowed == Some(cluster) {
        return None;
    }
    Some(status(
        StatusCode::FORBIDDEN,
        format!(
            "this client certificate ({}) does not grant access to cluster {cluster:?}",
            client.map_or_else(|| "no common name".to_string(), |cn| format!("CN={cn}")),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_certificate_reaches_only_its_cluster() {
        assert!(refuse_other_cluster(true, Some("tower:gondor"), "gondor").is_none());
        let refused = refuse_other_cluster(true, Some("tower:gondor"), "rohan").unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refuse_other_cluster(true, None, "gondor").is_some());
        assert!(refuse_other_cluster(false, Some("tower:gondor"), "rohan").is_none());
    }
}
