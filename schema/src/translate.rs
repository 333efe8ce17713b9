//! Container facts → one Caddyfile: each routable container's labels are
//! translated with caddy-docker-proxy's grammar ([`crate::labels`]), its
//! `{{upstreams}}` resolved from its facts, and the results merged after
//! the user's base Caddyfile the way caddy-docker-proxy merges them, so one
//! domain on three hosts becomes one site with three upstreams.
//!
//! A container whose labels cannot be translated is left out with a
//! [`Rejected`] entry; it never affects other containers.

use std::collections::BTreeSet;

use crate::caddyfile::Caddyfile;
use crate::event::ContainerFacts;
use crate::labels::{from_labels, LabelError};
use crate::state::RouteState;
use crate::subject::AgentId;
use crate::template::Upstreams;

/// How labels are read and upstreams resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateOptions {
    /// The label prefix (`caddy` unless configured otherwise).
    pub label_prefix: String,
    /// The agent running next to Caddy (server mode), whose containers may
    /// be reached on a shared Docker network instead of published ports.
    pub local: Option<LocalNetwork>,
}

/// Reaching the local agent's containers on a Docker network, as
/// caddy-docker-proxy does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNetwork {
    /// The agent whose containers share a network with Caddy.
    pub agent: AgentId,
    /// The network's name.
    pub network: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            label_prefix: "caddy".to_string(),
            local: None,
        }
    }
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
    pub error: LabelError,
}

/// The merged config and the containers that could not contribute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// The base Caddyfile with every container's blocks merged in.
    pub caddyfile: Caddyfile,
    /// Containers left out.
    pub rejected: Vec<Rejected>,
}

/// One routable container's translated labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerUnit {
    /// The agent running the container.
    pub agent: AgentId,
    /// The container's name.
    pub container: String,
    /// The container's ID.
    pub container_id: String,
    /// Its blocks, upstreams resolved.
    pub file: Caddyfile,
    /// `file` marshalled: identifies what this container contributes.
    pub text: String,
}

/// Translates every routable container of `state` whose agent is not in
/// `skip_agents`, in the state's stable order (agent, then container ID).
pub fn translate_units(
    state: &RouteState,
    options: &TranslateOptions,
    skip_agents: &BTreeSet<AgentId>,
) -> (Vec<ContainerUnit>, Vec<Rejected>) {
    let mut units = Vec::new();
    let mut rejected = Vec::new();
    for record in state.live_containers() {
        let facts = &record.facts;
        if !facts.is_routable() || skip_agents.contains(&facts.agent) {
            continue;
        }
        match translate_container(facts, options) {
            Ok(file) => units.push(ContainerUnit {
                agent: facts.agent.clone(),
                container: facts.name.clone(),
                container_id: facts.id.clone(),
                text: file.marshal(),
                file,
            }),
            Err(error) => rejected.push(Rejected {
                agent: facts.agent.to_string(),
                container: facts.name.clone(),
                container_id: facts.id.clone(),
                error,
            }),
        }
    }
    (units, rejected)
}

/// Merges `units` after `base`, as caddy-docker-proxy merges containers.
pub fn assemble<'a>(
    base: Option<&Caddyfile>,
    units: impl IntoIterator<Item = &'a ContainerUnit>,
) -> Caddyfile {
    let mut file = base.cloned().unwrap_or_default();
    file.merge_all(units.into_iter().map(|u| u.file.clone()));
    file
}

/// Translates every routable container of `state` and merges the results
/// after `base` (the user's Caddyfile), in the state's stable order.
pub fn translate_state(
    state: &RouteState,
    base: Option<&Caddyfile>,
    options: &TranslateOptions,
) -> Translation {
    let (units, rejected) = translate_units(state, options, &BTreeSet::new());
    Translation {
        caddyfile: assemble(base, &units),
        rejected,
    }
}

/// One container's labels as a Caddyfile, upstreams resolved.
pub fn translate_container(
    facts: &ContainerFacts,
    options: &TranslateOptions,
) -> Result<Caddyfile, LabelError> {
    let network = options
        .local
        .as_ref()
        .filter(|local| local.agent == facts.agent)
        .and_then(|local| facts.networks.get(&local.network));
    let upstreams = FactsUpstreams { facts, network };
    from_labels(&facts.labels, &options.label_prefix, &upstreams)
}

/// `{{upstreams}}` for one container: its IP on the shared network (local
/// containers in server mode), else its agent's address and published ports.
struct FactsUpstreams<'a> {
    facts: &'a ContainerFacts,
    network: Option<&'a String>,
}

impl Upstreams for FactsUpstreams<'_> {
    fn resolve(&self, port: Option<u16>) -> Result<Vec<String>, String> {
        let facts = self.facts;
        // Docker may publish a port twice, on IPv4 and IPv6, even on
        // different host ports; only the bindings of the host address's
        // family are reachable at it (a DNS name counts as IPv4).
        let v6_host = facts.host_address.parse::<std::net::Ipv6Addr>().is_ok();
        let is_v6 = |ip: &str| ip.contains(':');
        let tcp_all: Vec<&crate::event::PortBinding> =
            facts.ports.iter().filter(|p| p.protocol == "tcp").collect();
        let family: Vec<&crate::event::PortBinding> = tcp_all
            .iter()
            .copied()
            .filter(|p| is_v6(&p.host_ip) == v6_host)
            .collect();
        let tcp = if family.is_empty() { tcp_all } else { family }.into_iter();
        if let Some(ip) = self.network {
            return Ok(vec![match port {
                Some(port) => format!("{ip}:{port}"),
                None => ip.clone(),
            }]);
        }
        let port = match port {
            Some(port) => port,
            None => {
                let ports: BTreeSet<u16> = tcp.clone().map(|p| p.container_port).collect();
                match ports.iter().next() {
                    Some(port) if ports.len() == 1 => *port,
                    _ => {
                        return Err(format!(
                            "{{{{upstreams}}}} needs a port: container {} publishes {} TCP ports; write {{{{upstreams <port>}}}}",
                            facts.name,
                            ports.len()
                        ))
                    }
                }
            }
        };
        let host_ports: BTreeSet<u16> = tcp
            .filter(|p| p.container_port == port)
            .map(|p| p.host_port)
            .collect();
        if host_ports.is_empty() {
            return Err(format!(
                "no published port for {port}/tcp on container {}",
                facts.name
            ));
        }
        let host = if v6_host {
            format!("[{}]", facts.host_address)
        } else {
            facts.host_address.clone()
        };
        Ok(host_ports
            .iter()
            .map(|host_port| format!("{host}:{host_port}"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::event::{ContainerState, Event, PortBinding};
    use crate::Health;

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
            networks: BTreeMap::from([("front".to_string(), format!("172.18.0.{}", name.len()))]),
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

    fn translate(containers: Vec<ContainerFacts>) -> Translation {
        translate_state(&state(containers), None, &TranslateOptions::default())
    }

    const PROXY: (&str, &str) = ("caddy.reverse_proxy", "{{upstreams 80}}");

    #[test]
    fn basic_labels_become_a_site_on_the_published_port() {
        let t = translate(vec![facts(
            "a1",
            "web",
            &[("caddy", "a.test"), PROXY],
            &[(80, 32768)],
        )]);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:32768\n}\n"
        );
        assert!(t.rejected.is_empty());
    }

    #[test]
    fn same_domain_on_three_hosts_is_one_load_balanced_site() {
        let t = translate(vec![
            facts("a3", "web", &[("caddy", "a.test"), PROXY], &[(80, 8003)]),
            facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 8001)]),
            facts("a2", "web", &[("caddy", "a.test"), PROXY], &[(80, 8002)]),
        ]);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:8001 host-a2:8002 host-a3:8003\n}\n"
        );
    }

    #[test]
    fn missing_published_port_rejects_only_that_container() {
        let t = translate(vec![
            facts("a1", "bad", &[("caddy", "b.test"), PROXY], &[(8080, 9000)]),
            facts("a1", "good", &[("caddy", "g.test"), PROXY], &[(80, 9001)]),
        ]);
        assert_eq!(
            t.caddyfile.marshal(),
            "g.test {\n\treverse_proxy host-a1:9001\n}\n"
        );
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(
            t.rejected[0].error.to_string(),
            "label caddy.reverse_proxy: no published port for 80/tcp on container bad"
        );
    }

    #[test]
    fn only_bindings_of_the_host_address_family_are_used() {
        let mut f = facts("a1", "web", &[], &[]);
        f.ports = vec![
            PortBinding {
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "0.0.0.0".into(),
                host_port: 33296,
            },
            PortBinding {
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "::".into(),
                host_port: 33297,
            },
        ];
        f.host_address = "10.0.0.2".into();
        assert_eq!(
            FactsUpstreams {
                facts: &f,
                network: None
            }
            .resolve(Some(80))
            .unwrap(),
            ["10.0.0.2:33296"]
        );
        f.host_address = "fd00::2".into();
        assert_eq!(
            FactsUpstreams {
                facts: &f,
                network: None
            }
            .resolve(Some(80))
            .unwrap(),
            ["[fd00::2]:33297"]
        );
        f.ports.remove(0);
        f.host_address = "10.0.0.2".into();
        assert_eq!(
            FactsUpstreams {
                facts: &f,
                network: None
            }
            .resolve(Some(80))
            .unwrap(),
            ["10.0.0.2:33297"],
            "falls back to what there is"
        );
    }

    #[test]
    fn several_bindings_give_one_upstream_each_and_bare_upstreams_needs_one_port() {
        let f = facts("a1", "web", &[], &[(80, 8001), (80, 8002), (443, 8443)]);
        let up = FactsUpstreams {
            facts: &f,
            network: None,
        };
        assert_eq!(
            up.resolve(Some(80)).unwrap(),
            ["host-a1:8001", "host-a1:8002"]
        );
        assert!(up
            .resolve(None)
            .unwrap_err()
            .contains("publishes 2 TCP ports"));
        let one = facts("a1", "one", &[], &[(443, 8443)]);
        assert_eq!(
            FactsUpstreams {
                facts: &one,
                network: None
            }
            .resolve(None)
            .unwrap(),
            ["host-a1:8443"]
        );
    }

    #[test]
    fn local_containers_use_the_shared_network() {
        let options = TranslateOptions {
            local: Some(LocalNetwork {
                agent: AgentId::new("srv").unwrap(),
                network: "front".into(),
            }),
            ..TranslateOptions::default()
        };
        let local = facts("srv", "web", &[("caddy", "a.test"), PROXY], &[]);
        let remote = facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 8001)]);
        let t = translate_state(&state(vec![local, remote]), None, &options);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:8001 172.18.0.3:80\n}\n"
        );
    }

    #[test]
    fn sites_merge_after_the_base_caddyfile() {
        let base =
            Caddyfile::parse("{\n\tadmin 127.0.0.1:2019\n}\nstatic.test {\n\trespond hi\n}\n")
                .unwrap();
        let s = state(vec![facts(
            "a1",
            "web",
            &[("caddy", "a.test"), PROXY],
            &[(80, 8001)],
        )]);
        let t = translate_state(&s, Some(&base), &TranslateOptions::default());
        assert_eq!(
            t.caddyfile.marshal(),
            "{\n\tadmin 127.0.0.1:2019\n}\nstatic.test {\n\trespond hi\n}\na.test {\n\treverse_proxy host-a1:8001\n}\n"
        );
    }

    #[test]
    fn stopped_and_unhealthy_containers_are_not_routed() {
        let mut stopped = facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 1)]);
        stopped.state = ContainerState::Exited;
        let mut sick = facts("a1", "sick", &[("caddy", "b.test"), PROXY], &[(80, 2)]);
        sick.health = Health::Unhealthy;
        assert!(translate(vec![stopped, sick]).caddyfile.blocks.is_empty());
    }
}
