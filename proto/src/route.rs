//! The gateway's URL forms: which cluster and upstream a request path is for,
//! the path to send there, and the cluster URL a kubeconfig names.
//!
//! Accepted forms (the `/clusters/{cluster}` segment is removed):
//! - `/clusters/{c}/…`        → kube-apiserver `/…`
//! - `/api/clusters/{c}/…`    → kube-apiserver `/api/…`
//! - `/apis/clusters/{c}/…`   → kube-apiserver `/apis/…`
//! - `/kapis/clusters/{c}/…`  → ks-apiserver `/kapis/…`
//!
//! Traversal (`.`/`..` segments, percent-encoded dots, slashes or backslashes)
//! and invalid cluster names are rejected before anything is forwarded.

use crate::names::{UPSTREAM_KS_APISERVER, UPSTREAM_KUBE_APISERVER, is_valid_cluster_name};

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRoute {
    pub cluster: String,
    pub upstream: &'static str,
    /// Path plus query to send upstream; always starts with `/`.
    pub path_and_query: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("path does not name a cluster; use /clusters/{{cluster}}/…")]
    NotACluster,
    #[error("invalid cluster name")]
    BadClusterName,
    #[error("path traversal or encoded separators are not allowed")]
    Traversal,
}

/// The URL of `cluster` through the gateway at `gateway_url`: the server of
/// its kubeconfig, which [`route`] takes apart again.
pub fn cluster_url(gateway_url: &str, cluster: &str) -> String {
    format!("{}/clusters/{cluster}", gateway_url.trim_end_matches('/'))
}

/// Routes a raw (still percent-encoded) request path and optional query.
pub fn route(path: &str, query: Option<&str>) -> Result<ClusterRoute, RouteError> {
    check_path(path)?;
    let (prefix, rest) = if let Some(rest) = path.strip_prefix("/clusters/") {
        ("", rest)
    } else if let Some(rest) = path.strip_prefix("/api/clusters/") {
        ("/api", rest)
    } else if let Some(rest) = path.strip_prefix("/apis/clusters/") {
        ("/apis", rest)
    } else if let Some(rest) = path.strip_prefix("/kapis/clusters/") {
        ("/kapis", rest)
    } else {
        return Err(RouteError::NotACluster);
    };
    let (cluster, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !is_valid_cluster_name(cluster) {
        return Err(RouteError::BadClusterName);
    }
    let upstream = if prefix == "/kapis" {
        UPSTREAM_KS_APISERVER
    } else {
        UPSTREAM_KUBE_APISERVER
    };
    let mut path_and_query = format!("{prefix}{tail}");
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    Ok(ClusterRoute {
        cluster: cluster.to_string(),
        upstream,
        path_and_query,
    })
}

fn check_path(path: &str) -> Result<(), RouteError> {
    if !path.starts_with('/') || path.contains('\\') {
        return Err(RouteError::Traversal);
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00"]
        .iter()
        .any(|p| lower.contains(p))
    {
        return Err(RouteError::Traversal);
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(RouteError::Traversal);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str, q: Option<&str>) -> (String, &'static str, String) {
        let r = route(path, q).unwrap();
        (r.cluster, r.upstream, r.path_and_query)
    }

    #[test]
    fn four_forms() {
        assert_eq!(
            ok("/clusters/gondor/api/v1/namespaces", Some("limit=5")),
            (
                "gondor".into(),
                UPSTREAM_KUBE_APISERVER,
                "/api/v1/namespaces?limit=5".into()
            )
        );
        assert_eq!(ok("/clusters/gondor", None).2, "/");
        assert_eq!(ok("/api/clusters/gondor/v1/pods", None).2, "/api/v1/pods");
        assert_eq!(ok("/apis/clusters/gondor/apps/v1", None).2, "/apis/apps/v1");
        assert_eq!(
            ok(
                "/kapis/clusters/gondor/resources.kubesphere.io/v1alpha3",
                None
            ),
            (
                "gondor".into(),
                UPSTREAM_KS_APISERVER,
                "/kapis/resources.kubesphere.io/v1alpha3".into()
            )
        );
    }

    #[test]
    fn a_cluster_url_routes_back_to_its_cluster() {
        let url = cluster_url("https://tower.example:8443/", "gondor");
        assert_eq!(url, "https://tower.example:8443/clusters/gondor");
        let path = url.trim_start_matches("https://tower.example:8443");
        assert_eq!(ok(&format!("{path}/version"), None).0, "gondor");
    }

    #[test]
    fn rejects_traversal_and_bad_names() {
        for p in [
            "/clusters/../x",
            "/clusters/gondor/../../etc",
            "/clusters/gondor/%2e%2e/x",
            "/clusters/gondor/%2E%2E/x",
            "/clusters/gondor%2fx/api",
            "/clusters/gondor/./api",
            "/clusters/gondor\\..\\x",
        ] {
            assert_eq!(route(p, None), Err(RouteError::Traversal), "{p}");
        }
        assert_eq!(
            route("/clusters//api", None),
            Err(RouteError::BadClusterName)
        );
        assert_eq!(route("/clusters/", None), Err(RouteError::BadClusterName));
        assert_eq!(
            route("/clusters/Gondor/api", None),
            Err(RouteError::BadClusterName)
        );
        assert_eq!(route("/api/v1/pods", None), Err(RouteError::NotACluster));
        assert_eq!(route("/", None), Err(RouteError::NotACluster));
    }
}
