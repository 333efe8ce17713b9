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

/// What a subject of the stream says about its message: whose it is and
/// which kind of message may be stored on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectKey {
    /// The `<agent>` token: the only identity a message has. NATS
    /// permissions confine each agent's credentials to `fleet.<its id>.>`,
    /// so this token, unlike anything in the payload, cannot be forged.
    pub agent: AgentId,
    /// What the rest of the subject says the message is.
    pub kind: SubjectKind,
}

/// The message kinds a subject allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectKind {
    /// `fleet.<agent>.ctr.<container_id>`: an `up` or `down` of that container.
    Container(String),
    /// `fleet.<agent>.sync`.
    Sync,
    /// `fleet.<agent>.hb`.
    Heartbeat,
}

/// A subject that is not one of the stream's message subjects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject {subject:?} is not fleet.<agent>.ctr.<container>, fleet.<agent>.sync or fleet.<agent>.hb")]
pub struct InvalidSubject {
    /// The subject, cut to [`InvalidSubject::SHOWN`] bytes.
    pub subject: String,
}

impl InvalidSubject {
    /// How much of a bad subject an error repeats.
    pub const SHOWN: usize = 200;

    fn new(subject: &str) -> Self {
        let mut end = subject.len().min(Self::SHOWN);
        while !subject.is_char_boundary(end) {
            end -= 1;
        }
        InvalidSubject {
            subject: subject[..end].to_string(),
        }
    }
}

/// Longest container ID a subject may carry (Docker's are 64 hex digits).
pub const MAX_CONTAINER_ID_LEN: usize = 128;

impl SubjectKey {
    /// Reads `fleet.<agent>.ctr.<id>`, `fleet.<agent>.sync` or
    /// `fleet.<agent>.hb`; anything else is an [`InvalidSubject`].
    pub fn parse(subject: &str) -> Result<SubjectKey, InvalidSubject> {
        let invalid = || InvalidSubject::new(subject);
        let mut tokens = subject.split('.');
        if tokens.next() != Some(SUBJECT_ROOT) {
            return Err(invalid());
        }
        let agent = tokens
            .next()
            .and_then(|a| AgentId::new(a).ok())
            .ok_or_else(invalid)?;
        let kind = match (tokens.next(), tokens.next(), tokens.next()) {
            (Some("ctr"), Some(id), None) if is_container_id(id) => {
                SubjectKind::Container(id.to_string())
            }
            (Some("sync"), None, None) => SubjectKind::Sync,
            (Some("hb"), None, None) => SubjectKind::Heartbeat,
            _ => return Err(invalid()),
        };
        Ok(SubjectKey { agent, kind })
    }
}

/// Whether `id` can be a container ID in a subject: 1 to
/// [`MAX_CONTAINER_ID_LEN`] characters from `[A-Za-z0-9_-]`.
pub fn is_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
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
    fn subjects_parse_into_agent_and_kind() {
        let key = SubjectKey::parse("fleet.a1.ctr.abc").unwrap();
        assert_eq!(key.agent.as_str(), "a1");
        assert_eq!(key.kind, SubjectKind::Container("abc".into()));
        assert_eq!(
            SubjectKey::parse("fleet.a1.sync").unwrap().kind,
            SubjectKind::Sync
        );
        assert_eq!(
            SubjectKey::parse("fleet.a1.hb").unwrap().kind,
            SubjectKind::Heartbeat
        );
        let long = format!("fleet.a.ctr.{}", "x".repeat(10_000));
        for bad in [
            "",
            "fleet",
            "fleet.a1",
            "other.a1.sync",
            "fleet.a1.ctr",
            "fleet.a1.ctr.",
            "fleet.a1.ctr.a.b",
            "fleet.a1.sync.x",
            "fleet.a1.hello",
            "fleet.a b.sync",
            long.as_str(),
        ] {
            let err = SubjectKey::parse(bad).unwrap_err();
            assert!(err.subject.len() <= InvalidSubject::SHOWN, "{bad}");
        }
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<AgentId>("\"a.b\"").is_err());
    }
}
