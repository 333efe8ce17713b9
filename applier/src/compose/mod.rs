//! Composing Caddy's JSON config from per-site pieces, so a push costs
//! what changed instead of adapting the whole Caddyfile every time.
//!
//! Each site block is adapted by Caddy alone — with the global options,
//! the snippets and a probe site (see [`site`]) — once per distinct
//! (global options, site) text, and its share of the config is kept. A
//! push composes the whole config from the shares, reproducing what
//! Caddy's Caddyfile adapter does across sites ([`assemble`]): servers
//! per listener, route order across sites, route group numbers, automatic
//! HTTPS skip lists, the catch-all TLS connection policy and TLS
//! automation policies. The result equals Caddy's `/adapt` of the whole
//! Caddyfile (`tests/compose.rs` checks it against a real Caddy).
//!
//! Shares and the composed config are JSON text, cut where composition
//! writes numbers and lists ([`text`]): at 10,000 sites, `Value` trees of
//! the shares and of the whole config took most of the applier's memory.
//!
//! Whatever is not reproduced exactly falls back to one whole `/adapt`,
//! with a [`Reason`]: a site that Caddy adapts to more than its server
//! and automation policies (access logs, error routes, manual
//! certificates, …), global options whose effect spans sites, sites that
//! share some listeners but not others, and so on. Each site's share is
//! checked when it is read: the share composed back with the probe must
//! give exactly what Caddy adapted, or the site is a fallback reason too.

pub mod address;
pub mod assemble;
pub mod gosort;
pub mod site;
pub mod text;
pub mod tls;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use caddy_fleet_schema::caddyfile::{Block, Caddyfile, MarshaledBlock};
use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::caddy::{CaddyApi, CaddyError};
use site::{Globals, Site, PROBE};

/// Why a config is adapted whole instead of composed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// A short stable name (a metric label).
    pub kind: &'static str,
    /// What it is about, for the log.
    pub detail: String,
}

impl Reason {
    pub fn new(kind: &'static str, detail: impl Into<String>) -> Reason {
        Reason {
            kind,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// What a composition gave.
#[derive(Debug)]
pub enum Composed {
    /// The config, equal to Caddy's adapt of the whole Caddyfile, as JSON
    /// text.
    Config(Box<RawValue>),
    /// Adapt the whole Caddyfile instead, for this reason.
    Whole(Reason),
}

/// Sites adapted alone within one push are bounded: beyond this many (plus
/// a tenth of the sites), one whole adapt is cheaper, and the rest are
/// adapted between pushes ([`Composer::warm`]).
const INLINE_SITES: usize = 16;
/// Sites adapted alone at once.
const CONCURRENT_ADAPTS: usize = 4;
/// Beyond this many sites a config is never adapted whole for want of
/// the sites' shares (a cold start): the sites are adapted alone first.
/// Caddy's `/adapt` grows faster than linearly (2.6 s at 10,000 sites on
/// two cores; at 100,000 it took over 18 GB and had not finished in 12
/// minutes), while adapting sites alone is linear.
pub const WHOLE_ADAPT_SITES: usize = 20_000;
/// Sites adapted per [`Composer::warm`] step.
const WARM_STEP: usize = 64;

/// What is known for one text of the global options and snippets.
struct Prelude {
    text: String,
    globals: Result<Arc<Globals>, Reason>,
    probe: Option<Arc<Site>>,
    /// Each site text's share, or why it cannot be composed.
    sites: HashMap<String, Result<Arc<Site>, Reason>>,
}

/// Keeps each site's adapted share and composes configs from them.
pub struct Composer {
    prelude: Option<Prelude>,
    /// Site texts waiting to be adapted between pushes.
    pending: Vec<(Block, String)>,
    /// Adapt calls made for single sites (and global options) so far.
    pub site_adapts: u64,
    /// How long the last composition waited for Caddy to adapt sites alone.
    pub last_adapt: std::time::Duration,
    /// Up to how many sites a cold config is adapted whole
    /// ([`WHOLE_ADAPT_SITES`]).
    whole_adapt_sites: usize,
}

impl Default for Composer {
    fn default() -> Composer {
        Composer {
            prelude: None,
            pending: Vec::new(),
            site_adapts: 0,
            last_adapt: std::time::Duration::ZERO,
            whole_adapt_sites: WHOLE_ADAPT_SITES,
        }
    }
}

impl Composer {
    pub fn new() -> Composer {
        Composer::default()
    }

    /// A composer that adapts a cold config whole only up to `sites`
    /// sites (tests use a small number).
    pub fn with_whole_adapt_limit(sites: usize) -> Composer {
        Composer {
            whole_adapt_sites: sites,
            ..Composer::default()
        }
    }

    /// Whether sites wait to be adapted alone ([`Composer::warm`]).
    pub fn wants_warming(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The config for `file`: composed, or the reason to adapt it whole.
    /// Only an unreachable Caddy is an error.
    pub async fn compose<C: CaddyApi>(
        &mut self,
        caddy: &C,
        file: &Caddyfile,
    ) -> Result<Composed, CaddyError> {
        let blocks: Vec<MarshaledBlock> = file
            .marshal_blocks()
            .into_iter()
            .map(|(block, text)| (Cow::Owned(block), Cow::Owned(text)))
            .collect();
        self.compose_blocks(caddy, &blocks).await
    }

    /// [`Composer::compose`] for a Caddyfile given as its top-level blocks
    /// in marshal order, each with its text
    /// ([`caddy_fleet_schema::translate::assemble_marshaled`]).
    pub async fn compose_blocks<C: CaddyApi>(
        &mut self,
        caddy: &C,
        blocks: &[MarshaledBlock<'_>],
    ) -> Result<Composed, CaddyError> {
        self.last_adapt = std::time::Duration::ZERO;
        let mut prelude_text = String::new();
        let mut global = None;
        let mut snippets = HashMap::new();
        let mut sites: Vec<(&Block, &str)> = Vec::new();
        for (block, text) in blocks {
            if block.is_global() || block.is_snippet() {
                if !sites.is_empty() {
                    return Ok(Composed::Whole(Reason::new(
                        "order",
                        "a snippet follows a site",
                    )));
                }
                prelude_text.push_str(text);
                if block.is_global() {
                    global = Some(block.as_ref().clone());
                } else {
                    let name = block.keys[0]
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .to_string();
                    snippets.insert(name, block.as_ref().clone());
                }
            } else if block.keys.first().is_some_and(|k| k.starts_with("&(")) {
                return Ok(Composed::Whole(Reason::new(
                    "named-routes",
                    "the Caddyfile defines named routes",
                )));
            } else {
                sites.push((block.as_ref(), text.as_ref()));
            }
        }
        if self.prelude.as_ref().is_none_or(|p| p.text != prelude_text) {
            self.pending.clear();
            let prelude = self
                .read_prelude(caddy, prelude_text, global.as_ref(), snippets)
                .await?;
            self.prelude = Some(prelude);
        }
        if sites.is_empty() {
            return Ok(Composed::Whole(Reason::new(
                "no-sites",
                "no site to compose",
            )));
        }
        if let Some((block, _)) = sites.iter().find(|(b, _)| b.children.is_empty()) {
            return Ok(Composed::Whole(Reason::new(
                "empty-site",
                format!(
                    "site {:?} has no directives (a block without braces)",
                    block.keys.join(" ")
                ),
            )));
        }
        let Some(prelude) = self.prelude.as_mut() else {
            // Read just above; a whole adapt is always correct.
            return Ok(Composed::Whole(Reason::new(
                "prelude",
                "the global options were not read",
            )));
        };
        let globals = match &prelude.globals {
            Ok(globals) => globals.clone(),
            Err(reason) => return Ok(Composed::Whole(reason.clone())),
        };
        let Some(probe) = prelude.probe.clone() else {
            return Ok(Composed::Whole(Reason::new(
                "probe",
                "the probe site could not be read",
            )));
        };
        let missing: Vec<(Block, String)> = sites
            .iter()
            .filter(|(_, text)| !prelude.sites.contains_key(*text))
            .map(|(block, text)| ((*block).clone(), text.to_string()))
            .collect();
        if missing.len() > INLINE_SITES + sites.len() / 10 && sites.len() <= self.whole_adapt_sites
        {
            let reason = Reason::new(
                "cold",
                format!(
                    "{} of {} sites not adapted alone yet",
                    missing.len(),
                    sites.len()
                ),
            );
            self.pending = missing;
            return Ok(Composed::Whole(reason));
        }
        if missing.len() > INLINE_SITES + sites.len() / 10 {
            tracing::info!(
                sites = missing.len(),
                "Adapting the sites alone before this push: Caddy would take longer, and far more memory, to adapt this many sites whole."
            );
        }
        let adapting = std::time::Instant::now();
        self.adapt_sites(caddy, missing).await?;
        self.last_adapt = adapting.elapsed();
        let Some(prelude) = self.prelude.as_mut() else {
            // Read just above; a whole adapt is always correct.
            return Ok(Composed::Whole(Reason::new(
                "prelude",
                "the global options were not read",
            )));
        };
        let mut shares = Vec::with_capacity(sites.len());
        for (_, text) in &sites {
            match prelude.sites.get(*text) {
                Some(Ok(site)) => shares.push(site.clone()),
                Some(Err(reason)) => return Ok(Composed::Whole(reason.clone())),
                None => {
                    return Ok(Composed::Whole(Reason::new(
                        "cold",
                        "a site was not adapted",
                    )))
                }
            }
        }
        if prelude.sites.len() > 2 * sites.len() + 1024 {
            let current: std::collections::HashSet<&str> = sites.iter().map(|(_, t)| *t).collect();
            prelude
                .sites
                .retain(|text, _| current.contains(text.as_str()));
        }
        let _ = probe;
        let refs: Vec<&Site> = shares.iter().map(|s| s.as_ref()).collect();
        Ok(match assemble::compose(&globals, &refs) {
            Ok(config) => Composed::Config(config),
            Err(reason) => Composed::Whole(reason),
        })
    }

    /// Adapts up to a step of the sites waiting, between pushes.
    pub async fn warm<C: CaddyApi>(&mut self, caddy: &C) -> Result<(), CaddyError> {
        let step: Vec<(Block, String)> = {
            let n = self.pending.len().min(WARM_STEP);
            self.pending.drain(..n).collect()
        };
        let result = self.adapt_sites(caddy, step).await;
        if result.is_err() {
            self.pending.clear();
        }
        result
    }

    async fn read_prelude<C: CaddyApi>(
        &mut self,
        caddy: &C,
        text: String,
        global: Option<&Block>,
        snippets: HashMap<String, Block>,
    ) -> Result<Prelude, CaddyError> {
        let mut prelude = Prelude {
            text,
            globals: Err(Reason::new("global-options", "not read")),
            probe: None,
            sites: HashMap::new(),
        };
        // The global options with the probe alone: what they make besides
        // the probe, and the probe's share to check every site's against.
        self.site_adapts += 1;
        let out = match caddy.adapt(&format!("{}{PROBE}", prelude.text)).await {
            Ok(out) => out,
            Err(CaddyError::Refused { message, .. }) => {
                prelude.globals = Err(Reason::new(
                    "refused-alone",
                    format!("Caddy refused the global options alone: {message}"),
                ));
                return Ok(prelude);
            }
            Err(error) => return Err(error),
        };
        let globals = match site::globals(global, snippets, &out) {
            Ok(globals) => Arc::new(globals),
            Err(reason) => {
                prelude.globals = Err(reason);
                return Ok(prelude);
            }
        };
        let probe_block = Caddyfile::parse(PROBE)
            .ok()
            .and_then(|f| f.blocks.into_iter().next());
        if let Some(block) = probe_block {
            prelude.probe = site::extract(&out, &block, &globals, false)
                .ok()
                .map(Arc::new);
        }
        prelude.globals = Ok(globals);
        Ok(prelude)
    }

    /// Adapts each site alone (a few at once) and keeps its share.
    async fn adapt_sites<C: CaddyApi>(
        &mut self,
        caddy: &C,
        sites: Vec<(Block, String)>,
    ) -> Result<(), CaddyError> {
        let Some(prelude) = self.prelude.as_mut() else {
            return Ok(());
        };
        let (Ok(globals), Some(probe)) = (prelude.globals.clone(), prelude.probe.clone()) else {
            return Ok(());
        };
        let sites: Vec<(Block, String)> = sites
            .into_iter()
            .filter(|(_, text)| !prelude.sites.contains_key(text))
            .collect();
        if sites.is_empty() {
            return Ok(());
        }
        let prelude_text = prelude.text.clone();
        let mut results = futures::stream::iter(sites)
            .map(|(block, text)| {
                let input = format!("{prelude_text}{text}{PROBE}");
                async move { (block, text, caddy.adapt(&input).await) }
            })
            .buffer_unordered(CONCURRENT_ADAPTS);
        let mut first_error = None;
        while let Some((block, text, adapted)) = results.next().await {
            self.site_adapts += 1;
            let share = match adapted {
                Ok(out) => read_share(&out, &block, &globals, &probe),
                Err(CaddyError::Refused { message, .. }) => Err(Reason::new(
                    "refused-alone",
                    format!(
                        "Caddy refused the site {:?} alone: {message}",
                        block.keys.join(" ")
                    ),
                )),
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            if let Err(reason) = &share {
                tracing::debug!(site = %block.keys.join(" "), %reason, "This site's share cannot be composed; configs with it are adapted whole.");
            }
            prelude.sites.insert(text, share);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// A site's share from Caddy's adapt of it with the probe, checked: the
/// share composed back with the probe's must give exactly `out`.
fn read_share(
    out: &Value,
    block: &Block,
    globals: &Globals,
    probe: &Site,
) -> Result<Arc<Site>, Reason> {
    let site = site::extract(out, block, globals, true)?;
    // The servers and everything else, composed back with the probe's
    // share, must be exactly what Caddy adapted; the automation policies
    // are the site's and the probe's as read.
    let without_policies = |site: &Site| Site {
        policies: Vec::new(),
        ..site.clone()
    };
    let composed = assemble::compose(
        globals,
        &[&without_policies(&site), &without_policies(probe)],
    )?;
    let composed: Value = serde_json::from_str(composed.get()).map_err(|error| {
        Reason::new(
            "composed-json",
            format!("the composed config is not JSON ({error})"),
        )
    })?;
    let mut adapted = out.clone();
    if let Some(automation) = adapted["apps"]["tls"]["automation"].as_object_mut() {
        automation.remove("policies");
    }
    site::prune(&mut adapted, &["apps", "tls", "automation"]);
    if composed != adapted {
        let path =
            assemble::first_difference(&adapted, &composed, &mut String::new()).unwrap_or_default();
        if std::env::var_os("CADDY_FLEET_COMPOSE_DEBUG").is_some() {
            eprintln!(
                "site {:?}: differs at {path}\nadapted:  {adapted}\ncomposed: {composed}",
                block.keys
            );
        }
        let kind = match path.as_str() {
            p if p.starts_with(".logging") => "logging",
            p if p.starts_with(".apps.pki") => "pki",
            p if p.starts_with(".apps.tls.certificates") => "certificates",
            p if p.starts_with(".apps.tls") => "tls",
            p if p.starts_with(".apps.http.servers") => "server",
            _ => "other",
        };
        return Err(Reason::new(
            kind,
            format!("the site adapts to more than composition reproduces (first at {path})"),
        ));
    }
    Ok(Arc::new(site))
}
