//! The `caddy-fleet` binary: parses the command line and the settings,
//! sets up logging and runs one mode or command from the library.
//!
//! Any error ends the process with exit status 1 and one line on stderr,
//! `error: <what went wrong>`: its Display, never a Debug dump or a
//! backtrace (whatever RUST_BACKTRACE says).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use caddy_fleet::inspect::{Inspect, ReplayFormat};
use caddy_fleet::schema::history::HistoryFilter;
use caddy_fleet::settings::{LogFormat, Mode, Settings, SettingsError};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

/// mimalloc, not glibc's malloc: a push allocates in proportion to the
/// fleet and frees it all, interleaved with what the applier keeps, and
/// glibc kept most of those pages (at 10,000 routes the applier stayed
/// near twice its live heap even with `malloc_trim` after each push).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One Caddy front door for a fleet of plain Docker hosts, driven by container labels.
///
/// Every setting comes, in this order of precedence, from a --flag, its
/// environment variable (the flag's name upper-cased with `_`, e.g.
/// NATS_URL), the --config TOML file (lower-cased, e.g. nats_url), or its
/// default. See the README's settings table.
// (The settings' flags come from `Settings`, which `Settings::command`
// adds to this command.)
#[derive(Parser)]
#[command(version, about)]
struct Cli {
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
    /// A Docker host of the fleet: publish container facts to NATS
    /// (`agent add|revoke <id>` adds or removes a host instead).
    #[command(alias = "agent")]
    Publisher {
        #[command(subcommand)]
        admin: Option<AgentAdmin>,
    },
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

/// Adding and removing hosts.
#[derive(Subcommand)]
enum AgentAdmin {
    /// Add a host: its NATS account (new password, bcrypt-hashed), its policy entry and its credentials file.
    Add(AgentAddArgs),
    /// Remove a host: its NATS account, policy entry and credentials file.
    Revoke(AgentFilesArgs),
}

#[derive(Args)]
struct AgentFilesArgs {
    /// The agent ID.
    id: String,
    /// The NATS server config to edit.
    #[arg(long, default_value = "compose/nats/nats.conf")]
    nats_config: PathBuf,
    /// The policy to edit (default: POLICY_FILE, else compose/policy.toml).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Where the `<id>.env` credentials file goes.
    #[arg(long, default_value = ".")]
    credentials_dir: PathBuf,
}

#[derive(Args)]
struct AgentAddArgs {
    #[command(flatten)]
    files: AgentFilesArgs,
    /// A site the host may serve (repeat, or separate with commas).
    #[arg(long = "domain", value_delimiter = ',')]
    domains: Vec<String>,
}

/// `caddy-fleet agent add|revoke`.
fn agent_admin(admin: AgentAdmin, settings: &Settings) -> anyhow::Result<()> {
    let files_of = |args: &AgentFilesArgs| -> anyhow::Result<_> {
        Ok((
            caddy_fleet::schema::AgentId::new(args.id.clone())?,
            caddy_fleet::agent_admin::AgentFiles {
                nats_config: args.nats_config.clone(),
                policy: args
                    .policy
                    .clone()
                    .or_else(|| settings.policy_file.clone())
                    .unwrap_or_else(|| PathBuf::from("compose/policy.toml")),
                credentials_dir: args.credentials_dir.clone(),
            },
        ))
    };
    match admin {
        AgentAdmin::Add(args) => {
            let (agent, files) = files_of(&args.files)?;
            let added = caddy_fleet::agent_admin::add(&files, &agent, &args.domains)?;
            println!(
                "agent {agent} added: NATS account in {}, policy entry in {}, credentials in {} (NATS_PASSWORD={}). Reload NATS (nats-server --signal reload) and start the host with --env-file {}.",
                files.nats_config.display(),
                files.policy.display(),
                added.credentials_file.display(),
                added.password,
                added.credentials_file.display()
            );
        }
        AgentAdmin::Revoke(args) => {
            let (agent, files) = files_of(&args)?;
            caddy_fleet::agent_admin::revoke(&files, &agent)?;
            println!(
                "agent {agent} revoked: removed from {} and {}; reload NATS to cut its connection.",
                files.nats_config.display(),
                files.policy.display()
            );
        }
    }
    Ok(())
}

/// A point in the log: RFC 3339 time, stream sequence, a duration back from now (2h), or `now`.
type PointArg = caddy_fleet::inspect::Point;

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
    /// Print what the applier would accept from this agent under the
    /// policy (POLICY_FILE / --policy-file); a refusal is one line on
    /// stderr and exit status 1.
    #[arg(long, value_name = "ID", conflicts_with = "container")]
    agent: Option<String>,
}

/// `caddy-fleet labels`: the label prefix and, with --container, the
/// address of published ports come from the settings (DOCKER_LABEL_PREFIX,
/// HOST_IP, here 127.0.0.1 when unset).
async fn labels(args: LabelsArgs, settings: &Settings) -> anyhow::Result<()> {
    let prefix = &settings.docker_label_prefix;
    let host_ip = settings.host_ip.as_deref().unwrap_or("127.0.0.1");
    let caddyfile = match &args.container {
        Some(container) => {
            caddy_fleet::container_caddyfile(container, prefix, host_ip, args.upstreams).await?
        }
        None => {
            let text = match &args.file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| anyhow!("cannot read labels file {}: {e}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin())
                    .map_err(|e| anyhow!("cannot read labels from stdin: {e}"))?,
            };
            let agent = args
                .agent
                .as_deref()
                .map(caddy_fleet::schema::AgentId::new)
                .transpose()?;
            let policy = match &agent {
                Some(_) => Some(settings.translate_options(None)?.policy),
                None => None,
            };
            caddy_fleet::labels_caddyfile_for(
                &text,
                prefix,
                args.upstreams.unwrap_or_default(),
                agent.as_ref().zip(policy.as_ref()),
            )?
        }
    };
    print!("{caddyfile}");
    Ok(())
}

/// Runs a read-only debugging command and prints its answer.
async fn inspect(command: Inspect, json: bool, settings: &Settings) -> anyhow::Result<()> {
    let config = settings.inspect_config()?;
    print!(
        "{}",
        caddy_fleet::inspect::run(command, &config, json).await?
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

/// Logs to stdout, filtered by RUST_LOG (default `info`), as LOG_FORMAT
/// says; colours only on a terminal, and never with NO_COLOR set.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal() && !no_color);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// Runs what the command line asks for.
async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    let mode = match cli.command {
        // No logging: stdout is the Caddyfile, stderr the error, if any.
        Some(Command::Labels(args)) => return labels(args, &settings).await,
        Some(Command::Standalone) => Some(Mode::Standalone),
        Some(Command::Server) => Some(Mode::Server),
        Some(Command::Publisher { admin: Some(admin) }) => return agent_admin(admin, &settings),
        Some(Command::Publisher { admin: None }) => Some(Mode::Agent),
        Some(Command::Applier) => Some(Mode::Applier),
        Some(Command::Routes(a)) => return inspect(Inspect::Routes, a.json, &settings).await,
        Some(Command::History(a)) => {
            let filter = HistoryFilter {
                domain: a.domain,
                agent: a.agent,
                container: a.container,
            };
            let command = Inspect::History {
                filter,
                since: a.since,
                until: a.until,
            };
            return inspect(command, a.json.json, &settings).await;
        }
        Some(Command::Replay(a)) => {
            let format = match a.format.as_str() {
                "routes" => ReplayFormat::Routes,
                "caddyfile" => ReplayFormat::Caddyfile,
                "json" => ReplayFormat::Json,
                other => anyhow::bail!("--format {other:?}: use routes, caddyfile or json"),
            };
            let command = Inspect::Replay { at: a.at, format };
            return inspect(command, a.json.json, &settings).await;
        }
        Some(Command::Diff(a)) => {
            let command = Inspect::Diff {
                from: a.from,
                to: a.to,
            };
            return inspect(command, a.json.json, &settings).await;
        }
        Some(Command::Explain(a)) => {
            let command = Inspect::Explain {
                domain: a.domain,
                at: a.at,
            };
            return inspect(command, a.json.json, &settings).await;
        }
        None => None,
    };
    init_logging(settings.log_format);
    caddy_fleet::modes::run(
        mode.unwrap_or(settings.agent_mode),
        &settings,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// `error`'s Display on one line (an error from another crate may span
/// several).
fn one_line(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(" ")
}

/// Prints `error: <error>` as one line on stderr and returns exit status 1.
fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {}", one_line(error));
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = match Settings::command(Cli::command()).try_get_matches() {
        Ok(matches) => matches,
        Err(error) => match SettingsError::from_clap(&error) {
            Some(settings_error) => return fail(&settings_error),
            // Help, version and usage errors, as clap prints them.
            None => error.exit(),
        },
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let settings = match Settings::from_matches(&matches) {
        Ok(settings) => settings,
        Err(error) => return fail(&error),
    };
    match run(cli, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Settings::command(Cli::command()).debug_assert();
    }

    #[test]
    fn errors_are_printed_on_one_line() {
        let error = anyhow!("first line\n  second line\n");
        assert_eq!(one_line(&error), "first line second line");
        assert_eq!(fail(&error), ExitCode::FAILURE);
    }
}
