//! Applier benchmark on real NATS and real Caddy, with the applier running
//! as its own release-built process (`caddy-fleet applier`):
//!
//! - event → served latency for one change with 1,000 routes live, next to
//!   Caddy's own floor (a bare forced `/load` of the same config);
//! - applier resident memory at 1,000 and 10,000 routes;
//! - restart time with 100,000+ events in the stream, with and without a
//!   checkpoint.
//!
//! Run: `cargo bench --bench applier` (needs Docker; prints figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::jetstream::{self, message::PublishMessage};
use caddy_fleet::nats::{ensure_stream, StreamSettings};
use caddy_fleet::schema::{AgentId, ContainerFacts, ContainerState, Event, Health, PortBinding};
use support::*;

fn up(i: usize, port: u16, generation: u64) -> Event {
    Event::Up(ContainerFacts {
        agent: AgentId::new("bench").unwrap(),
        id: format!("c{i}"),
        name: format!("ctr{i}"),
        host_address: "127.0.0.1".into(),
        labels: [
            ("caddy".to_string(), format!("http://r{i}.bench.test")),
            (
                "caddy.reverse_proxy".to_string(),
                "{{upstreams 80}}".to_string(),
            ),
        ]
        .into(),
        ports: vec![PortBinding {
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: "0.0.0.0".into(),
            host_port: port,
        }],
        networks: Default::default(),
        state: ContainerState::Running,
        health: Health::None,
        observed_at_ms: generation,
    })
}

/// Publishes with message IDs, awaiting acks in batches of 1,000.
async fn publish(js: &jetstream::Context, events: impl Iterator<Item = Event>, run: &str) {
    let mut acks = Vec::new();
    for (n, event) in events.enumerate() {
        let message = PublishMessage::build()
            .payload(event.encode().into())
            .message_id(format!("bench.{run}.{n}"));
        acks.push(std::future::IntoFuture::into_future(
            js.send_publish(event.subject(), message)
                .await
                .expect("publish"),
        ));
        if acks.len() == 1000 {
            for ack in futures::future::join_all(acks.drain(..)).await {
                ack.expect("ack");
            }
        }
    }
    for ack in futures::future::join_all(acks).await {
        ack.expect("ack");
    }
}

struct ApplierProcess {
    child: Child,
    status: String,
}

impl ApplierProcess {
    fn start(nats: &Nats, caddy: &Caddy, name: &str, base: &std::path::Path) -> ApplierProcess {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
            .arg("applier")
            .env("NATS_URL", &nats.url)
            .env("CADDY_API_URL", caddy.admin_url())
            .env("CADDY_BASE_CADDYFILE", base)
            .env("APPLIER_NAME", name)
            .env("STATUS_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start caddy-fleet applier");
        ApplierProcess {
            child,
            status: format!("http://127.0.0.1:{port}"),
        }
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    /// Waits until the applier folded up to `seq` and Caddy runs the result.
    async fn caught_up(&self, seq: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(status) = get_json(&format!("{}/status", self.status)).await {
                if status["last_seq"].as_u64() >= Some(seq) && status["converged"] == true {
                    return started.elapsed();
                }
            }
            assert!(
                started.elapsed() < timeout,
                "applier did not catch up to {seq} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApplierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn bench() {
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let backend = start_backend(&[], "bench").await;
    let port = backend.get_host_port_ipv4(80).await.unwrap();
    let js = jetstream::new(nats.client().await);
    let mut stream = ensure_stream(&js, &StreamSettings::default())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("caddy-fleet-bench-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("Caddyfile");
    std::fs::write(&base, caddy.base_caddyfile()).unwrap();

    // 1,000 routes live.
    publish(&js, (0..1000).map(|i| up(i, port, 0)), "a").await;
    let applier = ApplierProcess::start(&nats, &caddy, "bench", &base);
    let last = stream.info().await.unwrap().state.last_sequence;
    applier.caught_up(last, Duration::from_secs(60)).await;
    let rss_1k = applier.rss_mib();

    // One change → served, 10 times.
    let mut latencies = Vec::new();
    for k in 0..10 {
        let i = 100_000 + k;
        let started = Instant::now();
        publish(&js, std::iter::once(up(i, port, 0)), &format!("one{k}")).await;
        let host = format!("r{i}.bench.test");
        loop {
            if let Some((200, body)) = caddy.get(&host).await {
                if body == "bench" {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "change never served"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(started.elapsed().as_secs_f64());
    }
    // Caddy's floor: a bare forced /load of the same config.
    let config = caddy.config().await.unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut floors = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let response = http
            .post(format!("{}/load", caddy.admin_url()))
            .header("Content-Type", "application/json")
            .header("Cache-Control", "must-revalidate")
            .body(config.to_string())
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        floors.push(started.elapsed().as_secs_f64());
    }

    // 10,000 routes.
    publish(&js, (1000..10_000).map(|i| up(i, port, 0)), "b").await;
    let last = stream.info().await.unwrap().state.last_sequence;
    let to_10k = applier.caught_up(last, Duration::from_secs(300)).await;
    let rss_10k = applier.rss_mib();
    let metrics = reqwest::get(format!("{}/metrics", applier.status))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let push_10k = metrics
        .lines()
        .find(|l| l.starts_with("caddy_fleet_last_push_duration_seconds "))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("?")
        .to_string();

    // 100,000+ events: every container changes nine more times.
    publish(
        &js,
        (1..10u64).flat_map(|g| (0..10_000).map(move |i| up(i, port, g))),
        "c",
    )
    .await;
    let last = stream.info().await.unwrap().state.last_sequence;
    applier.caught_up(last, Duration::from_secs(600)).await;
    // Let a checkpoint cover everything, then kill -9.
    tokio::time::sleep(Duration::from_secs(7)).await;
    applier.kill();
    let started = Instant::now();
    let restarted = ApplierProcess::start(&nats, &caddy, "bench", &base);
    restarted.caught_up(last, Duration::from_secs(600)).await;
    let with_checkpoint = started.elapsed();
    restarted.kill();
    let started = Instant::now();
    let fresh = ApplierProcess::start(&nats, &caddy, "bench-fresh", &base);
    fresh.caught_up(last, Duration::from_secs(600)).await;
    let without_checkpoint = started.elapsed();
    fresh.kill();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "applier benchmark (Caddy 2.11.7, NATS 2.15.1, release build, applier as its own process)"
    );
    println!("  1,000 routes: event -> served median {:.3} s (min {:.3}, max {:.3}); bare forced /load median {:.3} s",
        median(latencies.clone()), latencies.iter().cloned().fold(f64::MAX, f64::min),
        latencies.iter().cloned().fold(0.0, f64::max), median(floors));
    println!("  applier RSS: {rss_1k:.1} MiB at 1,000 routes, {rss_10k:.1} MiB at 10,000 routes");
    println!(
        "  1,000 -> 10,000 routes: caught up in {:.2} s; last push at 10,000 routes {push_10k} s",
        to_10k.as_secs_f64()
    );
    println!(
        "  restart with {last} events in the stream: {:.2} s with a checkpoint, {:.2} s without",
        with_checkpoint.as_secs_f64(),
        without_checkpoint.as_secs_f64()
    );
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(bench());
}
