//! What a publisher is and what it watches.

use std::time::Duration;

use caddy_fleet_schema::AgentId;

/// A publisher's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// This host's agent ID; it keys every subject the publisher writes.
    pub agent: AgentId,
    /// The address other hosts reach this host's published ports at.
    pub host_address: String,
    /// Only containers with labels under this prefix are published (`caddy`).
    pub label_prefix: String,
    /// Further restricts the containers watched (`AGENT_FILTER_LABEL`).
    pub filter_label: Option<FilterLabel>,
    /// How often the full set of live containers is re-sent.
    pub sync_interval: Duration,
    /// How often a heartbeat is sent.
    pub heartbeat_interval: Duration,
    /// Longest wait for a started container to listen before it is
    /// reported anyway (`READY_TIMEOUT`); zero reports at once.
    pub ready_timeout: Duration,
}

impl PublisherConfig {
    /// Settings with the defaults for everything but identity.
    pub fn new(agent: AgentId, host_address: impl Into<String>) -> Self {
        PublisherConfig {
            agent,
            host_address: host_address.into(),
            label_prefix: "caddy".to_string(),
            filter_label: None,
            sync_interval: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// A label a container must carry to be watched: `key` or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterLabel {
    pub key: String,
    pub value: Option<String>,
}

/// An `AGENT_FILTER_LABEL` that is not `key` or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid AGENT_FILTER_LABEL {0:?}: write key=value (e.g. agent=remote1) or just a key")]
pub struct InvalidFilterLabel(pub String);

impl std::str::FromStr for FilterLabel {
    type Err = InvalidFilterLabel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
            None => (s.trim(), None),
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(InvalidFilterLabel(s.to_string()));
        }
        Ok(FilterLabel {
            key: key.to_string(),
            value,
        })
    }
}

impl FilterLabel {
    /// The value of Docker's `label` filter.
    pub fn docker_filter(&self) -> String {
        match &self.value {
            Some(v) => format!("{}={v}", self.key),
            None => self.key.clone(),
        }
    }

    /// Whether a container with these labels passes the filter.
    pub fn matches<'a>(&self, mut labels: impl Iterator<Item = (&'a String, &'a String)>) -> bool {
        labels.any(|(k, v)| k == &self.key && self.value.as_ref().is_none_or(|want| want == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_labels_parse() {
        let f: FilterLabel = "agent=remote1".parse().unwrap();
        assert_eq!(f.docker_filter(), "agent=remote1");
        let k: FilterLabel = "agent".parse().unwrap();
        assert_eq!(k.value, None);
        assert!("=x".parse::<FilterLabel>().is_err());
    }
}
