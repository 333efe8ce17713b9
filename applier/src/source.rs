//! Where the applier's messages come from.

use std::future::Future;

use caddy_fleet_nats::{ConsumeError, Delivery, DurableSource, LogHealth};

/// An ordered source of log messages.
pub trait LogSource {
    /// The next message, or `None` once the source is finished for good
    /// (a durable consumer never is).
    fn next(&mut self) -> impl Future<Output = Option<Delivery>> + Send;

    /// How many messages wait to be read, if the source knows.
    fn lag(&mut self) -> impl Future<Output = Option<u64>> + Send {
        async { None }
    }

    /// The log's last sequence, if the source can tell (a durable
    /// consumer can lose a delivery in flight and redeliver it only after
    /// `ack_wait`; the log's end shows it is missing).
    fn log_end(&mut self) -> impl Future<Output = Option<u64>> + Send {
        async { None }
    }

    /// How the log stands now: whether it answers (a leader and a majority
    /// of its nodes), and which agents' ingest streams it is not sourcing.
    /// While it does not answer no agent can be heard, and while an
    /// agent's sourcing does not flow that agent cannot: that silence does
    /// not count against `AGENT_TTL`. A source that is not a remote log
    /// always answers and waits for nobody.
    fn log_health(&mut self) -> impl Future<Output = LogHealth> + Send {
        async {
            LogHealth {
                answers: true,
                waiting: Vec::new(),
            }
        }
    }

    /// The log's messages `from..=to`, in order, when the source skipped
    /// them (see [`DurableSource::read_range`]); sources that deliver in
    /// order have none to give.
    fn read_range(
        &mut self,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<Delivery>, ConsumeError>> + Send {
        let _ = (from, to);
        async { Ok(Vec::new()) }
    }
}

impl LogSource for DurableSource {
    async fn next(&mut self) -> Option<Delivery> {
        Some(DurableSource::next(self).await)
    }

    async fn lag(&mut self) -> Option<u64> {
        self.position().await.ok().map(|p| p.pending)
    }

    async fn log_end(&mut self) -> Option<u64> {
        DurableSource::log_end(self).await.ok()
    }

    async fn log_health(&mut self) -> LogHealth {
        DurableSource::log_health(self).await.unwrap_or_default()
    }

    async fn read_range(&mut self, from: u64, to: u64) -> Result<Vec<Delivery>, ConsumeError> {
        DurableSource::read_range(self, from, to).await
    }
}

impl LogSource for tokio::sync::mpsc::Receiver<Delivery> {
    async fn next(&mut self) -> Option<Delivery> {
        self.recv().await
    }
}

/// Events handed over in-process (standalone mode), numbered as they come.
pub struct ChannelSource {
    events: tokio::sync::mpsc::Receiver<caddy_fleet_schema::Event>,
    seq: u64,
}

impl ChannelSource {
    /// A source reading `events`.
    pub fn new(events: tokio::sync::mpsc::Receiver<caddy_fleet_schema::Event>) -> Self {
        ChannelSource { events, seq: 0 }
    }
}

impl LogSource for ChannelSource {
    async fn next(&mut self) -> Option<Delivery> {
        let event = self.events.recv().await?;
        self.seq += 1;
        Some(Delivery::detached(
            self.seq,
            event.subject(),
            event.encode(),
        ))
    }
}
