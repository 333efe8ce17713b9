//! Readiness: a started container is reported once it accepts connections.
//!
//! Docker's `start` event comes as the container's process starts, often
//! well before it listens. Routed then, its first requests fail: Caddy's
//! connection is refused, or, through a published port on loopback,
//! accepted by docker-proxy and reset; Caddy retries such a request only
//! after `lb_try_interval`, and in static mode a config load meanwhile
//! drops the retry (the request's context belongs to the unloaded config)
//! and answers 502.
//!
//! So the watch loop holds a started container's facts back until it
//! accepts a TCP connection on every port its labels' `{{upstreams}}` ask
//! for, at one of its network addresses, probed directly: the published
//! port would not do, since docker-proxy accepts whether or not the
//! container listens. Only ports the container declares (its image's
//! `EXPOSE`, `--expose`, or published) are waited for: labels naming
//! another port are most often a mistake the applier reports, and holding
//! the container back would only delay that report.
//!
//! The wait is bounded and never worse than reporting at once:
//! - a container that still refuses after `READY_TIMEOUT` is reported
//!   anyway, as it was before this existed, with a warning that names the
//!   port;
//! - one this host cannot reach at any of its addresses (a publisher in a
//!   container outside the container's networks, host networking, no IP)
//!   is reported as soon as that is known;
//! - a probe runs as its own task and reports back to the watch loop, which
//!   goes on meanwhile.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use caddy_fleet_schema::labels::upstream_ports;
use caddy_fleet_schema::ContainerFacts;
use tokio::net::TcpStream;

/// Longest wait for one connection attempt. A container address that does
/// not answer within it (no route, or a firewall that drops) is taken as
/// unreachable from this host: the container is reported without waiting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between two attempts on a port that refused.
const RETRY_INTERVAL: Duration = Duration::from_millis(25);

/// The port Caddy dials for an upstream address written without one.
const DEFAULT_PORT: u16 = 80;

/// What to probe for one container: for each port its labels proxy to,
/// the addresses it may be reached at (one per network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTargets(pub Vec<(u16, Vec<SocketAddr>)>);

impl ProbeTargets {
    /// The ports the labels' `{{upstreams}}` ask for (the only published
    /// TCP port, or 80, for one written without a port) that the container
    /// declares (`exposed`, as Docker spells them: `80/tcp`, or published),
    /// at each of its network addresses. Empty when there is nothing to
    /// probe: no `{{upstreams}}`, no declared port among them, or no
    /// address.
    pub fn of(facts: &ContainerFacts, label_prefix: &str, exposed: &[String]) -> Self {
        let addresses: Vec<IpAddr> = facts
            .networks
            .values()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if addresses.is_empty() {
            return ProbeTargets(Vec::new());
        }
        let published: BTreeSet<u16> = facts
            .ports
            .iter()
            .filter(|p| p.protocol == "tcp")
            .map(|p| p.container_port)
            .collect();
        let only_published = match published.len() {
            1 => published.first().copied(),
            _ => None,
        };
        let declared: BTreeSet<u16> = exposed
            .iter()
            .filter_map(|spec| spec.strip_suffix("/tcp")?.parse().ok())
            .chain(published)
            .collect();
        let ports: BTreeSet<u16> = upstream_ports(&facts.labels, label_prefix)
            .into_iter()
            .map(|port| port.or(only_published).unwrap_or(DEFAULT_PORT))
            .filter(|port| declared.contains(port))
            .collect();
        ProbeTargets(
            ports
                .into_iter()
                .map(|port| {
                    let at = addresses.iter().map(|ip| SocketAddr::new(*ip, port));
                    (port, at.collect())
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How a probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Every port accepted a connection.
    Listening,
    /// No address of the container answered at all: this host cannot
    /// reach it, so readiness cannot be told from here.
    Unreachable,
    /// `port` still refused when the wait ended.
    TimedOut { port: u16 },
}

/// Waits until every port of `targets` accepts a connection at one of its
/// addresses, for at most `timeout`.
pub async fn wait_listening(targets: ProbeTargets, timeout: Duration) -> Readiness {
    let deadline = tokio::time::Instant::now() + timeout;
    for (port, addresses) in targets.0 {
        loop {
            match attempt(&addresses).await {
                Attempt::Accepted => break,
                Attempt::Unreachable => return Readiness::Unreachable,
                Attempt::Refused => {}
            }
            if tokio::time::Instant::now() + RETRY_INTERVAL >= deadline {
                return Readiness::TimedOut { port };
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }
    Readiness::Listening
}

enum Attempt {
    Accepted,
    /// At least one address answered with a refusal: the container is
    /// there and does not listen yet.
    Refused,
    Unreachable,
}

async fn attempt(addresses: &[SocketAddr]) -> Attempt {
    let mut refused = false;
    for address in addresses {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(_)) => return Attempt::Accepted,
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }
    if refused {
        Attempt::Refused
    } else {
        Attempt::Unreachable
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use caddy_fleet_schema::{AgentId, ContainerState, Health, PortBinding};

    use super::*;

    fn facts(labels: &[(&str, &str)], published: &[u16], ips: &[&str]) -> ContainerFacts {
        ContainerFacts {
            agent: AgentId::new("a1").unwrap(),
            id: "c1".into(),
            name: "web".into(),
            host_address: "127.0.0.1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: published
                .iter()
                .map(|port| PortBinding {
                    container_port: *port,
                    protocol: "tcp".into(),
                    host_ip: "0.0.0.0".into(),
                    host_port: 30000 + port,
                })
                .collect(),
            networks: ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("net{i}"), ip.to_string()))
                .collect::<BTreeMap<_, _>>(),
            state: ContainerState::Running,
            health: Health::None,
            observed_at_ms: 0,
        }
    }

    fn at(ips: &[&str], port: u16) -> Vec<SocketAddr> {
        ips.iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
            .collect()
    }

    #[test]
    fn targets_are_the_proxied_ports_at_every_address() {
        let ips = ["172.18.0.2", "10.0.0.7"];
        let labelled = facts(
            &[
                ("caddy", "a.test"),
                ("caddy.reverse_proxy", "{{upstreams 8080}}"),
            ],
            &[8080, 9090],
            &ips,
        );
        // Networks are keyed by name: net0, net1.
        assert_eq!(
            ProbeTargets::of(&labelled, "caddy", &[]),
            ProbeTargets(vec![(8080, at(&ips, 8080))])
        );
        let portless = [
            ("caddy", "a.test"),
            ("caddy.reverse_proxy", "{{upstreams}}"),
        ];
        assert_eq!(
            ProbeTargets::of(&facts(&portless, &[3000], &ips[..1]), "caddy", &[]),
            ProbeTargets(vec![(3000, at(&ips[..1], 3000))])
        );
        // Not published (a local container): what the image exposes.
        let exposed = ["80/tcp".to_string(), "53/udp".to_string()];
        assert_eq!(
            ProbeTargets::of(&facts(&portless, &[], &ips[..1]), "caddy", &exposed),
            ProbeTargets(vec![(80, at(&ips[..1], 80))])
        );
    }

    #[test]
    fn ports_the_container_does_not_declare_are_not_waited_for() {
        let ips = ["172.18.0.2"];
        let proxy = [
            ("caddy", "a.test"),
            ("caddy.reverse_proxy", "{{upstreams 8080}}"),
        ];
        assert!(ProbeTargets::of(&facts(&proxy, &[80], &ips), "caddy", &[]).is_empty());
        let exposed = ["8080/udp".to_string()];
        assert!(ProbeTargets::of(&facts(&proxy, &[], &ips), "caddy", &exposed).is_empty());
        let portless = [
            ("caddy", "a.test"),
            ("caddy.reverse_proxy", "{{upstreams}}"),
        ];
        assert!(ProbeTargets::of(&facts(&portless, &[], &ips), "caddy", &[]).is_empty());
    }

    #[test]
    fn nothing_to_probe_without_upstreams_or_addresses() {
        let proxy = [
            ("caddy", "a.test"),
            ("caddy.reverse_proxy", "{{upstreams 80}}"),
        ];
        assert!(ProbeTargets::of(&facts(&proxy, &[80], &[]), "caddy", &[]).is_empty());
        let literal = [("caddy", "a.test"), ("caddy.respond", "ok")];
        let ips = ["172.18.0.2"];
        assert!(ProbeTargets::of(&facts(&literal, &[80], &ips), "caddy", &[]).is_empty());
    }

    /// A free loopback port: bound, then released.
    async fn free_port() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_port_that_starts_listening_is_ready_then() {
        let port = free_port().await;
        let targets = ProbeTargets(vec![(port, at(&["127.0.0.1"], port))]);
        let probe = tokio::spawn(wait_listening(targets, Duration::from_secs(30)));
        // Refused until something listens: the probe must still be waiting.
        tokio::task::yield_now().await;
        assert!(!probe.is_finished());
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        assert_eq!(probe.await.unwrap(), Readiness::Listening);
    }

    #[tokio::test]
    async fn a_port_that_never_listens_times_out_naming_it() {
        let port = free_port().await;
        let targets = ProbeTargets(vec![(port, at(&["127.0.0.1"], port))]);
        assert_eq!(
            wait_listening(targets, Duration::from_millis(200)).await,
            Readiness::TimedOut { port }
        );
    }
}
