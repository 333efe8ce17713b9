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
