//! Test fixtures for the integration suite: offline images, real NATS,
//! real Caddy and real labeled backends on the local Docker engine, and
//! in-process publishers and appliers wired to them.
//!
//! Docker is required. Without it every test fails with a message that
//! says so; none passes silently.

#![allow(dead_code)]

use std::future::Future;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use caddy_fleet::applier::{ApplierConfig, StatusBoard};
use caddy_fleet::nats::{NatsConfig, StreamSettings};
use caddy_fleet::publisher::{FilterLabel, PublisherConfig};
use caddy_fleet::schema::AgentId;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const NATS_IMAGE: (&str, &str) = ("caddy-fleet-test/nats", "2.15.1");
pub const CADDY_IMAGE: (&str, &str) = ("caddy-fleet-test/caddy", "2.11.7");
pub const WHOAMI_IMAGE: (&str, &str) = ("caddy-fleet-test/whoami", "2.11.7");

/// A short random ID that keeps concurrent tests apart.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// Fails the test unless Docker answers, then builds the offline images
/// once per test process (the script skips images that exist).
pub fn ensure_images() {
    static BUILT: OnceLock<Mutex<bool>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(|| Mutex::new(false))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if *built {
        return;
    }
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match docker {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the integration tests need a running Docker engine, and `docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            panic!("the integration tests need Docker, and the `docker` command is missing: {e}")
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/build-images.sh");
    let status = Command::new("bash")
        .arg(script)
        .status()
        .expect("run build-images.sh");
    assert!(
        status.success(),
        "tests/support/build-images.sh failed; see its output above"
    );
    *built = true;
}

/// A TCP port free on every address a moment ago, for a server a test
/// starts (Caddy's admin and HTTP ports on the host network).
///
/// It is taken below the kernel's ephemeral range, never from it (as a
/// bind to port 0 would): Docker publishes containers' ports from that
/// range, and on a busy machine it handed a port a test had just picked to
/// another container before the test's Caddy bound it; Caddy's next config
/// then failed to listen. Each call in a process gets another port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|low| *low > LOWEST + 1_000)
        .unwrap_or(32_768);
    let span = ephemeral_low - LOWEST;
    // Processes running at once start at different places.
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(7_919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOWEST + seed.wrapping_add(n) % span) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {LOWEST}..{ephemeral_low}")
}

/// With `RUST_LOG` set, the in-process components' logs go to the test's
/// output (shown for a failing test): what to read when a wait timed out.
pub fn init_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_every(what, timeout, Duration::from_millis(100), check).await
}

/// [`wait_for`], checking every `interval`: benchmarks that time how long
/// a condition takes to hold check often, since the interval is their
/// resolution.
pub async fn wait_for_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, interval, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Polls `check` every `interval` until it returns `Some`; `None` once
/// `timeout` has passed (for waits that say more when they fail).
pub async fn poll_until<T, F, Fut>(timeout: Duration, interval: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Caddy's floor: a bare forced `/load` of the config it runs, `count`
/// times; the seconds each took.
pub async fn load_floor(caddy: &Caddy, count: usize) -> Vec<f64> {
    let config = caddy.config().await.expect("Caddy's config").to_string();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut floors = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let response = http
            .post(format!("{}/load", caddy.admin_url()))
            .header("Content-Type", "application/json")
            .header("Cache-Control", "must-revalidate")
            .body(config.clone())
            .send()
            .await
            .expect("/load");
        assert!(response.status().is_success());
        floors.push(started.elapsed().as_secs_f64());
    }
    floors
}

/// A real NATS server with JetStream on file storage.
pub struct Nats {
    pub container: ContainerAsync<GenericImage>,
    pub url: String,
}

impl Nats {
    pub async fn start() -> Nats {
        ensure_images();
        let container = start_retrying(
            || {
                GenericImage::new(NATS_IMAGE.0, NATS_IMAGE.1)
                    .with_exposed_port(4222.tcp())
                    .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
                    .with_cmd(["-js", "-sd", "/data"])
            },
            "NATS",
        )
        .await;
        let port = container.get_host_port_ipv4(4222).await.expect("NATS port");
        Nats {
            container,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }

    pub fn config(&self) -> NatsConfig {
        NatsConfig {
            urls: vec![self.url.clone()],
            ..Default::default()
        }
    }

    /// Where the debugging commands look on this NATS: the default log and
    /// checkpoint bucket, `applier`'s checkpoints, no live applier, labels
    /// read trusting every agent.
    pub fn inspect_config(&self, applier: Option<&str>) -> caddy_fleet::inspect::InspectConfig {
        caddy_fleet::inspect::InspectConfig {
            nats: self.config(),
            stream: StreamSettings::default().name,
            checkpoint_bucket: caddy_fleet::applier::checkpoint::BUCKET.to_string(),
            applier_name: applier.map(str::to_string),
            status_url: "http://127.0.0.1:1".to_string(),
            translate: caddy_fleet::schema::translate::TranslateOptions::trusting(),
            base_caddyfile: None,
            caddy_api_url: "http://127.0.0.1:1".to_string(),
        }
    }

    /// A client; retried for a while, since a restarted NATS container's
    /// published port accepts connections before the server answers them.
    pub async fn client(&self) -> caddy_fleet::nats::async_nats::Client {
        let config = self.config();
        wait_for(
            "NATS to accept a client",
            Duration::from_secs(30),
            || async {
                caddy_fleet::nats::connect(&config)
                    .await
                    .inspect_err(|error| eprintln!("NATS does not accept a client yet: {error}"))
                    .ok()
            },
        )
        .await
    }
}

/// A real Caddy on the host network, so its upstreams are loopback
/// addresses; its admin API and HTTP port are free loopback ports.
pub struct Caddy {
    pub container: ContainerAsync<GenericImage>,
    pub admin_port: u16,
    pub http_port: u16,
}

impl Caddy {
    pub async fn start() -> Caddy {
        ensure_images();
        let admin_port = free_port();
        let http_port = free_port();
        let container = GenericImage::new(CADDY_IMAGE.0, CADDY_IMAGE.1)
            .with_wait_for(WaitFor::message_on_stderr("serving initial configuration"))
            .with_network("host")
            .with_env_var("CADDY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .with_env_var("CADDY_HTTP_PORT", http_port.to_string())
            .with_env_var("CADDY_HTTPS_PORT", free_port().to_string())
            .start()
            .await
            .expect("start Caddy container");
        Caddy {
            container,
            admin_port,
            http_port,
        }
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The Caddyfile the applier merges its sites into: the same global
    /// options the image starts with.
    pub fn base_caddyfile(&self) -> String {
        format!(
            "{{\n\tadmin 127.0.0.1:{}\n\thttp_port {}\n\tauto_https off\n}}\n",
            self.admin_port, self.http_port
        )
    }

    /// GET / with `Host: host` through Caddy: `Some((status, body))`, or
    /// `None` when nothing answers.
    pub async fn get(&self, host: &str) -> Option<(u16, String)> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        self.get_with(&client, host).await
    }

    /// [`Caddy::get`] with a client of the caller's (building one costs
    /// more than the request: a loop polling every few milliseconds keeps
    /// one).
    pub async fn get_with(&self, client: &reqwest::Client, host: &str) -> Option<(u16, String)> {
        let response = client
            .get(format!("http://127.0.0.1:{}/", self.http_port))
            .header("Host", host)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// Waits (bounded by `timeout`) until a GET with `Host: host` answers
    /// 200 with exactly `body`.
    /// On a timeout it says what Caddy answered last and the end of
    /// Caddy's log (a failed upstream lookup, a refused config).
    pub async fn wait_serving(&self, host: &str, body: &str, timeout: Duration) {
        let last = Mutex::new(None);
        let served = poll_until(timeout, Duration::from_millis(100), || async {
            let answer = self.get(host).await;
            let served = answer
                .as_ref()
                .is_some_and(|(status, text)| *status == 200 && text == body);
            *last.lock().unwrap() = Some(answer);
            served.then_some(())
        })
        .await;
        if served.is_none() {
            let last = last.lock().unwrap().take();
            panic!(
                "timed out after {timeout:?} waiting for {host} to answer {body:?} through Caddy; its last answer: {last:?} (None: no answer in 3 s)\nthe end of Caddy's log:\n{}",
                self.log_tail(30).await
            );
        }
    }

    /// The last `lines` lines of Caddy's log.
    pub async fn log_tail(&self, lines: usize) -> String {
        self.log_lines(|_| true, lines).await
    }

    /// The last `lines` lines of Caddy's log that `keep` keeps (e.g. its
    /// errors: why a request got a 502).
    ///
    /// Read with `docker logs`: testcontainers' own log stream gives what
    /// its start-up wait left, not the end of a running container's log.
    pub async fn log_lines(&self, keep: impl Fn(&str) -> bool, lines: usize) -> String {
        let log = Command::new("docker")
            .args(["logs", self.container.id()])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
            .unwrap_or_else(|error| format!("(docker logs: {error})"));
        let kept: Vec<&str> = log.lines().filter(|l| keep(l)).collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }

    /// The running config, as Caddy reports it; `None` if the request
    /// failed (Caddy drops admin connections while it loads a config).
    pub async fn config(&self) -> Option<serde_json::Value> {
        let client = reqwest::Client::builder().no_proxy().build().ok()?;
        let response = client
            .get(format!("{}/config/", self.admin_url()))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }
}

/// A labeled whoami backend answering `body` on port 80, published on a
/// random host port.
pub async fn start_backend(labels: &[(&str, String)], body: &str) -> ContainerAsync<GenericImage> {
    ensure_images();
    let request = || {
        let mut request = GenericImage::new(WHOAMI_IMAGE.0, WHOAMI_IMAGE.1)
            .with_exposed_port(80.tcp())
            .with_wait_for(WaitFor::message_on_stderr("server running"))
            .with_cmd([body.to_string()]);
        for (k, v) in labels {
            request = request.with_label(*k, v.clone());
        }
        request
    };
    start_retrying(request, "backend").await
}

/// Starts a container whose ports Docker publishes. Docker may hand out a
/// host port another process holds on a busy machine ("address already in
/// use": the ephemeral range is shared with every outgoing connection), so
/// that lost race is retried, with the project's own retry policy.
pub async fn start_retrying(
    request: impl Fn() -> testcontainers::ContainerRequest<GenericImage>,
    what: &str,
) -> ContainerAsync<GenericImage> {
    let mut retry = caddy_fleet::nats::retry::RetryPolicy::NATS
        .with_deadline(Duration::from_secs(30))
        .start();
    loop {
        match request().start().await {
            Ok(container) => return container,
            Err(error) => match retry.next_delay() {
                Some(delay) if error.to_string().contains("already in use") => {
                    eprintln!("{what} container did not start ({error}); retrying");
                    tokio::time::sleep(delay).await;
                }
                _ => panic!("start {what} container: {error}"),
            },
        }
    }
}

/// A component running in-process, stopped by `stop()` or on drop.
pub struct Running {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), caddy_fleet::FleetError>>>,
}

impl Running {
    fn spawn<F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
    where
        F: Future<Output = Result<(), caddy_fleet::FleetError>> + Send + 'static,
    {
        init_logs();
        let (tx, rx) = oneshot::channel();
        Running {
            shutdown: Some(tx),
            task: Some(tokio::spawn(run(rx))),
        }
    }

    /// Asks the component to stop and waits (bounded) for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("component did not stop within 10 s")
                .expect("component task panicked");
            result.expect("component failed");
        }
    }

    /// Panics if the component already stopped with an error.
    pub fn assert_running(&mut self) {
        if let Some(task) = &self.task {
            if task.is_finished() {
                let task = self.task.take().expect("task");
                let result = futures::FutureExt::now_or_never(task);
                panic!("component stopped unexpectedly: {result:?}");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A publisher for `agent` that watches only containers labeled
/// `caddy-fleet-test=<filter>` and reports `host_address`. Its ingest
/// stream is created first, as an operator's `agent add` would, so it
/// publishes whether or not an applier runs.
pub fn start_publisher(nats: &Nats, agent: &str, filter: &str, host_address: &str) -> Running {
    start_publisher_with(nats, agent, filter, host_address, true)
}

/// Like [`start_publisher`]; without `provision`, the agent's ingest stream
/// is left to the applier to create when it hears the agent.
pub fn start_publisher_with(
    nats: &Nats,
    agent: &str,
    filter: &str,
    host_address: &str,
    provision: bool,
) -> Running {
    start_publisher_tuned(nats, agent, filter, host_address, provision, |_| {})
}

/// Like [`start_publisher_with`], with settings changed by `tune`.
pub fn start_publisher_tuned(
    nats: &Nats,
    agent: &str,
    filter: &str,
    host_address: &str,
    provision: bool,
    tune: impl FnOnce(&mut PublisherConfig),
) -> Running {
    let nats = nats.config();
    let mut config = PublisherConfig::new(AgentId::new(agent).expect("agent id"), host_address);
    config.filter_label = Some(FilterLabel {
        key: "caddy-fleet-test".into(),
        value: Some(filter.into()),
    });
    tune(&mut config);
    Running::spawn(move |rx| async move {
        if provision {
            let client = caddy_fleet::nats::connect(&nats).await?;
            let js = caddy_fleet::nats::async_nats::jetstream::new(client);
            let settings = StreamSettings::default();
            caddy_fleet::nats::ensure_stream(&js, &settings).await?;
            caddy_fleet::nats::ensure_agent_stream(&js, &settings, &config.agent).await?;
        }
        caddy_fleet::run_publisher(&nats, config, async {
            let _ = rx.await;
        })
        .await
    })
}

/// An applier named `name` (its durable consumer and checkpoint) converging `caddy`.
pub fn start_applier(nats: &Nats, caddy: &Caddy, name: &str) -> (Running, Arc<StatusBoard>) {
    start_applier_with(nats, caddy, name, |_| {})
}

/// Like [`start_applier`], with settings changed by `tune`.
pub fn start_applier_with(
    nats: &Nats,
    caddy: &Caddy,
    name: &str,
    tune: impl FnOnce(&mut ApplierConfig),
) -> (Running, Arc<StatusBoard>) {
    start_applier_on(nats, caddy, name, StreamSettings::default(), tune)
}

/// Like [`start_applier_with`], with the given stream settings (e.g. not
/// the log's owner).
pub fn start_applier_on(
    nats: &Nats,
    caddy: &Caddy,
    name: &str,
    stream: StreamSettings,
    tune: impl FnOnce(&mut ApplierConfig),
) -> (Running, Arc<StatusBoard>) {
    let nats = nats.config();
    let mut config = ApplierConfig::new(name, caddy.admin_url());
    config.base_caddyfile = Some(caddy.base_caddyfile());
    // The suite's agents are the test's own: trusted with everything, as
    // caddy-docker-proxy trusts labels (tests of the policy tune this).
    config.translate = caddy_fleet::schema::translate::TranslateOptions {
        // As the settings' default (STREAM_CLOSE_DELAY), so the debugging
        // commands, run with default settings, agree with the applier.
        stream_close_delay: Some(Duration::from_secs(3600)),
        proxy_try_duration: Some(Duration::from_secs(5)),
        ..caddy_fleet::schema::translate::TranslateOptions::trusting()
    };
    config.health_check_interval = Duration::from_millis(500);
    config.checkpoint_interval = Duration::from_secs(1);
    tune(&mut config);
    let board = Arc::new(StatusBoard::default());
    let task_board = board.clone();
    let running = Running::spawn(move |rx| async move {
        caddy_fleet::run_applier(&nats, &stream, config, task_board, async {
            let _ = rx.await;
        })
        .await
    });
    (running, board)
}

/// A WebSocket server on loopback answering each text message with
/// `reply(text)`; returns its port.
pub async fn websocket_server(
    reply: impl Fn(&str) -> String + Clone + Send + Sync + 'static,
) -> u16 {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(text) = message {
                        if ws.send(Message::text(reply(text.as_str()))).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Dynamic upstreams as the settings' defaults have them, answered on any
/// free loopback port (the applier tells Caddy the one it bound).
pub fn dynamic_upstreams() -> caddy_fleet::schema::dynamic::DynamicUpstreams {
    caddy_fleet::schema::dynamic::DynamicUpstreams {
        resolver: "127.0.0.1:0".parse().expect("loopback"),
        refresh: Duration::from_secs(1),
        grace_period: Duration::from_secs(5),
    }
}

/// The labels that route `http://<domain>` to the container's port 80,
/// scoped to one test by `filter`.
pub fn web_labels(domain: &str, filter: &str) -> Vec<(&'static str, String)> {
    vec![
        ("caddy", format!("http://{domain}")),
        ("caddy.reverse_proxy", "{{upstreams 80}}".to_string()),
        ("caddy-fleet-test", filter.to_string()),
    ]
}

/// Caddy's routes as `host → sorted upstream dials`, from its running config.
pub async fn caddy_routes(
    caddy: &Caddy,
) -> Option<std::collections::BTreeMap<String, Vec<String>>> {
    fn dials(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("dial", serde_json::Value::String(d)) => out.push(d.clone()),
                        _ => dials(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| dials(v, out)),
            _ => {}
        }
    }
    let config = caddy.config().await?;
    let mut routes = std::collections::BTreeMap::new();
    let servers = config
        .pointer("/apps/http/servers")
        .and_then(|s| s.as_object());
    for server in servers.into_iter().flat_map(|s| s.values()) {
        for route in server
            .get("routes")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
        {
            let hosts: Vec<String> = route
                .pointer("/match/0/host")
                .and_then(|h| h.as_array())
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str().map(str::to_string))
                .collect();
            let mut upstreams = Vec::new();
            dials(
                route.get("handle").unwrap_or(&serde_json::Value::Null),
                &mut upstreams,
            );
            upstreams.sort();
            for host in hosts {
                routes.insert(host, upstreams.clone());
            }
        }
    }
    Some(routes)
}

/// The routes an applier should produce for `state`: `host → sorted
/// upstreams`, for sites written as `http://<host>`.
pub fn expected_routes(
    state: &caddy_fleet::schema::RouteState,
) -> std::collections::BTreeMap<String, Vec<String>> {
    use caddy_fleet::schema::translate::{translate_state, TranslateOptions};
    let translation = translate_state(state, None, &TranslateOptions::trusting());
    let mut routes = std::collections::BTreeMap::new();
    for site in &translation.caddyfile.blocks {
        let mut upstreams: Vec<String> = site
            .children
            .iter()
            .filter(|c| c.keys.first().map(String::as_str) == Some("reverse_proxy"))
            .flat_map(|c| c.keys.iter().skip(1).cloned())
            .collect();
        upstreams.sort();
        for address in &site.keys {
            routes.insert(
                address.trim_start_matches("http://").to_string(),
                upstreams.clone(),
            );
        }
    }
    routes
}

/// Serves an applier's status endpoints on a free loopback port.
pub fn serve_status(
    board: Arc<caddy_fleet::applier::StatusBoard>,
) -> (String, oneshot::Sender<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind status port");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let _ = caddy_fleet::serve_status(listener, board, async {
            let _ = rx.await;
        })
        .await;
    });
    (url, tx)
}

/// GET `url`, JSON body.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder().no_proxy().build().ok()?;
    client.get(url).send().await.ok()?.json().await.ok()
}

/// Facts of a synthetic container on `agent` serving `http://<domain>` on
/// container port 80, published at `host:<port>` (no port: publishes
/// nothing). For tests and benchmarks that drive the applier directly.
pub fn synthetic_up(
    agent: &str,
    id: &str,
    domain: &str,
    host: &str,
    port: Option<u16>,
    state: caddy_fleet::schema::ContainerState,
) -> caddy_fleet::schema::Event {
    use caddy_fleet::schema::{ContainerFacts, Event, Health, PortBinding};
    Event::Up(ContainerFacts {
        agent: AgentId::new(agent).expect("agent id"),
        id: id.into(),
        name: format!("ctr-{id}"),
        host_address: host.into(),
        labels: [
            ("caddy".to_string(), format!("http://{domain}")),
            (
                "caddy.reverse_proxy".to_string(),
                "{{upstreams 80}}".to_string(),
            ),
        ]
        .into(),
        ports: port
            .map(|host_port| PortBinding {
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "0.0.0.0".into(),
                host_port,
            })
            .into_iter()
            .collect(),
        networks: Default::default(),
        state,
        health: Health::None,
        observed_at_ms: 0,
    })
}

/// Creates the log and the ingest streams of `agents` (what the applier's
/// provisioning does for agents it hears), with default settings.
pub async fn ensure_log(
    js: &caddy_fleet::nats::async_nats::jetstream::Context,
    agents: &[&str],
) -> caddy_fleet::nats::async_nats::jetstream::stream::Stream {
    let settings = StreamSettings::default();
    let stream = caddy_fleet::nats::ensure_stream(js, &settings)
        .await
        .expect("create the log");
    for agent in agents {
        let agent = caddy_fleet::schema::AgentId::new(*agent).expect("agent ID");
        caddy_fleet::nats::ensure_agent_stream(js, &settings, &agent)
            .await
            .expect("create an ingest stream");
    }
    stream
}

/// The log's last sequence, once it has sourced at least `at_least` messages.
pub async fn wait_for_log(
    stream: &caddy_fleet::nats::async_nats::jetstream::stream::Stream,
    at_least: u64,
) -> u64 {
    let what = format!("the log to source {at_least} messages");
    wait_for(&what, Duration::from_secs(120), || async {
        let state = stream.get_info().await.ok()?.state;
        (state.messages >= at_least).then_some(state.last_sequence)
    })
    .await
}

/// Publishes `events` with message IDs `<run>.<n>` into their agents'
/// ingest streams (created first), awaiting acks in batches of 1,000
/// (never more in flight than async-nats allows), then waits until the log
/// has sourced them all.
pub async fn publish_batched(
    js: &caddy_fleet::nats::async_nats::jetstream::Context,
    events: impl Iterator<Item = caddy_fleet::schema::Event>,
    run: &str,
) {
    use caddy_fleet::nats::async_nats::jetstream::message::PublishMessage;
    let log = ensure_log(js, &[]).await;
    let before = log.get_info().await.expect("log info").state.messages;
    let mut agents = std::collections::BTreeSet::new();
    let mut acks = Vec::new();
    let mut sent = 0u64;
    for (n, event) in events.enumerate() {
        if agents.insert(event.agent().clone()) {
            caddy_fleet::nats::ensure_agent_stream(js, &StreamSettings::default(), event.agent())
                .await
                .expect("create an ingest stream");
        }
        let message = PublishMessage::build()
            .payload(event.encode().into())
            .message_id(format!("{run}.{n}"));
        let ack = js
            .send_publish(event.subject(), message)
            .await
            .expect("publish");
        acks.push(std::future::IntoFuture::into_future(ack));
        sent += 1;
        if acks.len() == 1000 {
            for ack in futures::future::join_all(acks.drain(..)).await {
                ack.expect("ack");
            }
        }
    }
    for ack in futures::future::join_all(acks).await {
        ack.expect("ack");
    }
    wait_for_log(&log, before + sent).await;
}

/// Publishes one event with `publisher` and returns its sequence in the
/// log, once the log has sourced it from the agent's ingest stream.
pub async fn publish_to_log(
    publisher: &mut caddy_fleet::nats::EventPublisher,
    log: &caddy_fleet::nats::async_nats::jetstream::stream::Stream,
    event: &caddy_fleet::schema::Event,
) -> u64 {
    let id = publisher.next_id();
    publisher
        .publish_with_id(event, &id)
        .await
        .expect("publish");
    let subject = event.subject();
    let what = format!("the log to source {subject}");
    wait_for(&what, Duration::from_secs(30), || async {
        let message = log.direct_get_last_for_subject(&subject).await.ok()?;
        let stored_id = message.headers.get("Nats-Msg-Id")?.as_str().to_string();
        (stored_id == id).then_some(message.sequence)
    })
    .await
}

/// A whoami container (not started) answering `body`, with `labels`, port
/// 80 published on a random port of 127.0.0.1.
pub fn whoami_body(
    labels: Vec<(String, String)>,
    body: &str,
) -> testcontainers::bollard::models::ContainerCreateBody {
    use testcontainers::bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
    let binding = PortBinding {
        host_ip: Some("127.0.0.1".into()),
        host_port: Some(String::new()),
    };
    ContainerCreateBody {
        image: Some(format!("{}:{}", WHOAMI_IMAGE.0, WHOAMI_IMAGE.1)),
        cmd: Some(vec![body.to_string()]),
        exposed_ports: Some(vec!["80/tcp".to_string()]),
        labels: Some(labels.into_iter().collect()),
        host_config: Some(HostConfig {
            port_bindings: Some([("80/tcp".to_string(), Some(vec![binding]))].into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Removes every container labeled `key=value` when dropped, also when
/// the test fails.
pub struct LabelCleanup(pub String);

impl Drop for LabelCleanup {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label={}", self.0)])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for chunk in ids.chunks(50) {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(chunk)
                .output();
        }
    }
}

/// `caddy-fleet applier` as its own process (the release build under
/// `cargo bench`), with its status listener on a free loopback port.
pub struct ApplierProcess {
    pub child: std::process::Child,
    /// The status listener's base URL.
    pub status: String,
}

impl ApplierProcess {
    pub fn start(nats: &Nats, caddy: &Caddy, name: &str, base: &std::path::Path) -> ApplierProcess {
        ApplierProcess::start_with(nats, caddy, name, base, &[])
    }

    /// [`ApplierProcess::start`] with more settings, as variables.
    pub fn start_with(
        nats: &Nats,
        caddy: &Caddy,
        name: &str,
        base: &std::path::Path,
        settings: &[(&str, String)],
    ) -> ApplierProcess {
        let port = free_port();
        // The bench's agent is trusted with every site, as the tests' are.
        let policy = base.with_extension("policy.toml");
        std::fs::write(&policy, "[default]\ndomains = [\"*\"]\ntrusted = true\n")
            .expect("write the policy");
        // `APPLIER_WRAPPER="heaptrack -o /tmp/applier"` runs the applier
        // under a profiler (words split on spaces, the binary appended).
        let mut wrapper = std::env::var("APPLIER_WRAPPER").unwrap_or_default();
        wrapper.push(' ');
        wrapper.push_str(env!("CARGO_BIN_EXE_caddy-fleet"));
        let mut words = wrapper.split_whitespace();
        let program = words.next().expect("the applier's binary");
        let child = Command::new(program)
            .args(words)
            .arg("applier")
            .envs(settings.iter().map(|(k, v)| (k, v)))
            .env("POLICY_FILE", &policy)
            .env("NATS_URL", &nats.url)
            .env("CADDY_API_URL", caddy.admin_url())
            .env("CADDY_BASE_CADDYFILE", base)
            .env("APPLIER_NAME", name)
            .env("STATUS_LISTEN", format!("127.0.0.1:{port}"))
            // `APPLIER_LOG=debug` prints the applier's log (its push
            // stages) with the bench's output.
            .env(
                "RUST_LOG",
                std::env::var("APPLIER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(match std::env::var_os("APPLIER_LOG") {
                Some(_) => std::process::Stdio::inherit(),
                None => std::process::Stdio::null(),
            })
            .spawn()
            .expect("start caddy-fleet applier");
        ApplierProcess {
            child,
            status: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn rss_mib(&self) -> f64 {
        rss_mib(self.child.id())
    }

    /// Waits until the applier folded up to `seq` and Caddy runs the result.
    pub async fn caught_up(&self, seq: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(status) = get_json(&format!("{}/status", self.status)).await {
                if status["last_seq"].as_u64() >= Some(seq) && status["converged"] == true {
                    return started.elapsed();
                }
            }
            assert!(
                started.elapsed() < timeout,
                "applier did not catch up to {seq} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 120 s) until the applier has stopped adapting sites
    /// alone between pushes (a counter absent counts as settled).
    pub async fn settled(&self) {
        let started = Instant::now();
        let mut last = None;
        loop {
            let metrics = reqwest::get(format!("{}/metrics", self.status)).await.ok();
            let metrics = match metrics {
                Some(m) => m.text().await.unwrap_or_default(),
                None => String::new(),
            };
            let count = metrics
                .lines()
                .find(|l| l.starts_with("caddy_fleet_site_adapts_total "))
                .and_then(|l| l.split(' ').nth(1))
                .map(str::to_string);
            if count.is_none() || (count == last && started.elapsed() > Duration::from_secs(1)) {
                return;
            }
            if started.elapsed() > Duration::from_secs(120) {
                return;
            }
            last = count;
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApplierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Runs a benchmark's future on a two-thread runtime.
pub fn bench_main(bench: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(bench);
}

/// [`ensure_images`], unless the test was pointed at a Caddy already
/// running (`CADDY_FLEET_TEST_CADDY_ADMIN`).
pub fn ensure_images_unless_local() {
    if std::env::var_os("CADDY_FLEET_TEST_CADDY_ADMIN").is_none() {
        ensure_images();
    }
}

/// Serves `board` with `dashboard` (see `caddy_fleet::dashboard::with_log`)
/// on a free loopback port; the sender stops it.
pub fn serve_dashboard(
    board: Arc<StatusBoard>,
    dashboard: caddy_fleet::applier::dashboard::Dashboard,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let _ = caddy_fleet::serve_status_with(listener, board, dashboard, async {
            let _ = rx.await;
        })
        .await;
    });
    (url, tx)
}

/// A board with `sites` sites on 20 agents and a few refused containers.
pub fn synthetic_board(sites: usize) -> Arc<StatusBoard> {
    let board = Arc::new(StatusBoard::default());
    board.update(|v| {
        v.consumer_attached = true;
        v.converged = true;
        v.routes = (0..sites)
            .map(|i| caddy_fleet::schema::routes::RouteRow {
                site: format!("http://site-{i:04}.example.com"),
                upstreams: vec![format!("10.0.{}.{}:{}", i / 250, i % 250, 8000 + i % 100)],
                containers: vec![caddy_fleet::schema::routes::RouteContainer {
                    agent: format!("host-{:02}", i % 20),
                    container: format!("web-{i:04}"),
                    container_id: format!("{i:064x}"),
                    since_seq: i as u64 + 1,
                }],
                ..Default::default()
            })
            .collect();
        v.agents = (0..20)
            .map(|a| caddy_fleet::applier::status::AgentView {
                agent: format!("host-{a:02}"),
                host_address: Some(format!("10.0.0.{a}")),
                last_heartbeat_ms: Some(1_795_773_600_000),
                silent_for_secs: 1,
                stale: false,
                expired: false,
                containers: sites / 20,
            })
            .collect();
        v.rejected = (0..5)
            .map(|i| caddy_fleet::applier::status::RejectedView {
                container: caddy_fleet::applier::status::ContainerRef {
                    agent: "host-00".into(),
                    container: format!("bad-{i}"),
                    container_id: format!("bad{i}"),
                },
                by: "labels",
                reason: "label caddy.reverse_proxy: function \"nosuch\" not defined".into(),
            })
            .collect();
        v.last_seq = sites as u64;
        v.folded_seq = sites as u64;
        v.consumer_lag = Some(0);
    });
    board.folded(sites as u64);
    board
}
