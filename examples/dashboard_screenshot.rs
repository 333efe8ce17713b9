//! A screenshot of a running dashboard, taken with the browser test's
//! headless Chromium: how `docs/dashboard.png` is made from the demo.
//!
//! ```sh
//! REBUILD=1 bash compose/demo.sh up --port 8088
//! cargo run --example dashboard_screenshot -- http://admin:demo@fleet.localhost:8088/ docs/dashboard.png
//! ```
//!
//! Arguments: the page's URL (credentials in it are sent as basic
//! authentication), the PNG to write, and optionally the window as
//! `WIDTHxHEIGHT` (default 1400x1500). It waits until the page is live and
//! its timeline read.

#[path = "../tests/support/browser.rs"]
mod browser;

use std::time::{Duration, Instant};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(out)) = (args.next(), args.next()) else {
        eprintln!("usage: dashboard_screenshot URL OUT.png [WIDTHxHEIGHT]");
        std::process::exit(2);
    };
    let (width, height) = args
        .next()
        .and_then(|s| {
            let (w, h) = s.split_once('x')?;
            Some((w.parse().ok()?, h.parse().ok()?))
        })
        .unwrap_or((1400, 1500));
    let b = browser::Browser::start(width, height).await;
    b.client.goto(&url).await.expect("open the dashboard");
    let started = Instant::now();
    loop {
        let ready = b
            .eval(
                "const live = document.getElementById('live').textContent;
                 const t = document.getElementById('timeline-state');
                 return live.startsWith('Live: updates') && (!t || !t.textContent.startsWith('Reading'));",
            )
            .await;
        if ready == true {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the page did not go live within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.screenshot(std::path::Path::new(&out)).await;
    println!("wrote {out}");
    b.close().await;
}
