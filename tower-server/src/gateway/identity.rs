//! Who a gateway client is (its verified certificate's common name), which
//! cluster that lets it reach, and whose credential its requests carry to the
//! member. The rule (docs/security.md, "Identity by credential"):
//! - a tower client certificate issued for the cluster gets the agent's
//!   credential upstream;
//! - a caller without a certificate who brings a bearer token keeps it: the
//!   token reaches the member unchanged for the member to judge;
//! - a caller with neither gets 401 and reaches nothing.
//!
//! No header chooses between them: only the TLS handshake and the listener do.

use std::sync::Arc;

use http::{HeaderMap, Response, StatusCode, header};
use tower_proto::http::{Body, status};

/// Common-name prefix of the client certificates in synthesized kubeconfigs.
pub const CLIENT_CN_PREFIX: &str = "tower:";

/// The subject common name of the verified client certificate.
pub(crate) fn client_name(
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
/// The one cluster a client certificate reaches when certificates are bound
/// to their cluster (`CN=tower:<cluster>`): where a request whose path names
/// no cluster goes.
pub(super) fn own_cluster(bound: bool, client: Option<&str>) -> Option<&str> {
    bound
        .then(|| client?.strip_prefix(CLIENT_CN_PREFIX))
        .flatten()
        .filter(|c| tower_proto::names::is_valid_cluster_name(c))
}

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

/// Whose credential a request carries to the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The agent's own (the caller's `Authorization` never crosses).
    Agent,
    /// The caller's own `Authorization`, passed through unchanged; the agent
    /// adds nothing.
    Caller,
}

/// The credential rule of a cluster's kube listener for `cluster`: a client
/// certificate (already verified against the tower CA) must be bound to the
/// cluster and gets the agent's credential; without one, a bearer token is the
/// caller's own; with neither, 401.
pub(super) fn kube_listener_credential(
    bound: bool,
    client: Option<&str>,
    headers: &HeaderMap,
    cluster: &str,
) -> Result<Credential, Box<Response<Body>>> {
    if client.is_some() {
        return match refuse_other_cluster(bound, client, cluster) {
            Some(refused) => Err(Box::new(refused)),
            None => Ok(Credential::Agent),
        };
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .is_some_and(|t| !t.trim().is_empty());
    if bearer {
        Ok(Credential::Caller)
    } else {
        Err(Box::new(status(
            StatusCode::UNAUTHORIZED,
            format!(
                "cluster {cluster:?} needs a credential: a client certificate from its kubeconfig, or a bearer token the member accepts"
            ),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kube_listener_credential_rule() {
        let none = HeaderMap::new();
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic YTpi".parse().unwrap());
        let mut empty = HeaderMap::new();
        empty.insert(header::AUTHORIZATION, "Bearer  ".parse().unwrap());
        let cert = Some("tower:gondor");
        assert_eq!(
            kube_listener_credential(true, cert, &none, "gondor").unwrap(),
            Credential::Agent
        );
        assert_eq!(
            kube_listener_credential(true, cert, &bearer, "gondor").unwrap(),
            Credential::Agent,
            "a certificate wins; the header is dropped on the way"
        );
        let other = kube_listener_credential(true, cert, &bearer, "rohan").unwrap_err();
        assert_eq!(other.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            kube_listener_credential(true, None, &bearer, "gondor").unwrap(),
            Credential::Caller
        );
        for headers in [&none, &basic, &empty] {
            let refused = kube_listener_credential(true, None, headers, "gondor").unwrap_err();
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        }
    }

    #[test]
    fn a_bound_certificate_reaches_only_its_cluster() {
        assert!(refuse_other_cluster(true, Some("tower:gondor"), "gondor").is_none());
        let refused = refuse_other_cluster(true, Some("tower:gondor"), "rohan").unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refuse_other_cluster(true, None, "gondor").is_some());
        assert!(refuse_other_cluster(false, Some("tower:gondor"), "rohan").is_none());
    }
}
