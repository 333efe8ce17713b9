//! End-to-end: real Docker → in-process publisher → real NATS JetStream →
//! in-process applier → real Caddy → real backend.

mod support;

use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::jetstream;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeled_backend_is_routed_then_unrouted_when_stopped() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (mut applier, stats) = start_applier(&nats, &caddy, "e2e");
    let mut publisher = start_publisher(&nats, &format!("e2e-{id}"), &id, "127.0.0.1");

    let domain = format!("{id}.e2e.test");
    let body = format!("backend-{id}");
    let started = Instant::now();
    let backend = start_backend(&web_labels(&domain, &id), &body).await;
    let container_started = started.elapsed();
    caddy
        .wait_serving(&domain, &body, Duration::from_secs(30))
        .await;
    let first_200 = started.elapsed();
    println!(
        "e2e: backend container started in {container_started:?}; first 200 through Caddy {:?} after start, {first_200:?} after `docker run`",
        first_200 - container_started
    );
    assert!(stats.stats.snapshot().pushes >= 1);

    backend.stop().await.expect("stop backend");
    // A stopped upstream already fails at the proxy; what matters is that
    // the route itself leaves Caddy's config.
    let config = wait_for(
        "the route to leave Caddy's config",
        Duration::from_secs(30),
        || async {
            let config = caddy.config().await?.to_string();
            (!config.contains(&domain)).then_some(config)
        },
    )
    .await;
    let answer = caddy.get(&domain).await;
    assert!(
        !matches!(&answer, Some((_, text)) if text == &body),
        "Caddy still routes {domain}: {answer:?}"
    );
    assert!(
        config.contains(&format!("127.0.0.1:{}", caddy.admin_port)),
        "admin block lost: {config}"
    );

    publisher.assert_running();
    applier.assert_running();
    publisher.stop().await;
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_versions_are_skipped_and_acked() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, stats) = start_applier(&nats, &caddy, "garbage");
    let js = jetstream::new(nats.client().await);
    // Wait for the applier to create the stream.
    wait_for("the stream to exist", Duration::from_secs(15), || async {
        js.get_stream("CADDY_FLEET").await.ok()
    })
    .await;

    let agent = format!("junk-{id}");
    let victim = format!("victim-{id}");
    ensure_log(&js, &[&agent]).await;
    for payload in [
        &b"\xff\xfe not json at all"[..],
        br#"{"v":99,"kind":"teleport","agent":"x"}"#,
    ] {
        js.publish(format!("fleet.{agent}.ctr.bad"), payload.to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    // The next valid message (from a real publisher) is still applied.
    let publisher = start_publisher(&nats, &victim, &id, "127.0.0.1");
    let domain = format!("{id}.garbage.test");
    let body = format!("after-garbage-{id}");
    let _backend = start_backend(&web_labels(&domain, &id), &body).await;
    caddy
        .wait_serving(&domain, &body, Duration::from_secs(30))
        .await;

    // With its own credentials, the junk agent forges the victim: a sync
    // naming the victim (which would drop all its routes) and a container
    // credited to it, on the junk agent's own subjects. Both are skipped.
    let forged_sync = format!(
        r#"{{"v":1,"kind":"sync","agent":"{victim}","host_address":"h","containers":[],"observed_at_ms":1}}"#
    );
    let forged_down =
        format!(r#"{{"v":1,"kind":"down","agent":"{agent}","id":"other","observed_at_ms":1}}"#);
    for (subject, payload) in [
        (format!("fleet.{agent}.sync"), forged_sync),
        (format!("fleet.{agent}.ctr.bad"), forged_down),
    ] {
        js.publish(subject, payload.into_bytes().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    wait_for(
        "the forgeries to be skipped",
        Duration::from_secs(15),
        || async { (stats.stats.snapshot().decode_errors >= 4).then_some(()) },
    )
    .await;
    assert_eq!(
        caddy.get(&domain).await,
        Some((200, body.clone())),
        "the victim's route must survive a forged sync"
    );
    assert_eq!(stats.stats.skipped("foreign_agent"), 1);
    assert_eq!(stats.stats.skipped("wrong_subject"), 1);

    let snapshot = stats.stats.snapshot();
    assert_eq!(snapshot.decode_errors, 4, "{snapshot:?}");
    assert!(snapshot.events_folded >= 2, "{snapshot:?}");
    // Everything delivered was acked: nothing waits for redelivery.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream("CADDY_FLEET")
        .await
        .unwrap()
        .get_consumer("garbage")
        .await
        .unwrap();
    let info = wait_for("acks to settle", Duration::from_secs(10), || async {
        let info = consumer.get_info().await.ok()?;
        (info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= 4).then_some(info)
    })
    .await;
    assert!(info.ack_floor.stream_sequence >= 5, "{info:?}");

    publisher.stop().await;
    applier.stop().await;
}
