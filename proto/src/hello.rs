//! The hello/welcome exchange on the control channel, with version negotiation.
//!
//! After authenticating, an agent opens a session channel, requests the
//! [`CONTROL_SUBSYSTEM`](crate::names::CONTROL_SUBSYSTEM) subsystem and writes one
//! JSON [`Hello`] line. The server answers with one JSON [`Welcome`] line, or a
//! [`Refusal`] line and closes. Unknown fields are ignored in both directions; a
//! different major protocol version is refused with a message saying so.

use serde::{Deserialize, Serialize};

/// Major version of the control protocol. Peers with another major refuse each other.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Minor version: additions that older peers can ignore.
pub const PROTOCOL_MINOR: u32 = 0;
/// Longest control line either side reads.
pub const MAX_LINE: usize = 64 * 1024;

/// First message from the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: ProtocolVersion,
    /// The agent's software version.
    pub agent_version: String,
    /// What the agent can do, e.g. [`CAP_H2`](crate::names::CAP_H2).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The upstream names the agent will request forwarding for.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Facts about the member (free-form; e.g. its Kubernetes version).
    #[serde(default)]
    pub facts: std::collections::BTreeMap<String, String>,
}

/// The server's answer to a [`Hello`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: ProtocolVersion,
    pub server_version: String,
    /// How often the agent should send keepalives, in milliseconds.
    pub keepalive_interval_ms: u64,
    /// How many unanswered keepalives mean the server is gone.
    pub keepalive_max: u32,
    /// The capabilities the server will use with this agent.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// Sent instead of a [`Welcome`] when the server refuses the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub refused: String,
}

/// A `major.minor` protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolVersion {
    pub major: u32,
    pub minor: u32,
}

impl Default for ProtocolVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl ProtocolVersion {
    pub const CURRENT: Self = Self {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
    };

    /// Whether a peer speaking `other` can talk to us; `Err` carries a message for logs.
    pub fn check_peer(self, other: ProtocolVersion) -> Result<(), String> {
        if self.major == other.major {
            Ok(())
        } else {
            Err(format!(
                "protocol major version mismatch: this side speaks {}.{}, the peer {}.{}; \
                 upgrade the older of agent and server",
                self.major, self.minor, other.major, other.minor
            ))
        }
    }
}

/// Encodes a message as one JSON line.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).expect("control messages serialize");
    out.push(b'\n');
    out
}

/// Decodes one JSON line, tolerating unknown fields.
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, String> {
    if line.len() > MAX_LINE {
        return Err("control line too long".into());
    }
    serde_json::from_slice(line).map_err(|e| format!("bad control message: {e}"))
}

/// The server's reply to a hello: either a welcome or a refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Refusal(Refusal),
    Welcome(Welcome),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored() {
        let line = br#"{"protocol":{"major":1,"minor":7},"agent_version":"9","future":true,"capabilities":["h2","x"]}"#;
        let hello: Hello = decode_line(line).unwrap();
        assert_eq!(hello.protocol.minor, 7);
        assert!(ProtocolVersion::CURRENT.check_peer(hello.protocol).is_ok());
    }

    #[test]
    fn major_mismatch_is_refused_with_a_message() {
        let err = ProtocolVersion::CURRENT
            .check_peer(ProtocolVersion { major: 2, minor: 0 })
            .unwrap_err();
        assert!(err.contains("major version mismatch"), "{err}");
    }

    #[test]
    fn reply_round_trip() {
        let w = Reply::Welcome(Welcome {
            keepalive_interval_ms: 1000,
            keepalive_max: 3,
            ..Default::default()
        });
        let line = encode_line(&w);
        assert_eq!(decode_line::<Reply>(&line[..line.len() - 1]).unwrap(), w);
        let r = Reply::Refusal(Refusal {
            refused: "no".into(),
        });
        assert_eq!(decode_line::<Reply>(&encode_line(&r)).unwrap(), r);
    }
}
