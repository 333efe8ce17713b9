//! The versioned wire types: what publishers put on the log.
//!
//! Every message is one JSON object with a schema version `v` and a `kind`.
//! Decoding never panics: malformed bytes and versions this build does not
//! know are typed [`DecodeError`]s, which the applier logs, counts and skips.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::subject::AgentId;

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
}

impl DecodeError {
    /// A short, stable label for metrics (`malformed`, `unknown_version`, `invalid`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::UnknownVersion { .. } => "unknown_version",
            DecodeError::Invalid(_) => "invalid",
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
    /// Whether the container should receive traffic: running, not paused,
    /// and not failing its healthcheck.
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
