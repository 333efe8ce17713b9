//! Deploys without failed requests: a rolling replacement under steady
//! load (start the new container, wait until it is routed, `docker stop`
//! the old one) answers every request, because the publisher reports the
//! stop as it is asked (`stopping`) and the applier withdraws the upstream
//! while the old container still answers.
//!
//! The backends behave as a well-behaved service does on `docker stop`:
//! they keep accepting for a short drain delay after SIGTERM (Caddy's
//! `shutdown_delay`), then finish what is in flight and exit. Without the
//! `stopping` state their upstream would stay in Caddy's config until they
//! exit, and requests sent to it after the drain would fail.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// What the test is doing, for the failures to say when they happened.
static PHASE: Mutex<String> = Mutex::new(String::new());

/// The tests here each put a steady load through Caddy and time a drain
/// against a withdrawal: they run one at a time, so that no test's load
/// slows another's withdrawal past its drain (the harness runs a binary's
/// tests in parallel).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn phase(what: String) {
    *PHASE.lock().unwrap() = what;
}

/// How long a backend keeps accepting after it is asked to stop: longer
/// than the withdrawal takes on a busy machine (the publisher hears the
/// `kill`, the applier pushes), as a service's drain should be. With 2 s,
/// a loaded CI machine sometimes withdrew later than the drain.
const DRAIN: Duration = Duration::from_secs(5);

/// A labeled backend answering `body`, with a drain delay on stop.
async fn start_draining_backend(
    labels: &[(&'static str, String)],
    body: &str,
) -> ContainerAsync<GenericImage> {
    ensure_images();
    let caddyfile = format!(
        "{{\n\tadmin off\n\tauto_https off\n\tshutdown_delay {}s\n}}\n:80 {{\n\trespond \"{body}\"\n}}\n",
        DRAIN.as_secs()
    );
    let request = || {
        let mut request = GenericImage::new(CADDY_IMAGE.0, CADDY_IMAGE.1)
            .with_exposed_port(80.tcp())
            .with_wait_for(WaitFor::message_on_stderr("serving initial configuration"))
            .with_copy_to("/etc/caddy/Caddyfile", caddyfile.clone().into_bytes());
        for (k, v) in labels {
            request = request.with_label(*k, v.clone());
        }
        request
    };
    start_retrying(request, "draining backend").await
}

/// What the load saw: answers by body, and every failure in words.
#[derive(Default)]
struct Tally {
    answers: BTreeMap<String, u64>,
    failures: Vec<String>,
    /// Requests sent again after a reload closed their idle connection.
    resent: u64,
}

/// Whether a request failed because the server closed the (idle,
/// reused) connection before answering, with nothing of it processed.
fn closed_idle_connection(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let incomplete = cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_incomplete_message());
        let reset = cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
        if incomplete || reset {
            return true;
        }
        source = cause.source();
    }
    false
}

/// How many times a request is sent again after a reload closed the
/// connection it went out on: the client's pool may hold several
/// connections the same reload closes.
const RESENDS: usize = 3;

/// Steady load on `host` through Caddy from `clients` loops, until `stop`
/// (or a bound of 60 s and 100,000 requests).
fn steady_load(
    caddy: &Caddy,
    host: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Tally>>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let url = format!("http://127.0.0.1:{}/", caddy.http_port);
    let started = Instant::now();
    let tasks = (0..clients)
        .map(|_| {
            let (tally, stop, url, host) =
                (tally.clone(), stop.clone(), url.clone(), host.to_string());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                for _ in 0..100_000 / clients {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    let mut answer = client.get(&url).header("Host", &host).send().await;
                    for _ in 0..RESENDS {
                        if !answer.as_ref().is_err_and(closed_idle_connection) {
                            break;
                        }
                        // Caddy closed an idle keep-alive connection as it
                        // reloaded, and this request raced it; browsers
                        // send such a request again, and so does the load.
                        tally.lock().unwrap().resent += 1;
                        answer = client.get(&url).header("Host", &host).send().await;
                    }
                    let outcome = match answer {
                        Ok(response) if response.status().is_success() => {
                            Ok(response.text().await.unwrap_or_default())
                        }
                        Ok(response) => Err(format!("status {}", response.status())),
                        Err(error) => {
                            let mut chain = format!("request failed: {error}");
                            let mut source = std::error::Error::source(&error);
                            while let Some(cause) = source {
                                chain.push_str(&format!(": {cause}"));
                                source = cause.source();
                            }
                            Err(chain)
                        }
                    };
                    let mut tally = tally.lock().unwrap();
                    match outcome {
                        Ok(body) => *tally.answers.entry(body).or_default() += 1,
                        Err(failure) => {
                            let phase = PHASE.lock().unwrap().clone();
                            tally.failures.push(format!("[{phase}] {failure}"))
                        }
                    }
                }
            })
        })
        .collect();
    (tally, tasks)
}

fn answered(tally: &Mutex<Tally>, body: &str) -> u64 {
    tally
        .lock()
        .unwrap()
        .answers
        .get(body)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_replacement_under_load_fails_no_request() {
    rolling_replacement(Upstreams::Static).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_replacement_with_dynamic_upstreams_fails_no_request() {
    rolling_replacement(Upstreams::Dynamic).await;
}

/// `UPSTREAMS`, as a test runs the applier with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstreams {
    Static,
    Dynamic,
}

async fn rolling_replacement(mode: Upstreams) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, _) = start_applier_with(&nats, &caddy, "deploys", |config| {
        if mode == Upstreams::Dynamic {
            config.translate.dynamic_upstreams = Some(dynamic_upstreams());
        }
    });
    let publisher = start_publisher(&nats, &format!("deploys-{id}"), &id, "127.0.0.1");
    let domain = format!("{id}.deploys.test");
    let labels = web_labels(&domain, &id);

    let mut current = start_draining_backend(&labels, "v0").await;
    caddy
        .wait_serving(&domain, "v0", Duration::from_secs(30))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, load) = steady_load(&caddy, &domain, 4, stop.clone());

    for version in 1..=3 {
        let body = format!("v{version}");
        phase(format!("starting {body}"));
        let next = start_draining_backend(&labels, &body).await;
        phase(format!("started {body}"));
        // Routed: the load gets answers from it.
        wait_for(
            &format!("{body} to be routed"),
            Duration::from_secs(30),
            || async { (answered(&tally, &body) > 0).then_some(()) },
        )
        .await;
        // `docker stop`: SIGTERM, the drain, then exit.
        let old = std::mem::replace(&mut current, next);
        phase(format!("stopping old for {body}"));
        old.stop().await.expect("stop the old backend");
        phase(format!("stopped old for {body}"));
        // Requests go on after it exited, all answered by the new one.
        let after = answered(&tally, &body);
        wait_for(
            "more answers after the old backend exited",
            Duration::from_secs(30),
            || async { (answered(&tally, &body) >= after + 200).then_some(()) },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    publisher.stop().await;
    applier.stop().await;
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let total: u64 = tally.answers.values().sum();
    println!(
        "deploys ({mode:?} upstreams): {total} answered {:?}, {} failed, {} sent again after a reload closed their idle connection",
        tally.answers,
        tally.failures.len(),
        tally.resent
    );
    assert!(total > 800, "too little load to tell: {total}");
    if !tally.failures.is_empty() {
        panic!(
            "{} of {} requests failed during the replacements: {:?}\nCaddy's errors:\n{}",
            tally.failures.len(),
            total + tally.failures.len() as u64,
            &tally.failures,
            caddy_errors(&caddy).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applier_killed_under_load_fails_no_request() {
    applier_killed_under_load(Upstreams::Static).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applier_killed_under_load_with_dynamic_upstreams_fails_no_request() {
    applier_killed_under_load(Upstreams::Dynamic).await;
}

async fn applier_killed_under_load(mode: Upstreams) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let id = unique();
    // The DNS address stays the same across restarts, as a deployment's
    // UPSTREAM_DNS_LISTEN does: Caddy's config names it.
    let settings = match mode {
        Upstreams::Static => vec![],
        Upstreams::Dynamic => vec![
            ("UPSTREAMS", "dynamic".to_string()),
            ("UPSTREAM_DNS_LISTEN", format!("127.0.0.1:{}", free_port())),
        ],
    };
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let backend = start_backend(&[], "steady").await;
    let port = backend.get_host_port_ipv4(80).await.expect("backend port");
    let js = caddy_fleet::nats::async_nats::jetstream::new(nats.client().await);
    let domain = format!("{id}.kill.test");
    let agent = format!("kill-{id}");
    publish_batched(
        &js,
        std::iter::once(synthetic_up(
            &agent,
            "c0",
            &domain,
            "127.0.0.1",
            Some(port),
            caddy_fleet::schema::ContainerState::Running,
        )),
        "kill",
    )
    .await;
    let dir = std::env::temp_dir().join(format!("caddy-fleet-kill-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("Caddyfile");
    std::fs::write(&base, caddy.base_caddyfile()).unwrap();
    let mut applier = ApplierProcess::start_with(&nats, &caddy, "kill", &base, &settings);
    caddy
        .wait_serving(&domain, "steady", Duration::from_secs(60))
        .await;
    let status = get_json(&format!("{}/status", applier.status))
        .await
        .expect("the applier's /status");
    let expected = match mode {
        Upstreams::Static => "static",
        Upstreams::Dynamic => "dynamic",
    };
    assert_eq!(status["routes"][0]["upstreams_mode"], expected, "{status}");
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, load) = steady_load(&caddy, &domain, 4, stop.clone());
    // Steady: Caddy holds its connections to the backend. With dynamic
    // upstreams a new connection needs the applier's DNS answer for the
    // target's address, so one opened while the applier is down waits
    // (PROXY_TRY_DURATION) for it to be back; open ones carry on.
    wait_for("the load to be steady", Duration::from_secs(30), || async {
        (answered(&tally, "steady") >= 200).then_some(())
    })
    .await;
    for round in 0..3 {
        phase(format!("killing the applier ({round})"));
        let before = answered(&tally, "steady");
        applier.kill();
        // Caddy goes on serving without it.
        wait_for(
            "answers while the applier is down",
            Duration::from_secs(30),
            || async { (answered(&tally, "steady") >= before + 200).then_some(()) },
        )
        .await;
        phase(format!("restarting the applier ({round})"));
        applier = ApplierProcess::start_with(&nats, &caddy, "kill", &base, &settings);
        let log = caddy_fleet::nats::ensure_stream(&js, &Default::default())
            .await
            .expect("the log");
        let last = log.cached_info().state.last_sequence;
        applier.caught_up(last, Duration::from_secs(60)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    applier.kill();
    let _ = std::fs::remove_dir_all(&dir);
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let total: u64 = tally.answers.values().sum();
    println!(
        "applier killed under load ({mode:?} upstreams): {total} answered, {} failed, {} sent again after a reload closed their idle connection",
        tally.failures.len(),
        tally.resent
    );
    assert!(total > 600, "too little load to tell: {total}");
    if !tally.failures.is_empty() {
        panic!(
            "{} requests failed while the applier was killed and restarted: {:?}\nCaddy's errors:\n{}",
            tally.failures.len(),
            &tally.failures,
            caddy_errors(&caddy).await
        );
    }
}

/// Caddy's last error lines: why a request failed (a dial refused, no
/// upstream, a lookup that failed).
async fn caddy_errors(caddy: &Caddy) -> String {
    caddy
        .log_lines(|l| l.contains("\"level\":\"error\""), 20)
        .await
}
