//! Headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs when missing), for the
//! dashboard's browser test and the screenshot and first-render figures.
//! Included with `#[path]` by the files that need it, so the other test
//! binaries do not link a WebDriver client.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder};

/// A headless Chromium and its chromedriver, both stopped on drop.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: std::path::PathBuf,
}

/// The path of `program` on `PATH`, if any.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` x
    /// `height`. Fails (never skips) when either is missing.
    pub async fn start(width: u32, height: u32) -> Browser {
        let chromium = which("chromium").unwrap_or_else(|| {
            panic!("the dashboard's browser test needs Chromium: apt-get install -y chromium chromium-driver (.ci/run installs them)")
        });
        let chromedriver = which("chromedriver").unwrap_or_else(|| {
            panic!("the dashboard's browser test needs chromedriver: apt-get install -y chromium-driver (.ci/run installs it)")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port for chromedriver");
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = std::env::temp_dir().join(format!(
            "caddy-fleet-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let mut args = vec![
            "--headless=new".to_string(),
            // As root in a container Chromium has no sandbox to use.
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--no-first-run".to_string(),
            "--no-proxy-server".to_string(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        // More flags, e.g. `--force-dark-mode` for the dark theme.
        if let Ok(extra) = std::env::var("CADDY_FLEET_BROWSER_ARGS") {
            args.extend(extra.split_whitespace().map(str::to_string));
        }
        let mut caps = Capabilities::new();
        caps.insert(
            "goog:chromeOptions".to_string(),
            serde_json::json!({ "binary": chromium, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        // chromedriver takes a moment to listen; Chromium to start. Tried
        // again with the project's retry policy, for at most 30 s.
        let mut retry = caddy_fleet::nats::retry::RetryPolicy::NATS
            .with_deadline(Duration::from_secs(30))
            .start();
        let client = loop {
            match builder.connect(&url).await {
                Ok(client) => break client,
                Err(error) => match retry.next_delay() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => {
                        panic!("cannot start headless Chromium through chromedriver: {error}")
                    }
                },
            }
        };
        Browser {
            client,
            driver,
            profile,
        }
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed ({e}): {script}"))
    }

    /// A string the page computes.
    pub async fn text(&self, script: &str) -> String {
        match self.eval(script).await {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        }
    }

    /// Writes a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// Ends the session (and Chromium), then chromedriver.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.clone().close()).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
