//! The dashboard: the fleet at a glance at `/` of `STATUS_LISTEN`.
//!
//! - The page is rendered on the server ([`page`], maud, which escapes
//!   every value), so it works without JavaScript; `app.js` (embedded,
//!   hand-written, no framework) keeps it live from `dashboard/events`, a
//!   server-sent event stream that sends a section (`summary`, `sites`,
//!   `agents`, `refused`, `pushes`) whenever the [`StatusBoard`] changes it.
//!   Nothing here reads NATS per viewer: the live part is what the applier
//!   already holds.
//! - The timeline and the routes at a point come from the log through
//!   [`LogReads`], which the binary's wiring implements with the debugging
//!   commands' read-only paths (`caddy-fleet history`, `replay --at`): the
//!   applier does not depend on them. Those reads are bounded: at most
//!   [`LOG_READS`] at once, [`READ_TIMEOUT`] each, [`MAX_LINES`] lines, and
//!   answers are shared between viewers asking the same.
//! - Every value on the page comes from agents, which are not trusted: the
//!   server escapes it, the script only ever sets `textContent`, and every
//!   answer carries a strict Content-Security-Policy (`default-src 'self'`,
//!   no inline script or style).

pub mod page;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use caddy_fleet_schema::routes::{RefusedRow, RouteRow, UpstreamsMode};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::status::{RejectedView, StatusBoard, StatusView};
use crate::telemetry::PushRecord;

/// Log reads running at once, over all viewers.
pub const LOG_READS: usize = 2;
/// How long one log read may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// The most timeline lines one answer holds (the newest are kept).
pub const MAX_LINES: usize = 1000;
/// Rows per page of the page's tables.
pub const PAGE_ROWS: usize = 50;
/// Stream times looked up for `since` columns in one round.
const TIMES_PER_ROUND: usize = 500;
/// Timeline answers kept for other viewers asking the same.
const CACHED_ANSWERS: usize = 16;

/// What the timeline asks the log: points as `caddy-fleet history` takes
/// them (`1h`, an RFC 3339 time, a sequence, `now`) and its filters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct TimelineQuery {
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
}

impl TimelineQuery {
    /// Empty fields count as not given.
    fn normalized(mut self) -> TimelineQuery {
        for field in [
            &mut self.since,
            &mut self.until,
            &mut self.domain,
            &mut self.agent,
            &mut self.container,
        ] {
            if field.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *field = None;
            }
            if let Some(v) = field.as_mut() {
                *v = v.trim().to_string();
            }
        }
        self
    }

    /// `since`, `1h` when not given.
    pub fn since(&self) -> &str {
        self.since.as_deref().unwrap_or("1h")
    }

    /// `until`, `now` when not given.
    pub fn until(&self) -> &str {
        self.until.as_deref().unwrap_or("now")
    }
}

/// One line of the timeline, as `caddy-fleet history` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineLine {
    pub seq: u64,
    /// When the log stored it, RFC 3339.
    pub time: Option<String>,
    pub agent: String,
    pub container: Option<String>,
    pub change: String,
}

/// The timeline between two points of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// Lines are of the messages after this sequence …
    pub after_seq: u64,
    /// … up to this one.
    pub until_seq: u64,
    /// Oldest first.
    pub lines: Vec<TimelineLine>,
    /// Older lines were left out ([`MAX_LINES`]).
    #[serde(default)]
    pub truncated: bool,
}

/// The routes as they were at a point (`caddy-fleet replay --at`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesAt {
    pub seq: u64,
    pub routes: Vec<RouteRow>,
    /// Stream time of each `since_seq`, RFC 3339.
    pub since: std::collections::BTreeMap<u64, String>,
    pub refused: Vec<RefusedRow>,
}

/// The log, read the way the debugging commands read it. Implemented by
/// the binary's wiring (the applier crate does not depend on them).
pub trait LogReads: Send + Sync + 'static {
    /// The history `query` selects (`caddy-fleet history`).
    fn history(&self, query: TimelineQuery) -> BoxFuture<'_, Result<Timeline, String>>;
    /// The routes at a point (`caddy-fleet replay --at <at> --format routes`).
    fn routes_at(&self, at: String) -> BoxFuture<'_, Result<RoutesAt, String>>;
    /// When the log stored each of `seqs` (unix ms); those it no longer
    /// holds are left out. An error (the log cannot be read now) is tried
    /// again later.
    fn times(&self, seqs: Vec<u64>) -> BoxFuture<'_, Result<Vec<(u64, i64)>, String>>;
}

/// What the dashboard reads besides the [`StatusBoard`]: the log (none in
/// standalone mode) and the policy file (for agents it lists but the log
/// never heard of).
#[derive(Clone, Default)]
pub struct Dashboard {
    log: Option<Arc<dyn LogReads>>,
    policy_file: Option<PathBuf>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("log", &self.log.is_some())
            .field("policy_file", &self.policy_file)
            .finish()
    }
}

impl Dashboard {
    /// Reads the log through `log` (timeline, routes at a point, times).
    pub fn with_log(mut self, log: Arc<dyn LogReads>) -> Self {
        self.log = Some(log);
        self
    }

    /// Lists the agents `path`'s policy names (re-read when it changes).
    pub fn with_policy_file(mut self, path: Option<PathBuf>) -> Self {
        self.policy_file = path;
        self
    }
}

/// One site of the sites table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteRow {
    pub site: String,
    pub upstreams: Vec<String>,
    /// How the upstreams reach Caddy, when it is worth saying: `by DNS`,
    /// or why a site stays static under `UPSTREAMS=dynamic`.
    pub upstreams_by: Option<String>,
    pub containers: Vec<SiteContainer>,
}

/// A container behind a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteContainer {
    pub agent: String,
    pub container: String,
    pub container_id: String,
    pub since_seq: u64,
    /// When the log stored `since_seq` (unix ms), once looked up.
    pub since_ms: Option<i64>,
}

/// One agent of the agents table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRow {
    pub agent: String,
    pub host_address: Option<String>,
    /// The `sent_at_ms` of its latest heartbeat (the agent's clock).
    pub last_heartbeat_ms: Option<u64>,
    /// `live`, `stale`, `expired` or `never seen` (listed by the policy,
    /// never heard of).
    pub status: &'static str,
    /// Its containers the log lists (none when never seen).
    pub containers: Option<usize>,
}

/// The figures at the top of the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub consumer_attached: bool,
    pub converged: bool,
    pub last_seq: u64,
    pub folded_seq: u64,
    pub consumer_lag: Option<u64>,
    pub pushes_loaded: u64,
    pub pushes_failed: u64,
    pub sites: usize,
    pub agents: usize,
    pub refused: usize,
    /// Whether the timeline can be read (not in standalone mode).
    pub timeline: bool,
}

/// Everything the page shows of the applier's present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Model {
    pub summary: Summary,
    pub sites: Vec<SiteRow>,
    pub agents: Vec<AgentRow>,
    pub refused: Vec<RejectedView>,
    /// Newest first.
    pub pushes: Vec<PushRecord>,
}

impl Model {
    /// The model of `view`; `times` gives the stream time of a sequence,
    /// `listed` the agents the policy names.
    pub fn build(
        view: &StatusView,
        pushes: Vec<PushRecord>,
        (loaded, failed): (u64, u64),
        listed: &[String],
        timeline: bool,
        mut times: impl FnMut(u64) -> Option<i64>,
    ) -> Model {
        let sites: Vec<SiteRow> = view
            .routes
            .iter()
            .map(|r| SiteRow {
                site: r.site.clone(),
                upstreams: r.upstreams.clone(),
                upstreams_by: match (r.upstreams_mode, &r.static_reason) {
                    (UpstreamsMode::Dynamic, _) => Some("by DNS".to_string()),
                    (UpstreamsMode::Static, Some(reason)) => Some(format!("static: {reason}")),
                    (UpstreamsMode::Static, None) => None,
                },
                containers: r
                    .containers
                    .iter()
                    .map(|c| SiteContainer {
                        agent: c.agent.clone(),
                        container: c.container.clone(),
                        container_id: c.container_id.clone(),
                        since_seq: c.since_seq,
                        since_ms: times(c.since_seq),
                    })
                    .collect(),
            })
            .collect();
        let mut agents: Vec<AgentRow> = view
            .agents
            .iter()
            .map(|a| AgentRow {
                agent: a.agent.clone(),
                host_address: a.host_address.clone(),
                last_heartbeat_ms: a.last_heartbeat_ms,
                status: if a.expired {
                    "expired"
                } else if a.stale {
                    "stale"
                } else {
                    "live"
                },
                containers: Some(a.containers),
            })
            .collect();
        for name in listed {
            if !agents.iter().any(|a| &a.agent == name) {
                agents.push(AgentRow {
                    agent: name.clone(),
                    host_address: None,
                    last_heartbeat_ms: None,
                    status: "never seen",
                    containers: None,
                });
            }
        }
        agents.sort_by(|a, b| a.agent.cmp(&b.agent));
        let mut pushes = pushes;
        pushes.reverse();
        Model {
            summary: Summary {
                consumer_attached: view.consumer_attached,
                converged: view.converged,
                last_seq: view.last_seq,
                folded_seq: view.folded_seq,
                consumer_lag: view.consumer_lag,
                pushes_loaded: loaded,
                pushes_failed: failed,
                sites: sites.len(),
                agents: agents.len(),
                refused: view.rejected.len(),
                timeline,
            },
            sites,
            agents,
            refused: view.rejected.clone(),
            pushes,
        }
    }

    /// Each section as the event stream sends it: (event name, JSON).
    fn sections(&self) -> [(&'static str, String); 5] {
        fn json(value: &impl Serialize) -> String {
            // The model's types have string keys: they always serialise.
            serde_json::to_string(value).unwrap_or_else(|_| "null".into())
        }
        [
            ("summary", json(&self.summary)),
            ("sites", json(&self.sites)),
            ("agents", json(&self.agents)),
            ("refused", json(&self.refused)),
            ("pushes", json(&self.pushes)),
        ]
    }
}

/// The agents a policy file lists, re-read when the file changes.
#[derive(Default)]
struct Listed {
    modified: Option<SystemTime>,
    agents: Vec<String>,
}

/// What the dashboard's handlers share.
struct Shared {
    board: Arc<StatusBoard>,
    dashboard: Dashboard,
    closed: watch::Receiver<bool>,
    reads: Semaphore,
    answers: Mutex<VecDeque<(TimelineQuery, u64, Timeline)>>,
    /// Stream times of sequences (`None`: the log no longer has it).
    times: Mutex<HashMap<u64, Option<i64>>>,
    resolving: AtomicBool,
    listed: Mutex<Listed>,
}

impl Shared {
    fn listed_agents(&self) -> Vec<String> {
        let Some(path) = &self.dashboard.policy_file else {
            return Vec::new();
        };
        let Ok(mut listed) = self.listed.lock() else {
            return Vec::new();
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != listed.modified {
            if let Ok(policy) = crate::policy::load(path) {
                listed.agents = policy.listed_agents().map(|a| a.to_string()).collect();
            }
            listed.modified = modified;
        }
        listed.agents.clone()
    }

    /// The model of the board now. Sequences whose time is not known yet
    /// are looked up in the background; the board is told when they are.
    fn model(self: &Arc<Self>) -> Model {
        let view = self.board.view();
        let snapshot = self.board.stats.snapshot();
        let listed = self.listed_agents();
        let mut missing = Vec::new();
        let model = {
            let times = self.times.lock().ok();
            Model::build(
                &view,
                self.board.stats.recent_pushes(),
                (snapshot.pushes, snapshot.push_failures),
                &listed,
                self.dashboard.log.is_some(),
                |seq| match times.as_ref().and_then(|t| t.get(&seq)) {
                    Some(known) => *known,
                    None => {
                        missing.push(seq);
                        None
                    }
                },
            )
        };
        if !missing.is_empty() {
            self.look_up_times(missing);
        }
        model
    }

    fn look_up_times(self: &Arc<Self>, mut seqs: Vec<u64>) {
        let Some(log) = self.dashboard.log.clone() else {
            return;
        };
        if self.resolving.swap(true, Ordering::AcqRel) {
            return;
        }
        seqs.sort_unstable();
        seqs.dedup();
        seqs.truncate(TIMES_PER_ROUND);
        let shared = self.clone();
        tokio::spawn(async move {
            let found = tokio::time::timeout(READ_TIMEOUT, log.times(seqs.clone())).await;
            let Ok(Ok(found)) = found else {
                // Tried again at the next change.
                shared.resolving.store(false, Ordering::Release);
                return;
            };
            if let Ok(mut times) = shared.times.lock() {
                // Sequences of routes long gone are forgotten now and then.
                if times.len() > 50_000 {
                    times.clear();
                }
                for seq in seqs {
                    times.insert(seq, None);
                }
                for (seq, ms) in found {
                    times.insert(seq, Some(ms));
                }
            }
            shared.resolving.store(false, Ordering::Release);
            shared.board.notify();
        });
    }

    /// The timeline `query` selects, bounded and shared between viewers.
    async fn timeline(&self, query: TimelineQuery) -> Result<Timeline, String> {
        let Some(log) = &self.dashboard.log else {
            return Err(NO_LOG.to_string());
        };
        let query = query.normalized();
        let folded = self.board.view().folded_seq;
        let cached = |answers: &VecDeque<(TimelineQuery, u64, Timeline)>| {
            answers
                .iter()
                .find(|(q, at, _)| *q == query && *at == folded)
                .map(|(_, _, t)| t.clone())
        };
        if let Some(answer) = self.answers.lock().ok().and_then(|a| cached(&a)) {
            return Ok(answer);
        }
        let _permit = self.reads.acquire().await.map_err(|e| e.to_string())?;
        // Another viewer may have asked the same meanwhile.
        if let Some(answer) = self.answers.lock().ok().and_then(|a| cached(&a)) {
            return Ok(answer);
        }
        let mut answer = tokio::time::timeout(READ_TIMEOUT, log.history(query.clone()))
            .await
            .map_err(|_| format!("the log did not answer within {READ_TIMEOUT:?}"))??;
        if answer.lines.len() > MAX_LINES {
            answer.lines.drain(..answer.lines.len() - MAX_LINES);
            answer.truncated = true;
        }
        if let Ok(mut answers) = self.answers.lock() {
            if answers.len() == CACHED_ANSWERS {
                answers.pop_front();
            }
            answers.push_back((query, folded, answer.clone()));
        }
        Ok(answer)
    }

    /// The routes at `at`, bounded.
    async fn routes_at(&self, at: String) -> Result<RoutesAt, String> {
        let Some(log) = &self.dashboard.log else {
            return Err(NO_LOG.to_string());
        };
        let _permit = self.reads.acquire().await.map_err(|e| e.to_string())?;
        tokio::time::timeout(READ_TIMEOUT, log.routes_at(at.trim().to_string()))
            .await
            .map_err(|_| format!("the log did not answer within {READ_TIMEOUT:?}"))?
    }
}

const NO_LOG: &str = "this applier has no log to read (standalone mode): the timeline needs NATS";

/// The headers every dashboard answer carries: what it is, and that the
/// browser must run no script or style but the page's own files.
fn secured(content_type: &'static str, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The page's query: which page of each table, the sites filter, and the
/// timeline and point asked for without JavaScript.
#[derive(Debug, Clone, Default)]
pub struct PageQuery {
    pub sites: Option<String>,
    pub agents: Option<String>,
    pub refused: Option<String>,
    pub q: Option<String>,
    pub timeline: TimelineQuery,
    pub at: Option<String>,
}

async fn index(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let query = page_query(query);
    let model = shared.model();
    // The timeline and the routes at a point are read only when asked
    // for (a form sent without JavaScript): the first render reads no log.
    let asked = query.timeline.clone().normalized() != TimelineQuery::default();
    let timeline = match asked {
        true => Some(shared.timeline(query.timeline.clone()).await),
        false => None,
    };
    let at = match query.at.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        Some(at) => Some(shared.routes_at(at.to_string()).await),
        None => None,
    };
    let html = page::render(&model, &query, timeline.as_ref(), at.as_ref());
    secured("text/html; charset=utf-8", html)
}

/// Reads the page's query leniently: an unknown or malformed field is
/// ignored rather than refused.
fn page_query(pairs: Vec<(String, String)>) -> PageQuery {
    let mut q = PageQuery::default();
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "sites" => &mut q.sites,
            "agents" => &mut q.agents,
            "refused" => &mut q.refused,
            "q" => &mut q.q,
            "since" => &mut q.timeline.since,
            "until" => &mut q.timeline.until,
            "domain" => &mut q.timeline.domain,
            "agent" => &mut q.timeline.agent,
            "container" => &mut q.timeline.container,
            "at" => &mut q.at,
            _ => continue,
        };
        *slot = Some(v);
    }
    q
}

async fn timeline(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let query = page_query(query).timeline;
    match shared.timeline(query).await {
        Ok(t) => secured("application/json", axum::Json(t)),
        Err(e) => secured(
            "application/json",
            (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "error": e })),
            ),
        ),
    }
}

async fn routes_at(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let at = page_query(query).at.unwrap_or_else(|| "now".into());
    match shared.routes_at(at).await {
        Ok(r) => secured("application/json", axum::Json(r)),
        Err(e) => secured(
            "application/json",
            (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "error": e })),
            ),
        ),
    }
}

/// After a change, how long to wait for the changes that come with it
/// (a push updates the board in several steps) before sending.
const SETTLE: Duration = Duration::from_millis(50);

/// The live stream: every section at once, then each section again
/// whenever it changes. Ends at shutdown.
async fn events(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    struct Stream {
        shared: Arc<Shared>,
        changes: watch::Receiver<u64>,
        closed: watch::Receiver<bool>,
        sent: HashMap<&'static str, String>,
        pending: VecDeque<Event>,
        started: bool,
    }
    let state = Stream {
        changes: shared.board.subscribe(),
        closed: shared.closed.clone(),
        shared,
        sent: HashMap::new(),
        pending: VecDeque::new(),
        started: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok::<Event, std::convert::Infallible>(event), s));
            }
            if s.started {
                tokio::select! {
                    changed = s.changes.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                    }
                    _ = s.closed.wait_for(|c| *c) => return None,
                }
                tokio::time::sleep(SETTLE).await;
                s.changes.borrow_and_update();
            } else {
                s.started = true;
                s.changes.borrow_and_update();
            }
            if *s.closed.borrow() {
                return None;
            }
            for (name, json) in s.shared.model().sections() {
                if s.sent.get(name) != Some(&json) {
                    s.pending
                        .push_back(Event::default().event(name).data(json.clone()));
                    s.sent.insert(name, json);
                }
            }
        }
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn script() -> Response {
    secured("text/javascript; charset=utf-8", include_str!("app.js"))
}

async fn style() -> Response {
    secured("text/css; charset=utf-8", include_str!("style.css"))
}

async fn icon() -> Response {
    secured("image/svg+xml", include_str!("icon.svg"))
}

/// The dashboard's routes, reading `board`; live streams end once `closed`
/// turns true.
pub fn router(
    board: Arc<StatusBoard>,
    dashboard: Dashboard,
    closed: watch::Receiver<bool>,
) -> Router {
    let shared = Arc::new(Shared {
        board,
        dashboard,
        closed,
        reads: Semaphore::new(LOG_READS),
        answers: Mutex::new(VecDeque::new()),
        times: Mutex::new(HashMap::new()),
        resolving: AtomicBool::new(false),
        listed: Mutex::new(Listed::default()),
    });
    Router::new()
        .route("/", get(index))
        .route("/dashboard/events", get(events))
        .route("/dashboard/timeline", get(timeline))
        .route("/dashboard/routes", get(routes_at))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/style.css", get(style))
        .route("/dashboard/icon.svg", get(icon))
        .with_state(shared)
}

/// Unix milliseconds as RFC 3339 (UTC, to the second), as the timeline's
/// times read.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AgentView, ContainerRef};
    use caddy_fleet_schema::routes::RouteContainer;

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_773_600_000), "2026-11-27T10:00:00Z");
        assert_eq!(rfc3339(951_782_400_000 + 1_999), "2000-02-29T00:00:01Z");
    }

    #[test]
    fn the_model_lists_agents_never_seen_and_pushes_newest_first() {
        let view = StatusView {
            agents: vec![AgentView {
                agent: "b".into(),
                host_address: Some("10.0.0.2".into()),
                last_heartbeat_ms: Some(1),
                silent_for_secs: 99,
                stale: true,
                expired: false,
                containers: 2,
            }],
            routes: vec![RouteRow {
                site: "a.test".into(),
                upstreams: vec!["10.0.0.2:80".into()],
                containers: vec![RouteContainer {
                    agent: "b".into(),
                    container: "web".into(),
                    container_id: "c1".into(),
                    since_seq: 7,
                }],
                ..RouteRow::default()
            }],
            rejected: vec![RejectedView {
                container: ContainerRef {
                    agent: "b".into(),
                    container: "bad".into(),
                    container_id: "c2".into(),
                },
                by: "labels",
                reason: "<script>".into(),
            }],
            ..StatusView::default()
        };
        let push = |at_ms| PushRecord {
            at_ms,
            outcome: "loaded",
            took_ms: Some(3),
            retry_in_ms: None,
            containers: Some(1),
            since_change_ms: None,
            error: None,
        };
        let model = Model::build(
            &view,
            vec![push(1), push(2)],
            (2, 0),
            &["a".to_string(), "b".to_string()],
            true,
            |seq| (seq == 7).then_some(1_000),
        );
        assert_eq!(
            model
                .agents
                .iter()
                .map(|a| (a.agent.as_str(), a.status))
                .collect::<Vec<_>>(),
            [("a", "never seen"), ("b", "stale")]
        );
        assert_eq!(model.sites[0].containers[0].since_ms, Some(1_000));
        assert_eq!(model.pushes[0].at_ms, 2);
        assert_eq!(model.summary.refused, 1);
        assert_eq!(model.summary.agents, 2);
    }

    /// Reads `response` until its text so far holds `needle`.
    async fn read_until(response: &mut reqwest::Response, seen: &mut String, needle: &str) {
        let read = async {
            while !seen.contains(needle) {
                let chunk = response.chunk().await.unwrap().expect("the stream goes on");
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {seen}"));
    }

    #[tokio::test]
    async fn live_streams_send_what_changed_and_end_at_shutdown() {
        let board = Arc::new(StatusBoard::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::status::serve_with(
            listener,
            board.clone(),
            Dashboard::default(),
            async {
                let _ = stopped.await;
            },
        ));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut events = client
            .get(format!("http://{addr}/dashboard/events"))
            .send()
            .await
            .unwrap();
        let mut seen = String::new();
        // Every section at once.
        read_until(&mut events, &mut seen, "event: pushes").await;
        assert!(seen.contains("event: summary") && seen.contains("event: sites"));
        seen.clear();
        board.update(|v| {
            v.routes = vec![RouteRow {
                site: "http://live.test".into(),
                upstreams: Vec::new(),
                containers: Vec::new(),
                ..RouteRow::default()
            }]
        });
        read_until(&mut events, &mut seen, "live.test").await;
        assert!(seen.contains("event: sites"), "{seen}");
        assert!(!seen.contains("event: agents"), "only what changed: {seen}");
        // Shutdown is not held up by the open stream.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops with a live stream open")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn empty_filters_count_as_not_given() {
        let q = page_query(vec![
            ("since".into(), " ".into()),
            ("domain".into(), " a.test ".into()),
            ("sites".into(), "x".into()),
            ("evil".into(), "1".into()),
        ]);
        let t = q.timeline.normalized();
        assert_eq!(t.since(), "1h");
        assert_eq!(t.domain.as_deref(), Some("a.test"));
        assert_eq!(q.sites.as_deref(), Some("x"));
    }
}
