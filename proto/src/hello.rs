//! The hello/welcome exchange on the control channel, with version negotiation.
//!
//! After authenticating, an agent opens a session channel, requests the
//! [`CONTROL_SUBSYSTEM`](crate::names::CONTROL_SUBSYSTEM) subsystem and writes one
//! JSON [`Hello`] line. The server answers with one JSON [`Welcome`] line, or a
//! [`Refusal`] line and closes. Unknown fields are ignored in both directions; a
//! different major protocol version is refused with a message saying so.
//! After the welcome the server may send [`Notice`] lines; an agent ignores
//! lines it does not understand.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    /// Which server replica welcomed the agent (its pod name in Kubernetes
    /// mode), so that the agent can say where it is connected; absent from
    /// older servers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_id: String,
}

/// Sent instead of a [`Welcome`] when the server refuses the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub refused: String,
}

/// A line the server may send on the control channel after its welcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// What it asks, e.g. [`NOTICE_MOVE`].
    pub notice: String,
    /// Why, for the agent's log.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// [`Notice`]: this server replica is going away; connect again (another
/// replica takes the agent), then drain and close this session
/// ([`CAP_MOVE`](crate::names::CAP_MOVE)).
pub const NOTICE_MOVE: &str = "move";

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

    /// Whether a peer speaking `other` can talk to us.
    pub fn check_peer(self, other: ProtocolVersion) -> Result<(), LineError> {
        if self.major == other.major {
            Ok(())
        } else {
            Err(LineError::Version {
                ours: self,
                peer: other,
            })
        }
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why a control line could not be read or accepted.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("control line too long")]
    TooLong,
    #[error("bad control message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "protocol major version mismatch: this side speaks {ours}, the peer {peer}; \
         upgrade the older of agent and server"
    )]
    Version {
        ours: ProtocolVersion,
        peer: ProtocolVersion,
    },
    #[error("the peer closed the control channel")]
    Closed,
    #[error("no control line within {0:?}")]
    Timeout(Duration),
    #[error("reading the control channel: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes a message as one JSON line.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).expect("control messages serialize");
    out.push(b'\n');
    out
}

/// Decodes one JSON line, tolerating unknown fields.
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    Ok(serde_json::from_slice(line)?)
}

/// Reads one control line (at most [`MAX_LINE`] bytes) within `timeout` and
/// decodes it.
pub async fn read_message<T, R>(reader: &mut R, timeout: Duration) -> Result<T, LineError>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncBufRead + Unpin,
{
    let mut line = Vec::new();
    let mut limited = reader.take(MAX_LINE as u64 + 1);
    let read = limited.read_until(b'\n', &mut line);
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(LineError::Timeout(timeout)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(0)) => Err(LineError::Closed),
        Ok(Ok(_)) => decode_line(line.strip_suffix(b"\n").unwrap_or(&line)),
    }
}

/// Writes `msg` as one control line and flushes it.
pub async fn write_message<T, W>(writer: &mut W, msg: &T) -> std::io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&encode_line(msg)).await?;
    writer.flush().await
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
        assert!(err.to_string().contains("major version mismatch"), "{err}");
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

    #[test]
    fn the_welcome_names_its_server_and_reads_without_one() {
        let w = Welcome {
            server_id: "tower-server-7c9f".into(),
            ..Default::default()
        };
        let line = encode_line(&Reply::Welcome(w.clone()));
        assert!(String::from_utf8_lossy(&line).contains("\"server_id\":\"tower-server-7c9f\""));
        // An older server's welcome has no server_id.
        let old = br#"{"protocol":{"major":1,"minor":0},"server_version":"0.1.0","keepalive_interval_ms":10000,"keepalive_max":3}"#;
        match decode_line::<Reply>(old).unwrap() {
            Reply::Welcome(w) => assert_eq!(w.server_id, ""),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_cross_a_stream() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = tokio::io::BufReader::new(b);
        let hello = Hello::default();
        write_message(&mut a, &hello).await.unwrap();
        let got: Hello = read_message(&mut b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, hello);
        drop(a);
        assert!(matches!(
            read_message::<Hello, _>(&mut b, Duration::from_secs(1)).await,
            Err(LineError::Closed)
        ));
    }
}
