//! The publisher on the real Docker engine and real NATS: the stream's
//! last message per subject follows Docker's truth through every lifecycle
//! step, filters keep agents apart, restarts re-sync, and a NATS outage
//! loses nothing and duplicates nothing. A started container is reported
//! once it listens on the ports its labels proxy to.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use caddy_fleet::nats::async_nats::jetstream::{self, stream::Stream};
use caddy_fleet::schema::{AgentId, ContainerState, Event, RouteState};
use support::*;
use testcontainers::bollard::query_parameters::ListContainersOptionsBuilder;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

async fn stream(nats: &Nats) -> Stream {
    let js = jetstream::new(nats.client().await);
    ensure_log(&js, &[]).await
}

/// The last event on `fleet.<agent>.ctr.<id>`, if any.
async fn last_event(stream: &Stream, agent: &str, id: &str) -> Option<Event> {
    let message = stream
        .get_last_raw_message_by_subject(&format!("fleet.{agent}.ctr.{id}"))
        .await
        .ok()?;
    Event::decode(&message.payload).ok()
}

/// Every message of the stream, in order: (sequence, msg id, event).
async fn all_messages(stream: &Stream) -> Vec<(u64, String, Event)> {
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            if let Ok(event) = Event::decode(&m.payload) {
                out.push((seq, id, event));
            }
        }
    }
    out
}

/// The fold of the whole stream.
async fn fold(stream: &Stream) -> RouteState {
    let mut state = RouteState::default();
    for (seq, _, event) in all_messages(stream).await {
        state.apply(seq, &event);
    }
    state
}

/// Container IDs the fold would route for `agent`.
fn routable(state: &RouteState, agent: &str) -> BTreeSet<String> {
    state
        .live_containers()
        .filter(|r| r.facts.agent.as_str() == agent && r.facts.is_routable())
        .map(|r| r.facts.id.clone())
        .collect()
}

/// Docker's truth: running, unpaused containers labeled `caddy-fleet-test=<filter>`.
async fn docker_running(filter: &str) -> BTreeSet<String> {
    let docker = testcontainers::bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let filters: std::collections::HashMap<String, Vec<String>> = [
        (
            "label".to_string(),
            vec![format!("caddy-fleet-test={filter}")],
        ),
        ("status".to_string(), vec!["running".to_string()]),
    ]
    .into();
    let list = ListContainersOptionsBuilder::default()
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(list))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

async fn wait_for_truth(stream: &Stream, agent: &str, filter: &str) {
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let matched = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (folded, truth) = (
                routable(&fold(stream).await, agent),
                docker_running(filter).await,
            );
            if folded == truth {
                return;
            }
            last = (folded, truth);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        matched.is_ok(),
        "folded state never matched Docker: folded {:?}, Docker {:?}",
        last.0,
        last.1
    );
}

async fn wait_last(
    stream: &Stream,
    agent: &str,
    id: &str,
    what: &str,
    check: impl Fn(&Event) -> bool,
) -> Event {
    wait_for(what, Duration::from_secs(20), || async {
        last_event(stream, agent, id).await.filter(|e| check(e))
    })
    .await
}

fn state_is(state: ContainerState) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Up(f) if f.state == state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_message_per_container_follows_every_lifecycle_step() {
    let id = unique();
    let agent = format!("life-{id}");
    let nats = Nats::start().await;
    let stream = stream(&nats).await;
    let publisher = start_publisher(&nats, &agent, &id, "127.0.0.1");
    let backend = start_backend(&web_labels(&format!("{id}.life.test"), &id), "life").await;
    let cid = backend.id().to_string();

    let first = wait_last(
        &stream,
        &agent,
        &cid,
        "up running",
        state_is(ContainerState::Running),
    )
    .await;
    let Event::Up(first) = first else {
        unreachable!()
    };
    assert_eq!(first.name.trim_start_matches('/'), first.name);
    assert!(first.labels.contains_key("caddy") && first.labels.contains_key("caddy-fleet-test"));
    assert!(first.ports.iter().any(|p| p.container_port == 80));

    backend.stop().await.unwrap();
    wait_last(
        &stream,
        &agent,
        &cid,
        "exited after stop",
        state_is(ContainerState::Exited),
    )
    .await;
    backend.start().await.unwrap();
    let restarted = wait_last(
        &stream,
        &agent,
        &cid,
        "running after start",
        state_is(ContainerState::Running),
    )
    .await;
    let new_port = backend.get_host_port_ipv4(80).await.unwrap();
    let Event::Up(restarted) = restarted else {
        unreachable!()
    };
    assert!(
        restarted.ports.iter().any(|p| p.host_port == new_port),
        "ports not refreshed: {:?} vs {new_port}",
        restarted.ports
    );
    backend.pause().await.unwrap();
    wait_last(
        &stream,
        &agent,
        &cid,
        "paused",
        state_is(ContainerState::Paused),
    )
    .await;
    backend.unpause().await.unwrap();
    wait_last(
        &stream,
        &agent,
        &cid,
        "running after unpause",
        state_is(ContainerState::Running),
    )
    .await;
    wait_for_truth(&stream, &agent, &id).await;
    std::process::Command::new("docker")
        .args(["kill", &cid])
        .output()
        .unwrap();
    wait_last(
        &stream,
        &agent,
        &cid,
        "exited after kill",
        state_is(ContainerState::Exited),
    )
    .await;
    backend.rm().await.unwrap();
    wait_last(&stream, &agent, &cid, "down after removal", |e| {
        matches!(e, Event::Down(_))
    })
    .await;
    wait_for_truth(&stream, &agent, &id).await;
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_with_different_filters_never_publish_each_others_containers() {
    let id = unique();
    let (fa, fb) = (format!("{id}-a"), format!("{id}-b"));
    let nats = Nats::start().await;
    let stream = stream(&nats).await;
    let pa = start_publisher(&nats, &format!("a-{id}"), &fa, "127.0.0.2");
    let pb = start_publisher(&nats, &format!("b-{id}"), &fb, "127.0.0.3");
    let (la, lb) = (
        web_labels(&format!("{id}.a.test"), &fa),
        web_labels(&format!("{id}.b.test"), &fb),
    );
    let unfiltered = vec![
        ("caddy", format!("http://{id}.none.test")),
        ("caddy.reverse_proxy", "{{upstreams 80}}".into()),
    ];
    let (ca, cb, _cn) = tokio::join!(
        start_backend(&la, "a"),
        start_backend(&lb, "b"),
        start_backend(&unfiltered, "none")
    );
    wait_for_truth(&stream, &format!("a-{id}"), &fa).await;
    wait_for_truth(&stream, &format!("b-{id}"), &fb).await;
    // Let any stray message arrive before judging.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut by_agent: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, _, event) in all_messages(&stream).await {
        let container = match &event {
            Event::Up(f) => Some(f.id.clone()),
            Event::Down(d) => Some(d.id.clone()),
            _ => None,
        };
        if let Some(container) = container {
            by_agent
                .entry(event.agent().to_string())
                .or_default()
                .insert(container);
        }
    }
    assert_eq!(
        by_agent.get(&format!("a-{id}")),
        Some(&BTreeSet::from([ca.id().to_string()]))
    );
    assert_eq!(
        by_agent.get(&format!("b-{id}")),
        Some(&BTreeSet::from([cb.id().to_string()]))
    );
    pa.stop().await;
    pb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_syncs_what_changed_while_it_was_away() {
    let id = unique();
    let agent = format!("away-{id}");
    let nats = Nats::start().await;
    let stream = stream(&nats).await;
    let publisher = start_publisher(&nats, &agent, &id, "127.0.0.1");
    let (l1, l2) = (
        web_labels(&format!("{id}.1.test"), &id),
        web_labels(&format!("{id}.2.test"), &id),
    );
    let (c1, _c2) = tokio::join!(start_backend(&l1, "1"), start_backend(&l2, "2"));
    wait_for_truth(&stream, &agent, &id).await;
    publisher.stop().await;

    // While it is away: one container goes, another comes.
    c1.rm().await.unwrap();
    let l3 = web_labels(&format!("{id}.3.test"), &id);
    let _c3 = start_backend(&l3, "3").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        routable(&fold(&stream).await, &agent),
        docker_running(&id).await,
        "the test must start out of sync"
    );

    let publisher = start_publisher(&nats, &agent, &id, "127.0.0.1");
    wait_for_truth(&stream, &agent, &id).await;
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_loses_nothing_and_duplicates_nothing() {
    ensure_images();
    let id = unique();
    let agent = format!("out-{id}");
    let port = free_port();
    let container = GenericImage::new(NATS_IMAGE.0, NATS_IMAGE.1)
        .with_exposed_port(4222.tcp())
        .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
        .with_cmd(["-js", "-sd", "/data"])
        .with_mapped_port(port, 4222.tcp())
        .start()
        .await
        .unwrap();
    let nats = Nats {
        container,
        url: format!("nats://127.0.0.1:{port}"),
    };
    let stream_handle = stream(&nats).await;
    let publisher = start_publisher(&nats, &agent, &id, "127.0.0.1");
    let (l1, l2, l3) = (
        web_labels(&format!("{id}.1.test"), &id),
        web_labels(&format!("{id}.2.test"), &id),
        web_labels(&format!("{id}.3.test"), &id),
    );
    let (c1, c2) = tokio::join!(start_backend(&l1, "1"), start_backend(&l2, "2"));
    wait_for_truth(&stream_handle, &agent, &id).await;

    nats.container.stop().await.unwrap();
    // Changes while NATS is down.
    c1.stop().await.unwrap();
    let _c3 = start_backend(&l3, "3").await;
    c2.rm().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.container.start().await.unwrap();

    let stream_handle = stream(&nats).await;
    wait_for_truth(&stream_handle, &agent, &id).await;
    let ids: Vec<String> = all_messages(&stream_handle)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    let unique_ids: BTreeSet<&String> = ids.iter().collect();
    assert!(
        ids.iter().all(|i| !i.is_empty()),
        "every message carries a Nats-Msg-Id"
    );
    assert_eq!(
        unique_ids.len(),
        ids.len(),
        "a message was stored twice: {ids:?}"
    );
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_container_with_new_labels_yields_new_facts() {
    let id = unique();
    let agent = format!("relabel-{id}");
    let nats = Nats::start().await;
    let stream = stream(&nats).await;
    let publisher = start_publisher(&nats, &agent, &id, "127.0.0.1");
    let name = format!("relabel-{id}");
    let first = GenericImage::new(WHOAMI_IMAGE.0, WHOAMI_IMAGE.1)
        .with_exposed_port(80.tcp())
        .with_wait_for(WaitFor::message_on_stderr("server running"))
        .with_container_name(&name)
        .with_label("caddy", format!("http://{id}.old.test"))
        .with_label("caddy-fleet-test", &id)
        .start()
        .await
        .unwrap();
    let old_id = first.id().to_string();
    wait_last(
        &stream,
        &agent,
        &old_id,
        "first facts",
        state_is(ContainerState::Running),
    )
    .await;
    first.rm().await.unwrap();
    let second = GenericImage::new(WHOAMI_IMAGE.0, WHOAMI_IMAGE.1)
        .with_exposed_port(80.tcp())
        .with_wait_for(WaitFor::message_on_stderr("server running"))
        .with_container_name(&name)
        .with_label("caddy", format!("http://{id}.new.test"))
        .with_label("caddy.reverse_proxy", "{{upstreams 80}}")
        .with_label("caddy-fleet-test", &id)
        .start()
        .await
        .unwrap();
    wait_last(&stream, &agent, &old_id, "the old container down", |e| {
        matches!(e, Event::Down(_))
    })
    .await;
    let new = wait_last(
        &stream,
        &agent,
        second.id(),
        "the new facts",
        state_is(ContainerState::Running),
    )
    .await;
    let Event::Up(new) = new else { unreachable!() };
    assert_eq!(
        new.labels.get("caddy").map(String::as_str),
        Some(format!("http://{id}.new.test").as_str())
    );
    assert_eq!(new.name, name);
    let _ = AgentId::new(&agent).unwrap();
    publisher.stop().await;
}

/// A Caddy container answering on `port` only, labeled to be proxied to
/// container port `proxied`, which it publishes (so the publisher waits
/// for it: only ports a container declares are waited for).
async fn start_listening_on(
    port: u16,
    proxied: u16,
    domain: &str,
    filter: &str,
) -> testcontainers::ContainerAsync<GenericImage> {
    ensure_images();
    let caddyfile =
        format!("{{\n\tadmin off\n\tauto_https off\n}}\n:{port} {{\n\trespond \"{port}\"\n}}\n");
    let request = || {
        GenericImage::new(CADDY_IMAGE.0, CADDY_IMAGE.1)
            .with_exposed_port(proxied.tcp())
            .with_wait_for(WaitFor::message_on_stderr("serving initial configuration"))
            .with_copy_to("/etc/caddy/Caddyfile", caddyfile.clone().into_bytes())
            .with_label("caddy", format!("http://{domain}"))
            .with_label(
                "caddy.reverse_proxy",
                format!("{{{{upstreams {proxied}}}}}"),
            )
            .with_label("caddy-fleet-test", filter)
    };
    start_retrying(request, "listening backend").await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_container_is_reported_once_it_listens_on_its_proxied_port() {
    const READY_TIMEOUT: Duration = Duration::from_secs(8);
    let id = unique();
    let agent = format!("ready-{id}");
    let nats = Nats::start().await;
    let stream = stream(&nats).await;
    let publisher = start_publisher_tuned(&nats, &agent, &id, "127.0.0.1", true, |config| {
        config.ready_timeout = READY_TIMEOUT;
    });
    let before_start_ms = now_ms();
    // Labels that proxy to a port the container listens on, and labels
    // that proxy to one it never opens.
    let (listening_domain, deaf_domain) =
        (format!("{id}.listening.test"), format!("{id}.deaf.test"));
    let (listening, deaf) = tokio::join!(
        start_listening_on(8080, 8080, &listening_domain, &id),
        start_listening_on(8080, 9000, &deaf_domain, &id),
    );
    let running = |e: &Event| matches!(e, Event::Up(f) if f.state == ContainerState::Running);
    wait_last(
        &stream,
        &agent,
        listening.id(),
        "the listening container",
        running,
    )
    .await;
    // The deaf one only once the wait is over, with a warning in the log.
    let reported = wait_for(
        "the deaf container, once READY_TIMEOUT is over",
        READY_TIMEOUT + Duration::from_secs(30),
        || async { last_event(&stream, &agent, deaf.id()).await.filter(running) },
    )
    .await;
    let Event::Up(reported) = reported else {
        unreachable!()
    };
    let waited_ms = READY_TIMEOUT.as_millis() as u64 - 100;
    assert!(
        reported.observed_at_ms >= before_start_ms + waited_ms,
        "reported {} ms after the start began, before READY_TIMEOUT",
        reported.observed_at_ms - before_start_ms
    );
    // Before it, nothing said it runs; the listening one came first.
    let messages = all_messages(&stream).await;
    let first_running = |container: &str| {
        messages
            .iter()
            .find(|(_, _, e)| matches!(e, Event::Up(f) if f.id == container && f.state == ContainerState::Running))
            .map(|(seq, _, _)| *seq)
    };
    assert!(first_running(listening.id()) < first_running(deaf.id()));
    assert!(
        messages
            .iter()
            .filter(|(_, _, e)| matches!(e, Event::Up(f) if f.id == deaf.id()))
            .all(|(_, _, e)| matches!(e, Event::Up(f) if f.observed_at_ms >= before_start_ms + waited_ms)),
        "the deaf container was reported before the wait was over"
    );
    publisher.stop().await;
}
