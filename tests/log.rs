//! The log itself, on a real NATS server: stream settings, deduplication,
//! and an applier that recovers its state from the stream after a restart.

mod support;

use std::time::Duration;

use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_stream, EventPublisher, StreamSettings};
use caddy_fleet::schema::{AgentId, Event, Heartbeat};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_created_idempotently_and_refuses_purge_and_delete() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let settings = StreamSettings::default();
    ensure_stream(&js, &settings).await.expect("first creation");
    let mut stream = ensure_stream(&js, &settings)
        .await
        .expect("second creation is a no-op");
    let config = stream.info().await.expect("info").config.clone();
    assert_eq!(config.subjects, vec!["fleet.>".to_string()]);
    assert!(
        config.deny_purge && config.deny_delete && !config.allow_rollup,
        "{config:?}"
    );
    assert_eq!(config.duplicate_window, settings.duplicate_window);
    assert_eq!(config.max_age, settings.max_age);

    let mut publisher = EventPublisher::new(js.clone(), AgentId::new("a1").unwrap(), "run1");
    let stored = publisher
        .publish(&Event::Heartbeat(Heartbeat {
            agent: AgentId::new("a1").unwrap(),
            sent_at_ms: 1,
        }))
        .await
        .expect("publish");
    assert!(!stored.duplicate);
    assert!(stream.purge().await.is_err(), "purge must be denied");
    assert!(
        stream.delete_message(stored.sequence).await.is_err(),
        "delete must be denied"
    );
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_message_id_is_stored_once() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let stream = ensure_stream(&js, &StreamSettings::default())
        .await
        .unwrap();
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
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);
    // And a new run of the same agent never collides with the old one.
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new("a1").unwrap(), "run2");
    assert!(!publisher.publish(&event).await.unwrap().duplicate);
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
