//! The wire contract between the Tower agent and server, and the gateway's
//! URL forms.
//!
//! Types, encode/decode and the rules both ends apply, and the transports
//! both ends run SSH on:
//! - [`token`]: the join token (`tower1.…`) that carries the server address, the
//!   pinned host-key fingerprint, the cluster name and the agent's secret.
//! - [`hello`]: the versioned hello/welcome exchange on the control channel,
//!   one JSON line each way.
//! - [`names`]: SSH user, subsystem, upstream and capability names.
//! - [`tunnel`]: HTTP inside the tunnel: the HTTP/2 settings of both ends and
//!   how upgrades cross as extended CONNECT.
//! - [`http`]: header rules both ends apply, the body type of every response,
//!   and the Kubernetes `Status` error response.
//! - [`route`]: the gateway's paths (`/clusters/{cluster}/…` and KubeSphere's
//!   forms) and the cluster URL a kubeconfig names.
//! - [`transport`]: raw TCP or SSH inside a WebSocket (`ws://`, `wss://`),
//!   and the server addresses that choose between them.
#![forbid(unsafe_code)]

pub mod hello;
pub mod http;
pub mod names;
#[cfg(feature = "properties")]
pub mod properties;
pub mod route;
pub mod token;
pub mod transport;
pub mod tunnel;

pub use hello::{Hello, Welcome};
pub use token::{JoinToken, Secret, TokenError};

/// Version of this implementation, reported in hello/welcome messages.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
