//! What the trust boundary's checks cost on the applier's hot path, at
//! 10,000 containers: decoding with the subject check (`decode_from`)
//! against plain decoding, and the label bounds (`check_labels`) against
//! the whole translation they guard, and translation with an untrusted
//! policy (grants, restricted grammar, site ownership) against translation
//! that trusts every agent.
//!
//! Run: `cargo bench --bench bounds` (no Docker needed; prints figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use caddy_fleet::schema::limits::check_labels;
use caddy_fleet::schema::translate::{translate_units, TranslateOptions};
use caddy_fleet::schema::{ContainerState, Event, RouteState};
use support::synthetic_up;

const CONTAINERS: usize = 10_000;
const ROUNDS: u32 = 10;

/// The best of `ROUNDS` runs of `f`.
fn best(mut f: impl FnMut()) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let events: Vec<(String, Vec<u8>)> = (0..CONTAINERS)
        .map(|i| {
            let event = synthetic_up(
                &format!("agent{}", i % 10),
                &format!("c{i}"),
                &format!("s{i}.bounds.test"),
                "10.0.0.1",
                Some(8080),
                ContainerState::Running,
            );
            (event.subject(), event.encode())
        })
        .collect();

    let plain = best(|| {
        for (_, payload) in &events {
            std::hint::black_box(Event::decode(payload).ok());
        }
    });
    let checked = best(|| {
        for (subject, payload) in &events {
            std::hint::black_box(Event::decode_from(subject, payload).ok());
        }
    });

    let mut state = RouteState::default();
    for (seq, (subject, payload)) in events.iter().enumerate() {
        if let Ok(event) = Event::decode_from(subject, payload) {
            state.apply(seq as u64 + 1, &event);
        }
    }
    let options = TranslateOptions::trusting();
    let translate = best(|| {
        std::hint::black_box(translate_units(&state, &options, &BTreeSet::new()));
    });
    let bounds = best(|| {
        for record in state.live_containers() {
            std::hint::black_box(check_labels(&record.facts.labels, "caddy").ok());
        }
    });
    let policy = caddy_fleet::schema::policy::Policy::parse(
        "[default]\ndomains = [\"*\"]\nupstreams = [\"10.0.0.0/8\"]\n",
    )
    .expect("policy");
    let untrusted = TranslateOptions {
        policy,
        ..TranslateOptions::default()
    };
    let (units, refused) = translate_units(&state, &untrusted, &BTreeSet::new());
    assert_eq!((units.len(), refused.len()), (CONTAINERS, 0), "{refused:?}");
    // Interleaved, best of many: the machine's noise is larger than the
    // difference being measured.
    let (mut trusting, mut with_policy) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 * ROUNDS {
        let started = Instant::now();
        std::hint::black_box(translate_units(&state, &options, &BTreeSet::new()));
        trusting = trusting.min(started.elapsed());
        let started = Instant::now();
        std::hint::black_box(translate_units(&state, &untrusted, &BTreeSet::new()));
        with_policy = with_policy.min(started.elapsed());
    }
    let pct = |part: Duration, whole: Duration| 100.0 * part.as_secs_f64() / whole.as_secs_f64();
    println!(
        "bounds: decode {CONTAINERS} messages: plain {:.2} ms, with subject checks {:.2} ms (+{:.1} %)",
        plain.as_secs_f64() * 1e3,
        checked.as_secs_f64() * 1e3,
        pct(checked.saturating_sub(plain), plain)
    );
    println!(
        "bounds: translate {CONTAINERS} containers {:.2} ms (bounds checks included); check_labels alone {:.2} ms = {:.1} % of it",
        translate.as_secs_f64() * 1e3,
        bounds.as_secs_f64() * 1e3,
        pct(bounds, translate)
    );
    println!(
        "bounds: translate {CONTAINERS} containers trusting everyone {:.2} ms, under an untrusted policy {:.2} ms (+{:.1} %)",
        trusting.as_secs_f64() * 1e3,
        with_policy.as_secs_f64() * 1e3,
        pct(with_policy.saturating_sub(trusting), trusting)
    );
}
