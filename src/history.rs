//! Read-only debugging over the log: the route table now, the history of a
//! domain, agent or container, the state at any point, the difference
//! between two points, and why a domain routes where it does.
//!
//! Everything here reads with ephemeral ordered consumers, direct gets and
//! the applier's checkpoint; it never creates, moves or acks the applier's
//! durable consumer and never talks to Caddy except, for `--format json`,
//! Caddy's side-effect-free `/adapt`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::str::FromStr;
use std::time::Duration;

use caddy_fleet_applier::checkpoint::decode as decode_checkpoint;
use caddy_fleet_applier::ObjectStoreCheckpoints;
use caddy_fleet_nats::async_nats::jetstream::{self, stream::Stream};
use caddy_fleet_nats::consume::{first_seq_at_or_after, replay};
use caddy_fleet_nats::NatsConfig;
use caddy_fleet_schema::routes::{
    declares_domain, diff, explain, route_table, ExplainEntry, RouteDiff, RouteRow,
};
use caddy_fleet_schema::translate::TranslateOptions;
use caddy_fleet_schema::{ContainerFacts, Event, RouteState};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;

/// Why a debugging command could not answer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Connect(#[from] caddy_fleet_nats::ConnectError),
    #[error("no stream CADDY_FLEET on this NATS ({0}): is NATS_URL the fleet's NATS, and has an applier started once?")]
    NoStream(String),
    #[error("cannot read the log: {0}")]
    Read(String),
    #[error(
        "{point} is before the retained history, which starts at {start}; ask for a later point"
    )]
    BeforeHistory { point: String, start: String },
    #[error("{0:?} is not a point in the log: give an RFC 3339 time (2026-11-27T10:00:00Z), a stream sequence (1234), a duration back from now (2h, 30m, 90s) or `now`")]
    BadPoint(String),
    #[error("no container in the log names {domain} at sequence {seq}; `caddy-fleet routes` lists the sites")]
    UnknownDomain { domain: String, seq: u64 },
    #[error(
        "--format json needs Caddy's /adapt: {0} (set CADDY_API_URL, or use --format caddyfile)"
    )]
    Adapt(String),
}

/// A point in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A stream sequence.
    Seq(u64),
    /// A time, in unix milliseconds.
    Time(i64),
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl FromStr for Point {
    type Err = HistoryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "now" {
            return Ok(Point::Time(now_ms()));
        }
        if let Ok(seq) = s.parse::<u64>() {
            return Ok(Point::Seq(seq));
        }
        if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
            return Ok(Point::Time((t.unix_timestamp_nanos() / 1_000_000) as i64));
        }
        match crate::settings::parse_duration(s) {
            Ok(back) if s.ends_with(|c: char| c.is_ascii_alphabetic()) => {
                Ok(Point::Time(now_ms() - back.as_millis() as i64))
            }
            _ => Err(HistoryError::BadPoint(s.to_string())),
        }
    }
}

/// Formats unix milliseconds as RFC 3339.
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// A read-only view of the fleet's log.
pub struct LogReader {
    stream: Stream,
    js: jetstream::Context,
    applier: Option<String>,
    options: TranslateOptions,
    progress: bool,
}

impl LogReader {
    /// Opens the stream on `nats`. `applier` names the checkpoint to start
    /// long folds from; `options` is how labels are translated.
    pub async fn open(
        nats: &NatsConfig,
        applier: Option<String>,
        options: TranslateOptions,
    ) -> Result<Self, HistoryError> {
        let client = caddy_fleet_nats::connect(nats).await?;
        let js = jetstream::new(client);
        let stream = js
            .get_stream("CADDY_FLEET")
            .await
            .map_err(|e| HistoryError::NoStream(e.to_string()))?;
        Ok(LogReader {
            stream,
            js,
            applier,
            options,
            progress: std::io::stdout().is_terminal(),
        })
    }

    /// How labels are translated.
    pub fn options(&self) -> &TranslateOptions {
        &self.options
    }

    /// The stream sequence a point stands for: the last message at or
    /// before it.
    pub async fn resolve(&self, point: Point) -> Result<u64, HistoryError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| HistoryError::Read(e.to_string()))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let start = || match info.state.first_timestamp.format(&Rfc3339) {
            Ok(t) => format!("sequence {first} ({t})"),
            Err(_) => format!("sequence {first}"),
        };
        match point {
            Point::Seq(seq) if first > 1 && seq + 1 < first => Err(HistoryError::BeforeHistory {
                point: format!("sequence {seq}"),
                start: start(),
            }),
            Point::Seq(seq) => Ok(seq.min(last)),
            Point::Time(ms) => {
                let first_ms =
                    (info.state.first_timestamp.unix_timestamp_nanos() / 1_000_000) as i64;
                if info.state.messages > 0 && ms < first_ms && first > 1 {
                    return Err(HistoryError::BeforeHistory {
                        point: format_ms(ms),
                        start: start(),
                    });
                }
                let last_ms = (info.state.last_timestamp.unix_timestamp_nanos() / 1_000_000) as i64;
                if ms >= last_ms {
                    return Ok(last);
                }
                match first_seq_at_or_after(&self.stream, ms + 1)
                    .await
                    .map_err(|e| HistoryError::Read(e.to_string()))?
                {
                    Some(seq) => Ok(seq.saturating_sub(1)),
                    None => Ok(last),
                }
            }
        }
    }

    /// When the message at `seq` was stored.
    pub async fn time_of(&self, seq: u64) -> Option<i64> {
        let message = self.stream.get_raw_message(seq).await.ok()?;
        Some((message.time.unix_timestamp_nanos() / 1_000_000) as i64)
    }

    /// The applier's checkpoint, if it is at or before `seq`.
    async fn checkpoint_before(&self, seq: u64) -> Option<RouteState> {
        let name = self.applier.as_ref()?;
        let store = self
            .js
            .get_object_store(ObjectStoreCheckpoints::BUCKET)
            .await
            .ok()?;
        let mut object = store.get(format!("applier-{name}")).await.ok()?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.ok()?;
        decode_checkpoint(&bytes).filter(|state| state.last_seq <= seq)
    }

    /// Folds the log up to `seq`, starting from the newest usable
    /// checkpoint. `each` sees every message folded, with the state before it.
    pub async fn fold_to(
        &self,
        seq: u64,
        use_checkpoint: bool,
        mut each: impl FnMut(&RouteState, u64, Option<i64>, &Event),
    ) -> Result<RouteState, HistoryError> {
        let mut state = match use_checkpoint {
            true => self.checkpoint_before(seq).await.unwrap_or_default(),
            false => RouteState::default(),
        };
        let from = state.last_seq + 1;
        if from > seq {
            return Ok(state);
        }
        let bar = self.progress.then(|| {
            let bar = indicatif::ProgressBar::new(seq + 1 - from);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} messages, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let mut n = 0u64;
        replay(&self.stream, "fleet.>", from, Some(seq), |d| {
            n += 1;
            if let Some(bar) = &bar {
                if n.is_multiple_of(1000) {
                    bar.set_position(n);
                }
            }
            match Event::decode_from(&d.subject, &d.payload) {
                Ok(event) => {
                    each(&state, d.seq, d.published_ms, &event);
                    state.apply(d.seq, &event);
                }
                Err(_) => state.skip(d.seq),
            }
        })
        .await
        .map_err(|e| HistoryError::Read(e.to_string()))?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok(state)
    }

    /// The state at `point`.
    pub async fn state_at(&self, point: Point) -> Result<(u64, RouteState), HistoryError> {
        let seq = self.resolve(point).await?;
        Ok((seq, self.fold_to(seq, true, |_, _, _, _| {}).await?))
    }
}

/// A route table with the time each container's facts date from.
#[derive(Debug, Clone, Serialize)]
pub struct TimedRoutes {
    pub seq: u64,
    pub routes: Vec<RouteRow>,
    /// Stream time of each `since_seq`, RFC 3339.
    pub since: BTreeMap<u64, String>,
    /// Containers left out, by whom and why.
    pub refused: Vec<RefusedRow>,
    /// `applier` (a live applier's `/status`: what Caddy runs) or `log`
    /// (a fold of the log: Caddy's own refusals are not in it).
    pub source: &'static str,
}

/// A container left out of the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RefusedRow {
    pub agent: String,
    pub container: String,
    #[serde(default)]
    pub container_id: String,
    /// `labels`, `policy` or `caddy`.
    pub by: String,
    pub reason: String,
}

/// Looks up the stream time of every `since_seq` in `routes`.
pub async fn timed(reader: &LogReader, seq: u64, routes: Vec<RouteRow>) -> TimedRoutes {
    let mut since = BTreeMap::new();
    for c in routes.iter().flat_map(|r| &r.containers) {
        if let std::collections::btree_map::Entry::Vacant(e) = since.entry(c.since_seq) {
            if let Some(ms) = reader.time_of(c.since_seq).await {
                e.insert(format_ms(ms));
            }
        }
    }
    TimedRoutes {
        seq,
        routes,
        since,
        refused: Vec::new(),
        source: "log",
    }
}

/// The route table as a readable table.
pub fn render_routes(t: &TimedRoutes) -> String {
    let mut out = format!(
        "{:<40} {:<40} {:<14} {:<24} SINCE\n",
        "SITE", "UPSTREAMS", "AGENT", "CONTAINER"
    );
    for row in &t.routes {
        for (i, c) in row.containers.iter().enumerate() {
            let (site, ups) = if i == 0 {
                (row.site.clone(), row.upstreams.join(" "))
            } else {
                (String::new(), String::new())
            };
            let since = t
                .since
                .get(&c.since_seq)
                .cloned()
                .unwrap_or_else(|| format!("seq {}", c.since_seq));
            out.push_str(&format!(
                "{site:<40} {ups:<40} {:<14} {:<24} {since} (seq {})\n",
                c.agent, c.container, c.since_seq
            ));
        }
    }
    if !t.refused.is_empty() {
        out.push_str(&format!(
            "\n{:<14} {:<24} {:<7} REASON\n",
            "AGENT", "REFUSED CONTAINER", "BY"
        ));
        for r in &t.refused {
            out.push_str(&format!(
                "{:<14} {:<24} {:<7} {}\n",
                r.agent, r.container, r.by, r.reason
            ));
        }
    }
    out.push_str(match t.source {
        "applier" => "(as the live applier reports what Caddy runs)\n",
        _ => "(from the log: no applier answered at STATUS_LISTEN, so containers Caddy itself refused are not shown)\n",
    });
    out
}

/// The routes at `point`, folded from the log.
pub async fn routes_at(reader: &LogReader, point: Point) -> Result<TimedRoutes, HistoryError> {
    let (seq, state) = reader.state_at(point).await?;
    let mut routes = timed(reader, seq, route_table(&state, reader.options())).await;
    let (_, refused) = caddy_fleet_schema::translate::translate_units(
        &state,
        reader.options(),
        &std::collections::BTreeSet::new(),
    );
    routes.refused = refused
        .into_iter()
        .map(|r| RefusedRow {
            agent: r.agent,
            container: r.container,
            container_id: r.container_id,
            by: r.by.as_str().to_string(),
            reason: r.reason,
        })
        .collect();
    Ok(routes)
}

/// One line of history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryLine {
    pub seq: u64,
    pub time: Option<String>,
    pub agent: String,
    pub container: Option<String>,
    pub change: String,
}

/// What to show in `history`.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub domain: Option<String>,
    pub agent: Option<String>,
    pub container: Option<String>,
}

/// What an `up` changed, or `None` when it changed nothing (a re-sent
/// `up`, e.g. after a publisher restart): such lines are left out.
fn describe(before: Option<&ContainerFacts>, after: &ContainerFacts) -> Option<String> {
    let sites = |f: &ContainerFacts| {
        f.labels
            .iter()
            .filter(|(k, _)| !k.contains('.'))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let Some(before) = before else {
        return Some(format!("up ({:?}) {}", after.state, sites(after)).to_lowercase());
    };
    let mut changes = Vec::new();
    if before.state != after.state {
        changes.push(format!("state {:?} → {:?}", before.state, after.state).to_lowercase());
    }
    if before.health != after.health {
        changes.push(format!("health {:?} → {:?}", before.health, after.health).to_lowercase());
    }
    if before.ports != after.ports {
        // `80/tcp at :8081`, bindings of one container port together;
        // `none` when nothing is published (a stopped container).
        let ports = |f: &ContainerFacts| {
            let mut by_port: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for p in &f.ports {
                by_port
                    .entry(format!("{}/{}", p.container_port, p.protocol))
                    .or_default()
                    .push(format!(":{}", p.host_port));
            }
            if by_port.is_empty() {
                return "none".to_string();
            }
            by_port
                .into_iter()
                .map(|(port, mut hosts)| {
                    hosts.dedup();
                    format!("{port} at {}", hosts.join(" "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        changes.push(format!("ports {} → {}", ports(before), ports(after)));
    }
    if before.labels != after.labels {
        changes.push("labels changed".to_string());
    }
    if before.networks != after.networks {
        changes.push("networks changed".to_string());
    }
    if before.name != after.name {
        changes.push(format!("renamed {} → {}", before.name, after.name));
    }
    (!changes.is_empty()).then(|| changes.join(", "))
}

/// The history of what `filter` selects between `since` and `until`.
pub async fn history(
    reader: &LogReader,
    filter: &HistoryFilter,
    since: Point,
    until: Point,
) -> Result<Vec<HistoryLine>, HistoryError> {
    let from = reader.resolve(since).await? + 1;
    let to = reader.resolve(until).await?;
    let prefix = reader.options().label_prefix.clone();
    let mut lines = Vec::new();
    let container_matches = |id: &str, name: &str| {
        filter
            .container
            .as_ref()
            .is_none_or(|c| id.starts_with(c.as_str()) || name == c)
    };
    // Fold from the start (or a checkpoint before `from`) so every change
    // is described against what came before it.
    let state = reader
        .fold_to(from.saturating_sub(1), true, |_, _, _, _| {})
        .await?;
    let mut state = state;
    let rest_from = state.last_seq + 1;
    if rest_from <= to {
        replay(&reader.stream, "fleet.>", rest_from, Some(to), |d| {
            let Ok(event) = Event::decode_from(&d.subject, &d.payload) else {
                state.skip(d.seq);
                return;
            };
            let agent = event.agent().to_string();
            let agent_ok = filter.agent.as_ref().is_none_or(|a| a == &agent);
            let before = |id: &str| {
                state
                    .agents
                    .get(event.agent())
                    .and_then(|a| a.containers.get(id))
                    .map(|r| r.facts.clone())
            };
            let line = match &event {
                Event::Up(facts) => {
                    let old = before(&facts.id);
                    let domain_ok = filter.domain.as_ref().is_none_or(|d| {
                        declares_domain(facts, d, &prefix)
                            || old.as_ref().is_some_and(|o| declares_domain(o, d, &prefix))
                    });
                    (agent_ok && domain_ok && container_matches(&facts.id, &facts.name))
                        .then(|| {
                            describe(old.as_ref(), facts).map(|c| (Some(facts.name.clone()), c))
                        })
                        .flatten()
                }
                Event::Down(down) => {
                    let old = before(&down.id);
                    let name = old
                        .as_ref()
                        .map(|o| o.name.clone())
                        .unwrap_or_else(|| down.id.clone());
                    let domain_ok = filter.domain.as_ref().is_none_or(|d| {
                        old.as_ref().is_some_and(|o| declares_domain(o, d, &prefix))
                    });
                    (agent_ok && domain_ok && container_matches(&down.id, &name))
                        .then(|| (Some(name), "down (removed)".to_string()))
                }
                Event::Sync(sync) => {
                    // Containers this sync stops listing, and unlisted ones it lists again.
                    let mut unlisted = Vec::new();
                    let mut relisted = Vec::new();
                    for r in state
                        .agents
                        .get(event.agent())
                        .into_iter()
                        .flat_map(|a| a.containers.values())
                    {
                        if filter
                            .domain
                            .as_ref()
                            .is_some_and(|d| !declares_domain(&r.facts, d, &prefix))
                            || !container_matches(&r.facts.id, &r.facts.name)
                        {
                            continue;
                        }
                        let in_sync = sync.containers.contains(&r.facts.id);
                        if r.listed && !in_sync {
                            unlisted.push(r.facts.name.clone());
                        } else if !r.listed && in_sync {
                            relisted.push(r.facts.name.clone());
                        }
                    }
                    let touches = !unlisted.is_empty() || !relisted.is_empty();
                    let relevant = agent_ok
                        && (touches || (filter.domain.is_none() && filter.container.is_none()));
                    relevant.then(|| {
                        let mut change = format!("sync: {} containers", sync.containers.len());
                        if !unlisted.is_empty() {
                            change
                                .push_str(&format!(", no longer listed: {}", unlisted.join(", ")));
                        }
                        if !relisted.is_empty() {
                            change.push_str(&format!(", listed again: {}", relisted.join(", ")));
                        }
                        (None, change)
                    })
                }
                // Heartbeats are liveness, not routing history.
                Event::Heartbeat(_) => None,
            };
            if let Some((container, change)) = line {
                lines.push(HistoryLine {
                    seq: d.seq,
                    time: d.published_ms.map(format_ms),
                    agent,
                    container,
                    change,
                });
            }
            state.apply(d.seq, &event);
        })
        .await
        .map_err(|e| HistoryError::Read(e.to_string()))?;
    }
    Ok(lines)
}

/// `history` as a readable table.
pub fn render_history(lines: &[HistoryLine]) -> String {
    let mut out = format!(
        "{:<30} {:>8} {:<14} {:<24} CHANGE\n",
        "TIME", "SEQ", "AGENT", "CONTAINER"
    );
    for l in lines {
        out.push_str(&format!(
            "{:<30} {:>8} {:<14} {:<24} {}\n",
            l.time.as_deref().unwrap_or("-"),
            l.seq,
            l.agent,
            l.container.as_deref().unwrap_or("-"),
            l.change
        ));
    }
    out
}

/// The difference between the routes at two points.
pub async fn diff_between(
    reader: &LogReader,
    from: Point,
    to: Point,
) -> Result<(u64, u64, RouteDiff), HistoryError> {
    let (a, before) = reader.state_at(from).await?;
    let (b, after) = reader.state_at(to).await?;
    let opts = reader.options();
    Ok((
        a,
        b,
        diff(&route_table(&before, opts), &route_table(&after, opts)),
    ))
}

/// `diff` as readable lines.
pub fn render_diff(from: u64, to: u64, d: &RouteDiff) -> String {
    let mut out = format!("routes from sequence {from} to {to}\n");
    for r in &d.added {
        out.push_str(&format!("+ {}  →  {}\n", r.site, r.upstreams.join(" ")));
    }
    for r in &d.removed {
        out.push_str(&format!("- {}  (was {})\n", r.site, r.upstreams.join(" ")));
    }
    for (b, a) in &d.changed {
        out.push_str(&format!(
            "~ {}  {}  →  {}\n",
            a.site,
            b.upstreams.join(" "),
            a.upstreams.join(" ")
        ));
    }
    if d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty() {
        out.push_str("no change\n");
    }
    out
}

/// Why `domain` routes where it does at `point`.
pub async fn explain_at(
    reader: &LogReader,
    domain: &str,
    point: Point,
) -> Result<(u64, Vec<ExplainEntry>), HistoryError> {
    let (seq, state) = reader.state_at(point).await?;
    let entries = explain(&state, reader.options(), domain);
    if entries.is_empty() {
        return Err(HistoryError::UnknownDomain {
            domain: domain.to_string(),
            seq,
        });
    }
    Ok((seq, entries))
}

/// `explain` as readable lines.
pub fn render_explain(domain: &str, seq: u64, entries: &[ExplainEntry]) -> String {
    let mut out = format!("{domain} at sequence {seq}:\n");
    for e in entries {
        match &e.left_out {
            None => out.push_str(&format!(
                "  serves  {} on {} (facts from seq {}) → {}\n",
                e.container,
                e.agent,
                e.seq,
                e.upstreams.join(" ")
            )),
            Some(reason) => out.push_str(&format!(
                "  left out {} on {} (facts from seq {}): {reason}\n",
                e.container, e.agent, e.seq
            )),
        }
    }
    out
}

/// Marks the entries a live applier left out, with who refused them and why.
pub fn apply_live_refusals(entries: &mut [ExplainEntry], refused: &[RefusedRow]) {
    for entry in entries.iter_mut().filter(|e| e.left_out.is_none()) {
        if let Some(r) = refused
            .iter()
            .find(|r| r.container_id == entry.container_id)
        {
            entry.left_out = Some(format!("refused by {}: {}", r.by, r.reason));
            entry.upstreams.clear();
        }
    }
}

/// The live routes from an applier's `/status`, if one answers at `status_url`.
pub async fn live_routes(status_url: &str) -> Option<(u64, Vec<RouteRow>, Vec<RefusedRow>)> {
    /// The parts of `/status` read here, in the applier's own types.
    #[derive(serde::Deserialize)]
    struct Status {
        last_seq: u64,
        routes: Vec<RouteRow>,
        #[serde(default)]
        rejected: Vec<RefusedRow>,
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let status: Status = client
        .get(format!("{status_url}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some((status.last_seq, status.routes, status.rejected))
}

/// One debugging command, as the binary parsed it.
#[derive(Debug, Clone)]
pub enum Inspect {
    /// The current routing table.
    Routes,
    /// Events touching a domain, agent or container.
    History {
        filter: HistoryFilter,
        since: Point,
        until: Point,
    },
    /// The state at a point, as routes, Caddyfile or Caddy JSON.
    Replay { at: Point, format: ReplayFormat },
    /// Routes added, removed and changed between two points.
    Diff { from: Point, to: Point },
    /// Why a domain routes where it does.
    Explain { domain: String, at: Point },
}

/// How `replay` prints the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFormat {
    Routes,
    Caddyfile,
    Json,
}

/// Runs a debugging command and returns what to print (JSON when `json`).
pub async fn run(
    command: Inspect,
    settings: &crate::settings::Settings,
    json: bool,
) -> Result<String, crate::modes::ModeError> {
    let options = settings.translate_options(Some(&settings.agent()))?;
    let nats = settings.nats_config("caddy-fleet-inspect".into())?;
    let to_json = |v: &dyn erased::Json| v.to_json();
    let out = match command {
        Inspect::Routes => {
            let status_url = format!("http://{}", settings.status_listen);
            let live = live_routes(&status_url).await;
            let reader = LogReader::open(&nats, Some(settings.applier_name()), options)
                .await
                .map_err(fleet)?;
            let timed_routes = match live {
                Some((seq, rows, refused)) => TimedRoutes {
                    refused,
                    source: "applier",
                    ..timed(&reader, seq, rows).await
                },
                None => routes_at(&reader, Point::Time(now_ms()))
                    .await
                    .map_err(fleet)?,
            };
            if json {
                to_json(&timed_routes)
            } else {
                render_routes(&timed_routes)
            }
        }
        Inspect::History {
            filter,
            since,
            until,
        } => {
            let reader = LogReader::open(&nats, Some(settings.applier_name()), options)
                .await
                .map_err(fleet)?;
            let lines = history(&reader, &filter, since, until)
                .await
                .map_err(fleet)?;
            if json {
                to_json(&lines)
            } else {
                render_history(&lines)
            }
        }
        Inspect::Replay { at, format } => {
            let reader = LogReader::open(&nats, Some(settings.applier_name()), options)
                .await
                .map_err(fleet)?;
            let (seq, state) = reader.state_at(at).await.map_err(fleet)?;
            match format {
                ReplayFormat::Routes => {
                    let t = timed(&reader, seq, route_table(&state, reader.options())).await;
                    if json {
                        to_json(&t)
                    } else {
                        render_routes(&t)
                    }
                }
                ReplayFormat::Caddyfile | ReplayFormat::Json => {
                    let base = match &settings.caddy_base_caddyfile {
                        Some(path) => Some(
                            std::fs::read_to_string(path)
                                .ok()
                                .and_then(|t| {
                                    caddy_fleet_schema::caddyfile::Caddyfile::parse(&t).ok()
                                })
                                .ok_or_else(|| {
                                    fleet(HistoryError::Read(format!(
                                        "cannot read CADDY_BASE_CADDYFILE {}",
                                        path.display()
                                    )))
                                })?,
                        ),
                        None => None,
                    };
                    let text = caddy_fleet_schema::translate::translate_state(
                        &state,
                        base.as_ref(),
                        reader.options(),
                    )
                    .caddyfile
                    .marshal();
                    if format == ReplayFormat::Caddyfile {
                        text
                    } else {
                        let caddy =
                            caddy_fleet_applier::caddy::CaddyAdmin::new(&settings.caddy_api_url)
                                .map_err(|e| fleet(HistoryError::Adapt(e.to_string())))?;
                        let adapted = caddy
                            .adapt(&text)
                            .await
                            .map_err(|e| fleet(HistoryError::Adapt(e.to_string())))?;
                        serde_json::to_string_pretty(&adapted).unwrap_or_default()
                    }
                }
            }
        }
        Inspect::Diff { from, to } => {
            let reader = LogReader::open(&nats, Some(settings.applier_name()), options)
                .await
                .map_err(fleet)?;
            let (a, b, d) = diff_between(&reader, from, to).await.map_err(fleet)?;
            if json {
                to_json(&d)
            } else {
                render_diff(a, b, &d)
            }
        }
        Inspect::Explain { domain, at } => {
            let reader = LogReader::open(&nats, Some(settings.applier_name()), options)
                .await
                .map_err(fleet)?;
            let (seq, mut entries) = explain_at(&reader, &domain, at).await.map_err(fleet)?;
            // At the live applier's present, its verdicts (Caddy's own
            // refusals among them) are the truth.
            let status_url = format!("http://{}", settings.status_listen);
            if let Some((live_seq, _, refused)) = live_routes(&status_url).await {
                if live_seq >= seq {
                    apply_live_refusals(&mut entries, &refused);
                }
            }
            if json {
                to_json(&entries)
            } else {
                render_explain(&domain, seq, &entries)
            }
        }
    };
    Ok(out)
}

fn fleet(error: HistoryError) -> crate::modes::ModeError {
    crate::modes::ModeError::History(error)
}

mod erased {
    /// Serialises anything serialisable to pretty JSON.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
            text.push('\n');
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(host_ports: &[u16]) -> ContainerFacts {
        ContainerFacts {
            agent: caddy_fleet_schema::AgentId::new("a1").unwrap(),
            id: "c1".into(),
            name: "web".into(),
            host_address: "10.0.0.1".into(),
            labels: [("caddy".to_string(), "a.test".to_string())].into(),
            ports: host_ports
                .iter()
                .map(|&host_port| caddy_fleet_schema::PortBinding {
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: "0.0.0.0".into(),
                    host_port,
                })
                .collect(),
            networks: BTreeMap::new(),
            state: caddy_fleet_schema::ContainerState::Running,
            health: caddy_fleet_schema::Health::None,
            observed_at_ms: 1,
        }
    }

    #[test]
    fn history_omits_ups_that_change_nothing_and_shows_ports_readably() {
        assert_eq!(describe(Some(&facts(&[8081])), &facts(&[8081])), None);
        let mut stopped = facts(&[]);
        stopped.state = caddy_fleet_schema::ContainerState::Exited;
        assert_eq!(
            describe(Some(&facts(&[8081])), &stopped).unwrap(),
            "state running → exited, ports 80/tcp at :8081 → none"
        );
        assert_eq!(
            describe(Some(&facts(&[8081])), &facts(&[8082, 8082])).unwrap(),
            "ports 80/tcp at :8081 → 80/tcp at :8082"
        );
    }

    #[test]
    fn explain_takes_a_live_appliers_refusals() {
        let entry = |id: &str| ExplainEntry {
            agent: "a1".into(),
            container: id.into(),
            container_id: id.into(),
            seq: 1,
            upstreams: vec!["10.0.0.1:80".into()],
            left_out: None,
        };
        let mut entries = vec![entry("bad"), entry("good")];
        apply_live_refusals(
            &mut entries,
            &[RefusedRow {
                agent: "a1".into(),
                container: "bad".into(),
                container_id: "bad".into(),
                by: "caddy".into(),
                reason: "unrecognized directive: bogus_directive".into(),
            }],
        );
        assert_eq!(
            entries[0].left_out.as_deref(),
            Some("refused by caddy: unrecognized directive: bogus_directive")
        );
        assert!(entries[0].upstreams.is_empty());
        assert_eq!(entries[1].left_out, None);
    }

    #[test]
    fn routes_show_refused_containers_and_where_the_answer_comes_from() {
        let mut t = TimedRoutes {
            seq: 1,
            routes: Vec::new(),
            since: BTreeMap::new(),
            refused: vec![RefusedRow {
                agent: "a1".into(),
                container: "evil".into(),
                container_id: "id".into(),
                by: "policy".into(),
                reason: "site x.test is not among the domains the policy grants this agent".into(),
            }],
            source: "log",
        };
        let text = render_routes(&t);
        assert!(text.contains("REFUSED CONTAINER"), "{text}");
        assert!(
            text.contains("evil") && text.contains("policy") && text.contains("not among"),
            "{text}"
        );
        assert!(text.contains("(from the log"), "{text}");
        t.source = "applier";
        assert!(render_routes(&t).contains("live applier"));
    }
}
