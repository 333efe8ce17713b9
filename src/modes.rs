//! The four ways caddy-fleet runs, built from [`Settings`]:
//!
//! - `standalone`: one host, no NATS. The publisher hands events to the
//!   applier over an in-process channel.
//! - `server`: the Caddy host. Applier plus a publisher for local containers.
//! - `agent`: a remote Docker host. Publisher only.
//! - `applier`: the applier alone.

use std::future::Future;
use std::sync::Arc;

use caddy_fleet_applier::{ApplierConfig, NoCheckpoints, StatusBoard};
use caddy_fleet_nats::NatsConfig;
use caddy_fleet_publisher::PublisherConfig;
use caddy_fleet_schema::translate::LocalNetwork;
use caddy_fleet_schema::{AgentId, RouteState};
use tokio::sync::watch;

use crate::settings::{Mode, Settings, SettingsError, RETIRED};
use crate::FleetError;

/// Why a mode could not run.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("cannot listen on STATUS_LISTEN {addr}: {source}")]
    StatusListen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
}

/// Fans one shutdown signal out to every component.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

fn publisher_config(
    settings: &Settings,
    agent: &AgentId,
) -> Result<PublisherConfig, SettingsError> {
    let host = match &settings.host_ip {
        Some(ip) if caddy_fleet_publisher::host::is_valid_address(ip) => ip.clone(),
        Some(ip) => {
            return Err(SettingsError {
                setting: "HOST_IP".into(),
                message: format!("{ip:?} is neither an IP address nor a DNS name: give the address other hosts reach this one at"),
            })
        }
        None => {
            let detected = caddy_fleet_publisher::host::detect().ok_or_else(|| SettingsError {
                setting: "HOST_IP".into(),
                message: "cannot detect it (no default route): set HOST_IP to the address other hosts reach this one at".into(),
            })?;
            tracing::info!(host_ip = %detected, "HOST_IP not set; using the default route's interface address.");
            detected.to_string()
        }
    };
    let mut config = PublisherConfig::new(agent.clone(), host);
    config.label_prefix = settings.docker_label_prefix.clone();
    config.filter_label = settings.filter_label()?;
    config.sync_interval = settings.duration("SYNC_INTERVAL", &settings.sync_interval)?;
    config.heartbeat_interval =
        settings.duration("HEARTBEAT_INTERVAL", &settings.heartbeat_interval)?;
    Ok(config)
}

fn applier_config(
    settings: &Settings,
    local: Option<&AgentId>,
) -> Result<ApplierConfig, SettingsError> {
    let mut config = ApplierConfig::new(settings.applier()?, settings.caddy_api()?);
    if let Some(path) = &settings.caddy_base_caddyfile {
        config.base_caddyfile = Some(std::fs::read_to_string(path).map_err(|e| SettingsError {
            setting: "CADDY_BASE_CADDYFILE".into(),
            message: format!(
                "cannot read {}: {e}; mount the Caddyfile Caddy runs with",
                path.display()
            ),
        })?);
    }
    config.translate.label_prefix = settings.docker_label_prefix.clone();
    if let (Some(agent), Some(network)) = (local, &settings.caddy_ingress_network) {
        config.translate.local = Some(LocalNetwork {
            agent: agent.clone(),
            network: network.clone(),
        });
    }
    config.agent_ttl = settings
        .agent_ttl
        .as_deref()
        .map(|t| settings.duration("AGENT_TTL", t))
        .transpose()?;
    config.quiet_window = settings.duration("COALESCE_QUIET", &settings.coalesce_quiet)?;
    config.max_delay = settings.duration("COALESCE_MAX_DELAY", &settings.coalesce_max_delay)?;
    Ok(config)
}

async fn status_listener(settings: &Settings) -> Result<tokio::net::TcpListener, ModeError> {
    let addr = settings.status_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ModeError::StatusListen {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!(listen = %addr, "Status endpoints listening.");
    Ok(listener)
}

fn publisher_nats(settings: &Settings, agent: &AgentId) -> Result<NatsConfig, SettingsError> {
    let mut nats = settings.nats(format!("caddy-fleet-publisher-{agent}"))?;
    // Replies come on the agent's own inbox, so a NATS user can be limited to it.
    nats.inbox_prefix = Some(format!("_INBOX_{agent}"));
    Ok(nats)
}

/// Runs `mode` until `shutdown` completes.
pub async fn run(
    mode: Mode,
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ModeError> {
    for (variable, instead) in RETIRED {
        if std::env::var_os(variable).is_some() {
            tracing::warn!(%variable, "{variable} is set but no longer used: {instead} (README: \"Coming from the Python agent\").");
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = Stop(stop_rx);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    match mode {
        Mode::Agent => {
            let agent = settings.agent()?;
            let nats = publisher_nats(settings, &agent)?;
            let config = publisher_config(settings, &agent)?;
            crate::run_publisher(&nats, config, stop.wait()).await?;
        }
        Mode::Applier => {
            let config = applier_config(settings, None)?;
            let nats = settings.nats(format!("caddy-fleet-applier-{}", config.name))?;
            let listener = status_listener(settings).await?;
            let board = Arc::new(StatusBoard::default());
            let status = tokio::spawn(crate::serve_status(listener, board.clone(), stop.wait()));
            crate::run_applier(&nats, &settings.stream()?, config, board, stop.wait()).await?;
            let _ = status.await;
        }
        Mode::Server => {
            let agent = settings.agent()?;
            let publisher = publisher_config(settings, &agent)?;
            let applier = applier_config(settings, Some(&agent))?;
            let applier_nats = settings.nats(format!("caddy-fleet-applier-{}", applier.name))?;
            let publisher_nats = publisher_nats(settings, &agent)?;
            let listener = status_listener(settings).await?;
            let board = Arc::new(StatusBoard::default());
            let status = tokio::spawn(crate::serve_status(listener, board.clone(), stop.wait()));
            let stream = settings.stream()?;
            let (applied, published) = tokio::join!(
                crate::run_applier(&applier_nats, &stream, applier, board, stop.wait()),
                crate::run_publisher(&publisher_nats, publisher, stop.wait()),
            );
            let _ = status.await;
            applied?;
            published?;
        }
        Mode::Standalone => {
            let agent = settings.agent()?;
            let publisher = publisher_config(settings, &agent)?;
            let applier = applier_config(settings, Some(&agent))?;
            let listener = status_listener(settings).await?;
            let board = Arc::new(StatusBoard::default());
            let status = tokio::spawn(crate::serve_status(listener, board.clone(), stop.wait()));
            run_standalone(publisher, applier, board, stop.wait()).await?;
            let _ = status.await;
        }
    }
    Ok(())
}

/// Standalone: the same publisher and applier, joined by a channel; no NATS.
pub async fn run_standalone(
    publisher: PublisherConfig,
    applier: ApplierConfig,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FleetError> {
    let docker = crate::connect_docker().await?;
    let (events, received) = tokio::sync::mpsc::channel(1024);
    tracing::info!(agent = %publisher.agent, caddy = %applier.caddy_admin_url, "Standalone: watching Docker, driving Caddy, no NATS.");
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = Stop(stop_rx);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let source = caddy_fleet_applier::source::ChannelSource::new(received);
    let (watched, applied) = tokio::join!(
        caddy_fleet_publisher::run(docker, publisher, events, stop.wait()),
        caddy_fleet_applier::run(
            source,
            NoCheckpoints,
            RouteState::default(),
            applier,
            board,
            stop.wait()
        ),
    );
    watched?;
    applied?;
    Ok(())
}
