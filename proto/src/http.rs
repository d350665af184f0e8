//! HTTP rules both ends of the tunnel apply: which headers never cross a hop,
//! which never reach a member cluster, the body type of every response either
//! end makes, and the Kubernetes `Status` error response.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

use crate::tunnel::{CREDENTIAL_HEADER, METHOD_HEADER};

/// The body of every response the gateway and the agent make: a stream
/// relayed from the other side, or bytes made here.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Headers that belong to one connection and are never forwarded, besides
/// those a `Connection` header lists.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
];

/// `headers` without hop-by-hop headers, including any a `Connection` header
/// names.
pub fn strip_hop_by_hop(headers: &HeaderMap) -> HeaderMap {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Whether `name` (lower case, as `http` stores it) asks the apiserver to
/// impersonate someone: `Impersonate-User`, `-Group`, `-Uid`, `-Extra-*`.
/// Requests carry them to the member, whose RBAC judges them under the
/// identity the request has there; responses never carry them
/// (docs/security.md).
pub fn is_impersonation(name: &str) -> bool {
    name.starts_with("impersonate-")
}

/// Removes every impersonation header from `headers`.
pub fn strip_impersonation(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|k| is_impersonation(k.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The headers of a request that cross the tunnel towards a member: no
/// hop-by-hop headers, no caller credential (the agent adds its own) and no
/// tunnel-internal header a caller could forge. Impersonation (`kubectl
/// --as`) is kept: the member decides whether the agent's identity may
/// impersonate, as it would for a direct client with that identity.
pub fn request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = caller_request_headers(headers);
    out.remove(header::AUTHORIZATION);
    out
}

/// The headers of a request that crosses the tunnel with the caller's own
/// credential ([`CREDENTIAL_HEADER`]): no hop-by-hop headers and no
/// tunnel-internal header, but `Authorization` and impersonation kept, for
/// the member to judge under the caller's identity.
pub fn caller_request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = strip_hop_by_hop(headers);
    out.remove(HeaderName::from_static(METHOD_HEADER));
    out.remove(HeaderName::from_static(CREDENTIAL_HEADER));
    out
}

/// Like [`caller_request_headers`], and the caller's `Host` kept, as a plain
/// TCP forwarder would: what the agent sends to the member's ks-apiserver for
/// a caller (KubeSphere's dispatcher keeps the console's Host).
pub fn caller_request_headers_with_host(headers: &HeaderMap) -> HeaderMap {
    let mut out = caller_request_headers(headers);
    if let Some(host) = headers.get(header::HOST) {
        out.insert(header::HOST, host.clone());
    }
    out
}

/// The headers of a response relayed through the tunnel or the gateway.
pub fn response_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = strip_hop_by_hop(headers);
    strip_impersonation(&mut out);
    out
}

/// Kubernetes' `reason` for an error status code.
pub fn status_reason(code: StatusCode) -> &'static str {
    match code {
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE | StatusCode::URI_TOO_LONG => {
            "RequestEntityTooLarge"
        }
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        StatusCode::GATEWAY_TIMEOUT => "Timeout",
        _ => "InternalError",
    }
}

/// A Kubernetes `Status` (kind `Status`, status `Failure`) as JSON text.
pub fn status_json(code: StatusCode, message: &str) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": status_reason(code),
        "code": code.as_u16(),
    })
    .to_string()
}

/// A `Status` response with Kubernetes' reason for `code`.
pub fn status(code: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(full(status_json(code, &message.into())));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whether a request streams until someone ends it: a watch, or logs followed.
pub fn is_watch(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "follow=true"))
    })
}

/// `body` (a watch's), ended cleanly at the first event boundary (a
/// newline-terminated frame) once `ends` completes: the client sees the watch
/// end as the apiserver ends one, and resumes it, instead of a cut stream.
pub fn ends_at_boundary(
    body: Body,
    ends: impl std::future::Future<Output = ()> + Send + 'static,
) -> Body {
    EndsAtBoundary {
        inner: body,
        ends: Box::pin(ends),
        at_boundary: true,
        ending: false,
    }
    .boxed_unsync()
}

struct EndsAtBoundary {
    inner: Body,
    ends: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    at_boundary: bool,
    ending: bool,
}

impl hyper::body::Body for EndsAtBoundary {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if !self.ending && self.ends.as_mut().poll(cx).is_ready() {
            self.ending = true;
        }
        if self.ending && self.at_boundary {
            return Poll::Ready(None);
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && !data.is_empty()
        {
            self.at_boundary = data.ends_with(b"\n");
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {

    /// A body of `frames`, each a data frame.
    fn frames(frames: &[&'static str]) -> Body {
        let frames: Vec<Result<hyper::body::Frame<Bytes>, hyper::Error>> = frames
            .iter()
            .map(|f| Ok(hyper::body::Frame::data(Bytes::from_static(f.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_watch_ends_at_the_next_event_boundary() {
        // Ending before anything was read: the body ends at once.
        let body = ends_at_boundary(frames(&["ev1\n", "ev2\n"]), async {});
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
        // Ending in the middle of an event: the event is finished first.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut body = ends_at_boundary(frames(&["ev1\n", "half", "-rest\n", "ev3\n"]), async {
            let _ = rx.await;
        });
        let mut got = Vec::new();
        for _ in 0..2 {
            let f = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(f.data_ref().unwrap());
        }
        tx.send(()).unwrap();
        while let Some(f) = body.frame().await {
            got.extend_from_slice(f.unwrap().data_ref().unwrap());
        }
        assert_eq!(got, b"ev1\nhalf-rest\n");
    }

    #[test]
    fn watches_are_told_by_their_query() {
        for (uri, watch) in [
            ("/api/v1/pods?watch=true", true),
            ("/api/v1/pods?labelSelector=a&watch=1", true),
            ("/api/v1/namespaces/x/pods/p/log?follow=true", true),
            ("/api/v1/pods", false),
            ("/api/v1/pods?watch=false", false),
        ] {
            assert_eq!(is_watch(&uri.parse().unwrap()), watch, "{uri}");
        }
    }
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let h = headers(&[
            ("connection", "x-private, keep-alive"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("accept", "application/json"),
        ]);
        let out = strip_hop_by_hop(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("accept"));
    }

    #[test]
    fn request_headers_carry_no_credential_but_impersonation_for_the_member() {
        let h = headers(&[
            ("authorization", "Bearer x"),
            ("impersonate-user", "root"),
            ("impersonate-group", "system:masters"),
            (METHOD_HEADER, "POST"),
            ("connection", "keep-alive, x-drop"),
            ("x-drop", "1"),
            ("accept", "application/json"),
            ("host", "gw"),
        ]);
        let out = request_headers(&h);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out.contains_key(header::ACCEPT));
        assert_eq!(out["impersonate-user"], "root");
        assert_eq!(out["impersonate-group"], "system:masters");
    }

    #[test]
    fn impersonation_goes() {
        let mut h = headers(&[
            ("impersonate-user", "root"),
            ("impersonate-extra-scopes", "x"),
            ("accept", "*/*"),
        ]);
        strip_impersonation(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn status_is_kubernetes_shaped() {
        let v: serde_json::Value =
            serde_json::from_str(&status_json(StatusCode::SERVICE_UNAVAILABLE, "gone")).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["code"], 503);
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["message"], "gone");
    }
}
