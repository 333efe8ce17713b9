//! Checkpoints of the fold: the state and the stream sequence it holds,
//! kept in NATS (a JetStream object store) so the applier's host keeps
//! nothing on disk. A restart loads the newest checkpoint and folds only
//! what came after it.
//!
//! Beside its newest checkpoint (object [`checkpoint_name`]), each applier
//! keeps *snapshots* of the fold (objects [`snapshot_name`]): a copy of a
//! checkpoint every [`SNAPSHOT_EVERY_MESSAGES`] stream sequences or
//! [`SNAPSHOT_EVERY`], whichever comes first, for as long as the log keeps
//! the messages after it. So the state at any retained point is a snapshot
//! plus a bounded tail of the log ([`ObjectStoreCheckpoints::nearest_at_or_before`]),
//! which is how the debugging commands answer `--at` quickly. Snapshots are
//! written and pruned by [`CheckpointStore::save`] itself; the applier's
//! loop knows nothing of them.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use caddy_fleet_nats::async_nats::jetstream::{self, object_store, stream::Stream};
use caddy_fleet_schema::RouteState;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// The checkpoint format this build writes.
const FORMAT: u32 = 1;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open checkpoint bucket {bucket}: {reason}")]
    Open { bucket: String, reason: String },
    #[error("no checkpoint bucket {bucket} (has an applier written a checkpoint yet?): {reason}")]
    NoBucket { bucket: String, reason: String },
    #[error("cannot list checkpoint bucket {bucket}: {reason}")]
    List { bucket: String, reason: String },
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

/// The bucket every applier shares, unless told otherwise.
pub const BUCKET: &str = "CADDY_FLEET_CHECKPOINTS";

/// A snapshot is kept at least every this many stream sequences (so a
/// point is at most this many messages from one: about half a second of
/// folding on a small machine)…
pub const SNAPSHOT_EVERY_MESSAGES: u64 = 25_000;
/// …and at least this often while messages come in.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(3600);

/// The object holding applier `applier`'s newest checkpoint.
pub fn checkpoint_name(applier: &str) -> String {
    format!("applier-{applier}")
}

/// The object holding applier `applier`'s snapshot of the fold up to `seq`
/// (zero-padded, so names sort by sequence).
pub fn snapshot_name(applier: &str, seq: u64) -> String {
    format!("snapshot-{applier}-{seq:020}")
}

/// The sequence of `name` if it is one of `applier`'s snapshots.
pub fn snapshot_seq(applier: &str, name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix("snapshot-")?
        .strip_prefix(applier)?
        .strip_prefix('-')?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// A snapshot kept: the sequence it holds and when it was written (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMark {
    pub seq: u64,
    pub at_ms: i64,
}

/// When a checkpoint is also kept as a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSchedule {
    /// A snapshot when the sequence crosses a multiple of this…
    pub every_messages: u64,
    /// …or when the last one is this old.
    pub every: Duration,
}

impl Default for SnapshotSchedule {
    fn default() -> Self {
        SnapshotSchedule {
            every_messages: SNAPSHOT_EVERY_MESSAGES,
            every: SNAPSHOT_EVERY,
        }
    }
}

impl SnapshotSchedule {
    /// Whether a checkpoint at `seq`, written at `now_ms`, is kept as a
    /// snapshot, given the `last` one kept.
    pub fn due(&self, last: Option<SnapshotMark>, seq: u64, now_ms: i64) -> bool {
        let every = self.every_messages.max(1);
        match last {
            None => seq > 0,
            Some(last) => {
                seq > last.seq
                    && (seq / every > last.seq / every
                        || now_ms.saturating_sub(last.at_ms) >= self.every.as_millis() as i64)
            }
        }
    }
}

/// The newest of `seqs` at or before `target`: the snapshot to fold from.
pub fn nearest_at_or_before(seqs: impl IntoIterator<Item = u64>, target: u64) -> Option<u64> {
    seqs.into_iter().filter(|&seq| seq <= target).max()
}

/// The snapshots no longer needed once the log starts at `first_seq`:
/// every one before the newest at or before `first_seq`, which the fold of
/// the retained log starts from.
pub fn prunable(seqs: &[u64], first_seq: u64) -> Vec<u64> {
    let keep = nearest_at_or_before(seqs.iter().copied(), first_seq);
    seqs.iter()
        .copied()
        .filter(|&seq| seq < first_seq && Some(seq) != keep)
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the store knows of its newest snapshot.
#[derive(Debug, Clone, Copy)]
enum Ledger {
    /// Not looked up yet (read from the bucket at the first save).
    Unknown,
    Known(Option<SnapshotMark>),
}

/// Checkpoints in a JetStream object store, one object per applier, and
/// its snapshots beside it.
pub struct ObjectStoreCheckpoints {
    store: object_store::ObjectStore,
    bucket: String,
    applier: String,
    name: String,
    schedule: SnapshotSchedule,
    /// The log, to prune snapshots it no longer needs.
    log: Option<Stream>,
    ledger: Mutex<Ledger>,
}

/// Gives an existing bucket's stream at least `replicas` replicas; a
/// failure only means fewer copies, so it is logged, not fatal.
async fn raise_replicas(js: &jetstream::Context, bucket: &str, replicas: usize) {
    let name = format!("OBJ_{bucket}");
    let Ok(mut stream) = js.get_stream(&name).await else {
        return;
    };
    let Ok(info) = stream.info().await else {
        return;
    };
    if info.config.num_replicas >= replicas {
        return;
    }
    let mut config = info.config.clone();
    config.num_replicas = replicas;
    if let Err(error) = js.update_stream(config).await {
        tracing::warn!(%bucket, replicas, %error, "Cannot give the checkpoint bucket the log's replicas; it keeps fewer copies.");
    }
}

impl ObjectStoreCheckpoints {
    /// The bucket every applier shares.
    pub const BUCKET: &'static str = BUCKET;

    /// Opens (creating if needed) the bucket, for the applier `applier`,
    /// with `replicas` replicas (the log's): an existing bucket with fewer
    /// is given more.
    pub async fn open(
        js: &jetstream::Context,
        applier: &str,
        replicas: usize,
    ) -> Result<Self, CheckpointError> {
        let store = match js.get_object_store(Self::BUCKET).await {
            Ok(store) => {
                raise_replicas(js, Self::BUCKET, replicas).await;
                store
            }
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: Self::BUCKET.to_string(),
                    description: Some("caddy-fleet applier checkpoints".to_string()),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| CheckpointError::Open {
                    bucket: Self::BUCKET.to_string(),
                    reason: e.to_string(),
                })?,
        };
        Ok(Self::new(store, Self::BUCKET, applier))
    }

    /// Opens `bucket` for reading `applier`'s checkpoint and snapshots,
    /// creating nothing ([`CheckpointError::NoBucket`] when it is missing).
    pub async fn open_existing(
        js: &jetstream::Context,
        bucket: &str,
        applier: &str,
    ) -> Result<Self, CheckpointError> {
        match js.get_object_store(bucket).await {
            Ok(store) => Ok(Self::new(store, bucket, applier)),
            Err(e) if e.kind() == jetstream::context::ObjectStoreErrorKind::GetStore => {
                Err(CheckpointError::NoBucket {
                    bucket: bucket.to_string(),
                    reason: e.to_string(),
                })
            }
            Err(e) => Err(CheckpointError::Open {
                bucket: bucket.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    fn new(store: object_store::ObjectStore, bucket: &str, applier: &str) -> Self {
        ObjectStoreCheckpoints {
            store,
            bucket: bucket.to_string(),
            applier: applier.to_string(),
            name: checkpoint_name(applier),
            schedule: SnapshotSchedule::default(),
            log: None,
            ledger: Mutex::new(Ledger::Unknown),
        }
    }

    /// Prunes snapshots by `log`'s retention: those before its first
    /// message go, but the newest of them (see [`prunable`]).
    pub fn retained_by(mut self, log: Stream) -> Self {
        self.log = Some(log);
        self
    }

    /// Keeps snapshots on `schedule` instead of the default one.
    pub fn with_schedule(mut self, schedule: SnapshotSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// This applier's snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotMark>, CheckpointError> {
        let list_error = |reason: String| CheckpointError::List {
            bucket: self.bucket.clone(),
            reason,
        };
        let mut list = self
            .store
            .list()
            .await
            .map_err(|e| list_error(e.to_string()))?;
        let mut marks = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| list_error(e.to_string()))?;
            if let Some(seq) = snapshot_seq(&self.applier, &info.name) {
                let at_ms = info
                    .modified
                    .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
                marks.push(SnapshotMark { seq, at_ms });
            }
        }
        marks.sort_by_key(|m| m.seq);
        Ok(marks)
    }

    /// The newest snapshot at or before `seq`, if there is a readable one.
    pub async fn nearest_at_or_before(
        &self,
        seq: u64,
    ) -> Result<Option<RouteState>, CheckpointError> {
        let marks = self.snapshots().await?;
        match nearest_at_or_before(marks.iter().map(|m| m.seq), seq) {
            Some(found) => self.snapshot(found).await,
            None => Ok(None),
        }
    }

    /// The snapshot holding the log up to `seq`, if there is a readable one.
    pub async fn snapshot(&self, seq: u64) -> Result<Option<RouteState>, CheckpointError> {
        self.read(&snapshot_name(&self.applier, seq)).await
    }

    /// The object `name`, decoded; `None` when it is missing or unusable.
    async fn read(&self, name: &str) -> Result<Option<RouteState>, CheckpointError> {
        let read_error = |reason: String| CheckpointError::Read {
            name: name.to_string(),
            reason,
        };
        let mut object = match self.store.get(name).await {
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

    async fn write(&self, name: &str, mut bytes: &[u8]) -> Result<(), CheckpointError> {
        self.store
            .put(name, &mut bytes)
            .await
            .map_err(|e| CheckpointError::Write {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(())
    }

    fn ledger(&self) -> Ledger {
        *self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, last: Option<SnapshotMark>) {
        *self.ledger.lock().unwrap_or_else(|e| e.into_inner()) = Ledger::Known(last);
    }

    /// Keeps the checkpoint `bytes` of the fold up to `seq` as a snapshot
    /// if one is due, then prunes what the log no longer needs.
    async fn keep_snapshot(&self, seq: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        let last = match self.ledger() {
            Ledger::Known(last) => last,
            Ledger::Unknown => self.snapshots().await?.last().copied(),
        };
        let now = now_ms();
        if !self.schedule.due(last, seq, now) {
            self.record(last);
            return Ok(());
        }
        self.write(&snapshot_name(&self.applier, seq), bytes)
            .await?;
        self.record(Some(SnapshotMark { seq, at_ms: now }));
        let Some(log) = &self.log else {
            return Ok(());
        };
        let first_seq = match log.get_info().await {
            Ok(info) => info.state.first_sequence,
            Err(e) => {
                return Err(CheckpointError::List {
                    bucket: self.bucket.clone(),
                    reason: format!("cannot read the log's first sequence: {e}"),
                })
            }
        };
        let seqs: Vec<u64> = self.snapshots().await?.iter().map(|m| m.seq).collect();
        for old in prunable(&seqs, first_seq) {
            let name = snapshot_name(&self.applier, old);
            self.store
                .delete(&name)
                .await
                .map_err(|e| CheckpointError::Write {
                    name,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }
}

impl CheckpointStore for ObjectStoreCheckpoints {
    async fn load(&self) -> Result<Option<RouteState>, CheckpointError> {
        self.read(&self.name).await
    }

    /// Replaces the checkpoint, then keeps it as a snapshot if one is due;
    /// a snapshot that cannot be written is logged, never a failed save
    /// (the checkpoint is what acks wait for).
    async fn save(&self, state: &RouteState) -> Result<(), CheckpointError> {
        let bytes = encode(state);
        self.write(&self.name, &bytes).await?;
        if let Err(error) = self.keep_snapshot(state.last_seq, &bytes).await {
            tracing::warn!(%error, seq = state.last_seq, "Snapshot not kept; the checkpoint is.");
        }
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

    #[test]
    fn snapshot_names_sort_by_sequence_and_read_back() {
        assert_eq!(checkpoint_name("live"), "applier-live");
        let name = snapshot_name("live", 1234);
        assert_eq!(name, "snapshot-live-00000000000000001234");
        assert_eq!(snapshot_seq("live", &name), Some(1234));
        assert!(snapshot_name("a", 9) < snapshot_name("a", 10));
        // Another applier's, a prefix of the name, and the checkpoint are not ours.
        assert_eq!(snapshot_seq("liv", &name), None);
        assert_eq!(snapshot_seq("live-x", &snapshot_name("live", 1)), None);
        assert_eq!(snapshot_seq("live", &snapshot_name("live-x", 1)), None);
        assert_eq!(snapshot_seq("live", "applier-live"), None);
    }

    #[test]
    fn a_snapshot_is_due_per_boundary_crossed_or_per_interval() {
        let schedule = SnapshotSchedule {
            every_messages: 100,
            every: Duration::from_secs(60),
        };
        let at = |seq, at_ms| Some(SnapshotMark { seq, at_ms });
        assert!(schedule.due(None, 1, 0), "the first checkpoint");
        assert!(!schedule.due(None, 0, 0), "nothing folded yet");
        assert!(!schedule.due(at(150, 0), 199, 1_000));
        assert!(schedule.due(at(150, 0), 200, 1_000), "crossed 200");
        assert!(schedule.due(at(150, 0), 160, 60_000), "an hour's worth");
        assert!(!schedule.due(at(150, 0), 150, 60_000), "nothing new");
    }

    #[test]
    fn the_nearest_snapshot_and_what_the_log_no_longer_needs() {
        let seqs = [100, 200, 300, 400];
        assert_eq!(nearest_at_or_before(seqs, 99), None);
        assert_eq!(nearest_at_or_before(seqs, 100), Some(100));
        assert_eq!(nearest_at_or_before(seqs, 399), Some(300));
        assert_eq!(nearest_at_or_before(seqs, u64::MAX), Some(400));
        // The log starts at 250: 200 is where its fold starts, 100 goes.
        assert_eq!(prunable(&seqs, 250), [100]);
        assert_eq!(prunable(&seqs, 201), [100]);
        assert_eq!(prunable(&seqs, 200), [100]);
        assert_eq!(prunable(&seqs, 100), Vec::<u64>::new());
        assert_eq!(prunable(&seqs, 1000), [100, 200, 300]);
    }

    /// A checkpoint as this release writes it (the state folded from the
    /// wire fixture) is read back by this build, and re-encodes to the same
    /// bytes; a later format is not misread but rebuilt from the stream.
    #[test]
    fn this_releases_checkpoint_format_is_read_back() {
        let wire = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../schema/testdata/wire/v1.txt"
        );
        let mut state = RouteState::default();
        let lines = std::fs::read_to_string(wire).unwrap();
        // Every kind but `down`, so the checkpoint holds a container.
        let kept = lines.lines().filter(|l| !l.contains("\"kind\":\"down\""));
        for (seq, line) in kept.enumerate() {
            let (subject, payload) = line.split_once('\t').unwrap();
            state
                .fold_message(seq as u64 + 1, subject, payload.as_bytes())
                .unwrap();
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/checkpoint-v1.json");
        if std::env::var_os("UPDATE_WIRE_FIXTURE").is_some() && std::fs::metadata(path).is_err() {
            std::fs::write(path, encode(&state)).unwrap();
        }
        let fixture = std::fs::read(path).expect("the checkpoint fixture");
        assert_eq!(decode(&fixture), Some(state.clone()));
        assert_eq!(
            encode(&state),
            fixture,
            "a new checkpoint format, not an edit"
        );
        let later = String::from_utf8(fixture)
            .unwrap()
            .replacen("\"format\":1", "\"format\":2", 1);
        assert_eq!(decode(later.as_bytes()), None);
    }
}
