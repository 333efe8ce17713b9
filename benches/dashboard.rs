//! The dashboard's first render with 1,000 sites: the server's render of
//! the page, the whole answer over loopback HTTP, and headless Chromium's
//! own navigation timing (first contentful paint), each the median of
//! several runs. The bound is 200 ms for the first render.
//!
//! Run: `cargo bench --bench dashboard` (needs `chromium` and
//! `chromedriver`; prints figures).

#[path = "../tests/support/browser.rs"]
mod browser;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use caddy_fleet::applier::dashboard::{page, Model, PageQuery};
use support::*;

const SITES: usize = 1000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    bench_main(bench());
}

async fn bench() {
    let board = synthetic_board(SITES);
    let view = board.view();

    // The server's render of the page, alone.
    let model = Model::build(&view, Vec::new(), (0, 0), &[], true, |_| None);
    let mut renders = Vec::new();
    let mut bytes = 0;
    for _ in 0..200 {
        let started = Instant::now();
        let html = page::render(&model, &PageQuery::default(), None, None);
        renders.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = html.len();
    }
    println!(
        "dashboard: render of the page with {SITES} sites: median {:.3} ms ({bytes} bytes, one page of each table)",
        median(renders)
    );

    // The whole answer over loopback HTTP (the model built from the board too).
    let (url, stop) = serve_dashboard(board, Default::default());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut answers = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let text = client
            .get(format!("{url}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("site-0000"));
        answers.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "dashboard: GET / with {SITES} sites over loopback: median {:.2} ms",
        median(answers)
    );

    // The browser's first contentful paint and DOMContentLoaded, beside
    // those of an empty board (the browser's own floor here).
    let b = browser::Browser::start(1400, 1000).await;
    let (empty_url, stop_empty) = serve_dashboard(synthetic_board(0), Default::default());
    for (what, url) in [("no site", &empty_url), ("1000 sites", &url)] {
        let (mut paints, mut loaded) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            b.client.goto(&format!("{url}/")).await.unwrap();
            // The paint entry is recorded just after the paint.
            let timing = wait_for("the paint timing", Duration::from_secs(10), || async {
                let t = b
                    .eval(
                        "const n = performance.getEntriesByType('navigation')[0];
                         const p = performance.getEntriesByName('first-contentful-paint')[0];
                         return p && n.domContentLoadedEventEnd > 0 ? [p.startTime, n.domContentLoadedEventEnd] : null;",
                    )
                    .await;
                (!t.is_null()).then_some(t)
            })
            .await;
            paints.push(timing[0].as_f64().unwrap());
            loaded.push(timing[1].as_f64().unwrap());
        }
        println!(
            "dashboard: Chromium, {what}: first contentful paint median {:.0} ms (min {:.0}, max {:.0}), DOMContentLoaded median {:.0} ms",
            median(paints.clone()),
            paints.iter().cloned().fold(f64::MAX, f64::min),
            paints.iter().cloned().fold(0.0, f64::max),
            median(loaded)
        );
    }
    let _ = stop_empty.send(());
    b.close().await;
    let _ = stop.send(());
}
