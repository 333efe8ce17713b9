//! Where the publisher's events go: NATS JetStream in agent and server
//! mode, an in-process channel in standalone mode and tests.

use std::future::Future;

use caddy_fleet_nats::{EventPublisher, PublishError};
use caddy_fleet_schema::Event;

/// A destination for events that acknowledges each one.
pub trait EventSink {
    /// Stores `event`; returns once it is durable (or handed over).
    fn publish(&mut self, event: &Event) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Why an event could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Nats(#[from] PublishError),
    #[error("the in-process receiver is gone")]
    ChannelClosed,
}

impl EventSink for EventPublisher {
    async fn publish(&mut self, event: &Event) -> Result<(), SinkError> {
        EventPublisher::publish(self, event).await?;
        Ok(())
    }
}

impl EventSink for tokio::sync::mpsc::Sender<Event> {
    async fn publish(&mut self, event: &Event) -> Result<(), SinkError> {
        self.send(event.clone())
            .await
            .map_err(|_| SinkError::ChannelClosed)
    }
}
