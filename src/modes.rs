//! The four ways caddy-fleet runs, built from [`Settings`] (which turns
//! itself into the components' configurations):
//!
//! - `standalone`: one host, no NATS. The publisher hands events to the
//!   applier over an in-process channel.
//! - `server`: the Caddy host. Applier plus a publisher for local containers.
//! - `agent`: a remote Docker host. Publisher only.
//! - `applier`: the applier alone.

use std::future::Future;
use std::sync::Arc;

use caddy_fleet_applier::{ApplierConfig, NoCheckpoints, StatusBoard};
use caddy_fleet_publisher::PublisherConfig;
use caddy_fleet_schema::RouteState;
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

/// The status listener with the dashboard reading the log, served until
/// `stop`; the board the applier writes, and the server's task.
async fn serve_status_and_dashboard(
    settings: &Settings,
    stop: &Stop,
) -> Result<
    (
        Arc<StatusBoard>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    ModeError,
> {
    let listener = status_listener(settings).await?;
    let board = Arc::new(StatusBoard::default());
    let dashboard =
        crate::dashboard::with_log(settings.inspect_config()?, settings.policy_file.clone());
    let status = tokio::spawn(crate::serve_status_with(
        listener,
        board.clone(),
        dashboard,
        stop.wait(),
    ));
    Ok((board, status))
}

async fn status_listener(settings: &Settings) -> Result<tokio::net::TcpListener, ModeError> {
    let addr = settings.status_listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ModeError::StatusListen {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!(listen = %addr, "Status endpoints listening.");
    Ok(listener)
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
    for (variable, given) in [
        ("COALESCE_QUIET", settings.coalesce_quiet.is_some()),
        ("COALESCE_MAX_DELAY", settings.coalesce_max_delay.is_some()),
    ] {
        if given {
            tracing::warn!(%variable, "{variable} is deprecated and ignored: pushes start at once and batch themselves by push duration. Remove it; it will be refused in the next release.");
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let stop = Stop(stop_rx);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        }
    });
    match mode {
        Mode::Agent => {
            let agent = settings.agent();
            let nats = settings.publisher_nats_config(&agent)?;
            let config = settings.publisher_config(&agent)?;
            crate::run_publisher(&nats, config, stop.wait()).await?;
        }
        Mode::Applier => {
            let config = settings.applier_config(None)?;
            let nats = settings.nats_config(format!("caddy-fleet-applier-{}", config.name))?;
            let (board, status) = serve_status_and_dashboard(settings, &stop).await?;
            crate::run_applier(&nats, &settings.stream(), config, board, stop.wait()).await?;
            let _ = status.await;
        }
        Mode::Server => {
            let agent = settings.agent();
            let publisher = settings.publisher_config(&agent)?;
            let applier = settings.applier_config(Some(&agent))?;
            let applier_nats =
                settings.nats_config(format!("caddy-fleet-applier-{}", applier.name))?;
            let publisher_nats = settings.publisher_nats_config(&agent)?;
            let (board, status) = serve_status_and_dashboard(settings, &stop).await?;
            let stream = settings.stream();
            let applied = crate::run_applier(&applier_nats, &stream, applier, board, stop.wait());
            let published = crate::run_publisher(&publisher_nats, publisher, stop.wait());
            tokio::pin!(applied, published);
            // Either half failing for good stops the other and the process
            // (non-zero exit): a server with a dead half must not look alive.
            let (first, second) = tokio::select! {
                // The applier ended: on shutdown, or failed for good.
                result = &mut applied => {
                    if result.is_err() {
                        tracing::error!("The applier stopped; stopping the publisher.");
                        let _ = stop_tx.send(true);
                    }
                    (result, published.await)
                }
                // The publisher ended: on shutdown, or failed for good.
                result = &mut published => {
                    if result.is_err() {
                        tracing::error!("The publisher stopped; stopping the applier.");
                        let _ = stop_tx.send(true);
                    }
                    (result, applied.await)
                }
            };
            let _ = stop_tx.send(true);
            let _ = status.await;
            first?;
            second?;
        }
        Mode::Standalone => {
            let agent = settings.agent();
            let publisher = settings.publisher_config(&agent)?;
            let applier = settings.applier_config(Some(&agent))?;
            let listener = status_listener(settings).await?;
            let board = Arc::new(StatusBoard::default());
            // No log in standalone mode: the page has no timeline.
            let dashboard = caddy_fleet_applier::dashboard::Dashboard::default()
                .with_policy_file(settings.policy_file.clone());
            let status = tokio::spawn(crate::serve_status_with(
                listener,
                board.clone(),
                dashboard,
                stop.wait(),
            ));
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
    // The one host's own containers: its agent is the local one, trusted
    // unless the policy lists it.
    let mut applier = applier;
    if applier.translate.policy.local().is_none() {
        applier.translate.policy = applier
            .translate
            .policy
            .with_local(Some(publisher.agent.clone()));
    }
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
