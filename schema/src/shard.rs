//! Splitting a fleet's sites across appliers (`APPLIER_DOMAINS`).
//!
//! N appliers, each with its own Caddy, can share one log and serve
//! disjoint parts of the fleet: each is given host patterns and serves only
//! the sites whose host matches one of them. Sites outside the patterns are
//! *ignored*, not refused: another shard serves them.
//!
//! Promises:
//! - **Ownership is decided before sharding.** [`DomainShard::keep`] runs on
//!   the output of [`crate::translate::translate_owned`], which saw every
//!   container of the log; so which container owns a site, and which are
//!   refused, is the same in every shard.
//! - **A site block is cut, never rewritten otherwise.** A block whose
//!   addresses all match is kept as it is; one whose addresses partly match
//!   keeps only the matching addresses (the other shards serve the rest);
//!   one with no matching address is dropped. Snippets, named routes and
//!   address-less blocks are kept.
//! - **Catch-alls go everywhere.** An address without a host (`:8080`,
//!   `http://`) is served by every shard, like the base Caddyfile is.
//! - Patterns are the policy's (`a.test`, `*.a.test` for one label in front
//!   of `a.test`, `*` for every host), compared without case.

use crate::caddyfile::Block;
use crate::policy::{domain_matches, is_host_name};
use crate::translate::ContainerUnit;

/// The host patterns one applier serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainShard {
    patterns: Vec<String>,
}

/// An `APPLIER_DOMAINS` value that is not a list of host patterns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("no host pattern given: list patterns such as `a.test,*.b.test`, or unset it to serve every site")]
    Empty,
    #[error("{0:?} is not a host pattern: write a host name (`a.test`), `*.` and a host name (`*.a.test`), or `*`")]
    BadPattern(String),
}

/// A container whose sites this shard leaves to other shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideShard {
    /// The agent running the container.
    pub agent: String,
    /// The container's name.
    pub container: String,
    /// The container's ID.
    pub container_id: String,
    /// The site addresses left to other shards.
    pub addresses: Vec<String>,
}

impl DomainShard {
    /// Reads a comma- or space-separated list of host patterns.
    pub fn parse(list: &str) -> Result<Self, ShardError> {
        let patterns: Vec<String> = list
            .split([',', ' ', '\t', '\n'])
            .filter(|p| !p.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if patterns.is_empty() {
            return Err(ShardError::Empty);
        }
        if let Some(bad) = patterns.iter().find(|p| {
            !(p.as_str() == "*"
                || is_host_name(p)
                || p.strip_prefix("*.").is_some_and(is_host_name))
        }) {
            return Err(ShardError::BadPattern(bad.clone()));
        }
        Ok(DomainShard { patterns })
    }

    /// The patterns, as given (lower-cased).
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether this shard serves a site with host `host` (lower-cased by
    /// the caller, or not: the comparison ignores case).
    pub fn serves_host(&self, host: &str) -> bool {
        self.patterns.iter().any(|p| domain_matches(p, host))
    }

    /// Whether this shard serves a site address
    /// (`[scheme://]host[:port][/path]`); addresses without a host are
    /// served by every shard.
    pub fn serves_address(&self, address: &str) -> bool {
        match address_host(address) {
            Some(host) => self.serves_host(host),
            None => true,
        }
    }

    /// The units this shard serves, cut to the addresses it serves, and
    /// the containers it leaves (wholly or partly) to other shards.
    pub fn keep(&self, units: Vec<ContainerUnit>) -> (Vec<ContainerUnit>, Vec<OutsideShard>) {
        let mut kept = Vec::with_capacity(units.len());
        let mut outside = Vec::new();
        for mut unit in units {
            let mut left: Vec<String> = Vec::new();
            let mut changed = false;
            // The blocks are shared with the translation cache: copied only
            // for a unit that loses an address here.
            let all_served = unit.file.blocks.iter().filter(|b| is_site(b)).all(|b| {
                b.keys
                    .iter()
                    .all(|a| self.serves_address(a.trim_end_matches(',')))
            });
            if all_served {
                if unit.file.blocks.iter().any(is_site) {
                    kept.push(unit);
                }
                continue;
            }
            std::sync::Arc::make_mut(&mut unit.file)
                .blocks
                .retain_mut(|block| {
                    if !is_site(block) {
                        return true;
                    }
                    let before = block.keys.len();
                    block.keys.retain(|address| {
                        let served = self.serves_address(address.trim_end_matches(','));
                        if !served {
                            left.push(address.trim_end_matches(',').to_string());
                        }
                        served
                    });
                    if block.keys.len() != before {
                        changed = true;
                        normalise_commas(&mut block.keys);
                    }
                    !block.keys.is_empty()
                });
            if !left.is_empty() {
                outside.push(OutsideShard {
                    agent: unit.agent.to_string(),
                    container: unit.container.clone(),
                    container_id: unit.container_id.clone(),
                    addresses: left,
                });
            }
            if unit.file.blocks.iter().any(is_site) {
                if changed {
                    // Text and spans are written together: a push reuses
                    // each block's text by its span.
                    let (text, spans) = unit.file.marshal_spans();
                    unit.text = text.into();
                    unit.spans = spans.into();
                }
                kept.push(unit);
            }
        }
        (kept, outside)
    }
}

/// A site block: a top-level block whose keys are addresses (not the
/// global options, a snippet `(name)` or a named route `&(name)`).
fn is_site(block: &Block) -> bool {
    block
        .keys
        .first()
        .is_some_and(|k| !k.starts_with('(') && !k.starts_with("&("))
}

/// Addresses separated by `a, b` keep their commas between them only.
fn normalise_commas(keys: &mut [String]) {
    let last = keys.len().saturating_sub(1);
    for (i, key) in keys.iter_mut().enumerate() {
        let bare = key.trim_end_matches(',').to_string();
        *key = if i < last && key.ends_with(',') {
            format!("{bare},")
        } else {
            bare
        };
    }
}

/// The host of a site address, `None` when it has none (`:80`, `http://`).
pub fn address_host(address: &str) -> Option<&str> {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let rest = rest.split('/').next().unwrap_or("");
    let host = if let Some(bracketed) = rest.strip_prefix('[') {
        // `[::1]:80`: the brackets hold the host.
        bracketed.split(']').next().unwrap_or("")
    } else {
        rest.rsplit_once(':').map_or(rest, |(host, _)| host)
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caddyfile::Caddyfile;
    use crate::subject::AgentId;

    fn unit(text: &str) -> ContainerUnit {
        let file = Caddyfile::parse(text).expect("parses");
        ContainerUnit {
            agent: AgentId::new("h1").expect("agent"),
            container: "web".into(),
            container_id: "c1".into(),
            text: file.marshal_spans().0.into(),
            spans: file.marshal_spans().1.into(),
            file: file.into(),
            trusted: true,
            proxies: Default::default(),
        }
    }

    #[test]
    fn patterns_are_validated() {
        assert_eq!(DomainShard::parse(" , "), Err(ShardError::Empty));
        assert!(matches!(
            DomainShard::parse("a.test,http://b.test"),
            Err(ShardError::BadPattern(p)) if p == "http://b.test"
        ));
        let shard = DomainShard::parse("A.test *.b.test").expect("valid");
        assert_eq!(shard.patterns(), ["a.test", "*.b.test"]);
    }

    #[test]
    fn addresses_are_matched_by_host() {
        let shard = DomainShard::parse("a.test,*.b.test").expect("valid");
        for served in [
            "a.test",
            "https://A.test:443",
            "x.b.test/path",
            ":8080",
            "http://",
        ] {
            assert!(shard.serves_address(served), "{served}");
        }
        for ignored in ["b.test", "y.x.b.test", "c.test:80", "[::1]:80", "10.0.0.1"] {
            assert!(!shard.serves_address(ignored), "{ignored}");
        }
    }

    #[test]
    fn blocks_are_cut_to_the_served_addresses() {
        let shard = DomainShard::parse("a.test").expect("valid");
        let units = vec![
            unit("a.test, b.test {\n\treverse_proxy 10.0.0.1:80\n}\n"),
            unit("b.test {\n\treverse_proxy 10.0.0.2:80\n}\n"),
            unit("a.test {\n\treverse_proxy 10.0.0.3:80\n}\n"),
        ];
        let untouched = units[2].clone();
        let (kept, outside) = shard.keep(units);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].file.blocks[0].keys, ["a.test"]);
        assert_eq!(*kept[0].text, kept[0].file.marshal());
        assert_eq!(kept[1], untouched);
        let left: Vec<&[String]> = outside.iter().map(|o| o.addresses.as_slice()).collect();
        assert_eq!(left, [["b.test".to_string()], ["b.test".to_string()]]);
    }

    #[test]
    fn a_cut_unit_assembles_as_its_blocks_do() {
        let shard = DomainShard::parse("*.a.test,a.test").expect("valid");
        // Blocks before the kept ones go: the kept ones move in the text.
        let units = vec![
            unit("b.test {\n\trespond b\n}\nx.a.test {\n\trespond x\n}\n"),
            unit("c.test, a.test {\n\trespond a\n}\nb.test {\n\trespond b2\n}\n"),
        ];
        let (kept, _) = shard.keep(units);
        assert_eq!(kept.len(), 2);
        for unit in &kept {
            assert_eq!(unit.spans.as_ref(), unit.file.marshal_spans().1.as_slice());
        }
        let refs: Vec<&ContainerUnit> = kept.iter().collect();
        let fast: String = crate::translate::assemble_marshaled(None, &refs)
            .iter()
            .map(|(_, text)| text.as_ref())
            .collect();
        assert_eq!(
            fast,
            crate::translate::assemble(None, refs.iter().copied()).marshal()
        );
    }

    #[test]
    fn commas_stay_between_the_addresses_kept() {
        let shard = DomainShard::parse("a.test,c.test").expect("valid");
        let (kept, _) = shard.keep(vec![unit("a.test, b.test, c.test {\n\trespond ok\n}\n")]);
        assert_eq!(kept[0].file.blocks[0].keys, ["a.test,", "c.test"]);
    }
}
