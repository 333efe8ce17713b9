//! The publisher's outbox: the latest unpublished message of each subject,
//! in the order they were produced, drained to NATS by a sender task.
//!
//! The watcher never waits for NATS: it puts each event here and goes on.
//! While NATS is unreachable, a newer event for a subject replaces the
//! older one (messages are level-triggered, so only the latest matters), so
//! memory is bounded by the number of containers. A replaced entry moves to
//! the back, which keeps every message after the ones it may depend on (a
//! container's `up` after a `sync` taken before it started). Each entry
//! keeps its message ID across retries, so a publish whose ack was lost is
//! deduplicated by the stream.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use caddy_fleet_nats::retry::RetryPolicy;
use caddy_fleet_nats::EventPublisher;
use caddy_fleet_schema::Event;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::sink::{EventSink, SinkError};

/// One message waiting to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Position in the outbox (insertion order).
    pub position: u64,
    /// The `Nats-Msg-Id`, fixed at insertion.
    pub id: String,
    pub event: Event,
}

#[derive(Default)]
struct Entries {
    next: u64,
    /// Subject by position.
    order: BTreeMap<u64, String>,
    /// Pending message by subject.
    by_subject: HashMap<String, Pending>,
}

/// Latest-per-subject queue shared by the watcher and the sender.
#[derive(Default)]
pub struct Outbox {
    entries: Mutex<Entries>,
    changed: Notify,
}

impl Outbox {
    /// Queues `event` with message ID `id`, replacing any older message of
    /// the same subject.
    pub fn push(&self, event: Event, id: String) {
        let subject = event.subject();
        if let Ok(mut e) = self.entries.lock() {
            e.next += 1;
            let position = e.next;
            if let Some(old) = e.by_subject.insert(
                subject.clone(),
                Pending {
                    position,
                    id,
                    event,
                },
            ) {
                e.order.remove(&old.position);
            }
            e.order.insert(position, subject);
        }
        self.changed.notify_one();
    }

    /// The oldest pending message, if any.
    pub fn oldest(&self) -> Option<Pending> {
        let e = self.entries.lock().ok()?;
        let (_, subject) = e.order.iter().next()?;
        e.by_subject.get(subject).cloned()
    }

    /// Removes `pending` once stored, unless a newer message replaced it.
    pub fn stored(&self, pending: &Pending) {
        if let Ok(mut e) = self.entries.lock() {
            let subject = pending.event.subject();
            if e.by_subject
                .get(&subject)
                .is_some_and(|p| p.position == pending.position)
            {
                e.by_subject.remove(&subject);
                e.order.remove(&pending.position);
            }
        }
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.order.len()).unwrap_or(0)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until something is pushed (or returns at once if something waits).
    async fn wait(&self) {
        let notified = self.changed.notified();
        if !self.is_empty() {
            return;
        }
        notified.await;
    }
}

/// The watcher's side of the outbox: assigns each event its message ID.
pub struct OutboxSink {
    outbox: std::sync::Arc<Outbox>,
    ids: EventPublisher,
}

impl OutboxSink {
    /// A sink filling `outbox`, naming messages with `ids`' run nonce.
    pub fn new(outbox: std::sync::Arc<Outbox>, ids: EventPublisher) -> Self {
        OutboxSink { outbox, ids }
    }
}

impl EventSink for OutboxSink {
    async fn publish(&mut self, event: &Event) -> Result<(), SinkError> {
        let id = self.ids.next_id();
        self.outbox.push(event.clone(), id);
        Ok(())
    }
}

/// Drains `outbox` into NATS until `shutdown` completes, retrying each
/// message (same ID) with [`RetryPolicy::NATS`] while NATS is unreachable.
/// On shutdown it keeps draining for at most `drain_for` and then stops,
/// whatever a publish in flight is doing: stopping is bounded even with
/// NATS down.
pub async fn run_sender(
    outbox: std::sync::Arc<Outbox>,
    publisher: EventPublisher,
    drain_for: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut retry = RetryPolicy::NATS.start();
    // Set once shutdown began: sending ends then.
    let mut stop_at: Option<Instant> = None;
    let gave_up = |outbox: &Outbox| {
        tracing::warn!(
            left = outbox.len(),
            "Publisher stopping with messages unsent; the next sync carries the truth."
        );
    };
    loop {
        let Some(pending) = outbox.oldest() else {
            if stop_at.is_some() {
                return;
            }
            tokio::select! {
                // Something to send.
                () = outbox.wait() => continue,
                // Stop: nothing is waiting, so nothing is lost.
                () = &mut shutdown => return,
            }
        };
        let until = stop_at.unwrap_or_else(far_future);
        tokio::select! {
            result = publisher.publish_with_id(&pending.event, &pending.id) => match result {
                Ok(_) => {
                    outbox.stored(&pending);
                    retry.reset();
                }
                Err(error) => {
                    let delay = retry.next_delay().unwrap_or(RetryPolicy::NATS.cap);
                    tracing::warn!(subject = %pending.event.subject(), msg_id = %pending.id, %error,
                        retry_in_ms = delay.as_millis() as u64, waiting = outbox.len(),
                        "NATS unreachable; keeping the latest facts and retrying.");
                    tokio::select! {
                        // The pause between attempts.
                        () = tokio::time::sleep(delay) => {}
                        // Shutdown during the pause: start the drain clock.
                        () = &mut shutdown, if stop_at.is_none() => {
                            stop_at = Some(Instant::now() + drain_for);
                        }
                        // The drain time is up.
                        () = tokio::time::sleep_until(until) => {
                            gave_up(&outbox);
                            return;
                        }
                    }
                }
            },
            // Shutdown: give the outbox a bounded time to drain (the
            // publish in flight starts again, with the same message ID).
            () = &mut shutdown, if stop_at.is_none() => {
                stop_at = Some(Instant::now() + drain_for);
            }
            // The drain time is up, whatever the publish in flight is doing.
            () = tokio::time::sleep_until(until), if stop_at.is_some() => {
                gave_up(&outbox);
                return;
            }
        }
    }
}

/// A point no shutdown waits for.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caddy_fleet_schema::{AgentId, AgentSync, ContainerDown};

    fn down(id: &str) -> Event {
        Event::Down(ContainerDown {
            agent: AgentId::new("a").unwrap(),
            id: id.into(),
            observed_at_ms: 0,
        })
    }

    fn sync() -> Event {
        Event::Sync(AgentSync {
            agent: AgentId::new("a").unwrap(),
            host_address: "h".into(),
            containers: vec![],
            observed_at_ms: 0,
        })
    }

    #[test]
    fn keeps_the_latest_per_subject_in_production_order() {
        let outbox = Outbox::default();
        outbox.push(down("x"), "1".into());
        outbox.push(sync(), "2".into());
        outbox.push(down("y"), "3".into());
        outbox.push(down("x"), "4".into());
        assert_eq!(outbox.len(), 3);
        let order: Vec<String> = std::iter::from_fn(|| {
            let p = outbox.oldest()?;
            outbox.stored(&p);
            Some(p.id)
        })
        .collect();
        assert_eq!(order, ["2", "3", "4"]);
    }

    #[test]
    fn a_stored_message_that_was_replaced_meanwhile_stays() {
        let outbox = Outbox::default();
        outbox.push(down("x"), "1".into());
        let sending = outbox.oldest().unwrap();
        outbox.push(down("x"), "2".into());
        outbox.stored(&sending);
        assert_eq!(outbox.oldest().map(|p| p.id), Some("2".to_string()));
    }
}
