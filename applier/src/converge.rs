//! Converging Caddy to the translated state: one whole-config push per
//! change, the admin block kept, a sentinel `@id` to notice a Caddy that
//! lost the config, and isolation of containers whose blocks Caddy refuses.
//!
//! Isolation: when Caddy refuses a config, the containers whose blocks
//! changed since the last accepted config are the suspects. They are
//! bisected (each probe: the accepted containers plus a group of suspects)
//! until every refused container is found; each is left out with Caddy's
//! reason, and the rest is pushed. One bad container never blocks the
//! others, and never empties Caddy.

use std::collections::{BTreeMap, BTreeSet};

use caddy_fleet_schema::caddyfile::Caddyfile;
use caddy_fleet_schema::translate::{assemble, ContainerUnit};
use serde_json::Value;

use crate::caddy::{CaddyAdmin, CaddyError};

/// A container Caddy refused, and Caddy's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedByCaddy {
    pub agent: String,
    pub container: String,
    pub container_id: String,
    pub reason: String,
    /// The blocks refused; the container is tried again once they change.
    text: String,
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
pub struct Converger {
    caddy: CaddyAdmin,
    base: Option<Caddyfile>,
    sentinel_prefix: String,
    /// The Caddyfile Caddy last accepted and its sentinel `@id`.
    pushed: Option<(String, String)>,
    /// (container ID, blocks) of every container in the accepted config.
    accepted: BTreeSet<(String, String)>,
    /// Containers Caddy refused, by container ID.
    refused: BTreeMap<String, RefusedByCaddy>,
}

impl Converger {
    /// A converger for the Caddy at `caddy`, merging into `base`.
    pub fn new(caddy: CaddyAdmin, base: Option<Caddyfile>, applier: &str) -> Self {
        Converger {
            caddy,
            base,
            sentinel_prefix: format!("caddy-fleet-{applier}"),
            pushed: None,
            accepted: BTreeSet::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Containers Caddy refused at the last convergence.
    pub fn refused(&self) -> impl Iterator<Item = &RefusedByCaddy> {
        self.refused.values()
    }

    /// The container IDs in the config Caddy runs.
    pub fn accepted_ids(&self) -> BTreeSet<&str> {
        self.accepted.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Forgets what Caddy runs, so the next convergence pushes.
    pub fn invalidate(&mut self) {
        self.pushed = None;
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
        let candidates: Vec<&ContainerUnit> = units
            .iter()
            .filter(|u| !self.refused.contains_key(&u.container_id))
            .collect();
        let text = assemble(self.base.as_ref(), candidates.iter().copied()).marshal();
        if self
            .pushed
            .as_ref()
            .is_some_and(|(pushed, _)| pushed == &text)
        {
            return Ok(Outcome::Unchanged);
        }
        match self.try_push(&text).await {
            Ok(sentinel) => {
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
            let text = assemble(self.base.as_ref(), good.iter().chain(&group).copied()).marshal();
            match self.try_push(&text).await {
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
            // Every suspect was refused: push what was accepted before.
            None => {
                let text = assemble(self.base.as_ref(), good.iter().copied()).marshal();
                let sentinel = self.try_push(&text).await?;
                (text, sentinel)
            }
        };
        self.accept(&good, text, sentinel);
        Ok(Outcome::Pushed { probes })
    }

    fn refuse(&mut self, unit: &ContainerUnit, reason: String) {
        tracing::warn!(agent = %unit.agent, container = %unit.container, container_id = %unit.container_id,
            %reason, "Caddy refused this container's blocks; it is left out.");
        self.refused.insert(
            unit.container_id.clone(),
            RefusedByCaddy {
                agent: unit.agent.to_string(),
                container: unit.container.clone(),
                container_id: unit.container_id.clone(),
                reason,
                text: unit.text.clone(),
            },
        );
    }

    fn accept(&mut self, units: &[&ContainerUnit], text: String, sentinel: String) {
        self.accepted = units
            .iter()
            .map(|u| (u.container_id.clone(), u.text.clone()))
            .collect();
        self.pushed = Some((text, sentinel));
    }

    /// Adapts `caddyfile`, keeps the admin endpoint, tags the config with
    /// a sentinel `@id` and loads it. Returns the sentinel.
    async fn try_push(&self, caddyfile: &str) -> Result<String, CaddyError> {
        let mut json = self.caddy.adapt(caddyfile).await?;
        if !json.is_object() {
            json = Value::Object(Default::default());
        }
        // Keep Caddy's admin endpoint where it is: a config without `admin`
        // would move it back to localhost inside Caddy's container.
        if json.get("admin").is_none() {
            if let Some(admin) = self.caddy.running_admin().await? {
                json["admin"] = admin;
            }
        }
        if !json.get("admin").is_some_and(Value::is_object) {
            json["admin"] = Value::Object(Default::default());
        }
        let sentinel = format!(
            "{}-{:016x}",
            self.sentinel_prefix,
            fnv1a(caddyfile.as_bytes())
        );
        json["admin"]["@id"] = Value::String(sentinel.clone());
        self.caddy.load(&json).await?;
        Ok(sentinel)
    }
}

/// FNV-1a, 64 bits: a stable fingerprint of the pushed Caddyfile.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
