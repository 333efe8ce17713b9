//! The versioned wire types: what publishers put on the log.
//!
//! Every message is one JSON object with a schema version `v` and a `kind`.
//! Decoding never panics: malformed bytes and versions this build does not
//! know are typed [`DecodeError`]s, which the applier logs, counts and skips.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::limits::{LimitError, MAX_MESSAGE_BYTES, MAX_SYNC_BYTES};
use crate::subject::{AgentId, InvalidSubject, SubjectKey, SubjectKind};

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// One message on the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The full facts of one container (on `fleet.<agent>.ctr.<id>`).
    Up(ContainerFacts),
    /// A container is gone (on `fleet.<agent>.ctr.<id>`).
    Down(ContainerDown),
    /// The agent's complete set of live containers (on `fleet.<agent>.sync`).
    Sync(AgentSync),
    /// The agent is alive (on `fleet.<agent>.hb`).
    Heartbeat(Heartbeat),
}

/// Everything the applier needs to know about one container to route to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerFacts {
    /// The agent (Docker host) that runs the container.
    pub agent: AgentId,
    /// Docker's full container ID.
    pub id: String,
    /// The container name, without Docker's leading `/`.
    pub name: String,
    /// The address other hosts reach this agent's published ports at.
    pub host_address: String,
    /// Labels under the configured prefix, plus the agent filter label.
    pub labels: BTreeMap<String, String>,
    /// Published ports: one entry per host binding.
    #[serde(default)]
    pub ports: Vec<PortBinding>,
    /// IPv4 address of the container on each Docker network, by network name.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Docker's view of the container's lifecycle.
    pub state: ContainerState,
    /// The Docker healthcheck's verdict, if the container has one.
    #[serde(default)]
    pub health: Health,
    /// When the publisher observed these facts, in milliseconds since the epoch.
    pub observed_at_ms: u64,
}

/// One published port: container `port/protocol` reachable at `host_ip:host_port`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortBinding {
    /// The port inside the container.
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// The host interface Docker bound; `0.0.0.0` or `::` means every interface.
    pub host_ip: String,
    /// The port on the host.
    pub host_port: u16,
}

/// Docker's container states, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    Created,
    Running,
    /// Running, but Docker has been asked to stop it (a `kill` event with
    /// the container's stop signal, as `docker stop` sends before the
    /// grace period): it gets no new requests while it finishes the ones
    /// in flight. Added after the first release: an older applier skips
    /// these messages (a decode error) and withdraws the container only
    /// when it exits.
    Stopping,
    Paused,
    Restarting,
    Exited,
    Dead,
    Removing,
}

/// The Docker healthcheck status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// The container has no healthcheck.
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// A container's removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDown {
    pub agent: AgentId,
    /// Docker's full container ID.
    pub id: String,
    /// When the publisher saw the removal, in milliseconds since the epoch.
    pub observed_at_ms: u64,
}

/// The complete set of an agent's live containers at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSync {
    pub agent: AgentId,
    /// The address other hosts reach this agent's published ports at.
    pub host_address: String,
    /// IDs of every container the agent publishes facts for.
    pub containers: Vec<String>,
    /// When the sync was taken, in milliseconds since the epoch.
    pub observed_at_ms: u64,
}

/// A small liveness signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent: AgentId,
    /// When the heartbeat was sent, in milliseconds since the epoch.
    pub sent_at_ms: u64,
}

/// Why a payload could not be decoded into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a JSON object with a numeric `v` field.
    #[error("payload is not a caddy-fleet message: {0}")]
    Malformed(serde_json::Error),
    /// A version this build does not understand (written by a newer publisher?).
    #[error("unknown schema version {found} (this build understands version {SCHEMA_VERSION}; upgrade the applier)")]
    UnknownVersion { found: u64 },
    /// The right version, but the body does not match it.
    #[error("invalid version {SCHEMA_VERSION} message: {0}")]
    Invalid(serde_json::Error),
    /// Larger than any publisher may send; not even parsed.
    #[error("{0}")]
    TooLarge(LimitError),
    /// Not on a subject the stream's messages can have.
    #[error(transparent)]
    Subject(#[from] InvalidSubject),
    /// The payload names another agent than its subject: a forgery by the
    /// subject's agent (only it can publish there).
    #[error("message on {subject_agent}'s subject claims to be from agent {claimed}")]
    ForeignAgent {
        subject_agent: AgentId,
        claimed: AgentId,
    },
    /// The payload's kind or container does not belong on its subject.
    #[error("a {kind} message does not belong on {subject}")]
    WrongSubject { kind: &'static str, subject: String },
}

impl DecodeError {
    /// A short, stable label for metrics (`malformed`, `unknown_version`, `invalid`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::UnknownVersion { .. } => "unknown_version",
            DecodeError::Invalid(_) => "invalid",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Subject(_) => "bad_subject",
            DecodeError::ForeignAgent { .. } => "foreign_agent",
            DecodeError::WrongSubject { .. } => "wrong_subject",
        }
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    v: u32,
    #[serde(flatten)]
    event: &'a Event,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u64,
}

impl Event {
    /// Encodes the event as one JSON object carrying [`SCHEMA_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain structs into a Vec cannot fail: every map
        // key is a string and no Serialize impl here returns an error.
        serde_json::to_vec(&EnvelopeOut {
            v: SCHEMA_VERSION,
            event: self,
        })
        .unwrap_or_default()
    }

    /// Decodes a payload, telling garbage, unknown versions and invalid
    /// bodies apart.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(DecodeError::Malformed)?;
        if probe.v != u64::from(SCHEMA_VERSION) {
            return Err(DecodeError::UnknownVersion { found: probe.v });
        }
        serde_json::from_slice(bytes).map_err(DecodeError::Invalid)
    }

    /// Decodes a message read from the log at `subject`, trusting nothing
    /// in it: the payload must fit [`Event::max_bytes`] of its subject, and
    /// the agent, kind and container it names must be those of its subject,
    /// the one part of a message an agent's credentials cannot forge.
    pub fn decode_from(subject: &str, bytes: &[u8]) -> Result<Event, DecodeError> {
        let key = SubjectKey::parse(subject)?;
        let limit = Event::max_bytes(&key.kind);
        if bytes.len() > limit {
            return Err(DecodeError::TooLarge(LimitError::MessageTooLarge {
                len: bytes.len(),
                limit,
            }));
        }
        let event = Event::decode(bytes)?;
        if event.agent() != &key.agent {
            return Err(DecodeError::ForeignAgent {
                subject_agent: key.agent,
                claimed: event.agent().clone(),
            });
        }
        let belongs = match (&event, &key.kind) {
            (Event::Up(f), SubjectKind::Container(id)) => &f.id == id,
            (Event::Down(d), SubjectKind::Container(id)) => &d.id == id,
            (Event::Sync(_), SubjectKind::Sync) => true,
            (Event::Heartbeat(_), SubjectKind::Heartbeat) => true,
            _ => false,
        };
        if !belongs {
            return Err(DecodeError::WrongSubject {
                kind: event.kind(),
                subject: subject.to_string(),
            });
        }
        Ok(event)
    }

    /// The largest message a subject of this kind may carry.
    pub fn max_bytes(kind: &SubjectKind) -> usize {
        match kind {
            SubjectKind::Sync => MAX_SYNC_BYTES,
            SubjectKind::Container(_) | SubjectKind::Heartbeat => MAX_MESSAGE_BYTES,
        }
    }

    /// Checks an event this host is about to publish against the bounds
    /// the applier will hold it to, so that nothing is published only to
    /// be refused.
    pub fn check_bounds(&self, label_prefix: &str) -> Result<(), LimitError> {
        if let Event::Up(facts) = self {
            crate::limits::check_labels(&facts.labels, label_prefix)?;
        }
        let len = self.encode().len();
        let limit = match self {
            Event::Sync(_) => MAX_SYNC_BYTES,
            _ => MAX_MESSAGE_BYTES,
        };
        if len > limit {
            return Err(LimitError::MessageTooLarge { len, limit });
        }
        Ok(())
    }

    /// The message kind as on the wire: `up`, `down`, `sync`, `heartbeat`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Up(_) => "up",
            Event::Down(_) => "down",
            Event::Sync(_) => "sync",
            Event::Heartbeat(_) => "heartbeat",
        }
    }

    /// The agent that published this event.
    pub fn agent(&self) -> &AgentId {
        match self {
            Event::Up(f) => &f.agent,
            Event::Down(d) => &d.agent,
            Event::Sync(s) => &s.agent,
            Event::Heartbeat(h) => &h.agent,
        }
    }

    /// The subject this event belongs on.
    pub fn subject(&self) -> String {
        match self {
            Event::Up(f) => f.agent.container_subject(&f.id),
            Event::Down(d) => d.agent.container_subject(&d.id),
            Event::Sync(s) => s.agent.sync_subject(),
            Event::Heartbeat(h) => h.agent.heartbeat_subject(),
        }
    }
}

impl ContainerFacts {
    /// Whether the container should receive traffic: running (not paused,
    /// not being stopped) and not failing its healthcheck.
    pub fn is_routable(&self) -> bool {
        self.state == ContainerState::Running && self.health != Health::Unhealthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ContainerFacts {
        ContainerFacts {
            agent: AgentId::new("a1").unwrap(),
            id: "abc".into(),
            name: "web".into(),
            host_address: "10.0.0.2".into(),
            labels: [("caddy".to_string(), "a.test".to_string())].into(),
            ports: vec![PortBinding {
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "0.0.0.0".into(),
                host_port: 8080,
            }],
            networks: BTreeMap::new(),
            state: ContainerState::Running,
            health: Health::None,
            observed_at_ms: 1,
        }
    }

    #[test]
    fn round_trips_every_kind() {
        let a = AgentId::new("a1").unwrap();
        let events = [
            Event::Up(facts()),
            Event::Down(ContainerDown {
                agent: a.clone(),
                id: "abc".into(),
                observed_at_ms: 2,
            }),
            Event::Sync(AgentSync {
                agent: a.clone(),
                host_address: "h".into(),
                containers: vec!["abc".into()],
                observed_at_ms: 3,
            }),
            Event::Heartbeat(Heartbeat {
                agent: a,
                sent_at_ms: 4,
            }),
        ];
        for e in events {
            let bytes = e.encode();
            assert!(
                bytes.starts_with(b"{\"v\":1,"),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(Event::decode(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for bytes in [&b"\xff\x00garbage"[..], b"", b"[1,2]", b"{\"kind\":\"up\"}"] {
            assert!(
                matches!(Event::decode(bytes), Err(DecodeError::Malformed(_))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn unknown_version_is_reported_with_its_number() {
        let err = Event::decode(br#"{"v":7,"kind":"teleport"}"#).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownVersion { found: 7 }));
        assert!(err.to_string().contains("unknown schema version 7"));
    }

    #[test]
    fn right_version_wrong_body_is_invalid() {
        let err = Event::decode(br#"{"v":1,"kind":"up","agent":"a.b"}"#).unwrap_err();
        assert_eq!(err.kind(), "invalid");
    }

    #[test]
    fn the_subject_decides_the_agent_kind_and_container() {
        let up = Event::Up(facts());
        let bytes = up.encode();
        assert_eq!(Event::decode_from("fleet.a1.ctr.abc", &bytes).unwrap(), up);

        let forged = Event::decode_from("fleet.a2.ctr.abc", &bytes).unwrap_err();
        assert_eq!(forged.kind(), "foreign_agent");
        assert!(forged.to_string().contains("claims to be from agent a1"));

        for wrong in ["fleet.a1.ctr.other", "fleet.a1.sync", "fleet.a1.hb"] {
            let err = Event::decode_from(wrong, &bytes).unwrap_err();
            assert_eq!(err.kind(), "wrong_subject", "{wrong}");
        }
        let sync = Event::Sync(AgentSync {
            agent: AgentId::new("a1").unwrap(),
            host_address: "h".into(),
            containers: vec![],
            observed_at_ms: 1,
        })
        .encode();
        assert_eq!(
            Event::decode_from("fleet.a1.ctr.abc", &sync)
                .unwrap_err()
                .kind(),
            "wrong_subject"
        );
        assert!(Event::decode_from("fleet.a1.sync", &sync).is_ok());
        assert_eq!(
            Event::decode_from("fleet.a1.x", &sync).unwrap_err().kind(),
            "bad_subject"
        );
    }

    #[test]
    fn oversized_messages_are_not_parsed() {
        let mut f = facts();
        f.name = "n".repeat(MAX_MESSAGE_BYTES);
        let err = Event::decode_from("fleet.a1.ctr.abc", &Event::Up(f).encode()).unwrap_err();
        assert_eq!(err.kind(), "too_large");
    }

    #[test]
    fn routable_means_running_and_not_unhealthy() {
        let mut f = facts();
        assert!(f.is_routable());
        f.health = Health::Unhealthy;
        assert!(!f.is_routable());
        f.health = Health::Healthy;
        f.state = ContainerState::Paused;
        assert!(!f.is_routable());
    }
}
