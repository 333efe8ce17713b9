//! The pure core of caddy-fleet: what travels on the wire, what the applier
//! folds it into, and how container labels become Caddy configuration.
//!
//! Nothing in this crate does I/O, spawns tasks or reads the clock: every
//! function is a deterministic function of its arguments. That is what lets
//! the applier, the debugging commands and the property tests share one fold.
//!
//! - [`event`]: the versioned wire types ([`Event`], [`ContainerFacts`]) and
//!   their typed decoding errors.
//! - [`subject`]: agent IDs and the `fleet.<agent>.…` subjects.
//! - [`state`]: [`RouteState`] and its fold, [`RouteState::apply`].
//! - [`lexer`], [`caddyfile`]: Caddyfile tokens and blocks; parsing,
//!   caddy-docker-proxy's merge, sort and marshalling.
//! - [`template`], [`labels`]: caddy-docker-proxy's label grammar and the
//!   `{{upstreams}}` template.
//! - [`limits`]: the bounds every agent's input is held to.
//! - [`policy`], [`restrict`]: which sites and upstreams each agent may
//!   serve, and the restricted grammar untrusted agents' labels must keep.
//! - [`shard`]: which sites one applier serves when several split a fleet
//!   (`APPLIER_DOMAINS`).
//! - [`routes`]: route tables, their differences, and explanations for people.
//! - [`history`]: what each message of the log changed, in words.
//! - [`dynamic`]: generated proxies' upstreams looked up by DNS
//!   (`UPSTREAMS=dynamic`) instead of listed.
//! - [`translate`]: container facts → one merged Caddyfile, with upstreams
//!   resolved from the facts and bad containers left out.

pub mod caddyfile;
pub mod dynamic;
pub mod event;
pub mod history;
pub mod labels;
pub mod lexer;
pub mod limits;
pub mod policy;
pub mod restrict;
pub mod routes;
pub mod shard;
pub mod state;
pub mod subject;
pub mod template;
pub mod translate;

pub use event::{
    AgentSync, ContainerDown, ContainerFacts, ContainerState, DecodeError, Event, Health,
    Heartbeat, PortBinding, SCHEMA_VERSION,
};
pub use state::{ContainerRecord, RouteState};
pub use subject::{AgentId, InvalidAgentId};
