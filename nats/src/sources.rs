//! Keeping the log's sourcing of the agents' ingest streams moving.
//!
//! The log sources each agent's ingest stream through a consumer the NATS
//! server creates on that stream. After a leader change or a partition the
//! server's request to create that consumer can be lost, and NATS 2.15
//! then waits 30 s for its answer before trying again: the agent's facts
//! sit in its ingest stream meanwhile, although the applier has folded
//! everything the log holds.
//!
//! Promise: [`watch`], run by the log's owner only, reads the log's stream
//! info every [`SourceWatch::every`] and restarts a source that has
//! stalled: not heard from (no message, no heartbeat; the server's source
//! consumer sends one a second) for [`SourceWatch::stall_after`], or with
//! messages pending (`lag` > 0) and its lag unchanged for as long (the
//! server updates it with every message it sources).
//! [`restart_sources`] removes the stalled sources from the log's
//! configuration and adds them back: the server then creates a new source
//! consumer starting after the last message the log holds from that
//! source (found from the `Nats-Stream-Source` header), so nothing is lost
//! and nothing is sourced twice (`tests/sources.rs` checks this against a
//! real NATS). A source is not restarted again before a
//! [`RetryPolicy::SOURCE_RESTART`] delay, a source removed but not yet
//! added back is added back before anything else, and nothing is restarted
//! while the log has no majority ([`crate::stream::has_majority`]).
//!
//! Promise: every agent's ingest stream is sourced by the log. Several
//! writers change the log's source list by reading it, changing it and
//! writing it whole (the owner at start, provisioning, this watch, and a
//! server-mode publisher), and JetStream has no compare-and-set for a
//! stream's configuration, so one write can drop a source another just
//! added. The watch lists the ingest streams too, and adds back one that
//! the log has not sourced for two readings in a row ([`unsourced`]; one
//! reading could be the moment between a stream's creation and its
//! source's addition). The log then sources it from its first message
//! not in the log yet, as after a restart.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::time::Instant;

use crate::retry::{Retry, RetryPolicy};
use crate::stream::{log_info, StreamError, StreamSettings, LOG_CONFIG_WRITES};

/// How the watch reads the log and when it calls a source stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceWatch {
    /// How often the log's stream info is read.
    pub every: Duration,
    /// How long a source may be silent, or lag without progress, before
    /// it is restarted.
    pub stall_after: Duration,
}

impl Default for SourceWatch {
    fn default() -> Self {
        SourceWatch {
            every: Duration::from_secs(1),
            stall_after: Duration::from_secs(4),
        }
    }
}

/// Why a source was called stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Nothing heard from it (neither a message nor a heartbeat).
    Silent,
    /// Messages pending at the ingest stream and none arriving.
    NoProgress,
    /// An ingest stream the log did not source at all.
    Unsourced,
}

impl Stall {
    /// The metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Stall::Silent => "silent",
            Stall::NoProgress => "no_progress",
            Stall::Unsourced => "unsourced",
        }
    }
}

/// One source restarted by [`watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRestart {
    /// The ingest stream the log sources (`<log>_IN_<agent>`).
    pub source: String,
    pub stall: Stall,
    /// How long it had been stalled, as far as the watch saw.
    pub stalled_for: Duration,
    /// Messages pending at the ingest stream when it was restarted.
    pub lag: u64,
}

/// What the watch remembers of one source between readings.
#[derive(Debug)]
struct Tracked {
    /// Since when it has never been heard from (a new source consumer).
    unheard_since: Option<Instant>,
    /// Since when it has lagged, and the lag then.
    lagging_since: Option<(Instant, u64)>,
    /// Restarts of a source that stays stalled are spaced by this.
    restarts: Retry,
    /// No restart before this.
    not_before: Option<Instant>,
}

/// Decides, from successive readings of the log's sources, which are
/// stalled. Pure: time comes in as an argument.
#[derive(Debug)]
pub struct StallTracker {
    stall_after: Duration,
    sources: HashMap<String, Tracked>,
}

impl StallTracker {
    pub fn new(stall_after: Duration) -> Self {
        StallTracker {
            stall_after,
            sources: HashMap::new(),
        }
    }

    /// Takes one reading of the log's sources at `now`; returns the ones
    /// to restart now, and remembers that they are being restarted.
    pub fn observe(&mut self, now: Instant, sources: &[stream::SourceInfo]) -> Vec<SourceRestart> {
        self.sources
            .retain(|name, _| sources.iter().any(|s| &s.name == name));
        let mut restart = Vec::new();
        for source in sources {
            let tracked = self
                .sources
                .entry(source.name.clone())
                .or_insert_with(|| Tracked {
                    unheard_since: None,
                    lagging_since: None,
                    restarts: RetryPolicy::SOURCE_RESTART.start(),
                    not_before: None,
                });
            let silent_for = match source.active {
                Some(active) => {
                    tracked.unheard_since = None;
                    active
                }
                None => now - *tracked.unheard_since.get_or_insert(now),
            };
            // The server updates `lag` with each message it sources, so a
            // lag that does not change at all is one nothing updates; a
            // flowing source's lag moves between readings.
            let no_progress_for = match (source.lag, tracked.lagging_since) {
                (0, _) => {
                    tracked.lagging_since = None;
                    Duration::ZERO
                }
                (lag, Some((since, then))) if lag == then => now - since,
                (lag, _) => {
                    tracked.lagging_since = Some((now, lag));
                    Duration::ZERO
                }
            };
            let stall = if silent_for >= self.stall_after {
                (Stall::Silent, silent_for)
            } else if no_progress_for >= self.stall_after {
                (Stall::NoProgress, no_progress_for)
            } else {
                if silent_for < self.stall_after / 2 && source.lag == 0 {
                    tracked.restarts.reset();
                    tracked.not_before = None;
                }
                continue;
            };
            if tracked.not_before.is_some_and(|t| now < t) {
                continue;
            }
            let wait = tracked
                .restarts
                .next_delay()
                .unwrap_or(RetryPolicy::SOURCE_RESTART.cap);
            tracked.not_before = Some(now + wait);
            tracked.unheard_since = None;
            tracked.lagging_since = None;
            restart.push(SourceRestart {
                source: source.name.clone(),
                stall: stall.0,
                stalled_for: stall.1,
                lag: source.lag,
            });
        }
        restart
    }
}

/// Restarts the log's sourcing of the ingest streams named `names`: removes
/// them from the log's configuration, then adds the same entries back.
/// Returns the entries it removed and could not add back (to be passed to
/// [`add_back`] later): the error is in the second part.
pub async fn restart_sources(
    js: &jetstream::Context,
    settings: &StreamSettings,
    names: &[String],
) -> Result<(), (Vec<stream::Source>, StreamError)> {
    let removed = {
        let _writing = LOG_CONFIG_WRITES.lock().await;
        let config = log_config(js, settings)
            .await
            .map_err(|e| (Vec::new(), e))?;
        let (removed, kept): (Vec<_>, Vec<_>) = config
            .sources
            .clone()
            .unwrap_or_default()
            .into_iter()
            .partition(|s| names.contains(&s.name));
        if removed.is_empty() {
            return Ok(());
        }
        js.update_stream(stream::Config {
            sources: Some(kept),
            ..config
        })
        .await
        .map_err(|source| {
            (
                Vec::new(),
                StreamError::Update {
                    name: settings.name.clone(),
                    source,
                },
            )
        })?;
        removed
    };
    add_back(js, settings, &removed)
        .await
        .map_err(|error| (removed, error))
}

/// Adds `sources` back to the log's configuration (those it lacks).
pub async fn add_back(
    js: &jetstream::Context,
    settings: &StreamSettings,
    sources: &[stream::Source],
) -> Result<(), StreamError> {
    let mut retry = RetryPolicy::NATS
        .with_deadline(Duration::from_secs(10))
        .start();
    loop {
        let attempt = async {
            let _writing = LOG_CONFIG_WRITES.lock().await;
            let mut config = log_config(js, settings).await?;
            let current = config.sources.get_or_insert_with(Vec::new);
            let missing: Vec<_> = sources
                .iter()
                .filter(|s| !current.iter().any(|c| c.name == s.name))
                .cloned()
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            current.extend(missing);
            js.update_stream(config)
                .await
                .map(|_| ())
                .map_err(|source| StreamError::Update {
                    name: settings.name.clone(),
                    source,
                })
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(error) => {
                if !retry.wait().await {
                    return Err(error);
                }
            }
        }
    }
}

/// The source entries of the ingest streams among `streams` (stream names)
/// that the log's `config` does not source.
pub fn unsourced(
    settings: &StreamSettings,
    streams: &[String],
    config: &stream::Config,
) -> Vec<stream::Source> {
    let prefix = format!("{}_IN_", settings.name);
    let sourced = config.sources.as_deref().unwrap_or_default();
    streams
        .iter()
        .filter(|name| !sourced.iter().any(|s| &&s.name == name))
        .filter_map(|name| name.strip_prefix(&prefix))
        .filter_map(|agent| caddy_fleet_schema::AgentId::new(agent).ok())
        .map(|agent| settings.source(&agent))
        .collect()
}

/// The names of the streams on the server.
async fn stream_names(js: &jetstream::Context) -> Result<Vec<String>, StreamError> {
    use futures::TryStreamExt;
    js.stream_names()
        .try_collect()
        .await
        .map_err(|source| StreamError::List { source })
}

async fn log_config(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Config, StreamError> {
    Ok(log_info(js, settings).await?.config)
}

/// Watches the log's sources and restarts stalled ones until `shutdown`.
/// `restarted` is told of each restart (the applier counts and logs it);
/// `failed` of each error reading or updating the log (the watch goes on).
pub async fn watch(
    js: jetstream::Context,
    settings: StreamSettings,
    config: SourceWatch,
    restarted: impl Fn(&SourceRestart),
    failed: impl Fn(&StreamError),
    shutdown: impl Future<Output = ()>,
) {
    let mut tracker = StallTracker::new(config.stall_after);
    // Sources removed and not added back yet: restored first.
    let mut removed: Vec<stream::Source> = Vec::new();
    // Ingest streams the previous reading found unsourced.
    let mut unsourced_before: Vec<String> = Vec::new();
    let mut errors = RetryPolicy::NATS.start();
    tokio::pin!(shutdown);
    loop {
        let pass = async {
            if !removed.is_empty() {
                add_back(&js, &settings, &removed).await?;
                removed.clear();
            }
            let info = log_info(&js, &settings).await?;
            // Without a majority the log can be neither sourced into nor
            // updated: nothing to restart until it has one again.
            if !crate::stream::has_majority(&info) {
                return Ok(());
            }
            // Unsourced at two readings in a row: added back.
            let streams = stream_names(&js).await?;
            let unsourced_now = unsourced(&settings, &streams, &info.config);
            let lost: Vec<stream::Source> = unsourced_now
                .iter()
                .filter(|s| unsourced_before.contains(&s.name))
                .cloned()
                .collect();
            unsourced_before = unsourced_now.into_iter().map(|s| s.name).collect();
            if !lost.is_empty() {
                add_back(&js, &settings, &lost).await?;
                for source in &lost {
                    restarted(&SourceRestart {
                        source: source.name.clone(),
                        stall: Stall::Unsourced,
                        stalled_for: config.every,
                        lag: 0,
                    });
                }
                unsourced_before.clear();
            }
            let stalled = tracker.observe(Instant::now(), &info.sources);
            if stalled.is_empty() {
                return Ok(());
            }
            let names: Vec<String> = stalled.iter().map(|s| s.source.clone()).collect();
            match restart_sources(&js, &settings, &names).await {
                Ok(()) => {
                    stalled.iter().for_each(&restarted);
                    Ok(())
                }
                Err((not_back, error)) => {
                    removed = not_back;
                    Err(error)
                }
            }
        };
        let pause = match pass.await {
            Ok(()) => {
                errors.reset();
                config.every
            }
            Err(error) => {
                failed(&error);
                errors.next_delay().unwrap_or(RetryPolicy::NATS.cap)
            }
        };
        tokio::select! {
            // The next reading (sooner after a success, backing off after errors).
            () = tokio::time::sleep(pause) => {}
            // Shutdown: stop between passes.
            () = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, lag: u64, active: Option<Duration>) -> stream::SourceInfo {
        stream::SourceInfo {
            name: name.to_string(),
            lag,
            active,
            filter_subject: None,
            subject_transform_dest: None,
            subject_transforms: Vec::new(),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn unsourced_are_the_ingest_streams_the_log_lacks() {
        let settings = StreamSettings::default();
        let agent = |a: &str| caddy_fleet_schema::AgentId::new(a).unwrap();
        let config = settings.to_config(vec![settings.source(&agent("web-1"))]);
        let streams: Vec<String> = [
            settings.ingest_name(&agent("web-1")),
            settings.ingest_name(&agent("web-2")),
            settings.name.clone(),
            "OTHER_STREAM".to_string(),
            format!("{}_IN_bad.agent", settings.name),
        ]
        .into();
        let missing = unsourced(&settings, &streams, &config);
        assert_eq!(missing, vec![settings.source(&agent("web-2"))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_is_restarted_and_not_again_at_once() {
        let mut tracker = StallTracker::new(4 * S);
        let t0 = Instant::now();
        assert!(tracker.observe(t0, &[source("A", 0, Some(S))]).is_empty());
        let restart = tracker.observe(t0 + S, &[source("A", 3, Some(5 * S))]);
        assert_eq!(restart.len(), 1);
        assert_eq!(restart[0].stall, Stall::Silent);
        assert_eq!(restart[0].lag, 3);
        // Still silent a moment later: the restart is given time.
        assert!(tracker
            .observe(t0 + 2 * S, &[source("A", 3, Some(6 * S))])
            .is_empty());
        // Still silent after the restart delay: restarted again.
        assert_eq!(
            tracker
                .observe(t0 + 20 * S, &[source("A", 3, Some(25 * S))])
                .len(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_never_heard_from_is_restarted_after_stall_after() {
        let mut tracker = StallTracker::new(4 * S);
        let t0 = Instant::now();
        for second in 0..4 {
            let at = t0 + second * S;
            assert!(tracker.observe(at, &[source("A", 0, None)]).is_empty());
        }
        let restart = tracker.observe(t0 + 4 * S, &[source("A", 0, None)]);
        assert_eq!(restart[0].stall, Stall::Silent);
        assert_eq!(restart[0].stalled_for, 4 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lag_nothing_updates_is_a_stall_and_a_moving_lag_is_not() {
        let mut tracker = StallTracker::new(4 * S);
        let t0 = Instant::now();
        let heard = Some(Duration::from_millis(200));
        // A lag that moves, down or up (a steady flow), is a source being
        // updated: never restarted.
        let moving = [9u64, 8, 7, 6, 5, 4, 3, 2, 3, 2, 4, 3, 5, 4, 6];
        for (second, lag) in moving.into_iter().enumerate() {
            let at = t0 + second as u32 * S;
            assert!(tracker
                .observe(at, &[source("A", lag, heard), source("B", 0, heard)])
                .is_empty());
        }
        // The last change was at t0 + 14 s; a lag that stays the same is
        // restarted once stall_after has passed since.
        for second in 15..18 {
            assert!(tracker
                .observe(t0 + second * S, &[source("A", 6, heard)])
                .is_empty());
        }
        let restart = tracker.observe(t0 + 18 * S, &[source("A", 6, heard)]);
        assert_eq!(restart.len(), 1);
        assert_eq!(restart[0].stall, Stall::NoProgress);
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_idle_source_is_left_alone() {
        let mut tracker = StallTracker::new(4 * S);
        let t0 = Instant::now();
        for second in 0..60 {
            let at = t0 + second * S;
            let active = Some(Duration::from_millis(100 + 900 * (second as u64 % 2)));
            assert!(tracker.observe(at, &[source("A", 0, active)]).is_empty());
        }
    }
}
