//! [`LogReader`]: a read-only view of the log. It turns points into stream
//! sequences and folds the log up to one, starting from the nearest state
//! the applier's checkpoint store holds at or before it (its newest
//! checkpoint, or one of its snapshots), so any point costs a bounded tail.

use std::io::IsTerminal;

use caddy_fleet_applier::checkpoint::{
    nearest_at_or_before, CheckpointStore, ObjectStoreCheckpoints,
};
use caddy_fleet_nats::async_nats::jetstream::{self, stream::Stream};
use caddy_fleet_nats::consume::{first_seq_at_or_after, replay};
use caddy_fleet_schema::subject::SUBJECT_ROOT;
use caddy_fleet_schema::translate::TranslateOptions;
use caddy_fleet_schema::{Event, RouteState};
use time::format_description::well_known::Rfc3339;

use crate::point::{format_ms, to_ms, Point};
use crate::{InspectConfig, InspectError};

/// Where a fold started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FoldStart {
    /// The start of the log.
    Empty,
    /// The applier's newest checkpoint, holding the log up to this sequence.
    Checkpoint(u64),
    /// One of the applier's snapshots, holding the log up to this sequence.
    Snapshot(u64),
}

/// How a state was reached: where the fold started and how many messages
/// of the log it read after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FoldStats {
    pub start: FoldStart,
    pub folded: u64,
}

/// The state at a point.
#[derive(Debug, Clone)]
pub struct StateAt {
    /// The stream sequence the point stands for.
    pub seq: u64,
    pub state: RouteState,
    pub fold: FoldStats,
}

/// Where to start a fold to `seq`: the newer of the applier's checkpoint
/// and snapshot, among those at or before `seq`, else the empty state.
pub fn choose_start(
    checkpoint: Option<RouteState>,
    snapshot: Option<RouteState>,
    seq: u64,
) -> (RouteState, FoldStart) {
    let checkpoint = checkpoint.filter(|s| s.last_seq <= seq);
    let snapshot = snapshot.filter(|s| s.last_seq <= seq);
    match (checkpoint, snapshot) {
        (Some(c), Some(s)) if s.last_seq > c.last_seq => {
            let at = s.last_seq;
            (s, FoldStart::Snapshot(at))
        }
        (Some(c), _) => {
            let at = c.last_seq;
            (c, FoldStart::Checkpoint(at))
        }
        (None, Some(s)) => {
            let at = s.last_seq;
            (s, FoldStart::Snapshot(at))
        }
        (None, None) => (RouteState::default(), FoldStart::Empty),
    }
}

/// A read-only view of the fleet's log.
pub struct LogReader {
    stream: Stream,
    checkpoints: Option<ObjectStoreCheckpoints>,
    options: TranslateOptions,
    progress: bool,
}

impl LogReader {
    /// Opens the log `config` names, and the checkpoint bucket if there is
    /// one (without it, folds start from the beginning of the log).
    pub async fn open(config: &InspectConfig) -> Result<Self, InspectError> {
        let client = caddy_fleet_nats::connect(&config.nats).await?;
        let js = jetstream::new(client);
        let stream =
            js.get_stream(&config.stream)
                .await
                .map_err(|source| InspectError::NoStream {
                    stream: config.stream.clone(),
                    source,
                })?;
        let checkpoints = match &config.applier_name {
            Some(applier) => {
                ObjectStoreCheckpoints::open_existing(&js, &config.checkpoint_bucket, applier)
                    .await
                    .ok()
            }
            None => None,
        };
        Ok(LogReader {
            stream,
            checkpoints,
            options: config.translate.clone(),
            progress: std::io::stdout().is_terminal(),
        })
    }

    /// Never draws a progress bar (for readers inside a server, whose
    /// standard output may be a terminal).
    pub fn quiet(mut self) -> Self {
        self.progress = false;
        self
    }

    /// How labels are translated.
    pub fn options(&self) -> &TranslateOptions {
        &self.options
    }

    /// The stream sequence a point stands for: the last message at or
    /// before it.
    pub async fn resolve(&self, point: Point) -> Result<u64, InspectError> {
        let info = self.stream.get_info().await?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let start = || match info.state.first_timestamp.format(&Rfc3339) {
            Ok(t) => format!("sequence {first} ({t})"),
            Err(_) => format!("sequence {first}"),
        };
        match point {
            Point::Seq(seq) if first > 1 && seq + 1 < first => Err(InspectError::BeforeHistory {
                point: format!("sequence {seq}"),
                start: start(),
            }),
            Point::Seq(seq) => Ok(seq.min(last)),
            Point::Time(ms) => {
                if info.state.messages > 0 && ms < to_ms(info.state.first_timestamp) && first > 1 {
                    return Err(InspectError::BeforeHistory {
                        point: format_ms(ms),
                        start: start(),
                    });
                }
                if ms >= to_ms(info.state.last_timestamp) {
                    return Ok(last);
                }
                match first_seq_at_or_after(&self.stream, ms + 1).await? {
                    Some(seq) => Ok(seq.saturating_sub(1)),
                    None => Ok(last),
                }
            }
        }
    }

    /// When the message at `seq` was stored.
    pub async fn time_of(&self, seq: u64) -> Option<i64> {
        let message = self.stream.get_raw_message(seq).await.ok()?;
        Some(to_ms(message.time))
    }

    /// The state to fold to `seq` from: the nearest the applier's store
    /// holds at or before it. An unreadable checkpoint or snapshot only
    /// means a longer fold.
    pub async fn start_for(&self, seq: u64) -> (RouteState, FoldStart) {
        let Some(store) = &self.checkpoints else {
            return (RouteState::default(), FoldStart::Empty);
        };
        let snapshots: Vec<u64> = match store.snapshots().await {
            Ok(marks) => marks.iter().map(|m| m.seq).collect(),
            Err(_) => Vec::new(),
        };
        // The checkpoint is at least as new as every snapshot (each is a
        // copy of one): with a snapshot after `seq`, it is too, and is not
        // read; at or before `seq`, no snapshot is nearer.
        let checkpoint = match snapshots.iter().any(|&s| s > seq) {
            true => None,
            false => store.load().await.ok().flatten(),
        };
        if checkpoint.as_ref().is_some_and(|c| c.last_seq <= seq) {
            return choose_start(checkpoint, None, seq);
        }
        let snapshot = match nearest_at_or_before(snapshots, seq) {
            Some(at) => store.snapshot(at).await.ok().flatten(),
            None => None,
        };
        choose_start(checkpoint, snapshot, seq)
    }

    /// Folds the log after `state` up to `seq` into it. `each` sees every
    /// message folded, with the state before it. Returns how many messages
    /// were read.
    pub async fn fold_into(
        &self,
        state: &mut RouteState,
        seq: u64,
        mut each: impl FnMut(&RouteState, u64, Option<i64>, &Event),
    ) -> Result<u64, InspectError> {
        let from = state.last_seq + 1;
        if from > seq {
            return Ok(0);
        }
        let bar = self.progress.then(|| {
            let bar = indicatif::ProgressBar::new(seq + 1 - from);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} messages, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let mut n = 0u64;
        let subjects = format!("{SUBJECT_ROOT}.>");
        replay(&self.stream, &subjects, from, Some(seq), |d| {
            n += 1;
            if let Some(bar) = &bar {
                if n.is_multiple_of(1000) {
                    bar.set_position(n);
                }
            }
            // Messages that do not decode are skipped, as the applier does.
            let _ = state.fold_message_observed(d.seq, &d.subject, &d.payload, |before, event| {
                each(before, d.seq, d.published_ms, event)
            });
        })
        .await?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok(n)
    }

    /// The state after the message at `seq`, from the nearest start.
    pub async fn state_at_seq(&self, seq: u64) -> Result<StateAt, InspectError> {
        let (mut state, start) = self.start_for(seq).await;
        let folded = self.fold_into(&mut state, seq, |_, _, _, _| {}).await?;
        Ok(StateAt {
            seq,
            state,
            fold: FoldStats { start, folded },
        })
    }

    /// The state at `point`.
    pub async fn state_at(&self, point: Point) -> Result<StateAt, InspectError> {
        let seq = self.resolve(point).await?;
        self.state_at_seq(seq).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64) -> RouteState {
        let mut state = RouteState::default();
        state.skip(seq);
        state
    }

    #[test]
    fn folds_start_from_the_nearest_state_at_or_before_the_point() {
        let start = |c: Option<u64>, s: Option<u64>, seq| choose_start(c.map(at), s.map(at), seq).1;
        assert_eq!(start(None, None, 10), FoldStart::Empty);
        assert_eq!(start(Some(5), None, 10), FoldStart::Checkpoint(5));
        assert_eq!(
            start(Some(50), None, 10),
            FoldStart::Empty,
            "after the point"
        );
        assert_eq!(start(Some(50), Some(8), 10), FoldStart::Snapshot(8));
        assert_eq!(start(Some(9), Some(8), 10), FoldStart::Checkpoint(9));
        assert_eq!(start(Some(7), Some(8), 10), FoldStart::Snapshot(8));
        assert_eq!(start(None, Some(11), 10), FoldStart::Empty);
        assert_eq!(choose_start(Some(at(5)), None, 10).0, at(5));
    }
}
