//! The convergence task: bring Caddy to the newest state, and keep it there.
//!
//! Pushing starts at once: the first change after a quiet period is pushed
//! immediately. Changes that arrive while a push is in flight are not
//! pushed one by one: the next push starts as soon as the previous one
//! ends, from the newest state, so bursts batch themselves by the push
//! duration instead of a fixed window. A failed push is retried with
//! [`RetryPolicy::CADDY`] (always from the newest state); periodically the
//! task checks that Caddy still runs the pushed config and re-reads the
//! policy file.
//!
//! Every wait (the next change, a retry, the health tick, SIGHUP) is one
//! `select!`; a push in flight is the only other thing the task does, and
//! consumption goes on meanwhile (see [`crate::consumption`]). When nothing
//! is due, the same `select!` adapts sites alone a step at a time (after a
//! restart, say), so later pushes are composed instead of adapted whole
//! (see [`crate::compose`]); a change arriving stops that step.

use std::time::Duration;

use caddy_fleet_nats::retry::{Retry, RetryPolicy};
use caddy_fleet_schema::routes::route_rows;
use caddy_fleet_schema::translate::{
    translate_owned_cached, ContainerUnit, SiteOwners, TranslationCache,
};
use tokio::time::Instant;

use crate::caddy::CaddyApi;
use crate::config::ApplierConfig;
use crate::consumption::{Snapshot, StateHandle};
use crate::converge::{Converger, Outcome};
use crate::memory::MemoryTrim;
use crate::policy::{self, PolicyWatch};
use crate::status::{ContainerRef, RejectedView, StatusBoard};
use crate::upstream_dns::{AnswerBoard, UpstreamAnswers};

/// Runs convergence until consumption stops (or forever; the caller
/// aborts it once consumption has stopped).
pub async fn run<C: CaddyApi>(
    mut converger: Converger<C>,
    mut handle: StateHandle,
    mut config: ApplierConfig,
    board: &StatusBoard,
    answers: Option<AnswerBoard>,
) {
    let stats = &board.stats;
    let mut owners = SiteOwners::new();
    let mut cache = TranslationCache::default();
    let mut retry = RetryPolicy::CADDY.start();
    // The first push happens at once, so a restarted applier re-asserts
    // its state.
    let mut due = true;
    let mut retry_at: Option<Instant> = None;
    let mut policy_watch = config.policy_file.clone().map(PolicyWatch::new);
    let mut hangups = hangups();
    if !config.translate.policy.from_file() {
        tracing::warn!("No POLICY_FILE: only the local agent's containers are served; remote agents' containers are refused until a policy grants them (see SECURITY.md).");
    }
    if let Some(shard) = &config.translate.shard {
        tracing::info!(patterns = ?shard.patterns(), "Serving only the sites these host patterns match (APPLIER_DOMAINS).");
        board.update(|v| v.shard = Some(shard.patterns().to_vec()));
    }
    let mut trim = MemoryTrim::default();
    let mut health = tokio::time::interval(config.health_check_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.reset();
    loop {
        if due && retry_at.is_none_or(|at| at <= Instant::now()) {
            let Some(snapshot) = handle.snapshot().await else {
                return;
            };
            let started = std::time::Instant::now();
            let (units, outside) = render(&snapshot, &config, &mut owners, &mut cache, stats);
            let rendered_in = started.elapsed();
            // Dynamic upstreams: the answers first, so a site the push adds
            // resolves from its first request, and a deploy that leaves the
            // config as it is needs nothing else.
            if let Some(answers) = &answers {
                publish_answers(answers, UpstreamAnswers::of_units(&units), stats);
            }
            let converged = converger.converge(&units).await;
            if let Some(answers) = &answers {
                // Containers Caddy or the policy check refused answer nothing.
                let accepted = converger.accepted_ids();
                let kept = units
                    .iter()
                    .filter(|u| accepted.contains(u.container_id.as_str()));
                publish_answers(answers, UpstreamAnswers::of_units(kept), stats);
            }
            stats.composed(converger.take_compose_report());
            match converged {
                Ok(outcome) => {
                    let took = started.elapsed();
                    let latency = snapshot.changed_since.map(|t| t.elapsed());
                    stats.converged(
                        matches!(outcome, Outcome::Pushed { .. }),
                        took,
                        latency,
                        units.len(),
                        rendered_in,
                        converger.last_stages(),
                    );
                    due = false;
                    retry_at = None;
                    retry.reset();
                }
                Err(error) => {
                    let delay = next_delay(&mut retry);
                    stats.push_failed(&error, delay);
                    retry_at = Some(Instant::now() + delay);
                }
            }
            let converged = !due && !handle.has_changed();
            publish_status(board, &snapshot, &units, outside, &converger, converged);
            drop((snapshot, units));
            trim.after_convergence();
            continue;
        }
        let retry_deadline = retry_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let refused_retry = converger.refused_retry_at();
        tokio::select! {
            // The state changed: push it (at once, or when the retry is due).
            alive = handle.changed() => {
                if !alive {
                    return;
                }
                due = true;
                board.update(|v| v.converged = false);
            }
            // Between pushes: adapt sites alone, so later pushes compose
            // the config instead of adapting it whole.
            warmed = converger.warm(), if !due && retry_at.is_none() && converger.wants_warming() => {
                stats.composed(converger.take_compose_report());
                if let Err(error) = warmed {
                    tracing::debug!(%error, "Adapting sites alone failed; the next push adapts what it needs.");
                }
            }
            // A failed push is due again.
            () = tokio::time::sleep_until(retry_deadline), if retry_at.is_some() => {
                retry_at = None;
            }
            // A container Caddy could not listen for is due to be tried
            // again (once: a push already due tries it).
            () = tokio::time::sleep_until(refused_retry.unwrap_or(retry_deadline)), if refused_retry.is_some() && !due => {
                due = true;
            }
            // SIGHUP: re-read the policy now.
            Some(()) = hangups.recv() => {
                if let Some(watch) = &mut policy_watch {
                    watch.changed();
                    due |= reload_policy(watch, &mut config);
                }
            }
            // Periodically: did the policy file change, does Caddy still
            // run our config; memory a recent push freed goes back.
            _ = health.tick() => {
                trim.if_pending();
                if let Some(watch) = &mut policy_watch {
                    if watch.changed() && reload_policy(watch, &mut config) {
                        due = true;
                    }
                }
                if !due {
                    match converger.still_running().await {
                        Ok(true) => {}
                        Ok(false) => {
                            stats.caddy_lost_config();
                            converger.invalidate();
                            due = true;
                        }
                        // Caddy is busy (a long load, perhaps another
                        // client's), not gone: pushing again would only
                        // queue another load behind it.
                        Err(error) if error.timed_out() => stats.caddy_check_timed_out(&error),
                        Err(error) => {
                            let delay = next_delay(&mut retry);
                            stats.push_failed(&error, delay);
                            converger.invalidate();
                            due = true;
                            retry_at = Some(Instant::now() + delay);
                        }
                    }
                }
            }
        }
    }
}

/// Serves `new` from now on, counting it when it changed.
fn publish_answers(board: &AnswerBoard, new: UpstreamAnswers, stats: &crate::telemetry::Stats) {
    let (names, upstreams) = (new.names(), new.upstreams());
    if board.publish(new) {
        stats.answers_changed(names, upstreams);
    }
}

/// Caddy is retried for as long as it takes: it has no deadline.
fn next_delay(retry: &mut Retry) -> Duration {
    retry.next_delay().unwrap_or(RetryPolicy::CADDY.cap)
}

/// The containers to push, translated from `snapshot` (only those whose
/// facts changed are translated again) and cut to this applier's shard,
/// and how many site addresses the shard leaves to others.
fn render(
    snapshot: &Snapshot,
    config: &ApplierConfig,
    owners: &mut SiteOwners,
    cache: &mut TranslationCache,
    stats: &crate::telemetry::Stats,
) -> (Vec<ContainerUnit>, usize) {
    let (units, label_rejects, new_owners) = translate_owned_cached(
        &snapshot.state,
        &config.translate,
        &snapshot.expired,
        owners,
        cache,
    );
    *owners = new_owners;
    stats.rendered(label_rejects);
    // Ownership was decided on every container above, the same in every
    // shard; only then are other shards' sites set aside.
    match &config.translate.shard {
        Some(shard) => {
            let (units, outside) = shard.keep(units);
            (units, outside.iter().map(|o| o.addresses.len()).sum())
        }
        None => (units, 0),
    }
}

/// Re-reads the policy file into `config`; on error keeps the policy in
/// force. Returns whether the policy changed.
fn reload_policy(watch: &PolicyWatch, config: &mut ApplierConfig) -> bool {
    match policy::load(watch.path()) {
        Ok(policy) => {
            let local = config.translate.policy.local().cloned();
            let policy = policy.with_local(local);
            if policy == config.translate.policy {
                return false;
            }
            tracing::info!(path = %watch.path().display(), "Policy reloaded.");
            config.translate.policy = policy;
            true
        }
        Err(error) => {
            tracing::error!(%error, "Policy not reloaded; the policy in force is kept.");
            false
        }
    }
}

/// SIGHUPs as a channel (never sends where there are no Unix signals).
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                if tx.send(()).await.is_err() {
                    break;
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Publishes what Caddy runs: the routes of the accepted containers, and
/// every container left out with the reason.
fn publish_status<C: CaddyApi>(
    board: &StatusBoard,
    snapshot: &Snapshot,
    units: &[ContainerUnit],
    sites_outside_shard: usize,
    converger: &Converger<C>,
    converged: bool,
) {
    // The routes Caddy runs: the state's table, limited to the containers
    // in the accepted config (not refused, not of an expired agent).
    let accepted = converger.accepted_ids();
    let mut routes = route_rows(&snapshot.state, units);
    for row in &mut routes {
        row.containers.retain(|c| {
            accepted.contains(c.container_id.as_str())
                && !snapshot.expired.iter().any(|a| a.as_str() == c.agent)
        });
    }
    routes.retain(|row| !row.containers.is_empty());
    let mut rejected: Vec<RejectedView> = board
        .stats
        .rejected()
        .into_iter()
        .map(|r| RejectedView {
            container: ContainerRef {
                agent: r.agent,
                container: r.container,
                container_id: r.container_id,
            },
            by: r.by.as_str(),
            reason: r.reason,
        })
        .collect();
    rejected.extend(converger.refused().map(|r| RejectedView {
        container: ContainerRef {
            agent: r.agent.clone(),
            container: r.container.clone(),
            container_id: r.container_id.clone(),
        },
        by: if r.by_policy { "policy" } else { "caddy" },
        reason: r.reason.clone(),
    }));
    board.update(|v| {
        v.converged = converged;
        v.last_seq = snapshot.state.last_seq;
        v.routes = routes;
        v.rejected = rejected;
        v.sites_outside_shard = sites_outside_shard;
    });
}
