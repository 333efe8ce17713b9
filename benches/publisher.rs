//! Publisher benchmark on the real Docker engine and real NATS, with the
//! publisher as its own release-built process (`caddy-fleet publisher`):
//!
//! - resident memory and CPU while idle with 200 labeled containers;
//! - time from `docker start` to the container's facts on the log.
//!
//! Run: `cargo bench --bench publisher` (needs Docker; prints figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::*;

const COUNT: usize = 200;

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file: 12 and 13 here.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

fn container(id: &str, i: usize) -> testcontainers::bollard::models::ContainerCreateBody {
    let labels = vec![
        ("caddy".to_string(), format!("http://p{i}.{id}.test")),
        (
            "caddy.reverse_proxy".to_string(),
            "{{upstreams 80}}".to_string(),
        ),
        ("caddy-fleet-bench".to_string(), id.to_string()),
    ];
    whoami_body(labels, &format!("pub-{i}"))
}

async fn bench() {
    let id = unique();
    let _cleanup = LabelCleanup(format!("caddy-fleet-bench={id}"));
    let nats = Nats::start().await;
    let client = nats.client().await;
    let js = caddy_fleet::nats::async_nats::jetstream::new(client.clone());
    caddy_fleet::nats::ensure_stream(&js, &caddy_fleet::nats::StreamSettings::default())
        .await
        .unwrap();
    let docker = testcontainers::bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();

    let mut ids = Vec::new();
    for i in 0..COUNT {
        ids.push(
            docker
                .create_container(None, container(&id, i))
                .await
                .unwrap()
                .id,
        );
    }
    futures::stream::iter(ids.iter())
        .map(|c| docker.start_container(c, None))
        .buffer_unordered(8)
        .for_each(|r| async { r.unwrap() })
        .await;

    let agent = format!("bench-{id}");
    let mut sync = client
        .subscribe(format!("fleet.{agent}.sync"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
        .arg("publisher")
        .env("NATS_URL", &nats.url)
        .env("AGENT_ID", &agent)
        .env("HOST_IP", "127.0.0.1")
        .env("AGENT_FILTER_LABEL", format!("caddy-fleet-bench={id}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    tokio::time::timeout(Duration::from_secs(60), sync.next())
        .await
        .expect("first sync")
        .unwrap();
    let first_sync = started.elapsed();

    // Idle: 30 s with nothing happening (heartbeats only).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before, ticks_before, t0) = (rss_mib(pid), cpu_ticks(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let ticks = cpu_ticks(pid) - ticks_before;
    let idle_secs = t0.elapsed().as_secs_f64();
    let rss_idle = rss_mib(pid);
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_pct = ticks as f64 / ticks_per_sec / idle_secs * 100.0;

    // docker start → facts on the log, 10 times.
    let mut start_calls = Vec::new();
    let mut to_log = Vec::new();
    for i in 0..10 {
        let c = docker
            .create_container(None, container(&id, COUNT + i))
            .await
            .unwrap()
            .id;
        let mut sub = client
            .subscribe(format!("fleet.{agent}.ctr.{c}"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let t = Instant::now();
        docker.start_container(&c, None).await.unwrap();
        start_calls.push(t.elapsed().as_secs_f64());
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("facts")
            .unwrap();
        to_log.push(t.elapsed().as_secs_f64());
    }
    let _ = child.kill();
    let _ = child.wait();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("publisher benchmark (Docker 20.10, NATS 2.15.1, release build, publisher as its own process)");
    println!(
        "  {COUNT} labeled containers: first sync {:.2} s after start",
        first_sync.as_secs_f64()
    );
    println!("  idle 30 s: RSS {rss_before:.1} -> {rss_idle:.1} MiB, CPU {cpu_pct:.2} % of one core ({ticks} ticks)");
    println!(
        "  docker start -> facts on the log: median {:.3} s (max {:.3}); the start API call alone median {:.3} s",
        median(to_log.clone()),
        to_log.iter().cloned().fold(0.0, f64::max),
        median(start_calls)
    );
}

fn main() {
    bench_main(bench());
}
