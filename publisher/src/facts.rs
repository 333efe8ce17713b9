//! Docker's inspect output → [`ContainerFacts`].

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use caddy_fleet_schema::labels::is_caddy_label;
use caddy_fleet_schema::{ContainerFacts, ContainerState, Health, PortBinding};

use crate::config::PublisherConfig;

/// Whether a container with these labels is published at all.
pub fn is_watched(labels: &HashMap<String, String>, config: &PublisherConfig) -> bool {
    labels
        .keys()
        .any(|k| is_caddy_label(k, &config.label_prefix))
        && config
            .filter_label
            .as_ref()
            .is_none_or(|f| f.matches(labels.iter()))
}

/// Whether a `kill` event with `signal` (Docker's event attribute: a number)
/// asks the inspected container to stop: the container's own stop signal
/// (what `docker stop` sends first), or one of the signals that end a
/// process by convention (`INT`, `QUIT`, `KILL`, `TERM`). Other signals
/// (`HUP`, `USR1`…) are commonly reloads and change nothing.
pub fn is_stop_intent(inspect: &ContainerInspectResponse, signal: &str) -> bool {
    let Some(signal) = signal_number(signal) else {
        return false;
    };
    let configured = inspect
        .config
        .as_ref()
        .and_then(|c| c.stop_signal.as_deref())
        .and_then(signal_number)
        .unwrap_or(SIGTERM);
    signal == configured || [2, 3, 9, SIGTERM].contains(&signal)
}

const SIGTERM: u32 = 15;

/// A Linux signal's number from Docker's spellings: `15`, `TERM`,
/// `SIGTERM`, `sigterm`, `SIGRTMIN+3`.
fn signal_number(signal: &str) -> Option<u32> {
    let signal = signal.trim();
    if let Ok(number) = signal.parse() {
        return Some(number);
    }
    let upper = signal.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(offset) = name.strip_prefix("RTMIN+") {
        return offset.parse::<u32>().ok().map(|n| 34 + n);
    }
    let number = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => SIGTERM,
        "WINCH" => 28,
        "PWR" => 30,
        "RTMIN" => 34,
        _ => return None,
    };
    Some(number)
}

/// The facts of one inspected container, or `None` if it is not watched.
pub fn from_inspect(
    inspect: &ContainerInspectResponse,
    config: &PublisherConfig,
    observed_at_ms: u64,
) -> Option<ContainerFacts> {
    let id = inspect.id.clone()?;
    let empty = HashMap::new();
    let all_labels = inspect
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .unwrap_or(&empty);
    if !is_watched(all_labels, config) {
        return None;
    }
    let labels: BTreeMap<String, String> = all_labels
        .iter()
        .filter(|(k, _)| {
            is_caddy_label(k, &config.label_prefix)
                || config.filter_label.as_ref().is_some_and(|f| &f.key == *k)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let settings = inspect.network_settings.as_ref();
    let mut ports = Vec::new();
    for (spec, bindings) in settings
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
    {
        let Some((port, protocol)) = spec.split_once('/') else {
            continue;
        };
        let Ok(container_port) = port.parse::<u16>() else {
            continue;
        };
        for binding in bindings.iter().flatten() {
            let Some(host_port) = binding
                .host_port
                .as_deref()
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            ports.push(PortBinding {
                container_port,
                protocol: protocol.to_string(),
                host_ip: binding.host_ip.clone().unwrap_or_default(),
                host_port,
            });
        }
    }
    ports.sort();
    let networks = settings
        .and_then(|s| s.networks.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|(name, endpoint)| {
            let ip = endpoint.ip_address.as_deref().filter(|ip| !ip.is_empty())?;
            Some((name.clone(), ip.to_string()))
        })
        .collect();
    let docker_state = inspect.state.as_ref();
    let state = match docker_state.and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
        Some(ContainerStateStatusEnum::REMOVING) => ContainerState::Removing,
        Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        _ => ContainerState::Exited,
    };
    let health = match docker_state
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status)
    {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        _ => Health::None,
    };
    Some(ContainerFacts {
        agent: config.agent.clone(),
        id,
        name: inspect
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        host_address: config.host_address.clone(),
        labels,
        ports,
        networks,
        state,
        health,
        observed_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use bollard::models::ContainerConfig;

    use super::*;

    fn with_stop_signal(stop_signal: Option<&str>) -> ContainerInspectResponse {
        ContainerInspectResponse {
            config: Some(ContainerConfig {
                stop_signal: stop_signal.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn signals_that_end_a_process_are_stop_intents() {
        let default = with_stop_signal(None);
        for signal in ["15", "9", "2", "3"] {
            assert!(is_stop_intent(&default, signal), "{signal}");
        }
        for signal in ["1", "10", "12", "28", "", "x"] {
            assert!(!is_stop_intent(&default, signal), "{signal}");
        }
    }

    #[test]
    fn the_containers_own_stop_signal_is_a_stop_intent() {
        // systemd in a container stops on SIGRTMIN+3; nginx images use QUIT.
        let systemd = with_stop_signal(Some("SIGRTMIN+3"));
        assert!(is_stop_intent(&systemd, "37"));
        let hup = with_stop_signal(Some("hup"));
        assert!(is_stop_intent(&hup, "1"));
        assert!(!is_stop_intent(&with_stop_signal(Some("SIGTERM")), "1"));
    }
}
