//! One site's share of the config, read from what Caddy adapted for that
//! site alone (with the global options, the snippets and a probe site).
//!
//! The probe is a site on a listener that sorts after every other one,
//! so its server comes last and the site's own JSON is what it would be
//! without it; its two `rewrite` groups tell how many route groups the
//! site's directives took from Caddy's group counter (`a`: while the
//! directives were parsed, `b`: when the site's routes were built), and
//! its TLS automation policy keeps the site's own policies from being
//! dropped as "all empty".

use std::collections::HashMap;

use caddy_fleet_schema::caddyfile::Block;
use serde_json::{Map, Value};

use super::address::{parse_keys, Address};
use super::text;
use super::tls::Policy;
use super::Reason;

/// The probe site appended to every site adapted alone.
pub const PROBE: &str = "https://caddy-fleet-probe.invalid:1 {\n\tbind ~caddy-fleet-probe\n\ttls {\n\t\tissuer internal\n\t\tkey_type p384\n\t}\n\thandle /caddy-fleet-probe {\n\t\trewrite /caddy-fleet-probe\n\t}\n\trewrite /caddy-fleet-probe\n}\n";
/// The probe's listener address and host, as Caddy writes them.
pub const PROBE_LISTEN: &str = "~caddy-fleet-probe:1";
pub const PROBE_HOST: &str = "caddy-fleet-probe.invalid";

/// A `group` field in a site's routes: when Caddy's counter gave it
/// (`site`: when the site's routes were built), and its number.
#[derive(Debug, Clone)]
pub struct GroupRef {
    pub site_phase: bool,
    pub local: u64,
}

/// A site's routes as JSON text (the list's items, without its brackets),
/// cut where each route group's name goes, so composing writes the
/// numbers the whole config gives them between the pieces.
#[derive(Debug, Clone, Default)]
pub struct RouteText {
    cut: text::Cut,
    /// The groups, by hole number.
    groups: Vec<GroupRef>,
}

impl RouteText {
    /// `routes` with the groups at `found` (JSON pointers under the list)
    /// cut out; `None` if they cannot be cut (a string of the routes looks
    /// like a marker).
    fn new(mut list: Value, found: Vec<(String, GroupRef)>) -> Option<RouteText> {
        for (n, (pointer, _)) in found.iter().enumerate() {
            *list.pointer_mut(pointer)? = text::marker("group", n);
        }
        let json = list.to_string();
        let inner = json.strip_prefix('[')?.strip_suffix(']')?;
        let cut = text::cut(inner, "group", found.len())?;
        Some(RouteText {
            cut,
            groups: found.into_iter().map(|(_, group)| group).collect(),
        })
    }

    /// Whether the list has no route.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.cut.pieces.iter().all(String::is_empty)
    }

    /// Writes the list's items, each group named by `number`.
    pub fn write(&self, out: &mut String, number: impl Fn(&GroupRef) -> u64) {
        self.cut.write(out, |out, n| {
            out.push_str("\"group");
            out.push_str(&number(&self.groups[n]).to_string());
            out.push('"');
        });
    }
}

/// What one site contributes, and what decides how it combines.
#[derive(Debug, Clone)]
pub struct Site {
    pub key_texts: Vec<String>,
    pub keys: Vec<Address>,
    /// The block has a `tls` directive (which always adds a connection
    /// policy to its pile, enabling TLS for hostless addresses).
    pub uses_tls: bool,
    pub listen: Vec<String>,
    /// Server fields from global `servers` options.
    pub extras: Map<String, Value>,
    /// `automatic_https` without `skip` (the global `auto_https` flags).
    pub flags: Map<String, Value>,
    /// The matcher sets of the site's route (from its addresses), as a
    /// JSON list; `None` when it has none.
    pub matchers: Option<String>,
    /// The site's subroute: its directives' routes.
    pub routes: RouteText,
    /// Whether a route of the site's own has a host matcher.
    pub host_matcher: bool,
    /// Group numbers taken while parsing (`a`) and while building (`b`).
    pub a: u64,
    pub b: u64,
    /// The local number of the site's first build-time group (after its
    /// own parse-time ones and, when adapted with the probe, the probe's).
    pub build_base: u64,
    /// Its TLS automation policies, in the order the adapter made them.
    pub policies: Vec<Policy>,
}

/// What the global options decide for every site.
#[derive(Debug, Clone)]
pub struct Globals {
    /// What Caddy adapts from the global options alone.
    pub skeleton: Value,
    pub http_port: u16,
    pub https_port: u16,
    pub default_sni: String,
    pub fallback_sni: String,
    pub snippets: HashMap<String, Block>,
}

/// Reads the global options that steer composition; a `Reason` for those
/// whose effect spans sites in ways not reproduced.
pub fn globals(
    global: Option<&Block>,
    snippets: HashMap<String, Block>,
    probe_alone: &Value,
) -> Result<Globals, Reason> {
    // What the global options make besides the probe's server and policy.
    let mut skeleton = probe_alone.clone();
    let servers = skeleton["apps"]["http"]["servers"]
        .as_object()
        .map(|s| s.len());
    if servers != Some(1) {
        return Err(Reason::new(
            "global-options",
            "the global options alone make servers",
        ));
    }
    if let Some(http) = skeleton["apps"]["http"].as_object_mut() {
        http.remove("servers");
    }
    let policies = skeleton["apps"]["tls"]["automation"]
        .as_object_mut()
        .and_then(|a| a.remove("policies"))
        .unwrap_or_default();
    if policies.as_array().map(Vec::len) != Some(1) {
        return Err(Reason::new(
            "global-tls-automation",
            "global options make a catch-all TLS automation policy (cert_issuer, local_certs, key_type or ocsp_stapling)",
        ));
    }
    prune(&mut skeleton, &["apps", "tls", "automation"]);
    let apps = &skeleton["apps"];
    let port = |name: &str, default: u16| -> Result<u16, Reason> {
        match apps["http"].get(name) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| Reason::new("global-options", format!("{name} is not a port"))),
        }
    };
    let mut globals = Globals {
        http_port: port("http_port", 80)?,
        https_port: port("https_port", 443)?,
        skeleton,
        default_sni: String::new(),
        fallback_sni: String::new(),
        snippets,
    };
    for option in global.map(|g| g.children.as_slice()).unwrap_or_default() {
        let name = option.keys.first().map(String::as_str).unwrap_or("");
        let value = || option.keys.get(1).cloned().unwrap_or_default();
        match name {
            "default_sni" => globals.default_sni = value(),
            "fallback_sni" => globals.fallback_sni = value(),
            "auto_https" if value() == "prefer_wildcard" => {
                return Err(Reason::new(
                    "global-auto-https-prefer-wildcard",
                    "auto_https prefer_wildcard weighs every site's names against the others'",
                ))
            }
            "cert_issuer" | "local_certs" | "key_type" | "ocsp_stapling" => {
                return Err(Reason::new(
                    "global-tls-automation",
                    format!("global option {name} makes a catch-all TLS automation policy"),
                ))
            }
            _ => {}
        }
        if matches!(name, "default_sni" | "fallback_sni") && value().contains('{') {
            return Err(Reason::new(
                "global-options",
                format!("{name} holds a placeholder"),
            ));
        }
    }
    Ok(globals)
}

/// Removes the empty objects along `path` (deepest first), as Caddy
/// leaves out empty apps and settings.
pub fn prune(value: &mut Value, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = &mut *value;
    for key in parents {
        match node.get_mut(*key) {
            Some(next) => node = next,
            None => return,
        }
    }
    let empty = match node.get(*last) {
        Some(Value::Object(map)) => map.is_empty(),
        Some(Value::Null) => true,
        _ => false,
    };
    if empty {
        if let Some(map) = node.as_object_mut() {
            map.remove(*last);
        }
    }
    prune(value, parents);
}

/// Whether a block uses the `tls` directive, directly or in a snippet it
/// imports; `Err` for an import that is not a snippet (a file).
pub fn uses_tls(
    block: &Block,
    snippets: &HashMap<String, Block>,
    depth: usize,
) -> Result<bool, Reason> {
    if depth > 16 {
        return Err(Reason::new("import", "snippets import each other too deep"));
    }
    for child in &block.children {
        match child.keys.first().map(String::as_str) {
            Some("tls") => return Ok(true),
            Some("import") => {
                let name = child.keys.get(1).map(String::as_str).unwrap_or("");
                match snippets.get(name) {
                    Some(snippet) => {
                        if uses_tls(snippet, snippets, depth + 1)? {
                            return Ok(true);
                        }
                    }
                    None => {
                        return Err(Reason::new(
                            "import",
                            format!("the site imports {name:?}, which is not a snippet"),
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

fn group_number(value: &Value) -> Option<u64> {
    value.as_str()?.strip_prefix("group")?.parse().ok()
}

/// Every `group` of a route list, with its JSON pointer under the list;
/// `top` for the list's own routes.
fn collect_groups(
    value: &Value,
    pointer: &mut String,
    depth: usize,
    out: &mut Vec<(String, usize, u64)>,
) -> Result<(), Reason> {
    match value {
        Value::Object(map) => {
            if let Some(group) = map.get("group") {
                let number = group_number(group).ok_or_else(|| {
                    Reason::new(
                        "groups",
                        format!("a route group named {group} is not Caddy's own"),
                    )
                })?;
                out.push((format!("{pointer}/group"), depth, number));
            }
            for (key, child) in map {
                if key == "group" {
                    continue;
                }
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                collect_groups(child, pointer, depth + 1, out)?;
                pointer.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&i.to_string());
                collect_groups(child, pointer, depth + 1, out)?;
                pointer.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The inner routes of a site's wrapper route, if `route` is one:
/// terminal, no fields but `match`, `handle` (one `subroute`) and
/// `terminal`.
fn wrapper_parts(route: &Value) -> Option<(Vec<Value>, Vec<Value>)> {
    let map = route.as_object()?;
    if map.get("terminal") != Some(&Value::Bool(true))
        || map
            .keys()
            .any(|k| !matches!(k.as_str(), "match" | "handle" | "terminal"))
    {
        return None;
    }
    let matchers = match map.get("match") {
        Some(m) => m.as_array()?.clone(),
        None => Vec::new(),
    };
    let routes = match map.get("handle") {
        None => Vec::new(),
        Some(handle) => {
            let handle = handle.as_array()?;
            let [subroute] = handle.as_slice() else {
                return None;
            };
            let sub = subroute.as_object()?;
            if sub.get("handler")? != "subroute"
                || sub.keys().any(|k| k != "handler" && k != "routes")
            {
                return None;
            }
            sub.get("routes")?.as_array()?.clone()
        }
    };
    Some((matchers, routes))
}

/// Whether any route of the list has a host matcher of its own.
fn has_host_matcher(routes: &[Value]) -> bool {
    routes.iter().any(|r| {
        r["match"]
            .as_array()
            .is_some_and(|sets| sets.iter().any(|s| s.get("host").is_some()))
    })
}

/// The probe's two group numbers in an adapted config: the one given while
/// parsing (its nested `rewrite`) and the one given when its routes were
/// built (its top-level `rewrite`).
fn probe_groups(server: &Value) -> Option<(u64, u64)> {
    let (_, routes) = wrapper_parts(server["routes"].as_array()?.first()?)?;
    let top = routes.iter().find_map(|r| group_number(r.get("group")?))?;
    let mut found = Vec::new();
    collect_groups(&Value::Array(routes), &mut String::new(), 0, &mut found).ok()?;
    let nested = found.iter().find(|(_, depth, _)| *depth > 1)?.2;
    Some((nested, top))
}

/// Reads a site's share from `out`, Caddy's adapt of the global options,
/// the snippets, the site and the probe. `probe` is false only for the
/// probe itself, adapted without one (its groups are known: 1 and 1).
pub fn extract(out: &Value, block: &Block, globals: &Globals, probe: bool) -> Result<Site, Reason> {
    let (key_texts, keys) = parse_keys(&block.keys).ok_or_else(|| {
        Reason::new(
            "address",
            format!(
                "site address {:?} is not one composition reads",
                block.keys.join(" ")
            ),
        )
    })?;
    if keys.iter().any(|k| k.host.is_empty()) && keys.iter().any(|k| !k.host.is_empty()) {
        return Err(Reason::new(
            "catch-all-with-hosts",
            "a site mixes a catch-all address with host names (their certificates depend on every site)",
        ));
    }
    let uses_tls = uses_tls(block, &globals.snippets, 0)?;
    let servers = out["apps"]["http"]["servers"]
        .as_object()
        .ok_or_else(|| Reason::new("no-server", "the site adapts to no server"))?;
    let (a, b) = if probe {
        let last = format!("srv{}", servers.len() - 1);
        let probe_server = servers
            .get(&last)
            .filter(|s| s["listen"] == Value::Array(vec![PROBE_LISTEN.into()]))
            .ok_or_else(|| {
                Reason::new(
                    "server-names",
                    "the probe's server is not the last one (servers named or ordered otherwise)",
                )
            })?;
        let (nested, top) = probe_groups(probe_server)
            .ok_or_else(|| Reason::new("groups", "the probe's route groups were not found"))?;
        if top < nested + 2 {
            return Err(Reason::new(
                "groups",
                "the probe's route groups are out of order",
            ));
        }
        (nested, top - nested - 1)
    } else {
        (1, 1)
    };
    // With the probe, its one parse-time group comes before the site's
    // build-time ones.
    let build_base = if probe { a + 1 } else { a };
    let own: Vec<(&String, &Value)> = servers
        .iter()
        .filter(|(_, s)| !probe || s["listen"] != Value::Array(vec![PROBE_LISTEN.into()]))
        .collect();
    let [(name, server)] = own.as_slice() else {
        return Err(Reason::new(
            "several-listeners",
            "the site's addresses listen on several sets of addresses (one server each)",
        ));
    };
    if name.as_str() != "srv0" {
        return Err(Reason::new(
            "server-names",
            format!("the site's server is named {name}"),
        ));
    }
    let server = server
        .as_object()
        .ok_or_else(|| Reason::new("no-server", "the server is not an object"))?;
    let mut extras = Map::new();
    let mut listen = Vec::new();
    let mut flags = Map::new();
    let mut observed_routes = Vec::new();
    for (key, value) in server {
        match key.as_str() {
            "listen" => {
                listen = value
                    .as_array()
                    .and_then(|l| l.iter().map(|a| a.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| Reason::new("listen", "listen is not a list of addresses"))?;
            }
            "routes" => observed_routes = value.as_array().cloned().unwrap_or_default(),
            "automatic_https" => {
                flags = value.as_object().cloned().unwrap_or_default();
                flags.remove("skip");
            }
            "tls_connection_policies" => {
                let only_catch_all = value.as_array().is_some_and(|cps| {
                    cps.len() == 1
                        && cps[0].as_object().is_some_and(|cp| {
                            cp.keys().all(|k| k == "default_sni" || k == "fallback_sni")
                        })
                });
                if !only_catch_all {
                    return Err(Reason::new(
                        "tls-connection-policies",
                        "the site's tls directive sets connection policy options",
                    ));
                }
            }
            "listen_protocols" => {
                return Err(Reason::new(
                    "listen-protocols",
                    "the site binds with listen protocols",
                ))
            }
            "logs" => {
                return Err(Reason::new(
                    "access-log",
                    "the site has an access log (log directive)",
                ))
            }
            "errors" => {
                return Err(Reason::new(
                    "handle-errors",
                    "the site handles errors (handle_errors)",
                ))
            }
            "named_routes" => {
                return Err(Reason::new("named-routes", "the site invokes named routes"))
            }
            "listener_wrappers" => {
                return Err(Reason::new(
                    "listener-wrappers",
                    "the site adds listener wrappers",
                ))
            }
            _ => {
                extras.insert(key.clone(), value.clone());
            }
        }
    }
    let hostless_pathless = keys.iter().all(|k| k.host.is_empty() && k.path.is_empty());
    let (matchers, routes) = match observed_routes.as_slice() {
        [] => (Vec::new(), Vec::new()),
        [route] => match wrapper_parts(route) {
            Some((m, r)) if !m.is_empty() || has_host_matcher(&r) || !hostless_pathless => (m, r),
            _ if hostless_pathless => (Vec::new(), observed_routes.clone()),
            _ => {
                return Err(Reason::new(
                    "routes",
                    "the site's route is not a site wrapper",
                ))
            }
        },
        _ if hostless_pathless => (Vec::new(), observed_routes.clone()),
        _ => return Err(Reason::new("routes", "the site adapts to several routes")),
    };
    let mut found = Vec::new();
    let routes = Value::Array(routes);
    collect_groups(&routes, &mut String::new(), 0, &mut found)?;
    let mut groups = Vec::new();
    for (pointer, depth, number) in found {
        let site_phase = depth == 1;
        let ok = if site_phase {
            number >= build_base && number < build_base + b
        } else {
            number < a
        };
        if !ok {
            return Err(Reason::new(
                "groups",
                "a route group number is outside the site's share",
            ));
        }
        groups.push((
            pointer,
            GroupRef {
                site_phase,
                local: number,
            },
        ));
    }
    let host_matcher = routes.as_array().is_some_and(|r| has_host_matcher(r));
    let matchers = (!matchers.is_empty()).then(|| Value::Array(matchers).to_string());
    let routes = RouteText::new(routes, groups).ok_or_else(|| {
        Reason::new(
            "groups",
            "the site's routes hold a value that looks like a route group marker",
        )
    })?;
    let mut policies = Vec::new();
    for policy in out["apps"]["tls"]["automation"]["policies"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let policy = Policy::from_json(policy).ok_or_else(|| {
            Reason::new(
                "tls-automation",
                "an automation policy is not one composition reads",
            )
        })?;
        if probe && policy.subjects.iter().any(|s| s == PROBE_HOST) {
            if policy.subjects.len() != 1 {
                return Err(Reason::new(
                    "tls-automation",
                    "the site's policy merged with the probe's",
                ));
            }
            continue;
        }
        policies.push(policy);
    }
    // The adapter appends a block's policy, then (when it split public
    // from internal names) the one for internal names, with only the
    // internal issuer; consolidation may have put them the other way.
    if policies.len() == 2
        && !policies[0].has_all_public_names()
        && policies[1].has_all_public_names()
    {
        policies.swap(0, 1);
    }
    if policies.len() > 2 {
        return Err(Reason::new(
            "tls-automation",
            "the site has more than two automation policies",
        ));
    }
    Ok(Site {
        key_texts,
        keys,
        uses_tls,
        listen,
        extras,
        flags,
        matchers,
        routes,
        host_matcher,
        a,
        b,
        build_base,
        policies,
    })
}
