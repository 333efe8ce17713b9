//! A burst of 300 real labeled containers started at once (Docker here
//! starts 3–5 a second, so a burst of well over a minute): every route is
//! served, answered by its own container, and the pushes never outnumber
//! the messages (changes that arrive during a push go out together).
//!
//! Run: `cargo bench --bench burst` (needs Docker; prints figures). It was
//! an integration test; it is a load test, so it lives here.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

fn main() {
    bench_main(burst());
}

async fn burst() {
    use futures::StreamExt;

    const COUNT: usize = 300;
    let id = unique();
    let _cleanup = LabelCleanup(format!("caddy-fleet-burst={id}"));
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    // Docker 20.10 here starts about 3-5 containers a second, so "300 at
    // once" is a burst of well over a minute with events every fraction of
    // a second; pushes batch what arrives while one is in flight.
    let (applier, board) = start_applier(&nats, &caddy, "burst");
    let publisher = start_publisher(&nats, &format!("burst-{id}"), &id, "127.0.0.1");
    let docker = testcontainers::bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let mut names = Vec::new();
    for i in 0..COUNT {
        let labels = vec![
            ("caddy".to_string(), format!("http://b{i}.{id}.test")),
            (
                "caddy.reverse_proxy".to_string(),
                "{{upstreams 80}}".to_string(),
            ),
            ("caddy-fleet-test".to_string(), id.clone()),
            ("caddy-fleet-burst".to_string(), id.clone()),
        ];
        let body = whoami_body(labels, &format!("burst-{i}"));
        let created = docker
            .create_container(None, body)
            .await
            .expect("create burst container");
        names.push(created.id);
    }
    // Count from when the applier's first (empty) push is done.
    wait_for("the first push", Duration::from_secs(30), || async {
        board.view().converged.then_some(())
    })
    .await;
    let before = board.stats.snapshot();
    let started = Instant::now();
    futures::stream::iter(names.iter())
        .map(|name| docker.start_container(name, None))
        .buffer_unordered(16)
        .for_each(|r| async { r.expect("start burst container") })
        .await;
    let all_started = started.elapsed();
    let routes = wait_for(
        "all 300 routes in Caddy",
        Duration::from_secs(90),
        || async {
            let routes = caddy_routes(&caddy).await?;
            (routes
                .keys()
                .filter(|h| h.ends_with(&format!(".{id}.test")))
                .count()
                == COUNT)
                .then_some(routes)
        },
    )
    .await;
    let all_routed = started.elapsed();
    for i in 0..COUNT {
        let host = format!("b{i}.{id}.test");
        assert_eq!(routes[&host].len(), 1, "{host}");
        let answer = caddy.get(&host).await;
        assert_eq!(answer, Some((200, format!("burst-{i}"))), "{host}");
    }
    // Count once Caddy runs the newest state (no push left to go out).
    wait_for("the last push", Duration::from_secs(30), || async {
        board.view().converged.then_some(())
    })
    .await;
    let after = board.stats.snapshot();
    let pushes = after.pushes - before.pushes;
    let folded = after.events_folded - before.events_folded;
    println!("burst: {COUNT} containers started in {all_started:?}, all routed after {all_routed:?}, {pushes} pushes for {folded} messages");
    // Changes that arrive during a push go out together in the next one:
    // never more pushes than messages, however the burst is spread.
    assert!(pushes <= folded, "{pushes} pushes for {folded} messages");
    println!(
        "burst of {COUNT}: docker start {:.1} s, all routed {:.2} s after the last start, {pushes} pushes for {folded} messages",
        all_started.as_secs_f64(),
        (all_routed - all_started).as_secs_f64()
    );
    publisher.stop().await;
    applier.stop().await;
}
