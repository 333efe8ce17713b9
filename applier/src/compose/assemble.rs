//! The whole config from the sites' shares, as Caddy's adapter combines
//! site blocks (`serversFromPairings` and `buildTLSApp` in
//! `httpcaddyfile`): servers per listener set, named in the order of
//! their addresses; within a server, sites from most to least specific
//! host; route groups numbered in Caddy's order; `automatic_https` skip
//! lists, the catch-all TLS connection policy, and TLS automation
//! policies consolidated across sites.

use std::collections::{HashMap, HashSet};

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::address::{listeners_use_any_port_other_than, specificity};
use super::gosort::slice_stable;
use super::site::{Globals, Site};
use super::text::{cut, marker};
use super::tls::{consolidate, Policy};
use super::Reason;

/// What Caddy's order of site blocks in one server looks at: the most
/// specific host's specificity, the longest path's length, and whether a
/// host is a wildcard or empty (computed once per site, not per
/// comparison).
fn site_facts(site: &Site) -> (usize, usize, bool) {
    let (mut host, mut path, mut wildcard) = ("", "", false);
    for k in &site.keys {
        if k.host.contains('*') || k.host.is_empty() {
            wildcard = true;
        }
        if specificity(&k.host) > specificity(host) {
            host = &k.host;
        }
        if specificity(&k.path) > specificity(path) {
            path = &k.path;
        }
    }
    (specificity(host), path.len(), wildcard)
}

/// Caddy's order of site blocks in one server: most specific host first,
/// wildcard hosts after plain ones, catch-alls last, then longer paths.
fn site_less(i: (usize, usize, bool), j: (usize, usize, bool)) -> bool {
    let (ih, ip, iw) = i;
    let (jh, jp, jw) = j;
    if ih == 0 {
        return false;
    }
    if jh == 0 {
        return true;
    }
    if iw != jw {
        return jw && !iw;
    }
    if ih == jh {
        return ip > jp;
    }
    ih > jh
}

/// One route of a composed server's list.
enum Entry<'a> {
    /// A lone site's routes, unwrapped.
    Plain(Placed<'a>),
    /// A site's wrapper route: its matchers, then one subroute per site
    /// with routes (adjacent wrappers with the same matchers are one, as
    /// Caddy's `consolidateRoutes` makes them).
    Wrapper {
        matchers: Option<&'a str>,
        subroutes: Vec<Placed<'a>>,
    },
}

/// A site's routes, and where its group numbers start in the config.
struct Placed<'a> {
    site: &'a Site,
    parse_offset: u64,
    build_offset: u64,
}

impl Placed<'_> {
    /// The site's routes with its group numbers moved to where they fall
    /// in the whole config.
    fn write(&self, out: &mut String) {
        let site = self.site;
        site.routes.write(out, |group| {
            if group.site_phase {
                self.build_offset + (group.local - site.build_base)
            } else {
                self.parse_offset + group.local
            }
        });
    }
}

/// Writes a server's route list.
fn write_routes(out: &mut String, entries: &[Entry]) {
    out.push('[');
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match entry {
            Entry::Plain(placed) => placed.write(out),
            Entry::Wrapper {
                matchers,
                subroutes,
            } => {
                out.push('{');
                if !subroutes.is_empty() {
                    out.push_str("\"handle\":[");
                    for (j, placed) in subroutes.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        out.push_str("{\"handler\":\"subroute\",\"routes\":[");
                        placed.write(out);
                        out.push_str("]}");
                    }
                    out.push_str("],");
                }
                if let Some(matchers) = matchers {
                    out.push_str("\"match\":");
                    out.push_str(matchers);
                    out.push(',');
                }
                out.push_str("\"terminal\":true}");
            }
        }
    }
    out.push(']');
}

#[derive(PartialEq)]
enum Scheme {
    Http,
    Https,
}

/// The whole config for `sites`, in the order of the Caddyfile, as JSON
/// text: the servers' routes are written straight from the sites' texts.
pub fn compose(globals: &Globals, sites: &[&Site]) -> Result<Box<RawValue>, Reason> {
    let http_port = globals.http_port.to_string();
    let https_port = globals.https_port.to_string();

    // Servers: one per set of listener addresses; sets must not overlap.
    let mut by_listen: HashMap<&[String], usize> = HashMap::new();
    let mut servers: Vec<(&[String], Vec<usize>)> = Vec::new();
    let mut owner: HashMap<&str, usize> = HashMap::new();
    for (i, site) in sites.iter().enumerate() {
        let index = *by_listen.entry(site.listen.as_slice()).or_insert_with(|| {
            servers.push((site.listen.as_slice(), Vec::new()));
            servers.len() - 1
        });
        servers[index].1.push(i);
        for address in &site.listen {
            if *owner.entry(address).or_insert(index) != index {
                return Err(Reason::new(
                    "overlapping-listeners",
                    format!("sites share listener {address} but not all of their listeners"),
                ));
            }
        }
    }
    servers.sort_by(|a, b| a.0.iter().min().cmp(&b.0.iter().min()));
    let facts: Vec<(usize, usize, bool)> = sites.iter().map(|&s| site_facts(s)).collect();
    for (_, members) in &mut servers {
        slice_stable(members, &mut |&i, &j| site_less(facts[i], facts[j]));
    }

    // Route groups: first those given while parsing, site by site in the
    // file; then those given when building, in server order.
    let mut parse_offsets = Vec::with_capacity(sites.len());
    let mut total = 0u64;
    for site in sites {
        parse_offsets.push(total);
        total += site.a;
    }
    let mut build_offset = total;

    let flags = sites.first().map(|s| s.flags.clone()).unwrap_or_default();
    let mut hostless_policies = 0;
    let mut policies: Vec<Policy> = Vec::new();
    let mut out_servers = Map::new();
    // Each server's routes, written into its `routes` marker at the end.
    let mut server_routes: Vec<Vec<Entry>> = Vec::new();
    for (n, (listen, members)) in servers.iter().enumerate() {
        let mut seen_keys: HashSet<&str> = HashSet::new();
        for &i in members {
            for key in &sites[i].key_texts {
                if !seen_keys.insert(key) {
                    return Err(Reason::new(
                        "ambiguous",
                        format!("ambiguous site definition: {key}"),
                    ));
                }
            }
        }
        let extras = &sites[members[0]].extras;
        let not_http_only = listeners_use_any_port_other_than(listen, globals.http_port);
        let mut auto_https: Option<(Map<String, Value>, Vec<String>)> =
            (!flags.is_empty()).then(|| (flags.clone(), Vec::new()));
        // The skip list's hosts, for quick lookups.
        let mut skipped: HashSet<String> = HashSet::new();
        let mut will_add = !flags
            .get("disable")
            .is_some_and(|d| d == &Value::Bool(true));
        let mut qualifies = false;
        let mut scheme: Option<Scheme> = None;
        let mut routes: Vec<Entry> = Vec::new();
        for &i in members {
            let site = sites[i];
            if site.flags != flags {
                return Err(Reason::new(
                    "auto-https",
                    "sites differ in automatic HTTPS flags",
                ));
            }
            if &site.extras != extras {
                return Err(Reason::new(
                    "server-options",
                    "sites on one listener differ in server options",
                ));
            }
            for addr in &site.keys {
                if not_http_only && addr.scheme == "http" && !addr.host.is_empty() {
                    let (_, skip) = auto_https.get_or_insert_with(|| (Map::new(), Vec::new()));
                    if skipped.insert(addr.host.clone()) {
                        skip.push(addr.host.clone());
                    }
                }
                let tls_enabled =
                    site.uses_tls || (!addr.host.is_empty() && !skipped.contains(&addr.host));
                if addr.scheme == "https"
                    || (addr.scheme != "http" && addr.port != http_port && tls_enabled)
                {
                    qualifies = true;
                }
                will_add = will_add
                    && (addr.port == https_port
                        || (addr.port != http_port && !addr.host.is_empty()));
            }
            let placed = Placed {
                site,
                parse_offset: parse_offsets[i],
                build_offset,
            };
            build_offset += site.b;
            let wrap = site.matchers.is_some() || members.len() > 1 || site.host_matcher;
            if !wrap {
                if !site.routes.is_empty() {
                    routes.push(Entry::Plain(placed));
                }
                continue;
            }
            if site.matchers.is_none() && site.routes.is_empty() {
                continue;
            }
            let matchers = site.matchers.as_deref();
            let subroutes = (!site.routes.is_empty()).then_some(placed);
            // Adjacent routes with the same matchers (and terminality and
            // group, which wrappers share) become one; only servers of
            // several sites are consolidated.
            if let Some(Entry::Wrapper {
                matchers: last,
                subroutes: into,
            }) = routes.last_mut()
            {
                if members.len() > 1 && *last == matchers {
                    into.extend(subroutes);
                    continue;
                }
            }
            routes.push(Entry::Wrapper {
                matchers,
                subroutes: subroutes.into_iter().collect(),
            });
        }
        // A server cannot serve both HTTP and HTTPS (Caddy refuses it).
        for &i in members {
            for addr in &sites[i].keys {
                let wants = if addr.scheme == "http" || addr.port == http_port {
                    Some(Scheme::Http)
                } else if addr.scheme == "https" || addr.port == https_port {
                    Some(Scheme::Https)
                } else if addr.host.is_empty() {
                    Some(Scheme::Http)
                } else {
                    None
                };
                if let Some(wants) = wants {
                    if scheme.as_ref().is_some_and(|s| *s != wants) {
                        return Err(Reason::new(
                            "mixed-schemes",
                            "a server would serve both HTTP and HTTPS",
                        ));
                    }
                    scheme = Some(wants);
                }
            }
        }
        let mut server = extras.clone();
        server.insert(
            "listen".into(),
            Value::Array(listen.iter().cloned().map(Value::String).collect()),
        );
        if !routes.is_empty() {
            server.insert("routes".into(), marker("routes", server_routes.len()));
            server_routes.push(routes);
        }
        if let Some((mut object, skip)) = auto_https {
            if !skip.is_empty() {
                object.insert(
                    "skip".into(),
                    Value::Array(skip.into_iter().map(Value::String).collect()),
                );
            }
            server.insert("automatic_https".into(), Value::Object(object));
        }
        if qualifies
            && (!will_add || !globals.default_sni.is_empty() || !globals.fallback_sni.is_empty())
        {
            let mut cp = Map::new();
            if !globals.default_sni.is_empty() {
                cp.insert("default_sni".into(), globals.default_sni.clone().into());
            }
            if !globals.fallback_sni.is_empty() {
                cp.insert("fallback_sni".into(), globals.fallback_sni.clone().into());
            }
            server.insert(
                "tls_connection_policies".into(),
                Value::Array(vec![Value::Object(cp)]),
            );
        }
        out_servers.insert(format!("srv{n}"), Value::Object(server));
        if not_http_only {
            for &i in members {
                for policy in &sites[i].policies {
                    if policy.subjects.is_empty() {
                        hostless_policies += 1;
                    }
                    policies.push(policy.clone());
                }
            }
        }
    }
    if hostless_policies > 1 {
        return Err(Reason::new(
            "catch-all-policies",
            "several catch-all sites have TLS automation policies (Caddy shares one between them)",
        ));
    }

    let mut config = globals.skeleton.clone();
    if !out_servers.is_empty() {
        config["apps"]["http"]["servers"] = Value::Object(out_servers);
    }
    // Caddy leaves no automation policy when every site's is empty, and
    // consolidates them when none is. When only some are, Caddy 2.11's
    // consolidation is not the one its source of record reads (it keeps
    // empty policies for internal names and drops the last empty one),
    // so such configs are adapted whole.
    let set = policies.iter().filter(|p| !p.settings.is_empty()).count();
    if set > 0 && set < policies.len() {
        let plain = policies.iter().find(|p| p.settings.is_empty());
        return Err(Reason::new(
            "tls-automation-mixed",
            format!(
                "some sites set TLS automation options (tls directive) and others do not ({:?})",
                plain.map(|p| &p.subjects)
            ),
        ));
    }
    if set > 0 {
        if let Some(policies) = consolidate(policies).filter(|p| !p.is_empty()) {
            let mut subjects = HashSet::new();
            for policy in &policies {
                for subject in &policy.subjects {
                    if !subjects.insert(subject) {
                        return Err(Reason::new(
                            "overlapping-policies",
                            format!(
                                "hostname appears in more than one automation policy: {subject}"
                            ),
                        ));
                    }
                }
            }
            config["apps"]["tls"]["automation"]["policies"] =
                Value::Array(policies.iter().map(Policy::to_json).collect());
        }
    }
    let skeleton = config.to_string();
    let cut = cut(&skeleton, "routes", server_routes.len()).ok_or_else(|| {
        Reason::new(
            "markers",
            "the global options hold a value that looks like a routes marker",
        )
    })?;
    let mut out = String::with_capacity(skeleton.len() + server_routes.len() * 4096);
    cut.write(&mut out, |out, n| write_routes(out, &server_routes[n]));
    RawValue::from_string(out).map_err(|error| {
        Reason::new(
            "composed-json",
            format!("the composed config is not JSON ({error})"),
        )
    })
}

/// The first path where `a` and `b` differ, for naming what a site adds.
pub fn first_difference(a: &Value, b: &Value, path: &mut String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()) {
                let (p, q) = (x.get(key), y.get(key));
                if p != q {
                    let len = path.len();
                    path.push('.');
                    path.push_str(key);
                    let found = match (p, q) {
                        (Some(p), Some(q)) => first_difference(p, q, path),
                        _ => Some(path.clone()),
                    };
                    path.truncate(len);
                    return found;
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    let len = path.len();
                    path.push('.');
                    path.push_str(&i.to_string());
                    let found = first_difference(p, q, path);
                    path.truncate(len);
                    return found;
                }
            }
            None
        }
        _ if a == b => None,
        _ => Some(path.clone()),
    }
}
