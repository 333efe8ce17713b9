//! Agent IDs and the subjects of the `CADDY_FLEET` stream.
//!
//! Every subject is keyed by the agent that owns it, so a NATS user can be
//! limited to publishing on `fleet.<its-agent>.>`:
//!
//! - `fleet.<agent>.ctr.<container_id>`: one container's facts or removal;
//! - `fleet.<agent>.sync`: the agent's complete set of live containers;
//! - `fleet.<agent>.hb`: the agent's heartbeat.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The subject prefix shared by every caddy-fleet message.
pub const SUBJECT_ROOT: &str = "fleet";

/// A validated agent ID: one NATS subject token made of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

/// An agent ID that cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid agent ID {id:?}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-' (set AGENT_ID)"
)]
pub struct InvalidAgentId {
    /// The rejected value.
    pub id: String,
}

impl AgentId {
    /// Longest accepted agent ID.
    pub const MAX_LEN: usize = 64;

    /// Validates `id` as given; an ID the user typed is never silently changed.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidAgentId> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(AgentId(id))
        } else {
            Err(InvalidAgentId { id })
        }
    }

    /// Turns a hostname (the default agent ID) into a valid ID: every
    /// character outside `[A-Za-z0-9_-]` becomes `-`, and an empty result
    /// becomes `agent`.
    pub fn sanitize(hostname: &str) -> Self {
        let mut id: String = hostname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(Self::MAX_LEN)
            .collect();
        if id.is_empty() {
            id.push_str("agent");
        }
        AgentId(id)
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `fleet.<agent>.ctr.<container_id>`.
    pub fn container_subject(&self, container_id: &str) -> String {
        format!("{SUBJECT_ROOT}.{}.ctr.{container_id}", self.0)
    }

    /// `fleet.<agent>.sync`.
    pub fn sync_subject(&self) -> String {
        format!("{SUBJECT_ROOT}.{}.sync", self.0)
    }

    /// `fleet.<agent>.hb`.
    pub fn heartbeat_subject(&self) -> String {
        format!("{SUBJECT_ROOT}.{}.hb", self.0)
    }

    /// `fleet.<agent>.>`: everything this agent may publish.
    pub fn all_subjects(&self) -> String {
        format!("{SUBJECT_ROOT}.{}.>", self.0)
    }
}

impl TryFrom<String> for AgentId {
    type Error = InvalidAgentId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        AgentId::new(value)
    }
}

impl From<AgentId> for String {
    fn from(value: AgentId) -> Self {
        value.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_kept_as_given() {
        assert_eq!(AgentId::new("remote-1_a").unwrap().as_str(), "remote-1_a");
    }

    #[test]
    fn ids_that_break_subjects_are_refused() {
        for bad in ["", "a.b", "a b", "a>", "*", "é", &"x".repeat(65)] {
            let err = AgentId::new(bad).unwrap_err();
            assert!(err.to_string().contains("AGENT_ID"), "{err}");
        }
    }

    #[test]
    fn hostnames_are_sanitized() {
        assert_eq!(
            AgentId::sanitize("web.example.com").as_str(),
            "web-example-com"
        );
        assert_eq!(AgentId::sanitize("").as_str(), "agent");
    }

    #[test]
    fn subjects_are_keyed_by_agent() {
        let a = AgentId::new("a1").unwrap();
        assert_eq!(a.container_subject("abc"), "fleet.a1.ctr.abc");
        assert_eq!(a.sync_subject(), "fleet.a1.sync");
        assert_eq!(a.heartbeat_subject(), "fleet.a1.hb");
        assert_eq!(a.all_subjects(), "fleet.a1.>");
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<AgentId>("\"a.b\"").is_err());
    }
}
