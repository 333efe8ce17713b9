//! Replay benchmark: folding a stream of 1,000,000 messages on real NATS
//! (file storage) from the start, then `explain --at` and `replay --at`
//! at points spread over it, answered from the applier's snapshots.
//!
//! Run: `cargo bench --bench replay` (needs Docker; prints figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use caddy_fleet::applier::{ApplierConfig, CheckpointStore, ObjectStoreCheckpoints};
use caddy_fleet::inspect::{explain_at, run, Inspect, LogReader, Point, ReplayFormat};
use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_stream, StreamSettings};
use caddy_fleet::schema::{ContainerState, Event, RouteState};
use support::*;

const CONTAINERS: usize = 10_000;
const GENERATIONS: usize = 100;

fn up(i: usize, generation: usize) -> Event {
    let state = if generation % 7 == 3 {
        ContainerState::Exited
    } else {
        ContainerState::Running
    };
    let port = 20_000 + generation as u16;
    synthetic_up(
        &format!("agent{}", i % 10),
        &format!("c{i}"),
        &format!("r{i}.replay.test"),
        "10.0.0.1",
        Some(port),
        state,
    )
}

async fn bench() {
    let nats = Nats::start().await;
    let js = jetstream::new(nats.client().await);
    let mut stream = ensure_stream(&js, &StreamSettings::default())
        .await
        .unwrap();
    let started = Instant::now();
    publish_batched(
        &js,
        (0..GENERATIONS).flat_map(|g| (0..CONTAINERS).map(move |i| up(i, g))),
        "r",
    )
    .await;
    let info = stream.info().await.unwrap().clone();
    let last = info.state.last_sequence;
    println!(
        "published {} messages ({:.0} MiB) in {:.1} s",
        info.state.messages,
        info.state.bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );

    // A full fold from the start, as a point query had to before snapshots.
    let from_start = LogReader::open(&nats.inspect_config(None)).await.unwrap();
    let started = Instant::now();
    let full = from_start.state_at_seq(last).await.unwrap();
    let full_secs = started.elapsed().as_secs_f64();
    assert_eq!(full.fold.folded, last);
    assert_eq!(full.state.live_containers().count(), CONTAINERS);

    // The applier's store, fed as the applier feeds it: a checkpoint every
    // 10,000 messages (its default), kept as a snapshot at each crossing of
    // a multiple of SNAPSHOT_EVERY_MESSAGES.
    let store = ObjectStoreCheckpoints::open(&js, "bench", 1).await.unwrap();
    let every = ApplierConfig::new("bench", "").checkpoint_every;
    let mut state = RouteState::default();
    let started = Instant::now();
    let mut at = 0;
    while at < last {
        at = (at + every).min(last);
        from_start
            .fold_into(&mut state, at, |_, _, _, _| {})
            .await
            .unwrap();
        store.save(&state).await.unwrap();
    }
    let snapshots = store.snapshots().await.unwrap().len();
    println!(
        "fed the store {} checkpoints ({snapshots} snapshots kept) in {:.1} s",
        last.div_ceil(every),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        state, full.state,
        "checkpoints + tails must equal the full fold"
    );

    println!("replay benchmark (NATS 2.15.1 file storage, release build)");
    println!(
        "  full fold of {last} messages from the start: {full_secs:.2} s ({:.0} events/s)",
        last as f64 / full_secs
    );
    let reader = LogReader::open(&nats.inspect_config(Some("bench")))
        .await
        .unwrap();
    let domain = |seq: u64| format!("r{}.replay.test", seq % CONTAINERS as u64);
    // Just before a snapshot is the worst case: the longest tail.
    for percent in [10u64, 50, 90, 100] {
        let seq = match percent {
            100 => last,
            _ => last * percent / 100 - 1,
        };
        let point = Point::Seq(seq);
        let started = Instant::now();
        let why = explain_at(&reader, &domain(seq), point).await.unwrap();
        let explain_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let text = run(
            Inspect::Replay {
                at: point,
                format: ReplayFormat::Caddyfile,
            },
            &nats.inspect_config(Some("bench")),
            false,
        )
        .await
        .unwrap();
        let replay_secs = started.elapsed().as_secs_f64();
        assert!(text.contains("replay.test"));
        println!(
            "  at {percent:>3} % (seq {seq}): explain --at {explain_secs:.2} s, replay --at --format caddyfile {replay_secs:.2} s (from {:?}, {} messages folded)",
            why.fold.start, why.fold.folded
        );
    }
}

fn main() {
    bench_main(bench());
}
