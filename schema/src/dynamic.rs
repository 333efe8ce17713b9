//! Upstreams by DNS (`UPSTREAMS=dynamic`): a generated `reverse_proxy`
//! whose upstreams all came from `{{upstreams}}` names them with one DNS
//! name instead of listing them, so a deploy (a container replaced, scaled
//! or moved) changes only the applier's DNS answers, not the Caddyfile,
//! and Caddy never reloads for it.
//!
//! [`rewrite`] turns such a handler's upstream arguments into
//! `dynamic srv <name> { resolvers …; refresh …; grace_period … }` and adds
//! `resolvers …` to its `transport http` (creating it when the labels wrote
//! none), after the policy and the restricted grammar have checked the
//! literal upstreams: what the answers hold for a name is exactly what the
//! static handler would have listed, so the policy bounds the answers the
//! same way.
//!
//! Promises, checked by the tests below:
//! - **A name is a function of where the handler is, never of its
//!   upstreams**: the site's addresses, the keys of the blocks around the
//!   handler, and its matcher. Two containers with identical labels give
//!   identical text (so caddy-docker-proxy's merge folds them into one
//!   handler) and the same name (so the answers are the union of both).
//! - **Only what the applier owns moves to DNS.** A handler stays static,
//!   with the reason, when it mixes literal upstreams with `{{upstreams}}`,
//!   when an upstream has a scheme or no port or a host that is not an IP
//!   address, when its labels configure Caddy's own health checks (Caddy
//!   keeps no health state for dynamic upstreams), set `dynamic` or
//!   transport `resolvers` themselves, or use a transport other than
//!   `http`.
//! - Targets are host names ([`target_name`]): Go refuses IP literals as SRV
//!   targets, so the answer for `ip4-10-0-0-7.caddy-fleet.internal.` is the
//!   address its name spells ([`target_address`]).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::caddyfile::{proxy_matcher, Block, Caddyfile};

/// The DNS zone every generated name is in.
pub const ZONE: &str = "caddy-fleet.internal.";

/// Options a handler's health checks are configured with: such a handler
/// keeps static upstreams.
const HEALTH_OPTIONS: &[&str] = &["fail_duration", "max_fails"];
const HEALTH_PREFIXES: &[&str] = &["health_", "unhealthy_"];

/// How generated proxies look their upstreams up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicUpstreams {
    /// The applier's DNS server, as Caddy dials it (`UPSTREAM_DNS_LISTEN`).
    pub resolver: SocketAddr,
    /// How long Caddy keeps an answer before asking again
    /// (`UPSTREAM_DNS_REFRESH`): the longest a deploy waits to be served.
    pub refresh: Duration,
    /// How long Caddy keeps using its last answer for a name while the
    /// applier does not answer (`UPSTREAM_DNS_GRACE`).
    pub grace_period: Duration,
}

/// A handler whose upstreams come from DNS.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DynamicProxy {
    /// The site's addresses, as written.
    pub site: String,
    /// The SRV name Caddy asks for (fully qualified).
    pub name: String,
    /// The container's upstreams for it (`ip:port`, IPv6 in brackets).
    pub upstreams: Vec<String>,
}

/// A handler left with static upstreams in dynamic mode, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaticProxy {
    /// The site's addresses, as written.
    pub site: String,
    /// Why its upstreams stay in the Caddyfile.
    pub reason: String,
}

/// What [`rewrite`] did to one container's handlers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyModes {
    pub dynamic: Vec<DynamicProxy>,
    pub kept_static: Vec<StaticProxy>,
}

impl ProxyModes {
    /// How `site`'s upstreams reach Caddy: `Some(Ok(()))` by DNS, `Some(Err(reason))`
    /// static in dynamic mode, `None` when this container has no generated
    /// handler there.
    pub fn mode_of(&self, site: &str) -> Option<Result<(), &str>> {
        if let Some(kept) = self.kept_static.iter().find(|s| s.site == site) {
            return Some(Err(kept.reason.as_str()));
        }
        self.dynamic
            .iter()
            .any(|d| d.site == site)
            .then_some(Ok(()))
    }
}

/// Moves every handler of `file` whose upstreams are all in `resolved`
/// (what `{{upstreams}}` produced for this container) to DNS, and says
/// which handlers stayed static and why.
pub fn rewrite(
    file: &mut Caddyfile,
    resolved: &BTreeSet<String>,
    options: &DynamicUpstreams,
) -> ProxyModes {
    let mut modes = ProxyModes::default();
    for site in file
        .blocks
        .iter_mut()
        .filter(|b| !b.is_global() && !b.is_snippet() && !b.is_matcher())
    {
        let address = site.keys.join(" ");
        let mut path = vec![address.clone()];
        for child in &mut site.children {
            visit(child, &mut path, resolved, options, &address, &mut modes);
        }
    }
    modes
}

fn visit(
    block: &mut Block,
    path: &mut Vec<String>,
    resolved: &BTreeSet<String>,
    options: &DynamicUpstreams,
    site: &str,
    modes: &mut ProxyModes,
) {
    if block.keys.first().map(String::as_str) == Some("reverse_proxy") {
        match classify(block, resolved) {
            Classified::NotOurs => {}
            Classified::Static(reason) => modes.kept_static.push(StaticProxy {
                site: site.to_string(),
                reason,
            }),
            Classified::Dynamic(upstreams) => {
                let (matcher, first_upstream) = proxy_matcher(block);
                let name = name_for(site, path, matcher);
                block.keys.truncate(first_upstream);
                block
                    .children
                    .retain(|c| c.keys.first().map(String::as_str) != Some("to"));
                add_lookup(block, &name, options);
                modes.dynamic.push(DynamicProxy {
                    site: site.to_string(),
                    name,
                    upstreams,
                });
            }
        }
        return;
    }
    path.push(block.keys.join(" "));
    for child in &mut block.children {
        visit(child, path, resolved, options, site, modes);
    }
    path.pop();
}

enum Classified {
    /// No upstream came from `{{upstreams}}`: the labels' own handler.
    NotOurs,
    Static(String),
    Dynamic(Vec<String>),
}

fn classify(block: &Block, resolved: &BTreeSet<String>) -> Classified {
    let (_, first_upstream) = proxy_matcher(block);
    let mut upstreams: Vec<&String> = block.keys.iter().skip(first_upstream).collect();
    for to in block
        .children
        .iter()
        .filter(|c| c.keys.first().map(String::as_str) == Some("to"))
    {
        upstreams.extend(to.keys.iter().skip(1));
    }
    let ours = upstreams.iter().filter(|u| resolved.contains(**u)).count();
    if ours == 0 {
        return Classified::NotOurs;
    }
    if ours < upstreams.len() {
        return Classified::Static(
            "its upstreams mix literal addresses with {{upstreams}}".to_string(),
        );
    }
    for option in &block.children {
        let Some(name) = option.keys.first() else {
            continue;
        };
        if HEALTH_OPTIONS.contains(&name.as_str())
            || HEALTH_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            return Classified::Static(format!(
                "its labels configure Caddy's health checks ({name}), which Caddy runs only on static upstreams"
            ));
        }
        if name == "dynamic" {
            return Classified::Static("its labels set dynamic upstreams themselves".to_string());
        }
        if name == "transport" {
            let protocol = option.keys.get(1).map(String::as_str).unwrap_or("");
            if protocol != "http" {
                return Classified::Static(format!(
                    "transport {protocol} cannot look upstreams up through the applier"
                ));
            }
            if option
                .children
                .iter()
                .any(|c| c.keys.first().map(String::as_str) == Some("resolvers"))
            {
                return Classified::Static(
                    "its labels set the transport's resolvers themselves".to_string(),
                );
            }
        }
    }
    let mut addresses = Vec::new();
    for upstream in upstreams {
        match upstream.parse::<SocketAddr>() {
            Ok(address) if address.port() != 0 => addresses.push(address.to_string()),
            _ => {
                return Classified::Static(format!(
                    "upstream {upstream} is not an IP address with a port"
                ))
            }
        }
    }
    addresses.sort();
    addresses.dedup();
    Classified::Dynamic(addresses)
}

/// `dynamic srv <name> {…}` and the transport's `resolvers`.
fn add_lookup(block: &mut Block, name: &str, options: &DynamicUpstreams) {
    let resolver = options.resolver.to_string();
    block.children.push(
        Block::line(["dynamic", "srv", name])
            .with_child(Block::line(["resolvers", resolver.as_str()]))
            .with_child(Block::line([
                "refresh".to_string(),
                crate::translate::go_duration(options.refresh),
            ]))
            .with_child(Block::line([
                "grace_period".to_string(),
                crate::translate::go_duration(options.grace_period),
            ])),
    );
    let resolvers = Block::line(["resolvers", resolver.as_str()]);
    match block
        .children
        .iter_mut()
        .find(|c| c.keys.first().map(String::as_str) == Some("transport"))
    {
        Some(transport) => transport.children.push(resolvers),
        None => block
            .children
            .push(Block::line(["transport", "http"]).with_child(resolvers)),
    }
}

/// The SRV name of the handler with `matcher` under the blocks `path`
/// (the site's addresses first): readable from the site, unique by a hash
/// of where it is.
pub fn name_for(site: &str, path: &[String], matcher: &str) -> String {
    let mut hash = Sha256::new();
    for key in path.iter().map(String::as_str).chain([matcher]) {
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
    }
    let digest = hash.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let mut readable: String = site
        .split_whitespace()
        .next()
        .unwrap_or("")
        .split("://")
        .last()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    while readable.ends_with('-') {
        readable.pop();
    }
    if readable.is_empty() {
        format!("h{hex}.{ZONE}")
    } else {
        format!("h{hex}-{readable}.{ZONE}")
    }
}

/// The host name an SRV answer gives for `ip` (Go accepts only names as
/// SRV targets).
pub fn target_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("ip4-{a}-{b}-{c}-{d}.{ZONE}")
        }
        IpAddr::V6(v6) => format!("ip6-{:032x}.{ZONE}", u128::from(v6)),
    }
}

/// The address a [`target_name`] spells, if `name` is one.
pub fn target_address(name: &str) -> Option<IpAddr> {
    let name = name.to_ascii_lowercase();
    let label = name
        .strip_suffix(ZONE)
        .or_else(|| name.strip_suffix(ZONE.trim_end_matches('.')))?
        .strip_suffix('.')?;
    if let Some(v4) = label.strip_prefix("ip4-") {
        let octets: Vec<u8> = v4
            .split('-')
            .map(|o| {
                if o.len() > 1 && o.starts_with('0') {
                    None
                } else {
                    o.parse().ok()
                }
            })
            .collect::<Option<_>>()?;
        let octets: [u8; 4] = octets.try_into().ok()?;
        return Some(IpAddr::from(octets));
    }
    let v6 = label.strip_prefix("ip6-")?;
    if v6.len() != 32 {
        return None;
    }
    u128::from_str_radix(v6, 16)
        .ok()
        .map(|n| IpAddr::V6(n.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> DynamicUpstreams {
        DynamicUpstreams {
            resolver: "127.0.0.1:8053".parse().unwrap(),
            refresh: Duration::from_secs(1),
            grace_period: Duration::from_secs(3600),
        }
    }

    fn rewritten(text: &str, resolved: &[&str]) -> (String, ProxyModes) {
        let mut file = Caddyfile::parse(text).unwrap();
        let resolved = resolved.iter().map(|s| s.to_string()).collect();
        let modes = rewrite(&mut file, &resolved, &options());
        (file.marshal(), modes)
    }

    #[test]
    fn generated_upstreams_become_one_name_and_the_text_forgets_them() {
        let (a, modes_a) = rewritten(
            "a.test {\n\treverse_proxy 10.0.0.1:8080\n}\n",
            &["10.0.0.1:8080"],
        );
        let (b, modes_b) = rewritten(
            "a.test {\n\treverse_proxy 10.0.0.2:9090 10.0.0.3:9091\n}\n",
            &["10.0.0.2:9090", "10.0.0.3:9091"],
        );
        assert_eq!(a, b, "the text does not depend on the upstreams");
        assert!(!a.contains("10.0.0."), "{a}");
        assert!(a.contains("dynamic srv h"), "{a}");
        assert!(a.contains("resolvers 127.0.0.1:8053"), "{a}");
        assert!(a.contains("grace_period 3600s"), "{a}");
        assert_eq!(modes_a.dynamic[0].name, modes_b.dynamic[0].name);
        assert_eq!(modes_a.dynamic[0].upstreams, vec!["10.0.0.1:8080"]);
        assert_eq!(
            modes_b.dynamic[0].upstreams,
            vec!["10.0.0.2:9090", "10.0.0.3:9091"]
        );
        assert!(modes_a.dynamic[0].name.ends_with(ZONE));
        assert!(modes_a.dynamic[0].name.contains("-a-test."));
    }

    #[test]
    fn each_site_and_handler_has_its_own_name() {
        let (_, modes) = rewritten(
            "a.test {\n\treverse_proxy /api/* 10.0.0.1:1\n\treverse_proxy 10.0.0.1:2\n\thandle_path /x/* {\n\t\treverse_proxy 10.0.0.1:3\n\t}\n}\nb.test {\n\treverse_proxy 10.0.0.1:2\n}\n",
            &["10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3"],
        );
        let names: BTreeSet<&str> = modes.dynamic.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{modes:?}");
    }

    #[test]
    fn handlers_the_applier_does_not_own_stay_static_with_a_reason() {
        let cases = [
            (
                "a.test {\n\treverse_proxy 10.0.0.1:1 10.9.9.9:1\n}\n",
                "mix literal",
            ),
            (
                "a.test {\n\treverse_proxy 10.0.0.1:1 {\n\t\thealth_uri /h\n\t}\n}\n",
                "health_uri",
            ),
            (
                "a.test {\n\treverse_proxy 10.0.0.1:1 {\n\t\tmax_fails 3\n\t}\n}\n",
                "max_fails",
            ),
            (
                "a.test {\n\treverse_proxy 10.0.0.1:1 {\n\t\ttransport fastcgi\n\t}\n}\n",
                "transport fastcgi",
            ),
            (
                "a.test {\n\treverse_proxy 10.0.0.1:1 {\n\t\ttransport http {\n\t\t\tresolvers 1.1.1.1\n\t\t}\n\t}\n}\n",
                "resolvers",
            ),
            ("a.test {\n\treverse_proxy host:1\n}\n", "not an IP"),
        ];
        for (text, reason) in cases {
            let resolved: Vec<&str> = vec!["10.0.0.1:1", "host:1"];
            let (out, modes) = rewritten(text, &resolved);
            assert!(modes.dynamic.is_empty(), "{text}");
            assert!(
                modes.kept_static[0].reason.contains(reason),
                "{text}: {modes:?}"
            );
            assert!(!out.contains("dynamic"), "{out}");
            assert_eq!(
                modes.mode_of("a.test"),
                Some(Err(modes.kept_static[0].reason.as_str()))
            );
        }
        // Literal upstreams only: the labels' own handler, not reported.
        let (out, modes) = rewritten("a.test {\n\treverse_proxy 10.9.9.9:1\n}\n", &["10.0.0.1:1"]);
        assert_eq!(modes, ProxyModes::default());
        assert!(out.contains("10.9.9.9:1"));
    }

    #[test]
    fn an_existing_http_transport_gets_the_resolvers() {
        let (out, _) = rewritten(
            "a.test {\n\treverse_proxy 10.0.0.1:1 {\n\t\ttransport http {\n\t\t\tread_timeout 5s\n\t\t}\n\t}\n}\n",
            &["10.0.0.1:1"],
        );
        assert_eq!(out.matches("transport http").count(), 1, "{out}");
        assert!(out.contains("read_timeout 5s"), "{out}");
        assert_eq!(out.matches("resolvers 127.0.0.1:8053").count(), 2, "{out}");
    }

    #[test]
    fn target_names_spell_their_address_and_nothing_else_parses() {
        for ip in ["10.0.0.7", "127.0.0.1", "::1", "2001:db8::42", "0.0.0.0"] {
            let ip: IpAddr = ip.parse().unwrap();
            let name = target_name(ip);
            assert_eq!(target_address(&name), Some(ip), "{name}");
            assert_eq!(target_address(&name.to_uppercase()), Some(ip), "{name}");
        }
        for bad in [
            "ip4-10-0-0.caddy-fleet.internal.",
            "ip4-10-0-0-256.caddy-fleet.internal.",
            "ip4-10-0-0-01.caddy-fleet.internal.",
            "ip6-12.caddy-fleet.internal.",
            "ip4-10-0-0-1.example.com.",
            "x.ip4-10-0-0-1.caddy-fleet.internal.",
            "caddy-fleet.internal.",
        ] {
            assert_eq!(target_address(bad), None, "{bad}");
        }
    }
}
