//! The applier's loop: consume → fold → coalesce → push.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet_nats::async_nats::jetstream::stream::Stream as JsStream;
use caddy_fleet_nats::consume::{replay, ConsumeError};
use caddy_fleet_schema::caddyfile::{Caddyfile, ParseError};
use caddy_fleet_schema::translate::{translate_state, TranslateOptions};
use caddy_fleet_schema::{Event, RouteState};
use serde_json::Value;
use tokio::time::Instant;

use crate::caddy::{CaddyAdmin, CaddyError};
use crate::config::ApplierConfig;
use crate::source::LogSource;
use crate::telemetry::Stats;

/// Why the applier stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplierError {
    #[error("invalid Caddy admin URL {url:?}: {source}")]
    CaddyClient { url: String, source: reqwest::Error },
    #[error("the base Caddyfile (CADDY_BASE_CADDYFILE) cannot be read: {0}")]
    BaseCaddyfile(#[from] ParseError),
    #[error(transparent)]
    Rebuild(#[from] ConsumeError),
}

/// Folds every message the stream holds now into a fresh state: how an
/// applier without a checkpoint recovers what its durable consumer already
/// acknowledged. Read-only: it creates no durable consumer.
pub async fn rebuild(stream: &JsStream, stats: &Stats) -> Result<RouteState, ApplierError> {
    let mut state = RouteState::default();
    let filter = format!("{}.>", caddy_fleet_schema::subject::SUBJECT_ROOT);
    replay(stream, &filter, |delivery| {
        fold(
            &mut state,
            stats,
            delivery.seq,
            &delivery.subject,
            &delivery.payload,
        )
    })
    .await?;
    tracing::info!(
        last_seq = state.last_seq,
        containers = state.live_containers().count(),
        "State rebuilt from the stream."
    );
    Ok(state)
}

fn fold(state: &mut RouteState, stats: &Stats, seq: u64, subject: &str, payload: &[u8]) {
    match Event::decode(payload) {
        Ok(event) => {
            state.apply(seq, &event);
            stats.folded();
        }
        Err(error) => {
            state.skip(seq);
            stats.decode_failed(seq, subject, &error);
        }
    }
}

/// The Caddyfile for `state`: the user's base with every container's
/// blocks merged in, and how many top-level blocks it has.
pub fn render(
    state: &RouteState,
    base: Option<&Caddyfile>,
    options: &TranslateOptions,
    stats: &Stats,
) -> (String, usize) {
    let translation = translate_state(state, base, options);
    let blocks = translation.caddyfile.blocks.len();
    stats.rendered(translation.rejected);
    (translation.caddyfile.marshal(), blocks)
}

/// Runs the applier until `shutdown` completes (or the source ends).
///
/// Every message is folded and then acked; Caddy is converged from the
/// state separately, once a burst has settled, and only when the generated
/// Caddyfile differs from the one Caddy last accepted. A failed push is
/// retried with capped backoff while consumption goes on.
pub async fn run<S: LogSource>(
    mut source: S,
    mut state: RouteState,
    config: ApplierConfig,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApplierError> {
    tokio::pin!(shutdown);
    let caddy =
        CaddyAdmin::new(&config.caddy_admin_url).map_err(|source| ApplierError::CaddyClient {
            url: config.caddy_admin_url.clone(),
            source,
        })?;
    let base = config
        .base_caddyfile
        .as_deref()
        .map(Caddyfile::parse)
        .transpose()?;
    let mut pushed: Option<String> = None;
    // When to push next; `None` while Caddy is converged. The first push
    // happens at once, so a restarted applier re-asserts its state.
    let mut push_at: Option<Instant> = Some(Instant::now());
    let mut burst_started: Option<Instant> = None;
    let mut retry = Duration::from_millis(250);
    loop {
        let deadline = push_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // A message from the log: fold it, ack it, and (re)start the
            // quiet window, bounded by the burst's maximum delay.
            delivery = source.next() => {
                let Some(delivery) = delivery else { return Ok(()) };
                fold(&mut state, &stats, delivery.seq, &delivery.subject, &delivery.payload);
                delivery.ack().await;
                let now = Instant::now();
                let started = *burst_started.get_or_insert(now);
                push_at = Some((now + config.quiet_window).min(started + config.max_delay));
            }
            // The burst settled (or a retry is due): converge Caddy.
            () = tokio::time::sleep_until(deadline), if push_at.is_some() => {
                burst_started = None;
                match converge(&caddy, &state, base.as_ref(), &config, &stats, &mut pushed).await {
                    Ok(()) => {
                        push_at = None;
                        retry = Duration::from_millis(250);
                    }
                    Err(error) => {
                        stats.push_failed(&error, retry);
                        push_at = Some(Instant::now() + retry);
                        retry = (retry * 2).min(Duration::from_secs(10));
                    }
                }
            }
            // Shutdown: stop between two messages; everything folded is acked.
            () = &mut shutdown => return Ok(()),
        }
    }
}

/// Pushes the config for `state` unless Caddy already runs it.
async fn converge(
    caddy: &CaddyAdmin,
    state: &RouteState,
    base: Option<&Caddyfile>,
    config: &ApplierConfig,
    stats: &Stats,
    pushed: &mut Option<String>,
) -> Result<(), CaddyError> {
    let (caddyfile, sites) = render(state, base, &config.translate, stats);
    if pushed.as_deref() == Some(caddyfile.as_str()) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut json = caddy.adapt(&caddyfile).await?;
    if !json.is_object() {
        json = Value::Object(Default::default());
    }
    // Keep Caddy's admin endpoint where it is: a config without `admin`
    // would move it back to localhost inside Caddy's container.
    if json.get("admin").is_none() {
        if let Some(admin) = caddy.running_admin().await? {
            json["admin"] = admin;
        }
    }
    caddy.load(&json).await?;
    stats.pushed(started.elapsed(), sites);
    *pushed = Some(caddyfile);
    Ok(())
}
