//! Checkpoints of the fold: the state and the stream sequence it holds,
//! kept in NATS (a JetStream object store) so the applier's host keeps
//! nothing on disk. A restart loads the newest checkpoint and folds only
//! what came after it.

use std::future::Future;

use caddy_fleet_nats::async_nats::jetstream::{self, object_store};
use caddy_fleet_schema::RouteState;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// The checkpoint format this build writes.
const FORMAT: u32 = 1;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open checkpoint bucket {bucket}: {reason}")]
    Open { bucket: String, reason: String },
    #[error("cannot read checkpoint {name}: {reason}")]
    Read { name: String, reason: String },
    #[error("cannot write checkpoint {name}: {reason}")]
    Write { name: String, reason: String },
}

/// Where checkpoints live.
pub trait CheckpointStore: Send {
    /// The newest checkpoint, if there is a readable one.
    fn load(&self) -> impl Future<Output = Result<Option<RouteState>, CheckpointError>> + Send;
    /// Replaces the checkpoint with `state`.
    fn save(&self, state: &RouteState) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}

#[derive(Serialize)]
struct CheckpointOut<'a> {
    format: u32,
    state: &'a RouteState,
}

#[derive(Deserialize)]
struct CheckpointIn {
    format: u32,
    state: serde_json::Value,
}

/// Encodes a checkpoint.
pub fn encode(state: &RouteState) -> Vec<u8> {
    // Serialising plain structs with string keys into a Vec cannot fail.
    serde_json::to_vec(&CheckpointOut {
        format: FORMAT,
        state,
    })
    .unwrap_or_default()
}

/// Decodes a checkpoint; `None` for one this build cannot use (written by
/// a newer version, or damaged), which means rebuilding from the stream.
pub fn decode(bytes: &[u8]) -> Option<RouteState> {
    let checkpoint: CheckpointIn = serde_json::from_slice(bytes).ok()?;
    if checkpoint.format != FORMAT {
        tracing::warn!(
            format = checkpoint.format,
            "Checkpoint in an unknown format ignored; rebuilding from the stream."
        );
        return None;
    }
    serde_json::from_value(checkpoint.state).ok()
}

/// Checkpoints in a JetStream object store, one object per applier.
pub struct ObjectStoreCheckpoints {
    store: object_store::ObjectStore,
    name: String,
}

impl ObjectStoreCheckpoints {
    /// The bucket every applier shares.
    pub const BUCKET: &'static str = "CADDY_FLEET_CHECKPOINTS";

    /// Opens (creating if needed) the bucket, for the applier `applier`.
    pub async fn open(js: &jetstream::Context, applier: &str) -> Result<Self, CheckpointError> {
        let store = match js.get_object_store(Self::BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: Self::BUCKET.to_string(),
                    description: Some("caddy-fleet applier checkpoints".to_string()),
                    ..Default::default()
                })
                .await
                .map_err(|e| CheckpointError::Open {
                    bucket: Self::BUCKET.to_string(),
                    reason: e.to_string(),
                })?,
        };
        Ok(ObjectStoreCheckpoints {
            store,
            name: format!("applier-{applier}"),
        })
    }
}

impl CheckpointStore for ObjectStoreCheckpoints {
    async fn load(&self) -> Result<Option<RouteState>, CheckpointError> {
        let read_error = |reason: String| CheckpointError::Read {
            name: self.name.clone(),
            reason,
        };
        let mut object = match self.store.get(&self.name).await {
            Ok(object) => object,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_error(e.to_string())),
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        Ok(decode(&bytes))
    }

    async fn save(&self, state: &RouteState) -> Result<(), CheckpointError> {
        let bytes = encode(state);
        self.store
            .put(self.name.as_str(), &mut bytes.as_slice())
            .await
            .map_err(|e| CheckpointError::Write {
                name: self.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(())
    }
}

/// No checkpoints (standalone mode: the state lives only in memory).
pub struct NoCheckpoints;

impl CheckpointStore for NoCheckpoints {
    async fn load(&self) -> Result<Option<RouteState>, CheckpointError> {
        Ok(None)
    }
    async fn save(&self, _: &RouteState) -> Result<(), CheckpointError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_unknown_formats_are_ignored() {
        let mut state = RouteState::default();
        state.skip(42);
        assert_eq!(decode(&encode(&state)), Some(state));
        assert_eq!(decode(br#"{"format":99,"state":{}}"#), None);
        assert_eq!(decode(b"garbage"), None);
    }
}
