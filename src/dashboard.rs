//! The dashboard's reads of the log, wired from the debugging commands
//! (`caddy-fleet-inspect`) into the applier's page through
//! [`LogReads`]: the applier does not depend on them. The timeline is
//! `caddy-fleet history`, the routes at a point `replay --at`, the times
//! of sequences the stream's own; one NATS connection serves them all.

use std::sync::Arc;

use caddy_fleet_applier::dashboard::{
    Dashboard, LogReads, RoutesAt, Timeline, TimelineLine, TimelineQuery,
};
use caddy_fleet_inspect::{history_after, routes_at, InspectConfig, LogReader, Point};
use caddy_fleet_schema::history::HistoryFilter;
use caddy_fleet_schema::RouteState;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{Mutex, OnceCell};

/// The log as the debugging commands read it: ephemeral ordered consumers,
/// direct gets and the applier's checkpoint and snapshots, never its
/// durable consumer.
pub struct InspectLog {
    config: InspectConfig,
    reader: OnceCell<LogReader>,
    /// The state at the end of the last timeline read, so the next one
    /// (the page asking what followed) folds only the new messages.
    tail: Mutex<Option<(u64, RouteState)>>,
}

impl InspectLog {
    /// Reads the log `config` names; connects at the first read.
    pub fn new(config: InspectConfig) -> InspectLog {
        InspectLog {
            config,
            reader: OnceCell::new(),
            tail: Mutex::new(None),
        }
    }

    async fn reader(&self) -> Result<&LogReader, String> {
        self.reader
            .get_or_try_init(|| async {
                LogReader::open(&self.config)
                    .await
                    .map(LogReader::quiet)
                    .map_err(|e| e.to_string())
            })
            .await
    }

    async fn timeline(&self, query: TimelineQuery) -> Result<Timeline, String> {
        let reader = self.reader().await?;
        let point = |p: &str| p.parse::<Point>().map_err(|e| e.to_string());
        let after = reader
            .resolve(point(query.since())?)
            .await
            .map_err(|e| e.to_string())?;
        let to = reader
            .resolve(point(query.until())?)
            .await
            .map_err(|e| e.to_string())?;
        if to <= after {
            return Ok(Timeline {
                after_seq: after,
                until_seq: after,
                lines: Vec::new(),
                truncated: false,
            });
        }
        let filter = HistoryFilter {
            domain: query.domain.clone(),
            agent: query.agent.clone(),
            container: query.container.clone(),
        };
        let mut tail = self.tail.lock().await;
        let mut state = match tail.take() {
            Some((at, state)) if at == after => state,
            _ => {
                reader
                    .state_at_seq(after)
                    .await
                    .map_err(|e| e.to_string())?
                    .state
            }
        };
        let lines = history_after(reader, &mut state, &filter, after + 1, to)
            .await
            .map_err(|e| e.to_string())?;
        *tail = Some((to, state));
        Ok(Timeline {
            after_seq: after,
            until_seq: to,
            lines: lines
                .into_iter()
                .map(|l| TimelineLine {
                    seq: l.seq,
                    time: l.time,
                    agent: l.agent,
                    container: l.container,
                    change: l.change,
                })
                .collect(),
            truncated: false,
        })
    }

    async fn routes(&self, at: String) -> Result<RoutesAt, String> {
        let reader = self.reader().await?;
        let point = at.parse::<Point>().map_err(|e| e.to_string())?;
        let t = routes_at(reader, point).await.map_err(|e| e.to_string())?;
        Ok(RoutesAt {
            seq: t.seq,
            routes: t.routes,
            since: t.since,
            refused: t.refused,
        })
    }

    async fn seq_times(&self, seqs: Vec<u64>) -> Result<Vec<(u64, i64)>, String> {
        let reader = self.reader().await?;
        let mut out = Vec::new();
        for seq in seqs {
            if let Some(ms) = reader.time_of(seq).await {
                out.push((seq, ms));
            }
        }
        Ok(out)
    }
}

impl LogReads for InspectLog {
    fn history(&self, query: TimelineQuery) -> BoxFuture<'_, Result<Timeline, String>> {
        self.timeline(query).boxed()
    }

    fn routes_at(&self, at: String) -> BoxFuture<'_, Result<RoutesAt, String>> {
        self.routes(at).boxed()
    }

    fn times(&self, seqs: Vec<u64>) -> BoxFuture<'_, Result<Vec<(u64, i64)>, String>> {
        self.seq_times(seqs).boxed()
    }
}

/// The dashboard of an applier that reads the log `config` names and the
/// policy file at `policy_file`.
pub fn with_log(config: InspectConfig, policy_file: Option<std::path::PathBuf>) -> Dashboard {
    Dashboard::default()
        .with_log(Arc::new(InspectLog::new(config)))
        .with_policy_file(policy_file)
}
