//! The debugging commands: each folds the log to the points it is asked
//! about ([`LogReader`]) and derives its answer with the pure functions of
//! `caddy_fleet_schema::routes` and `caddy_fleet_schema::history`; the
//! `render_*` functions print answers for people. [`run`] answers one
//! [`Inspect`] command as the binary parsed it.

use std::collections::BTreeMap;

use caddy_fleet_schema::caddyfile::Caddyfile;
use caddy_fleet_schema::history::{change, HistoryFilter};
use caddy_fleet_schema::routes::{
    apply_live_refusals, diff, explain, refused_rows, route_table, ExplainEntry, RefusedRow,
    RouteDiff, RouteRow,
};
use caddy_fleet_schema::translate::translate_state;
use caddy_fleet_schema::RouteState;
use serde::Serialize;

use crate::log::{FoldStats, LogReader};
use crate::point::{format_ms, Point};
use crate::status::live_routes;
use crate::{InspectConfig, InspectError};

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

/// Looks up the stream time of every `since_seq` in `routes`.
pub async fn timed(
    reader: &LogReader,
    seq: u64,
    routes: Vec<RouteRow>,
    refused: Vec<RefusedRow>,
    source: &'static str,
) -> TimedRoutes {
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
        refused,
        source,
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
pub async fn routes_at(reader: &LogReader, point: Point) -> Result<TimedRoutes, InspectError> {
    let at = reader.state_at(point).await?;
    let routes = route_table(&at.state, reader.options());
    let refused = refused_rows(&at.state, reader.options());
    Ok(timed(reader, at.seq, routes, refused, "log").await)
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

/// The history of what `filter` selects between `since` and `until`.
pub async fn history(
    reader: &LogReader,
    filter: &HistoryFilter,
    since: Point,
    until: Point,
) -> Result<Vec<HistoryLine>, InspectError> {
    let from = reader.resolve(since).await? + 1;
    let to = reader.resolve(until).await?;
    // Every change is described against the state before it, so the fold
    // starts before `from` (at the nearest snapshot) and lines start at it.
    let mut at = reader.state_at_seq(from.saturating_sub(1)).await?;
    history_after(reader, &mut at.state, filter, from, to).await
}

/// The history of what `filter` selects from sequence `from` to `to`,
/// folding `state` (a state before `from`) on to `to`: a caller that keeps
/// the state can ask for what follows without folding again.
pub async fn history_after(
    reader: &LogReader,
    state: &mut RouteState,
    filter: &HistoryFilter,
    from: u64,
    to: u64,
) -> Result<Vec<HistoryLine>, InspectError> {
    let prefix = &reader.options().label_prefix;
    let mut lines = Vec::new();
    reader
        .fold_into(state, to, |before, seq, published_ms, event| {
            if seq < from {
                return;
            }
            if let Some(c) = change(before, event, filter, prefix) {
                lines.push(HistoryLine {
                    seq,
                    time: published_ms.map(format_ms),
                    agent: event.agent().to_string(),
                    container: c.container,
                    change: c.change,
                });
            }
        })
        .await?;
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
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub from: u64,
    pub to: u64,
    #[serde(flatten)]
    pub diff: RouteDiff,
    /// The one fold both tables came from (to the earlier point, then on).
    #[serde(skip)]
    pub fold: FoldStats,
}

/// The difference between the routes at `from` and at `to`, in one fold:
/// to the earlier point, then on to the later one.
pub async fn diff_between(
    reader: &LogReader,
    from: Point,
    to: Point,
) -> Result<Difference, InspectError> {
    let (a, b) = (reader.resolve(from).await?, reader.resolve(to).await?);
    let mut at = reader.state_at_seq(a.min(b)).await?;
    let opts = reader.options();
    let earlier = route_table(&at.state, opts);
    at.fold.folded += reader
        .fold_into(&mut at.state, a.max(b), |_, _, _, _| {})
        .await?;
    let later = route_table(&at.state, opts);
    let diff = match a <= b {
        true => diff(&earlier, &later),
        false => diff(&later, &earlier),
    };
    Ok(Difference {
        from: a,
        to: b,
        diff,
        fold: at.fold,
    })
}

/// `diff` as readable lines.
pub fn render_diff(d: &Difference) -> String {
    let mut out = format!("routes from sequence {} to {}\n", d.from, d.to);
    for r in &d.diff.added {
        out.push_str(&format!("+ {}  →  {}\n", r.site, r.upstreams.join(" ")));
    }
    for r in &d.diff.removed {
        out.push_str(&format!("- {}  (was {})\n", r.site, r.upstreams.join(" ")));
    }
    for (b, a) in &d.diff.changed {
        out.push_str(&format!(
            "~ {}  {}  →  {}\n",
            a.site,
            b.upstreams.join(" "),
            a.upstreams.join(" ")
        ));
    }
    if d.diff.added.is_empty() && d.diff.removed.is_empty() && d.diff.changed.is_empty() {
        out.push_str("no change\n");
    }
    out
}

/// Why a domain routes where it does at a point.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub seq: u64,
    pub entries: Vec<ExplainEntry>,
    pub fold: FoldStats,
}

/// Why `domain` routes where it does at `point`.
pub async fn explain_at(
    reader: &LogReader,
    domain: &str,
    point: Point,
) -> Result<Explanation, InspectError> {
    let at = reader.state_at(point).await?;
    let entries = explain(&at.state, reader.options(), domain);
    if entries.is_empty() {
        return Err(InspectError::UnknownDomain {
            domain: domain.to_string(),
            seq: at.seq,
        });
    }
    Ok(Explanation {
        seq: at.seq,
        entries,
        fold: at.fold,
    })
}

/// `explain` as readable lines.
pub fn render_explain(domain: &str, seq: u64, entries: &[ExplainEntry]) -> String {
    let mut out = format!("{domain} at sequence {seq}:\n");
    for e in entries {
        match &e.left_out {
            None => out.push_str(&format!(
                "  serves  {} on {} (facts from seq {}) → {}{}\n",
                e.container,
                e.agent,
                e.seq,
                e.upstreams.join(" "),
                e.upstreams_by
                    .as_ref()
                    .map(|by| format!(" (upstreams by {by})"))
                    .unwrap_or_default()
            )),
            Some(reason) => out.push_str(&format!(
                "  left out {} on {} (facts from seq {}): {reason}\n",
                e.container, e.agent, e.seq
            )),
        }
    }
    out
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

/// Serialises an answer as pretty JSON, one line feed at the end.
fn to_json(value: &impl Serialize) -> String {
    // Plain structs with string keys always serialise.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// The base Caddyfile `config` names, parsed.
fn base_caddyfile(config: &InspectConfig) -> Result<Option<Caddyfile>, InspectError> {
    let Some(path) = &config.base_caddyfile else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| InspectError::BaseCaddyfileRead {
        path: path.clone(),
        source,
    })?;
    Caddyfile::parse(&text)
        .map(Some)
        .map_err(|source| InspectError::BaseCaddyfileParse {
            path: path.clone(),
            source,
        })
}

/// The state at `at` as `format` prints it (`json` for `--json` routes).
async fn replay(
    reader: &LogReader,
    config: &InspectConfig,
    at: Point,
    format: ReplayFormat,
    json: bool,
) -> Result<String, InspectError> {
    match format {
        ReplayFormat::Routes => {
            let t = routes_at(reader, at).await?;
            Ok(if json { to_json(&t) } else { render_routes(&t) })
        }
        ReplayFormat::Caddyfile | ReplayFormat::Json => {
            let base = base_caddyfile(config)?;
            let state = reader.state_at(at).await?.state;
            let text = translate_state(&state, base.as_ref(), reader.options())
                .caddyfile
                .marshal();
            if format == ReplayFormat::Caddyfile {
                return Ok(text);
            }
            let caddy = caddy_fleet_applier::caddy::CaddyAdmin::new(&config.caddy_api_url)
                .map_err(|source| InspectError::AdaptClient {
                    url: config.caddy_api_url.clone(),
                    source,
                })?;
            let adapted = caddy.adapt(&text).await?;
            Ok(to_json(&adapted))
        }
    }
}

/// Runs a debugging command and returns what to print (JSON when `json`).
pub async fn run(
    command: Inspect,
    config: &InspectConfig,
    json: bool,
) -> Result<String, InspectError> {
    let out = match command {
        Inspect::Routes => {
            let live = live_routes(&config.status_url).await;
            let reader = LogReader::open(config).await?;
            let routes = match live {
                Some(live) => {
                    timed(
                        &reader,
                        live.last_seq,
                        live.routes,
                        live.rejected,
                        "applier",
                    )
                    .await
                }
                None => routes_at(&reader, Point::Time(crate::point::now_ms())).await?,
            };
            if json {
                to_json(&routes)
            } else {
                render_routes(&routes)
            }
        }
        Inspect::History {
            filter,
            since,
            until,
        } => {
            let reader = LogReader::open(config).await?;
            let lines = history(&reader, &filter, since, until).await?;
            if json {
                to_json(&lines)
            } else {
                render_history(&lines)
            }
        }
        Inspect::Replay { at, format } => {
            let reader = LogReader::open(config).await?;
            replay(&reader, config, at, format, json).await?
        }
        Inspect::Diff { from, to } => {
            let reader = LogReader::open(config).await?;
            let d = diff_between(&reader, from, to).await?;
            if json {
                to_json(&d.diff)
            } else {
                render_diff(&d)
            }
        }
        Inspect::Explain { domain, at } => {
            let reader = LogReader::open(config).await?;
            let mut answer = explain_at(&reader, &domain, at).await?;
            // At the live applier's present, its verdicts (Caddy's own
            // refusals among them) are the truth.
            if let Some(live) = live_routes(&config.status_url).await {
                if live.last_seq >= answer.seq {
                    apply_live_refusals(&mut answer.entries, &live.rejected);
                }
            }
            if json {
                to_json(&answer.entries)
            } else {
                render_explain(&domain, answer.seq, &answer.entries)
            }
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn diffs_and_explanations_read_as_lines() {
        let row = |site: &str, up: &str| RouteRow {
            site: site.into(),
            upstreams: vec![up.into()],
            containers: Vec::new(),
            ..RouteRow::default()
        };
        let d = Difference {
            from: 1,
            to: 2,
            diff: RouteDiff {
                added: vec![row("http://new.test", "h:1")],
                removed: vec![row("http://old.test", "h:2")],
                changed: vec![(row("http://x.test", "h:3"), row("http://x.test", "h:4"))],
            },
            fold: FoldStats {
                start: crate::log::FoldStart::Empty,
                folded: 2,
            },
        };
        assert_eq!(
            render_diff(&d),
            "routes from sequence 1 to 2\n+ http://new.test  →  h:1\n- http://old.test  (was h:2)\n~ http://x.test  h:3  →  h:4\n"
        );
        let entry = ExplainEntry {
            agent: "a1".into(),
            container: "web".into(),
            container_id: "c1".into(),
            seq: 7,
            upstreams: vec!["h:1".into()],
            left_out: None,
            upstreams_by: Some("DNS (h1.caddy-fleet.internal.)".into()),
        };
        assert_eq!(
            render_explain("a.test", 9, &[entry]),
            "a.test at sequence 9:\n  serves  web on a1 (facts from seq 7) → h:1 (upstreams by DNS (h1.caddy-fleet.internal.))\n"
        );
    }
}
