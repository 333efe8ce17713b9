//! Route tables derived from the state, for people: what routes where, the
//! difference between two points of the log, and why a domain routes (or
//! does not route) to a container. Pure, like the rest of this crate.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::caddyfile::Block;
use crate::state::RouteState;
use crate::translate::{translate_units, TranslateOptions};

/// One site of the generated config (also as `/status` serves it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRow {
    /// The site's addresses, as written in the labels.
    pub site: String,
    /// The upstreams of its `reverse_proxy` lines.
    pub upstreams: Vec<String>,
    /// The containers declaring it.
    pub containers: Vec<RouteContainer>,
    /// How its upstreams reach Caddy.
    #[serde(default)]
    pub upstreams_mode: UpstreamsMode,
    /// In dynamic mode, why this site's upstreams stay in the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_reason: Option<String>,
}

/// How a site's upstreams reach Caddy (`UPSTREAMS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamsMode {
    /// Listed in the config: a change of upstreams is a push.
    #[default]
    Static,
    /// Looked up in the applier's DNS: a change of upstreams changes its
    /// answers, with no push.
    Dynamic,
}

/// A container behind a route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteContainer {
    pub agent: String,
    pub container: String,
    pub container_id: String,
    /// Stream sequence of the message its current facts came from.
    #[serde(default)]
    pub since_seq: u64,
}

/// The `reverse_proxy` upstreams anywhere in a block.
pub fn proxy_upstreams(block: &Block, out: &mut Vec<String>) {
    if block.keys.first().map(String::as_str) == Some("reverse_proxy") {
        let (_, skip) = crate::caddyfile::proxy_matcher(block);
        for upstream in block.keys.iter().skip(skip) {
            if !out.contains(upstream) {
                out.push(upstream.clone());
            }
        }
    }
    for child in &block.children {
        proxy_upstreams(child, out);
    }
}

/// The route table of `state`, by site.
pub fn route_table(state: &RouteState, options: &TranslateOptions) -> Vec<RouteRow> {
    let (units, _) = translate_units(state, options, &BTreeSet::new());
    route_rows(state, &units)
}

/// The route table of already translated `units` of `state`.
pub fn route_rows(state: &RouteState, units: &[crate::translate::ContainerUnit]) -> Vec<RouteRow> {
    let seqs: BTreeMap<(&str, &str), u64> = state
        .live_containers()
        .map(|r| ((r.facts.agent.as_str(), r.facts.id.as_str()), r.seq))
        .collect();
    let mut rows: BTreeMap<String, RouteRow> = BTreeMap::new();
    for unit in units {
        for site in unit
            .file
            .blocks
            .iter()
            .filter(|b| !b.is_global() && !b.is_snippet() && !b.is_matcher())
        {
            let key = site.keys.join(" ");
            let mode = unit.proxies.mode_of(&key);
            let row = rows.entry(key.clone()).or_insert_with(|| RouteRow {
                site: key.clone(),
                upstreams: Vec::new(),
                containers: Vec::new(),
                upstreams_mode: match mode {
                    Some(Ok(())) => UpstreamsMode::Dynamic,
                    _ => UpstreamsMode::Static,
                },
                static_reason: None,
            });
            if let Some(Err(reason)) = mode {
                row.upstreams_mode = UpstreamsMode::Static;
                row.static_reason.get_or_insert_with(|| reason.to_string());
            }
            proxy_upstreams(site, &mut row.upstreams);
            for proxy in unit.proxies.dynamic.iter().filter(|d| d.site == key) {
                for upstream in &proxy.upstreams {
                    if !row.upstreams.contains(upstream) {
                        row.upstreams.push(upstream.clone());
                    }
                }
            }
            row.containers.push(RouteContainer {
                agent: unit.agent.to_string(),
                container: unit.container.clone(),
                container_id: unit.container_id.clone(),
                since_seq: seqs
                    .get(&(unit.agent.as_str(), unit.container_id.as_str()))
                    .copied()
                    .unwrap_or(0),
            });
        }
    }
    rows.into_values().collect()
}

/// A container left out of the config (also as `/status` serves it, under
/// `rejected`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRow {
    pub agent: String,
    pub container: String,
    #[serde(default)]
    pub container_id: String,
    /// `labels`, `policy` or `caddy`.
    pub by: String,
    pub reason: String,
}

/// The containers of `state` translation leaves out (by their labels or
/// the policy; Caddy's own refusals only a live applier knows).
pub fn refused_rows(state: &RouteState, options: &TranslateOptions) -> Vec<RefusedRow> {
    let (_, refused) = translate_units(state, options, &BTreeSet::new());
    refused
        .into_iter()
        .map(|r| RefusedRow {
            agent: r.agent,
            container: r.container,
            container_id: r.container_id,
            by: r.by.as_str().to_string(),
            reason: r.reason,
        })
        .collect()
}

/// What changed between two route tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDiff {
    pub added: Vec<RouteRow>,
    pub removed: Vec<RouteRow>,
    /// (before, after) of sites whose upstreams or containers changed.
    pub changed: Vec<(RouteRow, RouteRow)>,
}

/// The difference from `before` to `after`. A container whose facts were
/// merely re-published (same upstreams, same containers) is no change.
pub fn diff(before: &[RouteRow], after: &[RouteRow]) -> RouteDiff {
    let index = |rows: &[RouteRow]| -> BTreeMap<String, RouteRow> {
        rows.iter().map(|r| (r.site.clone(), r.clone())).collect()
    };
    let (b, a) = (index(before), index(after));
    let ids = |r: &RouteRow| -> BTreeSet<(String, String)> {
        r.containers
            .iter()
            .map(|c| (c.agent.clone(), c.container_id.clone()))
            .collect()
    };
    let mut out = RouteDiff::default();
    for (site, row) in &a {
        match b.get(site) {
            None => out.added.push(row.clone()),
            Some(old) if old.upstreams != row.upstreams || ids(old) != ids(row) => {
                out.changed.push((old.clone(), row.clone()))
            }
            Some(_) => {}
        }
    }
    out.removed = b
        .iter()
        .filter(|(site, _)| !a.contains_key(*site))
        .map(|(_, r)| r.clone())
        .collect();
    out
}

/// Why a container does or does not serve a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainEntry {
    pub agent: String,
    pub container: String,
    pub container_id: String,
    /// Stream sequence of the message its facts came from.
    pub seq: u64,
    /// The upstreams it contributes (empty when left out).
    pub upstreams: Vec<String>,
    /// Why it is left out; `None` when it serves the domain.
    pub left_out: Option<String>,
    /// How its upstreams reach Caddy: the DNS name they are answered
    /// under, or why they stay static (dynamic mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams_by: Option<String>,
}

/// Whether an address list (`http://a.test b.test:8080`) names `domain`.
fn addresses_name(addresses: &str, domain: &str) -> bool {
    addresses.split_whitespace().any(|a| {
        let host = a.split_once("://").map_or(a, |(_, rest)| rest);
        host.split(['/', ':'])
            .next()
            .is_some_and(|h| h.eq_ignore_ascii_case(domain))
    })
}

/// Whether a container's root labels (`caddy`, `caddy_N`) name `domain` as
/// a site address, with or without scheme and port.
pub fn declares_domain(facts: &crate::ContainerFacts, domain: &str, prefix: &str) -> bool {
    facts.labels.iter().any(|(k, v)| {
        crate::labels::is_caddy_label(k, prefix) && !k.contains('.') && addresses_name(v, domain)
    })
}

/// Every container whose labels name `domain` (as a site address, with or
/// without scheme and port), included or left out, with the reason.
pub fn explain(state: &RouteState, options: &TranslateOptions, domain: &str) -> Vec<ExplainEntry> {
    // What the applier would refuse, and why: labels, policy, ownership.
    let (_, refused) = translate_units(state, options, &std::collections::BTreeSet::new());
    let refused: std::collections::BTreeMap<&str, &crate::translate::Rejected> = refused
        .iter()
        .map(|r| (r.container_id.as_str(), r))
        .collect();
    let mut entries = Vec::new();
    for agent in state.agents.values() {
        for record in agent.containers.values() {
            let facts = &record.facts;
            let declared = declares_domain(facts, domain, &options.label_prefix);
            if !declared {
                continue;
            }
            let mut entry = ExplainEntry {
                agent: facts.agent.to_string(),
                container: facts.name.clone(),
                container_id: facts.id.clone(),
                seq: record.seq,
                upstreams: Vec::new(),
                left_out: None,
                upstreams_by: None,
            };
            if !record.listed {
                entry.left_out = Some("its agent's latest sync does not list it (removed while the publisher was away)".into());
            } else if !facts.is_routable() {
                entry.left_out = Some(
                    format!(
                        "not routable: state {:?}, health {:?}",
                        facts.state, facts.health
                    )
                    .to_lowercase(),
                );
            } else if let Some(refusal) = refused.get(facts.id.as_str()) {
                entry.left_out = Some(match refusal.by {
                    crate::translate::RefusedBy::Labels => {
                        format!("labels rejected: {}", refusal.reason)
                    }
                    crate::translate::RefusedBy::Policy => {
                        format!("refused by policy: {}", refusal.reason)
                    }
                });
            } else if let Some(shard) = options
                .shard
                .as_ref()
                .filter(|shard| !shard.serves_host(domain))
            {
                entry.left_out = Some(format!(
                    "ignored: outside this applier's APPLIER_DOMAINS ({}); another shard serves it",
                    shard.patterns().join(",")
                ));
            } else {
                match crate::translate::translate_container_resolving(facts, options) {
                    Err(error) => entry.left_out = Some(format!("labels rejected: {error}")),
                    Ok((mut file, resolved)) => {
                        let proxies = options
                            .dynamic_upstreams
                            .as_ref()
                            .map(|d| crate::dynamic::rewrite(&mut file, &resolved, d));
                        for site in file
                            .blocks
                            .iter()
                            .filter(|b| addresses_name(&b.keys.join(" "), domain))
                        {
                            let key = site.keys.join(" ");
                            proxy_upstreams(site, &mut entry.upstreams);
                            let Some(proxies) = &proxies else { continue };
                            for proxy in proxies.dynamic.iter().filter(|d| d.site == key) {
                                entry.upstreams.extend(proxy.upstreams.iter().cloned());
                                entry.upstreams_by = Some(format!("DNS ({})", proxy.name));
                            }
                            if let Some(kept) = proxies.kept_static.iter().find(|s| s.site == key) {
                                entry.upstreams_by = Some(format!("static: {}", kept.reason));
                            }
                        }
                    }
                }
            }
            entries.push(entry);
        }
    }
    entries
}

/// Marks the entries a live applier left out, with who refused them and
/// why: at the applier's present, its verdicts (Caddy's own refusals among
/// them) are the truth.
pub fn apply_live_refusals(entries: &mut [ExplainEntry], refused: &[RefusedRow]) {
    for entry in entries.iter_mut().filter(|e| e.left_out.is_none()) {
        if let Some(r) = refused
            .iter()
            .find(|r| r.container_id == entry.container_id)
        {
            entry.left_out = Some(format!("refused by {}: {}", r.by, r.reason));
            entry.upstreams.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ContainerDown, ContainerFacts, ContainerState, Event, Health, PortBinding};
    use crate::AgentId;

    fn up(agent: &str, id: &str, domain: &str, port: u16, state: ContainerState) -> Event {
        Event::Up(ContainerFacts {
            agent: AgentId::new(agent).unwrap(),
            id: id.into(),
            name: format!("n-{id}"),
            host_address: format!("h-{agent}"),
            labels: [
                ("caddy".to_string(), format!("http://{domain}")),
                (
                    "caddy.reverse_proxy".to_string(),
                    "{{upstreams 80}}".to_string(),
                ),
            ]
            .into(),
            // Port 0 stands for "publishes nothing".
            ports: (port != 0)
                .then(|| PortBinding {
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: "0.0.0.0".into(),
                    host_port: port,
                })
                .into_iter()
                .collect(),
            networks: Default::default(),
            state,
            health: Health::None,
            observed_at_ms: 0,
        })
    }

    #[test]
    fn tables_diffs_and_explanations() {
        let opts = TranslateOptions::trusting();
        let mut s = RouteState::default();
        s.apply(1, &up("a1", "c1", "a.test", 8001, ContainerState::Running));
        s.apply(2, &up("a2", "c2", "a.test", 8002, ContainerState::Running));
        s.apply(3, &up("a1", "c3", "b.test", 0, ContainerState::Running));
        let before = route_table(&s, &opts);
        assert_eq!(before.len(), 1, "c3 publishes nothing on 80: {before:?}");
        assert_eq!(before[0].upstreams, ["h-a1:8001", "h-a2:8002"]);
        assert_eq!(before[0].containers[1].since_seq, 2);

        s.apply(
            4,
            &Event::Down(ContainerDown {
                agent: AgentId::new("a2").unwrap(),
                id: "c2".into(),
                observed_at_ms: 0,
            }),
        );
        s.apply(5, &up("a1", "c4", "c.test", 8004, ContainerState::Running));
        s.apply(6, &up("a1", "c5", "a.test", 8005, ContainerState::Exited));
        let after = route_table(&s, &opts);
        let d = diff(&before, &after);
        assert_eq!(
            d.added.iter().map(|r| r.site.as_str()).collect::<Vec<_>>(),
            ["http://c.test"]
        );
        assert!(d.removed.is_empty());
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0].1.upstreams, ["h-a1:8001"]);

        let why = explain(&s, &opts, "a.test");
        assert_eq!(why.len(), 2, "{why:?}");
        assert_eq!(
            why.iter()
                .find(|e| e.container_id == "c1")
                .unwrap()
                .upstreams,
            ["h-a1:8001"]
        );
        assert!(why
            .iter()
            .find(|e| e.container_id == "c5")
            .unwrap()
            .left_out
            .as_ref()
            .unwrap()
            .contains("exited"));
        let why_b = explain(&s, &opts, "b.test");
        assert!(
            why_b[0]
                .left_out
                .as_ref()
                .unwrap()
                .contains("no published port for 80/tcp"),
            "{why_b:?}"
        );
    }

    #[test]
    fn routes_and_explain_say_how_upstreams_reach_caddy() {
        let mut opts = TranslateOptions::trusting();
        opts.dynamic_upstreams = Some(crate::dynamic::DynamicUpstreams {
            resolver: "127.0.0.1:8053".parse().unwrap(),
            refresh: std::time::Duration::from_secs(1),
            grace_period: std::time::Duration::from_secs(60),
        });
        let mut s = RouteState::default();
        s.apply(1, &up("a1", "c1", "a.test", 8001, ContainerState::Running));
        let mut checked = up("a1", "c2", "b.test", 8002, ContainerState::Running);
        if let Event::Up(facts) = &mut checked {
            facts.host_address = "10.0.0.2".into();
            facts
                .labels
                .insert("caddy.reverse_proxy.health_uri".into(), "/h".into());
        }
        s.apply(2, &checked);
        s.apply(3, &up("a2", "c3", "c.test", 8003, ContainerState::Running));
        if let Event::Up(facts) = &mut checked {
            facts.id = "c4".into();
            facts.labels.remove("caddy.reverse_proxy.health_uri");
            facts.labels.insert("caddy".into(), "http://d.test".into());
        }
        s.apply(4, &checked);
        let table = route_table(&s, &opts);
        let row = |site: &str| table.iter().find(|r| r.site == site).unwrap();
        // Host names are not IP addresses: static, with the reason.
        assert_eq!(row("http://a.test").upstreams_mode, UpstreamsMode::Static);
        assert!(row("http://a.test")
            .static_reason
            .as_deref()
            .unwrap()
            .contains("not an IP address"));
        assert_eq!(row("http://b.test").upstreams_mode, UpstreamsMode::Static);
        assert!(row("http://b.test")
            .static_reason
            .as_deref()
            .unwrap()
            .contains("health_uri"));
        assert_eq!(row("http://b.test").upstreams, ["10.0.0.2:8002"]);
        assert_eq!(row("http://d.test").upstreams_mode, UpstreamsMode::Dynamic);
        assert_eq!(row("http://d.test").static_reason, None);
        assert_eq!(row("http://d.test").upstreams, ["10.0.0.2:8002"]);

        let why = explain(&s, &opts, "d.test");
        assert_eq!(why[0].upstreams, ["10.0.0.2:8002"]);
        assert!(why[0]
            .upstreams_by
            .as_deref()
            .unwrap()
            .starts_with("DNS (h"));
        let why = explain(&s, &opts, "b.test");
        assert!(why[0]
            .upstreams_by
            .as_deref()
            .unwrap()
            .starts_with("static: its labels configure Caddy's health checks"));
        // Static mode says nothing of DNS.
        let plain = explain(&s, &TranslateOptions::trusting(), "d.test");
        assert_eq!(plain[0].upstreams_by, None);
    }

    #[test]
    fn explain_says_a_stopping_container_and_another_shards_site_are_left_out() {
        let mut opts = TranslateOptions::trusting();
        opts.shard = Some(crate::shard::DomainShard::parse("a.test").unwrap());
        let mut s = RouteState::default();
        s.apply(1, &up("a1", "c1", "a.test", 8001, ContainerState::Stopping));
        s.apply(2, &up("a1", "c2", "a.test", 8002, ContainerState::Running));
        s.apply(3, &up("a1", "c3", "b.test", 8003, ContainerState::Running));
        let why = explain(&s, &opts, "a.test");
        let left_out = |id: &str| {
            why.iter()
                .find(|e| e.container_id == id)
                .and_then(|e| e.left_out.clone())
        };
        assert!(
            left_out("c1").unwrap().contains("state stopping"),
            "{why:?}"
        );
        assert_eq!(left_out("c2"), None);
        let why_b = explain(&s, &opts, "b.test");
        assert!(
            why_b[0]
                .left_out
                .as_ref()
                .unwrap()
                .starts_with("ignored: outside this applier's APPLIER_DOMAINS (a.test)"),
            "{why_b:?}"
        );
        assert!(why_b[0].upstreams.is_empty());
    }

    #[test]
    fn explain_takes_a_live_appliers_refusals() {
        let entry = |id: &str| ExplainEntry {
            upstreams_by: None,
            agent: "a1".into(),
            container: id.into(),
            container_id: id.into(),
            seq: 1,
            upstreams: vec!["10.0.0.1:80".into()],
            left_out: None,
        };
        let mut entries = vec![entry("bad"), entry("good")];
        apply_live_refusals(
            &mut entries,
            &[RefusedRow {
                agent: "a1".into(),
                container: "bad".into(),
                container_id: "bad".into(),
                by: "caddy".into(),
                reason: "unrecognized directive: bogus_directive".into(),
            }],
        );
        assert_eq!(
            entries[0].left_out.as_deref(),
            Some("refused by caddy: unrecognized directive: bogus_directive")
        );
        assert!(entries[0].upstreams.is_empty());
        assert_eq!(entries[1].left_out, None);
    }

    #[test]
    fn refused_rows_name_who_refused_and_why() {
        let opts = TranslateOptions::trusting();
        let mut s = RouteState::default();
        let mut bad = up("a1", "c1", "a.test", 8001, ContainerState::Running);
        if let Event::Up(facts) = &mut bad {
            facts
                .labels
                .insert("caddy.reverse_proxy".into(), "{{upstreams".into());
        }
        s.apply(1, &bad);
        let rows = refused_rows(&s, &opts);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].container_id.as_str(), rows[0].by.as_str()),
            ("c1", "labels")
        );
    }
}
