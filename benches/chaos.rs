//! The chaos suite, long version: every scenario with 1,500 container
//! events and the agent cut from NATS for 20 s. Prints one `chaos:` line
//! per scenario (events, kills, lost, phantom, failed probes, converge
//! time). Run: `cargo bench --bench chaos` (needs Docker).

#[path = "../tests/chaos_harness/mod.rs"]
mod chaos_harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

fn main() {
    support::bench_main(async {
        let outcomes = chaos_harness::run_all(1500, Duration::from_secs(20)).await;
        let bad: Vec<_> = outcomes
            .iter()
            .filter(|(_, o)| o.lost > 0 || o.phantom > 0)
            .map(|(name, _)| *name)
            .collect();
        assert!(bad.is_empty(), "lost or phantom in {bad:?}");
    });
}
