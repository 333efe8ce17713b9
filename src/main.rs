//! The `caddy-fleet` binary: parses settings, sets up logging and runs one
//! mode from the library.

use std::path::PathBuf;

use anyhow::Context as _;
use caddy_fleet::history::{HistoryFilter, Inspect, ReplayFormat};
use caddy_fleet::settings::{Mode, Settings};
use clap::{Args, Parser, Subcommand};

/// One Caddy front door for a fleet of plain Docker hosts, driven by container labels.
///
/// Every setting comes, in this order of precedence, from a --flag, its
/// environment variable (the flag's name upper-cased with `_`, e.g.
/// NATS_URL), the --config TOML file (lower-cased, e.g. nats_url), or its
/// default. See the README's settings table.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file of settings (keys like `nats_url = "nats://nats:4222"`).
    #[arg(long, global = true, env = "CADDY_FLEET_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    /// What to run; without one, AGENT_MODE decides (default standalone).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// One host, no NATS: watch local Docker and drive the local Caddy.
    Standalone,
    /// The Caddy host: the applier plus a publisher for this host's containers.
    Server,
    /// A Docker host of the fleet: publish container facts to NATS.
    #[command(alias = "agent")]
    Publisher,
    /// Read the log from NATS and converge Caddy to it.
    Applier,
    /// Print the Caddyfile that labels translate to (for debugging labels).
    Labels(LabelsArgs),
    /// The current routing table (from the applier's /status, else the log).
    Routes(JsonArg),
    /// Events touching a domain, agent or container, between two points.
    History(HistoryArgs),
    /// The state at a point of the log, as routes, Caddyfile or Caddy JSON.
    Replay(ReplayArgs),
    /// Routes added, removed and changed between two points.
    Diff(DiffArgs),
    /// Which containers on which agents produce a site, and which are left out and why.
    Explain(ExplainArgs),
}

/// A point in the log: RFC 3339 time, stream sequence, a duration back from now (2h), or `now`.
type PointArg = caddy_fleet::history::Point;

#[derive(Args)]
struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HistoryArgs {
    /// Events of containers that name this domain.
    #[arg(long)]
    domain: Option<String>,
    /// Events of this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Events of this container (ID prefix or name).
    #[arg(long)]
    container: Option<String>,
    /// From this point (RFC 3339, sequence, or a duration back from now such as 2h).
    #[arg(long, default_value = "0")]
    since: PointArg,
    /// Up to this point.
    #[arg(long, default_value = "now")]
    until: PointArg,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Args)]
struct ReplayArgs {
    /// The point: RFC 3339 time, sequence, duration back from now, or `now`.
    #[arg(long)]
    at: PointArg,
    /// routes | caddyfile | json (Caddy JSON, adapted by CADDY_API_URL's /adapt).
    #[arg(long, default_value = "routes")]
    format: String,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Args)]
struct DiffArgs {
    #[arg(long)]
    from: PointArg,
    #[arg(long, default_value = "now")]
    to: PointArg,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Args)]
struct ExplainArgs {
    /// The domain (as in a site address, without scheme).
    domain: String,
    #[arg(long, default_value = "now")]
    at: PointArg,
    #[command(flatten)]
    json: JsonArg,
}

/// Settings as flags; each overrides its environment variable and the file.
#[derive(Args)]
struct Flags {
    /// standalone | server | agent (AGENT_MODE)
    #[arg(long, global = true)]
    agent_mode: Option<String>,
    /// This host's agent ID (AGENT_ID)
    #[arg(long, global = true)]
    agent_id: Option<String>,
    /// Address other hosts reach this host's published ports at (HOST_IP)
    #[arg(long, global = true)]
    host_ip: Option<String>,
    /// Label prefix (DOCKER_LABEL_PREFIX)
    #[arg(long, global = true)]
    docker_label_prefix: Option<String>,
    /// Only containers with this label (AGENT_FILTER_LABEL)
    #[arg(long, global = true)]
    agent_filter_label: Option<String>,
    /// Caddy's admin API (CADDY_API_URL)
    #[arg(long, global = true)]
    caddy_api_url: Option<String>,
    /// The Caddyfile Caddy runs with (CADDY_BASE_CADDYFILE)
    #[arg(long, global = true)]
    caddy_base_caddyfile: Option<String>,
    /// The applier's name (APPLIER_NAME)
    #[arg(long, global = true)]
    applier_name: Option<String>,
    /// Status endpoints address (STATUS_LISTEN)
    #[arg(long, global = true)]
    status_listen: Option<String>,
    /// Remove a silent agent's routes after this long (AGENT_TTL)
    #[arg(long, global = true)]
    agent_ttl: Option<String>,
    /// Push once no event came for this long (COALESCE_QUIET)
    #[arg(long, global = true)]
    coalesce_quiet: Option<String>,
    /// Longest delay of a push in a burst (COALESCE_MAX_DELAY)
    #[arg(long, global = true)]
    coalesce_max_delay: Option<String>,
    /// Full sync period (SYNC_INTERVAL)
    #[arg(long, global = true)]
    sync_interval: Option<String>,
    /// Heartbeat period (HEARTBEAT_INTERVAL)
    #[arg(long, global = true)]
    heartbeat_interval: Option<String>,
    /// Docker network shared with Caddy (CADDY_INGRESS_NETWORK)
    #[arg(long, global = true)]
    caddy_ingress_network: Option<String>,
    /// History kept by the log, e.g. 7d (STREAM_MAX_AGE)
    #[arg(long, global = true)]
    stream_max_age: Option<String>,
    /// Stream replicas (STREAM_REPLICAS)
    #[arg(long, global = true)]
    stream_replicas: Option<String>,
    /// NATS servers, comma-separated (NATS_URL)
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// NATS token (NATS_TOKEN)
    #[arg(long, global = true)]
    nats_token: Option<String>,
    /// NATS user (NATS_USER)
    #[arg(long, global = true)]
    nats_user: Option<String>,
    /// NATS password (NATS_PASSWORD)
    #[arg(long, global = true)]
    nats_password: Option<String>,
    /// NATS credentials file (NATS_CREDS_FILE)
    #[arg(long, global = true)]
    nats_creds_file: Option<String>,
    /// Require TLS to NATS (NATS_TLS_REQUIRED)
    #[arg(long, global = true)]
    nats_tls_required: bool,
    /// CA bundle for NATS (NATS_TLS_CA)
    #[arg(long, global = true)]
    nats_tls_ca: Option<String>,
    /// Client certificate for NATS (NATS_TLS_CERT)
    #[arg(long, global = true)]
    nats_tls_cert: Option<String>,
    /// Client key for NATS (NATS_TLS_KEY)
    #[arg(long, global = true)]
    nats_tls_key: Option<String>,
}

impl Flags {
    fn given(self) -> Vec<(&'static str, String)> {
        let pairs = [
            ("agent_mode", self.agent_mode),
            ("agent_id", self.agent_id),
            ("host_ip", self.host_ip),
            ("docker_label_prefix", self.docker_label_prefix),
            ("agent_filter_label", self.agent_filter_label),
            ("caddy_api_url", self.caddy_api_url),
            ("caddy_base_caddyfile", self.caddy_base_caddyfile),
            ("applier_name", self.applier_name),
            ("status_listen", self.status_listen),
            ("agent_ttl", self.agent_ttl),
            ("coalesce_quiet", self.coalesce_quiet),
            ("coalesce_max_delay", self.coalesce_max_delay),
            ("sync_interval", self.sync_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("caddy_ingress_network", self.caddy_ingress_network),
            ("stream_max_age", self.stream_max_age),
            ("stream_replicas", self.stream_replicas),
            ("nats_url", self.nats_url),
            ("nats_token", self.nats_token),
            ("nats_user", self.nats_user),
            ("nats_password", self.nats_password),
            ("nats_creds_file", self.nats_creds_file),
            (
                "nats_tls_required",
                self.nats_tls_required.then(|| "true".to_string()),
            ),
            ("nats_tls_ca", self.nats_tls_ca),
            ("nats_tls_cert", self.nats_tls_cert),
            ("nats_tls_key", self.nats_tls_key),
        ];
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }
}

#[derive(Args)]
struct LabelsArgs {
    /// A file of `KEY = VALUE` lines (caddy-docker-proxy's test format;
    /// everything after a line of ten dashes is ignored). Default: stdin.
    file: Option<PathBuf>,
    /// Translate the labels of this local container (ID or name) instead.
    #[arg(long, conflicts_with = "file")]
    container: Option<String>,
    /// Addresses standing in for `{{upstreams}}` (e.g. `target`); repeat
    /// the flag or separate addresses with commas.
    #[arg(long, value_delimiter = ',')]
    upstreams: Option<Vec<String>>,
}

/// `caddy-fleet labels`; the label prefix and, with --container, the
/// address of published ports come from the usual settings
/// (DOCKER_LABEL_PREFIX, HOST_IP, default 127.0.0.1).
async fn labels(args: LabelsArgs, flags: Flags) -> anyhow::Result<()> {
    let prefix = flags
        .docker_label_prefix
        .or_else(|| std::env::var("DOCKER_LABEL_PREFIX").ok())
        .unwrap_or_else(|| "caddy".to_string());
    let host_ip = flags
        .host_ip
        .or_else(|| std::env::var("HOST_IP").ok())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let caddyfile = match &args.container {
        Some(container) => {
            caddy_fleet::container_caddyfile(container, &prefix, &host_ip, args.upstreams).await?
        }
        None => {
            let text = match &args.file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read labels file {}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin())
                    .context("cannot read labels from stdin")?,
            };
            caddy_fleet::labels_caddyfile(&text, &prefix, args.upstreams.unwrap_or_default())?
        }
    };
    print!("{caddyfile}");
    Ok(())
}

/// Runs a read-only debugging command and prints its answer.
async fn inspect(
    command: Inspect,
    json: bool,
    config: Option<PathBuf>,
    flags: Flags,
) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let settings = Settings::load(config.as_deref(), &env, &flags.given())?;
    print!(
        "{}",
        caddy_fleet::history::run(command, &settings, json).await?
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("Shutdown requested.");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mode = match cli.command {
        // No logging: stdout is the Caddyfile, stderr the error, if any.
        Some(Command::Labels(args)) => return labels(args, cli.flags).await,
        Some(Command::Standalone) => Some(Mode::Standalone),
        Some(Command::Server) => Some(Mode::Server),
        Some(Command::Publisher) => Some(Mode::Agent),
        Some(Command::Applier) => Some(Mode::Applier),
        Some(Command::Routes(a)) => {
            return inspect(Inspect::Routes, a.json, cli.config, cli.flags).await
        }
        Some(Command::History(a)) => {
            let filter = HistoryFilter {
                domain: a.domain,
                agent: a.agent,
                container: a.container,
            };
            return inspect(
                Inspect::History {
                    filter,
                    since: a.since,
                    until: a.until,
                },
                a.json.json,
                cli.config,
                cli.flags,
            )
            .await;
        }
        Some(Command::Replay(a)) => {
            let format = match a.format.as_str() {
                "routes" => ReplayFormat::Routes,
                "caddyfile" => ReplayFormat::Caddyfile,
                "json" => ReplayFormat::Json,
                other => anyhow::bail!("--format {other:?}: use routes, caddyfile or json"),
            };
            return inspect(
                Inspect::Replay { at: a.at, format },
                a.json.json,
                cli.config,
                cli.flags,
            )
            .await;
        }
        Some(Command::Diff(a)) => {
            return inspect(
                Inspect::Diff {
                    from: a.from,
                    to: a.to,
                },
                a.json.json,
                cli.config,
                cli.flags,
            )
            .await
        }
        Some(Command::Explain(a)) => {
            return inspect(
                Inspect::Explain {
                    domain: a.domain,
                    at: a.at,
                },
                a.json.json,
                cli.config,
                cli.flags,
            )
            .await
        }
        None => None,
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let settings = Settings::load(cli.config.as_deref(), &env, &cli.flags.given())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    caddy_fleet::modes::run(
        mode.unwrap_or(settings.agent_mode),
        &settings,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
