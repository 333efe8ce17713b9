//! The page's first render, on the server: semantic tables (one page of
//! each), forms that work without JavaScript, and every value escaped by
//! maud. `app.js` renders the same rows again from the live stream.

use maud::{html, Markup, DOCTYPE};

use super::{rfc3339, Model, PageQuery, RoutesAt, SiteRow, Timeline, TimelineQuery, PAGE_ROWS};
use crate::status::RejectedView;
use crate::telemetry::PushRecord;

/// The whole page.
pub fn render(
    model: &Model,
    query: &PageQuery,
    timeline: Option<&Result<Timeline, String>>,
    at: Option<&Result<RoutesAt, String>>,
) -> String {
    let filter = query.q.as_deref().map(str::trim).unwrap_or("");
    let sites: Vec<&SiteRow> = model
        .sites
        .iter()
        .filter(|s| filter.is_empty() || site_matches(s, filter))
        .collect();
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { "caddy-fleet dashboard" }
                link rel="icon" href="dashboard/icon.svg" type="image/svg+xml";
                link rel="stylesheet" href="dashboard/style.css";
                script src="dashboard/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to the tables" }
                header {
                    h1 { "caddy-fleet" }
                    p #live role="status" { "Live updates need JavaScript; reload to refresh." }
                    (summary(model))
                    nav aria-label="Sections" {
                        ul {
                            li { a href="#sites" { "Sites" } }
                            li { a href="#agents" { "Agents" } }
                            li { a href="#refused" { "Refused" } }
                            li { a href="#pushes" { "Pushes" } }
                            li { a href="#timeline" { "Timeline" } }
                            li { a href="#routes-at" { "Routes at a point" } }
                        }
                    }
                }
                main #main {
                    section #sites aria-labelledby="sites-h" {
                        h2 #sites-h { "Sites " span.count #sites-count { "(" (model.sites.len()) ")" } }
                        form.filter method="get" action="#sites" role="search" {
                            label for="sites-q" { "Filter sites" }
                            input #sites-q type="search" name="q" value=(filter)
                                placeholder="site, upstream, agent or container";
                            button type="submit" { "Filter" }
                        }
                        (table(
                            "sites",
                            "Sites Caddy serves, with their upstreams and the containers behind them",
                            &["Site", "Upstreams", "Containers", "Since"],
                            page_of(&sites, &query.sites).1.iter().map(|s| site_row(s)),
                            if filter.is_empty() { "No site is served." } else { "No site matches the filter." },
                        ))
                        (pager("sites", &sites, &query.sites, query))
                    }
                    section #agents aria-labelledby="agents-h" {
                        h2 #agents-h { "Agents " span.count #agents-count { "(" (model.agents.len()) ")" } }
                        (table(
                            "agents",
                            "Agents: the hosts that publish containers, and when each was last heard",
                            &["Agent", "Status", "Last heartbeat", "Containers", "Host address"],
                            page_of(&model.agents, &query.agents).1.iter().map(|a| html! {
                                tr {
                                    th scope="row" { (a.agent) }
                                    td { span class={"status st-" (a.status.replace(' ', "-"))} { (a.status) } }
                                    td { @match a.last_heartbeat_ms { Some(ms) => time datetime=(rfc3339(ms as i64)) { (rfc3339(ms as i64)) }, None => "never" } }
                                    td.num { @match a.containers { Some(n) => (n), None => "–" } }
                                    td { (a.host_address.as_deref().unwrap_or("–")) }
                                }
                            }),
                            "No agent is known yet.",
                        ))
                        (pager("agents", &model.agents, &query.agents, query))
                    }
                    section #refused aria-labelledby="refused-h" {
                        h2 #refused-h { "Refused containers " span.count #refused-count { "(" (model.refused.len()) ")" } }
                        (table(
                            "refused",
                            "Containers left out of Caddy's config: who refused them and why",
                            &["Container", "Agent", "Refused by", "Reason"],
                            page_of(&model.refused, &query.refused).1.iter().map(refused_row),
                            "No container is refused.",
                        ))
                        (pager("refused", &model.refused, &query.refused, query))
                    }
                    section #pushes aria-labelledby="pushes-h" {
                        h2 #pushes-h { "Pushes to Caddy" }
                        p #pushes-figures {
                            (push_figures(model))
                        }
                        (table(
                            "pushes",
                            "The latest pushes to Caddy, newest first",
                            &["Ended", "Outcome", "Took", "Containers", "Change to running", "Detail"],
                            model.pushes.iter().map(push_row),
                            "No push since this applier started.",
                        ))
                    }
                    section #timeline aria-labelledby="timeline-h" {
                        h2 #timeline-h { "Timeline" }
                        @if model.summary.timeline {
                            (timeline_form(&query.timeline))
                            p #timeline-state role="status" {
                                @match timeline {
                                    None => "Choose a window and filters, then Show.",
                                    Some(Ok(t)) => (timeline_caption(t)),
                                    Some(Err(e)) => span.error { (e) },
                                }
                            }
                            (table(
                                "timeline",
                                "What changed, newest first, as caddy-fleet history shows it",
                                &["Time", "Sequence", "Agent", "Container", "Change", "Routes then"],
                                timeline.and_then(|t| t.as_ref().ok()).into_iter().flat_map(|t| t.lines.iter().rev()).map(|l| html! {
                                    tr {
                                        td.nowrap { (l.time.as_deref().unwrap_or("–")) }
                                        td.num { (l.seq) }
                                        td { (l.agent) }
                                        td { (l.container.as_deref().unwrap_or("–")) }
                                        td { (l.change) }
                                        td.nowrap { a href={"?at=" (l.seq) "#routes-at"} { "routes at " (l.seq) } }
                                    }
                                }),
                                "No change in this window.",
                            ))
                        } @else {
                            p { (super::NO_LOG) }
                        }
                    }
                    section #routes-at aria-labelledby="routes-at-h" {
                        h2 #routes-at-h { "Routes at a point" }
                        @if model.summary.timeline {
                            form.inline method="get" action="#routes-at" {
                                label for="at" { "Point" }
                                input #at name="at" type="text" value=(query.at.as_deref().unwrap_or(""))
                                    placeholder="30m, 2026-11-27T09:30:00Z or a sequence" aria-describedby="at-help";
                                button type="submit" { "Show routes" }
                                p #at-help .help { "As caddy-fleet replay --at takes it: a duration back from now, an RFC 3339 time, a sequence, or now." }
                            }
                            p #routes-at-state role="status" {
                                @match at {
                                    None => "Pick a point, or a line of the timeline.",
                                    Some(Ok(r)) => { "Routes at sequence " (r.seq) ": " (r.routes.len()) " sites, " (r.refused.len()) " refused." }
                                    Some(Err(e)) => span.error { (e) },
                                }
                            }
                            (table(
                                "routes-at",
                                "The routes as they were at the chosen point",
                                &["Site", "Upstreams", "Containers", "Since"],
                                at.and_then(|r| r.as_ref().ok()).into_iter().flat_map(|r| r.routes.iter().map(move |row| html! {
                                    tr {
                                        th scope="row" { (row.site) }
                                        td { (list(row.upstreams.iter().map(String::as_str))) }
                                        td { ul { @for c in &row.containers { li { (c.container) " on " (c.agent) } } } }
                                        td { ul { @for c in &row.containers { li { (r.since.get(&c.since_seq).cloned().unwrap_or_else(|| format!("seq {}", c.since_seq))) } } } }
                                    }
                                })),
                                "No route at this point.",
                            ))
                        } @else {
                            p { (super::NO_LOG) }
                        }
                    }
                }
            }
        }
    };
    markup.into_string()
}

fn site_matches(site: &SiteRow, filter: &str) -> bool {
    let f = filter.to_lowercase();
    site.site.to_lowercase().contains(&f)
        || site.upstreams.iter().any(|u| u.to_lowercase().contains(&f))
        || site
            .containers
            .iter()
            .any(|c| c.agent.to_lowercase().contains(&f) || c.container.to_lowercase().contains(&f))
}

fn summary(model: &Model) -> Markup {
    let s = &model.summary;
    html! {
        dl #summary .summary {
            div { dt { "Caddy" } dd #sum-converged class={ "state " (if s.converged { "ok" } else { "warn" }) } { (if s.converged { "converged" } else { "converging" }) } }
            div { dt { "Consumer" } dd #sum-consumer class={ "state " (if s.consumer_attached { "ok" } else { "bad" }) } { (if s.consumer_attached { "attached" } else { "not attached" }) } }
            div { dt { "Folded / pushed" } dd #sum-seq { (s.folded_seq) " / " (s.last_seq) } }
            div { dt { "Consumer lag" } dd #sum-lag { (s.consumer_lag.map_or("–".to_string(), |l| l.to_string())) } }
            div { dt { "Sites" } dd #sum-sites { (s.sites) } }
            div { dt { "Agents" } dd #sum-agents { (s.agents) } }
            div { dt { "Refused" } dd #sum-refused class={ "state " (if s.refused == 0 { "ok" } else { "warn" }) } { (s.refused) } }
            div { dt { "Pushes" } dd #sum-pushes { (s.pushes_loaded) " loaded, " (s.pushes_failed) " failed" } }
        }
    }
}

fn push_figures(model: &Model) -> Markup {
    let s = &model.summary;
    html! {
        (s.pushes_loaded) " loaded and " (s.pushes_failed) " failed since start; consumer lag "
        (s.consumer_lag.map_or("unknown".to_string(), |l| l.to_string())) "."
    }
}

/// A table with a caption, a header row and `rows` (or a row saying `empty`).
fn table(
    id: &str,
    caption: &str,
    headers: &[&str],
    rows: impl Iterator<Item = Markup>,
    empty: &str,
) -> Markup {
    let rows: Vec<Markup> = rows.collect();
    html! {
        div.scroll {
            table #{ (id) "-table" } {
                caption { (caption) }
                thead { tr { @for h in headers { th scope="col" { (h) } } } }
                tbody #{ (id) "-rows" } data-empty=(empty) {
                    @if rows.is_empty() {
                        tr.empty { td colspan=(headers.len()) { (empty) } }
                    }
                    @for row in rows { (row) }
                }
            }
        }
    }
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> Markup {
    html! { ul { @for i in items { li { (i) } } } }
}

fn site_row(s: &SiteRow) -> Markup {
    html! {
        tr {
            th scope="row" { (s.site) }
            td {
                (list(s.upstreams.iter().map(String::as_str)))
                @if let Some(by) = &s.upstreams_by { p.mode { (by) } }
            }
            td { ul { @for c in &s.containers { li { (c.container) " on " (c.agent) } } } }
            td { ul { @for c in &s.containers { li {
                @match c.since_ms {
                    Some(ms) => time datetime=(rfc3339(ms)) title={ "sequence " (c.since_seq) } { (rfc3339(ms)) },
                    None => { "seq " (c.since_seq) },
                }
            } } } }
        }
    }
}

fn refused_row(r: &RejectedView) -> Markup {
    html! {
        tr {
            th scope="row" { (r.container.container) }
            td { (r.container.agent) }
            td { span class={ "by by-" (r.by) } { (r.by) } }
            td.reason { (r.reason) }
        }
    }
}

fn push_row(p: &PushRecord) -> Markup {
    let ms = |v: Option<u64>| v.map_or("–".to_string(), |v| format!("{v} ms"));
    html! {
        tr {
            td { time datetime=(rfc3339(p.at_ms as i64)) { (rfc3339(p.at_ms as i64)) } }
            td { span class={ "outcome " (p.outcome) } { (p.outcome) } }
            td.num { (ms(p.took_ms)) }
            td.num { (p.containers.map_or("–".to_string(), |c| c.to_string())) }
            td.num { (ms(p.since_change_ms)) }
            td.reason {
                @if let Some(e) = &p.error { (e) " (retry in " (ms(p.retry_in_ms)) ")" }
            }
        }
    }
}

fn timeline_form(q: &TimelineQuery) -> Markup {
    let field = |name: &str, label: &str, value: &Option<String>, placeholder: &str| {
        html! {
            div.field {
                label for={ "tl-" (name) } { (label) }
                input id={ "tl-" (name) } name=(name) type="text" value=(value.as_deref().unwrap_or("")) placeholder=(placeholder);
            }
        }
    };
    html! {
        form #timeline-form .fields method="get" action="#timeline" {
            (field("since", "Since", &q.since, "1h"))
            (field("until", "Until", &q.until, "now"))
            (field("domain", "Domain", &q.domain, "app.example.com"))
            (field("agent", "Agent", &q.agent, "any"))
            (field("container", "Container", &q.container, "name or ID prefix"))
            div.field { button type="submit" { "Show" } }
        }
    }
}

fn timeline_caption(t: &Timeline) -> Markup {
    html! {
        (t.lines.len()) " changes from sequence " (t.after_seq + 1) " to " (t.until_seq)
        @if t.truncated { " (only the newest " (super::MAX_LINES) ")" } "."
    }
}

/// The page number asked for (1-based, clamped) and that page's rows.
fn page_of<'a, T>(rows: &'a [T], asked: &Option<String>) -> (usize, &'a [T]) {
    let pages = rows.len().div_ceil(PAGE_ROWS).max(1);
    let page = asked
        .as_deref()
        .and_then(|p| p.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, pages);
    let start = (page - 1) * PAGE_ROWS;
    (page, &rows[start..rows.len().min(start + PAGE_ROWS)])
}

/// Links to the previous and next page of table `id`, keeping the rest of
/// the query.
fn pager<T>(id: &str, rows: &[T], asked: &Option<String>, query: &PageQuery) -> Markup {
    let pages = rows.len().div_ceil(PAGE_ROWS).max(1);
    let (page, _) = page_of(rows, asked);
    let href = |to: usize| {
        let mut q = query.clone();
        let slot = match id {
            "sites" => &mut q.sites,
            "agents" => &mut q.agents,
            _ => &mut q.refused,
        };
        *slot = Some(to.to_string());
        format!("{}#{id}", query_string(&q))
    };
    html! {
        nav.pager #{ (id) "-pager" } aria-label={ (id) " pages" } hidden[pages == 1] {
            @if page > 1 { a rel="prev" href=(href(page - 1)) { "Previous" } } @else { span.disabled { "Previous" } }
            " " span.pos { "Page " (page) " of " (pages) } " "
            @if page < pages { a rel="next" href=(href(page + 1)) { "Next" } } @else { span.disabled { "Next" } }
        }
    }
}

fn query_string(q: &PageQuery) -> String {
    let pairs = [
        ("sites", &q.sites),
        ("agents", &q.agents),
        ("refused", &q.refused),
        ("q", &q.q),
        ("since", &q.timeline.since),
        ("until", &q.timeline.until),
        ("domain", &q.timeline.domain),
        ("agent", &q.timeline.agent),
        ("container", &q.timeline.container),
        ("at", &q.at),
    ];
    let mut out = String::from("?");
    for (k, v) in pairs {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            if out.len() > 1 {
                out.push('&');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(&percent_encode(v));
        }
    }
    out
}

fn percent_encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::{SiteContainer, Summary};
    use crate::status::ContainerRef;

    fn model(sites: usize, reason: &str) -> Model {
        Model {
            summary: Summary {
                consumer_attached: true,
                converged: true,
                last_seq: 1,
                folded_seq: 1,
                consumer_lag: Some(0),
                pushes_loaded: 1,
                pushes_failed: 0,
                sites,
                agents: 0,
                refused: 1,
                timeline: true,
            },
            sites: (0..sites)
                .map(|i| SiteRow {
                    site: format!("http://s{i}.test"),
                    upstreams: vec![format!("10.0.0.1:{}", 8000 + i)],
                    upstreams_by: (i % 2 == 0).then(|| "by DNS".to_string()),
                    containers: vec![SiteContainer {
                        agent: "a1".into(),
                        container: format!("web-{i}"),
                        container_id: format!("id{i}"),
                        since_seq: i as u64,
                        since_ms: None,
                    }],
                })
                .collect(),
            agents: Vec::new(),
            refused: vec![RejectedView {
                container: ContainerRef {
                    agent: "a1".into(),
                    container: "evil".into(),
                    container_id: "e".into(),
                },
                by: "labels",
                reason: reason.into(),
            }],
            pushes: Vec::new(),
        }
    }

    #[test]
    fn values_from_agents_are_escaped() {
        let evil = r#"<script>alert(1)</script>"><img src=x onerror=alert(2)>"#;
        let html = render(&model(1, evil), &PageQuery::default(), None, None);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img"));
        // The only script is the page's own file.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(!html.contains(" style="), "no inline style either");
    }

    #[test]
    fn large_tables_are_paginated_and_filtered() {
        let m = model(1000, "r");
        let html = render(&m, &PageQuery::default(), None, None);
        assert_eq!(
            html.matches("<th scope=\"row\">http://s").count(),
            PAGE_ROWS
        );
        assert!(html.contains("Page 1 of 20"));
        assert!(html.contains(r##"href="?sites=2#sites""##));
        // Half the sites say their upstreams come by DNS.
        assert_eq!(
            html.matches("<p class=\"mode\">by DNS</p>").count(),
            PAGE_ROWS / 2
        );
        let q = PageQuery {
            sites: Some("20".into()),
            q: Some("web-99".into()),
            ..PageQuery::default()
        };
        let html = render(&m, &q, None, None);
        // web-99 and web-990…999: one page, clamped.
        assert_eq!(html.matches("<th scope=\"row\">http://s").count(), 11);
        assert!(html.contains("Page 1 of 1"));
    }
}
