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

use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_stream, StreamSettings};
use caddy_fleet::schema::{ContainerState, Event};
use support::*;

fn up(i: usize, port: u16) -> Event {
    synthetic_up(
        "bench",
        &format!("c{i}"),
        &format!("r{i}.bench.test"),
        "127.0.0.1",
        Some(port),
        ContainerState::Running,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One new container's route, `count` times: from publishing its event
/// to Caddy serving it, with when it was in the log.
async fn one_change(
    js: &jetstream::Context,
    caddy: &Caddy,
    port: u16,
    first: usize,
    count: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut latencies = Vec::new();
    let mut in_log = Vec::new();
    for k in 0..count {
        let i = first + k;
        let started = Instant::now();
        publish_batched(js, std::iter::once(up(i, port)), &format!("one{i}")).await;
        in_log.push(started.elapsed().as_secs_f64());
        let host = format!("r{i}.bench.test");
        // Checked every 2 ms: the resolution of the figure.
        wait_for_every(
            "the change to be served",
            Duration::from_secs(60),
            Duration::from_millis(2),
            || async {
                matches!(caddy.get(&host).await, Some((200, body)) if body == "bench").then_some(())
            },
        )
        .await;
        latencies.push(started.elapsed().as_secs_f64());
    }
    (latencies, in_log)
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
    publish_batched(&js, (0..1000).map(|i| up(i, port)), "a").await;
    let applier = ApplierProcess::start(&nats, &caddy, "bench", &base);
    let last = stream.info().await.unwrap().state.last_sequence;
    applier.caught_up(last, Duration::from_secs(60)).await;
    let rss_1k = applier.rss_mib();
    applier.settled().await;

    // One change → served, 10 times, then Caddy's floor.
    let (latencies, in_log) = one_change(&js, &caddy, port, 100_000, 10).await;
    let floors = load_floor(&caddy, 5).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // What each push also pays: Caddy adapting a Caddyfile of that size
    // (the same shape the applier generates for these containers).
    let mut caddyfile = std::fs::read_to_string(&base).unwrap();
    for i in 0..1010 {
        caddyfile.push_str(&format!(
            "http://r{i}.bench.test {{\n\treverse_proxy 127.0.0.1:{port} {{\n\t\tstream_close_delay 3600s\n\t}}\n}}\n"
        ));
    }
    let mut adapts = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let response = http
            .post(format!("{}/adapt", caddy.admin_url()))
            .header("Content-Type", "text/caddyfile")
            .body(caddyfile.clone())
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        adapts.push(started.elapsed().as_secs_f64());
    }

    // 10,000 routes.
    publish_batched(&js, (1000..10_000).map(|i| up(i, port)), "b").await;
    let last = stream.info().await.unwrap().state.last_sequence;
    let to_10k = applier.caught_up(last, Duration::from_secs(300)).await;
    let rss_10k = applier.rss_mib();
    let metrics = reqwest::get(format!("{}/metrics", applier.status))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let figure = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let push_10k = match (
        figure("caddy_fleet_push_duration_seconds_sum "),
        figure("caddy_fleet_push_duration_seconds_count "),
    ) {
        (Some(sum), Some(count)) if count > 0.0 => format!("{:.3}", sum / count),
        _ => "?".to_string(),
    };

    // One change → served at 10,000 routes, next to the floor there.
    applier.settled().await;
    let (latencies_10k, _) = one_change(&js, &caddy, port, 200_000, 5).await;
    let floors_10k = load_floor(&caddy, 3).await;
    println!("  10,000 routes: event -> served median {:.3} s (min {:.3}, max {:.3}); bare forced /load median {:.3} s",
        median(latencies_10k.clone()), latencies_10k.iter().cloned().fold(f64::MAX, f64::min),
        latencies_10k.iter().cloned().fold(0.0, f64::max), median(floors_10k.clone()));
    if std::env::var_os("APPLIER_BENCH_NO_RESTART").is_some() {
        println!(
            "  1,000 routes: event -> served median {:.3} s; bare forced /load median {:.3} s",
            median(latencies.clone()),
            median(floors.clone())
        );
        println!("    of which: change in the log median {:.3} s; /adapt of the 1,000-site Caddyfile median {:.3} s",
            median(in_log.clone()), median(adapts.clone()));
        println!("  (APPLIER_BENCH_NO_RESTART: restart figures skipped)");
        return;
    }

    // 100,000+ events: every container changes nine more times.
    publish_batched(
        &js,
        (1..10).flat_map(|_| (0..10_000).map(|i| up(i, port))),
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
    println!("    of which: change in the log (publish, store, source) median {:.3} s; /adapt of the 1,000-site Caddyfile median {:.3} s",
        median(in_log), median(adapts));
    println!("  applier RSS: {rss_1k:.1} MiB at 1,000 routes, {rss_10k:.1} MiB at 10,000 routes");
    println!(
        "  1,000 -> 10,000 routes: caught up in {:.2} s; mean push up to 10,000 routes {push_10k} s",
        to_10k.as_secs_f64()
    );
    println!(
        "  restart with {last} events in the stream: {:.2} s with a checkpoint, {:.2} s without",
        with_checkpoint.as_secs_f64(),
        without_checkpoint.as_secs_f64()
    );
}

fn main() {
    bench_main(bench());
}
