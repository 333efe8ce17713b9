//! The applier against real NATS, real Caddy and real backends: crashes in
//! the middle of a stream, Caddy restarts and outages, bursts, and a
//! container Caddy refuses.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_agent_stream, EventPublisher, StreamSettings};
use caddy_fleet::schema::{
    AgentId, AgentSync, ContainerDown, ContainerState, Event, Heartbeat, RouteState,
};
use support::*;

/// A deterministic stream of container events over `containers` synthetic
/// containers on two agents, all pointing at real backends' ports.
struct EventScript {
    seed: u64,
    ports: Vec<u16>,
    containers: usize,
    tag: String,
}

impl EventScript {
    fn next_random(&mut self) -> u64 {
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.seed >> 33
    }

    fn agent(i: usize) -> AgentId {
        AgentId::new(format!("agent{}", i % 2)).unwrap()
    }

    fn event(&mut self) -> Event {
        let roll = self.next_random() % 100;
        let c = (self.next_random() as usize) % self.containers;
        let agent = Self::agent(c);
        match roll {
            0..=59 => {
                let pick = self.next_random() as usize;
                let port = self.ports[pick % self.ports.len()];
                let running = !self.next_random().is_multiple_of(5);
                let state = if running {
                    ContainerState::Running
                } else {
                    ContainerState::Exited
                };
                let domain = format!("d{c}.{}.test", self.tag);
                synthetic_up(
                    agent.as_str(),
                    &format!("c{c}"),
                    &domain,
                    "127.0.0.1",
                    Some(port),
                    state,
                )
            }
            60..=74 => Event::Down(ContainerDown {
                agent,
                id: format!("c{c}"),
                observed_at_ms: 0,
            }),
            75..=84 => {
                let listed = (0..self.containers)
                    .filter(|i| Self::agent(*i) == agent && !self.next_random().is_multiple_of(4))
                    .map(|i| format!("c{i}"))
                    .collect();
                Event::Sync(AgentSync {
                    agent,
                    host_address: "127.0.0.1".into(),
                    containers: listed,
                    observed_at_ms: 0,
                })
            }
            _ => Event::Heartbeat(Heartbeat {
                agent,
                sent_at_ms: self.next_random(),
            }),
        }
    }
}

async fn publish_all(
    js: &jetstream::Context,
    events: &[Event],
    reference: &mut RouteState,
    nonce: &str,
) {
    let mut publishers: BTreeMap<AgentId, EventPublisher> = BTreeMap::new();
    for event in events {
        if !publishers.contains_key(event.agent()) {
            ensure_agent_stream(js, &StreamSettings::default(), event.agent())
                .await
                .expect("ingest stream");
        }
        let publisher = publishers
            .entry(event.agent().clone())
            .or_insert_with(|| EventPublisher::new(js.clone(), event.agent().clone(), nonce));
        publisher.publish(event).await.expect("publish");
        // Agents' messages may interleave differently in the log, but each
        // agent's keep their order, and agents fold independently.
        reference.apply(reference.last_seq + 1, event);
    }
}

async fn wait_for_routes(
    caddy: &Caddy,
    expected: &BTreeMap<String, Vec<String>>,
    timeout: Duration,
) {
    let mut last = None;
    let result = tokio::time::timeout(timeout, async {
        loop {
            let routes = caddy_routes(caddy).await;
            if routes.as_ref() == Some(expected) {
                return;
            }
            last = routes;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if result.is_err() {
        panic!("Caddy's routes never matched the expected routes.\nexpected: {expected:?}\nlast seen: {last:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_applier_mid_stream_loses_nothing_with_frequent_checkpoints() {
    // Small checkpoints, so the kills land before, between and after them.
    kill_mid_stream(|c| {
        c.checkpoint_every = 70;
        c.checkpoint_interval = Duration::from_millis(700);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_applier_mid_stream_loses_nothing_without_checkpoints() {
    // No checkpoint is ever written: every restart recovers by replaying
    // the stream up to what the durable consumer already delivered.
    kill_mid_stream(|c| {
        c.checkpoint_every = 1_000_000;
        c.checkpoint_interval = Duration::from_secs(3600);
    })
    .await;
}

async fn kill_mid_stream(tune: fn(&mut caddy_fleet::applier::ApplierConfig)) {
    let tag = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (b1, b2, b3) = tokio::join!(
        start_backend(&[], "one"),
        start_backend(&[], "two"),
        start_backend(&[], "three")
    );
    let mut ports = Vec::new();
    for b in [&b1, &b2, &b3] {
        ports.push(b.get_host_port_ipv4(80).await.unwrap());
    }
    let js = jetstream::new(nats.client().await);
    ensure_log(&js, &[]).await;
    let mut script = EventScript {
        seed: 7,
        ports,
        containers: 60,
        tag: tag.clone(),
    };
    let events: Vec<Event> = (0..600).map(|_| script.event()).collect();
    let mut reference = RouteState::default();

    let mut applier = Some(start_applier_with(&nats, &caddy, "crashy", tune).0);
    for (round, chunk) in events.chunks(150).enumerate() {
        publish_all(&js, chunk, &mut reference, &format!("run{round}")).await;
        // Let it work a varying while, then kill it: no graceful path.
        tokio::time::sleep(Duration::from_millis(150 + 400 * round as u64)).await;
        drop(applier.take());
        applier = Some(start_applier_with(&nats, &caddy, "crashy", tune).0);
    }
    // A last burst of containers never seen before, killed right away:
    // folded but not yet checkpointed, so only recovery can save them.
    let port = script.ports[0];
    let fresh: Vec<Event> = (60..100)
        .map(|c| {
            synthetic_up(
                "agent0",
                &format!("c{c}"),
                &format!("d{c}.{tag}.test"),
                "127.0.0.1",
                Some(port),
                ContainerState::Running,
            )
        })
        .collect();
    publish_all(&js, &fresh, &mut reference, "fresh").await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    drop(applier.take());
    applier = Some(start_applier_with(&nats, &caddy, "crashy", tune).0);
    let expected = expected_routes(&reference);
    assert!((60..100).all(|c| expected.contains_key(&format!("d{c}.{tag}.test"))));
    assert!(
        expected.len() > 10,
        "the script should leave routes: {expected:?}"
    );
    wait_for_routes(&caddy, &expected, Duration::from_secs(30)).await;
    // And a route really serves.
    let (host, upstreams) = expected.iter().next().unwrap();
    let answer = caddy.get(host).await;
    assert!(
        matches!(&answer, Some((200, body)) if ["one", "two", "three"].contains(&body.as_str())),
        "{host} {upstreams:?}: {answer:?}"
    );
    drop(applier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_caddy_gets_its_routes_back_within_seconds() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, board) = start_applier(&nats, &caddy, "heal");
    let publisher = start_publisher(&nats, &format!("h-{id}"), &id, "127.0.0.1");
    let domain = format!("{id}.heal.test");
    let _backend = start_backend(&web_labels(&domain, &id), "healed").await;
    caddy
        .wait_serving(&domain, "healed", Duration::from_secs(30))
        .await;
    let pushes_before = board.stats.snapshot().pushes;

    caddy.container.stop().await.unwrap();
    caddy.container.start().await.unwrap();
    let restarted = Instant::now();
    caddy
        .wait_serving(&domain, "healed", Duration::from_secs(5))
        .await;
    println!(
        "caddy restart: route served again {:?} after Caddy came back",
        restarted.elapsed()
    );
    assert!(board.stats.snapshot().pushes > pushes_before);
    publisher.stop().await;
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_down_during_a_burst_converges_when_it_returns() {
    let tag = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let backend = start_backend(&[], "burst").await;
    let port = backend.get_host_port_ipv4(80).await.unwrap();
    let js = jetstream::new(nats.client().await);
    ensure_log(&js, &[]).await;
    let (applier, board) = start_applier(&nats, &caddy, "outage");
    let mut script = EventScript {
        seed: 11,
        ports: vec![port],
        containers: 40,
        tag,
    };
    let mut reference = RouteState::default();

    let first: Vec<Event> = (0..50).map(|_| script.event()).collect();
    publish_all(&js, &first, &mut reference, "a").await;
    caddy.container.stop().await.unwrap();
    let burst: Vec<Event> = (0..200).map(|_| script.event()).collect();
    publish_all(&js, &burst, &mut reference, "b").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    caddy.container.start().await.unwrap();
    wait_for_routes(
        &caddy,
        &expected_routes(&reference),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        board.stats.snapshot().push_failures > 0,
        "the outage should have been noticed"
    );
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_caddy_refuses_is_isolated_and_shown_in_status() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, board) = start_applier(&nats, &caddy, "refuse");
    let (status_url, stop_status) = serve_status(board.clone());
    let publisher = start_publisher(&nats, &format!("r-{id}"), &id, "127.0.0.1");
    let (good1, good2) = (format!("{id}.g1.test"), format!("{id}.g2.test"));
    let mut bad_labels = web_labels(&format!("{id}.bad.test"), &id);
    bad_labels.push(("caddy.bogus_directive", "on".into()));
    let (l1, l2) = (web_labels(&good1, &id), web_labels(&good2, &id));
    let (_g1, _g2, bad) = tokio::join!(
        start_backend(&l1, "good1"),
        start_backend(&l2, "good2"),
        start_backend(&bad_labels, "bad"),
    );
    for (domain, body) in [(&good1, "good1"), (&good2, "good2")] {
        caddy
            .wait_serving(domain, body, Duration::from_secs(30))
            .await;
    }
    let status = wait_for(
        "the refused container in /status",
        Duration::from_secs(10),
        || async {
            let status = get_json(&format!("{status_url}/status")).await?;
            let refused = status["rejected"]
                .as_array()?
                .iter()
                .find(|r| r["container_id"] == bad.id())?
                .clone();
            Some((status, refused))
        },
    )
    .await;
    let (status, refused) = status;
    assert_eq!(refused["by"], "caddy", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("bogus_directive"),
        "{refused}"
    );
    let sites: Vec<&str> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["site"].as_str())
        .collect();
    assert!(
        sites.contains(&format!("http://{good1}").as_str())
            && !sites.iter().any(|s| s.contains("bad.test")),
        "{sites:?}"
    );
    let metrics = reqwest::get(format!("{status_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("caddy_fleet_rejected_containers 1"),
        "{metrics}"
    );
    assert_eq!(
        reqwest::get(format!("{status_url}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );

    // The debugging commands, with the live applier answering, say so too,
    // with Caddy's reason.
    let dir = std::env::temp_dir().join(format!("caddy-fleet-refuse-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[default]\ndomains = [\"*\"]\ntrusted = true\n").unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
            .args(args)
            .env("NATS_URL", &nats.url)
            .env("APPLIER_NAME", "refuse")
            .env("CADDY_API_URL", caddy.admin_url())
            .env("POLICY_FILE", &policy)
            .env("STATUS_LISTEN", status_url.trim_start_matches("http://"))
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
    let explained = cli(&["explain", &format!("{id}.bad.test")]);
    assert!(
        explained.contains("refused by caddy") && explained.contains("bogus_directive"),
        "{explained}"
    );
    let routes = cli(&["routes"]);
    assert!(
        routes.contains("REFUSED CONTAINER") && routes.contains("bogus_directive"),
        "{routes}"
    );
    assert!(routes.contains("live applier"), "{routes}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = stop_status.send(());
    publisher.stop().await;
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_loses_its_routes_after_the_ttl_and_regains_them() {
    let tag = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let backend = start_backend(&[], "ttl").await;
    let port = backend.get_host_port_ipv4(80).await.unwrap();
    let js = jetstream::new(nats.client().await);
    ensure_log(&js, &[]).await;
    let (applier, board) = start_applier_with(&nats, &caddy, "ttl", |c| {
        c.agent_ttl = Some(Duration::from_secs(2))
    });
    let mut script = EventScript {
        seed: 3,
        ports: vec![port],
        containers: 1,
        tag: tag.clone(),
    };
    let up = loop {
        if let Event::Up(mut facts) = script.event() {
            facts.state = ContainerState::Running;
            break Event::Up(facts);
        }
    };
    let host = format!("d0.{tag}.test");
    let mut reference = RouteState::default();
    let before_last_message = Instant::now();
    publish_all(&js, &[up], &mut reference, "1").await;
    caddy
        .wait_serving(&host, "ttl", Duration::from_secs(10))
        .await;
    // Silence: the route goes after the TTL, and /status says why.
    wait_for(
        "the route to be removed",
        Duration::from_secs(10),
        || async { (!caddy_routes(&caddy).await?.contains_key(&host)).then_some(()) },
    )
    .await;
    let silent = before_last_message.elapsed();
    assert!(
        silent >= Duration::from_secs(2),
        "removed before the TTL: {silent:?}"
    );
    let agents = board.view().agents;
    assert!(
        agents.iter().any(|a| a.agent == "agent0" && a.expired),
        "{agents:?}"
    );
    // The agent's next sync brings it back.
    let sync = Event::Sync(AgentSync {
        agent: AgentId::new("agent0").unwrap(),
        host_address: "127.0.0.1".into(),
        containers: vec!["c0".into()],
        observed_at_ms: 0,
    });
    publish_all(&js, &[sync], &mut reference, "2").await;
    caddy
        .wait_serving(&host, "ttl", Duration::from_secs(10))
        .await;
    applier.stop().await;
}
