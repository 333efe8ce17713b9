//! The publisher: watches one host's Docker engine and publishes the facts
//! of its labeled containers to the log. It never talks to Caddy and never
//! translates labels; the applier does both. (It reads which ports the
//! labels proxy to, to wait until a started container listens on them.)
//!
//! - [`config`]: [`PublisherConfig`], who this agent is and what it watches.
//! - [`facts`]: Docker's inspect output → [`caddy_fleet_schema::ContainerFacts`].
//! - [`host`]: the host address default (the default route's interface).
//! - [`ready`]: a started container is reported once it listens.
//! - [`outbox`]: latest-per-subject queue to NATS that survives NATS outages.
//! - [`sink`]: [`EventSink`], where events go (the outbox, or an in-process channel).
//! - [`watch`]: [`watch::run`], the watch loop.

pub use bollard;

pub mod config;
pub mod facts;
pub mod host;
pub mod outbox;
pub mod ready;
pub mod sink;
pub mod watch;

pub use config::{FilterLabel, PublisherConfig};
pub use sink::{EventSink, SinkError};
pub use watch::{run, WatchError};
