//! The `CADDY_FLEET` stream: one durable, ordered log shared by every host.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use caddy_fleet_schema::subject::SUBJECT_ROOT;

/// Settings of the stream the applier creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Stream name.
    pub name: String,
    /// How long history is kept.
    pub max_age: Duration,
    /// How long a `Nats-Msg-Id` is remembered for deduplication.
    pub duplicate_window: Duration,
    /// Replicas (3 on a 3-node cluster).
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            name: "CADDY_FLEET".to_string(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }
    }
}

impl StreamSettings {
    /// The JetStream configuration these settings stand for.
    pub fn to_config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{SUBJECT_ROOT}.>")],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: self.max_age,
            // JetStream refuses a duplicate window longer than the history.
            duplicate_window: self.duplicate_window.min(self.max_age),
            num_replicas: self.replicas,
            // Any agent could otherwise wipe other agents' history.
            allow_rollup: false,
            deny_delete: true,
            deny_purge: true,
            allow_direct: true,
            ..Default::default()
        }
    }
}

/// Why the stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot create or update stream {name}: {source}")]
    CreateOrUpdate {
        name: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot open stream {name}: {source}")]
    Get {
        name: String,
        source: jetstream::context::GetStreamError,
    },
}

/// Creates the stream, or brings an existing one to `settings`. Safe to
/// call from every applier at every start.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, StreamError> {
    js.create_or_update_stream(settings.to_config())
        .await
        .map_err(|source| StreamError::CreateOrUpdate {
            name: settings.name.clone(),
            source,
        })?;
    js.get_stream(&settings.name)
        .await
        .map_err(|source| StreamError::Get {
            name: settings.name.clone(),
            source,
        })
}
