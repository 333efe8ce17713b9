//! Where the applier's messages come from.

use std::future::Future;

use caddy_fleet_nats::{Delivery, DurableSource};

/// An ordered source of log messages.
pub trait LogSource {
    /// The next message, or `None` once the source is finished for good
    /// (a durable consumer never is).
    fn next(&mut self) -> impl Future<Output = Option<Delivery>> + Send;
}

impl LogSource for DurableSource {
    async fn next(&mut self) -> Option<Delivery> {
        Some(DurableSource::next(self).await)
    }
}

impl LogSource for tokio::sync::mpsc::Receiver<Delivery> {
    async fn next(&mut self) -> Option<Delivery> {
        self.recv().await
    }
}
