//! The wire contract between the Tower agent and server.
//!
//! Pure types and encode/decode, no sockets:
//! - [`token`]: the join token (`tower1.…`) that carries the server address, the
//!   pinned host-key fingerprint, the cluster name and the agent's secret.
//! - [`hello`]: the versioned hello/welcome exchange on the control channel.
//! - [`names`]: SSH user, subsystem, upstream and capability names.
//! - [`http`]: header rules both ends apply, and the `Status` error body.
#![forbid(unsafe_code)]

pub mod hello;
pub mod http;
pub mod names;
pub mod token;

pub use hello::{Hello, Welcome};
pub use token::{JoinToken, Secret, TokenError};

/// Version of this implementation, reported in hello/welcome messages.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
