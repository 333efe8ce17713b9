//! The history of the log, for people: what each message changed, as one
//! line, against the state just before it. Pure: the debugging commands
//! feed it messages folded from the log, the tests feed it events.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::event::{ContainerFacts, Event};
use crate::routes::declares_domain;
use crate::state::RouteState;

/// What `history` shows: every field set must match (unset ones match all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryFilter {
    /// Containers whose root labels name this domain (before or after).
    pub domain: Option<String>,
    /// Messages of this agent.
    pub agent: Option<String>,
    /// A container, by ID prefix or exact name.
    pub container: Option<String>,
}

impl HistoryFilter {
    fn container_matches(&self, id: &str, name: &str) -> bool {
        self.container
            .as_ref()
            .is_none_or(|c| id.starts_with(c.as_str()) || name == c)
    }

    fn domain_matches(&self, facts: &ContainerFacts, prefix: &str) -> bool {
        self.domain
            .as_ref()
            .is_none_or(|d| declares_domain(facts, d, prefix))
    }
}

/// What one message changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The container's name, for a message about one container.
    pub container: Option<String>,
    /// What changed, in words.
    pub change: String,
}

/// What `event` changed in `before` (the state just before it), as far as
/// `filter` selects it, or `None` when it is not selected or changed
/// nothing worth a line (a re-sent `up`, a heartbeat). `prefix` is the
/// label prefix, to read site addresses.
pub fn change(
    before: &RouteState,
    event: &Event,
    filter: &HistoryFilter,
    prefix: &str,
) -> Option<Change> {
    if filter
        .agent
        .as_ref()
        .is_some_and(|a| a != event.agent().as_str())
    {
        return None;
    }
    let known = before.agents.get(event.agent());
    let old = |id: &str| known.and_then(|a| a.containers.get(id)).map(|r| &*r.facts);
    match event {
        Event::Up(facts) => {
            let old = old(&facts.id);
            let domain_ok = filter.domain.is_none()
                || filter.domain_matches(facts, prefix)
                || old.is_some_and(|o| filter.domain_matches(o, prefix));
            if !domain_ok || !filter.container_matches(&facts.id, &facts.name) {
                return None;
            }
            describe(old, facts).map(|change| Change {
                container: Some(facts.name.clone()),
                change,
            })
        }
        Event::Down(down) => {
            let old = old(&down.id);
            let name = old.map_or_else(|| down.id.clone(), |o| o.name.clone());
            let domain_ok =
                filter.domain.is_none() || old.is_some_and(|o| filter.domain_matches(o, prefix));
            (domain_ok && filter.container_matches(&down.id, &name)).then(|| Change {
                container: Some(name),
                change: "down (removed)".to_string(),
            })
        }
        Event::Sync(sync) => {
            // Containers this sync stops listing, and unlisted ones it lists again.
            let mut unlisted = Vec::new();
            let mut relisted = Vec::new();
            for r in known.into_iter().flat_map(|a| a.containers.values()) {
                if !filter.domain_matches(&r.facts, prefix)
                    || !filter.container_matches(&r.facts.id, &r.facts.name)
                {
                    continue;
                }
                let in_sync = sync.containers.contains(&r.facts.id);
                if r.listed && !in_sync {
                    unlisted.push(r.facts.name.clone());
                } else if !r.listed && in_sync {
                    relisted.push(r.facts.name.clone());
                }
            }
            let touches = !unlisted.is_empty() || !relisted.is_empty();
            if !touches && (filter.domain.is_some() || filter.container.is_some()) {
                return None;
            }
            let mut change = format!("sync: {} containers", sync.containers.len());
            if !unlisted.is_empty() {
                change.push_str(&format!(", no longer listed: {}", unlisted.join(", ")));
            }
            if !relisted.is_empty() {
                change.push_str(&format!(", listed again: {}", relisted.join(", ")));
            }
            Some(Change {
                container: None,
                change,
            })
        }
        // Heartbeats are liveness, not routing history.
        Event::Heartbeat(_) => None,
    }
}

/// What an `up` changed, or `None` when it changed nothing (a re-sent
/// `up`, e.g. after a publisher restart): such lines are left out.
pub fn describe(before: Option<&ContainerFacts>, after: &ContainerFacts) -> Option<String> {
    let sites = |f: &ContainerFacts| {
        f.labels
            .iter()
            .filter(|(k, _)| !k.contains('.'))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let Some(before) = before else {
        return Some(format!("up ({:?}) {}", after.state, sites(after)).to_lowercase());
    };
    let mut changes = Vec::new();
    if before.state != after.state {
        changes.push(format!("state {:?} → {:?}", before.state, after.state).to_lowercase());
    }
    if before.health != after.health {
        changes.push(format!("health {:?} → {:?}", before.health, after.health).to_lowercase());
    }
    if before.ports != after.ports {
        // `80/tcp at :8081`, bindings of one container port together;
        // `none` when nothing is published (a stopped container).
        let ports = |f: &ContainerFacts| {
            let mut by_port: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for p in &f.ports {
                by_port
                    .entry(format!("{}/{}", p.container_port, p.protocol))
                    .or_default()
                    .push(format!(":{}", p.host_port));
            }
            if by_port.is_empty() {
                return "none".to_string();
            }
            by_port
                .into_iter()
                .map(|(port, mut hosts)| {
                    hosts.dedup();
                    format!("{port} at {}", hosts.join(" "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        changes.push(format!("ports {} → {}", ports(before), ports(after)));
    }
    if before.labels != after.labels {
        changes.push("labels changed".to_string());
    }
    if before.networks != after.networks {
        changes.push("networks changed".to_string());
    }
    if before.name != after.name {
        changes.push(format!("renamed {} → {}", before.name, after.name));
    }
    (!changes.is_empty()).then(|| changes.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AgentSync, ContainerDown, ContainerState, Health, Heartbeat, PortBinding};
    use crate::AgentId;

    fn facts(id: &str, domain: &str, host_ports: &[u16]) -> ContainerFacts {
        ContainerFacts {
            agent: AgentId::new("a1").unwrap(),
            id: id.into(),
            name: format!("ctr-{id}"),
            host_address: "10.0.0.1".into(),
            labels: [("caddy".to_string(), domain.to_string())].into(),
            ports: host_ports
                .iter()
                .map(|&host_port| PortBinding {
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: "0.0.0.0".into(),
                    host_port,
                })
                .collect(),
            networks: BTreeMap::new(),
            state: ContainerState::Running,
            health: Health::None,
            observed_at_ms: 1,
        }
    }

    fn sync(ids: &[&str]) -> Event {
        Event::Sync(AgentSync {
            agent: AgentId::new("a1").unwrap(),
            host_address: "10.0.0.1".into(),
            containers: ids.iter().map(|id| id.to_string()).collect(),
            observed_at_ms: 0,
        })
    }

    /// The history lines of `events` (folded in order from an empty state).
    fn lines(events: &[Event], filter: &HistoryFilter) -> Vec<(u64, String)> {
        let mut state = RouteState::default();
        let mut out = Vec::new();
        for (seq, event) in (1..).zip(events) {
            if let Some(c) = change(&state, event, filter, "caddy") {
                out.push((seq, c.change));
            }
            state.apply(seq, event);
        }
        out
    }

    #[test]
    fn history_omits_ups_that_change_nothing_and_shows_ports_readably() {
        let web = |ports: &[u16]| facts("c1", "a.test", ports);
        assert_eq!(describe(Some(&web(&[8081])), &web(&[8081])), None);
        let mut stopped = web(&[]);
        stopped.state = ContainerState::Exited;
        assert_eq!(
            describe(Some(&web(&[8081])), &stopped).unwrap(),
            "state running → exited, ports 80/tcp at :8081 → none"
        );
        assert_eq!(
            describe(Some(&web(&[8081])), &web(&[8082, 8082])).unwrap(),
            "ports 80/tcp at :8081 → 80/tcp at :8082"
        );
        assert_eq!(describe(None, &web(&[1])).unwrap(), "up (running) a.test");
    }

    #[test]
    fn history_of_a_domain_follows_its_containers_through_ups_downs_and_syncs() {
        let events = [
            Event::Up(facts("w1", "web.test", &[1])),
            Event::Up(facts("api", "api.test", &[2])),
            Event::Heartbeat(Heartbeat {
                agent: AgentId::new("a1").unwrap(),
                sent_at_ms: 1,
            }),
            // Re-sent, unchanged: no line.
            Event::Up(facts("w1", "web.test", &[1])),
            Event::Up(facts("w1", "web.test", &[3])),
            sync(&["api"]),
            sync(&["api", "w1"]),
            Event::Down(ContainerDown {
                agent: AgentId::new("a1").unwrap(),
                id: "w1".into(),
                observed_at_ms: 0,
            }),
        ];
        let web = HistoryFilter {
            domain: Some("web.test".into()),
            ..Default::default()
        };
        assert_eq!(
            lines(&events, &web),
            [
                (1, "up (running) web.test".to_string()),
                (5, "ports 80/tcp at :1 → 80/tcp at :3".to_string()),
                (
                    6,
                    "sync: 1 containers, no longer listed: ctr-w1".to_string()
                ),
                (7, "sync: 2 containers, listed again: ctr-w1".to_string()),
                (8, "down (removed)".to_string()),
            ]
        );
        // Unfiltered, every sync is a line; another agent's filter sees nothing.
        let all = lines(&events, &HistoryFilter::default());
        assert_eq!(
            all.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [1, 2, 5, 6, 7, 8]
        );
        let other = HistoryFilter {
            agent: Some("a2".into()),
            ..Default::default()
        };
        assert!(lines(&events, &other).is_empty());
        let by_name = HistoryFilter {
            container: Some("ctr-api".into()),
            ..Default::default()
        };
        assert_eq!(
            lines(&events, &by_name),
            [(2, "up (running) api.test".to_string())]
        );
    }
}
