//! The applier's runtime without Docker, NATS or Caddy: the two tasks
//! driven by an in-process log and an in-memory Caddy, on tokio's paused
//! clock (time only moves when every task waits, so "at once" means no
//! time at all, and waits of minutes take none).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caddy_fleet_nats::Delivery;
use caddy_fleet_schema::event::{ContainerState, Health, PortBinding};
use caddy_fleet_schema::translate::TranslateOptions;
use caddy_fleet_schema::{AgentId, ContainerDown, ContainerFacts, Event, Heartbeat, RouteState};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::caddy::{CaddyApi, CaddyError};
use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::{run_with_caddy, ApplierConfig, StatusBoard};

/// An in-memory Caddy: "adapts" a Caddyfile to a JSON holding its text,
/// refuses any Caddyfile holding `bogus`, takes `load_time` per load, and
/// can be made to hang (every call waits until released) or to be down.
#[derive(Clone, Default)]
struct FakeCaddy(Arc<FakeInner>);

#[derive(Default)]
struct FakeInner {
    state: Mutex<FakeState>,
    released: Notify,
}

#[derive(Default)]
struct FakeState {
    /// Every Caddyfile loaded, with the (virtual) time of the load.
    loads: Vec<(Instant, String)>,
    running: Option<Value>,
    load_time: Duration,
    hanging: bool,
    down: bool,
    /// Calls that failed because Caddy was down, with their times.
    failures: Vec<Instant>,
}

impl FakeCaddy {
    fn with_load_time(load_time: Duration) -> Self {
        let caddy = FakeCaddy::default();
        caddy.state().load_time = load_time;
        caddy
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.state.lock().unwrap()
    }

    fn loads(&self) -> Vec<(Instant, String)> {
        self.state().loads.clone()
    }

    fn last_loaded(&self) -> String {
        self.state()
            .loads
            .last()
            .map(|l| l.1.clone())
            .unwrap_or_default()
    }

    async fn gate(&self) -> Result<(), CaddyError> {
        loop {
            let released = self.0.released.notified();
            let (down, hanging) = {
                let mut state = self.state();
                if state.down {
                    state.failures.push(Instant::now());
                }
                (state.down, state.hanging)
            };
            if down {
                return Err(unreachable().await);
            }
            if !hanging {
                return Ok(());
            }
            released.await;
        }
    }

    fn release(&self) {
        self.state().hanging = false;
        self.0.released.notify_waiters();
    }
}

/// A real `reqwest::Error`, made without any network.
async fn unreachable() -> CaddyError {
    let source = reqwest::Client::new()
        .get("not a url")
        .send()
        .await
        .unwrap_err();
    CaddyError::Unreachable {
        url: "fake".into(),
        source,
    }
}

impl CaddyApi for FakeCaddy {
    async fn adapt(&self, caddyfile: &str) -> Result<Value, CaddyError> {
        self.gate().await?;
        if caddyfile.contains("bogus") {
            return Err(CaddyError::Refused {
                what: "the Caddyfile",
                status: 400,
                message: "unrecognized directive: bogus".into(),
            });
        }
        Ok(json!({"apps": {}, "caddyfile": caddyfile}))
    }
    async fn running_admin(&self) -> Result<Option<Value>, CaddyError> {
        self.gate().await?;
        Ok(None)
    }
    async fn has_id(&self, id: &str) -> Result<bool, CaddyError> {
        self.gate().await?;
        Ok(self
            .state()
            .running
            .as_ref()
            .is_some_and(|r| r["admin"]["@id"] == id))
    }
    async fn adapt_raw(&self, caddyfile: &str) -> Result<Box<RawValue>, CaddyError> {
        let json = self.adapt(caddyfile).await?;
        Ok(serde_json::value::to_raw_value(&json).expect("JSON"))
    }
    async fn load(&self, config: &str) -> Result<(), CaddyError> {
        let config: Value = serde_json::from_str(config).expect("JSON");
        self.gate().await?;
        let load_time = self.state().load_time;
        tokio::time::sleep(load_time).await;
        let text = config["caddyfile"].as_str().unwrap_or("").to_string();
        let mut state = self.state();
        state.loads.push((Instant::now(), text));
        state.running = Some(config.clone());
        Ok(())
    }
}

/// Checkpoints kept in memory: the sequences saved.
#[derive(Clone, Default)]
struct Saved(Arc<Mutex<Vec<u64>>>);

impl CheckpointStore for Saved {
    async fn load(&self) -> Result<Option<RouteState>, CheckpointError> {
        Ok(None)
    }
    async fn save(&self, state: &RouteState) -> Result<(), CheckpointError> {
        self.0.lock().unwrap().push(state.last_seq);
        Ok(())
    }
}

/// Checkpoints into a NATS that never answers.
#[derive(Clone, Default)]
struct Hanging;

impl CheckpointStore for Hanging {
    async fn load(&self) -> Result<Option<RouteState>, CheckpointError> {
        Ok(None)
    }
    async fn save(&self, _: &RouteState) -> Result<(), CheckpointError> {
        std::future::pending().await
    }
}

fn agent(name: &str) -> AgentId {
    AgentId::new(name).unwrap()
}

fn up(agent_name: &str, name: &str, port: u16) -> Event {
    Event::Up(ContainerFacts {
        agent: agent(agent_name),
        id: format!("id-{name}"),
        name: name.to_string(),
        host_address: "10.0.0.1".into(),
        labels: BTreeMap::from([
            ("caddy".to_string(), format!("http://{name}.test")),
            (
                "caddy.reverse_proxy".to_string(),
                "{{upstreams 80}}".to_string(),
            ),
        ]),
        ports: vec![PortBinding {
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: "0.0.0.0".into(),
            host_port: port,
        }],
        networks: BTreeMap::new(),
        state: ContainerState::Running,
        health: Health::None,
        observed_at_ms: 0,
    })
}

fn bogus(agent_name: &str, name: &str, port: u16) -> Event {
    let Event::Up(mut facts) = up(agent_name, name, port) else {
        unreachable!()
    };
    facts.labels.insert("caddy.bogus".into(), "yes".into());
    Event::Up(facts)
}

/// A running applier over a channel log.
struct Applier {
    log: mpsc::Sender<Delivery>,
    seq: u64,
    board: Arc<StatusBoard>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Applier {
    /// An applier fed by a channel the test writes with [`Applier::send`].
    fn start(
        caddy: &FakeCaddy,
        checkpoints: impl CheckpointStore + Sync + 'static,
        tune: impl FnOnce(&mut ApplierConfig),
    ) -> Self {
        let (log, source) = mpsc::channel(1024);
        Applier::start_on(source, log, caddy, checkpoints, tune)
    }

    /// An applier reading `source`; `log` is what [`Applier::send`] writes.
    fn start_on(
        source: impl crate::source::LogSource + Send + 'static,
        log: mpsc::Sender<Delivery>,
        caddy: &FakeCaddy,
        checkpoints: impl CheckpointStore + Sync + 'static,
        tune: impl FnOnce(&mut ApplierConfig),
    ) -> Self {
        let mut config = ApplierConfig::new("test", "http://fake");
        config.translate = TranslateOptions::trusting();
        config.health_check_interval = Duration::from_secs(2);
        config.checkpoint_interval = Duration::from_secs(1);
        tune(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let board = Arc::new(StatusBoard::default());
        let task_board = board.clone();
        let caddy = caddy.clone();
        let task = tokio::spawn(async move {
            let _ = run_with_caddy(
                source,
                checkpoints,
                RouteState::default(),
                config,
                caddy,
                board,
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        });
        Applier {
            log,
            seq: 0,
            board: task_board,
            stop: Some(stop),
            task,
        }
    }

    async fn send(&mut self, event: &Event) {
        self.seq += 1;
        let delivery = Delivery::detached(self.seq, event.subject(), event.encode());
        self.log.send(delivery).await.unwrap();
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap();
    }
}

/// Lets every task run until all of them wait (on the paused clock, no
/// time passes unless a timer is the only thing left).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Waits (on the paused clock) until `check` holds, at most `within`.
async fn until(within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "not within {within:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How long from now until `site` is gone from the config Caddy runs
/// (at most `within`).
async fn time_until_gone(caddy: &FakeCaddy, site: &str, within: Duration) -> Duration {
    let since = Instant::now();
    until(within, || !caddy.last_loaded().contains(site)).await;
    since.elapsed()
}

#[tokio::test(start_paused = true)]
async fn the_first_change_after_a_quiet_period_is_pushed_at_once() {
    let caddy = FakeCaddy::default();
    let mut applier = Applier::start(&caddy, Saved::default(), |_| {});
    // The first (empty) push re-asserts the state at start.
    until(Duration::from_secs(1), || caddy.loads().len() == 1).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let sent = Instant::now();
    applier.send(&up("a1", "web", 8080)).await;
    until(Duration::from_secs(1), || caddy.loads().len() == 2).await;
    let (loaded_at, text) = caddy.loads()[1].clone();
    // No window is waited: the push happens without the clock moving.
    assert_eq!(loaded_at - sent, Duration::ZERO, "waited before pushing");
    assert!(text.contains("web.test"), "{text}");
    // One source per figure: the registry /metrics encodes.
    let metrics = applier.board.metrics();
    for line in [
        "caddy_fleet_events_folded_total 1",
        "caddy_fleet_pushes_total{outcome=\"loaded\"} 2",
        "caddy_fleet_push_duration_seconds_count 2",
        // Each push's stages, render to load.
        "caddy_fleet_push_stage_seconds_count{stage=\"render\"} 2",
        "caddy_fleet_push_stage_seconds_count{stage=\"load\"} 2",
        // The start-up push carries no change; the second one does.
        "caddy_fleet_change_to_pushed_seconds_count 1",
        "caddy_fleet_converged 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} not in\n{metrics}"
        );
    }
    assert_eq!(applier.board.stats.snapshot().pushes, 2);
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn changes_during_a_push_go_out_together_in_the_next_one() {
    let caddy = FakeCaddy::with_load_time(Duration::from_millis(100));
    let mut applier = Applier::start(&caddy, Saved::default(), |_| {});
    until(Duration::from_secs(1), || caddy.loads().len() == 1).await;
    applier.send(&up("a1", "c0", 9000)).await;
    // While the push of c0 is in flight, 20 more containers come.
    for i in 1..=20 {
        tokio::time::sleep(Duration::from_millis(4)).await;
        applier.send(&up("a1", &format!("c{i}"), 9000 + i)).await;
    }
    until(Duration::from_secs(2), || {
        caddy.last_loaded().contains("c20.test")
    })
    .await;
    settle().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loads = caddy.loads();
    // The first push carried c0 only; the second every container that came
    // meanwhile; nothing more.
    assert_eq!(
        loads.len(),
        3,
        "{:#?}",
        loads.iter().map(|l| &l.1).collect::<Vec<_>>()
    );
    assert!(loads[1].1.contains("c0.test") && !loads[1].1.contains("c1.test"));
    assert!((0..=20).all(|i| loads[2].1.contains(&format!("c{i}.test"))));
    // The second push started as soon as the first ended.
    assert_eq!(loads[2].0 - loads[1].0, Duration::from_millis(100));
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_caddy_stops_neither_consumption_nor_checkpoints_nor_shutdown() {
    let caddy = FakeCaddy::default();
    let saved = Saved::default();
    let mut applier = Applier::start(&caddy, saved.clone(), |_| {});
    until(Duration::from_secs(1), || caddy.loads().len() == 1).await;
    caddy.state().hanging = true;
    for i in 0..50 {
        applier.send(&up("a1", &format!("h{i}"), 9100 + i)).await;
    }
    // Consumption folds, checkpoints (hence acks) everything while Caddy hangs.
    until(Duration::from_secs(10), || {
        saved.0.lock().unwrap().last() == Some(&50)
    })
    .await;
    assert_eq!(applier.board.stats.snapshot().events_folded, 50);
    assert_eq!(caddy.loads().len(), 1);
    // Caddy answers again: the newest state is pushed.
    caddy.release();
    until(Duration::from_secs(10), || {
        caddy.last_loaded().contains("h49.test")
    })
    .await;
    // And shutdown is immediate even with Caddy hanging again.
    caddy.state().hanging = true;
    applier.send(&up("a1", "late", 9999)).await;
    until(Duration::from_secs(1), || {
        applier.board.stats.snapshot().events_folded == 51
    })
    .await;
    let stopping = Instant::now();
    applier.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(1));
    assert_eq!(saved.0.lock().unwrap().last(), Some(&51));
}

#[tokio::test(start_paused = true)]
async fn a_caddy_that_is_down_is_retried_with_growing_jittered_delays() {
    let caddy = FakeCaddy::default();
    caddy.state().down = true;
    let mut applier = Applier::start(&caddy, Saved::default(), |_| {});
    applier.send(&up("a1", "web", 8080)).await;
    until(Duration::from_secs(120), || {
        caddy.state().failures.len() >= 8
    })
    .await;
    let failures = caddy.state().failures.clone();
    let gaps: Vec<Duration> = failures.windows(2).map(|w| w[1] - w[0]).collect();
    // From about 250 ms, growing, never above the 10 s cap.
    assert!(
        gaps[0] >= Duration::from_millis(200) && gaps[0] <= Duration::from_millis(600),
        "{gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(11)),
        "{gaps:?}"
    );
    assert!(gaps.last() > gaps.first(), "{gaps:?}");
    assert!(!applier.board.view().converged);
    caddy.state().down = false;
    until(Duration::from_secs(20), || {
        caddy.last_loaded().contains("web.test")
    })
    .await;
    until(Duration::from_secs(5), || applier.board.view().converged).await;
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_container_caddy_refuses_is_isolated_and_the_rest_served() {
    let caddy = FakeCaddy::default();
    let mut applier = Applier::start(&caddy, Saved::default(), |_| {});
    for i in 0..6 {
        applier.send(&up("a1", &format!("ok{i}"), 9200 + i)).await;
    }
    applier.send(&bogus("a1", "bad", 9300)).await;
    until(Duration::from_secs(5), || {
        let text = caddy.last_loaded();
        (0..6).all(|i| text.contains(&format!("ok{i}.test")))
    })
    .await;
    until(Duration::from_secs(5), || {
        !applier.board.view().rejected.is_empty()
    })
    .await;
    assert!(!caddy.last_loaded().contains("bad.test"));
    let rejected = applier.board.view().rejected;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].by, "caddy");
    assert_eq!(rejected[0].container.container, "bad");
    assert!(rejected[0].reason.contains("bogus"));
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_agent_expires_after_the_ttl_and_comes_back_when_heard() {
    let caddy = FakeCaddy::default();
    let mut applier = Applier::start(&caddy, Saved::default(), |c| {
        c.agent_ttl = Some(Duration::from_secs(30));
    });
    applier.send(&up("quiet", "q", 8080)).await;
    applier.send(&up("chatty", "c", 8081)).await;
    until(Duration::from_secs(1), || {
        caddy.last_loaded().contains("q.test")
    })
    .await;
    // Only "chatty" keeps talking, a heartbeat every 2 s: the sleep is the
    // heartbeat interval (on the paused clock), not a wait for a condition.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        applier
            .send(&Event::Heartbeat(Heartbeat {
                agent: agent("chatty"),
                sent_at_ms: 0,
            }))
            .await;
    }
    until(Duration::from_secs(5), || {
        !caddy.last_loaded().contains("q.test")
    })
    .await;
    assert!(caddy.last_loaded().contains("c.test"));
    let quiet = applier
        .board
        .view()
        .agents
        .into_iter()
        .find(|a| a.agent == "quiet")
        .unwrap();
    assert!(quiet.expired);
    applier
        .send(&Event::Heartbeat(Heartbeat {
            agent: agent("quiet"),
            sent_at_ms: 0,
        }))
        .await;
    until(Duration::from_secs(5), || {
        caddy.last_loaded().contains("q.test")
    })
    .await;
    // A removed container is gone at once, too.
    applier
        .send(&Event::Down(ContainerDown {
            agent: agent("chatty"),
            id: "id-c".into(),
            observed_at_ms: 0,
        }))
        .await;
    until(Duration::from_secs(1), || {
        !caddy.last_loaded().contains("c.test")
    })
    .await;
    applier.stop().await;
}

/// A log that can stop answering (its majority lost), as the applier sees it.
struct OutageSource {
    deliveries: mpsc::Receiver<Delivery>,
    answers: Arc<std::sync::atomic::AtomicBool>,
    /// Agents whose ingest stream the log is not sourcing.
    waiting: Arc<std::sync::Mutex<Vec<AgentId>>>,
}

impl OutageSource {
    /// A log that answers and sources every agent; the sender feeds it,
    /// and the switch says whether it answers.
    fn answering() -> (
        Self,
        mpsc::Sender<Delivery>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let answers = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (log, deliveries) = mpsc::channel(1024);
        let source = OutageSource {
            deliveries,
            answers: answers.clone(),
            waiting: Default::default(),
        };
        (source, log, answers)
    }
}

impl crate::source::LogSource for OutageSource {
    async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    async fn lag(&mut self) -> Option<u64> {
        self.answers
            .load(std::sync::atomic::Ordering::SeqCst)
            .then_some(0)
    }

    async fn log_health(&mut self) -> caddy_fleet_nats::LogHealth {
        caddy_fleet_nats::LogHealth {
            answers: self.answers.load(std::sync::atomic::Ordering::SeqCst),
            waiting: self.waiting.lock().unwrap().clone(),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_outage_of_the_log_expires_no_agent_and_silence_after_it_still_does() {
    let caddy = FakeCaddy::default();
    let (source, log, answers) = OutageSource::answering();
    let mut applier = Applier::start_on(source, log, &caddy, Saved::default(), |c| {
        c.agent_ttl = Some(Duration::from_secs(30));
    });
    applier.send(&up("quiet", "q", 8080)).await;
    until(Duration::from_secs(1), || {
        caddy.last_loaded().contains("q.test")
    })
    .await;
    // The log loses its majority for two TTLs: nothing can be heard.
    answers.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let expired = |applier: &Applier| {
        applier
            .board
            .view()
            .agents
            .iter()
            .any(|a| a.agent == "quiet" && a.expired)
    };
    assert!(!expired(&applier), "expired during the log's outage");
    let metrics = applier.board.metrics();
    assert!(metrics.contains("caddy_fleet_log_answers 0"), "{metrics}");
    assert!(caddy.last_loaded().contains("q.test"));
    // The log answers again and the agent stays silent: it expires one TTL
    // of answering log later (within a tick or two), not before.
    answers.store(true, std::sync::atomic::Ordering::SeqCst);
    let silent = time_until_gone(&caddy, "q.test", Duration::from_secs(40)).await;
    assert!(
        silent >= Duration::from_secs(20),
        "expired {silent:?} after the log came back"
    );
    assert!(expired(&applier));
    let metrics = applier.board.metrics();
    assert!(metrics.contains("caddy_fleet_log_answers 1"), "{metrics}");
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_facts_wait_unsourced_does_not_expire_and_expires_once_they_flow() {
    let caddy = FakeCaddy::default();
    let (log, deliveries) = mpsc::channel(1024);
    let waiting = Arc::new(std::sync::Mutex::new(Vec::new()));
    let source = OutageSource {
        deliveries,
        answers: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        waiting: waiting.clone(),
    };
    let mut applier = Applier::start_on(source, log, &caddy, Saved::default(), |c| {
        c.agent_ttl = Some(Duration::from_secs(30));
    });
    applier.send(&up("stuck", "s", 8080)).await;
    applier.send(&up("gone", "g", 8081)).await;
    until(Duration::from_secs(1), || {
        let loaded = caddy.last_loaded();
        loaded.contains("s.test") && loaded.contains("g.test")
    })
    .await;
    // The log answers but does not source `stuck`'s ingest stream for two
    // TTLs; `gone` is sourced and silent.
    *waiting.lock().unwrap() = vec![AgentId::new("stuck").unwrap()];
    until(Duration::from_secs(40), || {
        !caddy.last_loaded().contains("g.test")
    })
    .await;
    // The condition is time itself (on the paused clock): the waiting
    // agent must outlast another whole TTL.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        caddy.last_loaded().contains("s.test"),
        "an agent the log was not sourcing expired"
    );
    // Its sourcing flows again and it stays silent: it expires a TTL later.
    waiting.lock().unwrap().clear();
    let silent = time_until_gone(&caddy, "s.test", Duration::from_secs(40)).await;
    assert!(
        silent >= Duration::from_secs(20),
        "expired {silent:?} after its sourcing flowed again"
    );
    applier.stop().await;
}

/// Checkpoints that wait while `held` is set, as a write does while NATS
/// has no majority.
#[derive(Clone, Default)]
struct Held(Arc<std::sync::atomic::AtomicBool>);

impl CheckpointStore for Held {
    async fn load(&self) -> Result<Option<RouteState>, CheckpointError> {
        Ok(None)
    }
    async fn save(&self, _: &RouteState) -> Result<(), CheckpointError> {
        while self.0.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn an_outage_the_loop_waited_through_is_no_silence_when_the_log_is_back() {
    let caddy = FakeCaddy::default();
    let (source, log, answers) = OutageSource::answering();
    let held = Held::default();
    let mut applier = Applier::start_on(source, log, &caddy, held.clone(), |c| {
        c.agent_ttl = Some(Duration::from_secs(8));
        c.checkpoint_every = 1;
    });
    applier.send(&up("quiet", "q", 8080)).await;
    until(Duration::from_secs(1), || {
        caddy.last_loaded().contains("q.test")
    })
    .await;
    // The log loses its majority, and the next checkpoint write waits
    // through the whole outage: no look at the log in between.
    answers.store(false, std::sync::atomic::Ordering::SeqCst);
    held.0.store(true, std::sync::atomic::Ordering::SeqCst);
    applier.send(&up("other", "o", 8081)).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Back: the write ends, and the first look finds the log answering.
    answers.store(true, std::sync::atomic::Ordering::SeqCst);
    held.0.store(false, std::sync::atomic::Ordering::SeqCst);
    // It expires later, not at once: of the 20 s without a look, at most
    // twice the look interval (2 s here) counts as silence.
    let silent = time_until_gone(&caddy, "q.test", Duration::from_secs(30)).await;
    assert!(
        silent >= Duration::from_secs(3),
        "expired {silent:?} after the log was back"
    );
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_nats_that_never_answers_holds_shutdown_at_most_its_bound() {
    let caddy = FakeCaddy::default();
    let mut applier = Applier::start(&caddy, Hanging, |c| {
        c.checkpoint_every = 5;
    });
    for i in 0..12 {
        applier.send(&up("a1", &format!("n{i}"), 9400 + i)).await;
    }
    // Consumption is stuck in its first checkpoint write.
    until(Duration::from_secs(5), || {
        applier.board.stats.snapshot().events_folded == 5
    })
    .await;
    let stopping = Instant::now();
    applier.stop().await;
    let took = stopping.elapsed();
    assert!(took <= Duration::from_secs(3), "took {took:?}");
}

/// A consumer that skips: it delivers some messages of the log and gives
/// the others only when asked for a range, as a durable consumer can after
/// a change of leader.
struct Gappy {
    log: Vec<Event>,
    delivered: std::collections::VecDeque<u64>,
}

impl Gappy {
    fn at(&self, seq: u64) -> Delivery {
        let event = &self.log[seq as usize - 1];
        Delivery::detached(seq, event.subject(), event.encode())
    }
}

impl crate::source::LogSource for Gappy {
    async fn next(&mut self) -> Option<Delivery> {
        match self.delivered.pop_front() {
            Some(seq) => Some(self.at(seq)),
            None => std::future::pending().await,
        }
    }

    async fn log_end(&mut self) -> Option<u64> {
        Some(self.log.len() as u64)
    }

    async fn read_range(
        &mut self,
        from: u64,
        to: u64,
    ) -> Result<Vec<Delivery>, caddy_fleet_nats::ConsumeError> {
        Ok((from..=to).map(|seq| self.at(seq)).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn messages_a_consumer_skips_are_read_in_order_before_later_ones() {
    let caddy = FakeCaddy::default();
    let log: Vec<Event> = (1..=6u16)
        .map(|seq| up("a1", &format!("g{seq}"), 9500 + seq))
        .collect();
    // 3 and 4 come only after 5 (a redelivery the fold would ignore).
    let source = Gappy {
        log,
        delivered: [1, 2, 5, 3, 4, 6].into(),
    };
    let applier = Applier::start_on(source, mpsc::channel(1).0, &caddy, Saved::default(), |_| {});
    until(Duration::from_secs(5), || {
        let text = caddy.last_loaded();
        (1..=6).all(|i| text.contains(&format!("g{i}.test")))
    })
    .await;
    applier.stop().await;
}

#[tokio::test(start_paused = true)]
async fn messages_lost_in_flight_are_read_from_the_log_without_waiting_for_redelivery() {
    let caddy = FakeCaddy::default();
    let log: Vec<Event> = (1..=4u16)
        .map(|seq| up("a1", &format!("l{seq}"), 9600 + seq))
        .collect();
    // 3 and 4 are in the log, but their deliveries were lost in flight.
    let source = Gappy {
        log,
        delivered: [1, 2].into(),
    };
    let applier = Applier::start_on(source, mpsc::channel(1).0, &caddy, Saved::default(), |_| {});
    let started = Instant::now();
    until(Duration::from_secs(10), || {
        let text = caddy.last_loaded();
        (1..=4).all(|i| text.contains(&format!("l{i}.test")))
    })
    .await;
    // Well before a 30 s ack_wait would have brought them back.
    assert!(started.elapsed() < Duration::from_secs(10));
    applier.stop().await;
}
