//! Upstreams by DNS (`UPSTREAMS=dynamic`) against a real NATS, a real
//! Caddy and the applier's real DNS server: a deploy that only moves a
//! site's upstreams is served from the new answers with no config load
//! (Caddy's own `caddy_config_last_reload_success_timestamp_seconds` does
//! not move), a WebSocket to the old backend stays open meanwhile, and
//! whatever changes the Caddyfile (a new site, a site's last container
//! gone) is still pushed. A site whose labels configure Caddy's health
//! checks keeps static upstreams and says why.
//!
//! The facts are published straight into the log (two agents, one site),
//! and the backends are loopback WebSocket servers answering with their
//! own name, so what answers is the truth whatever the config says.

mod support;

use std::time::Duration;

use caddy_fleet::schema::routes::UpstreamsMode;
use caddy_fleet::schema::{AgentId, ContainerDown, ContainerState, Event};
use futures::{SinkExt, StreamExt};
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket server on loopback answering each text with `<name>:<text>`;
/// returns its port.
async fn named_echo(name: &'static str) -> u16 {
    websocket_server(move |text| format!("{name}:{text}")).await
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket to `host` through Caddy, if the handshake succeeds.
async fn connect_through(caddy: &Caddy, host: &str) -> Option<Socket> {
    let tcp = TcpStream::connect(("127.0.0.1", caddy.http_port))
        .await
        .ok()?;
    let connect = tokio_tungstenite::client_async(format!("ws://{host}/"), tcp);
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .ok()?
        .ok()?;
    Some(ws)
}

/// Who answers one round trip on `ws`; `None` once it is closed.
async fn who_answers(ws: &mut Socket) -> Option<String> {
    ws.send(Message::text("ping")).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(echo)))) => {
            echo.as_str().strip_suffix(":ping").map(str::to_string)
        }
        _ => None,
    }
}

/// Waits until a new WebSocket to `host` is answered by `name`, and
/// returns that socket.
async fn served_by(caddy: &Caddy, host: &str, name: &str) -> Socket {
    wait_for(
        &format!("{host} to be served by {name}"),
        Duration::from_secs(30),
        || async {
            let mut ws = connect_through(caddy, host).await?;
            (who_answers(&mut ws).await.as_deref() == Some(name)).then_some(ws)
        },
    )
    .await
}

/// When Caddy last loaded a config, as its admin API's metrics say.
async fn last_reload(caddy: &Caddy) -> String {
    wait_for("Caddy's reload metric", Duration::from_secs(10), || async {
        let metrics = reqwest::get(format!("{}/metrics", caddy.admin_url()))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics
            .lines()
            .find(|l| l.starts_with("caddy_config_last_reload_success_timestamp_seconds "))
            .map(str::to_string)
    })
    .await
}

fn down(agent: &str, id: &str) -> Event {
    Event::Down(ContainerDown {
        agent: AgentId::new(agent).unwrap(),
        id: id.into(),
        observed_at_ms: 0,
    })
}

fn up(agent: &str, id: &str, domain: &str, port: u16) -> Event {
    synthetic_up(
        agent,
        id,
        domain,
        "127.0.0.1",
        Some(port),
        ContainerState::Running,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_moves_upstreams_by_dns_without_reloading_caddy() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, board) = start_applier_with(&nats, &caddy, "dynamic", |config| {
        config.translate.dynamic_upstreams = Some(dynamic_upstreams());
    });
    let js = caddy_fleet::nats::async_nats::jetstream::new(nats.client().await);
    let (agent_a, agent_b) = (format!("dyn-a-{id}"), format!("dyn-b-{id}"));
    let domain = format!("{id}.dynamic.test");

    let old = named_echo("old").await;
    publish_batched(&js, [up(&agent_a, "c-old", &domain, old)].into_iter(), "d1").await;
    let mut old_socket = served_by(&caddy, &domain, "old").await;
    let row = wait_for("the site in /status", Duration::from_secs(10), || async {
        board
            .view()
            .routes
            .into_iter()
            .find(|r| r.site.contains(&domain))
    })
    .await;
    assert_eq!(row.upstreams_mode, UpstreamsMode::Dynamic, "{row:?}");
    let before = last_reload(&caddy).await;

    // The container replaced by one on another agent and another port:
    // the new one started (and routed), then the old one removed.
    let new = named_echo("new").await;
    publish_batched(&js, [up(&agent_b, "c-new", &domain, new)].into_iter(), "d2").await;
    served_by(&caddy, &domain, "new").await;
    publish_batched(&js, [down(&agent_a, "c-old")].into_iter(), "d3").await;
    wait_for(
        "only the new backend to answer new connections",
        Duration::from_secs(30),
        || async {
            for _ in 0..5 {
                let mut ws = connect_through(&caddy, &domain).await?;
                if who_answers(&mut ws).await.as_deref() != Some("new") {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let mut new_socket = served_by(&caddy, &domain, "new").await;
    assert_eq!(
        last_reload(&caddy).await,
        before,
        "Caddy loaded a config for a deploy that only moved upstreams"
    );
    assert_eq!(
        who_answers(&mut old_socket).await.as_deref(),
        Some("old"),
        "the WebSocket to the old backend was closed by the deploy"
    );
    let row =
        wait_for(
            "the new upstream in /status",
            Duration::from_secs(10),
            || async {
                board.view().routes.into_iter().find(|r| {
                    r.site.contains(&domain) && r.upstreams == [format!("127.0.0.1:{new}")]
                })
            },
        )
        .await;
    assert_eq!(row.containers.len(), 1, "{row:?}");

    // Scaled out to both agents: both answer new connections.
    let third = named_echo("third").await;
    publish_batched(
        &js,
        [up(&agent_a, "c-third", &domain, third)].into_iter(),
        "d4",
    )
    .await;
    served_by(&caddy, &domain, "third").await;
    served_by(&caddy, &domain, "new").await;
    assert_eq!(
        last_reload(&caddy).await,
        before,
        "scaling out reloaded Caddy"
    );

    // A new site changes the Caddyfile: it is pushed.
    let other = format!("other-{id}.dynamic.test");
    let other_port = named_echo("other").await;
    publish_batched(
        &js,
        [up(&agent_b, "c-other", &other, other_port)].into_iter(),
        "d5",
    )
    .await;
    served_by(&caddy, &other, "other").await;
    assert_ne!(last_reload(&caddy).await, before, "a new site needs a push");

    // The site's last containers gone: the site leaves Caddy's config.
    publish_batched(
        &js,
        [down(&agent_b, "c-new"), down(&agent_a, "c-third")].into_iter(),
        "d6",
    )
    .await;
    wait_for(
        "the site to leave Caddy's config",
        Duration::from_secs(30),
        || async {
            let config = caddy.config().await?.to_string();
            let host = |domain: &str| format!("\"{domain}\"");
            (!config.contains(&host(&domain)) && config.contains(&host(&other))).then_some(())
        },
    )
    .await;
    assert_eq!(
        who_answers(&mut new_socket).await.as_deref(),
        Some("new"),
        "a socket lives on after its site is unloaded (STREAM_CLOSE_DELAY)"
    );
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_caddy_health_checks_keeps_static_upstreams_and_works() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, board) = start_applier_with(&nats, &caddy, "health", |config| {
        config.translate.dynamic_upstreams = Some(dynamic_upstreams());
    });
    let backend = start_backend(&[], "checked").await;
    let port = backend.get_host_port_ipv4(80).await.expect("backend port");
    let js = caddy_fleet::nats::async_nats::jetstream::new(nats.client().await);
    let agent = format!("health-{id}");
    let checked = format!("checked-{id}.dynamic.test");
    let plain = format!("plain-{id}.dynamic.test");
    let mut with_checks = up(&agent, "c-checked", &checked, port);
    if let Event::Up(facts) = &mut with_checks {
        facts
            .labels
            .insert("caddy.reverse_proxy.health_uri".into(), "/".into());
        facts
            .labels
            .insert("caddy.reverse_proxy.health_interval".into(), "1s".into());
    }
    publish_batched(
        &js,
        [with_checks, up(&agent, "c-plain", &plain, port)].into_iter(),
        "h1",
    )
    .await;
    caddy
        .wait_serving(&checked, "checked", Duration::from_secs(30))
        .await;
    caddy
        .wait_serving(&plain, "checked", Duration::from_secs(30))
        .await;
    let routes = board.view().routes;
    let row = |domain: &str| {
        routes
            .iter()
            .find(|r| r.site.contains(domain))
            .cloned()
            .unwrap_or_else(|| panic!("{domain} in /status: {routes:?}"))
    };
    let checked_row = row(&checked);
    assert_eq!(checked_row.upstreams_mode, UpstreamsMode::Static);
    assert!(
        checked_row
            .static_reason
            .as_deref()
            .is_some_and(|r| r.contains("health_interval") || r.contains("health_uri")),
        "{checked_row:?}"
    );
    assert_eq!(checked_row.upstreams, [format!("127.0.0.1:{port}")]);
    assert_eq!(row(&plain).upstreams_mode, UpstreamsMode::Dynamic);
    // Caddy runs the health checks on the static upstreams it lists.
    let config = caddy.config().await.expect("Caddy's config").to_string();
    assert!(config.contains("\"health_checks\""), "{config}");
    assert!(config.contains(&format!("127.0.0.1:{port}")), "{config}");
    applier.stop().await;
}
