//! Tower server: the host side of the reverse tunnel.
//!
//! Agents in member clusters dial the SSH listener; each becomes a
//! [`Session`] in the [`Registry`]. Clients reach members through the HTTPS
//! gateway, which routes by path ([`tower_proto::route`]) and carries requests
//! through the session. `main.rs` stays thin: tests bind `127.0.0.1:0` and
//! call [`Server::run`] (standalone, tokens in a file) or
//! [`run_with_kubernetes`] (tokens, identity and status in Kubernetes).
//!
//! # Layout
//!
//! | module | concern |
//! | --- | --- |
//! | `server`, `config` | [`Server`]: state shared by the listeners, run and shutdown; [`ServerConfig`] |
//! | `tunnel` | agents: SSH listener, authentication, control channel, [`Session`], [`Registry`] |
//! | `gateway` | clients: TLS listener, client identity, forwarding one request |
//! | [`peer`] | replicas: forwarding a request to the replica holding its cluster's session |
//! | `admission` | caps on peers not authenticated yet, shared by both listeners |
//! | [`tokens`] | join tokens: [`tokens::TokenStore`], the file store |
//! | [`kube`] | Kubernetes: CRDs, identity Secrets, token mirror, controller, lease |
//! | [`kubeconfig`] | the kubeconfigs clients use |
//! | `metrics` | Prometheus metrics |
//!
//! The rules both ends of the tunnel share (HTTP/2 settings, upgrade encoding,
//! header policy, control lines) live in `tower-proto`.
#![forbid(unsafe_code)]

mod admission;
mod config;
pub mod gateway;
pub mod kube;
pub mod kubeconfig;
mod metrics;
pub mod peer;
mod server;
pub mod tokens;
mod tunnel;

pub use config::ServerConfig;
pub use kube::{
    ControllerConfig, crd, run as run_with_kubernetes, run_with as run_listeners_with_kubernetes,
};
pub use metrics::Metrics;
pub use server::{HOST_KEY_FILE, Listeners, SHUTDOWN_WAIT, Server};
pub use tunnel::{ChannelIo, ForwardError, Registry, Session};
