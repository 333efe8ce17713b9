//! The watch loop: Docker events and listings → facts on the log.
//!
//! Each session with the Docker engine opens the event stream with
//! `since=<now>` *before* listing containers, so a container that starts
//! between the two is seen by the events, then publishes every watched
//! container and a `sync`. When the stream fails or ends, the loop waits
//! ([`RetryPolicy::DOCKER`](caddy_fleet_nats::retry::RetryPolicy::DOCKER)) and starts a new session, which re-syncs.
//!
//! A started container's facts wait until it listens ([`crate::ready`]);
//! its probe is a task of the watcher's, whose end the session hears
//! like a Docker event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptionsBuilder};
use bollard::Docker;
use caddy_fleet_schema::{
    AgentSync, ContainerDown, ContainerFacts, ContainerState, Event, Heartbeat,
};
use futures::StreamExt;

use caddy_fleet_nats::retry::RetryPolicy;

use crate::config::PublisherConfig;
use crate::facts::{from_inspect, is_stop_intent, is_watched};
use crate::ready::{wait_listening, ProbeTargets, Readiness};
use crate::sink::EventSink;

/// Events that can change what the applier should route: container
/// lifecycle, health, renames, and network (dis)connections, which change
/// a container's addresses.
const EVENTS: [&str; 11] = [
    "start",
    "die",
    "stop",
    "kill",
    "destroy",
    "pause",
    "unpause",
    "health_status",
    "rename",
    "connect",
    "disconnect",
];

/// Longest wait for one Docker API call (list, inspect).
const DOCKER_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the watch loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the event sink is closed")]
    SinkClosed,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Watches `docker` and publishes into `sink` until `shutdown` completes.
///
/// Stopping the publisher publishes nothing: its containers keep running,
/// so their routes must stay.
pub async fn run<S: EventSink>(
    docker: Docker,
    config: PublisherConfig,
    mut sink: S,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatchError> {
    tokio::pin!(shutdown);
    let mut watcher = Watcher {
        docker,
        config,
        known: BTreeSet::new(),
        stopping: BTreeMap::new(),
        probing: BTreeMap::new(),
        listening: BTreeMap::new(),
        probes: tokio::task::JoinSet::new(),
    };
    let mut retry = RetryPolicy::DOCKER.start();
    loop {
        let session_started = tokio::time::Instant::now();
        tokio::select! {
            // A session ends only when Docker's stream fails or ends.
            result = watcher.session(&mut sink) => {
                result?;
                // A session that lasted is a new run of failures.
                if session_started.elapsed() > RetryPolicy::DOCKER.cap {
                    retry.reset();
                }
            }
            // Shutdown: stop between two steps; nothing is published.
            () = &mut shutdown => return Ok(()),
        }
        let delay = retry.next_delay().unwrap_or(RetryPolicy::DOCKER.cap);
        tracing::warn!(
            retry_in_ms = delay.as_millis() as u64,
            "Docker event stream ended; reconnecting."
        );
        tokio::select! {
            // The pause before reconnecting.
            () = tokio::time::sleep(delay) => {}
            // Shutdown while paused.
            () = &mut shutdown => return Ok(()),
        }
    }
}

struct Watcher {
    docker: Docker,
    config: PublisherConfig,
    /// IDs of containers whose `up` was published and not yet followed by a `down`.
    known: BTreeSet<String>,
    /// IDs of running containers Docker was asked to stop (a `kill` event
    /// with a stop signal) that have not died or started since: published
    /// as `stopping`, so their upstreams are withdrawn while they finish
    /// the requests in flight. The value is Docker's `StartedAt` of the run
    /// that was asked to stop: a container found started again (an event
    /// missed while the stream was down) is no longer stopping.
    stopping: BTreeMap<String, Option<String>>,
    /// IDs of started containers held back until they listen, with the
    /// `StartedAt` of the run being probed.
    probing: BTreeMap<String, Option<String>>,
    /// IDs of containers whose run (by `StartedAt`) was found listening,
    /// or was let through without waiting.
    listening: BTreeMap<String, Option<String>>,
    /// The probes running, each ending with what it found.
    probes: tokio::task::JoinSet<Probed>,
}

/// A probe's end, for the container run it was started for.
struct Probed {
    id: String,
    started_at: Option<String>,
    readiness: Readiness,
}

impl Watcher {
    /// One session with the Docker engine: list, sync, then follow events.
    /// Returns `Ok` when the event stream fails or ends.
    async fn session<S: EventSink>(&mut self, sink: &mut S) -> Result<(), WatchError> {
        let since = (now_ms() / 1000).to_string();
        // No label filter here: Docker would apply it to network events
        // too, whose labels are the network's. Labels are checked below.
        let mut filters: HashMap<String, Vec<String>> = HashMap::new();
        filters.insert("type".into(), vec!["container".into(), "network".into()]);
        filters.insert(
            "event".into(),
            EVENTS.iter().map(|e| e.to_string()).collect(),
        );
        // Lazy: the request goes out on the first poll, and `since` makes
        // Docker replay whatever happened from now on, listing included.
        let events = self.docker.events(Some(EventsOptions {
            since: Some(since),
            until: None,
            filters: Some(filters),
        }));
        tokio::pin!(events);

        // A heartbeat first: it is what makes the applier create this
        // agent's ingest stream, if it has none yet, before any facts.
        self.heartbeat(sink).await?;

        let mut list_filters: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(filter) = &self.config.filter_label {
            list_filters.insert("label".into(), vec![filter.docker_filter()]);
        }
        let list = ListContainersOptionsBuilder::default()
            .filters(&list_filters)
            .build();
        let listed = match tokio::time::timeout(
            DOCKER_CALL_TIMEOUT,
            self.docker.list_containers(Some(list)),
        )
        .await
        {
            Ok(Ok(listed)) => listed,
            Ok(Err(error)) => {
                tracing::warn!(%error, "Cannot list containers.");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(timeout = ?DOCKER_CALL_TIMEOUT, "Listing containers timed out.");
                return Ok(());
            }
        };
        let mut live = BTreeSet::new();
        let mut watched = BTreeSet::new();
        for summary in listed {
            let (Some(id), Some(labels)) = (summary.id, summary.labels) else {
                continue;
            };
            if !is_watched(&labels, &self.config) {
                continue;
            }
            watched.insert(id.clone());
            if self.refresh(&id, sink).await? {
                live.insert(id);
            }
        }
        self.stopping.retain(|id, _| live.contains(id));
        self.probing.retain(|id, _| watched.contains(id));
        self.listening.retain(|id, _| watched.contains(id));
        self.known = live;
        self.sync(sink).await?;

        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.reset();
        let mut resync = tokio::time::interval(self.config.sync_interval);
        resync.reset();
        loop {
            tokio::select! {
                // A Docker event about a watched container.
                event = events.next() => match event {
                    Some(Ok(event)) => self.on_event(event, sink).await?,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "Docker event stream failed.");
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                // A started container's probe ended: report it now.
                Some(Ok(probed)) = self.probes.join_next(), if !self.probes.is_empty() => {
                    self.on_probed(probed, sink).await?
                }
                // Liveness for the applier.
                _ = heartbeat.tick() => self.heartbeat(sink).await?,
                // Periodic full sync, in case anything was missed.
                _ = resync.tick() => self.sync(sink).await?,
            }
        }
    }

    async fn on_event<S: EventSink>(
        &mut self,
        event: EventMessage,
        sink: &mut S,
    ) -> Result<(), WatchError> {
        let Some(actor) = event.actor else {
            return Ok(());
        };
        if event.typ == Some(EventMessageTypeEnum::NETWORK) {
            // A watched container joined or left a network: its addresses changed.
            let container = actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("container"))
                .cloned();
            if let Some(id) = container.filter(|id| self.known.contains(id)) {
                tracing::debug!(container = %id, action = ?event.action, "Network event.");
                self.refresh(&id, sink).await?;
            }
            return Ok(());
        }
        let Some(id) = actor.id else { return Ok(()) };
        let action = event.action.unwrap_or_default();
        tracing::debug!(container = %id, %action, "Docker event.");
        if matches!(action.as_str(), "die" | "start" | "destroy") {
            // Stopped, or started again: whatever was asked is over, and
            // whether the last run listened no longer says anything.
            self.stopping.remove(&id);
            self.probing.remove(&id);
            self.listening.remove(&id);
        }
        if action == "destroy" {
            if self.known.remove(&id) {
                let down = Event::Down(ContainerDown {
                    agent: self.config.agent.clone(),
                    id,
                    observed_at_ms: now_ms(),
                });
                self.send(&down, sink).await?;
            }
            return Ok(());
        }
        let labels = actor.attributes.unwrap_or_default();
        if !self.known.contains(&id) && !is_watched(&labels, &self.config) {
            return Ok(());
        }
        let kill_signal = match action.as_str() {
            "kill" => labels.get("signal").map(String::as_str),
            _ => None,
        };
        if self.refresh_after(&id, kill_signal, sink).await? {
            self.known.insert(id);
        }
        Ok(())
    }

    /// Inspects one container and publishes its facts (or its removal).
    /// Returns whether the container exists and is watched.
    async fn refresh<S: EventSink>(&mut self, id: &str, sink: &mut S) -> Result<bool, WatchError> {
        self.refresh_after(id, None, sink).await
    }

    /// [`Self::refresh`] after a `kill` event with `kill_signal`, if any: a
    /// signal that asks the container to stop marks it `stopping` until it
    /// dies or starts again.
    async fn refresh_after<S: EventSink>(
        &mut self,
        id: &str,
        kill_signal: Option<&str>,
        sink: &mut S,
    ) -> Result<bool, WatchError> {
        let inspected = match tokio::time::timeout(
            DOCKER_CALL_TIMEOUT,
            self.docker.inspect_container(id, None),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(container = %id, timeout = ?DOCKER_CALL_TIMEOUT, "Inspecting container timed out.");
                return Ok(false);
            }
        };
        match inspected {
            Ok(inspect) => match from_inspect(&inspect, &self.config, now_ms()) {
                Some(mut facts) => {
                    let started_at = inspect.state.as_ref().and_then(|s| s.started_at.clone());
                    if kill_signal.is_some_and(|signal| is_stop_intent(&inspect, signal)) {
                        self.stopping.insert(id.to_string(), started_at.clone());
                    }
                    if self.stopping.get(id).is_some_and(|run| run != &started_at) {
                        self.stopping.remove(id);
                    }
                    if facts.state == ContainerState::Running && self.stopping.contains_key(id) {
                        facts.state = ContainerState::Stopping;
                    }
                    let exposed = inspect
                        .config
                        .as_ref()
                        .and_then(|c| c.exposed_ports.as_deref());
                    if facts.state == ContainerState::Running
                        && self.held_until_listening(
                            &facts,
                            &started_at,
                            exposed.unwrap_or_default(),
                        )
                    {
                        // Reported when its probe ends; until then the
                        // applier keeps whatever it had of it.
                        return Ok(self.known.contains(id));
                    }
                    let up = Event::Up(facts);
                    if let Err(error) = up.check_bounds(&self.config.label_prefix) {
                        // The applier would refuse it: say so here, where
                        // the container's owner looks, and publish nothing.
                        tracing::warn!(container = %id, %error, "Container not published: its labels exceed caddy-fleet's bounds.");
                        return Ok(false);
                    }
                    self.send(&up, sink).await?;
                    Ok(true)
                }
                None => Ok(false),
            },
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                self.stopping.remove(id);
                self.probing.remove(id);
                self.listening.remove(id);
                if self.known.remove(id) {
                    let down = Event::Down(ContainerDown {
                        agent: self.config.agent.clone(),
                        id: id.to_string(),
                        observed_at_ms: now_ms(),
                    });
                    self.send(&down, sink).await?;
                }
                Ok(false)
            }
            Err(error) => {
                tracing::warn!(container = %id, %error, "Cannot inspect container.");
                Ok(false)
            }
        }
    }

    /// Whether the running `facts` wait for their container to listen: a
    /// probe of this run is started if none is, unless the run was found
    /// listening already or there is nothing to probe.
    fn held_until_listening(
        &mut self,
        facts: &ContainerFacts,
        started_at: &Option<String>,
        exposed: &[String],
    ) -> bool {
        let id = &facts.id;
        if self.listening.get(id) == Some(started_at) {
            return false;
        }
        if self.probing.get(id) == Some(started_at) {
            return true;
        }
        let targets = ProbeTargets::of(facts, &self.config.label_prefix, exposed);
        if self.config.ready_timeout.is_zero() || targets.is_empty() {
            self.listening.insert(id.clone(), started_at.clone());
            return false;
        }
        tracing::debug!(container = %id, ?targets, "Waiting until the container listens.");
        self.probing.insert(id.clone(), started_at.clone());
        let (id, started_at, timeout) = (id.clone(), started_at.clone(), self.config.ready_timeout);
        self.probes.spawn(async move {
            let readiness = wait_listening(targets, timeout).await;
            Probed {
                id,
                started_at,
                readiness,
            }
        });
        true
    }

    /// Reports a container whose probe ended, if the probe is of its
    /// current run.
    async fn on_probed<S: EventSink>(
        &mut self,
        probed: Probed,
        sink: &mut S,
    ) -> Result<(), WatchError> {
        let Probed {
            id,
            started_at,
            readiness,
        } = probed;
        if self.probing.get(&id) != Some(&started_at) {
            return Ok(());
        }
        self.probing.remove(&id);
        match readiness {
            Readiness::Listening => {
                tracing::debug!(container = %id, "The container listens.")
            }
            Readiness::Unreachable => {
                tracing::debug!(container = %id, "The container's addresses are unreachable from here; reporting it without waiting.")
            }
            Readiness::TimedOut { port } => tracing::warn!(
                container = %id,
                port,
                timeout = ?self.config.ready_timeout,
                "The container does not accept connections on a port its labels proxy to; reporting it anyway. Check the port in its labels, or raise READY_TIMEOUT if it starts slowly."
            ),
        }
        self.listening.insert(id.clone(), started_at);
        if self.refresh(&id, sink).await? {
            self.known.insert(id);
        }
        Ok(())
    }

    async fn heartbeat<S: EventSink>(&mut self, sink: &mut S) -> Result<(), WatchError> {
        let hb = Event::Heartbeat(Heartbeat {
            agent: self.config.agent.clone(),
            sent_at_ms: now_ms(),
        });
        self.send(&hb, sink).await
    }

    async fn sync<S: EventSink>(&mut self, sink: &mut S) -> Result<(), WatchError> {
        let sync = Event::Sync(AgentSync {
            agent: self.config.agent.clone(),
            host_address: self.config.host_address.clone(),
            // Containers being probed too: the applier keeps what it has
            // of them (an earlier run's facts, a previous publisher's).
            containers: self
                .known
                .iter()
                .chain(self.probing.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .cloned()
                .collect(),
            observed_at_ms: now_ms(),
        });
        if let Err(error) = sync.check_bounds(&self.config.label_prefix) {
            tracing::error!(containers = self.known.len(), %error, "Sync not published: this host has more labeled containers than one sync can list.");
            return Ok(());
        }
        self.send(&sync, sink).await
    }

    async fn send<S: EventSink>(&mut self, event: &Event, sink: &mut S) -> Result<(), WatchError> {
        match sink.publish(event).await {
            Ok(()) => {
                tracing::debug!(subject = %event.subject(), "Published.");
                Ok(())
            }
            Err(crate::SinkError::ChannelClosed) => Err(WatchError::SinkClosed),
            Err(error) => {
                // Only a sink that stores synchronously fails here (the
                // outbox never does); the next sync carries the truth again.
                tracing::error!(subject = %event.subject(), %error, "Publish failed; dropping this update.");
                Ok(())
            }
        }
    }
}
