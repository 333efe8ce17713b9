//! Container labels → Caddyfile sites, and the merge of every container's
//! sites into one Caddyfile.
//!
//! This is the first cut of the translation: the site address label
//! (`caddy=a.example.com b.example.com`), nested directives by dots
//! (`caddy.reverse_proxy`, `caddy.tls.dns`, …) and the `{{upstreams}}`
//! template, resolved from the container's published ports. Sites with the
//! same address from several containers merge into one, and their
//! `reverse_proxy` lines with the same matcher join into one upstream list,
//! as caddy-docker-proxy does.
//!
//! A container whose labels cannot be translated is left out with a
//! [`TranslateError`]; it never affects other containers.

use std::collections::BTreeSet;

use crate::caddyfile::{Block, Caddyfile};
use crate::event::ContainerFacts;
use crate::state::RouteState;

/// How labels are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateOptions {
    /// The label prefix (`caddy` unless configured otherwise).
    pub label_prefix: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            label_prefix: "caddy".to_string(),
        }
    }
}

/// Why one container's labels produced no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The label's template could not be evaluated.
    #[error("label {label}: {reason}")]
    Template { label: String, reason: String },
    /// `{{upstreams <port>}}` names a port the container does not publish.
    #[error("no published port for {port}/tcp on container {container}")]
    NoPublishedPort { port: u16, container: String },
    /// `{{upstreams}}` without a port, and the container does not publish exactly one.
    #[error("label {label}: {{{{upstreams}}}} needs a port because container {container} publishes {count} TCP ports; write {{{{upstreams <port>}}}}")]
    AmbiguousPort {
        label: String,
        container: String,
        count: usize,
    },
}

/// A container left out of the generated config, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The agent running the container.
    pub agent: String,
    /// The container's name.
    pub container: String,
    /// The container's ID.
    pub container_id: String,
    /// What was wrong.
    pub error: TranslateError,
}

/// The generated sites and the containers that could not contribute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// Every site, merged and in a stable order.
    pub caddyfile: Caddyfile,
    /// Containers left out.
    pub rejected: Vec<Rejected>,
}

/// Whether `key` is a label caddy-docker-proxy reads for `prefix`: the
/// prefix itself, `prefix_N`, or either followed by `.` and a path. Look-alikes
/// such as `caddy_version` or `caddy_ingress_network` are not.
pub fn is_caddy_label(key: &str, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    let rest = match rest.strip_prefix('_') {
        Some(numbered) => {
            let digits = numbered.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return false;
            }
            &numbered[digits..]
        }
        None => rest,
    };
    rest.is_empty() || rest.starts_with('.')
}

/// Translates every routable container of the state and merges the result.
pub fn translate_state(state: &RouteState, options: &TranslateOptions) -> Translation {
    let mut translation = Translation::default();
    for record in state.live_containers() {
        let facts = &record.facts;
        if !facts.is_routable() {
            continue;
        }
        match container_sites(facts, options) {
            Ok(sites) => {
                for site in sites {
                    merge_site(&mut translation.caddyfile.blocks, site);
                }
            }
            Err(error) => translation.rejected.push(Rejected {
                agent: facts.agent.to_string(),
                container: facts.name.clone(),
                container_id: facts.id.clone(),
                error,
            }),
        }
    }
    translation
        .caddyfile
        .blocks
        .sort_by(|a, b| a.keys.cmp(&b.keys));
    translation
}

/// The sites one container declares.
pub fn container_sites(
    facts: &ContainerFacts,
    options: &TranslateOptions,
) -> Result<Vec<Block>, TranslateError> {
    let prefix = options.label_prefix.as_str();
    let Some(addresses) = facts.labels.get(prefix) else {
        return Ok(Vec::new());
    };
    let mut site = Block {
        keys: expand(prefix, addresses, facts)?,
        children: Vec::new(),
    };
    let nested = format!("{prefix}.");
    for (label, value) in &facts.labels {
        let Some(path) = label.strip_prefix(&nested) else {
            continue;
        };
        let mut block = &mut site;
        for name in path.split('.') {
            let index = match block
                .children
                .iter()
                .position(|c| c.keys.first().map(String::as_str) == Some(name))
            {
                Some(index) => index,
                None => {
                    block.children.push(Block::line([name]));
                    block.children.len() - 1
                }
            };
            block = &mut block.children[index];
        }
        block.keys.extend(expand(label, value, facts)?);
    }
    Ok(vec![site])
}

/// Merges `site` into `sites`: same addresses → one site, and within it a
/// `reverse_proxy` with the same matcher gains the new upstreams; identical
/// lines are kept once.
fn merge_site(sites: &mut Vec<Block>, site: Block) {
    match sites.iter_mut().find(|s| s.keys == site.keys) {
        Some(existing) => merge_children(existing, site.children),
        None => sites.push(site),
    }
}

fn merge_children(into: &mut Block, children: Vec<Block>) {
    for child in children {
        let directive = child.keys.first().map(String::as_str);
        if directive == Some("reverse_proxy") {
            let matcher = proxy_matcher(&child);
            if let Some(existing) = into.children.iter_mut().find(|c| {
                c.keys.first().map(String::as_str) == Some("reverse_proxy")
                    && proxy_matcher(c) == matcher
            }) {
                let skip = if matcher == "*" { 1 } else { 2 };
                for upstream in child.keys.into_iter().skip(skip) {
                    if !existing.keys.contains(&upstream) {
                        existing.keys.push(upstream);
                    }
                }
                merge_children(existing, child.children);
                continue;
            }
        }
        match into.children.iter_mut().find(|c| c.keys == child.keys) {
            Some(existing) => merge_children(existing, child.children),
            None => into.children.push(child),
        }
    }
}

/// The matcher of a `reverse_proxy` line: its first argument if that is a
/// path, `*` or a named matcher; otherwise `*`.
fn proxy_matcher(block: &Block) -> &str {
    match block.keys.get(1) {
        Some(m) if m == "*" || m.starts_with('/') || m.starts_with('@') => m,
        _ => "*",
    }
}

/// Evaluates the templates in one label value and splits it into tokens.
fn expand(label: &str, value: &str, facts: &ContainerFacts) -> Result<Vec<String>, TranslateError> {
    let mut text = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        text.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(TranslateError::Template {
                label: label.to_string(),
                reason: "unclosed action: \"{{\" without \"}}\"".to_string(),
            });
        };
        text.push_str(&evaluate(label, after[..end].trim(), facts)?);
        rest = &after[end + 2..];
    }
    text.push_str(rest);
    Ok(text.split_whitespace().map(str::to_string).collect())
}

/// Evaluates one `{{ … }}` action.
fn evaluate(label: &str, action: &str, facts: &ContainerFacts) -> Result<String, TranslateError> {
    let words: Vec<&str> = action.split_whitespace().collect();
    let template_error = |reason: String| TranslateError::Template {
        label: label.to_string(),
        reason,
    };
    match words.as_slice() {
        [] => Err(template_error("missing value for command".to_string())),
        [literal] if literal.len() >= 2 && literal.starts_with('"') && literal.ends_with('"') => {
            Ok(literal[1..literal.len() - 1].to_string())
        }
        ["upstreams", args @ ..] => {
            let mut proto = None;
            let mut port = None;
            for arg in args {
                match *arg {
                    "http" | "https" | "h2c" => proto = Some(*arg),
                    number => {
                        port = Some(number.parse::<u16>().map_err(|_| {
                            template_error(format!(
                            "upstreams: expected http, https, h2c or a port number, got {number:?}"
                        ))
                        })?)
                    }
                }
            }
            upstreams(label, facts, proto, port)
        }
        [proto @ ("http" | "https" | "h2c")] => Ok((*proto).to_string()),
        [function, ..] => Err(template_error(format!("function {function:?} not defined"))),
    }
}

/// `{{upstreams [proto] [port]}}`: the container's published address(es)
/// for that container port, on its agent's host address.
fn upstreams(
    label: &str,
    facts: &ContainerFacts,
    proto: Option<&str>,
    port: Option<u16>,
) -> Result<String, TranslateError> {
    let tcp = facts.ports.iter().filter(|p| p.protocol == "tcp");
    let port = match port {
        Some(port) => port,
        None => {
            let ports: BTreeSet<u16> = tcp.clone().map(|p| p.container_port).collect();
            match ports.iter().next() {
                Some(port) if ports.len() == 1 => *port,
                _ => {
                    return Err(TranslateError::AmbiguousPort {
                        label: label.to_string(),
                        container: facts.name.clone(),
                        count: ports.len(),
                    })
                }
            }
        }
    };
    let host_ports: BTreeSet<u16> = tcp
        .filter(|p| p.container_port == port)
        .map(|p| p.host_port)
        .collect();
    if host_ports.is_empty() {
        return Err(TranslateError::NoPublishedPort {
            port,
            container: facts.name.clone(),
        });
    }
    let scheme = proto.map(|p| format!("{p}://")).unwrap_or_default();
    Ok(host_ports
        .iter()
        .map(|host_port| format!("{scheme}{}:{host_port}", facts.host_address))
        .collect::<Vec<_>>()
        .join(" "))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::event::{ContainerState, Event, Health, PortBinding};
    use crate::subject::AgentId;

    fn facts(
        agent: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(u16, u16)],
    ) -> ContainerFacts {
        ContainerFacts {
            agent: AgentId::new(agent).unwrap(),
            id: format!("id-{name}"),
            name: name.to_string(),
            host_address: format!("host-{agent}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: ports
                .iter()
                .flat_map(|(c, h)| {
                    ["0.0.0.0", "::"].map(|ip| PortBinding {
                        container_port: *c,
                        protocol: "tcp".into(),
                        host_ip: ip.into(),
                        host_port: *h,
                    })
                })
                .collect(),
            networks: BTreeMap::new(),
            state: ContainerState::Running,
            health: Health::None,
            observed_at_ms: 0,
        }
    }

    fn state(containers: Vec<ContainerFacts>) -> RouteState {
        let mut s = RouteState::default();
        for (i, f) in containers.into_iter().enumerate() {
            s.apply(i as u64 + 1, &Event::Up(f));
        }
        s
    }

    const PROXY: (&str, &str) = ("caddy.reverse_proxy", "{{upstreams 80}}");

    #[test]
    fn basic_labels_become_a_site_on_the_published_port() {
        let t = translate_state(
            &state(vec![facts(
                "a1",
                "web",
                &[("caddy", "a.test"), PROXY],
                &[(80, 32768)],
            )]),
            &TranslateOptions::default(),
        );
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:32768\n}\n"
        );
        assert!(t.rejected.is_empty());
    }

    #[test]
    fn same_domain_on_several_hosts_is_one_load_balanced_site() {
        let t = translate_state(
            &state(vec![
                facts("a2", "web", &[("caddy", "a.test"), PROXY], &[(80, 8002)]),
                facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 8001)]),
            ]),
            &TranslateOptions::default(),
        );
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:8001 host-a2:8002\n}\n"
        );
    }

    #[test]
    fn missing_published_port_rejects_only_that_container() {
        let t = translate_state(
            &state(vec![
                facts("a1", "bad", &[("caddy", "b.test"), PROXY], &[(8080, 9000)]),
                facts("a1", "good", &[("caddy", "g.test"), PROXY], &[(80, 9001)]),
            ]),
            &TranslateOptions::default(),
        );
        assert_eq!(
            t.caddyfile.marshal(),
            "g.test {\n\treverse_proxy host-a1:9001\n}\n"
        );
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(
            t.rejected[0].error.to_string(),
            "no published port for 80/tcp on container bad"
        );
    }

    #[test]
    fn prefix_rule_matches_cdp() {
        for yes in ["caddy", "caddy.reverse_proxy", "caddy_0", "caddy_12.tls"] {
            assert!(is_caddy_label(yes, "caddy"), "{yes}");
        }
        for no in [
            "caddy_version",
            "caddy_.x",
            "caddy_ingress_network",
            "caddyx",
            "xcaddy",
            "caddy_1x",
        ] {
            assert!(!is_caddy_label(no, "caddy"), "{no}");
        }
    }

    #[test]
    fn upstreams_takes_protocol_and_port() {
        let f = facts("a1", "web", &[], &[(443, 8443)]);
        assert_eq!(
            evaluate("l", "upstreams https 443", &f).unwrap(),
            "https://host-a1:8443"
        );
        assert_eq!(evaluate("l", "upstreams", &f).unwrap(), "host-a1:8443");
        assert_eq!(evaluate("l", "\"\"", &f).unwrap(), "");
    }

    #[test]
    fn unknown_template_functions_name_the_label() {
        let f = facts(
            "a1",
            "web",
            &[("caddy", "a.test"), ("caddy.respond", "{{invalid}}")],
            &[],
        );
        let err = container_sites(&f, &TranslateOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "label caddy.respond: function \"invalid\" not defined"
        );
    }

    #[test]
    fn stopped_containers_are_not_routed() {
        let mut f = facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 1)]);
        f.state = ContainerState::Exited;
        assert!(
            translate_state(&state(vec![f]), &TranslateOptions::default())
                .caddyfile
                .blocks
                .is_empty()
        );
    }
}
