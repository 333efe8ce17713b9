//! The `caddy-fleet` binary: parses settings, sets up logging and runs one
//! component from the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use caddy_fleet::applier::{ApplierConfig, StatusBoard};
use caddy_fleet::nats::{NatsAuth, NatsConfig, NatsTls, StreamSettings};
use caddy_fleet::publisher::{FilterLabel, PublisherConfig};
use caddy_fleet::schema::translate::LocalNetwork;
use caddy_fleet::schema::AgentId;
use clap::{Args, Parser, Subcommand};

/// One Caddy front door for a fleet of plain Docker hosts, driven by container labels.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch this host's Docker engine and publish container facts to NATS (agent mode).
    Publisher(PublisherArgs),
    /// Read the log from NATS and converge Caddy to it.
    Applier(ApplierArgs),
    /// Print the Caddyfile that labels translate to (for debugging labels).
    Labels(LabelsArgs),
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
    /// With --container: the address its published ports are reached at.
    #[arg(long, env = "HOST_IP", default_value = "127.0.0.1")]
    host_ip: String,
    /// The label prefix.
    #[arg(long, env = "DOCKER_LABEL_PREFIX", default_value = "caddy")]
    label_prefix: String,
}

#[derive(Args)]
struct NatsArgs {
    /// NATS server URLs, comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: Vec<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, env = "NATS_CREDS_FILE")]
    nats_creds_file: Option<PathBuf>,
    /// Require TLS to NATS.
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    nats_tls_required: bool,
    /// CA bundle for the NATS server certificate.
    #[arg(long, env = "NATS_TLS_CA")]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate for NATS.
    #[arg(long, env = "NATS_TLS_CERT")]
    nats_tls_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, env = "NATS_TLS_KEY")]
    nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    fn config(&self, name: String) -> anyhow::Result<NatsConfig> {
        let auth = match (&self.nats_token, &self.nats_user, &self.nats_password, &self.nats_creds_file) {
            (None, None, None, None) => NatsAuth::None,
            (Some(token), None, None, None) => NatsAuth::Token { token: token.clone() },
            (None, Some(user), Some(password), None) => NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, None, Some(path)) => NatsAuth::CredentialsFile { path: path.clone() },
            _ => anyhow::bail!(
                "set exactly one NATS authentication: NATS_TOKEN, NATS_USER with NATS_PASSWORD, or NATS_CREDS_FILE"
            ),
        };
        Ok(NatsConfig {
            urls: self.nats_url.clone(),
            auth,
            tls: NatsTls {
                required: self.nats_tls_required,
                ca_file: self.nats_tls_ca.clone(),
                cert_file: self.nats_tls_cert.clone(),
                key_file: self.nats_tls_key.clone(),
            },
            name: Some(name),
            retry_initial_connect: false,
        })
    }
}

#[derive(Args)]
struct PublisherArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// This host's agent ID [default: the hostname, sanitised].
    #[arg(long, env = "AGENT_ID")]
    agent_id: Option<String>,
    /// The address (IP or DNS name) other hosts reach this host's
    /// published ports at [default: the address of the default route's interface].
    #[arg(long, env = "HOST_IP")]
    host_ip: Option<String>,
    /// Only containers with labels under this prefix are published.
    #[arg(long, env = "DOCKER_LABEL_PREFIX", default_value = "caddy")]
    label_prefix: String,
    /// Only containers carrying this label (key or key=value) are published.
    #[arg(long, env = "AGENT_FILTER_LABEL")]
    filter_label: Option<FilterLabel>,
    /// How often the full set of live containers is re-sent (e.g. 5m).
    #[arg(long, env = "SYNC_INTERVAL", value_parser = parse_duration, default_value = "5m")]
    sync_interval: Duration,
    /// How often a heartbeat is sent (e.g. 10s).
    #[arg(long, env = "HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    heartbeat_interval: Duration,
}

#[derive(Args)]
struct ApplierArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Caddy's admin API.
    #[arg(long, env = "CADDY_API_URL", default_value = "http://127.0.0.1:2019")]
    caddy_api_url: String,
    /// The Caddyfile Caddy runs with, merged in front of the generated sites.
    #[arg(long, env = "CADDY_BASE_CADDYFILE")]
    base_caddyfile: Option<PathBuf>,
    /// This applier's durable consumer name [default: the hostname, sanitised].
    #[arg(long, env = "APPLIER_NAME")]
    applier_name: Option<String>,
    /// The label prefix to translate.
    #[arg(long, env = "DOCKER_LABEL_PREFIX", default_value = "caddy")]
    label_prefix: String,
    /// The agent whose containers share a Docker network with Caddy (the
    /// publisher on Caddy's own host); they are reached at their IP on
    /// --ingress-network instead of a published port.
    #[arg(long, env = "LOCAL_AGENT_ID", requires = "ingress_network")]
    local_agent_id: Option<String>,
    /// The Docker network Caddy shares with the local agent's containers.
    #[arg(long, env = "CADDY_INGRESS_NETWORK", requires = "local_agent_id")]
    ingress_network: Option<String>,
    /// Where /healthz, /readyz, /metrics and /status are served.
    #[arg(long, env = "STATUS_LISTEN", default_value = "127.0.0.1:9180")]
    status_listen: std::net::SocketAddr,
    /// Remove an agent's routes after this long without hearing from it
    /// (e.g. 90s, 5m). Off by default: its routes stay and /status marks it stale.
    #[arg(long, env = "AGENT_TTL", value_parser = parse_duration)]
    agent_ttl: Option<Duration>,
    /// Push once no event arrived for this long (e.g. 200ms)…
    #[arg(long, env = "COALESCE_QUIET", value_parser = parse_duration, default_value = "200ms")]
    coalesce_quiet: Duration,
    /// …but at most this long after the first event of a burst.
    #[arg(long, env = "COALESCE_MAX_DELAY", value_parser = parse_duration, default_value = "2s")]
    coalesce_max_delay: Duration,
}

/// Parses `500ms`, `2s`, `5m`, `1h`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 500ms, 30s, 5m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "" | "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        _ => Err(format!(
            "{text:?} is not a duration: write e.g. 500ms, 30s, 5m or 1h"
        )),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutdown requested.");
}

async fn labels(args: LabelsArgs) -> anyhow::Result<()> {
    let caddyfile = match &args.container {
        Some(container) => {
            caddy_fleet::container_caddyfile(
                container,
                &args.label_prefix,
                &args.host_ip,
                args.upstreams,
            )
            .await?
        }
        None => {
            let text = match &args.file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read labels file {}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin())
                    .context("cannot read labels from stdin")?,
            };
            caddy_fleet::labels_caddyfile(
                &text,
                &args.label_prefix,
                args.upstreams.unwrap_or_default(),
            )?
        }
    };
    print!("{caddyfile}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Labels(args) = cli.command {
        // No logging: stdout is the Caddyfile, stderr the error, if any.
        return labels(args).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match cli.command {
        Command::Publisher(args) => {
            let agent = match &args.agent_id {
                Some(id) => AgentId::new(id.clone())?,
                None => AgentId::sanitize(&hostname()),
            };
            let nats = args.nats.config(format!("caddy-fleet-publisher-{agent}"))?;
            let host_ip = match args.host_ip {
                Some(ip) if caddy_fleet::publisher::host::is_valid_address(&ip) => ip,
                Some(ip) => anyhow::bail!("invalid HOST_IP {ip:?}: give an IP address or a DNS name other hosts can reach"),
                None => {
                    let detected = caddy_fleet::publisher::host::detect().context(
                        "cannot detect HOST_IP (no default route); set HOST_IP to the address other hosts reach this one at",
                    )?;
                    tracing::info!(host_ip = %detected, "HOST_IP not set; using the default route's interface address.");
                    detected.to_string()
                }
            };
            let mut config = PublisherConfig::new(agent, host_ip);
            config.label_prefix = args.label_prefix;
            config.filter_label = args.filter_label;
            config.sync_interval = args.sync_interval;
            config.heartbeat_interval = args.heartbeat_interval;
            caddy_fleet::run_publisher(&nats, config, shutdown_signal()).await?;
        }
        Command::Applier(args) => {
            let name = match &args.applier_name {
                Some(name) => AgentId::new(name.clone()).context("invalid APPLIER_NAME")?,
                None => AgentId::sanitize(&hostname()),
            };
            let nats = args.nats.config(format!("caddy-fleet-applier-{name}"))?;
            let mut config = ApplierConfig::new(name.as_str(), args.caddy_api_url);
            config.agent_ttl = args.agent_ttl;
            config.quiet_window = args.coalesce_quiet;
            config.max_delay = args.coalesce_max_delay;
            if let Some(path) = &args.base_caddyfile {
                config.base_caddyfile = Some(std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read CADDY_BASE_CADDYFILE {}", path.display())
                })?);
            }
            config.translate.label_prefix = args.label_prefix;
            if let (Some(agent), Some(network)) = (args.local_agent_id, args.ingress_network) {
                config.translate.local = Some(LocalNetwork {
                    agent: AgentId::new(agent).context("invalid LOCAL_AGENT_ID")?,
                    network,
                });
            }
            let listener = tokio::net::TcpListener::bind(args.status_listen)
                .await
                .with_context(|| {
                    format!("cannot listen on STATUS_LISTEN {}", args.status_listen)
                })?;
            let board = Arc::new(StatusBoard::default());
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = stop.send(true);
            });
            let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|stopped| *stopped).await;
            };
            let status = tokio::spawn(caddy_fleet::serve_status(
                listener,
                board.clone(),
                until_stopped(stopped.clone()),
            ));
            tracing::info!(listen = %args.status_listen, "Status endpoints listening.");
            caddy_fleet::run_applier(
                &nats,
                &StreamSettings::default(),
                config,
                board,
                until_stopped(stopped),
            )
            .await?;
            status.await??;
        }
        Command::Labels(_) => {}
    }
    Ok(())
}
