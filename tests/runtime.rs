//! The runtime against real NATS and Caddy: WebSockets survive pushes, a
//! hung Caddy admin API stops neither consumption nor acks nor
//! checkpoints, and a publisher stops within its bound with NATS down.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::EventPublisher;
use caddy_fleet::schema::{AgentId, ContainerState};
use futures::{SinkExt, StreamExt};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server on loopback; returns its port.
async fn echo_server() -> u16 {
    websocket_server(str::to_string).await
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket to `host` through Caddy.
async fn connect_through(caddy: &Caddy, host: &str) -> Socket {
    let tcp = TcpStream::connect(("127.0.0.1", caddy.http_port))
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{host}/"), tcp)
        .await
        .expect("WebSocket handshake through Caddy");
    ws
}

/// One echo round trip; false once the socket is closed.
async fn echoes(ws: &mut Socket, text: &str) -> bool {
    if ws.send(Message::text(text)).await.is_err() {
        return false;
    }
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(echo)))) => echo.as_str() == text,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_outlives_pushes_and_is_closed_the_delay_after_its_config_is_unloaded() {
    const DELAY: Duration = Duration::from_secs(10);
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let echo_port = echo_server().await;
    let js = jetstream::new(nats.client().await);
    let agent = format!("ws-{id}");
    let log = ensure_log(&js, &[&agent]).await;
    let (applier, board) = start_applier_with(&nats, &caddy, "ws", |c| {
        c.translate.stream_close_delay = Some(DELAY);
    });
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new(&agent).unwrap(), "ws");
    let host = format!("ws.{id}.test");
    let up = |name: &str, domain: &str, port: u16| {
        synthetic_up(
            &agent,
            name,
            domain,
            "127.0.0.1",
            Some(port),
            ContainerState::Running,
        )
    };
    publish_to_log(&mut publisher, &log, &up("ws", &host, echo_port)).await;
    wait_for(
        "the WebSocket site in Caddy",
        Duration::from_secs(30),
        || async { caddy_routes(&caddy).await.filter(|r| r.contains_key(&host)) },
    )
    .await;
    let mut ws = connect_through(&caddy, &host).await;
    assert!(echoes(&mut ws, "hello").await);

    // Unrelated containers start and stop elsewhere in the fleet: each is
    // a push, i.e. a reload that unloads the config the socket came in on.
    let pushes = || board.stats.snapshot().pushes;
    let mut first_push: Option<Instant> = None;
    for i in 0..4 {
        let before = pushes();
        let other = format!("o{i}.{id}.test");
        publish_to_log(
            &mut publisher,
            &log,
            &up(&format!("o{i}"), &other, 1000 + i),
        )
        .await;
        wait_for("the push", Duration::from_secs(30), || async {
            (pushes() > before).then_some(())
        })
        .await;
        first_push.get_or_insert_with(Instant::now);
        assert!(
            echoes(&mut ws, &format!("after push {i}")).await,
            "the WebSocket was closed by push {i}"
        );
    }
    let first_push = first_push.unwrap();
    let last_change = Instant::now();
    assert!(
        last_change - first_push < DELAY - Duration::from_secs(2),
        "the changes took too long for this test to tell anything"
    );
    // Caddy closes it once the delay after the first unload has passed;
    // until then it keeps echoing.
    let mut n = 0;
    let closed_at = loop {
        n += 1;
        if !echoes(&mut ws, &format!("ping {n}")).await {
            break Instant::now();
        }
        assert!(
            first_push.elapsed() < DELAY + Duration::from_secs(20),
            "the WebSocket was never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let lived = closed_at - first_push;
    println!("WebSocket closed {lived:?} after the first push (delay {DELAY:?})");
    assert!(
        lived >= DELAY - Duration::from_millis(500),
        "closed {lived:?} after the first push, before the {DELAY:?} delay"
    );
    // The site itself is still served: a new socket works.
    let mut again = connect_through(&caddy, &host).await;
    assert!(echoes(&mut again, "again").await);
    applier.stop().await;
}

/// A TCP proxy to Caddy's admin API that can be made to hang: while hung,
/// it accepts connections and never answers; released, it closes them and
/// forwards again.
struct HangingProxy {
    port: u16,
    hung: Arc<Mutex<Option<Vec<TcpStream>>>>,
}

/// Forwards one connection to Caddy's admin API, naming Caddy's own
/// address in the `Host` header (Caddy's admin API refuses other hosts).
async fn forward(client: &mut TcpStream, own: u16, target: u16) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut caddy = TcpStream::connect(("127.0.0.1", target)).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head)
        .replace(&format!("127.0.0.1:{own}"), &format!("127.0.0.1:{target}"));
    caddy.write_all(head.as_bytes()).await?;
    tokio::io::copy_bidirectional(client, &mut caddy).await?;
    Ok(())
}

impl HangingProxy {
    async fn start(target: u16) -> HangingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hung: Arc<Mutex<Option<Vec<TcpStream>>>> = Arc::new(Mutex::new(None));
        let state = hung.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if let Some(held) = state.lock().unwrap().as_mut() {
                    held.push(client);
                    continue;
                }
                tokio::spawn(async move {
                    let _ = forward(&mut client, port, target).await;
                });
            }
        });
        HangingProxy { port, hung }
    }

    fn hang(&self) {
        *self.hung.lock().unwrap() = Some(Vec::new());
    }

    /// Stops hanging; the connections held are closed (as a Caddy that
    /// finally answers, or a timeout, would end them).
    fn release(&self) -> usize {
        self.hung
            .lock()
            .unwrap()
            .take()
            .map_or(0, |held| held.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_caddy_admin_api_stops_neither_consuming_nor_acking_nor_checkpointing() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let proxy = HangingProxy::start(caddy.admin_port).await;
    let js = jetstream::new(nats.client().await);
    let agent = format!("hang-{id}");
    let log = ensure_log(&js, &[&agent]).await;
    let (applier, board) = start_applier_with(&nats, &caddy, "hang", |c| {
        c.caddy_admin_url = format!("http://127.0.0.1:{}", proxy.port);
    });
    let mut publisher = EventPublisher::new(js.clone(), AgentId::new(&agent).unwrap(), "hang");
    let up = |i: u16| {
        synthetic_up(
            &agent,
            &format!("h{i}"),
            &format!("h{i}.{id}.test"),
            "127.0.0.1",
            Some(2000 + i),
            ContainerState::Running,
        )
    };
    publish_to_log(&mut publisher, &log, &up(0)).await;
    let first = format!("h0.{id}.test");
    wait_for(
        "the first site in Caddy",
        Duration::from_secs(30),
        || async {
            caddy_routes(&caddy)
                .await
                .filter(|r| r.contains_key(&first))
        },
    )
    .await;

    proxy.hang();
    let mut last = 0;
    for i in 1..=20 {
        last = publish_to_log(&mut publisher, &log, &up(i)).await;
    }
    // Everything is folded, checkpointed and acked while Caddy hangs.
    let checkpoints = board.stats.snapshot().checkpoints;
    let consumer: jetstream::consumer::PullConsumer = log
        .get_consumer("hang")
        .await
        .expect("the applier's consumer");
    wait_for(
        "the messages folded, checkpointed and acked",
        Duration::from_secs(30),
        || {
            let mut consumer = consumer.clone();
            let board = board.clone();
            async move {
                let info = consumer.info().await.ok()?.clone();
                (board.view().folded_seq >= last
                    && board.stats.snapshot().checkpoints > checkpoints
                    && info.ack_floor.stream_sequence >= last)
                    .then_some(())
            }
        },
    )
    .await;
    let routes = caddy_routes(&caddy).await.unwrap();
    assert!(
        !routes.contains_key(&format!("h20.{id}.test")),
        "a push went through a hung admin API"
    );
    assert!(!board.view().converged);

    // Caddy answers again: the newest state goes in.
    assert!(proxy.release() > 0, "nothing ever waited on the hung API");
    wait_for("every site in Caddy", Duration::from_secs(60), || async {
        let routes = caddy_routes(&caddy).await?;
        (1..=20)
            .all(|i| routes.contains_key(&format!("h{i}.{id}.test")))
            .then_some(())
    })
    .await;
    // And a hung Caddy does not hold up shutdown.
    proxy.hang();
    publish_to_log(&mut publisher, &log, &up(21)).await;
    let stopping = Instant::now();
    applier.stop().await;
    println!(
        "stopped {:?} after being asked, Caddy hung",
        stopping.elapsed()
    );
}

#[test]
fn a_publisher_with_nats_unreachable_stops_within_5_s_of_sigterm() {
    use std::io::{BufRead, BufReader};
    let nowhere = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
        .arg("agent")
        .env("NATS_URL", format!("nats://127.0.0.1:{nowhere}"))
        .env("AGENT_ID", format!("sigterm-{}", unique()))
        .env("HOST_IP", "127.0.0.1")
        .env(
            "AGENT_FILTER_LABEL",
            format!("caddy-fleet-test={}", unique()),
        )
        .env("HEARTBEAT_INTERVAL", "1s")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it is watching Docker with messages it cannot send.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    loop {
        let line = lines
            .next()
            .expect("the publisher exited before retrying")
            .unwrap();
        if line.contains("keeping the latest facts and retrying") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no publish retry logged"
        );
    }
    let asked = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Drain what it still logs, so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if asked.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("still running 15 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = asked.elapsed();
    println!("publisher stopped {took:?} after SIGTERM with NATS unreachable ({status})");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    assert!(status.success(), "{status}");
}
