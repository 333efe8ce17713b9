//! Reading the log: a durable pull consumer that survives transient errors,
//! and an ordered, read-only replay.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{self, pull, AckPolicy, DeliverPolicy},
    stream::Stream as JsStream,
};
use bytes::Bytes;
use futures::StreamExt;

use crate::retry::{Retry, RetryPolicy};

/// Settings of the applier's durable consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// The durable name; one per applier.
    pub durable_name: String,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Subjects to read (`fleet.>` for everything).
    pub filter_subject: String,
    /// How many delivered messages may wait for an ack. The applier acks
    /// only after a checkpoint, so this bounds the messages between two
    /// checkpoints.
    pub max_ack_pending: i64,
}

impl ConsumerSettings {
    /// Settings for the durable consumer named `durable_name`, reading everything.
    pub fn new(durable_name: impl Into<String>) -> Self {
        ConsumerSettings {
            durable_name: durable_name.into(),
            ack_wait: Duration::from_secs(30),
            filter_subject: format!("{}.>", caddy_fleet_schema::subject::SUBJECT_ROOT),
            max_ack_pending: 50_000,
        }
    }
}

/// Why a consumer could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot create durable consumer {name}: {source}")]
    Create {
        name: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot read stream info: {0}")]
    Info(#[from] jetstream::stream::InfoError),
    #[error("cannot start replay: {0}")]
    Replay(String),
}

/// One message read from the log.
pub struct Delivery {
    /// The stream sequence.
    pub seq: u64,
    /// The subject it was published on.
    pub subject: String,
    /// The raw payload.
    pub payload: Bytes,
    /// When the stream stored it, in milliseconds since the epoch.
    pub published_ms: Option<i64>,
    message: Option<jetstream::Message>,
}

impl Delivery {
    /// A delivery that did not come from NATS (standalone mode, tests):
    /// acking it does nothing.
    pub fn detached(seq: u64, subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Delivery {
            seq,
            subject: subject.into(),
            payload: payload.into(),
            published_ms: None,
            message: None,
        }
    }

    /// Acknowledges this message and, as the consumer acks cumulatively,
    /// every message delivered before it. A failed ack only means a
    /// redelivery, which the fold ignores.
    pub async fn ack(mut self) {
        if let Some(message) = self.message.take() {
            if let Err(error) = message.double_ack().await {
                tracing::warn!(seq = self.seq, %error, "Ack failed; the message will be redelivered and ignored.");
            }
        }
    }
}

fn delivery(message: jetstream::Message, keep: bool) -> Option<Delivery> {
    let (seq, published_ms) = match message.info() {
        Ok(info) => (
            info.stream_sequence,
            Some((info.published.unix_timestamp_nanos() / 1_000_000) as i64),
        ),
        Err(error) => {
            tracing::warn!(%error, "Message without JetStream metadata skipped.");
            return None;
        }
    };
    Some(Delivery {
        seq,
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        published_ms,
        message: keep.then_some(message),
    })
}

/// Where a durable consumer stands on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerPosition {
    /// Every message up to this stream sequence is acknowledged.
    pub ack_floor: u64,
    /// Every message up to this stream sequence was delivered to someone;
    /// unacked ones come back only as redeliveries, after `ack_wait`.
    pub delivered: u64,
    /// Messages not yet delivered.
    pub pending: u64,
}

/// A durable pull consumer that never ends on a transient error.
///
/// [`DurableSource::next`] logs missed heartbeats, pull errors and ended
/// streams, waits with capped backoff and carries on; it only returns when a
/// message arrives, so callers can `select!` on it against a shutdown.
pub struct DurableSource {
    stream: JsStream,
    consumer: consumer::PullConsumer,
    messages: Option<pull::Stream>,
    retry: Retry,
}

impl DurableSource {
    /// Creates (or attaches to) the durable consumer on `stream`.
    pub async fn attach(
        stream: &JsStream,
        settings: &ConsumerSettings,
    ) -> Result<Self, ConsumeError> {
        let config = pull::Config {
            durable_name: Some(settings.durable_name.clone()),
            // Cumulative: one ack after each checkpoint covers everything
            // the checkpoint holds.
            ack_policy: AckPolicy::All,
            max_ack_pending: settings.max_ack_pending,
            ack_wait: settings.ack_wait,
            deliver_policy: DeliverPolicy::All,
            filter_subject: settings.filter_subject.clone(),
            max_deliver: -1,
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(&settings.durable_name, config)
            .await
            .map_err(|source| ConsumeError::Create {
                name: settings.durable_name.clone(),
                source,
            })?;
        Ok(DurableSource {
            stream: stream.clone(),
            consumer,
            messages: None,
            retry: RetryPolicy::NATS.start(),
        })
    }

    /// The stream's last sequence now.
    pub async fn log_end(&self) -> Result<u64, ConsumeError> {
        Ok(self.stream.get_info().await?.state.last_sequence)
    }

    /// How the log stands now: its majority, and the agents whose sourcing
    /// does not flow (see [`crate::stream::log_health`]).
    pub async fn log_health(&self) -> Result<crate::stream::LogHealth, ConsumeError> {
        Ok(crate::stream::log_health(&self.stream.get_info().await?))
    }

    /// The messages `from..=to` of the stream, in order, read past the
    /// durable consumer. A durable consumer does not promise order across
    /// a change of its leader: it can deliver a later message before
    /// earlier ones it will only redeliver after `ack_wait`, and a fold
    /// that ignores what is at or below its last sequence would then lose
    /// them. The caller fills such a gap with this before folding on.
    pub async fn read_range(&self, from: u64, to: u64) -> Result<Vec<Delivery>, ConsumeError> {
        let mut missing = Vec::new();
        if from <= to {
            let filter = format!("{}.>", caddy_fleet_schema::subject::SUBJECT_ROOT);
            replay(&self.stream, &filter, from, Some(to), |d| missing.push(d)).await?;
        }
        Ok(missing)
    }

    /// Where the consumer stands on the stream.
    pub async fn position(&self) -> Result<ConsumerPosition, ConsumeError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| ConsumeError::Replay(e.to_string()))?;
        Ok(ConsumerPosition {
            ack_floor: info.ack_floor.stream_sequence,
            delivered: info.delivered.stream_sequence,
            pending: info.num_pending,
        })
    }

    /// Waits for the next message. Cancel-safe: dropping the future loses
    /// nothing, the message stays with the server.
    pub async fn next(&mut self) -> Delivery {
        loop {
            let messages = match &mut self.messages {
                Some(messages) => messages,
                None => match self.consumer.messages().await {
                    Ok(messages) => self.messages.insert(messages),
                    Err(error) => {
                        tracing::warn!(%error, attempts = self.retry.attempts(), "Cannot open the consumer's message stream; retrying.");
                        self.pause().await;
                        continue;
                    }
                },
            };
            match messages.next().await {
                Some(Ok(message)) => {
                    self.retry.reset();
                    if let Some(delivery) = delivery(message, true) {
                        return delivery;
                    }
                }
                Some(Err(error)) => {
                    // Missed heartbeats, pull errors and the like are
                    // transient: log and keep reading the same stream,
                    // unless the stream itself says it is finished.
                    tracing::warn!(%error, kind = ?error.kind(), "Consumer error; continuing.");
                    if matches!(
                        error.kind(),
                        pull::MessagesErrorKind::ConsumerDeleted
                            | pull::MessagesErrorKind::RequestLimitExceeded
                            | pull::MessagesErrorKind::PushBasedConsumer
                    ) {
                        self.messages = None;
                        self.pause().await;
                    }
                }
                None => {
                    tracing::warn!("Consumer message stream ended; reopening.");
                    self.messages = None;
                    self.pause().await;
                }
            }
        }
    }

    async fn pause(&mut self) {
        self.retry.wait().await;
    }
}

/// Reads the messages with sequences `from..=until` (`until` = the stream's
/// last sequence now, when `None`), in order, with an ephemeral ordered
/// consumer that leaves no trace: no durable is created or moved. Returns
/// the last sequence read up to.
pub async fn replay<F>(
    stream: &JsStream,
    filter_subject: &str,
    from: u64,
    until: Option<u64>,
    mut on_message: F,
) -> Result<u64, ConsumeError>
where
    F: FnMut(Delivery),
{
    let info = stream.get_info().await?;
    let last = until
        .unwrap_or(info.state.last_sequence)
        .min(info.state.last_sequence);
    let from = from.max(info.state.first_sequence).max(1);
    if info.state.messages == 0 || from > last {
        return Ok(last);
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            filter_subject: filter_subject.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| ConsumeError::Replay(e.to_string()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ConsumeError::Replay(e.to_string()))?;
    while let Some(item) = messages.next().await {
        match item {
            Ok(message) => {
                // `pending` counts the filtered messages still to come, so
                // zero means caught up even when the stream's last message
                // is outside the filter.
                let caught_up = message.info().map(|i| i.pending == 0).unwrap_or(false);
                let Some(delivery) = delivery(message, false) else {
                    continue;
                };
                let seq = delivery.seq;
                if seq > last {
                    break;
                }
                on_message(delivery);
                if caught_up || seq >= last {
                    break;
                }
            }
            // The ordered consumer recreates itself after gaps and
            // heartbeats it missed; keep reading.
            Err(error) => tracing::warn!(%error, "Replay error; continuing."),
        }
    }
    Ok(last)
}

/// The sequence of the first message stored at or after `time` (unix
/// milliseconds), or `None` when every message is older. Read-only.
pub async fn first_seq_at_or_after(
    stream: &JsStream,
    time_ms: i64,
) -> Result<Option<u64>, ConsumeError> {
    let start_time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_ms) * 1_000_000)
            .map_err(|e| ConsumeError::Replay(e.to_string()))?;
    let info = stream.get_info().await?;
    if info.state.messages == 0 {
        return Ok(None);
    }
    // An ephemeral consumer without acks, gone a few seconds after use.
    let consumer: consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|e| ConsumeError::Replay(e.to_string()))?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .map_err(|e| ConsumeError::Replay(e.to_string()))?;
    match batch.next().await {
        Some(Ok(message)) => Ok(message.info().ok().map(|i| i.stream_sequence)),
        _ => Ok(None),
    }
}
