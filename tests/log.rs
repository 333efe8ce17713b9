//! The log itself, on a real NATS server: stream settings, deduplication,
//! and an applier that recovers its state from the stream after a restart.

mod support;

use std::time::Duration;

use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_agent_stream, ensure_stream, EventPublisher, StreamSettings};
use caddy_fleet::schema::{AgentId, Event, Heartbeat};
use futures::StreamExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_sources_bounded_ingest_streams_and_refuses_purge_and_delete() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    ensure_stream(&js, &settings).await.expect("first creation");
    let a1 = AgentId::new("a1").unwrap();
    assert!(ensure_agent_stream(&js, &settings, &a1).await.unwrap());
    assert!(!ensure_agent_stream(&js, &settings, &a1).await.unwrap());
    let mut stream = ensure_stream(&js, &settings)
        .await
        .expect("second creation is a no-op");
    let config = stream.info().await.expect("info").config.clone();
    assert!(
        !config.subjects.iter().any(|s| s.starts_with("fleet.")),
        "{:?}",
        config.subjects
    );
    assert_eq!(settings.sourced_agents(&config), std::slice::from_ref(&a1));
    assert!(
        config.deny_purge && config.deny_delete && !config.allow_rollup,
        "{config:?}"
    );
    assert_eq!(config.max_age, settings.max_age);
    let mut ingest = js.get_stream(settings.ingest_name(&a1)).await.unwrap();
    let ingest_config = ingest.info().await.unwrap().config.clone();
    assert_eq!(ingest_config.subjects, ["fleet.a1.>"]);
    assert_eq!(ingest_config.max_bytes, settings.agent_max_bytes);

    let mut publisher = EventPublisher::new(js.clone(), a1.clone(), "run1");
    let seq = publish_to_log(
        &mut publisher,
        &stream,
        &Event::Heartbeat(Heartbeat {
            agent: a1,
            sent_at_ms: 1,
        }),
    )
    .await;
    assert!(stream.purge().await.is_err(), "purge must be denied");
    assert!(
        stream.delete_message(seq).await.is_err(),
        "delete must be denied"
    );
    assert!(ingest.purge().await.is_err(), "ingest purge must be denied");
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_from_before_ingest_streams_keeps_its_history() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    // The old layout: the log captured every agent's subjects itself.
    js.create_stream(jetstream::stream::Config {
        name: settings.name.clone(),
        subjects: vec!["fleet.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let old = Event::Heartbeat(Heartbeat {
        agent: AgentId::new("a1").unwrap(),
        sent_at_ms: 1,
    });
    js.publish(old.subject(), old.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut log = ensure_log(&js, &["a1"]).await;
    let subjects = log.info().await.unwrap().config.subjects.clone();
    // (NATS names a stream without subjects of its own after itself.)
    assert!(
        !subjects.iter().any(|s| s.starts_with("fleet.")),
        "{subjects:?}"
    );
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new("a1").unwrap(), "new");
    let seq = publish_to_log(&mut publisher, &log, &old).await;
    assert_eq!(seq, 2, "the old message is kept and the new one follows it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_message_id_is_stored_once() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let log = ensure_log(&js, &["a1"]).await;
    let event = Event::Heartbeat(Heartbeat {
        agent: AgentId::new("a1").unwrap(),
        sent_at_ms: 1,
    });
    // What EventPublisher does on a lost ack: send again with the same ID.
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let ack = js
            .send_publish(
                event.subject(),
                jetstream::message::PublishMessage::build()
                    .payload(event.encode().into())
                    .message_id("a1.run1.1"),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        seqs.push((ack.sequence, ack.duplicate));
    }
    assert_eq!(seqs, vec![(1, false), (1, true), (1, true)]);
    // A new run of the same agent never collides with the old one.
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new("a1").unwrap(), "run2");
    let second = publish_to_log(&mut publisher, &log, &event).await;
    // The log holds the first message once, then the second.
    assert_eq!(second, 2);
    assert_eq!(wait_for_log(&log, 2).await, 2);
}

/// An agent that floods fills only its own ingest stream: its further
/// messages are refused at publish, and another agent's changes still
/// reach Caddy, none of them lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_fills_only_its_own_share() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    let flooder = AgentId::new(format!("flood-{id}")).unwrap();
    let log = ensure_log(&js, &[flooder.as_str()]).await;
    let (applier, board) = start_applier(&nats, &caddy, "flood");

    // Messages of the largest size NATS takes on a container subject,
    // until the share is full (bounded in count).
    let garbage = vec![b'x'; 60 * 1024];
    let limit = settings.agent_max_bytes as usize / garbage.len() + 100;
    let mut stored = 0u64;
    let mut refused = None;
    for n in 0..limit {
        let subject = format!("fleet.{flooder}.ctr.c{n}");
        match js
            .publish(subject, garbage.clone().into())
            .await
            .unwrap()
            .await
        {
            Ok(_) => stored += 1,
            Err(error) => {
                refused = Some(error.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("the flooding agent's share never filled");
    assert!(stored > 0, "{refused}");

    // Another agent's containers still come and go through Caddy.
    // Not provisioned beforehand: the applier creates its ingest stream
    // when it hears the agent's first heartbeat.
    let publisher = start_publisher_with(&nats, &format!("calm-{id}"), &id, "127.0.0.1", false);
    let domain = format!("{id}.calm.test");
    let body = format!("calm-{id}");
    let backend = start_backend(&web_labels(&domain, &id), &body).await;
    caddy
        .wait_serving(&domain, &body, Duration::from_secs(60))
        .await;
    backend.rm().await.unwrap();
    wait_for(
        "the removed backend to be gone from Caddy",
        Duration::from_secs(60),
        // Gone: another answer, or none at all (a config without sites
        // has no HTTP server).
        || async {
            caddy
                .get(&domain)
                .await
                .is_none_or(|(_, text)| text != body)
                .then_some(())
        },
    )
    .await;

    // Every message the calm agent stored reached the log.
    let calm = AgentId::new(format!("calm-{id}")).unwrap();
    let mut ingest = js.get_stream(settings.ingest_name(&calm)).await.unwrap();
    let calm_stored = ingest.info().await.unwrap().state.messages;
    let what = format!("the log to hold the {calm_stored} messages {calm} stored");
    wait_for(&what, Duration::from_secs(30), || async {
        let in_log = log
            .info_with_subjects(format!("fleet.{calm}.>"))
            .await
            .ok()?
            .map(|s| s.map(|(_, n)| n).unwrap_or(0))
            .fold(0usize, |a, b| async move { a + b })
            .await;
        (in_log as u64 >= calm_stored).then_some(())
    })
    .await;
    assert!(board.stats.snapshot().decode_errors >= stored.min(1));
    publisher.stop().await;
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_applier_recovers_its_routes_from_the_stream() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, _) = start_applier(&nats, &caddy, "restart");
    let publisher = start_publisher(&nats, &format!("r-{id}"), &id, "127.0.0.1");
    let domain = format!("{id}.restart.test");
    let body = format!("restart-{id}");
    let _backend = start_backend(&web_labels(&domain, &id), &body).await;
    caddy
        .wait_serving(&domain, &body, Duration::from_secs(30))
        .await;
    applier.stop().await;

    // A second Caddy knows nothing; the restarted applier (same durable,
    // whose messages are all acked) must rebuild the route from the log.
    let fresh = Caddy::start().await;
    assert!(fresh.get(&domain).await.is_none_or(|(_, t)| t != body));
    let (applier, stats) = start_applier(&nats, &fresh, "restart");
    fresh
        .wait_serving(&domain, &body, Duration::from_secs(30))
        .await;
    assert_eq!(stats.stats.snapshot().decode_errors, 0);
    publisher.stop().await;
    applier.stop().await;
}

/// Every message of the log in order: (origin stream, payload).
/// Publishes `agent`'s facts `c<n>` (payload `n`) for each `n` in `range`,
/// one acked publish at a time.
async fn publish_numbered(js: &jetstream::Context, agent: &str, range: std::ops::Range<u32>) {
    for n in range {
        js.publish(format!("fleet.{agent}.ctr.c{n}"), n.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
}

async fn log_messages(log: &jetstream::stream::Stream, last: u64) -> Vec<(String, String)> {
    let mut messages = Vec::new();
    for seq in 1..=last {
        let message = log.direct_get(seq).await.expect("read the log");
        let origin = message
            .headers
            .get("Nats-Stream-Source")
            // `<origin stream> <origin seq> <filter> <transform>`
            .map(|h| {
                let mut words = h.as_str().split(' ');
                let stream = words.next().unwrap_or_default();
                format!("{stream}:{}", words.next().unwrap_or_default())
            })
            .unwrap_or_default();
        messages.push((
            origin,
            String::from_utf8_lossy(&message.payload).to_string(),
        ));
    }
    messages
}

/// Waits until the log sources `source` again (heard from, nothing pending)
/// and holds `count` messages; returns them.
async fn log_settled(
    js: &jetstream::Context,
    settings: &StreamSettings,
    source: &str,
    count: u64,
) -> Vec<(String, String)> {
    let what = format!("the log to source {count} messages from {source} and catch up");
    let last = wait_for(&what, Duration::from_secs(60), || async {
        let mut log = js.get_stream(&settings.name).await.ok()?;
        let info = log.info().await.ok()?;
        let sourced = info.sources.iter().find(|s| s.name == source)?;
        let caught_up =
            sourced.lag == 0 && sourced.active.is_some_and(|a| a < Duration::from_secs(3));
        (caught_up && info.state.messages >= count).then_some(info.state.last_sequence)
    })
    .await;
    let log = js.get_stream(&settings.name).await.unwrap();
    log_messages(&log, last).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_source_while_its_agent_publishes_loses_and_repeats_nothing() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    ensure_stream(&js, &settings).await.expect("create the log");
    let agent = AgentId::new("resourced").unwrap();
    ensure_agent_stream(&js, &settings, &agent).await.unwrap();
    let ingest = settings.ingest_name(&agent);
    let done = std::sync::atomic::AtomicBool::new(false);
    let publishing = async {
        publish_numbered(&js, "resourced", 0..300).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let restarting = async {
        let mut restarts = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) && restarts < 50 {
            caddy_fleet::nats::sources::restart_sources(
                &js,
                &settings,
                std::slice::from_ref(&ingest),
            )
            .await
            .map_err(|(_, error)| error)
            .expect("restart the source");
            restarts += 1;
        }
        restarts
    };
    let ((), restarts) = tokio::join!(publishing, restarting);
    assert!(restarts >= 2, "only {restarts} restarts while publishing");
    let messages = log_settled(&js, &settings, &ingest, 300).await;
    let expected: Vec<(String, String)> = (0..300)
        .map(|n| (format!("{ingest}:{}", n + 1), n.to_string()))
        .collect();
    assert_eq!(
        messages.len(),
        300,
        "{restarts} restarts; the log holds {} messages",
        messages.len()
    );
    assert_eq!(messages, expected, "{restarts} restarts");
    println!("sources: {restarts} restarts while 300 messages were published; the log holds each once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_restarts_a_source_not_heard_from_and_leaves_healthy_ones_alone() {
    use caddy_fleet::nats::sources::{watch, SourceRestart, SourceWatch, Stall};
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    ensure_stream(&js, &settings).await.expect("create the log");
    let steady = AgentId::new("steady").unwrap();
    ensure_agent_stream(&js, &settings, &steady).await.unwrap();
    // A source whose ingest stream does not exist yet: never heard from.
    let late = AgentId::new("late").unwrap();
    let mut log = js.get_stream(&settings.name).await.unwrap();
    let mut config = log.info().await.unwrap().config.clone();
    config
        .sources
        .get_or_insert_with(Vec::new)
        .push(settings.source(&late));
    js.update_stream(config).await.expect("add a source");

    let restarts: std::sync::Mutex<Vec<SourceRestart>> = Default::default();
    // Counted and logged as the applier does (`run_applier`).
    let board = caddy_fleet::applier::StatusBoard::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let pace = SourceWatch {
        every: Duration::from_millis(200),
        stall_after: Duration::from_secs(2),
    };
    let watching = watch(
        js.clone(),
        settings.clone(),
        pace,
        |restart| {
            board.stats.log_source_restarted(
                &restart.source,
                restart.stall.as_str(),
                restart.stalled_for,
                restart.lag,
            );
            restarts.lock().unwrap().push(restart.clone());
        },
        |error| eprintln!("watch: {error}"),
        async {
            let _ = stopped.await;
        },
    );
    let checking = async {
        let steady_publishes = async {
            publish_numbered(&js, "steady", 0..20).await;
        };
        steady_publishes.await;
        wait_for(
            "the silent source to be restarted",
            Duration::from_secs(30),
            || async {
                restarts
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|r| r.source == settings.ingest_name(&late) && r.stall == Stall::Silent)
                    .then_some(())
            },
        )
        .await;
        js.create_stream(settings.ingest_config(&late))
            .await
            .expect("create the late ingest stream");
        publish_numbered(&js, "late", 0..20).await;
        let messages = log_settled(&js, &settings, &settings.ingest_name(&late), 40).await;
        let from = |agent: &AgentId| -> Vec<String> {
            let origin = format!("{}:", settings.ingest_name(agent));
            messages
                .iter()
                .filter(|(o, _)| o.starts_with(&origin))
                .map(|(_, p)| p.clone())
                .collect()
        };
        let expected: Vec<String> = (0..20).map(|n| n.to_string()).collect();
        assert_eq!(from(&late), expected);
        assert_eq!(from(&steady), expected);
        assert_eq!(messages.len(), 40);
        // A few seconds more with both sources healthy: nothing restarted.
        let before = restarts.lock().unwrap().len();
        // The condition is time itself: a healthy source must outlast more
        // than two stall windows and the passes that would notice them.
        tokio::time::sleep(2 * pace.stall_after + 5 * pace.every).await;
        let restarts = restarts.lock().unwrap().clone();
        assert!(
            !restarts
                .iter()
                .any(|r| r.source == settings.ingest_name(&steady)),
            "a healthy source was restarted: {restarts:?}"
        );
        assert_eq!(
            restarts.len(),
            before,
            "restarted while healthy: {restarts:?}"
        );
        let metrics = board.metrics();
        let counted = format!(
            "caddy_fleet_log_source_restarts_total{{reason=\"silent\"}} {}",
            restarts.len()
        );
        assert!(metrics.contains(&counted), "{counted} not in {metrics}");
        let _ = stop.send(());
    };
    let ((), ()) = tokio::join!(watching, checking);
}

/// Owners and server-mode publishers starting together: each creates the
/// log if it is missing and adds its agent's source. Nobody's creation or
/// addition may drop another's source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_together_no_writer_drops_another_agents_source() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    let agents: Vec<AgentId> = (0..8)
        .map(|n| AgentId::new(format!("together-{n}")).unwrap())
        .collect();
    let starts = agents.iter().map(|agent| {
        let (js, settings) = (js.clone(), settings.clone());
        async move {
            ensure_stream(&js, &settings).await.expect("ensure the log");
            ensure_agent_stream(&js, &settings, agent)
                .await
                .expect("ensure the agent's stream");
        }
    });
    // An owning applier starting at the same moment, twice.
    let owner = async {
        for _ in 0..2 {
            ensure_stream(&js, &settings)
                .await
                .expect("the owner ensures the log");
        }
    };
    tokio::join!(futures::future::join_all(starts), owner);
    let mut log = js.get_stream(&settings.name).await.unwrap();
    let mut sourced = settings.sourced_agents(&log.info().await.unwrap().config);
    sourced.sort();
    let mut expected = agents.clone();
    expected.sort();
    assert_eq!(sourced, expected, "sources lost while starting together");
}

/// A source entry lost to a concurrent update of the log (simulated by
/// writing the log's configuration without it) comes back through the
/// owner's watch, and the agent's facts reach the log once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_adds_back_an_ingest_stream_the_log_lost() {
    use caddy_fleet::nats::sources::{watch, SourceWatch, Stall};
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    ensure_stream(&js, &settings).await.expect("create the log");
    let agent = AgentId::new("dropped").unwrap();
    ensure_agent_stream(&js, &settings, &agent).await.unwrap();
    let ingest = settings.ingest_name(&agent);
    publish_numbered(&js, "dropped", 0..10).await;
    log_settled(&js, &settings, &ingest, 10).await;
    // Another writer's read-change-write drops the source.
    let mut log = js.get_stream(&settings.name).await.unwrap();
    let mut config = log.info().await.unwrap().config.clone();
    config.sources = Some(Vec::new());
    js.update_stream(config).await.expect("drop the source");
    publish_numbered(&js, "dropped", 10..20).await;

    let added_back = std::sync::Mutex::new(Vec::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watching = watch(
        js.clone(),
        settings.clone(),
        SourceWatch {
            every: Duration::from_millis(200),
            stall_after: Duration::from_secs(2),
        },
        |restart| added_back.lock().unwrap().push(restart.clone()),
        |error| eprintln!("watch: {error}"),
        async {
            let _ = stopped.await;
        },
    );
    let checking = async {
        let messages = log_settled(&js, &settings, &ingest, 20).await;
        let expected: Vec<(String, String)> = (0..20)
            .map(|n| (format!("{ingest}:{}", n + 1), n.to_string()))
            .collect();
        assert_eq!(messages, expected, "each fact in the log once, in order");
        let restarts = added_back.lock().unwrap().clone();
        assert!(
            restarts
                .iter()
                .any(|r| r.source == ingest && r.stall == Stall::Unsourced),
            "not reported as unsourced: {restarts:?}"
        );
        let _ = stop.send(());
    };
    let ((), ()) = tokio::join!(watching, checking);
}
