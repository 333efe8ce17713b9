//! What one change costs the applier before Caddy sees it, at 10 and at
//! 10,000 containers (one site each), with the translation cache warm
//! and one container changed, as in a deploy:
//!
//! - `render`: the state translated (`translate_owned_cached`: only the
//!   changed container is translated again) and site ownership decided;
//! - `answers`: the upstream DNS answers built from the containers;
//! - `assemble`: the Caddyfile a push compares and composes from, as its
//!   blocks with their texts — `assemble_marshaled` (blocks only one
//!   container has are borrowed with the text its translation wrote)
//!   side by side with merging every block and writing the whole file
//!   (`assemble`, `marshal`, `marshal_blocks`), what a push did before;
//! - `status rows`: the route table `/status` and the dashboard show.
//!
//! Run: `cargo bench --bench push` (no Docker needed; prints figures, the
//! best of several rounds).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use caddy_fleet::applier::upstream_dns::UpstreamAnswers;
use caddy_fleet::schema::routes::route_rows;
use caddy_fleet::schema::translate::{
    assemble, assemble_marshaled, translate_owned_cached, SiteOwners, TranslateOptions,
    TranslationCache,
};
use caddy_fleet::schema::{ContainerState, RouteState};
use support::synthetic_up;

const ROUNDS: usize = 15;

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The state of `containers` containers on 100 agents, one site each.
fn state(containers: usize) -> RouteState {
    let mut state = RouteState::default();
    for i in 0..containers {
        let event = synthetic_up(
            &format!("agent{}", i % 100),
            &format!("c{i}"),
            &format!("s{i}.push.test"),
            "10.0.0.1",
            Some(8080 + (i % 1000) as u16),
            ContainerState::Running,
        );
        state.apply(i as u64 + 1, &event);
    }
    state
}

fn measure(containers: usize) {
    let mut state = state(containers);
    let options = TranslateOptions::trusting();
    let skip = BTreeSet::new();
    let mut owners = SiteOwners::new();
    let mut cache = TranslationCache::default();
    let (units, _, new_owners) =
        translate_owned_cached(&state, &options, &skip, &owners, &mut cache);
    owners = new_owners;
    drop(units);

    let (mut render, mut answers, mut assembled, mut whole, mut status) = (
        Duration::MAX,
        Duration::MAX,
        Duration::MAX,
        Duration::MAX,
        Duration::MAX,
    );
    for round in 0..ROUNDS {
        // One container moves to another port: a deploy.
        let seq = containers as u64 + 1 + round as u64;
        let moved = synthetic_up(
            "agent0",
            "c0",
            "s0.push.test",
            "10.0.0.1",
            Some(9000 + round as u16),
            ContainerState::Running,
        );
        state.apply(seq, &moved);

        let started = Instant::now();
        let (units, _, new_owners) =
            translate_owned_cached(&state, &options, &skip, &owners, &mut cache);
        render = render.min(started.elapsed());
        owners = new_owners;

        let started = Instant::now();
        std::hint::black_box(UpstreamAnswers::of_units(&units));
        answers = answers.min(started.elapsed());

        let started = Instant::now();
        std::hint::black_box(route_rows(&state, &units));
        status = status.min(started.elapsed());

        let refs: Vec<_> = units.iter().collect();
        let started = Instant::now();
        let blocks = assemble_marshaled(None, &refs);
        let text: String = blocks.iter().map(|(_, t)| t.as_ref()).collect();
        assembled = assembled.min(started.elapsed());

        let started = Instant::now();
        let file = assemble(None, refs.iter().copied());
        let whole_text = file.marshal();
        let whole_blocks = file.marshal_blocks();
        whole = whole.min(started.elapsed());

        assert_eq!(text, whole_text, "the two ways give different files");
        assert_eq!(blocks.len(), whole_blocks.len());
    }
    println!(
        "push: {containers} containers: render {:.2} ms, answers {:.2} ms, assemble {:.2} ms (merging and writing everything: {:.2} ms), status rows {:.2} ms",
        millis(render),
        millis(answers),
        millis(assembled),
        millis(whole),
        millis(status),
    );
}

fn main() {
    for containers in [10, 10_000] {
        measure(containers);
    }
}
