//! Replay benchmark: folding a stream of 1,000,000 messages on real NATS
//! (file storage), with and without a checkpoint near its end.
//!
//! Run: `cargo bench --bench replay` (needs Docker; prints figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use caddy_fleet::applier::{CheckpointStore, ObjectStoreCheckpoints};
use caddy_fleet::history::LogReader;
use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{ensure_stream, StreamSettings};
use caddy_fleet::schema::translate::TranslateOptions;
use caddy_fleet::schema::{ContainerState, Event};
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

    let reader = LogReader::open(
        &nats.config(),
        Some("bench".into()),
        TranslateOptions::trusting(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let state = reader.fold_to(last, false, |_, _, _, _| {}).await.unwrap();
    let full = started.elapsed().as_secs_f64();
    assert_eq!(state.last_seq, last);
    assert_eq!(state.live_containers().count(), CONTAINERS);

    // A checkpoint 10,000 messages before the end, then replay to the end.
    let checkpoint_at = last - 10_000;
    let partial = reader
        .fold_to(checkpoint_at, false, |_, _, _, _| {})
        .await
        .unwrap();
    ObjectStoreCheckpoints::open(&js, "bench")
        .await
        .unwrap()
        .save(&partial)
        .await
        .unwrap();
    let started = Instant::now();
    let resumed = reader.fold_to(last, true, |_, _, _, _| {}).await.unwrap();
    let with_checkpoint = started.elapsed().as_secs_f64();
    assert_eq!(resumed, state, "checkpoint + tail must equal the full fold");

    println!("replay benchmark (NATS 2.15.1 file storage, release build)");
    println!(
        "  full replay of {last} messages without a checkpoint: {full:.2} s ({:.0} events/s)",
        last as f64 / full
    );
    println!("  with a checkpoint at {checkpoint_at} (10,000 messages before the end): {with_checkpoint:.2} s");
}

fn main() {
    bench_main(bench());
}
