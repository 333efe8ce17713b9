//! The fleet's policy: which sites and upstreams each agent may serve.
//!
//! One Caddy serves every host's sites, so a remote host's labels must
//! never reach beyond what it is granted. The policy (`POLICY_FILE`, TOML)
//! grants per agent, with a `[default]` for agents not listed:
//!
//! ```toml
//! [agents.web-1]
//! domains = ["shop.example.com", "*.shop.example.com"]  # sites it may serve
//! upstreams = ["10.0.5.0/24"]  # literal upstreams allowed besides its own published ports
//! host_ip = "10.0.0.5"         # where its published ports are reached (address or CIDR)
//! trusted = false              # true: caddy-docker-proxy's full grammar, no restriction
//! ```
//!
//! Without a policy file, the local agent (standalone, and server mode's
//! own publisher) is trusted and every remote agent is refused, with a
//! reason that says how to grant it. `[default] domains = ["*"]` is the
//! explicit way back to "any agent may serve any site" (still in the
//! restricted grammar unless `trusted = true`).
//!
//! Parsing is pure; reading the file is the applier's business.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::subject::AgentId;

/// What one agent may do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Site host names it may serve: exact names, `*.suffix` (any one
    /// label in front of `suffix`), or `*` (any host name).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Literal upstreams it may name besides its own published ports.
    #[serde(default)]
    pub upstreams: Vec<IpNet>,
    /// Where its published ports may be reached; without it, the address
    /// the agent reports (never loopback, link-local or unspecified).
    #[serde(default)]
    pub host_ip: Option<IpNet>,
    /// caddy-docker-proxy's full grammar, no restriction at all.
    #[serde(default)]
    pub trusted: bool,
}

/// The local agent's grant: everything.
static TRUSTED: Grant = Grant {
    domains: Vec::new(),
    upstreams: Vec::new(),
    host_ip: None,
    trusted: true,
};

/// The policy file's shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    default: Option<Grant>,
    #[serde(default)]
    agents: BTreeMap<AgentId, Grant>,
}

/// The grants in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Whether a policy file was given at all.
    from_file: bool,
    default: Option<Grant>,
    agents: BTreeMap<AgentId, Grant>,
    /// The agent next to Caddy, trusted unless the file says otherwise.
    local: Option<AgentId>,
}

impl Default for Policy {
    /// No policy file: only the local agent (if any) serves anything.
    fn default() -> Self {
        Policy {
            from_file: false,
            default: None,
            agents: BTreeMap::new(),
            local: None,
        }
    }
}

/// A policy file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("POLICY_FILE: {0}")]
pub struct PolicyError(pub String);

impl Policy {
    /// Reads policy TOML. Unknown keys, bad CIDRs and invalid agent IDs are
    /// errors naming what is wrong.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            PolicyError(
                e.to_string()
                    .lines()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .trim()
                    .to_string(),
            )
        })?;
        for (agent, grant) in file
            .default
            .iter()
            .map(|g| ("[default]".to_string(), g))
            .chain(
                file.agents
                    .iter()
                    .map(|(a, g)| (format!("[agents.{a}]"), g)),
            )
        {
            for domain in &grant.domains {
                if !is_domain_pattern(domain) {
                    return Err(PolicyError(format!(
                        "{agent}: domain {domain:?} is not a host name, `*.` and a host name, or `*`"
                    )));
                }
            }
        }
        Ok(Policy {
            from_file: true,
            default: file.default,
            agents: file.agents,
            local: None,
        })
    }

    /// A policy that trusts every agent with everything, as
    /// caddy-docker-proxy does: for tests and single-owner fleets.
    pub fn trust_everyone() -> Policy {
        Policy {
            from_file: true,
            default: Some(Grant {
                domains: vec!["*".into()],
                trusted: true,
                ..Grant::default()
            }),
            agents: BTreeMap::new(),
            local: None,
        }
    }

    /// The same policy, with `agent` as the local agent: trusted unless the
    /// file lists it.
    pub fn with_local(mut self, agent: Option<AgentId>) -> Policy {
        self.local = agent;
        self
    }

    /// The local agent, if any.
    pub fn local(&self) -> Option<&AgentId> {
        self.local.as_ref()
    }

    /// Whether a file was given.
    pub fn from_file(&self) -> bool {
        self.from_file
    }

    /// The grant that applies to `agent`, or why it has none.
    pub fn grant(&self, agent: &AgentId) -> Result<&Grant, String> {
        if let Some(grant) = self.agents.get(agent) {
            return Ok(grant);
        }
        if self.local.as_ref() == Some(agent) {
            return Ok(&TRUSTED);
        }
        match &self.default {
            Some(grant) => Ok(grant),
            None if self.from_file => Err(format!(
                "agent {agent} is not in the policy: add [agents.{agent}] with its domains (or a [default] table) to POLICY_FILE"
            )),
            None => Err(format!(
                "remote agents serve nothing without a policy: set POLICY_FILE with [agents.{agent}] domains = [\"…\"] (or [default] domains = [\"*\"] to let any agent serve any site)"
            )),
        }
    }

    /// The agents the file lists by name.
    pub fn listed_agents(&self) -> impl Iterator<Item = &AgentId> {
        self.agents.keys()
    }
}

impl Grant {
    /// Whether a site host name is granted. `host` is lower-cased by the
    /// caller; a wildcard site (`*.a.test`) is granted only by the same
    /// pattern or `*`.
    pub fn allows_domain(&self, host: &str) -> bool {
        self.domains
            .iter()
            .any(|pattern| domain_matches(pattern, host))
    }

    /// Whether a literal upstream address is within the granted CIDRs.
    pub fn allows_upstream(&self, ip: IpAddr) -> bool {
        self.upstreams.iter().any(|net| net.contains(&ip))
    }
}

/// `pattern` grants `host`: equal (case-insensitive), `*` for any host, or
/// `*.suffix` for exactly one label in front of `suffix`.
pub fn domain_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern.eq_ignore_ascii_case(host) {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            // `host` = `<label>.<suffix>`, compared without allocating.
            let Some(split) = host.len().checked_sub(suffix.len() + 1) else {
                return false;
            };
            if !host.is_char_boundary(split) {
                return false;
            }
            let (front, rest) = host.split_at(split);
            rest.strip_prefix('.')
                .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
                && !front.is_empty()
                && !front.contains('.')
                && front != "*"
        }
        None => false,
    }
}

/// A host name: labels of `[A-Za-z0-9-]` (or `_`), separated by dots.
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // Not an IPv4 address (an IPv6 one has `:`, refused above).
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn is_domain_pattern(pattern: &str) -> bool {
    pattern == "*" || is_host_name(pattern) || pattern.strip_prefix("*.").is_some_and(is_host_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(a: &str) -> AgentId {
        AgentId::new(a).unwrap()
    }

    #[test]
    fn the_issue_example_parses() {
        let policy = Policy::parse(
            r#"
            [agents.web-1]
            domains = ["shop.example.com", "*.shop.example.com"]
            upstreams = ["10.0.5.0/24"]
            trusted = false
            "#,
        )
        .unwrap();
        let grant = policy.grant(&agent("web-1")).unwrap();
        assert!(grant.allows_domain("shop.example.com"));
        assert!(grant.allows_domain("a.shop.example.com"));
        assert!(grant.allows_domain("*.shop.example.com"));
        assert!(!grant.allows_domain("a.b.shop.example.com"));
        assert!(!grant.allows_domain("evilshop.example.com"));
        assert!(grant.allows_upstream("10.0.5.7".parse().unwrap()));
        assert!(!grant.allows_upstream("10.0.6.7".parse().unwrap()));
        let refused = policy.grant(&agent("other")).unwrap_err();
        assert!(refused.contains("[agents.other]"), "{refused}");
    }

    #[test]
    fn without_a_file_only_the_local_agent_serves() {
        let policy = Policy::default().with_local(Some(agent("me")));
        assert!(policy.grant(&agent("me")).unwrap().trusted);
        let refused = policy.grant(&agent("remote")).unwrap_err();
        assert!(refused.contains("POLICY_FILE"), "{refused}");
        // A file can restrict the local agent too.
        let listed = Policy::parse("[agents.me]\ndomains = [\"a.test\"]\n")
            .unwrap()
            .with_local(Some(agent("me")));
        assert!(!listed.grant(&agent("me")).unwrap().trusted);
    }

    #[test]
    fn the_two_line_policy_grants_any_site_untrusted() {
        let policy = Policy::parse("[default]\ndomains = [\"*\"]\n").unwrap();
        let grant = policy.grant(&agent("anyone")).unwrap();
        assert!(grant.allows_domain("x.example.org") && !grant.trusted);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        for (text, needle) in [
            ("[agents.web-1]\ndomain = [\"a\"]\n", "domain"),
            (
                "[agents.web-1]\nupstreams = [\"10.0.0.0/33\"]\n",
                "10.0.0.0/33",
            ),
            ("[agents.\"a.b\"]\n", "a.b"),
            ("[default]\ndomains = [\"a b\"]\n", "a b"),
            ("[default]\ndomains = [\"10.0.0.1\"]\n", "10.0.0.1"),
        ] {
            let err = Policy::parse(text).unwrap_err().to_string();
            assert!(err.starts_with("POLICY_FILE: "), "{err}");
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
