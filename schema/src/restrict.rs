//! The restricted grammar for untrusted agents.
//!
//! caddy-docker-proxy's full grammar is raw Caddyfile: whoever writes a
//! label administers the proxy. For an agent the policy does not trust,
//! a container's translated labels (templates already rendered) are checked
//! here, on the parsed block tree, at every depth, before they reach Caddy:
//!
//! - top-level blocks are sites only (no global options, snippets or
//!   top-level directives), addressed by host names the policy grants
//!   (`http://`/`https://` and ports 80/443 allowed; no catch-alls, `*`,
//!   bare IPs, paths or unix sockets);
//! - directives come from an allow-list, and so do `reverse_proxy`'s
//!   sub-options (no `dynamic`, no `transport … resolvers`, no TLS client
//!   or CA files), with caps on what holds memory or connections;
//! - upstreams are literal addresses only: the agent's own published ports
//!   at its (pinned) host address, or the policy's CIDRs; never loopback,
//!   link-local, unspecified or Caddy's own addresses, never placeholders;
//! - no token anywhere holds `{$` (expanded by Caddy before parsing,
//!   whatever the quoting), `{env.`, `{file.` or `{system.`.
//!
//! Nothing here recurses deeper than the label tree, which
//! [`crate::limits`] bounds.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use crate::caddyfile::{proxy_matcher, Block, Caddyfile};
use crate::policy::{is_host_name, Grant};

/// What an upstream may be, besides the grant's CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnUpstreams<'a> {
    /// The agent's (pinned, acceptable) host address, if any.
    pub host: Option<IpAddr>,
    /// The container's published ports; with `host`, its own upstreams.
    pub ports: &'a [crate::event::PortBinding],
    /// Addresses any port of which is the container's own (the local
    /// agent's containers on the ingress network).
    pub any_port: Vec<IpAddr>,
    /// Addresses that are never upstreams: Caddy's own.
    pub forbidden: &'a BTreeSet<IpAddr>,
}

static NO_ADDRESSES: BTreeSet<IpAddr> = BTreeSet::new();

impl Default for OwnUpstreams<'_> {
    fn default() -> Self {
        OwnUpstreams {
            host: None,
            ports: &[],
            any_port: Vec::new(),
            forbidden: &NO_ADDRESSES,
        }
    }
}

/// Directives an untrusted site may use (at its top level, and inside
/// `handle`, `handle_path` and `route`).
const DIRECTIVES: &[&str] = &[
    "reverse_proxy",
    "encode",
    "header",
    "request_header",
    "redir",
    "rewrite",
    "uri",
    "handle",
    "handle_path",
    "route",
    "respond",
    "basic_auth",
    "basicauth",
    "request_body",
    "abort",
    "error",
];

/// `reverse_proxy` sub-options an untrusted site may use.
const PROXY_OPTIONS: &[&str] = &[
    "to",
    "lb_policy",
    "lb_retries",
    "lb_try_duration",
    "lb_try_interval",
    "lb_retry_match",
    "health_uri",
    "health_path",
    "health_port",
    "health_interval",
    "health_passes",
    "health_fails",
    "health_timeout",
    "health_status",
    "health_body",
    "health_headers",
    "health_method",
    "fail_duration",
    "max_fails",
    "unhealthy_status",
    "unhealthy_latency",
    "unhealthy_request_count",
    "flush_interval",
    "request_buffers",
    "response_buffers",
    "stream_timeout",
    "stream_close_delay",
    "header_up",
    "header_down",
    "method",
    "transport",
];

/// `transport http` options an untrusted site may use.
const TRANSPORT_OPTIONS: &[&str] = &[
    "read_timeout",
    "write_timeout",
    "dial_timeout",
    "dial_fallback_delay",
    "response_header_timeout",
    "expect_continue_timeout",
    "keepalive",
    "keepalive_interval",
    "keepalive_idle_conns",
    "keepalive_idle_conns_per_host",
    "max_conns_per_host",
    "versions",
    "compression",
    "tls",
    "tls_insecure_skip_verify",
    "tls_server_name",
    "tls_timeout",
];

/// Matcher types an untrusted site may use.
const MATCHERS: &[&str] = &[
    "path",
    "path_regexp",
    "method",
    "header",
    "header_regexp",
    "query",
    "protocol",
    "remote_ip",
    "client_ip",
    "host",
    "not",
];

/// Longest duration an option that holds connections or waits may have.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Largest proxy buffer.
const MAX_BUFFER_BYTES: u64 = 1024 * 1024;
/// Most connections per upstream host.
const MAX_CONNS: u64 = 1024;

/// Checks an untrusted container's Caddyfile against its grant; the error
/// is the reason it is refused.
pub fn check(file: &Caddyfile, grant: &Grant, own: &OwnUpstreams) -> Result<(), String> {
    for block in &file.blocks {
        check_placeholders(block)?;
        if block.is_global() {
            return Err("global options are not allowed for this agent".into());
        }
        if block.is_snippet() {
            return Err(format!(
                "snippet {} is not allowed for this agent",
                block.keys[0]
            ));
        }
        for address in &block.keys {
            let host = site_host(address)?;
            if !grant.allows_domain(host) {
                return Err(format!(
                    "site {address} is not among the domains the policy grants this agent"
                ));
            }
        }
        check_directives(&block.children, grant, own)?;
    }
    Ok(())
}

/// Refuses placeholders that read the environment, files or the system,
/// in any token of the block, at any depth (bounded by the label tree's).
fn check_placeholders(block: &Block) -> Result<(), String> {
    for token in &block.keys {
        // One scan for `{`, then the forbidden prefixes after it.
        for (at, _) in token.match_indices('{') {
            let rest = &token[at..];
            if let Some(bad) = ["{$", "{env.", "{file.", "{system."]
                .into_iter()
                .find(|bad| rest.starts_with(bad))
            {
                return Err(format!(
                    "placeholder {bad}… is not allowed for this agent (it reads Caddy's host)"
                ));
            }
        }
    }
    block.children.iter().try_for_each(check_placeholders)
}

/// The host of a site address: `[http[s]://]host[:80|:443]`.
fn site_host(address: &str) -> Result<&str, String> {
    let refuse = |why: &str| Err(format!("site address {address:?}: {why}"));
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    if rest.contains("://") {
        return refuse("only http:// and https:// sites are allowed");
    }
    if rest.contains('/') {
        return refuse("paths and unix sockets are not allowed in site addresses");
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    };
    if let Some(port) = port {
        if port != "80" && port != "443" {
            return refuse("only ports 80 and 443 are allowed");
        }
    }
    let named = host.strip_prefix("*.").unwrap_or(host);
    if !is_host_name(named) {
        return refuse("a host name is required (no catch-alls, `*` or IP addresses)");
    }
    Ok(host)
}

fn check_directives(blocks: &[Block], grant: &Grant, own: &OwnUpstreams) -> Result<(), String> {
    for block in blocks {
        let directive = block.keys.first().map(String::as_str).unwrap_or("");
        if directive.starts_with('@') {
            check_matcher(block)?;
            continue;
        }
        if !DIRECTIVES.contains(&directive) {
            return Err(format!(
                "directive {directive:?} is not allowed for this agent"
            ));
        }
        match directive {
            "reverse_proxy" => check_proxy(block, grant, own)?,
            "handle" | "handle_path" | "route" => check_directives(&block.children, grant, own)?,
            "encode" => only_children(block, &["gzip", "zstd", "minimum_length"])?,
            "request_body" => only_children(block, &["max_size"])?,
            "respond" => only_children(block, &["body", "close"])?,
            // header/request_header field operations, basic_auth's users,
            // redir/rewrite/uri/abort/error arguments: plain values.
            _ => {
                for child in &block.children {
                    if !child.children.is_empty() {
                        return Err(format!("{directive} takes no nested blocks here"));
                    }
                }
            }
        }
    }
    Ok(())
}

fn only_children(block: &Block, allowed: &[&str]) -> Result<(), String> {
    for child in &block.children {
        let name = child.keys.first().map(String::as_str).unwrap_or("");
        if !allowed.contains(&name) || !child.children.is_empty() {
            return Err(format!(
                "{} option {name:?} is not allowed for this agent",
                block.keys[0]
            ));
        }
    }
    Ok(())
}

fn check_matcher(block: &Block) -> Result<(), String> {
    let check_type = |name: &str| {
        if MATCHERS.contains(&name) {
            Ok(())
        } else {
            Err(format!("matcher {name:?} is not allowed for this agent"))
        }
    };
    if let Some(kind) = block.keys.get(1) {
        check_type(kind)?;
    }
    for child in &block.children {
        check_type(child.keys.first().map(String::as_str).unwrap_or(""))?;
        if child.keys.first().map(String::as_str) == Some("not") {
            for inner in &child.children {
                check_type(inner.keys.first().map(String::as_str).unwrap_or(""))?;
            }
        } else if !child.children.is_empty() {
            return Err("nested matcher blocks are only allowed under `not`".into());
        }
    }
    Ok(())
}

fn check_proxy(block: &Block, grant: &Grant, own: &OwnUpstreams) -> Result<(), String> {
    let (_, first_upstream) = proxy_matcher(block);
    for upstream in block.keys.iter().skip(first_upstream) {
        check_upstream(upstream, grant, own)?;
    }
    for option in &block.children {
        let name = option.keys.first().map(String::as_str).unwrap_or("");
        if !PROXY_OPTIONS.contains(&name) {
            return Err(format!(
                "reverse_proxy option {name:?} is not allowed for this agent"
            ));
        }
        let args = &option.keys[1..];
        match name {
            "to" => {
                for upstream in args {
                    check_upstream(upstream, grant, own)?;
                }
            }
            "transport" => {
                if args.first().map(String::as_str) != Some("http") || args.len() > 1 {
                    return Err("only `transport http` is allowed for this agent".into());
                }
                for t in &option.children {
                    let tname = t.keys.first().map(String::as_str).unwrap_or("");
                    if !TRANSPORT_OPTIONS.contains(&tname) || !t.children.is_empty() {
                        return Err(format!(
                            "transport option {tname:?} is not allowed for this agent"
                        ));
                    }
                    cap_option(tname, &t.keys[1..])?;
                }
            }
            _ => cap_option(name, args)?,
        }
        if name != "transport" && !option.children.is_empty() {
            return Err(format!("reverse_proxy option {name:?} takes no block here"));
        }
    }
    Ok(())
}

/// Caps options that hold memory, connections or time.
fn cap_option(name: &str, args: &[String]) -> Result<(), String> {
    let too_big = |value: &str| Err(format!("{name} {value} is above this agent's cap"));
    match name {
        "request_buffers" | "response_buffers" => {
            for a in args {
                match parse_bytes(a) {
                    Some(n) if n <= MAX_BUFFER_BYTES => {}
                    _ => return too_big(a),
                }
            }
        }
        "max_conns_per_host" | "keepalive_idle_conns" | "keepalive_idle_conns_per_host" => {
            for a in args {
                match a.parse::<u64>() {
                    Ok(n) if n <= MAX_CONNS => {}
                    _ => return too_big(a),
                }
            }
        }
        _ if name.ends_with("_timeout")
            || name.ends_with("_interval")
            || name.ends_with("_duration")
            || name.ends_with("_delay")
            || name == "keepalive"
            || name == "fail_duration" =>
        {
            for a in args {
                if a == "off" {
                    continue;
                }
                match parse_duration(a) {
                    Some(d) if d <= MAX_WAIT => {}
                    _ => return too_big(a),
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A literal upstream: `[http|https|h2c://]ip:port` (or `[ip6]:port`),
/// allowed by the agent's own published ports or the grant's CIDRs.
fn check_upstream(upstream: &str, grant: &Grant, own: &OwnUpstreams) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("upstream {upstream:?}: {why}"));
    if upstream.contains('{') {
        return refuse("placeholders are not allowed in upstreams for this agent");
    }
    let rest = ["http://", "https://", "h2c://"]
        .iter()
        .find_map(|s| upstream.strip_prefix(s))
        .unwrap_or(upstream);
    if rest.contains("://") || rest.contains('/') {
        return refuse("only http, https and h2c addresses are allowed");
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return refuse("a literal ip:port is required");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (Ok(ip), Ok(port)) = (host.parse::<IpAddr>(), port.parse::<u16>()) else {
        return refuse("a literal ip:port is required (no host names or port ranges)");
    };
    if is_never_an_upstream(ip) || own.forbidden.contains(&ip) {
        return refuse(
            "loopback, link-local, unspecified and Caddy's own addresses are never upstreams",
        );
    }
    let published = own.host == Some(ip)
        && own
            .ports
            .iter()
            .any(|p| p.protocol == "tcp" && p.host_port == port);
    if published || own.any_port.contains(&ip) || grant.allows_upstream(ip) {
        Ok(())
    } else {
        refuse("neither one of this container's published ports at its host's address nor in the policy's upstreams")
    }
}

/// Loopback, link-local and unspecified addresses (also IPv4-mapped).
pub fn is_never_an_upstream(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Caddy's durations: Go's (`1h30m`, `500ms`) plus `d` for days.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    if let Ok(secs) = rest.parse::<u64>() {
        // A bare number is nanoseconds in Go; treat it as such.
        return Some(Duration::from_nanos(secs));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}

/// Sizes: a number of bytes, or with `k`/`kb`/`kib`/`m`/`mb`/`mib`.
fn parse_bytes(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let number: u64 = lower[..digits].parse().ok()?;
    let factor = match lower[digits..].trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::from_labels;
    use crate::template::FixedTargets;
    use std::collections::BTreeMap;

    fn grant() -> Grant {
        Grant {
            domains: vec!["shop.test".into(), "*.shop.test".into()],
            upstreams: vec!["10.0.5.0/24".parse().unwrap()],
            ..Grant::default()
        }
    }

    fn own() -> OwnUpstreams<'static> {
        static CADDY: std::sync::OnceLock<BTreeSet<IpAddr>> = std::sync::OnceLock::new();
        static PORTS: std::sync::OnceLock<Vec<crate::event::PortBinding>> =
            std::sync::OnceLock::new();
        OwnUpstreams {
            host: Some("10.0.0.5".parse().unwrap()),
            ports: PORTS.get_or_init(|| {
                vec![crate::event::PortBinding {
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: "0.0.0.0".into(),
                    host_port: 80,
                }]
            }),
            forbidden: CADDY.get_or_init(|| ["10.0.0.1".parse().unwrap()].into()),
            ..OwnUpstreams::default()
        }
    }

    fn verdict(labels: &[(&str, &str)]) -> Result<(), String> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = from_labels(&labels, "caddy", &FixedTargets(vec!["10.0.0.5".into()]))
            .map_err(|e| e.to_string())?;
        check(&file, &grant(), &own())
    }

    #[test]
    fn an_ordinary_site_is_allowed() {
        verdict(&[
            ("caddy", "https://shop.test a.shop.test:443"),
            ("caddy.reverse_proxy", "{{upstreams 80}} 10.0.5.9:80"),
            ("caddy.reverse_proxy.health_uri", "/healthz"),
            ("caddy.reverse_proxy.transport", "http"),
            ("caddy.reverse_proxy.transport.read_timeout", "30s"),
            ("caddy.reverse_proxy.header_up", "X-Real-IP {remote_host}"),
            ("caddy.encode", "gzip"),
            ("caddy.@api.path", "/api/*"),
            ("caddy.handle", "@api"),
            ("caddy.handle.respond", "\"hi {http.request.uri}\" 200"),
            ("caddy.basic_auth.bob", "$2a$14$hash"),
        ])
        .unwrap();
    }

    #[test]
    fn every_attack_class_is_refused_with_a_reason() {
        for (labels, needle) in [
            // Caddy's admin API as an upstream.
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "127.0.0.1:2019"),
                ],
                "loopback",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "10.0.0.1:2019"),
                ],
                "Caddy's own",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "[::ffff:127.0.0.1]:2019"),
                ],
                "loopback",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "169.254.169.254:80"),
                ],
                "link-local",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "{http.request.header.X}"),
                ],
                "placeholders",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "internal.example:80"),
                ],
                "literal",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy", "10.0.0.5:22"),
                ],
                "published",
            ),
            // Global options and snippets.
            (
                vec![("caddy", "shop.test"), ("caddy_1.admin", "0.0.0.0:2019")],
                "global options",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy_1", "(snip)"),
                    ("caddy_1.respond", "x"),
                ],
                "snippet",
            ),
            // Files, imports, logs, secrets.
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.root", "* /"),
                    ("caddy.file_server", ""),
                ],
                "is not allowed",
            ),
            (
                vec![("caddy", "shop.test"), ("caddy.import", "/etc/passwd")],
                "import",
            ),
            (
                vec![("caddy", "shop.test"), ("caddy.log.output", "file /tmp/x")],
                "log",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.respond", "{env.NATS_APPLIER_PASSWORD}"),
                ],
                "{env.",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.respond", "{file./data/key}"),
                ],
                "{file.",
            ),
            (
                vec![("caddy", "shop.test"), ("caddy.respond", "{$HOME}")],
                "{$",
            ),
            (
                vec![("caddy", "shop.test"), ("caddy.tls", "/k.pem /c.pem")],
                "tls",
            ),
            // Other tenants' and catch-all sites.
            (
                vec![("caddy", "other.test"), ("caddy.respond", "x")],
                "not among the domains",
            ),
            (vec![("caddy", ":80"), ("caddy.respond", "x")], "host name"),
            (vec![("caddy", "*"), ("caddy.respond", "x")], "host name"),
            (
                vec![("caddy", "http://"), ("caddy.respond", "x")],
                "host name",
            ),
            (
                vec![("caddy", "10.0.5.1"), ("caddy.respond", "x")],
                "host name",
            ),
            (
                vec![("caddy", "unix//run/x.sock"), ("caddy.respond", "x")],
                "unix",
            ),
            (
                vec![("caddy", "shop.test:2019"), ("caddy.respond", "x")],
                "ports",
            ),
            (
                vec![("caddy", "a.b.shop.test"), ("caddy.respond", "x")],
                "not among",
            ),
            // reverse_proxy options that reach Caddy's host or hold resources.
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy.dynamic", "srv x"),
                ],
                "dynamic",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy.transport", "http"),
                    ("caddy.reverse_proxy.transport.resolvers", "1.1.1.1"),
                ],
                "resolvers",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy.transport", "http"),
                    ("caddy.reverse_proxy.transport.tls_trusted_ca_certs", "/x"),
                ],
                "tls_trusted_ca_certs",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy.transport", "fastcgi"),
                ],
                "transport http",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy.stream_close_delay", "100h"),
                ],
                "cap",
            ),
            (
                vec![
                    ("caddy", "shop.test"),
                    ("caddy.reverse_proxy.request_buffers", "1g"),
                ],
                "cap",
            ),
            (
                vec![("caddy", "shop.test"), ("caddy.@f.file", "/etc/passwd")],
                "matcher \"file\"",
            ),
            (
                vec![("caddy", "shop.test"), ("caddy.handle.import", "x")],
                "import",
            ),
        ] {
            let err = verdict(&labels).unwrap_err();
            assert!(err.contains(needle), "{labels:?}: {err}");
        }
    }

    #[test]
    fn durations_and_sizes_parse_like_caddy() {
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_bytes("512k"), Some(512 * 1024));
        assert_eq!(parse_bytes("1MB"), Some(1024 * 1024));
        assert_eq!(parse_bytes("9999999999999999999m"), None);
    }
}
