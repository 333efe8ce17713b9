//! Fleet simulator: the cost of a change at fleet scale, on real NATS and
//! real Caddy, with the release applier as its own process.
//!
//! `cargo bench --bench fleet -- --agents A --containers C [--churn R]
//! [--upstreams static|dynamic] [--shards N]` publishes synthetic facts for A
//! agents × C containers straight into NATS (no Docker container per
//! route: every synthetic container is published at the port of one of two
//! real loopback backends, so every site answers), then measures:
//!
//! - `load_floor_s`: a bare forced `/load` of the config Caddy runs (the
//!   median of three); `load_floor_polled_s`: the same, one just before
//!   each new site, while a client polls Caddy for it as for the new site
//!   (on two cores the polling slows Caddy's load a little);
//! - `new_site_served_s_p50`: a new site's `up` published → served, with
//!   every applier idle before it; `new_site_over_floor_s_p50`: each new
//!   site's time minus the polled floor measured just before it;
//! - `upstream_change_served_s_p50`: a site's upstream moved to the other
//!   backend → answered by it, and `caddy_loads_during_upstream_changes`
//!   (Caddy's own admin log counts its `/load`s);
//! - `lag_s_max`: under a churn of R upstream changes per second for 10 s,
//!   the longest time from a batch's publish to the applier having folded
//!   it;
//! - request latency through Caddy across up to 1,000 live sites, and
//!   `request_p99_dynamic_over_static`: the same sites through a second
//!   Caddy whose applier serves the same sites in the other upstreams
//!   mode, requests alternating between the two once neither applier is
//!   adapting sites any more, p99 dynamic ÷ static;
//! - resident memory of the applier and of Caddy.
//!
//! With `--shards N`, N appliers (each with its own Caddy) split the fleet
//! by `APPLIER_DOMAINS`, and the figures are for the first shard.
//!
//! The last line printed is one JSON object with every figure.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::async_nats::jetstream::message::PublishMessage;
use caddy_fleet::schema::{ContainerState, Event};
use clap::Parser;
use support::*;

#[derive(Debug, Parser)]
struct Args {
    /// Agents (Docker hosts) publishing.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Containers per agent, one site each.
    #[arg(long, default_value_t = 100)]
    containers: usize,
    /// Upstream changes per second during the churn.
    #[arg(long, default_value_t = 200)]
    churn: usize,
    /// How Caddy gets upstreams: `static` (in the config) or `dynamic`
    /// (the applier's DNS), as `UPSTREAMS`.
    #[arg(long, default_value = "static", value_parser = ["static", "dynamic"])]
    upstreams: String,
    /// New sites measured, one at a time (each costs two config loads).
    #[arg(long, default_value_t = 7)]
    new_sites: usize,
    /// Appliers splitting the fleet by APPLIER_DOMAINS, each with its own Caddy.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Skip the comparison with the other upstreams mode (a second Caddy
    /// as large as the first: at 100,000 routes two do not fit in memory).
    #[arg(long)]
    no_compare: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Site `c<j>-a<k>.s<shard>.fleet.test` of agent `fleet-a<k>`: containers
/// are spread over the shards by their index (`*.s<shard>.fleet.test`
/// matches one label, as a TLS wildcard does).
fn site(args: &Args, k: usize, j: usize) -> String {
    site_of(args.shards, k, j)
}

fn site_of(shards: usize, k: usize, j: usize) -> String {
    format!("c{j}-a{k}.s{}.fleet.test", j % shards)
}

/// The settings for `UPSTREAMS=mode` (the DNS on its own free port).
fn upstreams_settings(mode: &str) -> Vec<(&'static str, String)> {
    let mut settings = vec![("UPSTREAMS", mode.to_string())];
    if mode == "dynamic" {
        settings.push(("UPSTREAM_DNS_LISTEN", format!("127.0.0.1:{}", free_port())));
    }
    settings
}

fn up(k: usize, j: usize, domain: &str, port: u16) -> Event {
    synthetic_up(
        &format!("fleet-a{k}"),
        &format!("c{j}"),
        domain,
        "127.0.0.1",
        Some(port),
        ContainerState::Running,
    )
}

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = ((values.len() as f64 - 1.0) * p).round() as usize;
    values.get(at).copied().unwrap_or(f64::NAN)
}

/// Waits until a GET for `host` through `caddy` answers `body`; returns
/// how long it took from `since`.
/// How often a new site is asked for: the resolution of the figures.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// A client for polling: no idle connection is kept (one would hold a
/// server Caddy is shutting down in a reload).
fn poller() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

async fn served(caddy: &Caddy, host: &str, body: &str, since: Instant) -> f64 {
    let client = poller();
    // Checked every 5 ms: the resolution of the figure.
    wait_for_every(
        &format!("{host} to answer {body:?}"),
        Duration::from_secs(120),
        POLL_EVERY,
        || async {
            matches!(caddy.get_with(&client, host).await, Some((200, text)) if text == body)
                .then_some(())
        },
    )
    .await;
    since.elapsed().as_secs_f64()
}

/// A bare forced `/load` of the config Caddy runs while a client polls
/// `host` as [`served`] does: the floor a new site is compared with
/// (the polling costs Caddy's load a little on two cores).
async fn polled_floor(caddy: &Caddy, host: &str) -> f64 {
    let client = poller();
    // The load this client puts on Caddy is the point, not a wait for a
    // condition: one GET per 5 ms tick, the cadence of `served`.
    let polling = async {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = caddy.get_with(&client, host).await;
        }
    };
    tokio::select! {
        // The floor, once the load is answered.
        floors = load_floor(caddy, 1) => floors[0],
        // Polls until then; never ends.
        () = polling => unreachable!("polling never ends"),
    }
}

/// How many `/load`s Caddy's admin API has received (its own log).
fn caddy_loads(caddy: &Caddy) -> usize {
    let out = std::process::Command::new("docker")
        .args(["logs", caddy.container.id()])
        .output()
        .expect("docker logs");
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .filter(|l| l.contains("\"uri\":\"/load\""))
        .count()
}

fn container_rss_mib(caddy: &Caddy) -> f64 {
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", caddy.container.id()])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map(rss_mib)
        .unwrap_or(f64::NAN)
}

async fn bench(args: Args) {
    let nats = Nats::start().await;
    let mut caddys = Vec::new();
    for _ in 0..args.shards {
        caddys.push(Caddy::start().await);
    }
    // The comparison: the other upstreams mode, on the probed sites only.
    let other_mode = if args.upstreams == "static" {
        "dynamic"
    } else {
        "static"
    };
    let other_caddy = if args.no_compare {
        None
    } else {
        Some(Caddy::start().await)
    };
    let (alpha, beta) = tokio::join!(start_backend(&[], "alpha"), start_backend(&[], "beta"));
    let port_a = alpha.get_host_port_ipv4(80).await.expect("alpha's port");
    let port_b = beta.get_host_port_ipv4(80).await.expect("beta's port");
    let js = jetstream::new(nats.client().await);
    let mut log = ensure_log(&js, &[]).await;
    let dir = std::env::temp_dir().join(format!("caddy-fleet-fleet-{}", unique()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let routes = args.agents * args.containers;
    let started = Instant::now();
    publish_batched(
        &js,
        (0..args.agents)
            .flat_map(|k| (0..args.containers).map(move |j| (k, j)))
            .map(|(k, j)| up(k, j, &site(&args, k, j), port_a)),
        "fleet",
    )
    .await;
    let published_s = started.elapsed().as_secs_f64();
    let mut appliers = Vec::new();
    for (shard, caddy) in caddys.iter().enumerate() {
        let base = dir.join(format!("Caddyfile-{shard}"));
        std::fs::write(&base, caddy.base_caddyfile()).expect("base Caddyfile");
        let mut settings = vec![("STREAM_OWNER", (shard == 0).to_string())];
        settings.extend(upstreams_settings(&args.upstreams));
        if args.shards > 1 {
            settings.push(("APPLIER_DOMAINS", format!("*.s{shard}.fleet.test")));
        }
        appliers.push(ApplierProcess::start_with(
            &nats,
            caddy,
            &format!("fleet-{shard}"),
            &base,
            &settings,
        ));
    }
    let last = log.info().await.expect("log info").state.last_sequence;
    let started = Instant::now();
    for applier in &appliers {
        applier.caught_up(last, Duration::from_secs(1800)).await;
    }
    let first_converge_s = started.elapsed().as_secs_f64();
    let (caddy, applier) = (&caddys[0], &appliers[0]);

    // The probed sites: up to 1,000 of the first shard.
    let live: Vec<String> = (0..args.agents)
        .flat_map(|k| (0..args.containers).map(move |j| (k, j)))
        .filter(|(_, j)| j % args.shards == 0)
        .map(|(k, j)| site(&args, k, j))
        .take(1000)
        .collect();
    // The comparison applier serves what the first shard serves (the same
    // number of sites: Caddy matches hosts route by route, so a smaller
    // config would answer faster whatever the mode).
    let other = other_caddy.as_ref().map(|other_caddy| {
        let other_base = dir.join("Caddyfile-other");
        std::fs::write(&other_base, other_caddy.base_caddyfile()).expect("base Caddyfile");
        let mut other_settings = upstreams_settings(other_mode);
        other_settings.push(("STREAM_OWNER", "false".to_string()));
        if args.shards > 1 {
            other_settings.push(("APPLIER_DOMAINS", "*.s0.fleet.test".to_string()));
        }
        ApplierProcess::start_with(
            &nats,
            other_caddy,
            "fleet-other",
            &other_base,
            &other_settings,
        )
    });
    if let Some(other) = &other {
        other.caught_up(last, Duration::from_secs(1800)).await;
    }
    // No applier still adapts sites alone (that loads its Caddy and the
    // machine).
    for applier in &appliers {
        applier.settled().await;
    }
    if let Some(other) = &other {
        other.settled().await;
    }

    // Caddy's floor: a bare forced /load of the config it runs.
    let floors = load_floor(caddy, 3).await;

    // Request latency across the probed sites, alternating between this
    // Caddy and the comparison one (same machine noise for both).
    let mut request_s = Vec::new();
    let mut other_request_s = Vec::new();
    for round in 0..2 {
        for host in &live {
            let targets = std::iter::once(("measured", caddy, &mut request_s)).chain(
                other_caddy
                    .as_ref()
                    .map(|c| ("comparison", c, &mut other_request_s)),
            );
            for (which, target, times) in targets {
                let started = Instant::now();
                let answer = target.get(host).await;
                assert!(
                    matches!(&answer, Some((200, body)) if body == "alpha"),
                    "{host} (round {round}) through the {which} Caddy: {answer:?}"
                );
                times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    drop(other);
    drop(other_caddy);
    let (dynamic_p99, static_p99) = if args.upstreams == "dynamic" {
        (
            percentile(request_s.clone(), 0.99),
            percentile(other_request_s.clone(), 0.99),
        )
    } else {
        (
            percentile(other_request_s.clone(), 0.99),
            percentile(request_s.clone(), 0.99),
        )
    };

    // New sites, one at a time with every applier idle (caught up with
    // the log and its status published), each beside a floor measured just
    // before it, with the same polling: Caddy's load time drifts by a good
    // part of a second over a run on this machine, so each new site is
    // compared with its own.
    let mut new_site = Vec::new();
    let mut new_site_over_floor = Vec::new();
    let mut polled_floors = Vec::new();
    for n in 0..args.new_sites {
        let last = log.info().await.expect("log info").state.last_sequence;
        for applier in &appliers {
            applier.caught_up(last, Duration::from_secs(600)).await;
        }
        let domain = format!("new{n}-a0.s0.fleet.test");
        let floor = polled_floor(caddy, &domain).await;
        polled_floors.push(floor);
        let started = Instant::now();
        publish_batched(
            &js,
            std::iter::once(up(0, 1_000_000 + n, &domain, port_a)),
            &format!("new{n}"),
        )
        .await;
        let took = served(caddy, &domain, "alpha", started).await;
        new_site.push(took);
        new_site_over_floor.push(took - floor);
    }

    // Upstream changes of one site, alternating backends.
    let loads_before = caddy_loads(caddy);
    let mut upstream_change = Vec::new();
    let domain = site(&args, 0, 0);
    for n in 0..6 {
        let (port, body) = if n % 2 == 0 {
            (port_b, "beta")
        } else {
            (port_a, "alpha")
        };
        let started = Instant::now();
        publish_batched(
            &js,
            std::iter::once(up(0, 0, &domain, port)),
            &format!("move{n}"),
        )
        .await;
        upstream_change.push(served(caddy, &domain, body, started).await);
    }
    let loads_during_changes = caddy_loads(caddy) - loads_before;

    // Churn: R upstream changes per second for 10 s, in batches every 100 ms;
    // lag is a batch's publish → the applier having folded it.
    let batches: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let churn = {
        let (js, batches, args_agents, args_containers, per_batch) = (
            js.clone(),
            batches.clone(),
            args.agents,
            args.containers,
            (args.churn / 10).max(1),
        );
        let shards = args.shards;
        tokio::spawn(async move {
            let log = ensure_log(&js, &[]).await;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0usize;
            for batch in 0..100 {
                tick.tick().await;
                let started = Instant::now();
                let events: Vec<Event> = (0..per_batch)
                    .map(|_| {
                        n += 1;
                        let (k, j) = ((n * 7919) % args_agents, (n * 104_729) % args_containers);
                        let port = if n.is_multiple_of(2) { port_a } else { port_b };
                        let domain = site_of(shards, k, j);
                        up(k, j, &domain, port)
                    })
                    .collect();
                // Straight into the agents' ingest streams (they exist),
                // acks awaited; then the log's sequence once it sourced them.
                let before = log.get_info().await.expect("log info").state.messages;
                let mut acks = Vec::new();
                for (i, event) in events.iter().enumerate() {
                    let message = PublishMessage::build()
                        .payload(event.encode().into())
                        .message_id(format!("churn.{batch}.{i}"));
                    let ack = js
                        .send_publish(event.subject(), message)
                        .await
                        .expect("publish");
                    acks.push(std::future::IntoFuture::into_future(ack));
                }
                for ack in futures::future::join_all(acks).await {
                    ack.expect("ack");
                }
                let sourced = before + events.len() as u64;
                let seq = wait_for_every(
                    "the log to source the batch",
                    Duration::from_secs(60),
                    Duration::from_millis(2),
                    || async {
                        let state = log.get_info().await.ok()?.state;
                        (state.messages >= sourced).then_some(state.last_sequence)
                    },
                )
                .await;
                batches.lock().expect("batches").push((seq, started));
            }
        })
    };
    let mut lags = Vec::new();
    let mut pending = 0usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let folded = get_json(&format!("{}/status", applier.status))
            .await
            .and_then(|s| s["folded_seq"].as_u64())
            .unwrap_or(0);
        let batches = batches.lock().expect("batches").clone();
        while pending < batches.len() && batches[pending].0 <= folded {
            lags.push(batches[pending].1.elapsed().as_secs_f64());
            pending += 1;
        }
        if churn.is_finished() && pending == batches.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    churn.await.expect("churn task");
    assert_eq!(pending, 100, "the applier did not fold every churn batch");
    let last = log.info().await.expect("log info").state.last_sequence;
    applier.caught_up(last, Duration::from_secs(600)).await;

    let applier_rss = applier.rss_mib();
    let caddy_rss = container_rss_mib(caddy);
    drop(appliers);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "fleet: {} agents x {} containers = {routes} routes, {} shard(s), upstreams {}; facts published in {published_s:.1} s, first convergence {first_converge_s:.1} s",
        args.agents, args.containers, args.shards, args.upstreams
    );
    println!(
        "fleet: request through Caddy p50 {:.4} s p99 {:.4} s over {} requests to {} sites ({}); the other mode ({other_mode}) p50 {:.4} s p99 {:.4} s",
        percentile(request_s.clone(), 0.5),
        percentile(request_s.clone(), 0.99),
        request_s.len(),
        live.len(),
        args.upstreams,
        percentile(other_request_s.clone(), 0.5),
        percentile(other_request_s.clone(), 0.99),
    );
    let json = serde_json::json!({
        "agents": args.agents,
        "containers": args.containers,
        "shards": args.shards,
        "routes": routes,
        "upstreams": args.upstreams,
        "load_floor_s": percentile(floors, 0.5),
        "load_floor_polled_s": percentile(polled_floors, 0.5),
        "new_site_served_s_p50": percentile(new_site, 0.5),
        "new_site_over_floor_s_p50": percentile(new_site_over_floor, 0.5),
        "upstream_change_served_s_p50": percentile(upstream_change, 0.5),
        "caddy_loads_during_upstream_changes": loads_during_changes,
        "lag_s_max": lags.iter().copied().fold(0.0, f64::max),
        "churn_per_s": args.churn,
        "applier_rss_mib": (applier_rss * 10.0).round() / 10.0,
        "caddy_rss_mib": (caddy_rss * 10.0).round() / 10.0,
        "request_p50_s": percentile(request_s.clone(), 0.5),
        "request_p99_s": percentile(request_s, 0.99),
        "request_p99_dynamic_s": dynamic_p99,
        "request_p99_static_s": static_p99,
        // NaN (null) without the comparison.
        "request_p99_dynamic_over_static": dynamic_p99 / static_p99,
    });
    println!("{json}");
}

fn main() {
    let args = Args::parse();
    bench_main(bench(args));
}
