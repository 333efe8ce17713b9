//! The debugging commands over a known history on real NATS, with a live
//! applier and Caddy next to them: answers at several points (before and
//! after a checkpoint), `replay --at now` equal to the live state, and no
//! trace left on the applier's consumer or on Caddy.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use caddy_fleet::inspect::{diff_between, explain_at, history, routes_at, LogReader, Point};
use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_agent_stream, ensure_stream, EventPublisher, StreamSettings};
use caddy_fleet::schema::history::HistoryFilter;
use caddy_fleet::schema::{AgentId, AgentSync, ContainerDown, ContainerState, Event, Heartbeat};
use support::*;

fn up(agent: &str, id: &str, domain: &str, port: u16, state: ContainerState) -> Event {
    synthetic_up(agent, id, domain, "127.0.0.1", Some(port), state)
}

struct Log {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    publishers: BTreeMap<String, EventPublisher>,
}

impl Log {
    /// Publishes `event` and returns its sequence in the log.
    async fn send(&mut self, event: Event) -> u64 {
        let agent = event.agent().clone();
        if !self.publishers.contains_key(agent.as_str()) {
            ensure_agent_stream(&self.js, &StreamSettings::default(), &agent)
                .await
                .unwrap();
        }
        let publisher = self
            .publishers
            .entry(agent.to_string())
            .or_insert_with(|| EventPublisher::new(self.js.clone(), agent, "h"));
        publish_to_log(publisher, &self.stream, &event).await
    }
}

fn sites(routes: &[caddy_fleet::schema::routes::RouteRow]) -> BTreeMap<String, Vec<String>> {
    routes
        .iter()
        .map(|r| (r.site.clone(), r.upstreams.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debugging_commands_answer_from_the_log_and_touch_nothing() {
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (b1, b2) = tokio::join!(start_backend(&[], "one"), start_backend(&[], "two"));
    let (p1, p2) = (
        b1.get_host_port_ipv4(80).await.unwrap(),
        b2.get_host_port_ipv4(80).await.unwrap(),
    );
    let js = jetstream::new(nats.client().await);
    let stream = ensure_stream(&js, &StreamSettings::default())
        .await
        .unwrap();
    let mut log = Log {
        js: js.clone(),
        stream: stream.clone(),
        publishers: BTreeMap::new(),
    };
    let (applier, board) = start_applier_with(&nats, &caddy, "live", |c| {
        c.checkpoint_every = 3;
        c.checkpoint_interval = Duration::from_millis(300);
    });

    // Point A: web on a1 and a2 (one site, two upstreams), api on a1.
    log.send(up("a1", "w1", "web.test", p1, ContainerState::Running))
        .await;
    log.send(up("a2", "w2", "web.test", p2, ContainerState::Running))
        .await;
    log.send(Event::Heartbeat(Heartbeat {
        agent: AgentId::new("a2").unwrap(),
        sent_at_ms: 1,
    }))
    .await;
    let a = log
        .send(up("a1", "api", "api.test", p1, ContainerState::Running))
        .await;
    // Point B: api stops, w2 moves to another port, a new site appears.
    log.send(up("a1", "api", "api.test", p1, ContainerState::Exited))
        .await;
    log.send(up("a2", "w2", "web.test", p1, ContainerState::Running))
        .await;
    let b = log
        .send(up("a2", "shop", "shop.test", p2, ContainerState::Running))
        .await;
    // The applier checkpoints everything so far.
    wait_for("a checkpoint at B", Duration::from_secs(10), || async {
        (board.view().last_seq >= b && board.stats.snapshot().checkpoints > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    applier.stop().await;
    // Point C, after the checkpoint: a2 goes quiet (its containers stop
    // being listed), then returns with a sync; api is removed.
    log.send(Event::Sync(AgentSync {
        agent: AgentId::new("a2").unwrap(),
        host_address: "127.0.0.1".into(),
        containers: vec![],
        observed_at_ms: 0,
    }))
    .await;
    let quiet = log
        .send(Event::Down(ContainerDown {
            agent: AgentId::new("a1").unwrap(),
            id: "api".into(),
            observed_at_ms: 0,
        }))
        .await;
    let c = log
        .send(Event::Sync(AgentSync {
            agent: AgentId::new("a2").unwrap(),
            host_address: "127.0.0.1".into(),
            containers: vec!["w2".into(), "shop".into()],
            observed_at_ms: 0,
        }))
        .await;

    let reader = LogReader::open(&nats.inspect_config(Some("live")))
        .await
        .unwrap();
    let up1 = format!("127.0.0.1:{p1}");
    let up2 = format!("127.0.0.1:{p2}");
    // Routes at A, B (before the checkpoint's end) and C (after it).
    let at_a = routes_at(&reader, Point::Seq(a)).await.unwrap();
    assert_eq!(
        sites(&at_a.routes),
        BTreeMap::from([
            ("http://api.test".into(), vec![up1.clone()]),
            ("http://web.test".into(), vec![up1.clone(), up2.clone()]),
        ])
    );
    assert!(
        at_a.since.len() >= 2,
        "times of the facts: {:?}",
        at_a.since
    );
    let at_b = routes_at(&reader, Point::Seq(b)).await.unwrap();
    assert_eq!(
        sites(&at_b.routes),
        BTreeMap::from([
            ("http://shop.test".into(), vec![up2.clone()]),
            ("http://web.test".into(), vec![up1.clone()]),
        ])
    );
    let at_quiet = routes_at(&reader, Point::Seq(quiet)).await.unwrap();
    assert_eq!(
        sites(&at_quiet.routes),
        BTreeMap::from([("http://web.test".into(), vec![up1.clone()])]),
        "a2 unlisted"
    );
    let at_c = routes_at(&reader, Point::Seq(c)).await.unwrap();
    assert_eq!(sites(&at_c.routes), sites(&at_b.routes));

    // Diff A → B.
    let d = diff_between(&reader, Point::Seq(a), Point::Seq(b))
        .await
        .unwrap()
        .diff;
    assert_eq!(
        d.added.iter().map(|r| r.site.as_str()).collect::<Vec<_>>(),
        ["http://shop.test"]
    );
    assert_eq!(
        d.removed
            .iter()
            .map(|r| r.site.as_str())
            .collect::<Vec<_>>(),
        ["http://api.test"]
    );
    assert_eq!(d.changed.len(), 1);

    // History of a domain and of an agent.
    let web = history(
        &reader,
        &HistoryFilter {
            domain: Some("web.test".into()),
            ..Default::default()
        },
        Point::Seq(0),
        Point::Seq(c),
    )
    .await
    .unwrap();
    let changes: Vec<&str> = web.iter().map(|l| l.change.as_str()).collect();
    assert_eq!(changes.len(), 5, "{web:?}");
    assert!(changes[0].starts_with("up (running)"), "{changes:?}");
    assert_eq!(
        changes[2],
        format!("ports 80/tcp at :{p2} → 80/tcp at :{p1}")
    );
    assert!(
        changes[3].contains("no longer listed: ctr-w2"),
        "{changes:?}"
    );
    let a2 = history(
        &reader,
        &HistoryFilter {
            agent: Some("a2".into()),
            ..Default::default()
        },
        Point::Seq(b),
        Point::Seq(c),
    )
    .await
    .unwrap();
    assert_eq!(
        a2.iter().map(|l| l.seq).collect::<Vec<_>>(),
        [b + 1, c],
        "{a2:?}"
    );
    assert!(a2.iter().all(|l| l.time.is_some()));

    // Explain a site with one container left out.
    let why = explain_at(&reader, "api.test", Point::Seq(b))
        .await
        .unwrap()
        .entries;
    assert_eq!(why.len(), 1);
    assert!(
        why[0].left_out.as_deref().unwrap().contains("exited"),
        "{why:?}"
    );
    let why = explain_at(&reader, "web.test", Point::Seq(a))
        .await
        .unwrap()
        .entries;
    assert!(why.iter().all(|e| e.left_out.is_none()) && why.len() == 2);
    assert!(explain_at(&reader, "nowhere.test", Point::Seq(c))
        .await
        .unwrap_err()
        .to_string()
        .contains("no container in the log names nowhere.test"));
    assert!("yesterday".parse::<Point>().is_err());

    // replay --at now equals a live applier's state, and the commands touch nothing.
    let (applier, board) = start_applier(&nats, &caddy, "live");
    wait_for(
        "the live applier to converge",
        Duration::from_secs(15),
        || async {
            let view = board.view();
            (view.converged && view.last_seq >= c).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer("live").await.unwrap();
    let before = consumer.get_info().await.unwrap();
    let caddy_before = caddy.config().await.unwrap();

    let now = routes_at(&reader, Point::Time(i64::MAX / 2)).await.unwrap();
    assert_eq!(
        now.routes,
        board.view().routes,
        "replay --at now must equal the applier's live routes"
    );
    let base = std::env::temp_dir().join(format!("caddy-fleet-history-{}", unique()));
    std::fs::write(&base, caddy.base_caddyfile()).unwrap();
    // The live applier trusts the test's agents; the commands must read
    // the log under the same policy to agree with it.
    let policy = base.with_extension("policy.toml");
    std::fs::write(&policy, "[default]\ndomains = [\"*\"]\ntrusted = true\n").unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
            .args(args)
            .env("NATS_URL", &nats.url)
            .env("APPLIER_NAME", "live")
            .env("CADDY_API_URL", caddy.admin_url())
            .env("CADDY_BASE_CADDYFILE", &base)
            .env("POLICY_FILE", &policy)
            .env("STATUS_LISTEN", "127.0.0.1:1")
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json = cli(&["replay", "--at", "now", "--format", "json"]);
    let replayed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        replayed["apps"], caddy_before["apps"],
        "replay --format json must equal what Caddy runs"
    );
    let table = cli(&["routes"]);
    assert!(
        table.contains("http://web.test") && table.contains("ctr-w1"),
        "{table}"
    );
    // No applier answers at STATUS_LISTEN here: the table says it comes
    // from the log alone.
    assert!(table.contains("(from the log"), "{table}");
    let history_text = cli(&["history", "--domain", "web.test"]);
    assert!(
        history_text.contains("no longer listed: ctr-w2"),
        "{history_text}"
    );
    let diff_text = cli(&["diff", "--from", &a.to_string(), "--to", &b.to_string()]);
    assert!(
        diff_text.contains("+ http://shop.test") && diff_text.contains("- http://api.test"),
        "{diff_text}"
    );
    let explain_json = cli(&["explain", "web.test", "--json"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&explain_json)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            == 2
    );
    let caddyfile = cli(&["replay", "--at", &c.to_string(), "--format", "caddyfile"]);
    assert!(
        caddyfile.contains("http://shop.test {")
            && caddyfile.contains(&format!("admin 127.0.0.1:{}", caddy.admin_port)),
        "{caddyfile}"
    );
    let _ = std::fs::remove_file(&base);

    let after = consumer.get_info().await.unwrap();
    assert_eq!(
        (
            before.delivered.stream_sequence,
            before.ack_floor.stream_sequence
        ),
        (
            after.delivered.stream_sequence,
            after.ack_floor.stream_sequence
        )
    );
    assert_eq!(
        caddy.config().await.unwrap(),
        caddy_before,
        "Caddy's config must be untouched"
    );
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_before_the_retained_history_and_an_unreachable_nats_are_clear_errors() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    // A stream that forgets after a second.
    let short = StreamSettings {
        max_age: Duration::from_secs(1),
        ..StreamSettings::default()
    };
    let stream = ensure_stream(&js, &short).await.unwrap();
    let mut log = Log {
        js: js.clone(),
        stream,
        publishers: BTreeMap::new(),
    };
    log.send(up("a1", "old", "old.test", 1, ContainerState::Running))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let kept = log
        .send(up("a1", "new", "new.test", 2, ContainerState::Running))
        .await;
    let reader = LogReader::open(&nats.inspect_config(None)).await.unwrap();
    let err = routes_at(&reader, Point::Seq(kept - 2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("before the retained history, which starts at sequence"),
        "{err}"
    );
    let err = routes_at(&reader, Point::Time(0))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("before the retained history"), "{err}");
    assert_eq!(
        sites(&routes_at(&reader, Point::Seq(kept)).await.unwrap().routes).len(),
        1
    );

    // NATS unreachable: the command says where it tried.
    let closed = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
        .args(["routes"])
        .env("NATS_URL", format!("nats://127.0.0.1:{closed}"))
        .env("STATUS_LISTEN", "127.0.0.1:1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{closed}"
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_is_answered_from_the_nearest_snapshot_and_the_tail_after_it() {
    use caddy_fleet::applier::checkpoint::{SnapshotSchedule, BUCKET};
    use caddy_fleet::applier::{CheckpointStore, ObjectStoreCheckpoints};
    use caddy_fleet::inspect::FoldStart;

    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let stream = ensure_stream(&js, &StreamSettings::default())
        .await
        .unwrap();
    let mut log = Log {
        js: js.clone(),
        stream,
        publishers: BTreeMap::new(),
    };
    let mut seqs = Vec::new();
    for i in 0..30u16 {
        let id = format!("c{}", i % 4);
        let running = i % 3 != 0;
        let state = match running {
            true => ContainerState::Running,
            false => ContainerState::Exited,
        };
        seqs.push(log.send(up("a1", &id, "snap.test", 8000 + i, state)).await);
    }
    // The applier's store, as it checkpoints at three points: a snapshot
    // at the first, and at each crossing of a multiple of 10.
    let from_start = LogReader::open(&nats.inspect_config(None)).await.unwrap();
    let store = ObjectStoreCheckpoints::open(&js, "snap", 1)
        .await
        .unwrap()
        .with_schedule(SnapshotSchedule {
            every_messages: 10,
            every: Duration::from_secs(3600),
        });
    for at in [seqs[4], seqs[11], seqs[24]] {
        let state = from_start.state_at_seq(at).await.unwrap().state;
        store.save(&state).await.unwrap();
    }
    let kept: Vec<u64> = store
        .snapshots()
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(kept, [seqs[4], seqs[11], seqs[24]]);
    assert_eq!(
        ObjectStoreCheckpoints::open_existing(&js, BUCKET, "snap")
            .await
            .unwrap()
            .nearest_at_or_before(seqs[20])
            .await
            .unwrap()
            .map(|s| s.last_seq),
        Some(seqs[11])
    );

    let reader = LogReader::open(&nats.inspect_config(Some("snap")))
        .await
        .unwrap();
    // Between snapshots: the one before, then only the tail after it.
    let point = Point::Seq(seqs[17]);
    let answer = explain_at(&reader, "snap.test", point).await.unwrap();
    assert_eq!(answer.fold.start, FoldStart::Snapshot(seqs[11]));
    assert_eq!(answer.fold.folded, seqs[17] - seqs[11]);
    let expected = explain_at(&from_start, "snap.test", point).await.unwrap();
    assert_eq!(expected.fold.start, FoldStart::Empty);
    assert_eq!(answer.entries, expected.entries);
    // After the newest checkpoint: it, then the tail.
    let late = reader.state_at(Point::Seq(seqs[27])).await.unwrap();
    assert_eq!(late.fold.start, FoldStart::Checkpoint(seqs[24]));
    assert_eq!(late.fold.folded, 3);
    assert_eq!(
        late.state,
        from_start.state_at_seq(seqs[27]).await.unwrap().state
    );
    // diff folds once: from the snapshot before the earlier point on.
    let d = diff_between(&reader, Point::Seq(seqs[13]), Point::Seq(seqs[16]))
        .await
        .unwrap();
    assert_eq!(
        (d.fold.start, d.fold.folded),
        (FoldStart::Snapshot(seqs[11]), seqs[16] - seqs[11])
    );
    // Before the first snapshot: from the start.
    let early = reader.state_at(Point::Seq(seqs[2])).await.unwrap();
    assert_eq!(early.fold.start, FoldStart::Empty);
}
