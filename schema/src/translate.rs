//! Container facts → one Caddyfile: each routable container's labels are
//! translated with caddy-docker-proxy's grammar ([`crate::labels`]), its
//! `{{upstreams}}` resolved from its facts, and the results merged after
//! the user's base Caddyfile the way caddy-docker-proxy merges them, so one
//! domain on three hosts becomes one site with three upstreams.
//!
//! A container whose labels cannot be translated is left out with a
//! [`Rejected`] entry; it never affects other containers.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use crate::caddyfile::{
    merge_marshaled, proxy_matcher, Block, Caddyfile, Marshaled, MarshaledBlock,
};
use crate::dynamic::{DynamicUpstreams, ProxyModes};
use crate::event::ContainerFacts;
use crate::labels::{from_labels, LabelError};
use crate::policy::{Grant, Policy};
use crate::restrict::{self, is_never_an_upstream, OwnUpstreams};
use crate::state::{ContainerRecord, RouteState};
use crate::subject::AgentId;
use crate::template::Upstreams;

/// How labels are read and upstreams resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateOptions {
    /// The label prefix (`caddy` unless configured otherwise).
    pub label_prefix: String,
    /// The agent running next to Caddy (server mode), whose containers may
    /// be reached on a shared Docker network instead of published ports.
    pub local: Option<LocalNetwork>,
    /// Which agents may serve which sites and upstreams, and whose labels
    /// are trusted with the full grammar.
    pub policy: Policy,
    /// Caddy's own addresses, never an upstream of an untrusted agent.
    pub caddy_addresses: BTreeSet<IpAddr>,
    /// Given to every generated `reverse_proxy` that does not set its own
    /// (`STREAM_CLOSE_DELAY`): Caddy then keeps a WebSocket or other
    /// stream open this long after a push unloads its config, instead of
    /// closing it at once.
    pub stream_close_delay: Option<Duration>,
    /// The sites this applier serves when several split the fleet
    /// (`APPLIER_DOMAINS`); `None` serves every site. Applied after
    /// ownership is decided ([`crate::shard`]), so it never changes who
    /// owns a site.
    pub shard: Option<crate::shard::DomainShard>,
    /// Given to every generated `reverse_proxy` that sets neither its own
    /// `lb_try_duration` nor `lb_retries` (`PROXY_TRY_DURATION`): a
    /// request whose upstream cannot be reached (a container routed a
    /// moment before it listens, or one that just went away) is tried
    /// again on the site's upstreams for up to this long, instead of
    /// failing. Caddy retries only what is safe: any request that never
    /// reached an upstream, and GETs otherwise.
    pub proxy_try_duration: Option<Duration>,
    /// `UPSTREAMS=dynamic`: generated proxies look their upstreams up in
    /// the applier's DNS ([`crate::dynamic`]) instead of listing them;
    /// `None` lists them (static).
    pub dynamic_upstreams: Option<DynamicUpstreams>,
}

/// Reaching the local agent's containers on a Docker network, as
/// caddy-docker-proxy does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNetwork {
    /// The agent whose containers share a network with Caddy.
    pub agent: AgentId,
    /// The network's name.
    pub network: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            label_prefix: "caddy".to_string(),
            local: None,
            policy: Policy::default(),
            caddy_addresses: BTreeSet::new(),
            stream_close_delay: None,
            shard: None,
            proxy_try_duration: None,
            dynamic_upstreams: None,
        }
    }
}

impl TranslateOptions {
    /// Options that trust every agent with everything, as
    /// caddy-docker-proxy does (tests, `caddy-fleet labels`).
    pub fn trusting() -> Self {
        TranslateOptions {
            policy: Policy::trust_everyone(),
            ..TranslateOptions::default()
        }
    }
}

/// A container left out of the generated config, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The agent running the container.
    pub agent: String,
    /// The container's name.
    pub container: String,
    /// The container's ID.
    pub container_id: String,
    /// Who refused it.
    pub by: RefusedBy,
    /// Why, in one line.
    pub reason: String,
}

/// Who left a container out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// Its labels cannot be translated.
    Labels,
    /// The policy does not grant what its labels ask for.
    Policy,
}

impl RefusedBy {
    /// `labels` or `policy`, as `/status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedBy::Labels => "labels",
            RefusedBy::Policy => "policy",
        }
    }
}

/// Which container serves each site address, from one translation to the
/// next: a site stays with the container serving it, and a newcomer that
/// declares it differently is refused instead (conflicts never punish the
/// owner).
pub type SiteOwners = BTreeMap<String, String>;

/// The merged config and the containers that could not contribute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// The base Caddyfile with every container's blocks merged in.
    pub caddyfile: Caddyfile,
    /// Containers left out.
    pub rejected: Vec<Rejected>,
}

/// One routable container's translated labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerUnit {
    /// The agent running the container.
    pub agent: AgentId,
    /// The container's name.
    pub container: String,
    /// The container's ID.
    pub container_id: String,
    /// Its blocks, upstreams resolved. Shared with the translation cache
    /// (a render copies no container's blocks), as are `text` and
    /// `proxies`.
    pub file: Arc<Caddyfile>,
    /// `file` marshalled: identifies what this container contributes.
    pub text: Arc<str>,
    /// Where each of `file`'s blocks is in `text`
    /// ([`Caddyfile::marshal_spans`]), so a push writes no block again.
    pub spans: Arc<[Range<usize>]>,
    /// Whether its agent is trusted with the full grammar; an untrusted
    /// container's adapted JSON is checked again before it is loaded.
    pub trusted: bool,
    /// Its handlers whose upstreams are looked up by DNS, with what it
    /// adds to each name's answer, and those kept static (dynamic mode).
    pub proxies: Arc<ProxyModes>,
}

/// Translates every routable container of `state` whose agent is not in
/// `skip_agents`, in the state's stable order (agent, then container ID).
pub fn translate_units(
    state: &RouteState,
    options: &TranslateOptions,
    skip_agents: &BTreeSet<AgentId>,
) -> (Vec<ContainerUnit>, Vec<Rejected>) {
    let (units, rejected, _) = translate_owned(state, options, skip_agents, &SiteOwners::new());
    (units, rejected)
}

/// [`translate_units`], keeping each site with the container that owned it
/// in `owners` (the previous translation's), and returning the new owners.
///
/// Per container: labels → Caddyfile; the policy's grant for its agent
/// (none: refused by policy); for an untrusted agent, the restricted
/// grammar ([`restrict::check`]). Then, in order of ownership (current
/// owners first, then by the stream sequence of their facts), each site
/// address is claimed: a container declaring a site another container
/// already holds, with different blocks (upstreams aside), is refused with
/// a reason naming the owner, unless both are trusted (then they merge, as
/// in caddy-docker-proxy). Identical declarations load-balance.
pub fn translate_owned(
    state: &RouteState,
    options: &TranslateOptions,
    skip_agents: &BTreeSet<AgentId>,
    owners: &SiteOwners,
) -> (Vec<ContainerUnit>, Vec<Rejected>, SiteOwners) {
    translate_owned_cached(
        state,
        options,
        skip_agents,
        owners,
        &mut TranslationCache::default(),
    )
}

/// One container translated on its own: its blocks (upstreams resolved,
/// policy and restricted grammar checked, stream close delay given), their
/// text, and whether its agent is trusted.
#[derive(Debug, Clone)]
struct Translated {
    file: Arc<Caddyfile>,
    text: Arc<str>,
    spans: Arc<[Range<usize>]>,
    trusted: bool,
    proxies: Arc<ProxyModes>,
}

/// A container's translation, or why it is refused, and the sequence of
/// the `up` it was made from.
type CachedTranslation = (u64, Result<Translated, (RefusedBy, String)>);

/// Per-container translations kept from one render to the next, so a push
/// translates and marshals only the containers whose facts changed.
///
/// An entry is keyed by agent and container ID and holds the stream sequence of the
/// `up` its facts came from: facts at the same sequence are the same
/// facts, so the entry is reused as long as the options are unchanged
/// (any change of options, e.g. a policy reload, starts over).
#[derive(Debug, Default)]
pub struct TranslationCache {
    options: Option<TranslateOptions>,
    /// By agent, then container ID: looked up without building a key.
    entries: HashMap<AgentId, HashMap<String, CachedTranslation>>,
    /// Containers translated (not taken from the cache) by the last render.
    pub translated_last: usize,
}

fn translate_one(
    facts: &ContainerFacts,
    options: &TranslateOptions,
) -> Result<Translated, (RefusedBy, String)> {
    let grant = options
        .policy
        .grant(&facts.agent)
        .map_err(|reason| (RefusedBy::Policy, reason))?;
    let (mut file, resolved) = translate_container_resolving(facts, options)
        .map_err(|e| (RefusedBy::Labels, e.to_string()))?;
    if !grant.trusted {
        let own = own_upstreams(facts, grant, options);
        restrict::check(&file, grant, &own).map_err(|reason| (RefusedBy::Policy, reason))?;
    }
    if let Some(delay) = options.stream_close_delay {
        file.set_default_option("reverse_proxy", "stream_close_delay", &go_duration(delay));
    }
    if let Some(patience) = options.proxy_try_duration.filter(|d| !d.is_zero()) {
        // First, so that labels giving their own try duration keep
        // Caddy's interval with it.
        file.set_default_option_unless(
            "reverse_proxy",
            "lb_try_interval",
            &go_duration(PROXY_TRY_INTERVAL),
            &["lb_retries", "lb_try_duration"],
        );
        file.set_default_option_unless(
            "reverse_proxy",
            "lb_try_duration",
            &go_duration(patience),
            &["lb_retries"],
        );
    }
    // Last: the policy and the restricted grammar checked the upstreams
    // the labels resolved to, which are what the answers will hold.
    let proxies = match &options.dynamic_upstreams {
        Some(dynamic) => crate::dynamic::rewrite(&mut file, &resolved, dynamic),
        None => ProxyModes::default(),
    };
    let (text, spans) = file.marshal_spans();
    Ok(Translated {
        text: text.into(),
        spans: spans.into(),
        file: Arc::new(file),
        trusted: grant.trusted,
        proxies: Arc::new(proxies),
    })
}

/// A duration as Caddy reads it (Go's `time.ParseDuration`).
/// How long a generated `reverse_proxy` waits before it tries again
/// (Caddy's `lb_try_interval`, 250 ms unless set), given with
/// [`TranslateOptions::proxy_try_duration`]. A retry pending when Caddy
/// loads a new config is dropped (the handler's context is the unloaded
/// config's) and the request gets a 502, so the wait is the window in
/// which a push fails a request whose upstream was routed a moment before
/// it listens; short, it is rarely hit.
pub const PROXY_TRY_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) fn go_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// [`translate_owned`], reusing the translations in `cache` of containers
/// whose facts did not change.
pub fn translate_owned_cached(
    state: &RouteState,
    options: &TranslateOptions,
    skip_agents: &BTreeSet<AgentId>,
    owners: &SiteOwners,
    cache: &mut TranslationCache,
) -> (Vec<ContainerUnit>, Vec<Rejected>, SiteOwners) {
    if cache.options.as_ref() != Some(options) {
        cache.entries.clear();
        cache.options = Some(options.clone());
    }
    let routable: Vec<&ContainerRecord> = state
        .live_containers()
        .filter(|r| r.facts.is_routable() && !skip_agents.contains(&r.facts.agent))
        .collect();
    cache.translated_last = 0;
    for record in &routable {
        let facts = &record.facts;
        let fresh = cache
            .entries
            .get(&facts.agent)
            .and_then(|of_agent| of_agent.get(&facts.id))
            .is_some_and(|(seq, _)| *seq == record.seq);
        if !fresh {
            cache.translated_last += 1;
            let translated = translate_one(facts, options);
            cache
                .entries
                .entry(facts.agent.clone())
                .or_default()
                .insert(facts.id.clone(), (record.seq, translated));
        }
    }
    if cache.entries.values().map(HashMap::len).sum::<usize>() > routable.len() {
        let live: std::collections::HashSet<(&AgentId, &str)> = routable
            .iter()
            .map(|r| (&r.facts.agent, r.facts.id.as_str()))
            .collect();
        for (agent, of_agent) in &mut cache.entries {
            of_agent.retain(|id, _| live.contains(&(agent, id.as_str())));
        }
        cache.entries.retain(|_, of_agent| !of_agent.is_empty());
    }

    let mut candidates: Vec<(&ContainerRecord, &Translated)> = Vec::new();
    let mut rejected = Vec::new();
    let refuse = |record: &ContainerRecord, by: RefusedBy, reason: String| Rejected {
        agent: record.facts.agent.to_string(),
        container: record.facts.name.clone(),
        container_id: record.facts.id.clone(),
        by,
        reason,
    };
    for record in routable {
        let cached = cache
            .entries
            .get(&record.facts.agent)
            .and_then(|of_agent| of_agent.get(&record.facts.id));
        match cached.map(|(_, t)| t) {
            Some(Ok(translated)) => candidates.push((record, translated)),
            Some(Err((by, reason))) => rejected.push(refuse(record, *by, reason.clone())),
            None => {}
        }
    }

    // Claims: current owners first, then first come (stream order).
    // Each container's key is computed once (a key function called per
    // comparison looked the owner set up n·log n times: most of a render
    // at 10,000 containers); the index keeps the order stable.
    let owned: std::collections::HashSet<&str> = owners.values().map(String::as_str).collect();
    let mut order: Vec<(bool, u64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, (record, _))| (!owned.contains(record.facts.id.as_str()), record.seq, i))
        .collect();
    order.sort_unstable();
    let order = order.into_iter().map(|(_, _, i)| i);
    // Per site address: the owning candidate and its site block. Shapes
    // are compared only when a second container declares an address.
    let mut claims: BTreeMap<Cow<str>, (usize, &Block)> = BTreeMap::new();
    let mut accepted = vec![false; candidates.len()];
    'containers: for i in order {
        let (record, translated) = candidates[i];
        let (file, trusted) = (&translated.file, &translated.trusted);
        for block in &file.blocks {
            for address in &block.keys {
                let Some(&(owner, owner_block)) = claims.get(lowercase(address).as_ref()) else {
                    continue;
                };
                let (owner_record, owner) = candidates[owner];
                if !(*trusted && owner.trusted) && shape_of(owner_block) != shape_of(block) {
                    rejected.push(refuse(
                        record,
                        RefusedBy::Policy,
                        format!(
                            "site {address} is served by agent {} container {}; only identical declarations (upstreams aside) share a site",
                            owner_record.facts.agent, owner_record.facts.name
                        ),
                    ));
                    continue 'containers;
                }
            }
        }
        for block in &file.blocks {
            for address in &block.keys {
                claims.entry(lowercase(address)).or_insert((i, block));
            }
        }
        accepted[i] = true;
    }
    let owners = claims
        .into_iter()
        .map(|(address, (i, _))| (address.into_owned(), candidates[i].0.facts.id.clone()))
        .collect();

    let mut units = Vec::new();
    for ((record, translated), accepted) in candidates.into_iter().zip(accepted) {
        if accepted {
            units.push(ContainerUnit {
                agent: record.facts.agent.clone(),
                container: record.facts.name.clone(),
                container_id: record.facts.id.clone(),
                text: translated.text.clone(),
                spans: translated.spans.clone(),
                file: translated.file.clone(),
                trusted: translated.trusted,
                proxies: translated.proxies.clone(),
            });
        }
    }
    (units, rejected, owners)
}

/// `text` in lower case, copied only when it has upper case.
fn lowercase(text: &str) -> Cow<'_, str> {
    match text.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(text.to_ascii_lowercase()),
        false => Cow::Borrowed(text),
    }
}

/// A site block as it would be without its proxies' upstreams: what two
/// containers must agree on to share the site.
fn shape_of(block: &Block) -> String {
    fn strip(block: &Block) -> Block {
        let keys = if block.keys.first().map(String::as_str) == Some("reverse_proxy") {
            let (_, first_upstream) = proxy_matcher(block);
            block.keys[..first_upstream.min(block.keys.len())].to_vec()
        } else if block.keys.first().map(String::as_str) == Some("to") {
            vec!["to".to_string()]
        } else {
            block.keys.clone()
        };
        Block {
            keys,
            children: block.children.iter().map(strip).collect(),
            order: block.order,
        }
    }
    Caddyfile {
        blocks: strip(block).children,
    }
    .marshal()
}

/// Where a container of an untrusted agent may point: its published ports
/// at its host's address (pinned by `host_ip`, else the reported one, never
/// loopback, link-local or Caddy's own), and for the local agent its
/// addresses on the ingress network.
fn own_upstreams<'a>(
    facts: &'a ContainerFacts,
    grant: &Grant,
    options: &'a TranslateOptions,
) -> OwnUpstreams<'a> {
    let mut own = OwnUpstreams {
        forbidden: &options.caddy_addresses,
        ..OwnUpstreams::default()
    };
    if let Ok(ip) = facts.host_address.parse::<IpAddr>() {
        let acceptable = match &grant.host_ip {
            Some(pinned) => pinned.contains(&ip),
            None => !is_never_an_upstream(ip) && !options.caddy_addresses.contains(&ip),
        };
        if acceptable {
            own.host = Some(ip);
            own.ports = &facts.ports;
        }
    }
    if let Some(local) = options.local.as_ref().filter(|l| l.agent == facts.agent) {
        if let Some(ip) = facts
            .networks
            .get(&local.network)
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        {
            own.any_port.push(ip);
        }
    }
    own
}

/// Merges `units` after `base`, as caddy-docker-proxy merges containers.
pub fn assemble<'a>(
    base: Option<&Caddyfile>,
    units: impl IntoIterator<Item = &'a ContainerUnit>,
) -> Caddyfile {
    let mut file = base.cloned().unwrap_or_default();
    file.merge_all(units.into_iter().map(|u| Caddyfile::clone(&u.file)));
    file
}

/// [`assemble`] as its top-level blocks in marshal order, each with its
/// text ([`Caddyfile::marshal_blocks`]): what a push needs, made without
/// copying or writing again a block only one container has
/// ([`merge_marshaled`]).
pub fn assemble_marshaled<'a>(
    base: Option<&'a Caddyfile>,
    units: &[&'a ContainerUnit],
) -> Vec<MarshaledBlock<'a>> {
    let files: Vec<Marshaled> = units
        .iter()
        .map(|u| Marshaled {
            file: &u.file,
            text: &u.text,
            spans: &u.spans,
        })
        .collect();
    merge_marshaled(base, &files)
}

/// Translates every routable container of `state` and merges the results
/// after `base` (the user's Caddyfile), in the state's stable order.
pub fn translate_state(
    state: &RouteState,
    base: Option<&Caddyfile>,
    options: &TranslateOptions,
) -> Translation {
    let (units, rejected) = translate_units(state, options, &BTreeSet::new());
    Translation {
        caddyfile: assemble(base, &units),
        rejected,
    }
}

/// One container's labels as a Caddyfile, upstreams resolved.
pub fn translate_container(
    facts: &ContainerFacts,
    options: &TranslateOptions,
) -> Result<Caddyfile, LabelError> {
    translate_container_resolving(facts, options).map(|(file, _)| file)
}

/// [`translate_container`], and every address `{{upstreams}}` gave.
pub fn translate_container_resolving(
    facts: &ContainerFacts,
    options: &TranslateOptions,
) -> Result<(Caddyfile, BTreeSet<String>), LabelError> {
    let network = options
        .local
        .as_ref()
        .filter(|local| local.agent == facts.agent)
        .and_then(|local| facts.networks.get(&local.network));
    let upstreams = FactsUpstreams {
        facts,
        network,
        resolved: std::cell::RefCell::new(BTreeSet::new()),
    };
    let file = from_labels(&facts.labels, &options.label_prefix, &upstreams)?;
    Ok((file, upstreams.resolved.into_inner()))
}

/// `{{upstreams}}` for one container: its IP on the shared network (local
/// containers in server mode), else its agent's address and published ports.
struct FactsUpstreams<'a> {
    facts: &'a ContainerFacts,
    network: Option<&'a String>,
    /// Every address resolved so far.
    resolved: std::cell::RefCell<BTreeSet<String>>,
}

impl Upstreams for FactsUpstreams<'_> {
    fn resolve(&self, port: Option<u16>) -> Result<Vec<String>, String> {
        let addresses = self.addresses(port)?;
        self.resolved.borrow_mut().extend(addresses.iter().cloned());
        Ok(addresses)
    }
}

impl<'a> FactsUpstreams<'a> {
    #[cfg(test)]
    fn unshared(facts: &'a ContainerFacts) -> Self {
        FactsUpstreams {
            facts,
            network: None,
            resolved: std::cell::RefCell::new(BTreeSet::new()),
        }
    }

    fn addresses(&self, port: Option<u16>) -> Result<Vec<String>, String> {
        let facts = self.facts;
        // Docker may publish a port twice, on IPv4 and IPv6, even on
        // different host ports; only the bindings of the host address's
        // family are reachable at it (a DNS name counts as IPv4).
        let v6_host = facts.host_address.parse::<std::net::Ipv6Addr>().is_ok();
        let is_v6 = |ip: &str| ip.contains(':');
        let tcp_all: Vec<&crate::event::PortBinding> =
            facts.ports.iter().filter(|p| p.protocol == "tcp").collect();
        let family: Vec<&crate::event::PortBinding> = tcp_all
            .iter()
            .copied()
            .filter(|p| is_v6(&p.host_ip) == v6_host)
            .collect();
        let tcp = if family.is_empty() { tcp_all } else { family }.into_iter();
        if let Some(ip) = self.network {
            return Ok(vec![match port {
                Some(port) => format!("{ip}:{port}"),
                None => ip.clone(),
            }]);
        }
        let port = match port {
            Some(port) => port,
            None => {
                let ports: BTreeSet<u16> = tcp.clone().map(|p| p.container_port).collect();
                match ports.iter().next() {
                    Some(port) if ports.len() == 1 => *port,
                    _ => {
                        return Err(format!(
                            "{{{{upstreams}}}} needs a port: container {} publishes {} TCP ports; write {{{{upstreams <port>}}}}",
                            facts.name,
                            ports.len()
                        ))
                    }
                }
            }
        };
        let host_ports: BTreeSet<u16> = tcp
            .filter(|p| p.container_port == port)
            .map(|p| p.host_port)
            .collect();
        if host_ports.is_empty() {
            return Err(format!(
                "no published port for {port}/tcp on container {}",
                facts.name
            ));
        }
        let host = if v6_host {
            format!("[{}]", facts.host_address)
        } else {
            facts.host_address.clone()
        };
        Ok(host_ports
            .iter()
            .map(|host_port| format!("{host}:{host_port}"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::event::{ContainerState, Event, PortBinding};
    use crate::Health;

    fn facts(
        agent: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(u16, u16)],
    ) -> ContainerFacts {
        ContainerFacts {
            agent: AgentId::new(agent).unwrap(),
            id: format!("id-{name}"),
            name: name.to_string(),
            host_address: format!("host-{agent}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: ports
                .iter()
                .flat_map(|(c, h)| {
                    ["0.0.0.0", "::"].map(|ip| PortBinding {
                        container_port: *c,
                        protocol: "tcp".into(),
                        host_ip: ip.into(),
                        host_port: *h,
                    })
                })
                .collect(),
            networks: BTreeMap::from([("front".to_string(), format!("172.18.0.{}", name.len()))]),
            state: ContainerState::Running,
            health: Health::None,
            observed_at_ms: 0,
        }
    }

    fn state(containers: Vec<ContainerFacts>) -> RouteState {
        let mut s = RouteState::default();
        for (i, f) in containers.into_iter().enumerate() {
            s.apply(i as u64 + 1, &Event::Up(f));
        }
        s
    }

    fn translate(containers: Vec<ContainerFacts>) -> Translation {
        translate_state(&state(containers), None, &TranslateOptions::trusting())
    }

    const PROXY: (&str, &str) = ("caddy.reverse_proxy", "{{upstreams 80}}");

    #[test]
    fn basic_labels_become_a_site_on_the_published_port() {
        let t = translate(vec![facts(
            "a1",
            "web",
            &[("caddy", "a.test"), PROXY],
            &[(80, 32768)],
        )]);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:32768\n}\n"
        );
        assert!(t.rejected.is_empty());
    }

    #[test]
    fn same_domain_on_three_hosts_is_one_load_balanced_site() {
        let t = translate(vec![
            facts("a3", "web", &[("caddy", "a.test"), PROXY], &[(80, 8003)]),
            facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 8001)]),
            facts("a2", "web", &[("caddy", "a.test"), PROXY], &[(80, 8002)]),
        ]);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:8001 host-a2:8002 host-a3:8003\n}\n"
        );
    }

    #[test]
    fn missing_published_port_rejects_only_that_container() {
        let t = translate(vec![
            facts("a1", "bad", &[("caddy", "b.test"), PROXY], &[(8080, 9000)]),
            facts("a1", "good", &[("caddy", "g.test"), PROXY], &[(80, 9001)]),
        ]);
        assert_eq!(
            t.caddyfile.marshal(),
            "g.test {\n\treverse_proxy host-a1:9001\n}\n"
        );
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(
            t.rejected[0].reason,
            "label caddy.reverse_proxy: no published port for 80/tcp on container bad"
        );
    }

    #[test]
    fn only_bindings_of_the_host_address_family_are_used() {
        let mut f = facts("a1", "web", &[], &[]);
        f.ports = vec![
            PortBinding {
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "0.0.0.0".into(),
                host_port: 33296,
            },
            PortBinding {
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "::".into(),
                host_port: 33297,
            },
        ];
        f.host_address = "10.0.0.2".into();
        assert_eq!(
            FactsUpstreams::unshared(&f).resolve(Some(80)).unwrap(),
            ["10.0.0.2:33296"]
        );
        f.host_address = "fd00::2".into();
        assert_eq!(
            FactsUpstreams::unshared(&f).resolve(Some(80)).unwrap(),
            ["[fd00::2]:33297"]
        );
        f.ports.remove(0);
        f.host_address = "10.0.0.2".into();
        assert_eq!(
            FactsUpstreams::unshared(&f).resolve(Some(80)).unwrap(),
            ["10.0.0.2:33297"],
            "falls back to what there is"
        );
    }

    #[test]
    fn several_bindings_give_one_upstream_each_and_bare_upstreams_needs_one_port() {
        let f = facts("a1", "web", &[], &[(80, 8001), (80, 8002), (443, 8443)]);
        let up = FactsUpstreams::unshared(&f);
        assert_eq!(
            up.resolve(Some(80)).unwrap(),
            ["host-a1:8001", "host-a1:8002"]
        );
        assert!(up
            .resolve(None)
            .unwrap_err()
            .contains("publishes 2 TCP ports"));
        let one = facts("a1", "one", &[], &[(443, 8443)]);
        assert_eq!(
            FactsUpstreams::unshared(&one).resolve(None).unwrap(),
            ["host-a1:8443"]
        );
    }

    #[test]
    fn local_containers_use_the_shared_network() {
        let options = TranslateOptions {
            local: Some(LocalNetwork {
                agent: AgentId::new("srv").unwrap(),
                network: "front".into(),
            }),
            ..TranslateOptions::trusting()
        };
        let local = facts("srv", "web", &[("caddy", "a.test"), PROXY], &[]);
        let remote = facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 8001)]);
        let t = translate_state(&state(vec![local, remote]), None, &options);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy host-a1:8001 172.18.0.3:80\n}\n"
        );
    }

    #[test]
    fn sites_merge_after_the_base_caddyfile() {
        let base =
            Caddyfile::parse("{\n\tadmin 127.0.0.1:2019\n}\nstatic.test {\n\trespond hi\n}\n")
                .unwrap();
        let s = state(vec![facts(
            "a1",
            "web",
            &[("caddy", "a.test"), PROXY],
            &[(80, 8001)],
        )]);
        let t = translate_state(&s, Some(&base), &TranslateOptions::trusting());
        assert_eq!(
            t.caddyfile.marshal(),
            "{\n\tadmin 127.0.0.1:2019\n}\nstatic.test {\n\trespond hi\n}\na.test {\n\treverse_proxy host-a1:8001\n}\n"
        );
    }

    fn granted(domains: &str) -> TranslateOptions {
        TranslateOptions {
            policy: Policy::parse(&format!(
                "[default]\ndomains = [{domains}]\nupstreams = [\"10.0.0.0/8\"]\n"
            ))
            .unwrap(),
            ..TranslateOptions::default()
        }
    }

    fn remote(agent: &str, name: &str, labels: &[(&str, &str)], port: u16) -> ContainerFacts {
        let mut f = facts(agent, name, labels, &[(80, port)]);
        f.host_address = format!("10.0.0.{}", agent.len());
        f
    }

    #[test]
    fn without_a_policy_remote_agents_are_refused_and_told_how_to_grant() {
        let s = state(vec![facts(
            "a1",
            "web",
            &[("caddy", "a.test"), PROXY],
            &[(80, 1)],
        )]);
        let (units, rejected) = translate_units(&s, &TranslateOptions::default(), &BTreeSet::new());
        assert!(units.is_empty());
        assert_eq!(rejected[0].by, RefusedBy::Policy);
        assert!(
            rejected[0].reason.contains("POLICY_FILE"),
            "{}",
            rejected[0].reason
        );
    }

    #[test]
    fn dynamic_upstreams_keep_a_deploys_text_and_answer_only_what_the_policy_allows() {
        let mut options = granted("\"a.test\"");
        options.dynamic_upstreams = Some(DynamicUpstreams {
            resolver: "127.0.0.1:8053".parse().unwrap(),
            refresh: Duration::from_secs(1),
            grace_period: Duration::from_secs(3600),
        });
        let labels = [("caddy", "a.test"), PROXY];
        let old = remote("a1", "web", &labels, 8001);
        let new = remote("a22", "web2", &labels, 9002);
        let text = |containers: Vec<ContainerFacts>| {
            translate_state(&state(containers), None, &options)
                .caddyfile
                .marshal()
        };
        let before = text(vec![old.clone()]);
        assert_eq!(before, text(vec![new.clone()]), "moved to another host");
        assert_eq!(before, text(vec![old.clone(), new.clone()]), "scaled out");
        assert!(!before.contains("10.0.0."), "{before}");
        assert_eq!(before.matches("dynamic srv").count(), 1, "{before}");

        let (units, rejected) = translate_units(&state(vec![old, new]), &options, &BTreeSet::new());
        assert!(rejected.is_empty(), "{rejected:?}");
        let proxies: Vec<&crate::dynamic::DynamicProxy> =
            units.iter().flat_map(|u| &u.proxies.dynamic).collect();
        assert_eq!(proxies.len(), 2);
        assert_eq!(proxies[0].name, proxies[1].name);
        let upstreams: BTreeSet<&str> = proxies
            .iter()
            .flat_map(|p| p.upstreams.iter().map(String::as_str))
            .collect();
        assert_eq!(
            upstreams,
            BTreeSet::from(["10.0.0.2:8001", "10.0.0.3:9002"])
        );

        // What the policy refuses never reaches an answer: a host address
        // that can never be an upstream, and labels asking for their own
        // dynamic upstreams.
        let mut loopback = remote("a1", "loop", &labels, 8001);
        loopback.host_address = "127.0.0.1".into();
        let sneaky = remote(
            "a333",
            "sneaky",
            &[
                ("caddy", "a.test"),
                ("caddy.reverse_proxy.dynamic", "srv evil.test"),
            ],
            8003,
        );
        let (units, rejected) =
            translate_units(&state(vec![loopback, sneaky]), &options, &BTreeSet::new());
        assert!(units.is_empty(), "{units:?}");
        assert_eq!(rejected.len(), 2);
        assert!(
            rejected.iter().all(|r| r.by == RefusedBy::Policy),
            "{rejected:?}"
        );
    }

    #[test]
    fn identical_declarations_on_granted_agents_load_balance() {
        let options = granted("\"a.test\"");
        let s = state(vec![
            remote("a1", "web", &[("caddy", "a.test"), PROXY], 8001),
            remote("a22", "web", &[("caddy", "a.test"), PROXY], 8002),
        ]);
        let t = translate_state(&s, None, &options);
        assert!(t.rejected.is_empty(), "{:?}", t.rejected);
        assert_eq!(
            t.caddyfile.marshal(),
            "a.test {\n\treverse_proxy 10.0.0.2:8001 10.0.0.3:8002\n}\n"
        );
    }

    #[test]
    fn a_newcomer_declaring_a_site_differently_is_refused_and_the_owner_keeps_it() {
        let options = granted("\"a.test\"");
        let owner = remote("a1", "shop", &[("caddy", "a.test"), PROXY], 8001);
        let attacker = remote(
            "a22",
            "evil",
            &[("caddy", "a.test"), ("caddy.0_respond", "pwned"), PROXY],
            8002,
        );
        let s = state(vec![owner, attacker.clone()]);
        let (units, rejected, owners) =
            translate_owned(&s, &options, &BTreeSet::new(), &SiteOwners::new());
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].container, "shop");
        assert_eq!(rejected[0].container, "evil");
        assert!(
            rejected[0].reason.contains("agent a1 container shop"),
            "{}",
            rejected[0].reason
        );

        // Squatting first does not win against the site's current owner:
        // the attacker's facts now come earlier in the log, but the owner
        // keeps serving.
        let mut squatted = RouteState::default();
        squatted.apply(1, &Event::Up(attacker));
        squatted.apply(
            2,
            &Event::Up(remote("a1", "shop", &[("caddy", "a.test"), PROXY], 8001)),
        );
        let (units, rejected, _) = translate_owned(&squatted, &options, &BTreeSet::new(), &owners);
        assert_eq!(units[0].container, "shop");
        assert_eq!(rejected[0].container, "evil");
    }

    #[test]
    fn stopped_and_unhealthy_containers_are_not_routed() {
        let mut stopped = facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 1)]);
        stopped.state = ContainerState::Exited;
        let mut sick = facts("a1", "sick", &[("caddy", "b.test"), PROXY], &[(80, 2)]);
        sick.health = Health::Unhealthy;
        assert!(translate(vec![stopped, sick]).caddyfile.blocks.is_empty());
    }

    #[test]
    fn generated_proxies_retry_unless_they_say_how_themselves() {
        let options = TranslateOptions {
            proxy_try_duration: Some(Duration::from_secs(5)),
            ..TranslateOptions::trusting()
        };
        let s = state(vec![
            facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 1)]),
            facts(
                "a1",
                "own",
                &[
                    ("caddy", "b.test"),
                    PROXY,
                    ("caddy.reverse_proxy.lb_retries", "5"),
                ],
                &[(80, 2)],
            ),
            facts(
                "a1",
                "patient",
                &[
                    ("caddy", "c.test"),
                    PROXY,
                    ("caddy.reverse_proxy.lb_try_duration", "1s"),
                ],
                &[(80, 3)],
            ),
        ]);
        let (units, _, _) = translate_owned(&s, &options, &BTreeSet::new(), &SiteOwners::new());
        let text = |name: &str| {
            units
                .iter()
                .find(|u| u.container == name)
                .unwrap()
                .text
                .to_string()
        };
        assert_eq!(
            text("web"),
            "a.test {\n\treverse_proxy host-a1:1 {\n\t\tlb_try_duration 5s\n\t\tlb_try_interval 50ms\n\t}\n}\n"
        );
        assert!(!text("own").contains("lb_try"), "{}", text("own"));
        assert!(
            text("patient").contains("lb_try_duration 1s")
                && !text("patient").contains("5s")
                && !text("patient").contains("lb_try_interval"),
            "{}",
            text("patient")
        );
        let off = TranslateOptions {
            proxy_try_duration: Some(Duration::ZERO),
            ..TranslateOptions::trusting()
        };
        let (units, _, _) = translate_owned(&s, &off, &BTreeSet::new(), &SiteOwners::new());
        assert!(!units[0].text.contains("lb_try"));
    }

    #[test]
    fn generated_proxies_get_the_stream_close_delay_unless_they_set_their_own() {
        let options = TranslateOptions {
            stream_close_delay: Some(Duration::from_secs(3600)),
            ..TranslateOptions::trusting()
        };
        let own = ("caddy.reverse_proxy.stream_close_delay", "5m");
        let s = state(vec![
            facts("a1", "web", &[("caddy", "a.test"), PROXY], &[(80, 32768)]),
            facts(
                "a1",
                "nested",
                &[
                    ("caddy", "b.test"),
                    ("caddy.handle_path", "/x/*"),
                    ("caddy.handle_path.reverse_proxy", "{{upstreams 80}}"),
                ],
                &[(80, 32769)],
            ),
            facts(
                "a1",
                "own",
                &[("caddy", "c.test"), PROXY, own],
                &[(80, 32770)],
            ),
        ]);
        let (units, rejected, _) =
            translate_owned(&s, &options, &BTreeSet::new(), &SiteOwners::new());
        assert!(rejected.is_empty(), "{rejected:?}");
        let text = |name: &str| {
            units
                .iter()
                .find(|u| u.container == name)
                .map(|u| u.text.to_string())
                .unwrap()
        };
        assert_eq!(
            text("web"),
            "a.test {\n\treverse_proxy host-a1:32768 {\n\t\tstream_close_delay 3600s\n\t}\n}\n"
        );
        assert!(
            text("nested")
                .contains("\t\treverse_proxy host-a1:32769 {\n\t\t\tstream_close_delay 3600s"),
            "{}",
            text("nested")
        );
        assert!(
            text("own").contains("stream_close_delay 5m") && !text("own").contains("3600s"),
            "{}",
            text("own")
        );
        // Without the setting, nothing is added.
        let (plain, _, _) = translate_owned(
            &s,
            &TranslateOptions::trusting(),
            &BTreeSet::new(),
            &SiteOwners::new(),
        );
        assert!(plain
            .iter()
            .filter(|u| u.container != "own")
            .all(|u| !u.text.contains("stream_close_delay")));
    }

    #[test]
    fn the_cache_translates_only_changed_containers_and_equals_a_fresh_translation() {
        let options = granted("\"*.test\"");
        let mut s = state(
            (0..20)
                .map(|i| {
                    remote(
                        "a1",
                        &format!("web{i}"),
                        &[("caddy", &format!("w{i}.test")), PROXY],
                        9000 + i,
                    )
                })
                .collect(),
        );
        let mut cache = TranslationCache::default();
        let render = |s: &RouteState, cache: &mut TranslationCache| {
            translate_owned_cached(s, &options, &BTreeSet::new(), &SiteOwners::new(), cache)
        };
        let first = render(&s, &mut cache);
        assert_eq!(cache.translated_last, 20);
        let again = render(&s, &mut cache);
        assert_eq!(cache.translated_last, 0);
        assert_eq!(first.0, again.0);
        // One container changes (a newer `up`), one goes away.
        s.apply(
            100,
            &Event::Up(remote("a1", "web3", &[("caddy", "w3.test"), PROXY], 9999)),
        );
        s.apply(
            101,
            &Event::Down(crate::event::ContainerDown {
                agent: AgentId::new("a1").unwrap(),
                id: "id-web4".into(),
                observed_at_ms: 0,
            }),
        );
        let cached = render(&s, &mut cache);
        assert_eq!(cache.translated_last, 1);
        let fresh = translate_owned(&s, &options, &BTreeSet::new(), &SiteOwners::new());
        assert_eq!(cached.0, fresh.0);
        assert_eq!(cached.1, fresh.1);
        assert!(cached.0.iter().any(|u| u.text.contains(":9999")));
        assert!(!cached.0.iter().any(|u| u.container == "web4"));
        // New options start over.
        let other = granted("\"w1.test\", \"*.test\"");
        translate_owned_cached(&s, &other, &BTreeSet::new(), &SiteOwners::new(), &mut cache);
        assert_eq!(cache.translated_last, 19);
    }
}
