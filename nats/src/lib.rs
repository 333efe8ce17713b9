//! caddy-fleet's NATS JetStream edge: everything that talks to NATS.
//!
//! - [`connect`]: connection settings (URLs, token, user/password, creds
//!   file, TLS) and [`connect::connect`].
//! - [`stream`]: idempotent creation of the `CADDY_FLEET` log with the
//!   settings the design requires (rollup, delete and purge denied) and of
//!   each agent's bounded ingest stream, which the log sources.
//! - [`provision`]: creates an agent's ingest stream when it is first heard.
//! - [`sources`]: the log's owner restarts the sourcing of an ingest stream
//!   that stalled (after a leader change or a partition).
//! - [`publish`]: [`publish::EventPublisher`], publish-with-ack that retries
//!   with the same `Nats-Msg-Id`, so a retry after a lost ack is deduplicated.
//! - [`consume`]: [`consume::DurableSource`], a durable pull consumer whose
//!   `next()` survives transient errors, and [`consume::replay`], an
//!   ordered, read-only pass over the stream.

pub mod connect;
pub mod consume;
pub mod provision;
pub mod publish;
pub mod retry;
pub mod sources;
pub mod stream;

pub use async_nats;
pub use connect::{connect, ConnectError, NatsAuth, NatsConfig, NatsTls};
pub use consume::{ConsumeError, ConsumerPosition, ConsumerSettings, Delivery, DurableSource};
pub use publish::{EventPublisher, PublishError};
pub use stream::{ensure_agent_stream, ensure_stream, LogHealth, StreamError, StreamSettings};
