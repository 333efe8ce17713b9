//! The `CADDY_FLEET` stream: one durable, ordered log shared by every host,
//! fed by one bounded ingest stream per agent.
//!
//! An agent never writes to the shared log directly. It publishes on
//! `fleet.<agent>.>`, which only its own ingest stream `<log>_IN_<agent>`
//! captures; the shared log has no subjects of its own and *sources* every
//! ingest stream. Each ingest stream is a short buffer with its own quota
//! (`max_bytes`, `max_msg_size`, `discard=new`), so an agent that floods
//! fills only its own share: its further messages are refused at publish,
//! while every other agent's messages flow on and nothing already stored,
//! by anyone, is evicted. The shared log keeps history (`max_age`) and has
//! deduplication off: each agent's messages were already deduplicated by
//! `Nats-Msg-Id` in its own ingest stream, so no agent can pre-empt
//! another's message IDs.
//!
//! Ingest streams are created by the applier, never by agents (whose
//! credentials allow no JetStream API calls): for the agents it knows of,
//! and for an unknown agent when it first hears it ([`crate::provision`]).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use caddy_fleet_schema::limits::MAX_SYNC_BYTES;
use caddy_fleet_schema::AgentId;

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
    /// Each agent's share: how many bytes its ingest stream may hold.
    pub agent_max_bytes: i64,
    /// How long an ingest stream keeps a message after the log sourced it.
    pub agent_max_age: Duration,
    /// Whether this applier creates and updates the log (`STREAM_OWNER`).
    /// With several ingresses on one log exactly one owns it; the others
    /// only check that the log is what their settings say, and refuse to
    /// start on a mismatch rather than overwrite the owner's settings.
    pub owner: bool,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            name: "CADDY_FLEET".to_string(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            agent_max_bytes: 16 * 1024 * 1024,
            agent_max_age: Duration::from_secs(3600),
            owner: true,
        }
    }
}

impl StreamSettings {
    /// The shared log's configuration: no subjects of its own, `sources`
    /// as given (one per agent), no deduplication (see the module doc).
    pub fn to_config(&self, sources: Vec<stream::Source>) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: Vec::new(),
            sources: Some(sources),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: self.max_age,
            max_message_size: MAX_SYNC_BYTES as i32,
            // Zero turns deduplication off on a sourcing stream (NATS ≥ 2.14).
            duplicate_window: Duration::ZERO,
            num_replicas: self.replicas,
            // Any agent could otherwise wipe other agents' history.
            allow_rollup: false,
            deny_delete: true,
            deny_purge: true,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Whether an existing log's configuration already is what these
    /// settings ask for (its sources aside).
    pub fn matches(&self, current: &stream::Config) -> bool {
        self.differences(current).is_empty()
    }

    /// How an existing log's configuration differs from what these settings
    /// ask for (its sources aside), one `what: here vs on the log` each.
    pub fn differences(&self, current: &stream::Config) -> Vec<String> {
        let wanted = self.to_config(Vec::new());
        let mut differences = Vec::new();
        let mut differ = |what: &str, here: String, there: String| {
            if here != there {
                differences.push(format!("{what}: {here} here, {there} on the log"));
            }
        };
        let root = format!("{}.", caddy_fleet_schema::subject::SUBJECT_ROOT);
        if current.subjects.iter().any(|s| s.starts_with(&root)) {
            differ("subjects", "none".into(), current.subjects.join(","));
        }
        let age = |d: Duration| humantime_secs(d);
        differ("STREAM_MAX_AGE", age(wanted.max_age), age(current.max_age));
        differ(
            "STREAM_REPLICAS",
            wanted.num_replicas.to_string(),
            current.num_replicas.to_string(),
        );
        // The server reports its default window for a log created with
        // zero (off), so the window is compared only when one is asked for.
        let window = |c: &stream::Config| {
            if wanted.duplicate_window.is_zero() {
                String::new()
            } else {
                format!(" duplicate_window={:?}", c.duplicate_window)
            }
        };
        let rest = |c: &stream::Config| {
            format!(
                "max_msg_size={}{} discard={:?} storage={:?} rollup={} deny_delete={} deny_purge={} direct={}",
                c.max_message_size, window(c), c.discard, c.storage,
                c.allow_rollup, c.deny_delete, c.deny_purge, c.allow_direct
            )
        };
        differ("other settings", rest(&wanted), rest(current));
        differences
    }

    /// The name of `agent`'s ingest stream: `<log>_IN_<agent>`.
    pub fn ingest_name(&self, agent: &AgentId) -> String {
        format!("{}_IN_{agent}", self.name)
    }

    /// `agent`'s ingest stream: its subjects only, its quota, refusing
    /// what exceeds the quota instead of evicting anything.
    pub fn ingest_config(&self, agent: &AgentId) -> stream::Config {
        let max_age = self.agent_max_age.min(self.max_age);
        stream::Config {
            name: self.ingest_name(agent),
            subjects: vec![agent.all_subjects()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            max_bytes: self.agent_max_bytes,
            max_age,
            max_message_size: MAX_SYNC_BYTES as i32,
            // JetStream refuses a duplicate window longer than the history.
            duplicate_window: self.duplicate_window.min(max_age),
            num_replicas: self.replicas,
            allow_rollup: false,
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        }
    }

    /// The log's source entry for `agent`'s ingest stream.
    pub fn source(&self, agent: &AgentId) -> stream::Source {
        stream::Source {
            name: self.ingest_name(agent),
            filter_subject: Some(agent.all_subjects()),
            ..Default::default()
        }
    }

    /// The agents whose ingest streams a log configuration sources.
    pub fn sourced_agents(&self, config: &stream::Config) -> Vec<AgentId> {
        let prefix = format!("{}_IN_", self.name);
        config
            .sources
            .iter()
            .flatten()
            .filter_map(|s| s.name.strip_prefix(&prefix))
            .filter_map(|a| AgentId::new(a).ok())
            .collect()
    }
}

/// The log's stream info, read now.
pub(crate) async fn log_info(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Info, StreamError> {
    let mut log = js
        .get_stream(&settings.name)
        .await
        .map_err(|source| StreamError::Get {
            name: settings.name.clone(),
            source,
        })?;
    log.info()
        .await
        .cloned()
        .map_err(|source| StreamError::Info {
            name: settings.name.clone(),
            source,
        })
}

/// How long a replica of the log may go unseen by its leader and still
/// count towards the majority (a healthy one is seen every second or so).
const REPLICA_SEEN_WITHIN: Duration = Duration::from_secs(5);

/// Whether a stream's info shows a majority: a leader, and with it more
/// than half of the replicas seen lately. A stream without cluster info
/// (a single server) answering at all has one. A replica can answer
/// info while its group has no leader, and a leader that lost its peers
/// keeps leading for a few seconds, so an answer alone says neither.
pub fn has_majority(info: &stream::Info) -> bool {
    let Some(cluster) = &info.cluster else {
        return true;
    };
    if cluster.leader.as_deref().is_none_or(str::is_empty) {
        return false;
    }
    let seen = cluster
        .replicas
        .iter()
        .filter(|peer| !peer.offline && peer.active < REPLICA_SEEN_WITHIN)
        .count();
    // The leader and the peers it has seen, out of all of them.
    2 * (1 + seen) > 1 + cluster.replicas.len()
}

/// A source not heard from for this long does not flow (the server's
/// source consumer sends a heartbeat a second while idle).
pub const SOURCE_HEARD_WITHIN: Duration = Duration::from_secs(3);

/// How the log stands, as far as agents' silence is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogHealth {
    /// It has a leader and a majority ([`has_majority`]); `false` when it
    /// could not be asked.
    pub answers: bool,
    /// Agents whose facts may be waiting in their ingest stream because
    /// the log's sourcing of it does not flow: messages not sourced yet
    /// (`lag` > 0), or the source not heard from within
    /// [`SOURCE_HEARD_WITHIN`]. Their silence is the log's, not theirs.
    pub waiting: Vec<AgentId>,
}

/// [`LogHealth`] from the log's stream info.
pub fn log_health(info: &stream::Info) -> LogHealth {
    let prefix = format!("{}_IN_", info.config.name);
    let waiting = info
        .sources
        .iter()
        .filter(|s| s.lag > 0 || s.active.is_none_or(|a| a > SOURCE_HEARD_WITHIN))
        .filter_map(|s| s.name.strip_prefix(&prefix))
        .filter_map(|agent| AgentId::new(agent).ok())
        .collect();
    LogHealth {
        answers: has_majority(info),
        waiting,
    }
}

/// A duration in whole seconds, as `STREAM_MAX_AGE` takes it.
fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// Why the stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream {name} does not exist and this applier does not own it (STREAM_OWNER=false): start the owning applier first, or set STREAM_OWNER=true on exactly one applier")]
    Missing { name: String },
    #[error("stream {name} is not what this applier's settings say ({}); it belongs to the owning applier (STREAM_OWNER=true): give this one the same settings, or change them on the owner", differences.join("; "))]
    Mismatch {
        name: String,
        differences: Vec<String>,
    },
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
    #[error("cannot read stream {name}: {source}")]
    Info {
        name: String,
        source: jetstream::context::RequestError,
    },
    #[error("cannot list the streams on NATS: {source}")]
    List {
        source: jetstream::context::StreamsError,
    },
    #[error("cannot update stream {name}: {source}")]
    Update {
        name: String,
        source: jetstream::context::UpdateStreamError,
    },
}

/// Held by every read-change-write of the log's configuration in this
/// process (the owner's start, provisioning, the source watch): JetStream
/// replaces a stream's configuration whole and has no compare-and-set, so
/// two writers interleaving would drop each other's added sources. A
/// writer in another process is the source watch's business
/// ([`crate::sources`] adds back an ingest stream the log lost).
pub(crate) static LOG_CONFIG_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The owner ([`StreamSettings::owner`]) creates the log, or brings an
/// existing one to `settings`, keeping the sources it has; safe at every
/// start. Any other applier only opens it and checks it matches its
/// settings: a missing log or a mismatch is an error saying what to do.
///
/// A log from before ingest streams captured `fleet.>` itself; it keeps its
/// history and from now on sources the agents' ingest streams instead.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, StreamError> {
    // Created by someone else between our reading and our creating it
    // (a server-mode publisher starting beside its applier): read again.
    for _ in 0..5 {
        if let Some(stream) = try_ensure_stream(js, settings).await? {
            return Ok(stream);
        }
    }
    Err(StreamError::Missing {
        name: settings.name.clone(),
    })
}

/// One attempt of [`ensure_stream`]; `None` if the log appeared meanwhile.
async fn try_ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Option<stream::Stream>, StreamError> {
    let _writing = LOG_CONFIG_WRITES.lock().await;
    let sources = match js.get_stream(&settings.name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|source| StreamError::Info {
                name: settings.name.clone(),
                source,
            })?;
            let current = info.config.clone();
            let sources = current.sources.clone().unwrap_or_default();
            let differences = settings.differences(&current);
            // Nothing to change: write nothing. A write replaces the whole
            // source list, so it could undo an agent added meanwhile.
            if differences.is_empty() {
                return Ok(Some(existing));
            }
            if !settings.owner {
                return Err(StreamError::Mismatch {
                    name: settings.name.clone(),
                    differences,
                });
            }
            sources
        }
        // Not there (JetStream said so): only the owner creates it.
        Err(error)
            if !settings.owner
                && matches!(
                    error.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(_)
                ) =>
        {
            return Err(StreamError::Missing {
                name: settings.name.clone(),
            });
        }
        Err(source) if !settings.owner => {
            return Err(StreamError::Get {
                name: settings.name.clone(),
                source,
            })
        }
        // Not there: created, never updated. An update would replace the
        // sources of a log someone else created meanwhile with none.
        Err(_) => {
            return match js.create_stream(settings.to_config(Vec::new())).await {
                Ok(stream) => Ok(Some(stream)),
                Err(error)
                    if matches!(
                        error.kind(),
                        jetstream::context::CreateStreamErrorKind::JetStream(ref e)
                            if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                    ) =>
                {
                    Ok(None)
                }
                Err(source) => Err(StreamError::CreateOrUpdate {
                    name: settings.name.clone(),
                    source,
                }),
            };
        }
    };
    js.update_stream(settings.to_config(sources))
        .await
        .map_err(|source| StreamError::Update {
            name: settings.name.clone(),
            source,
        })?;
    js.get_stream(&settings.name)
        .await
        .map(Some)
        .map_err(|source| StreamError::Get {
            name: settings.name.clone(),
            source,
        })
}

/// Creates `agent`'s ingest stream (or brings it to `settings`) and makes
/// sure the log sources it. Idempotent; returns whether the log's sources
/// had to change.
pub async fn ensure_agent_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    agent: &AgentId,
) -> Result<bool, StreamError> {
    let ingest = settings.ingest_config(agent);
    js.create_or_update_stream(ingest.clone())
        .await
        .map_err(|source| StreamError::CreateOrUpdate {
            name: ingest.name.clone(),
            source,
        })?;
    // Read, add, write; a writer in another process can overwrite the
    // addition, so re-read until the source is there.
    let mut changed = false;
    for _ in 0..5 {
        let _writing = LOG_CONFIG_WRITES.lock().await;
        let mut config = log_info(js, settings).await?.config;
        let sources = config.sources.get_or_insert_with(Vec::new);
        if sources.iter().any(|s| s.name == ingest.name) {
            return Ok(changed);
        }
        changed = true;
        sources.push(settings.source(agent));
        js.update_stream(config)
            .await
            .map_err(|source| StreamError::Update {
                name: settings.name.clone(),
                source,
            })?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_streams_are_per_agent_bounded_and_refuse_when_full() {
        let settings = StreamSettings::default();
        let agent = AgentId::new("web-1").unwrap();
        let ingest = settings.ingest_config(&agent);
        assert_eq!(ingest.name, "CADDY_FLEET_IN_web-1");
        assert_eq!(ingest.subjects, ["fleet.web-1.>"]);
        assert_eq!(ingest.discard, stream::DiscardPolicy::New);
        assert!(ingest.max_bytes > 0 && ingest.max_message_size > 0);
        assert!(ingest.duplicate_window <= ingest.max_age);

        let log = settings.to_config(vec![settings.source(&agent)]);
        assert!(log.subjects.is_empty());
        assert_eq!(settings.sourced_agents(&log), [agent]);
        assert!(log.deny_purge && log.deny_delete && !log.allow_rollup);
    }

    #[test]
    fn agents_wait_on_a_source_that_lags_or_is_not_heard_from() {
        let source = |name: &str, lag: u64, active_ms: i64| serde_json::json!({"name": name, "lag": lag, "active": active_ms * 1_000_000});
        let info: stream::Info = serde_json::from_value(serde_json::json!({
            "config": serde_json::to_value(StreamSettings::default().to_config(Vec::new())).unwrap(),
            "created": "2026-01-01T00:00:00Z",
            "state": {"messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "2026-01-01T00:00:00Z",
                      "last_seq": 0, "last_ts": "2026-01-01T00:00:00Z", "consumer_count": 0},
            "sources": [
                source("CADDY_FLEET_IN_flowing", 0, 800),
                source("CADDY_FLEET_IN_lagging", 12, 200),
                source("CADDY_FLEET_IN_quiet", 0, 9_000),
                {"name": "CADDY_FLEET_IN_never", "lag": 0, "active": -1},
                source("OTHER_flowing", 3, 100),
            ],
        }))
        .expect("a stream info");
        let health = log_health(&info);
        assert!(health.answers);
        let waiting: Vec<&str> = health.waiting.iter().map(AgentId::as_str).collect();
        assert_eq!(waiting, ["lagging", "quiet", "never"]);
    }

    #[test]
    fn a_majority_is_a_leader_and_enough_replicas_seen_lately() {
        let info = |leader: Option<&str>, replicas: &[(bool, u64)]| -> stream::Info {
            let peers: Vec<_> = replicas
                .iter()
                .enumerate()
                .map(|(n, (offline, active_s))| {
                    serde_json::json!({
                        "name": format!("n{n}"), "current": !offline,
                        "active": active_s * 1_000_000_000, "offline": offline,
                    })
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "config": serde_json::to_value(StreamSettings::default().to_config(Vec::new())).unwrap(),
                "created": "2026-01-01T00:00:00Z",
                "state": {"messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "2026-01-01T00:00:00Z",
                          "last_seq": 0, "last_ts": "2026-01-01T00:00:00Z", "consumer_count": 0},
                "cluster": {"name": "c", "leader": leader, "replicas": peers},
            }))
            .expect("a stream info")
        };
        assert!(has_majority(&info(Some("n"), &[(false, 0), (false, 1)])));
        assert!(has_majority(&info(Some("n"), &[(false, 0), (true, 30)])));
        assert!(!has_majority(&info(Some("n"), &[(true, 30), (true, 30)])));
        assert!(!has_majority(&info(Some("n"), &[(false, 9), (false, 9)])));
        assert!(!has_majority(&info(None, &[(false, 0), (false, 0)])));
        assert!(has_majority(&info(Some("n"), &[])));
    }

    #[test]
    fn differences_name_the_setting_to_change() {
        let owner = StreamSettings::default();
        let log = owner.to_config(Vec::new());
        assert!(owner.matches(&log));
        let other = StreamSettings {
            replicas: 3,
            max_age: Duration::from_secs(3600),
            owner: false,
            ..StreamSettings::default()
        };
        let differences = other.differences(&log);
        assert_eq!(differences.len(), 2, "{differences:?}");
        assert!(differences[0].contains("STREAM_MAX_AGE: 3600s here, 604800s on the log"));
        assert!(differences[1].contains("STREAM_REPLICAS: 3 here, 1 on the log"));
    }
}
