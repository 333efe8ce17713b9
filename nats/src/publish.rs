//! Publishing events with an acknowledgement, retried with the same
//! `Nats-Msg-Id` so that a retry after a lost ack is deduplicated by the
//! stream instead of stored twice.

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use caddy_fleet_schema::{AgentId, Event};

use crate::retry::RetryPolicy;

/// Publishes one agent's events.
///
/// Message IDs are `<agent>.<run nonce>.<counter>`: unique per publisher run,
/// so a restarted publisher never collides with its earlier self, and keyed
/// by agent, so no agent can pre-empt another's IDs.
pub struct EventPublisher {
    js: jetstream::Context,
    agent: AgentId,
    nonce: String,
    counter: u64,
    /// Attempts per message before giving up.
    max_attempts: u32,
}

/// Why an event could not be stored.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish to {subject} after {attempts} attempt(s): {source}")]
pub struct PublishError {
    pub subject: String,
    pub attempts: u32,
    #[source]
    pub source: jetstream::context::PublishError,
}

impl PublishError {
    /// What went wrong on the last attempt.
    pub fn kind(&self) -> PublishErrorKind {
        self.source.kind()
    }
}

/// The result of a stored publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The stream sequence of the message.
    pub sequence: u64,
    /// True when the stream already had this message ID (a retry of an
    /// earlier, acknowledged-but-lost publish).
    pub duplicate: bool,
}

impl EventPublisher {
    /// A publisher for `agent`'s events. `nonce` must differ between runs
    /// of the same agent (a random UUID is fine).
    pub fn new(js: jetstream::Context, agent: AgentId, nonce: impl Into<String>) -> Self {
        EventPublisher {
            js,
            agent,
            nonce: nonce.into(),
            counter: 0,
            max_attempts: 5,
        }
    }

    /// Sets how many times a message is tried before an error is returned.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The next message ID of this run: `<agent>.<nonce>.<counter>`.
    pub fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("{}.{}.{}", self.agent, self.nonce, self.counter)
    }

    /// Publishes `event` on its subject with a fresh message ID and waits
    /// for the stream's ack.
    pub async fn publish(&mut self, event: &Event) -> Result<Stored, PublishError> {
        let id = self.next_id();
        self.publish_with_id(event, &id).await
    }

    /// Publishes `event` with message ID `id` and waits for the stream's
    /// ack. Transient failures (timeouts, no responders during a leader
    /// election, a broken connection) are retried with capped backoff and
    /// the same ID; so is a later call with the same ID, which the stream
    /// deduplicates within its duplicate window.
    pub async fn publish_with_id(&self, event: &Event, id: &str) -> Result<Stored, PublishError> {
        let subject = event.subject();
        let payload = bytes::Bytes::from(event.encode());
        let mut retry = RetryPolicy::NATS.start();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            let result = match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            match result {
                Ok(ack) => {
                    return Ok(Stored {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    })
                }
                Err(source) if attempt < self.max_attempts && is_transient(source.kind()) => {
                    tracing::warn!(%subject, msg_id = %id, attempt, error = %source, "Publish failed, retrying with the same message ID.");
                    retry.wait().await;
                }
                Err(source) => {
                    return Err(PublishError {
                        subject,
                        attempts: attempt,
                        source,
                    })
                }
            }
        }
    }
}

fn is_transient(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::Other
    )
}
