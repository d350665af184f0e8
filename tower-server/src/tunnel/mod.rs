//! The agent side of the server: the SSH listener agents dial, and the
//! sessions that carry requests to them.
//!
//! - [`ssh`]: accepts connections, admits those not authenticated yet
//!   ([`crate::admission`]), enforces the authentication deadline.
//! - [`auth`]: the russh handler of one connection: join-token auth, the
//!   control channel and `tcpip-forward` requests it accepts.
//! - [`control`]: the hello/welcome exchange.
//! - [`session`]: one connected agent; sends requests over its channels.
//! - [`registry`]: live sessions by cluster.
//! - [`channel`]: a channel as a metered byte stream; [`cut`]: a socket the
//!   server can cut.

mod auth;
mod channel;
mod control;
mod cut;
mod registry;
mod session;
mod ssh;

pub(crate) use auth::AuthLimiter;
pub use channel::ChannelIo;
pub use registry::Registry;
pub use session::{ForwardError, Session};
pub(crate) use ssh::serve;
