//! One gateway request: route it, check the client may reach the cluster,
//! and carry it through the cluster's session, splicing upgraded streams.

use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower_proto::http::{
    Body, caller_request_headers_with_host, empty, ends_at_boundary, is_watch, request_headers,
    response_headers, status,
};
use tower_proto::names::{UPSTREAM_KS_APISERVER, UPSTREAM_KUBE_APISERVER};
use tower_proto::route::{ClusterRoute, RouteError, route};
use tower_proto::tunnel::{CREDENTIAL_CALLER, CREDENTIAL_HEADER, upgrade_protocol};

use super::Entry;
use super::identity::{Credential, kube_listener_credential, own_cluster, refuse_other_cluster};
use super::shares::{ClientKey, Holding};
use crate::server::Shared;
use crate::tunnel::ForwardError;

/// Answers one request that came through `entry` from `who` (its
/// certificate's CN, if any, and its address).
pub(super) async fn handle(
    shared: Arc<Shared>,
    entry: &Entry,
    who: &ClientKey,
    req: Request<Incoming>,
) -> Response<Body> {
    let client = who.certificate.as_deref();
    if client.is_some_and(|cn| cn.starts_with(crate::peer::PEER_CN_PREFIX)) {
        tracing::warn!(source = %who.source, "a peer certificate at a client door; refused");
        return status(
            StatusCode::FORBIDDEN,
            "a replica's peer certificate reaches no cluster through a client door",
        );
    }
    let bound = shared.config.gateway_client_bound_to_cluster;
    let member_path = || {
        req.uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
    };
    let (cluster, upstream, path_and_query, credential) = match entry {
        Entry::Paths => {
            let route = match route(req.uri().path(), req.uri().query()) {
                Ok(r) => r,
                // No cluster in the path (kubectl 1.32 `get --raw`, plain
                // `kubectl proxy`): a certificate bound to one cluster means
                // that one, the path as the member knows it.
                Err(RouteError::NotACluster) => match own_cluster(bound, client) {
                    Some(cluster) => ClusterRoute {
                        cluster: cluster.to_string(),
                        upstream: if req.uri().path().starts_with("/kapis/") {
                            UPSTREAM_KS_APISERVER
                        } else {
                            UPSTREAM_KUBE_APISERVER
                        },
                        path_and_query: member_path(),
                    },
                    None => {
                        return status(
                            StatusCode::NOT_FOUND,
                            format!("{}: {}", req.uri().path(), RouteError::NotACluster),
                        );
                    }
                },
                Err(e) => return status(StatusCode::BAD_REQUEST, e.to_string()),
            };
            if let Some(refused) = refuse_other_cluster(bound, client, &route.cluster) {
                return refused;
            }
            (
                route.cluster,
                route.upstream,
                route.path_and_query,
                Credential::Agent,
            )
        }
        Entry::Kube(cluster) => {
            match kube_listener_credential(bound, client, req.headers(), cluster) {
                Ok(credential) => (
                    cluster.to_string(),
                    UPSTREAM_KUBE_APISERVER,
                    member_path(),
                    credential,
                ),
                Err(refused) => return *refused,
            }
        }
        Entry::Ks(cluster) => (
            cluster.to_string(),
            UPSTREAM_KS_APISERVER,
            member_path(),
            Credential::Caller,
        ),
    };
    let route = Route {
        cluster,
        upstream,
        path_and_query,
    };
    // The session here, or the replica recorded as holding it.
    let via = match shared.registry.ready(&route.cluster, route.upstream) {
        // An agent asked to move: once the replica it moved to has recorded
        // itself, requests go there while this session drains.
        Some(session) if session.is_moving() => match shared.peers.owner(&route.cluster) {
            Some(owner) => Via::Peer(owner, false),
            None => Via::Session(session),
        },
        Some(session) => Via::Session(session),
        None => match shared.peers.owner(&route.cluster) {
            Some(owner) => Via::Peer(owner, false),
            None => match shared
                .store
                .knows(&route.cluster)
                .then(|| shared.peers.probe(&route.cluster))
                .flatten()
            {
                Some(peer) => Via::Peer(peer, true),
                None => return not_here(&shared, &route.cluster),
            },
        },
    };
    if let Via::Session(session) = &via
        && credential == Credential::Caller
        && !session.carries_caller_credential()
    {
        return status(
            StatusCode::BAD_GATEWAY,
            format!(
                "the agent of cluster {:?} cannot pass a caller's own credential to the member; upgrade tower-agent",
                route.cluster
            ),
        );
    }

    // Its place in the client's and the cluster's share of the tunnel, held
    // until the response body ends or the upgraded stream closes.
    let key = match credential {
        Credential::Agent => who.clone(),
        Credential::Caller => who.with_credential(req.headers().get(header::AUTHORIZATION)),
    };
    let share = match shared.shares.take(&route.cluster, key) {
        Ok(share) => share,
        Err(exhausted) => {
            shared
                .metrics
                .share_refusals
                .get_or_create(&crate::metrics::ShareLabel {
                    share: exhausted.share(),
                })
                .inc();
            tracing::debug!(cluster = %route.cluster, source = %who.source, share = exhausted.share(), "share used up");
            return exhausted.response(&route.cluster);
        }
    };
    let upgrade = upgrade_protocol(req.headers());
    let (parts, body) = req.into_parts();
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(route.path_and_query.as_str())
        .body(body.boxed_unsync())
        .expect("routed path is a valid URI");
    *out.headers_mut() = match credential {
        Credential::Agent => request_headers(&parts.headers),
        Credential::Caller => {
            let mut headers = caller_request_headers_with_host(&parts.headers);
            if !headers.contains_key(header::HOST)
                && let Some(authority) = parts.uri.authority()
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                headers.insert(header::HOST, host);
            }
            headers.insert(
                CREDENTIAL_HEADER,
                HeaderValue::from_static(CREDENTIAL_CALLER),
            );
            headers
        }
    };
    // A forged peer header goes no further.
    out.headers_mut().remove(crate::peer::CLUSTER_HEADER);
    let watch = is_watch(&parts.uri);
    let mut inbound = Request::from_parts(parts, ());

    let Some(protocol) = upgrade else {
        let sent = match &via {
            Via::Session(session) => session.send(route.upstream, out).await,
            Via::Peer(owner, _) => {
                shared
                    .peers
                    .send(owner, &route.cluster, route.upstream, out)
                    .await
            }
        };
        return match sent {
            Err(ForwardError::Moved { .. }) if via.probing() => not_here(&shared, &route.cluster),
            Ok(resp) if watch => {
                // A watch ends cleanly when this server stops: its client
                // resumes it, through another replica.
                let stops = shared.shutdown.clone().cancelled_owned();
                let resp = finish(resp).map(|body| ends_at_boundary(body, stops));
                Holding::wrap(resp, share)
            }
            Ok(resp) => Holding::wrap(finish(resp), share),
            Err(e) => forward_error(e),
        };
    };

    // An upgrade: keep the client's side to splice after the 101.
    let client_upgrade = hyper::upgrade::on(&mut inbound);
    let sent = match &via {
        Via::Session(session) => session.send_upgrade(route.upstream, out, &protocol).await,
        Via::Peer(owner, _) => {
            shared
                .peers
                .send_upgrade(owner, &route.cluster, route.upstream, out, &protocol)
                .await
        }
    };
    let mut resp = match sent {
        Err(ForwardError::Moved { .. }) if via.probing() => {
            return not_here(&shared, &route.cluster);
        }
        Ok(Ok(switched)) => switched,
        Ok(Err(refused)) => return Holding::wrap(finish(refused), share),
        Err(e) => return forward_error(e),
    };
    let tunnel_upgrade = hyper::upgrade::on(&mut resp);
    let mut headers = response_headers(resp.headers());
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::UPGRADE,
        HeaderValue::from_str(&protocol).expect("came from a header value"),
    );
    splice(
        &shared,
        route.cluster,
        client_upgrade,
        tunnel_upgrade,
        share,
    );
    let mut out = Response::new(empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = headers;
    out
}

/// Where a request goes.
struct Route {
    cluster: String,
    upstream: &'static str,
    path_and_query: String,
}

/// Which way a request reaches its cluster's session.
enum Via {
    /// The session is here.
    Session(Arc<crate::tunnel::Session>),
    /// Another replica holds it (peer forwarding), or, when probing, may:
    /// none is recorded, the session was held lately, and this is the first
    /// replica asked.
    Peer(crate::peer::Owner, bool),
}

impl Via {
    fn probing(&self) -> bool {
        matches!(self, Via::Peer(_, true))
    }
}

/// The answer for a cluster whose session no replica is known to hold: 503
/// for a cluster the server knows, 404 otherwise.
fn not_here(shared: &Shared, cluster: &str) -> Response<Body> {
    if shared.store.knows(cluster) {
        status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cluster {cluster:?} is not connected: its agent is offline"),
        )
    } else {
        status(
            StatusCode::NOT_FOUND,
            format!("cluster {cluster:?} not found"),
        )
    }
}

/// Splices an upgraded client stream with the upgraded stream towards the
/// member once both sides have switched, holding `hold` (a share) until the
/// stream closes or the server stops.
pub(crate) fn splice<H: Send + 'static>(
    shared: &Shared,
    cluster: String,
    client: hyper::upgrade::OnUpgrade,
    tunnel: hyper::upgrade::OnUpgrade,
    hold: H,
) {
    let shutdown = shared.shutdown.clone();
    // The copy runs on the splice threads (lower priority, see
    // `tower_ops::splice`), so requests on this server win the CPU from it.
    let splicers = tower_ops::splice::handle();
    shared.tasks.spawn_on(async move {
        let _hold = hold;
        let (client, tunnel) = match tokio::join!(client, tunnel) {
            (Ok(c), Ok(t)) => (c, t),
            (c, t) => {
                tracing::debug!(%cluster, client = ?c.err(), tunnel = ?t.err(), "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut tunnel = TokioIo::new(tunnel);
        tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut tunnel, tower_proto::tunnel::SPLICE_BUFFER, tower_proto::tunnel::SPLICE_BUFFER) => {
                if let Err(e) = r {
                    tracing::debug!(%cluster, error = %e, "upgraded stream ended");
                }
            }
            _ = shutdown.cancelled() => {}
        }
    }, &splicers);
}

/// A member's response as the client gets it: hop-by-hop headers removed.
pub(crate) fn finish(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers = response_headers(&parts.headers);
    Response::from_parts(parts, body.boxed_unsync())
}

/// The Status a client gets when its request could not be carried.
pub(crate) fn forward_error(e: ForwardError) -> Response<Body> {
    tracing::warn!(error = %e, "forwarding failed");
    match e {
        ForwardError::NoUpstream { .. }
        | ForwardError::Channel { .. }
        | ForwardError::Peer { .. }
        | ForwardError::Moved { .. } => status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        ForwardError::Http { .. } => status(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
