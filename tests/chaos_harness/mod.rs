//! The chaos harness, shared by `tests/chaos.rs` (moderate size, in the
//! README's test command) and `benches/chaos.rs` (longer).
//!
//! - [`Cluster`]: three NATS nodes (JetStream, file storage) from the
//!   offline image on two private Docker networks the harness creates:
//!   one for clients, one for the cluster's routes (so a node can be cut
//!   from the others while clients still reach it). Nodes have fixed
//!   addresses, so a restarted node is where it was.
//! - [`Fleet`]: synthetic containers on two agents. Each has its own
//!   backend on loopback answering its own ID, and its agent sends its
//!   facts the way a publisher does (an outbox drained by `run_sender`,
//!   retrying with the same message ID), the second agent through a
//!   [`Cut`] it can be cut off by.
//! - [`ApplierProcess`]: `caddy-fleet applier` as its own process, so it
//!   can be killed with SIGKILL.
//! - The checker probes every site through Caddy: `lost` counts routable
//!   containers that never answer, `phantom` answers from containers that
//!   are gone, and `failed_probes` failures of the sites churn never
//!   touches while a scenario runs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caddy_fleet::nats::async_nats::{self, jetstream};
use caddy_fleet::nats::{EventPublisher, StreamSettings};
use caddy_fleet::publisher::outbox::{run_sender, Outbox, OutboxSink};
use caddy_fleet::publisher::EventSink;
use caddy_fleet::schema::{AgentId, ContainerDown, ContainerState, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Runs `docker` with `args`; its trimmed stdout, or `None` on failure.
fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A three-node NATS cluster on private networks.
pub struct Cluster {
    clients: String,
    routes: String,
    /// Node names, client addresses and route addresses.
    pub nodes: Vec<(String, String, String)>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        ensure_images();
        let id = unique();
        let label = format!("caddy-fleet-chaos={id}");
        // Two private /24s; a collision with a network that exists loses a
        // race, so another pair is tried.
        let seed = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        let (clients, routes, client_net, route_net) = (0..20)
            .find_map(|attempt| {
                let n = seed.wrapping_add(attempt * 7919);
                let client_net = format!("10.{}.{}", 30 + n % 90, (n / 90) % 250);
                let route_net = format!("10.{}.{}", 130 + n % 90, (n / 90) % 250);
                let clients = format!("chaos-clients-{id}-{attempt}");
                let routes = format!("chaos-routes-{id}-{attempt}");
                let subnet = |net: &str| format!("{net}.0/24");
                docker(&[
                    "network",
                    "create",
                    "--label",
                    &label,
                    "--subnet",
                    &subnet(&client_net),
                    &clients,
                ])?;
                if docker(&[
                    "network",
                    "create",
                    "--label",
                    &label,
                    "--subnet",
                    &subnet(&route_net),
                    &routes,
                ])
                .is_none()
                {
                    let _ = docker(&["network", "rm", &clients]);
                    return None;
                }
                Some((clients, routes, client_net, route_net))
            })
            .expect("create the chaos networks");
        let nodes: Vec<(String, String, String)> = (0..3)
            .map(|n| {
                (
                    format!("chaos-{id}-n{n}"),
                    format!("{client_net}.{}", n + 10),
                    format!("{route_net}.{}", n + 10),
                )
            })
            .collect();
        let seeds: Vec<String> = nodes
            .iter()
            .map(|(_, _, r)| format!("nats://{r}:6222"))
            .collect();
        for (name, client_ip, route_ip) in &nodes {
            let image = format!("{}:{}", NATS_IMAGE.0, NATS_IMAGE.1);
            docker(&[
                "create",
                "--name",
                name,
                "--label",
                &label,
                "--network",
                &clients,
                "--ip",
                client_ip,
                &image,
                "-js",
                "-sd",
                "/data",
                "-n",
                name,
                "--cluster_name",
                "chaos",
                "--cluster",
                &format!("nats://{route_ip}:6222"),
                "--routes",
                &seeds.join(","),
                "--no_advertise",
                "-a",
                "0.0.0.0",
                "-p",
                "4222",
            ])
            .expect("create a NATS node");
            docker(&["network", "connect", "--ip", route_ip, &routes, name])
                .expect("connect a node to the routes network");
            docker(&["start", name]).expect("start a NATS node");
        }
        let cluster = Cluster {
            clients,
            routes,
            nodes,
        };
        // Ready: JetStream answers with an R3 meta group.
        wait_for(
            "the NATS cluster to form",
            Duration::from_secs(60),
            || async {
                let connecting = async_nats::connect(cluster.urls());
                let client = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                    Ok(Ok(client)) => client,
                    Ok(Err(e)) => {
                        eprintln!("cluster: {e}");
                        return None;
                    }
                    Err(_) => {
                        eprintln!("cluster: connect timed out");
                        return None;
                    }
                };
                let js = jetstream::new(client);
                let probe = format!("PROBE_{}", unique());
                let created = js
                    .create_stream(jetstream::stream::Config {
                        name: probe.clone(),
                        subjects: vec![format!("probe.{probe}")],
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = created {
                    eprintln!("cluster: {e}");
                    return None;
                }
                let _ = js.delete_stream(&probe).await;
                Some(())
            },
        )
        .await;
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, c, _)| format!("nats://{c}:4222"))
            .collect()
    }

    /// A JetStream context on the cluster, once an applier created the log.
    pub async fn log_created(&self) -> jetstream::Context {
        let admin = jetstream::new(self.client().await);
        wait_for(
            "the applier to create the log",
            Duration::from_secs(60),
            || async { admin.get_stream("CADDY_FLEET").await.ok().map(|_| ()) },
        )
        .await;
        admin
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.urls())
            .await
            .expect("connect to the cluster")
    }

    /// The node leading `stream`, by name.
    pub async fn leader(&self, js: &jetstream::Context, stream: &str) -> Option<String> {
        let mut stream = js.get_stream(stream).await.ok()?;
        stream.info().await.ok()?.cluster.as_ref()?.leader.clone()
    }

    pub fn kill(&self, node: &str) {
        docker(&["kill", node]).expect("kill a node");
    }

    pub fn start_node(&self, node: &str) {
        docker(&["start", node]).expect("restart a node");
    }

    /// Cuts `node` from the others (clients still reach it).
    pub fn partition(&self, node: &str) {
        docker(&["network", "disconnect", &self.routes, node]).expect("cut a node");
    }

    pub fn heal(&self, node: &str) {
        let route_ip = &self
            .nodes
            .iter()
            .find(|(n, _, _)| n == node)
            .expect("node")
            .2;
        docker(&["network", "connect", "--ip", route_ip, &self.routes, node])
            .expect("rejoin a node");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (name, _, _) in &self.nodes {
            let _ = docker(&["rm", "-f", "-v", name]);
        }
        let _ = docker(&["network", "rm", &self.clients]);
        let _ = docker(&["network", "rm", &self.routes]);
    }
}

/// A loopback TCP forwarder that can be cut: while cut, connections are
/// closed and new ones refused (closed at once).
pub struct Cut {
    /// One local port per target.
    pub ports: Vec<u16>,
    cut: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Cut {
    /// Forwards one local port to each of `targets` (so a client given
    /// every port fails over as it would between the real addresses).
    pub async fn start(targets: Vec<(String, u16)>) -> Cut {
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let mut ports = Vec::new();
        for target in targets {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let (c, g) = (cut.clone(), generation.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if c.load(Ordering::SeqCst) {
                        continue;
                    }
                    let (target, g) = (target.clone(), g.clone());
                    let born = g.load(Ordering::SeqCst);
                    tokio::spawn(async move {
                        let Ok(mut server) =
                            TcpStream::connect((target.0.as_str(), target.1)).await
                        else {
                            return;
                        };
                        let watch = async {
                            while g.load(Ordering::SeqCst) == born {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        };
                        tokio::select! {
                            // Forwarding until either side closes.
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            // Cut: drop both ends.
                            () = watch => {}
                        }
                    });
                }
            });
        }
        Cut {
            ports,
            cut,
            generation,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn reconnect(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A backend on loopback answering `body` to any request.
async fn backend(body: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

/// One synthetic container: its agent, site and backend port.
#[derive(Clone)]
struct Slot {
    agent: usize,
    name: String,
    domain: String,
    port: u16,
}

/// Two agents' synthetic containers, and what the log should make of them.
pub struct Fleet {
    pub id: String,
    agents: Vec<AgentId>,
    sinks: Vec<tokio::sync::Mutex<OutboxSink>>,
    slots: Vec<Slot>,
    /// Which slots are up.
    up: Mutex<Vec<bool>>,
    /// Slots churn never touches: probed during scenarios.
    pub stable: usize,
    pub events: AtomicU64,
    rng: Mutex<u64>,
    pub cut: Cut,
    /// The applier's `/status`, for what a wrong ending looks like there.
    pub status: Mutex<Option<String>>,
    outboxes: Vec<Arc<Outbox>>,
    _senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// `size` containers over two agents (the first `stable` never change),
    /// all up. The second agent reaches NATS only through `cut`.
    pub async fn start(
        cluster: &Cluster,
        settings: &StreamSettings,
        size: usize,
        stable: usize,
    ) -> Fleet {
        let id = unique();
        let agents: Vec<AgentId> = (0..2)
            .map(|a| AgentId::new(format!("chaos{a}-{id}")).unwrap())
            .collect();
        let admin = jetstream::new(cluster.client().await);
        for agent in &agents {
            caddy_fleet::nats::ensure_agent_stream(&admin, settings, agent)
                .await
                .expect("create an ingest stream");
        }
        let cut = Cut::start(
            cluster
                .nodes
                .iter()
                .map(|(_, client_ip, _)| (client_ip.clone(), 4222))
                .collect(),
        )
        .await;
        let mut sinks = Vec::new();
        let mut senders = Vec::new();
        let mut outboxes = Vec::new();
        for (a, agent) in agents.iter().enumerate() {
            let urls = if a == 0 {
                cluster.urls()
            } else {
                cut.ports
                    .iter()
                    .map(|port| format!("nats://127.0.0.1:{port}"))
                    .collect()
            };
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .max_reconnects(None)
                .connect(urls)
                .await
                .expect("connect an agent");
            let js = jetstream::new(client);
            let outbox = Arc::new(Outbox::default());
            outboxes.push(outbox.clone());
            let nonce = unique();
            senders.push(tokio::spawn(run_sender(
                outbox.clone(),
                EventPublisher::new(js.clone(), agent.clone(), nonce.clone()),
                Duration::from_secs(3),
                std::future::pending(),
            )));
            sinks.push(tokio::sync::Mutex::new(OutboxSink::new(
                outbox,
                EventPublisher::new(js, agent.clone(), nonce),
            )));
        }
        let mut slots = Vec::new();
        for i in 0..size {
            let agent = i % 2;
            let name = format!("c{i}");
            slots.push(Slot {
                agent,
                domain: format!("{name}.{id}.test"),
                port: backend(format!("{}/{name}", agents[agent])).await,
                name,
            });
        }
        let fleet = Fleet {
            id,
            agents,
            sinks,
            up: Mutex::new(vec![false; slots.len()]),
            slots,
            stable,
            events: AtomicU64::new(0),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
            cut,
            status: Mutex::new(None),
            outboxes,
            _senders: senders,
        };
        for i in 0..fleet.slots.len() {
            fleet.set(i, true).await;
        }
        fleet
    }

    async fn set(&self, i: usize, up: bool) {
        let slot = &self.slots[i];
        let agent = &self.agents[slot.agent];
        let event = if up {
            synthetic_up(
                agent.as_str(),
                &slot.name,
                &slot.domain,
                "127.0.0.1",
                Some(slot.port),
                ContainerState::Running,
            )
        } else {
            Event::Down(ContainerDown {
                agent: agent.clone(),
                id: slot.name.clone(),
                observed_at_ms: 0,
            })
        };
        self.sinks[slot.agent]
            .lock()
            .await
            .publish(&event)
            .await
            .expect("hand over to the outbox");
        self.up.lock().unwrap()[i] = up;
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    fn next(&self, below: usize) -> usize {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x % below as u64) as usize
    }

    /// `events` changes to the non-stable containers, `pause` apart.
    pub async fn churn(&self, events: usize, pause: Duration) {
        for _ in 0..events {
            let i = self.stable + self.next(self.slots.len() - self.stable);
            let up = !self.up.lock().unwrap()[i];
            self.set(i, up).await;
            tokio::time::sleep(pause).await;
        }
    }

    /// (lost, phantom) now, through Caddy.
    pub async fn check(&self, caddy: &Caddy) -> (usize, usize) {
        let wrong = self.wrong(caddy).await;
        let lost = wrong.iter().filter(|w| w.starts_with("lost")).count();
        (lost, wrong.len() - lost)
    }

    /// Every container Caddy is wrong about: `lost <agent>/<name>` or
    /// `phantom <agent>/<name>`.
    pub async fn wrong(&self, caddy: &Caddy) -> Vec<String> {
        let up = self.up.lock().unwrap().clone();
        let mut wrong = Vec::new();
        for (slot, up) in self.slots.iter().zip(up) {
            let own = format!("{}/{}", self.agents[slot.agent], slot.name);
            let answer = caddy.get(&slot.domain).await;
            let answered = answer
                .as_ref()
                .is_some_and(|(status, body)| *status == 200 && *body == own);
            if up && !answered {
                wrong.push(format!("lost {own}"));
            }
            if !up && answered {
                wrong.push(format!("phantom {own}"));
            }
        }
        wrong
    }

    /// A heartbeat from every agent (a publisher sends one now and then).
    pub async fn heartbeat(&self) {
        for (sink, agent) in self.sinks.iter().zip(&self.agents) {
            let beat = Event::Heartbeat(caddy_fleet::schema::Heartbeat {
                agent: agent.clone(),
                sent_at_ms: 0,
            });
            sink.lock()
                .await
                .publish(&beat)
                .await
                .expect("hand over to the outbox");
        }
    }

    /// Messages each agent's outbox still holds.
    pub fn unsent(&self) -> Vec<usize> {
        self.outboxes.iter().map(|o| o.len()).collect()
    }

    /// Probes the stable sites until `stop`; returns how many probes failed.
    pub async fn probe_stable(&self, caddy: &Caddy, stop: &AtomicBool) -> u64 {
        let mut failed = 0;
        while !stop.load(Ordering::SeqCst) {
            for slot in &self.slots[..self.stable] {
                let own = format!("{}/{}", self.agents[slot.agent], slot.name);
                if caddy
                    .get(&slot.domain)
                    .await
                    .is_none_or(|(s, b)| s != 200 || b != own)
                {
                    failed += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        failed
    }
}

/// `caddy-fleet applier` as its own process.
pub struct ApplierProcess {
    child: Option<Child>,
    args: Vec<(String, String)>,
    /// Every run's stderr, appended.
    log: std::path::PathBuf,
}

impl ApplierProcess {
    pub fn start(cluster: &Cluster, caddy: &Caddy, name: &str) -> ApplierProcess {
        ApplierProcess::start_with(cluster, caddy, name, &[])
    }

    /// [`ApplierProcess::start`] with more settings (`KEY`, value).
    pub fn start_with(
        cluster: &Cluster,
        caddy: &Caddy,
        name: &str,
        extra: &[(&str, &str)],
    ) -> ApplierProcess {
        let dir = std::env::temp_dir().join(format!("caddy-fleet-chaos-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("Caddyfile");
        std::fs::write(&base, caddy.base_caddyfile()).unwrap();
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, "[default]\ndomains = [\"*\"]\ntrusted = true\n").unwrap();
        let args = vec![
            ("NATS_URL".to_string(), cluster.urls().join(",")),
            ("STREAM_REPLICAS".to_string(), "3".to_string()),
            ("CADDY_API_URL".to_string(), caddy.admin_url()),
            (
                "CADDY_BASE_CADDYFILE".to_string(),
                base.display().to_string(),
            ),
            ("POLICY_FILE".to_string(), policy.display().to_string()),
            ("APPLIER_NAME".to_string(), name.to_string()),
            (
                "STATUS_LISTEN".to_string(),
                format!("127.0.0.1:{}", free_port()),
            ),
            ("RUST_LOG".to_string(), "warn".to_string()),
        ];
        let args = args
            .into_iter()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let mut applier = ApplierProcess {
            child: None,
            args,
            log: dir.join("applier.log"),
        };
        applier.spawn();
        applier
    }

    /// The applier's status endpoints.
    pub fn status_url(&self) -> String {
        let listen = self
            .args
            .iter()
            .find(|(k, _)| k == "STATUS_LISTEN")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        format!("http://{listen}")
    }

    fn spawn(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the applier's log");
        let errors = log.try_clone().expect("share the applier's log");
        command
            .arg("applier")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(errors));
        for (k, v) in &self.args {
            command.env(k, v);
        }
        self.child = Some(command.spawn().expect("start caddy-fleet applier"));
    }

    /// How many lines of the applier's log (every run) contain `text`.
    pub fn log_lines(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|log| log.lines().filter(|l| l.contains(text)).count())
            .unwrap_or(0)
    }

    /// SIGKILL, then a new process with the same settings.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn();
    }
}

impl Drop for ApplierProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The outcome of one scenario.
pub struct Outcome {
    /// Counted once the scenario had 30 s to converge.
    pub lost: usize,
    pub phantom: usize,
    /// Right in the end (within 90 s): nothing lost for good, however late.
    pub settled: bool,
}

/// Runs `disrupt` while the fleet churns `events` changes and the stable
/// sites are probed; then waits at most 30 s for Caddy to serve exactly
/// the fleet's containers, and prints the scenario's line.
pub async fn scenario<F: std::future::Future<Output = usize>>(
    name: &str,
    fleet: &Fleet,
    caddy: &Caddy,
    events: usize,
    pause: Duration,
    disrupt: F,
) -> Outcome {
    let before = fleet.events.load(Ordering::Relaxed);
    let stop = AtomicBool::new(false);
    let probing = fleet.probe_stable(caddy, &stop);
    let work = async {
        let (_, kills) = tokio::join!(fleet.churn(events, pause), disrupt);
        stop.store(true, Ordering::SeqCst);
        kills
    };
    let (failed_probes, kills) = tokio::join!(probing, work);
    let started = Instant::now();
    let mut outcome = fleet.check(caddy).await;
    while (outcome.0 > 0 || outcome.1 > 0) && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        outcome = fleet.check(caddy).await;
    }
    let converge_s = started.elapsed().as_secs_f64();
    let mut settled = true;
    if outcome != (0, 0) {
        let url = fleet.status.lock().unwrap().clone();
        let status = match url {
            Some(url) => get_json(&format!("{url}/status")).await,
            None => None,
        };
        let applier = status.map(|s| {
            format!(
                "folded_seq={} pushed_seq={} consumer_lag={} converged={}",
                s["folded_seq"], s["last_seq"], s["consumer_lag"], s["converged"]
            )
        });
        println!(
            "chaos: {name} still wrong: {:?}; unsent per agent: {:?}; applier: {applier:?}",
            fleet.wrong(caddy).await,
            fleet.unsent()
        );
        // Late or never: how long until it is right (the outcome counts
        // as wrong either way).
        let late = Instant::now();
        while fleet.check(caddy).await != (0, 0) && late.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        settled = fleet.check(caddy).await == (0, 0);
        println!(
            "chaos: {name} right again {:.2} s after the scenario ({})",
            late.elapsed().as_secs_f64() + converge_s,
            if settled {
                "late"
            } else {
                "never, within 90 s"
            }
        );
    }
    let events = fleet.events.load(Ordering::Relaxed) - before;
    println!(
        "chaos: {name} events={events} kills={kills} lost={} phantom={} failed_probes={failed_probes} converge_s={converge_s:.2}",
        outcome.0, outcome.1
    );
    Outcome {
        lost: outcome.0,
        phantom: outcome.1,
        settled,
    }
}

/// What the applier logs when it restarts a stalled source of the log.
const SOURCE_RESTARTED: &str = "sourcing of an ingest stream stalled";

/// Prints how many stalled sources the applier restarted during scenario
/// `name` (its log lines since `before`); returns the count so far.
fn report_source_restarts(name: &str, applier: &ApplierProcess, before: usize) -> usize {
    let now = applier.log_lines(SOURCE_RESTARTED);
    println!("chaos: {name} source_restarts={}", now - before);
    now
}

/// Every scenario, each with `events` changes; returns the outcomes by name.
pub async fn run_all(events: usize, cut_for: Duration) -> BTreeMap<&'static str, Outcome> {
    let (cluster, caddy) = tokio::join!(Cluster::start(), Caddy::start());
    let settings = StreamSettings {
        replicas: 3,
        ..StreamSettings::default()
    };
    let mut applier = ApplierProcess::start(&cluster, &caddy, "chaos");
    let admin = cluster.log_created().await;
    let fleet = Fleet::start(&cluster, &settings, 40, 6).await;
    *fleet.status.lock().unwrap() = Some(applier.status_url());
    wait_for(
        "the fleet to be served",
        Duration::from_secs(60),
        || async { (fleet.check(&caddy).await == (0, 0)).then_some(()) },
    )
    .await;
    let mut outcomes = BTreeMap::new();
    let mut restarts_since = 0;
    let pause = Duration::from_millis(15);
    // Churn alone, for comparison.
    outcomes.insert(
        "baseline",
        scenario("baseline", &fleet, &caddy, events / 3, pause, async { 0 }).await,
    );
    restarts_since = report_source_restarts("baseline", &applier, restarts_since);

    let kill_leader = async {
        let mut kills = 0;
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let leader = wait_for("a log leader", Duration::from_secs(30), || async {
                cluster.leader(&admin, "CADDY_FLEET").await
            })
            .await;
            cluster.kill(&leader);
            kills += 1;
            wait_for("a new log leader", Duration::from_secs(30), || async {
                cluster
                    .leader(&admin, "CADDY_FLEET")
                    .await
                    .filter(|l| *l != leader)
            })
            .await;
            cluster.start_node(&leader);
        }
        kills
    };
    outcomes.insert(
        "leader_killed",
        scenario("leader_killed", &fleet, &caddy, events, pause, kill_leader).await,
    );
    restarts_since = report_source_restarts("leader_killed", &applier, restarts_since);

    let partition = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let node = cluster.nodes[2].0.clone();
        cluster.partition(&node);
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.heal(&node);
        1
    };
    outcomes.insert(
        "node_partitioned",
        scenario("node_partitioned", &fleet, &caddy, events, pause, partition).await,
    );
    restarts_since = report_source_restarts("node_partitioned", &applier, restarts_since);

    let applier_kills = async {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(150 + fleet.next(700) as u64)).await;
            applier.kill_and_restart();
        }
        5
    };
    outcomes.insert(
        "applier_sigkill",
        scenario(
            "applier_sigkill",
            &fleet,
            &caddy,
            events,
            pause,
            applier_kills,
        )
        .await,
    );
    restarts_since = report_source_restarts("applier_sigkill", &applier, restarts_since);

    let cut = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fleet.cut.cut();
        tokio::time::sleep(cut_for).await;
        fleet.cut.reconnect();
        1
    };
    outcomes.insert(
        "publisher_cut",
        scenario("publisher_cut", &fleet, &caddy, events, pause, cut).await,
    );
    restarts_since = report_source_restarts("publisher_cut", &applier, restarts_since);

    let restart_caddy = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        docker(&["restart", "-t", "1", caddy.container.id()]).expect("restart Caddy");
        1
    };
    outcomes.insert(
        "caddy_restarted",
        scenario(
            "caddy_restarted",
            &fleet,
            &caddy,
            events,
            pause,
            restart_caddy,
        )
        .await,
    );
    report_source_restarts("caddy_restarted", &applier, restarts_since);
    drop(applier);
    outcomes
}
