//! Several ingresses on one log: two appliers, each with its own Caddy,
//! serve the same routes; a stopped one catches up; only the owner shapes
//! the log, and another applier whose settings differ refuses to start.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet::applier::{ApplierConfig, StatusBoard};
use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{EventPublisher, StreamSettings};
use caddy_fleet::schema::{AgentId, ContainerDown, ContainerState, Event};
use support::*;

/// The routes of this test's sites in `caddy`.
async fn routes_of(caddy: &Caddy, id: &str) -> Option<BTreeMap<String, Vec<String>>> {
    let suffix = format!(".{id}.test");
    Some(
        caddy_routes(caddy)
            .await?
            .into_iter()
            .filter(|(host, _)| host.ends_with(&suffix))
            .collect(),
    )
}

/// Waits until `caddy` serves exactly `expected`.
async fn serves(caddy: &Caddy, id: &str, expected: &BTreeMap<String, Vec<String>>, what: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        (routes_of(caddy, id).await.as_ref() == Some(expected)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingresses_serve_the_same_routes_and_a_stopped_one_catches_up() {
    let id = unique();
    let (nats, caddy_a, caddy_b) = tokio::join!(Nats::start(), Caddy::start(), Caddy::start());
    let js = jetstream::new(nats.client().await);
    let agent = format!("fleet-{id}");
    let log = ensure_log(&js, &[&agent]).await;
    let (owner, _) = start_applier(&nats, &caddy_a, "ingress-a");
    let follower_settings = StreamSettings {
        owner: false,
        ..StreamSettings::default()
    };
    let (follower, _) = start_applier_on(
        &nats,
        &caddy_b,
        "ingress-b",
        follower_settings.clone(),
        |_| {},
    );
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new(&agent).unwrap(), "ing");
    let up = |i: u16| {
        synthetic_up(
            &agent,
            &format!("c{i}"),
            &format!("s{i}.{id}.test"),
            "127.0.0.1",
            Some(3000 + i),
            ContainerState::Running,
        )
    };
    let route = |i: u16| {
        (
            format!("s{i}.{id}.test"),
            vec![format!("127.0.0.1:{}", 3000 + i)],
        )
    };
    for i in 0..10 {
        publish_to_log(&mut publisher, &log, &up(i)).await;
    }
    let first: BTreeMap<_, _> = (0..10).map(route).collect();
    serves(&caddy_a, &id, &first, "ingress A to serve the first ten").await;
    serves(&caddy_b, &id, &first, "ingress B to serve the first ten").await;

    // B stops; the fleet changes; B comes back and catches up.
    follower.stop().await;
    for i in 0..5 {
        let down = Event::Down(ContainerDown {
            agent: AgentId::new(&agent).unwrap(),
            id: format!("c{i}"),
            observed_at_ms: 0,
        });
        publish_to_log(&mut publisher, &log, &down).await;
    }
    for i in 10..15 {
        publish_to_log(&mut publisher, &log, &up(i)).await;
    }
    let second: BTreeMap<_, _> = (5..15).map(route).collect();
    serves(&caddy_a, &id, &second, "ingress A to follow the changes").await;
    assert_eq!(
        routes_of(&caddy_b, &id).await.as_ref(),
        Some(&first),
        "a stopped ingress changed"
    );
    let (follower, _) = start_applier_on(&nats, &caddy_b, "ingress-b", follower_settings, |_| {});
    serves(&caddy_b, &id, &second, "ingress B to catch up").await;
    follower.stop().await;
    owner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applier_that_does_not_own_the_log_never_changes_it() {
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let js = jetstream::new(nats.client().await);
    let run = |stream: StreamSettings| {
        let nats = nats.config();
        let mut config = ApplierConfig::new("not-owner", caddy.admin_url());
        config.base_caddyfile = Some(caddy.base_caddyfile());
        async move {
            caddy_fleet::run_applier(
                &nats,
                &stream,
                config,
                Arc::new(StatusBoard::default()),
                async {},
            )
            .await
        }
    };
    let follower = StreamSettings {
        owner: false,
        ..StreamSettings::default()
    };
    // No log yet: it does not create one.
    let error = run(follower.clone()).await.unwrap_err().to_string();
    assert!(
        error.contains("does not exist") && error.contains("STREAM_OWNER"),
        "{error}"
    );
    assert!(
        js.get_stream("CADDY_FLEET").await.is_err(),
        "a follower created the log"
    );
    // The owner's log, and a follower asking for other settings: refused,
    // naming the settings, and the log keeps the owner's.
    let owned = ensure_log(&js, &[]).await;
    let differs = StreamSettings {
        max_age: Duration::from_secs(3600),
        ..follower
    };
    let error = run(differs).await.unwrap_err().to_string();
    assert!(
        error.contains("STREAM_MAX_AGE: 3600s here, 604800s on the log")
            && error.contains("STREAM_OWNER=true"),
        "{error}"
    );
    let mut owned = owned;
    let info = owned.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 86_400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_ingresses_each_serve_only_their_domains() {
    let id = unique();
    let (nats, caddy_a, caddy_b) = tokio::join!(Nats::start(), Caddy::start(), Caddy::start());
    let js = jetstream::new(nats.client().await);
    let agent = format!("shards-{id}");
    let log = ensure_log(&js, &[&agent]).await;
    let shard = |patterns: String| {
        move |c: &mut ApplierConfig| {
            c.translate.shard =
                Some(caddy_fleet::schema::shard::DomainShard::parse(&patterns).expect("patterns"));
        }
    };
    let (applier_a, board_a) = start_applier_on(
        &nats,
        &caddy_a,
        "shard-a",
        StreamSettings::default(),
        shard(format!("*.a.{id}.test")),
    );
    let (applier_b, board_b) = start_applier_on(
        &nats,
        &caddy_b,
        "shard-b",
        StreamSettings {
            owner: false,
            ..StreamSettings::default()
        },
        shard(format!("*.b.{id}.test, other.test")),
    );
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new(&agent).unwrap(), "shard");
    let sites = [
        ("c0", format!("s0.a.{id}.test"), 3100),
        ("c1", format!("s1.a.{id}.test"), 3101),
        ("c2", format!("s0.b.{id}.test"), 3102),
        // One block for a site in each shard: each serves its own half.
        ("c3", format!("x.a.{id}.test, http://x.b.{id}.test"), 3103),
        // In neither shard: ignored by both, refused by none.
        ("c4", format!("s0.c.{id}.test"), 3104),
    ];
    for (container, domain, port) in &sites {
        let up = synthetic_up(
            &agent,
            container,
            domain,
            "127.0.0.1",
            Some(*port),
            ContainerState::Running,
        );
        publish_to_log(&mut publisher, &log, &up).await;
    }
    let route = |host: String, port: u16| (host, vec![format!("127.0.0.1:{port}")]);
    let expected_a: BTreeMap<_, _> = [
        route(format!("s0.a.{id}.test"), 3100),
        route(format!("s1.a.{id}.test"), 3101),
        route(format!("x.a.{id}.test"), 3103),
    ]
    .into();
    let expected_b: BTreeMap<_, _> = [
        route(format!("s0.b.{id}.test"), 3102),
        route(format!("x.b.{id}.test"), 3103),
    ]
    .into();
    serves(
        &caddy_a,
        &id,
        &expected_a,
        "shard A to serve its sites only",
    )
    .await;
    serves(
        &caddy_b,
        &id,
        &expected_b,
        "shard B to serve its sites only",
    )
    .await;
    // Ignored, not refused, and counted on /status.
    for (board, outside, patterns) in [
        (&board_a, 3, vec![format!("*.a.{id}.test")]),
        (
            &board_b,
            4,
            vec![format!("*.b.{id}.test"), "other.test".into()],
        ),
    ] {
        let view = wait_for("the shard's status", Duration::from_secs(30), || async {
            let view = board.view();
            (view.sites_outside_shard == outside).then_some(view)
        })
        .await;
        assert!(view.rejected.is_empty(), "{:?}", view.rejected);
        assert_eq!(view.shard, Some(patterns));
    }
    applier_b.stop().await;
    applier_a.stop().await;
}
