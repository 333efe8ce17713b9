//! caddy-fleet's wiring: turns settings into running components.
//!
//! The components live in their own crates (`caddy-fleet-schema`,
//! `-nats`, `-publisher`, `-applier`); this crate connects them to the
//! outside world (Docker, NATS, Caddy) for the binary and the integration
//! tests, which start publishers and appliers in-process through the same
//! functions.
//!
//! - [`settings`]: every setting, layered and validated.
//! - [`modes`]: standalone, server, agent and applier, built from settings.
//! - [`agent_admin`]: `agent add|revoke`, one command per host added or removed.
//! - [`dashboard`]: the dashboard's reads of the log, through the
//!   debugging commands (injected into the applier's page).
//!
//! The read-only debugging commands are their own crate,
//! `caddy-fleet-inspect` (re-exported as [`inspect`]); the binary runs
//! them with [`settings::Settings::inspect_config`].

use std::future::Future;
use std::sync::Arc;

use caddy_fleet_applier::{ApplierConfig, ObjectStoreCheckpoints, StatusBoard};
use caddy_fleet_nats::async_nats::jetstream;
use caddy_fleet_nats::{
    ConsumerSettings, DurableSource, EventPublisher, NatsConfig, StreamSettings,
};
use caddy_fleet_publisher::bollard::errors::Error as DockerError;
use caddy_fleet_publisher::outbox::{run_sender, Outbox, OutboxSink};
use caddy_fleet_publisher::PublisherConfig;

pub mod agent_admin;
pub mod dashboard;
pub mod modes;
pub mod settings;

pub use caddy_fleet_applier as applier;
pub use caddy_fleet_inspect as inspect;
pub use caddy_fleet_nats as nats;
pub use caddy_fleet_publisher as publisher;
pub use caddy_fleet_schema as schema;

/// Why a component could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot connect to Docker: {0} (is the Docker socket mounted and readable?)")]
    Docker(#[from] DockerError),
    #[error(transparent)]
    NatsConnect(#[from] caddy_fleet_nats::ConnectError),
    #[error(transparent)]
    Stream(#[from] caddy_fleet_nats::StreamError),
    #[error(transparent)]
    Provision(#[from] caddy_fleet_nats::provision::ProvisionError),
    #[error(transparent)]
    Consume(#[from] caddy_fleet_nats::ConsumeError),
    #[error(transparent)]
    Applier(#[from] caddy_fleet_applier::ApplierError),
    #[error(transparent)]
    Watch(#[from] caddy_fleet_publisher::WatchError),
}

/// Connects to the local Docker engine, negotiating the API version (the
/// engine may be older than the client's default).
pub async fn connect_docker() -> Result<caddy_fleet_publisher::bollard::Docker, FleetError> {
    let docker = caddy_fleet_publisher::bollard::Docker::connect_with_local_defaults()?;
    Ok(docker.negotiate_version().await?)
}

/// How long a stopping publisher keeps sending what its outbox holds.
const PUBLISHER_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs a publisher that sends to NATS until `shutdown` completes.
///
/// NATS being unreachable never stops the watch: facts wait in the outbox
/// (latest per container) and go out when NATS is back. Credentials NATS
/// refuses at start are an error, since waiting would not help.
pub async fn run_publisher(
    nats: &NatsConfig,
    config: PublisherConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FleetError> {
    let docker = connect_docker().await?;
    let client = match caddy_fleet_nats::connect(nats).await {
        Ok(client) => client,
        Err(error) if error.is_auth_failure() => return Err(error.into()),
        Err(error) => {
            tracing::warn!(%error, "NATS unreachable at start; watching Docker anyway and sending when it is back.");
            let retrying = NatsConfig {
                retry_initial_connect: true,
                ..nats.clone()
            };
            caddy_fleet_nats::connect(&retrying).await?
        }
    };
    let js = jetstream::new(client);
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    tracing::info!(agent = %config.agent, host_address = %config.host_address, "Publisher starting.");
    let outbox = Arc::new(Outbox::default());
    let (stop_sender, sender_stopped) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(run_sender(
        outbox.clone(),
        EventPublisher::new(js.clone(), config.agent.clone(), nonce.clone()),
        PUBLISHER_DRAIN,
        async move {
            let mut stopped = sender_stopped;
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    let sink = OutboxSink::new(outbox, EventPublisher::new(js, config.agent.clone(), nonce));
    let watched = caddy_fleet_publisher::run(docker, config, sink, shutdown).await;
    let _ = stop_sender.send(true);
    let _ = sender.await;
    watched?;
    tracing::info!("Publisher stopped.");
    Ok(())
}

/// Runs an applier fed by the stream's durable consumer (named after the
/// applier) until `shutdown` completes.
///
/// Recovery: everything the consumer already delivered (to this applier's
/// earlier run) is folded from the newest checkpoint plus an ordered
/// replay, so redeliveries of it are recognised and nothing is folded out
/// of order; the durable consumer carries on from there.
pub async fn run_applier(
    nats: &NatsConfig,
    stream: &StreamSettings,
    config: ApplierConfig,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FleetError> {
    let client = caddy_fleet_nats::connect(nats).await?;
    let js = jetstream::new(client);
    let stream_settings = stream;
    let stream = caddy_fleet_nats::ensure_stream(&js, stream_settings).await?;
    let sourced = stream_settings.sourced_agents(&stream.cached_info().config);
    // Heartbeats of new agents come in on a connection of their own that
    // buffers little, so a flood is dropped rather than queued.
    // Only the log's owner provisions agents (it alone updates the log).
    let provisioning_client = if stream_settings.owner {
        Some(
            caddy_fleet_nats::connect(&NatsConfig {
                subscription_capacity: Some(64),
                ..nats.clone()
            })
            .await?,
        )
    } else {
        None
    };
    // The owner's duties beside the applier: provisioning new agents, and
    // restarting the log's sourcing of an ingest stream that stalled. They
    // end with the applier (the select! below drops them).
    let owner_board = board.clone();
    let owner_duties = async {
        let Some(client) = provisioning_client else {
            return std::future::pending().await;
        };
        let watching = caddy_fleet_nats::sources::watch(
            js.clone(),
            stream_settings.clone(),
            caddy_fleet_nats::sources::SourceWatch::default(),
            |restart| {
                owner_board.stats.log_source_restarted(
                    &restart.source,
                    restart.stall.as_str(),
                    restart.stalled_for,
                    restart.lag,
                )
            },
            |error| owner_board.stats.log_source_watch_failed(error),
            std::future::pending(),
        );
        let provisioning = caddy_fleet_nats::provision::run(
            client,
            stream_settings.clone(),
            sourced,
            |_| true,
            caddy_fleet_nats::provision::ProvisionLimits::default(),
            std::future::pending(),
        );
        tokio::pin!(watching, provisioning);
        tokio::select! {
            // Provisioning ends only if its subscription does; the watch goes on.
            result = &mut provisioning => {
                if let Err(error) = result {
                    tracing::error!(%error, "New agents can no longer be given ingest streams.");
                }
                watching.await;
            }
            // The watch ends only at its shutdown, which never comes.
            () = &mut watching => {}
        }
    };
    let checkpoints = ObjectStoreCheckpoints::open(&js, &config.name, stream_settings.replicas)
        .await
        .map_err(caddy_fleet_applier::ApplierError::from)?
        .retained_by(stream.clone());
    let mut settings = ConsumerSettings::new(&config.name);
    settings.max_ack_pending = settings
        .max_ack_pending
        .max(2 * config.checkpoint_every as i64);
    let source = DurableSource::attach(&stream, &settings).await?;
    let position = source.position().await?;
    let state = caddy_fleet_applier::recover(
        &stream,
        &checkpoints,
        Some(position.delivered),
        &board.stats,
    )
    .await?;
    tracing::info!(applier = %config.name, caddy = %config.caddy_admin_url, resume_after = position.delivered, "Applier attached.");
    let applier = caddy_fleet_applier::run(source, checkpoints, state, config, board, shutdown);
    tokio::pin!(applier, owner_duties);
    tokio::select! {
        // The applier stops on shutdown; the owner's duties stop with it.
        result = &mut applier => result?,
        // The owner's duties never end; should they, the applier goes on.
        () = &mut owner_duties => applier.await?,
    }
    tracing::info!("Applier stopped.");
    Ok(())
}

/// Serves the applier's status endpoints on `listener` until `shutdown`.
pub async fn serve_status(
    listener: tokio::net::TcpListener,
    board: Arc<StatusBoard>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    caddy_fleet_applier::status::serve(listener, board, shutdown).await
}

/// Serves the applier's status endpoints and `dashboard` (see
/// [`dashboard::with_log`]) on `listener` until `shutdown`.
pub async fn serve_status_with(
    listener: tokio::net::TcpListener,
    board: Arc<StatusBoard>,
    dashboard: caddy_fleet_applier::dashboard::Dashboard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    caddy_fleet_applier::status::serve_with(listener, board, dashboard, shutdown).await
}

/// Why `caddy-fleet labels` could not print a Caddyfile.
#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error(transparent)]
    Translate(#[from] caddy_fleet_schema::labels::LabelError),
    #[error(transparent)]
    Docker(#[from] FleetError),
    #[error("cannot inspect container {container}: {source}")]
    Inspect {
        container: String,
        source: caddy_fleet_publisher::bollard::errors::Error,
    },
    #[error("container {container} has no labels under the prefix {prefix:?}")]
    NotLabeled { container: String, prefix: String },
    #[error("no labels under the prefix {prefix:?} (DOCKER_LABEL_PREFIX): write e.g. {prefix} = example.com")]
    NoLabels { prefix: String },
    #[error("refused by policy for agent {agent}: {reason}")]
    Refused { agent: String, reason: String },
}

/// The Caddyfile for labels given in caddy-docker-proxy's golden-file
/// format (`KEY = VALUE` lines), with `{{upstreams}}` standing for
/// `targets`, as `caddy-fleet labels` prints it. Labels of which none is
/// under `prefix` are an error (most likely the wrong prefix), not an
/// empty Caddyfile.
pub fn labels_caddyfile(
    text: &str,
    prefix: &str,
    targets: Vec<String>,
) -> Result<String, LabelsError> {
    labels_caddyfile_for(text, prefix, targets, None)
}

/// [`labels_caddyfile`] as the applier would accept it from `agent` under
/// `policy`: `targets` stand for what `{{upstreams}}` resolves to from that
/// agent's own facts (so they are its own upstreams, at any port).
pub fn labels_caddyfile_for(
    text: &str,
    prefix: &str,
    targets: Vec<String>,
    agent: Option<(
        &caddy_fleet_schema::AgentId,
        &caddy_fleet_schema::policy::Policy,
    )>,
) -> Result<String, LabelsError> {
    let labels = caddy_fleet_schema::labels::parse_golden_labels(text);
    let under_prefix = |key: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '_']))
    };
    if !labels.keys().any(|key| under_prefix(key)) {
        return Err(LabelsError::NoLabels {
            prefix: prefix.to_string(),
        });
    }
    let own: Vec<std::net::IpAddr> = targets
        .iter()
        .filter_map(|t| {
            let host = t.rsplit_once("://").map_or(t.as_str(), |(_, h)| h);
            host.parse().ok().or_else(|| {
                host.rsplit_once(':')
                    .and_then(|(h, _)| h.trim_matches(['[', ']']).parse().ok())
            })
        })
        .collect();
    let upstreams = caddy_fleet_schema::template::FixedTargets(targets);
    let file = caddy_fleet_schema::labels::from_labels(&labels, prefix, &upstreams)?;
    if let Some((agent, policy)) = agent {
        let refused = |reason: String| LabelsError::Refused {
            agent: agent.to_string(),
            reason,
        };
        let grant = policy.grant(agent).map_err(refused)?;
        if !grant.trusted {
            let own = caddy_fleet_schema::restrict::OwnUpstreams {
                any_port: own,
                ..Default::default()
            };
            caddy_fleet_schema::restrict::check(&file, grant, &own).map_err(refused)?;
        }
    }
    Ok(file.marshal())
}

/// The Caddyfile for a live local container's labels. Upstreams are the
/// container's published ports on `host_address`, unless `targets` are given.
pub async fn container_caddyfile(
    container: &str,
    prefix: &str,
    host_address: &str,
    targets: Option<Vec<String>>,
) -> Result<String, LabelsError> {
    use caddy_fleet_schema::translate::{translate_container, TranslateOptions};
    let docker = connect_docker().await?;
    let inspect = docker
        .inspect_container(container, None)
        .await
        .map_err(|source| LabelsError::Inspect {
            container: container.to_string(),
            source,
        })?;
    let mut config =
        PublisherConfig::new(caddy_fleet_schema::AgentId::sanitize("local"), host_address);
    config.label_prefix = prefix.to_string();
    let facts =
        caddy_fleet_publisher::facts::from_inspect(&inspect, &config, 0).ok_or_else(|| {
            LabelsError::NotLabeled {
                container: container.to_string(),
                prefix: prefix.to_string(),
            }
        })?;
    let file = match targets {
        Some(targets) => caddy_fleet_schema::labels::from_labels(
            &facts.labels,
            prefix,
            &caddy_fleet_schema::template::FixedTargets(targets),
        )?,
        None => translate_container(
            &facts,
            &TranslateOptions {
                label_prefix: prefix.to_string(),
                ..TranslateOptions::trusting()
            },
        )?,
    };
    Ok(file.marshal())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_under_another_prefix_are_an_error_not_an_empty_caddyfile() {
        let labels = "fleet = a.test\nfleet.reverse_proxy = {{upstreams 80}}\n";
        assert_eq!(
            labels_caddyfile(labels, "fleet", vec!["x".into()]).unwrap(),
            "a.test {\n\treverse_proxy x:80\n}\n"
        );
        let err = labels_caddyfile(labels, "caddy", vec!["x".into()]).unwrap_err();
        assert!(matches!(err, LabelsError::NoLabels { .. }), "{err}");
        assert!(labels_caddyfile("caddy_0 = b.test\n", "caddy", vec![]).is_ok());
    }
}
