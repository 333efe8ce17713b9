//! Chaos, moderate size: a 3-node NATS cluster, an applier process, two
//! agents churning containers; the stream leader killed twice, a node cut
//! from the others, the applier SIGKILLed five times, an agent cut from
//! NATS, Caddy restarted. Every scenario must end with nothing lost and no
//! phantom route. The longer version is `cargo bench --bench chaos`.

mod chaos_harness;
mod support;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_and_nothing_phantom_whatever_fails() {
    let outcomes = chaos_harness::run_all(300, Duration::from_secs(5)).await;
    for (name, outcome) in &outcomes {
        assert_eq!(outcome.lost, 0, "{name}: containers lost");
        assert_eq!(outcome.phantom, 0, "{name}: phantom routes");
    }
}
