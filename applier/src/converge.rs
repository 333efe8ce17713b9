//! Converging Caddy to the translated state: one whole-config push per
//! change, the admin block kept, a sentinel `@id` to notice a Caddy that
//! lost the config, and isolation of containers whose blocks Caddy refuses.
//!
//! The config pushed is composed from each site's own adapt
//! ([`crate::compose`]), so a push costs adapting what changed; configs it
//! does not reproduce are adapted whole, with the reason counted.
//!
//! Isolation: when Caddy refuses a config, the containers whose blocks
//! changed since the last accepted config are the suspects. They are
//! bisected (each probe: the accepted containers plus a group of suspects)
//! until every refused container is found; each is left out with Caddy's
//! reason, and the rest is pushed. One bad container never blocks the
//! others, and never empties Caddy.
//!
//! A refusal because Caddy could not open a listener (a port another
//! process holds) may not be the container's fault and may not last: such
//! a container is tried again after a backoff ([`LISTEN_RETRY`]) with the
//! same blocks, instead of waiting for them to change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet_nats::retry::RetryPolicy;
use caddy_fleet_schema::caddyfile::{Caddyfile, MarshaledBlock};
use caddy_fleet_schema::translate::{assemble_marshaled, ContainerUnit};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::Instant;

use crate::caddy::{CaddyAdmin, CaddyApi, CaddyError};
use crate::compose::{Composed, Composer, Reason};

/// A container Caddy refused, and Caddy's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedByCaddy {
    pub agent: String,
    pub container: String,
    pub container_id: String,
    pub reason: String,
    /// True when it was refused for what its blocks adapt to (an untrusted
    /// agent's contribution reaching beyond HTTP routes for its sites),
    /// not because Caddy could not load them.
    pub by_policy: bool,
    /// The blocks refused; the container is tried again once they change.
    text: Arc<str>,
    /// When Caddy could not listen for it: when it is tried again anyway,
    /// and how many times in a row that happened.
    listen_retry: Option<(Instant, u32)>,
}

impl RefusedByCaddy {
    /// Whether it stays out of the config at `now`.
    fn holds(&self, now: Instant) -> bool {
        self.listen_retry.is_none_or(|(at, _)| now < at)
    }
}

/// Backoff for a container refused because Caddy could not open a
/// listener: a port held for a moment (a restarting process, another
/// server starting) is tried again soon, one held for good rarely.
pub const LISTEN_RETRY: RetryPolicy =
    RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(300));

/// Whether Caddy's words say it could not open a listener.
fn is_listen_failure(reason: &str) -> bool {
    reason.contains("address already in use")
}

/// What a convergence did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Caddy already ran this config.
    Unchanged,
    /// A config was loaded, after `probes` refused attempts.
    Pushed { probes: usize },
}

/// The applier's view of Caddy.
pub struct Converger<C = CaddyAdmin> {
    caddy: C,
    base: Option<Arc<Caddyfile>>,
    sentinel_prefix: String,
    /// The Caddyfile Caddy last accepted and its sentinel `@id`.
    pushed: Option<(String, String)>,
    /// (container ID, blocks) of every container in the accepted config.
    accepted: BTreeSet<(String, Arc<str>)>,
    /// Containers Caddy refused, by container ID.
    refused: BTreeMap<String, RefusedByCaddy>,
    /// Untrusted containers' blocks already adapted and checked, with the
    /// verdict (a reason when refused).
    checked: BTreeMap<Arc<str>, Option<String>>,
    /// The `admin` block Caddy was running (read once, kept until Caddy is
    /// found to have lost the config): pushes do not ask again.
    running_admin: Option<Option<Value>>,
    /// Each site's adapted share, to compose configs from.
    composer: Composer,
    /// How the configs tried since the last report were made.
    report: ComposeReport,
    /// Where the last config load's time went.
    stages: PushStages,
}

/// Where the time of a push went, up to Caddy answering its `/load`
/// (logged and measured with the push).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStages {
    /// The Caddyfile assembled from the containers and written.
    pub assemble: Duration,
    /// The JSON composed from the sites' shares or adapted whole, sites
    /// adapted alone included.
    pub compose: Duration,
    /// Of `compose`, waiting for Caddy to adapt sites alone.
    pub adapt: Duration,
    /// Caddy's `/load`.
    pub load: Duration,
}

/// How the configs a convergence tried were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComposeReport {
    /// Configs composed from the sites' shares.
    pub composed: u64,
    /// Configs adapted whole, with why.
    pub whole: Vec<Reason>,
    /// Sites (and global options) adapted alone.
    pub site_adapts: u64,
}

/// How many checked texts are remembered before the cache starts over.
const CHECKED_TEXTS: usize = 20_000;

impl<C: CaddyApi> Converger<C> {
    /// A converger for the Caddy at `caddy`, merging into `base`.
    pub fn new(caddy: C, base: Option<Caddyfile>, applier: &str) -> Self {
        Converger {
            caddy,
            base: base.map(Arc::new),
            sentinel_prefix: format!("caddy-fleet-{applier}"),
            pushed: None,
            accepted: BTreeSet::new(),
            refused: BTreeMap::new(),
            checked: BTreeMap::new(),
            running_admin: None,
            composer: Composer::new(),
            report: ComposeReport::default(),
            stages: PushStages::default(),
        }
    }

    /// Where the last config load's time went.
    pub fn last_stages(&self) -> PushStages {
        self.stages
    }

    /// How the configs tried since the last call were made.
    pub fn take_compose_report(&mut self) -> ComposeReport {
        let mut report = std::mem::take(&mut self.report);
        report.site_adapts = std::mem::take(&mut self.composer.site_adapts);
        report
    }

    /// Whether sites wait to be adapted alone between pushes.
    pub fn wants_warming(&self) -> bool {
        self.composer.wants_warming()
    }

    /// Adapts a step of the sites waiting (between pushes), so the next
    /// pushes are composed.
    pub async fn warm(&mut self) -> Result<(), CaddyError> {
        self.composer.warm(&self.caddy).await
    }

    /// Containers Caddy refused at the last convergence.
    pub fn refused(&self) -> impl Iterator<Item = &RefusedByCaddy> {
        self.refused.values()
    }

    /// The container IDs in the config Caddy runs.
    pub fn accepted_ids(&self) -> BTreeSet<&str> {
        self.accepted.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Forgets what Caddy runs, so the next convergence pushes (and reads
    /// Caddy's `admin` block again).
    pub fn invalidate(&mut self) {
        self.pushed = None;
        self.running_admin = None;
    }

    /// Whether Caddy still runs the config last pushed (its sentinel is
    /// there). `Ok(false)` also when nothing was pushed yet.
    pub async fn still_running(&self) -> Result<bool, CaddyError> {
        match &self.pushed {
            Some((_, sentinel)) => self.caddy.has_id(sentinel).await,
            None => Ok(false),
        }
    }

    /// Brings Caddy to the config for `units`.
    pub async fn converge(&mut self, units: &[ContainerUnit]) -> Result<Outcome, CaddyError> {
        // Containers refused before with the same blocks stay out.
        self.refused.retain(|id, r| {
            units
                .iter()
                .any(|u| &u.container_id == id && u.text == r.text)
        });
        // An untrusted container's blocks, adapted alone, may only be HTTP
        // routes for its own sites (checked once per distinct text).
        for unit in units.iter().filter(|u| !u.trusted) {
            if self.refused.contains_key(&unit.container_id) {
                continue;
            }
            let verdict = match self.checked.get(&unit.text) {
                Some(verdict) => verdict.clone(),
                None => {
                    let adapted = self.caddy.adapt(&unit.text).await;
                    let verdict = match adapted {
                        Ok(json) => contribution_problem(&json, unit),
                        // Caddy cannot adapt it: isolation will find out.
                        Err(CaddyError::Refused { .. }) => None,
                        Err(error) => return Err(error),
                    };
                    if self.checked.len() >= CHECKED_TEXTS {
                        self.checked.clear();
                    }
                    self.checked.insert(unit.text.clone(), verdict.clone());
                    verdict
                }
            };
            if let Some(reason) = verdict {
                self.refuse_as(unit, reason, true);
            }
        }
        let now = Instant::now();
        let candidates: Vec<&ContainerUnit> = units
            .iter()
            .filter(|u| {
                !self
                    .refused
                    .get(&u.container_id)
                    .is_some_and(|r| r.holds(now))
            })
            .collect();
        // The same containers with the same blocks make the same text:
        // nothing to merge or compare (with dynamic upstreams, a deploy
        // that keeps its container, or any change of upstreams alone).
        let unchanged = self.pushed.is_some()
            && candidates.len() == self.accepted.len()
            && candidates.iter().all(|u| {
                self.accepted
                    .contains(&(u.container_id.clone(), u.text.clone()))
            });
        if unchanged {
            return Ok(Outcome::Unchanged);
        }
        let assembling = std::time::Instant::now();
        let base = self.base.clone();
        let (blocks, text) = assembled(base.as_deref(), &candidates);
        self.stages.assemble = assembling.elapsed();
        if let Some((pushed, sentinel)) = self.pushed.take_if(|(pushed, _)| pushed == &text) {
            // Caddy runs this text already; the containers making it may
            // differ (with dynamic upstreams a deploy keeps the text), and
            // they are the ones in the config now.
            self.accept(&candidates, pushed, sentinel);
            return Ok(Outcome::Unchanged);
        }
        match self.try_push(&blocks, &text).await {
            Ok(sentinel) => {
                drop(blocks);
                self.accept(&candidates, text, sentinel);
                Ok(Outcome::Pushed { probes: 0 })
            }
            Err(CaddyError::Refused { message, .. }) => {
                tracing::warn!(reason = %message, "Caddy refused the config; isolating the containers that cause it.");
                self.isolate(candidates, message).await
            }
            Err(error) => Err(error),
        }
    }

    /// Finds the containers that make Caddy refuse the config for
    /// `candidates` (which it just refused with `message`), leaves them out
    /// and pushes the rest.
    async fn isolate(
        &mut self,
        candidates: Vec<&ContainerUnit>,
        message: String,
    ) -> Result<Outcome, CaddyError> {
        let (mut good, suspects): (Vec<&ContainerUnit>, Vec<&ContainerUnit>) =
            candidates.into_iter().partition(|u| {
                self.accepted
                    .contains(&(u.container_id.clone(), u.text.clone()))
            });
        let mut probes = 1;
        let mut loaded: Option<(String, String)> = None;
        // The whole set was just refused: start from its halves (or its
        // only member, with the reason already known).
        let mut groups = Vec::new();
        let mut first_refusal = None;
        match suspects.len() {
            0 => {}
            1 => first_refusal = Some(message),
            _ => {
                let mut first = suspects.clone();
                let second = first.split_off(first.len() / 2);
                groups.push(second);
                groups.push(first);
            }
        }
        if let Some(message) = first_refusal {
            self.refuse(suspects[0], message);
        }
        while let Some(group) = groups.pop() {
            if group.is_empty() {
                continue;
            }
            let units: Vec<&ContainerUnit> = good.iter().chain(&group).copied().collect();
            let base = self.base.clone();
            let (blocks, text) = assembled(base.as_deref(), &units);
            match self.try_push(&blocks, &text).await {
                Ok(sentinel) => {
                    good.extend(group);
                    loaded = Some((text, sentinel));
                }
                Err(CaddyError::Refused { message, .. }) if group.len() == 1 => {
                    probes += 1;
                    self.refuse(group[0], message);
                }
                Err(CaddyError::Refused { .. }) => {
                    probes += 1;
                    let mut first = group;
                    let second = first.split_off(first.len() / 2);
                    groups.push(second);
                    groups.push(first);
                }
                Err(error) => return Err(error),
            }
        }
        let (text, sentinel) = match loaded {
            Some(loaded) => loaded,
            // Every suspect was refused: push what was accepted before,
            // unless that is what Caddy runs.
            None => {
                let base = self.base.clone();
                let (blocks, text) = assembled(base.as_deref(), &good);
                match self.pushed.take_if(|(pushed, _)| pushed == &text) {
                    Some(running) => running,
                    None => {
                        let sentinel = self.try_push(&blocks, &text).await?;
                        (text, sentinel)
                    }
                }
            }
        };
        self.accept(&good, text, sentinel);
        Ok(Outcome::Pushed { probes })
    }

    fn refuse(&mut self, unit: &ContainerUnit, reason: String) {
        self.refuse_as(unit, reason, false);
    }

    fn refuse_as(&mut self, unit: &ContainerUnit, reason: String, by_policy: bool) {
        let listen_retry = (!by_policy && is_listen_failure(&reason)).then(|| {
            let failures = match self.refused.get(&unit.container_id) {
                Some(RefusedByCaddy {
                    listen_retry: Some((_, failures)),
                    text,
                    ..
                }) if text == &unit.text => failures.saturating_add(1),
                _ => 1,
            };
            let delay = LISTEN_RETRY.nth_delay(failures as usize);
            (Instant::now() + delay, failures)
        });
        if by_policy {
            tracing::warn!(agent = %unit.agent, container = %unit.container, container_id = %unit.container_id,
                %reason, "This container's blocks adapt to more than its agent may have; it is left out.");
        } else {
            tracing::warn!(agent = %unit.agent, container = %unit.container, container_id = %unit.container_id,
                %reason, "Caddy refused this container's blocks; it is left out.");
        }
        self.refused.insert(
            unit.container_id.clone(),
            RefusedByCaddy {
                agent: unit.agent.to_string(),
                container: unit.container.clone(),
                container_id: unit.container_id.clone(),
                reason,
                by_policy,
                text: unit.text.clone(),
                listen_retry,
            },
        );
    }

    /// When a container Caddy could not listen for is due to be tried
    /// again: the convergence task pushes then.
    pub fn refused_retry_at(&self) -> Option<Instant> {
        self.refused
            .values()
            .filter_map(|r| r.listen_retry.map(|(at, _)| at))
            .min()
    }

    fn accept(&mut self, units: &[&ContainerUnit], text: String, sentinel: String) {
        self.accepted = units
            .iter()
            .map(|u| (u.container_id.clone(), u.text.clone()))
            .collect();
        // Tried again and loaded: no longer refused.
        let accepted = &self.accepted;
        self.refused
            .retain(|id, r| !accepted.contains(&(id.clone(), r.text.clone())));
        self.pushed = Some((text, sentinel));
    }

    /// Composes the Caddyfile given as its `blocks` (whose text is
    /// `caddyfile`) from its sites' shares,
    /// or has Caddy adapt it whole; keeps the admin endpoint, tags the
    /// config with a sentinel `@id` and loads it. Returns the sentinel.
    async fn try_push(
        &mut self,
        blocks: &[MarshaledBlock<'_>],
        caddyfile: &str,
    ) -> Result<String, CaddyError> {
        let composing = std::time::Instant::now();
        let config = match self.composer.compose_blocks(&self.caddy, blocks).await? {
            Composed::Config(json) => {
                self.report.composed += 1;
                json
            }
            Composed::Whole(reason) => {
                self.report.whole.push(reason);
                self.caddy.adapt_raw(caddyfile).await?
            }
        };
        // Only the top level is read: the rest is forwarded as text.
        let mut top: BTreeMap<String, Box<RawValue>> =
            serde_json::from_str::<Option<_>>(config.get())?.unwrap_or_default();
        drop(config);
        // Keep Caddy's admin endpoint where it is: a config without `admin`
        // would move it back to localhost inside Caddy's container.
        let mut admin = match top.get("admin") {
            Some(admin) => Some(serde_json::from_str::<Value>(admin.get())?),
            None => match &self.running_admin {
                Some(admin) => admin.clone(),
                None => {
                    let admin = self.caddy.running_admin().await?;
                    self.running_admin = Some(admin.clone());
                    admin
                }
            },
        }
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Default::default()));
        let sentinel = format!(
            "{}-{:016x}",
            self.sentinel_prefix,
            fnv1a(caddyfile.as_bytes())
        );
        admin["@id"] = Value::String(sentinel.clone());
        top.insert("admin".into(), serde_json::value::to_raw_value(&admin)?);
        let json = serde_json::to_string(&top)?;
        drop(top);
        self.stages.compose = composing.elapsed();
        self.stages.adapt = self.composer.last_adapt;
        let loading = std::time::Instant::now();
        self.caddy.load(&json).await?;
        self.stages.load = loading.elapsed();
        Ok(sentinel)
    }
}

/// The Caddyfile for `units` merged after `base`: its top-level blocks
/// with their texts, and the whole text.
fn assembled<'a>(
    base: Option<&'a Caddyfile>,
    units: &[&'a ContainerUnit],
) -> (Vec<MarshaledBlock<'a>>, String) {
    let blocks = assemble_marshaled(base, units);
    let text = blocks.iter().map(|(_, text)| text.as_ref()).collect();
    (blocks, text)
}

/// FNV-1a, 64 bits: a stable fingerprint of the pushed Caddyfile.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What is wrong with an untrusted container's adapted blocks, if anything:
/// only `apps.http.servers`, each listening only on :80/:443 and holding
/// only routes matched by the container's own site hosts.
pub fn contribution_problem(json: &Value, unit: &ContainerUnit) -> Option<String> {
    let hosts: BTreeSet<String> = unit
        .file
        .blocks
        .iter()
        .flat_map(|b| &b.keys)
        .map(|address| {
            let rest = address
                .strip_prefix("https://")
                .or_else(|| address.strip_prefix("http://"))
                .unwrap_or(address);
            rest.rsplit_once(':')
                .map_or(rest, |(h, _)| h)
                .to_ascii_lowercase()
        })
        .collect();
    let only = |value: &Value, allowed: &[&str], what: &str| -> Option<String> {
        value
            .as_object()?
            .keys()
            .find(|k| !allowed.contains(&k.as_str()))
            .map(|k| {
                format!("its blocks adapt to {what}.{k}, which only the operator may configure")
            })
    };
    let apps = &json["apps"];
    let problem = only(json, &["apps"], "config")
        .or_else(|| only(apps, &["http"], "apps"))
        .or_else(|| only(&apps["http"], &["servers"], "apps.http"));
    if problem.is_some() {
        return problem;
    }
    for server in apps["http"]["servers"]
        .as_object()
        .into_iter()
        .flat_map(|s| s.values())
    {
        if let Some(problem) = only(server, &["listen", "routes", "automatic_https"], "a server") {
            return Some(problem);
        }
        for listen in server["listen"].as_array().into_iter().flatten() {
            let listen = listen.as_str().unwrap_or("");
            if listen != ":80" && listen != ":443" {
                return Some(format!("its blocks adapt to a listener on {listen}"));
            }
        }
        for route in server["routes"].as_array().into_iter().flatten() {
            let matchers: Vec<&Value> = route["match"].as_array().into_iter().flatten().collect();
            let matched: Vec<&str> = matchers
                .iter()
                .flat_map(|m| m["host"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            let only_hosts = matchers
                .iter()
                .all(|m| m.as_object().is_some_and(|o| o.keys().all(|k| k == "host")));
            if matched.is_empty()
                || !only_hosts
                || matched
                    .iter()
                    .any(|h| !hosts.contains(&h.to_ascii_lowercase()))
            {
                return Some(format!(
                    "its blocks adapt to a route for hosts {matched:?}, not only its own sites"
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use caddy_fleet_schema::AgentId;
    use serde_json::json;

    use super::*;

    fn unit(text: &str) -> ContainerUnit {
        let file = Caddyfile::parse(text).unwrap();
        ContainerUnit {
            agent: AgentId::new("a1").unwrap(),
            container: "c".into(),
            container_id: "id".into(),
            text: file.marshal_spans().0.into(),
            spans: file.marshal_spans().1.into(),
            file: file.into(),
            trusted: false,
            proxies: Default::default(),
        }
    }

    #[test]
    fn only_http_routes_for_its_own_sites_pass() {
        let u = unit("http://a.test {\n\trespond hi\n}\n");
        let route =
            |host: &str| json!({"match": [{"host": [host]}], "handle": [], "terminal": true});
        let good = json!({"apps": {"http": {"servers": {"srv0": {"listen": [":80"], "routes": [route("a.test")]}}}}});
        assert_eq!(contribution_problem(&good, &u), None);
        for (bad, needle) in [
            (
                json!({"admin": {"listen": ":2020"}, "apps": {}}),
                "config.admin",
            ),
            (json!({"logging": {}, "apps": {}}), "config.logging"),
            (json!({"storage": {}, "apps": {}}), "config.storage"),
            (json!({"apps": {"tls": {}}}), "apps.tls"),
            (json!({"apps": {"pki": {}}}), "apps.pki"),
            (
                json!({"apps": {"http": {"servers": {"s": {"listen": [":2019"], "routes": []}}}}}),
                ":2019",
            ),
            (
                json!({"apps": {"http": {"servers": {"s": {"listen": [":80"], "routes": [route("b.test")]}}}}}),
                "b.test",
            ),
            (
                json!({"apps": {"http": {"servers": {"s": {"listen": [":80"], "routes": [{"handle": []}]}}}}}),
                "not only its own",
            ),
            (
                json!({"apps": {"http": {"servers": {"s": {"listen": [":80"], "logs": {}, "routes": []}}}}}),
                "logs",
            ),
        ] {
            let problem = contribution_problem(&bad, &u).unwrap_or_default();
            assert!(problem.contains(needle), "{bad}: {problem:?}");
        }
    }
}
