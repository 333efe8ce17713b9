//! Giving an agent its ingest stream the first time it is heard.
//!
//! Agents cannot create streams (their credentials allow no JetStream API
//! calls), so the applier does it for them. A publisher's first message of
//! every run is a heartbeat; the applier listens to heartbeats with a plain
//! subscription (`fleet.*.hb`). A heartbeat from an agent whose ingest
//! stream the log does not source yet makes the applier create that stream
//! and add it to the log's sources, then answer the heartbeat's publish
//! with a JetStream error, so the publisher retries at once and is stored.
//! Heartbeats of known agents are ignored here (their ingest stream acks
//! them).
//!
//! Bounds: the subscription buffers few messages (a flood is dropped, not
//! queued), at most [`ProvisionLimits::max_agents`] agents are provisioned,
//! and whether an agent may have a stream at all is the caller's decision.

use std::collections::HashSet;
use std::future::Future;

use async_nats::jetstream;
use async_nats::Client;
use caddy_fleet_schema::subject::{SubjectKey, SubjectKind};
use caddy_fleet_schema::AgentId;
use futures::StreamExt;

use crate::stream::{ensure_agent_stream, StreamError, StreamSettings};

/// Bounds of provisioning.
#[derive(Debug, Clone, Copy)]
pub struct ProvisionLimits {
    /// Most agents given an ingest stream by this applier.
    pub max_agents: usize,
}

impl Default for ProvisionLimits {
    fn default() -> Self {
        ProvisionLimits { max_agents: 10_000 }
    }
}

/// Why provisioning could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot listen for agents' heartbeats: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// How often the log's sources are read again.
const SOURCES_REREAD: std::time::Duration = std::time::Duration::from_secs(30);

/// The JetStream-style error the applier answers a first heartbeat with:
/// async-nats reports it as a publish error, which the publisher retries.
const RETRY_REPLY: &[u8] =
    br#"{"type":"io.nats.jetstream.api.v1.pub_ack_response","error":{"code":503,"description":"ingest stream created; publish again"}}"#;

/// Provisions ingest streams for agents as they are heard, until `shutdown`.
/// `known` are the agents already provisioned (they are not checked again);
/// `allowed` decides whether an agent heard of may have a stream.
pub async fn run(
    client: Client,
    settings: StreamSettings,
    known: impl IntoIterator<Item = AgentId>,
    allowed: impl Fn(&AgentId) -> bool,
    limits: ProvisionLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProvisionError> {
    let js = jetstream::new(client.clone());
    let mut known: HashSet<AgentId> = known.into_iter().collect();
    let mut refused: HashSet<AgentId> = HashSet::new();
    let mut heartbeats = client
        .subscribe(format!(
            "{}.*.hb",
            caddy_fleet_schema::subject::SUBJECT_ROOT
        ))
        .await?;
    tokio::pin!(shutdown);
    // Two appliers adding agents at once can overwrite each other's source
    // list; re-reading it now and then makes a lost source come back at
    // that agent's next heartbeat.
    let mut reread = tokio::time::interval(SOURCES_REREAD);
    reread.reset();
    loop {
        tokio::select! {
            // Now and then: forget agents the log no longer sources.
            _ = reread.tick() => {
                if let Ok(mut log) = js.get_stream(&settings.name).await {
                    if let Ok(info) = log.info().await {
                        known = settings.sourced_agents(&info.config).into_iter().collect();
                    }
                }
            }
            // A heartbeat: provision its agent if it is new.
            message = heartbeats.next() => {
                let Some(message) = message else { break };
                let Ok(SubjectKey { agent, kind: SubjectKind::Heartbeat }) = SubjectKey::parse(&message.subject) else {
                    continue;
                };
                if known.contains(&agent) {
                    continue;
                }
                if !allowed(&agent) || known.len() >= limits.max_agents {
                    if refused.len() < limits.max_agents && refused.insert(agent.clone()) {
                        tracing::warn!(%agent, provisioned = known.len(), "Agent heard but not given an ingest stream (not allowed, or too many agents); its messages are not stored.");
                    }
                    continue;
                }
                match ensure_agent_stream(&js, &settings, &agent).await {
                    Ok(_) => {
                        tracing::info!(%agent, stream = %settings.ingest_name(&agent), "New agent: ingest stream created and sourced.");
                        known.insert(agent);
                        if let Some(reply) = message.reply {
                            let _ = client.publish(reply, RETRY_REPLY.into()).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%agent, %error, "Cannot create the agent's ingest stream; trying again at its next heartbeat.");
                    }
                }
            }
            // Shutdown: stop listening.
            () = &mut shutdown => break,
        }
    }
    Ok(())
}
