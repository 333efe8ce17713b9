//! Every setting of caddy-fleet, declared once in [`Settings`].
//!
//! Each field carries everything about its setting: the flag
//! (`--nats-url`), the environment variable (`NATS_URL`), the file key (the
//! field name, `nats_url`), the default and the help text (its doc
//! comment, which `caddy-fleet --help` shows). A value comes, in this order
//! of precedence, from the flag, the variable, the TOML file given with
//! `--config` (or `CADDY_FLEET_CONFIG`), or the default:
//!
//! - clap reads the flags and the variables ([`Settings::command`]); a
//!   variable set to the empty string counts as unset (compose files pass
//!   `${X:-}`);
//! - [`Settings::from_matches`] layers what clap found over the file over
//!   the defaults in one `config` builder and deserializes the result into
//!   [`Settings`], which denies unknown fields: a misspelt file key is an
//!   error naming it.
//!
//! Each kind of value (durations, addresses, URLs, agent IDs…) has one
//! parser, used for the flag, the variable and the file alike; durations
//! are read by `humantime` (`500ms`, `1m30s`, `7d`; a bare number is
//! seconds). Loading never half-succeeds: every problem is a
//! [`SettingsError`], one line naming the setting and the fix.
//!
//! The settings are turned into the components' configurations here, once:
//! [`Settings::publisher_config`], [`Settings::applier_config`],
//! [`Settings::nats_config`] and [`Settings::stream`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use caddy_fleet_applier::ApplierConfig;
use caddy_fleet_inspect::InspectConfig;
use caddy_fleet_nats::{NatsAuth, NatsConfig, NatsTls, StreamSettings};
use caddy_fleet_publisher::config::InvalidFilterLabel;
use caddy_fleet_publisher::{FilterLabel, PublisherConfig};
use caddy_fleet_schema::dynamic::DynamicUpstreams;
use caddy_fleet_schema::policy::Policy;
use caddy_fleet_schema::shard::DomainShard;
use caddy_fleet_schema::translate::{LocalNetwork, TranslateOptions};
use caddy_fleet_schema::{AgentId, InvalidAgentId};
use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command};
use serde::Deserialize;

/// What runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One host, no NATS: publisher and applier in one process.
    Standalone,
    /// The Caddy host: applier plus a publisher for the local containers.
    Server,
    /// A remote Docker host: publisher only.
    Agent,
    /// The applier alone.
    Applier,
}

impl FromStr for Mode {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "standalone" => Ok(Mode::Standalone),
            "server" => Ok(Mode::Server),
            "agent" | "publisher" => Ok(Mode::Agent),
            "applier" => Ok(Mode::Applier),
            _ => Err(InvalidValue::Mode(text.to_string())),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(InvalidValue::LogFormat(text.to_string())),
        }
    }
}

/// How generated proxies get their upstreams (`UPSTREAMS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamsMode {
    /// Listed in the config: every change of upstreams is a push.
    Static,
    /// Looked up in the applier's DNS (`UPSTREAM_DNS_LISTEN`): a deploy
    /// changes answers, not the config.
    Dynamic,
}

impl FromStr for UpstreamsMode {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "static" => Ok(UpstreamsMode::Static),
            "dynamic" => Ok(UpstreamsMode::Dynamic),
            _ => Err(InvalidValue::UpstreamsMode(text.to_string())),
        }
    }
}

/// The NATS servers to connect to (at least one, each a valid URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls(pub Vec<String>);

/// Every setting, as a flag, an environment variable and a file key.
///
/// The field name is the file key; the variable is named in `env`; the
/// flag is the field name with dashes. The README's settings table lists
/// the same settings (a test checks it).
#[derive(Debug, Clone, PartialEq, Args, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "Settings (flag > variable > --config file > default)")]
pub struct Settings {
    /// Mode when no subcommand is given: standalone, server, agent or applier.
    #[arg(long, env = "AGENT_MODE", global = true, value_name = "MODE", default_value = "standalone", value_parser = parse_mode)]
    #[serde(deserialize_with = "text::mode")]
    pub agent_mode: Mode,

    /// This host's agent ID, [A-Za-z0-9_-], at most 64 characters. Default: the hostname, sanitised.
    #[arg(long, env = "AGENT_ID", global = true, value_name = "ID", value_parser = parse_agent_id)]
    #[serde(default, deserialize_with = "text::optional_agent_id")]
    pub agent_id: Option<AgentId>,

    /// Address (IP or DNS name) other hosts reach this host's published ports at. Default: the default route's interface address.
    #[arg(long, env = "HOST_IP", global = true, value_name = "ADDRESS", value_parser = parse_host_address)]
    #[serde(default, deserialize_with = "text::optional_host_address")]
    pub host_ip: Option<String>,

    /// Only labels under this prefix are read.
    #[arg(
        long,
        env = "DOCKER_LABEL_PREFIX",
        global = true,
        value_name = "PREFIX",
        default_value = "caddy"
    )]
    pub docker_label_prefix: String,

    /// Only containers with this label (`key` or `key=value`) are published.
    #[arg(long, env = "AGENT_FILTER_LABEL", global = true, value_name = "LABEL", value_parser = parse_filter_label)]
    #[serde(default, deserialize_with = "text::optional_filter_label")]
    pub agent_filter_label: Option<FilterLabel>,

    /// Caddy's admin API (keep it on loopback).
    #[arg(long, env = "CADDY_API_URL", global = true, value_name = "URL", default_value = "http://127.0.0.1:2019", value_parser = parse_caddy_api_url)]
    #[serde(deserialize_with = "text::caddy_api_url")]
    pub caddy_api_url: String,

    /// The Caddyfile Caddy runs with; generated sites are merged into it.
    #[arg(long, env = "CADDY_BASE_CADDYFILE", global = true, value_name = "FILE")]
    #[serde(default)]
    pub caddy_base_caddyfile: Option<PathBuf>,

    /// The fleet's policy (TOML): which sites and upstreams each agent may serve; re-read when it changes and on SIGHUP. Without it, only the local agent's containers are served.
    #[arg(long, env = "POLICY_FILE", global = true, value_name = "FILE")]
    #[serde(default)]
    pub policy_file: Option<PathBuf>,

    /// Docker network Caddy shares with this host's containers (server and standalone modes): they are reached at their IP there, without published ports.
    #[arg(
        long,
        env = "CADDY_INGRESS_NETWORK",
        global = true,
        value_name = "NETWORK"
    )]
    #[serde(default)]
    pub caddy_ingress_network: Option<String>,

    /// The applier's durable consumer and checkpoint name. Default: the agent ID.
    #[arg(long, env = "APPLIER_NAME", global = true, value_name = "NAME", value_parser = parse_name)]
    #[serde(default, deserialize_with = "text::optional_name")]
    pub applier_name: Option<String>,

    /// Where the applier serves /healthz, /readyz, /metrics and /status.
    #[arg(long, env = "STATUS_LISTEN", global = true, value_name = "ADDRESS", default_value = "127.0.0.1:9180", value_parser = parse_listen_address)]
    #[serde(deserialize_with = "text::listen_address")]
    pub status_listen: SocketAddr,

    /// Remove a silent agent's routes after this long (e.g. 90s). Default: never.
    #[arg(long, env = "AGENT_TTL", global = true, value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "text::optional_duration")]
    pub agent_ttl: Option<Duration>,

    /// Deprecated, ignored: pushes start at once and batch by push duration. Accepted (with a warning) until the next release.
    #[arg(long, env = "COALESCE_QUIET", global = true, value_name = "DURATION", value_parser = parse_duration, hide = true)]
    #[serde(default, deserialize_with = "text::optional_duration")]
    pub coalesce_quiet: Option<Duration>,

    /// Deprecated, ignored (see COALESCE_QUIET).
    #[arg(long, env = "COALESCE_MAX_DELAY", global = true, value_name = "DURATION", value_parser = parse_duration, hide = true)]
    #[serde(default, deserialize_with = "text::optional_duration")]
    pub coalesce_max_delay: Option<Duration>,

    /// How long Caddy keeps a WebSocket (or other stream) through a generated reverse_proxy open after a push replaced its config; 0s closes them at every push. A label's own stream_close_delay wins.
    #[arg(long, env = "STREAM_CLOSE_DELAY", global = true, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub stream_close_delay: Duration,

    /// How long a generated reverse_proxy keeps trying the site's upstreams when the one it picked cannot be reached (Caddy's lb_try_duration; it retries only what is safe); 0s turns it off. A label's own lb_try_duration or lb_retries wins.
    #[arg(long, env = "PROXY_TRY_DURATION", global = true, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub proxy_try_duration: Duration,

    /// Serve only the sites whose host matches one of these patterns (comma-separated, the policy's syntax: a.test, *.a.test, *), so several appliers, each with its own Caddy, split one fleet. Other sites are ignored, not refused. Default: every site.
    #[arg(long, env = "APPLIER_DOMAINS", global = true, value_name = "PATTERNS")]
    #[serde(default)]
    pub applier_domains: Option<String>,

    /// How generated reverse_proxy handlers get their upstreams: static (listed in the config; every deploy is a push) or dynamic (looked up in the applier's DNS at UPSTREAM_DNS_LISTEN; a deploy that only moves upstreams changes the answers, with no push).
    #[arg(long, env = "UPSTREAMS", global = true, value_name = "MODE", default_value = "static", value_parser = parse_upstreams_mode)]
    #[serde(deserialize_with = "text::upstreams_mode")]
    pub upstreams_mode: UpstreamsMode,

    /// Where the applier answers DNS for dynamic upstreams (UPSTREAMS=dynamic); Caddy must reach it, so loopback next to Caddy.
    #[arg(long, env = "UPSTREAM_DNS_LISTEN", global = true, value_name = "ADDRESS", default_value = "127.0.0.1:8053", value_parser = parse_listen_address)]
    #[serde(deserialize_with = "text::listen_address")]
    pub upstream_dns_listen: SocketAddr,

    /// How long Caddy keeps a dynamic upstream answer before asking again: the longest a deploy waits to be served (UPSTREAMS=dynamic).
    #[arg(long, env = "UPSTREAM_DNS_REFRESH", global = true, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub upstream_dns_refresh: Duration,

    /// After a failed lookup, how long Caddy serves its last answer (or none, for a name it never had) before asking again (UPSTREAMS=dynamic); keep it short.
    #[arg(long, env = "UPSTREAM_DNS_GRACE", global = true, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub upstream_dns_grace: Duration,

    /// How often a publisher re-sends its full container set.
    #[arg(long, env = "SYNC_INTERVAL", global = true, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub sync_interval: Duration,

    /// Longest wait for a started container to accept connections on the
    /// ports its labels proxy to before a publisher reports it anyway; `0s`
    /// reports containers as soon as they start.
    #[arg(long, env = "READY_TIMEOUT", global = true, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub ready_timeout: Duration,

    /// How often a publisher sends a heartbeat.
    #[arg(long, env = "HEARTBEAT_INTERVAL", global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub heartbeat_interval: Duration,

    /// How long the log keeps history (the applier creates the stream with it).
    #[arg(long, env = "STREAM_MAX_AGE", global = true, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    #[serde(deserialize_with = "text::duration")]
    pub stream_max_age: Duration,

    /// Stream replicas: 1 on a single NATS, 3 on a 3-node cluster.
    #[arg(long, env = "STREAM_REPLICAS", global = true, value_name = "COUNT", default_value = "1", value_parser = parse_replicas)]
    #[serde(deserialize_with = "text::replicas")]
    pub stream_replicas: usize,

    /// Whether this applier creates and updates the log and provisions agents' ingest streams; with several ingresses on one log, exactly one has true and the others false (they check the log matches their settings and refuse to start otherwise).
    #[arg(long, env = "STREAM_OWNER", global = true, value_name = "BOOL", action = ArgAction::Set, default_value = "true", value_parser = parse_switch)]
    #[serde(deserialize_with = "text::switch")]
    pub stream_owner: bool,

    /// NATS servers, comma-separated.
    #[arg(long, env = "NATS_URL", global = true, value_name = "URLS", default_value = "nats://127.0.0.1:4222", value_parser = parse_nats_urls)]
    #[serde(deserialize_with = "text::nats_urls")]
    pub nats_url: NatsUrls,

    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", global = true, value_name = "TOKEN")]
    #[serde(default)]
    pub nats_token: Option<String>,

    /// NATS user (with NATS_PASSWORD).
    #[arg(long, env = "NATS_USER", global = true, value_name = "USER")]
    #[serde(default)]
    pub nats_user: Option<String>,

    /// NATS password (with NATS_USER).
    #[arg(long, env = "NATS_PASSWORD", global = true, value_name = "PASSWORD")]
    #[serde(default)]
    pub nats_password: Option<String>,

    /// NATS credentials file (user JWT and NKey seed).
    #[arg(long, env = "NATS_CREDS_FILE", global = true, value_name = "FILE")]
    #[serde(default)]
    pub nats_creds_file: Option<PathBuf>,

    /// Refuse to talk to NATS without TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED", global = true, action = ArgAction::SetTrue, default_value = "false", value_parser = parse_switch)]
    #[serde(deserialize_with = "text::switch")]
    pub nats_tls_required: bool,

    /// CA bundle for the NATS server certificate.
    #[arg(long, env = "NATS_TLS_CA", global = true, value_name = "FILE")]
    #[serde(default)]
    pub nats_tls_ca: Option<PathBuf>,

    /// Client certificate for NATS (with NATS_TLS_KEY).
    #[arg(long, env = "NATS_TLS_CERT", global = true, value_name = "FILE")]
    #[serde(default)]
    pub nats_tls_cert: Option<PathBuf>,

    /// Key of the NATS client certificate.
    #[arg(long, env = "NATS_TLS_KEY", global = true, value_name = "FILE")]
    #[serde(default)]
    pub nats_tls_key: Option<PathBuf>,

    /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line). RUST_LOG filters them (default info).
    #[arg(long, env = "LOG_FORMAT", global = true, value_name = "FORMAT", default_value = "text", value_parser = parse_log_format)]
    #[serde(deserialize_with = "text::log_format")]
    pub log_format: LogFormat,
}

/// The predecessor's variables that no longer apply, and what replaces them.
pub const RETIRED: &[(&str, &str)] = &[
    ("CADDY_SERVER_URL", "agents no longer talk to Caddy: set NATS_URL to the server's NATS"),
    ("CADDY_API_TOKEN", "agents no longer talk to Caddy: use NATS credentials (NATS_USER/NATS_PASSWORD, NATS_CREDS_FILE or NATS_TOKEN)"),
];

/// The id of the `--config` argument [`Settings::command`] adds.
const CONFIG_FILE: &str = "config_file";

/// The longest duration a setting takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A value its setting does not take; says what to write instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidValue {
    #[error("{0:?} is not a mode: use standalone, server, agent or applier")]
    Mode(String),
    #[error("{0:?} is not a log format: use text or json")]
    LogFormat(String),
    #[error("{0:?} is not an upstreams mode: use static or dynamic")]
    UpstreamsMode(String),
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error(transparent)]
    AgentId(#[from] InvalidAgentId),
    #[error("invalid name {0:?}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")]
    Name(String),
    #[error("{0:?} is neither an IP address nor a DNS name: give the address other hosts reach this one at")]
    HostAddress(String),
    #[error(transparent)]
    FilterLabel(#[from] InvalidFilterLabel),
    #[error("malformed URL {0:?}: write e.g. http://127.0.0.1:2019")]
    CaddyUrl(String),
    #[error("{0:?} is not an address: write e.g. 127.0.0.1:9180")]
    ListenAddress(String),
    #[error("{0:?} is not a number of replicas: use 1 to 5 (3 on a 3-node cluster)")]
    ReplicasNotANumber(String),
    #[error("{0} replicas: use 1 to 5 (3 on a 3-node cluster)")]
    ReplicasOutOfRange(usize),
    #[error("no URL given: write e.g. nats://nats:4222")]
    NoNatsUrl,
    #[error("malformed URL {url:?} ({reason}): write e.g. nats://nats:4222")]
    NatsUrl { url: String, reason: String },
    #[error("{0:?} is not a yes or no: use true or false")]
    Switch(String),
}

/// A duration setting that is not one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DurationError {
    #[error("{text:?} is not a duration ({source}): write e.g. 500ms, 30s, 1m30s, 5m, 1h or 7d")]
    Malformed {
        text: String,
        source: humantime::DurationError,
    },
    #[error("{text:?} is too long: a duration is at most 100 years (36500d)")]
    TooLong { text: String },
}

/// A setting that stops start-up. Each displays as one line naming the
/// setting (its variable, or the file and key) and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A flag or variable with a value its setting does not take.
    #[error("{setting}: {reason}")]
    InvalidValue {
        /// The setting's variable.
        setting: String,
        reason: String,
    },
    /// A file key that is no setting.
    #[error("{}: unknown setting `{key}`: file keys are the settings' variables in lower case, e.g. nats_url, agent_id (see the README's settings table)", file.display())]
    UnknownKey { file: PathBuf, key: String },
    /// A file value its setting does not take.
    #[error("{}: {key}: {reason}", file.display())]
    InvalidFileValue {
        file: PathBuf,
        key: String,
        reason: String,
    },
    /// The `--config` file cannot be read.
    #[error("--config {}: cannot read it ({reason}); check the path and that this user may read it", file.display())]
    UnreadableFile { file: PathBuf, reason: String },
    /// The `--config` file is not TOML.
    #[error("--config {}: not valid TOML{}: {reason}", file.display(), line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    MalformedFile {
        file: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    /// Settings that do not work together, or a file a setting names that
    /// cannot be read.
    #[error("{setting}: {message}")]
    Rejected {
        /// The setting, as its variable.
        setting: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

impl SettingsError {
    /// The settings error a clap error is, when clap refused the value of a
    /// setting's flag or variable; `None` for usage errors (and help).
    pub fn from_clap(error: &clap::Error) -> Option<SettingsError> {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        if !matches!(
            error.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        ) {
            return None;
        }
        let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) else {
            return None;
        };
        let declared = declared();
        let arg = declared
            .get_arguments()
            .find(|arg| arg.to_string() == *flag)?;
        let setting = variable(arg);
        let reason = match std::error::Error::source(error) {
            Some(source) => source.to_string(),
            None => match error.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(value)) => format!("{value:?} is not a value it takes"),
                _ => "a value is required".to_string(),
            },
        };
        Some(SettingsError::InvalidValue { setting, reason })
    }
}

/// What is wrong with the policy file, without the setting's name.
fn policy_reason(error: &caddy_fleet_applier::policy::PolicyLoadError) -> String {
    use caddy_fleet_applier::policy::PolicyLoadError;
    match error {
        PolicyLoadError::Read { path, source } => {
            format!("cannot read {}: {source}", path.display())
        }
        PolicyLoadError::Invalid(invalid) => invalid.0.clone(),
    }
}

fn rejected(setting: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Rejected {
        setting,
        message: message.into(),
    }
}

/// The settings' arguments, as declared (for their names, variables and
/// defaults), built as clap shows them.
fn declared() -> Command {
    let mut command = Settings::augment_args(Command::new("caddy-fleet").disable_help_flag(true));
    command.build();
    command
}

/// A setting's environment variable (every setting has one).
fn variable(arg: &Arg) -> String {
    arg.get_env()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.get_id().as_str().to_ascii_uppercase())
}

/// Clap reads every variable when the command is built; a variable set to
/// the empty string counts as unset, as compose files pass `${X:-}`.
fn ignoring_empty_variables(command: Command) -> Command {
    let empty: Vec<clap::Id> = command
        .get_arguments()
        .filter(|arg| {
            arg.get_env()
                .and_then(std::env::var_os)
                .is_some_and(|value| value.is_empty())
        })
        .map(|arg| arg.get_id().clone())
        .collect();
    empty.into_iter().fold(command, |command, id| {
        command.mut_arg(id, |arg| arg.env(None::<&'static str>))
    })
}

impl Settings {
    /// Adds `--config` and every setting's flag and variable to `command`.
    pub fn command(command: Command) -> Command {
        // The derive would make this struct's doc comment the command's.
        let about = command.get_about().cloned();
        let long_about = command.get_long_about().cloned();
        let command = Settings::augment_args(command)
            .about(about.map_or(Resettable::Reset, Resettable::Value))
            .long_about(long_about.map_or(Resettable::Reset, Resettable::Value))
            .arg(
                Arg::new(CONFIG_FILE)
                    .long("config")
                    .env("CADDY_FLEET_CONFIG")
                    .global(true)
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("A TOML file of settings (keys like nats_url = \"nats://nats:4222\")"),
            );
        ignoring_empty_variables(command)
    }

    /// The settings from what a command made by [`Settings::command`]
    /// parsed: its flags and variables over the `--config` file over the
    /// defaults.
    pub fn from_matches(matches: &ArgMatches) -> Result<Settings, SettingsError> {
        let file = matches
            .get_one::<PathBuf>(CONFIG_FILE)
            .map(PathBuf::as_path);
        let declared = declared();
        let mut layers = config::Config::builder();
        for arg in declared.get_arguments() {
            let key = arg.get_id().as_str();
            if let Some(default) = arg.get_default_values().first() {
                layers = layers
                    .set_default(key, default.to_string_lossy().into_owned())
                    .map_err(|e| layer_error(arg, e))?;
            }
        }
        if let Some(path) = file {
            layers = layers.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        for arg in declared.get_arguments() {
            let key = arg.get_id().as_str();
            let given = matches!(
                matches.value_source(key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if let Some(raw) = matches
                .get_raw(key)
                .and_then(|mut v| v.next())
                .filter(|_| given)
            {
                layers = layers
                    .set_override(key, raw.to_string_lossy().into_owned())
                    .map_err(|e| layer_error(arg, e))?;
            }
        }
        let layered = layers.build().map_err(|e| file_error(file, e))?;
        serde_path_to_error::deserialize(layered)
            .map_err(|e| deserialize_error(e, file, matches, &declared))
    }

    /// This host's agent ID: `AGENT_ID`, else the hostname, sanitised.
    pub fn agent(&self) -> AgentId {
        self.agent_id
            .clone()
            .unwrap_or_else(|| AgentId::sanitize(&hostname()))
    }

    /// The applier's name: `APPLIER_NAME`, else the agent ID.
    pub fn applier_name(&self) -> String {
        self.applier_name
            .clone()
            .unwrap_or_else(|| self.agent().to_string())
    }

    /// Where the debugging commands look (the log, the applier's
    /// checkpoints and `/status`) and how they translate, as the applier
    /// would: the agent next to Caddy is this host's.
    pub fn inspect_config(&self) -> Result<InspectConfig, SettingsError> {
        Ok(InspectConfig {
            nats: self.nats_config("caddy-fleet-inspect".into())?,
            stream: self.stream().name,
            checkpoint_bucket: caddy_fleet_applier::checkpoint::BUCKET.to_string(),
            applier_name: Some(self.applier_name()),
            status_url: format!("http://{}", self.status_listen),
            translate: self.translate_options(Some(&self.agent()))?,
            base_caddyfile: self.caddy_base_caddyfile.clone(),
            caddy_api_url: self.caddy_api_url.clone(),
        })
    }

    /// The stream settings the applier creates the log with.
    pub fn stream(&self) -> StreamSettings {
        StreamSettings {
            max_age: self.stream_max_age,
            replicas: self.stream_replicas,
            owner: self.stream_owner,
            ..StreamSettings::default()
        }
    }

    /// The publisher's configuration for `agent`. Without `HOST_IP`, the
    /// address of the default route's interface.
    pub fn publisher_config(&self, agent: &AgentId) -> Result<PublisherConfig, SettingsError> {
        let host = match &self.host_ip {
            Some(address) => address.clone(),
            None => {
                let detected = caddy_fleet_publisher::host::detect().ok_or_else(|| {
                    rejected(
                        "HOST_IP",
                        "cannot detect it (no default route): set HOST_IP to the address other hosts reach this one at",
                    )
                })?;
                tracing::info!(host_ip = %detected, "HOST_IP not set; using the default route's interface address.");
                detected.to_string()
            }
        };
        let mut config = PublisherConfig::new(agent.clone(), host);
        config.label_prefix = self.docker_label_prefix.clone();
        config.filter_label = self.agent_filter_label.clone();
        config.sync_interval = self.sync_interval;
        config.heartbeat_interval = self.heartbeat_interval;
        config.ready_timeout = self.ready_timeout;
        Ok(config)
    }

    /// The applier's configuration; `local` is the agent whose containers
    /// Caddy reaches on `CADDY_INGRESS_NETWORK` (server and standalone).
    pub fn applier_config(&self, local: Option<&AgentId>) -> Result<ApplierConfig, SettingsError> {
        let mut config = ApplierConfig::new(self.applier_name(), self.caddy_api_url.clone());
        if let Some(path) = &self.caddy_base_caddyfile {
            config.base_caddyfile = Some(std::fs::read_to_string(path).map_err(|e| {
                rejected(
                    "CADDY_BASE_CADDYFILE",
                    format!(
                        "cannot read {}: {e}; mount the Caddyfile Caddy runs with",
                        path.display()
                    ),
                )
            })?);
        }
        config.translate = self.translate_options(local)?;
        config.policy_file = self.policy_file.clone();
        config.agent_ttl = self.agent_ttl;
        Ok(config)
    }

    /// How labels are read and what the policy grants, as the applier
    /// (and the debugging commands, to agree with it) translate: `local` is
    /// the agent next to Caddy, trusted unless the policy lists it.
    pub fn translate_options(
        &self,
        local: Option<&AgentId>,
    ) -> Result<TranslateOptions, SettingsError> {
        let policy = match &self.policy_file {
            Some(path) => caddy_fleet_applier::policy::load(path)
                .map_err(|e| rejected("POLICY_FILE", policy_reason(&e)))?,
            None => Policy::default(),
        };
        let mut options = TranslateOptions {
            label_prefix: self.docker_label_prefix.clone(),
            policy: policy.with_local(local.cloned()),
            stream_close_delay: Some(self.stream_close_delay).filter(|d| !d.is_zero()),
            proxy_try_duration: Some(self.proxy_try_duration).filter(|d| !d.is_zero()),
            shard: self
                .applier_domains
                .as_deref()
                .map(DomainShard::parse)
                .transpose()
                .map_err(|e| rejected("APPLIER_DOMAINS", e.to_string()))?,
            dynamic_upstreams: self.dynamic_upstreams()?,
            ..TranslateOptions::default()
        };
        if let (Some(agent), Some(network)) = (local, &self.caddy_ingress_network) {
            options.local = Some(LocalNetwork {
                agent: agent.clone(),
                network: network.clone(),
            });
        }
        // Caddy's admin address is never an upstream of an untrusted agent.
        if let Some(host) = reqwest::Url::parse(&self.caddy_api_url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
        {
            if let Ok(ip) = host.parse() {
                options.caddy_addresses.insert(ip);
            }
        }
        Ok(options)
    }

    /// Where and how Caddy looks dynamic upstreams up; `None` when
    /// upstreams are static.
    fn dynamic_upstreams(&self) -> Result<Option<DynamicUpstreams>, SettingsError> {
        if self.upstreams_mode == UpstreamsMode::Static {
            return Ok(None);
        }
        if self.upstream_dns_refresh.is_zero() {
            return Err(rejected(
                "UPSTREAM_DNS_REFRESH",
                "0s would look every request's upstreams up; use 1s or more".to_string(),
            ));
        }
        // Caddy marks a failed lookup's answer fresh for grace − refresh.
        if self.upstream_dns_grace <= self.upstream_dns_refresh {
            return Err(rejected(
                "UPSTREAM_DNS_GRACE",
                format!(
                    "{} is not longer than UPSTREAM_DNS_REFRESH ({}): Caddy would ask again at every request while the applier does not answer; use a few seconds more",
                    humantime::format_duration(self.upstream_dns_grace),
                    humantime::format_duration(self.upstream_dns_refresh)
                ),
            ));
        }
        Ok(Some(DynamicUpstreams {
            resolver: self.upstream_dns_listen,
            refresh: self.upstream_dns_refresh,
            grace_period: self.upstream_dns_grace,
        }))
    }

    /// The NATS connection settings, with the client `name`, checked:
    /// exactly one kind of credentials, and the files readable.
    pub fn nats_config(&self, name: String) -> Result<NatsConfig, SettingsError> {
        let auth = match (
            &self.nats_token,
            &self.nats_user,
            &self.nats_password,
            &self.nats_creds_file,
        ) {
            (None, None, None, None) => NatsAuth::None,
            (Some(token), None, None, None) => NatsAuth::Token {
                token: token.clone(),
            },
            (None, Some(user), Some(password), None) => NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, Some(_), None, None) => {
                return Err(rejected(
                    "NATS_PASSWORD",
                    "NATS_USER is set without a password: set NATS_PASSWORD",
                ))
            }
            (None, None, Some(_), None) => {
                return Err(rejected(
                    "NATS_USER",
                    "NATS_PASSWORD is set without a user: set NATS_USER",
                ))
            }
            (None, None, None, Some(path)) => {
                readable("NATS_CREDS_FILE", path)?;
                NatsAuth::CredentialsFile { path: path.clone() }
            }
            _ => {
                return Err(rejected(
                    "NATS_TOKEN",
                    "several NATS credentials are set: use exactly one of NATS_TOKEN, NATS_USER with NATS_PASSWORD, or NATS_CREDS_FILE",
                ))
            }
        };
        for (setting, file) in [
            ("NATS_TLS_CA", &self.nats_tls_ca),
            ("NATS_TLS_CERT", &self.nats_tls_cert),
            ("NATS_TLS_KEY", &self.nats_tls_key),
        ] {
            if let Some(path) = file {
                readable(setting, path)?;
            }
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err(rejected(
                "NATS_TLS_CERT",
                "a client certificate needs its key and the reverse: set both NATS_TLS_CERT and NATS_TLS_KEY",
            ));
        }
        Ok(NatsConfig {
            urls: self.nats_url.0.clone(),
            auth,
            tls: NatsTls {
                required: self.nats_tls_required,
                ca_file: self.nats_tls_ca.clone(),
                cert_file: self.nats_tls_cert.clone(),
                key_file: self.nats_tls_key.clone(),
            },
            name: Some(name),
            retry_initial_connect: false,
            inbox_prefix: None,
            subscription_capacity: None,
        })
    }

    /// The NATS settings of `agent`'s publisher: replies come on the
    /// agent's own inbox, so a NATS user can be limited to it.
    pub fn publisher_nats_config(&self, agent: &AgentId) -> Result<NatsConfig, SettingsError> {
        let mut nats = self.nats_config(format!("caddy-fleet-publisher-{agent}"))?;
        nats.inbox_prefix = Some(format!("_INBOX_{agent}"));
        Ok(nats)
    }
}

/// An error adding a layer: only a key that is no config path could cause
/// one, and every setting's key is a plain name.
fn layer_error(arg: &Arg, error: config::ConfigError) -> SettingsError {
    SettingsError::InvalidValue {
        setting: variable(arg),
        reason: error.to_string(),
    }
}

/// An error building the layers: only the file source reads anything.
fn file_error(file: Option<&Path>, error: config::ConfigError) -> SettingsError {
    let file = file.map(Path::to_path_buf).unwrap_or_default();
    match error {
        config::ConfigError::FileParse { cause, .. } => {
            match cause.downcast_ref::<toml::de::Error>() {
                Some(syntax) => SettingsError::MalformedFile {
                    line: syntax.span().and_then(|span| line_of(&file, span.start)),
                    reason: syntax.message().to_string(),
                    file,
                },
                None => SettingsError::MalformedFile {
                    line: None,
                    reason: cause.to_string(),
                    file,
                },
            }
        }
        config::ConfigError::Foreign(cause) => SettingsError::UnreadableFile {
            file,
            reason: cause.to_string(),
        },
        other => SettingsError::UnreadableFile {
            file,
            reason: other.to_string(),
        },
    }
}

/// The line (from 1) of byte `offset` of `file`, to point at a syntax error.
fn line_of(file: &Path, offset: usize) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    Some(text.get(..offset)?.matches('\n').count() + 1)
}

/// An error deserializing the layers into [`Settings`]: an unknown file key
/// (`deny_unknown_fields`), or a value its setting does not take.
fn deserialize_error(
    error: serde_path_to_error::Error<config::ConfigError>,
    file: Option<&Path>,
    matches: &ArgMatches,
    declared: &Command,
) -> SettingsError {
    let key = error.path().iter().find_map(|segment| match segment {
        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
        _ => None,
    });
    let file = file.map(Path::to_path_buf).unwrap_or_default();
    let reason = reason(error.into_inner());
    let Some(key) = key else {
        return SettingsError::MalformedFile {
            file,
            line: None,
            reason,
        };
    };
    let Some(arg) = declared
        .get_arguments()
        .find(|arg| arg.get_id() == key.as_str())
    else {
        return SettingsError::UnknownKey { file, key };
    };
    let given = matches!(
        matches.value_source(arg.get_id().as_str()),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    );
    if given {
        SettingsError::InvalidValue {
            setting: variable(arg),
            reason,
        }
    } else {
        SettingsError::InvalidFileValue { file, key, reason }
    }
}

/// What is wrong with a value, without `config`'s "for key … in …" (the
/// error names the key itself).
fn reason(error: config::ConfigError) -> String {
    match error {
        config::ConfigError::At { error, .. } => reason(*error),
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        config::ConfigError::Message(message) => message,
        other => other.to_string(),
    }
}

fn readable(setting: &'static str, path: &Path) -> Result<(), SettingsError> {
    std::fs::File::open(path).map(|_| ()).map_err(|e| {
        rejected(
            setting,
            format!(
                "cannot read {}: {e}; check the path and that this user may read it",
                path.display()
            ),
        )
    })
}

/// The machine's hostname (the default agent ID).
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// Parses a duration: `500ms`, `30s`, `1m30s`, `5m`, `1h`, `7d` (what
/// `humantime` reads), or a bare number of seconds. At most 100 years.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    let duration = if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        match trimmed.parse::<u64>() {
            Ok(seconds) => Duration::from_secs(seconds),
            Err(_) => {
                return Err(DurationError::TooLong {
                    text: text.to_string(),
                })
            }
        }
    } else {
        humantime::parse_duration(trimmed).map_err(|source| match source {
            humantime::DurationError::NumberOverflow => DurationError::TooLong {
                text: text.to_string(),
            },
            source => DurationError::Malformed {
                text: text.to_string(),
                source,
            },
        })?
    };
    if duration > MAX_DURATION {
        return Err(DurationError::TooLong {
            text: text.to_string(),
        });
    }
    Ok(duration)
}

fn parse_mode(text: &str) -> Result<Mode, InvalidValue> {
    text.parse()
}

fn parse_log_format(text: &str) -> Result<LogFormat, InvalidValue> {
    text.parse()
}

fn parse_upstreams_mode(text: &str) -> Result<UpstreamsMode, InvalidValue> {
    text.parse()
}

fn parse_agent_id(text: &str) -> Result<AgentId, InvalidValue> {
    Ok(AgentId::new(text.trim())?)
}

fn parse_name(text: &str) -> Result<String, InvalidValue> {
    AgentId::new(text.trim())
        .map(|name| name.to_string())
        .map_err(|_| InvalidValue::Name(text.to_string()))
}

fn parse_host_address(text: &str) -> Result<String, InvalidValue> {
    let address = text.trim();
    if caddy_fleet_publisher::host::is_valid_address(address) {
        Ok(address.to_string())
    } else {
        Err(InvalidValue::HostAddress(text.to_string()))
    }
}

fn parse_filter_label(text: &str) -> Result<FilterLabel, InvalidValue> {
    Ok(text.parse::<FilterLabel>()?)
}

fn parse_caddy_api_url(text: &str) -> Result<String, InvalidValue> {
    let url = text.trim();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if scheme_ok && url_host_ok(url) {
        Ok(url.to_string())
    } else {
        Err(InvalidValue::CaddyUrl(text.to_string()))
    }
}

/// Whether the authority of `url` is a host with, if any, a numeric port.
fn url_host_ok(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or("");
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    !host.is_empty()
        && !host.contains(char::is_whitespace)
        && match host.rsplit_once(':') {
            Some((h, port)) if !h.ends_with(']') || host.starts_with('[') => {
                !h.is_empty() && port.parse::<u16>().is_ok()
            }
            _ => true,
        }
}

fn parse_listen_address(text: &str) -> Result<SocketAddr, InvalidValue> {
    text.trim()
        .parse()
        .map_err(|_| InvalidValue::ListenAddress(text.to_string()))
}

fn parse_replicas(text: &str) -> Result<usize, InvalidValue> {
    let replicas: usize = text
        .trim()
        .parse()
        .map_err(|_| InvalidValue::ReplicasNotANumber(text.to_string()))?;
    if (1..=5).contains(&replicas) {
        Ok(replicas)
    } else {
        Err(InvalidValue::ReplicasOutOfRange(replicas))
    }
}

fn parse_nats_urls(text: &str) -> Result<NatsUrls, InvalidValue> {
    let urls: Vec<String> = text
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(InvalidValue::NoNatsUrl);
    }
    for url in &urls {
        if let Err(e) = url.parse::<caddy_fleet_nats::async_nats::ServerAddr>() {
            return Err(InvalidValue::NatsUrl {
                url: url.clone(),
                reason: e.to_string(),
            });
        }
    }
    Ok(NatsUrls(urls))
}

fn parse_switch(text: &str) -> Result<bool, InvalidValue> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(InvalidValue::Switch(text.to_string())),
    }
}

impl fmt::Display for NatsUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Deserializers reading a setting's value as text with the same parser
/// the flag and the variable use (a file's `3` or `true` is read as text).
mod text {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    macro_rules! from_text {
        ($($name:ident, $optional:ident: $parse:path => $value:ty;)*) => {$(
            pub fn $name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<$value, D::Error> {
                let text = String::deserialize(deserializer)?;
                $parse(&text).map_err(D::Error::custom)
            }
            #[allow(dead_code)]
            pub fn $optional<'de, D: Deserializer<'de>>(
                deserializer: D,
            ) -> Result<Option<$value>, D::Error> {
                $name(deserializer).map(Some)
            }
        )*};
    }

    from_text! {
        mode, optional_mode: super::parse_mode => super::Mode;
        log_format, optional_log_format: super::parse_log_format => super::LogFormat;
        upstreams_mode, optional_upstreams_mode: super::parse_upstreams_mode => super::UpstreamsMode;
        agent_id, optional_agent_id: super::parse_agent_id => caddy_fleet_schema::AgentId;
        name, optional_name: super::parse_name => String;
        host_address, optional_host_address: super::parse_host_address => String;
        filter_label, optional_filter_label: super::parse_filter_label => caddy_fleet_publisher::FilterLabel;
        caddy_api_url, optional_caddy_api_url: super::parse_caddy_api_url => String;
        listen_address, optional_listen_address: super::parse_listen_address => std::net::SocketAddr;
        duration, optional_duration: super::parse_duration => std::time::Duration;
        replicas, optional_replicas: super::parse_replicas => usize;
        nats_urls, optional_nats_urls: super::parse_nats_urls => super::NatsUrls;
        switch, optional_switch: super::parse_switch => bool;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Clap reads the process environment: tests that set it take turns.
    static ENVIRONMENT: Mutex<()> = Mutex::new(());

    /// A TOML file that is removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "caddy-fleet-settings-{}.toml",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Every variable the settings read, `--config`'s included.
    fn variables() -> Vec<String> {
        declared()
            .get_arguments()
            .map(variable)
            .chain(["CADDY_FLEET_CONFIG".to_string()])
            .collect()
    }

    /// Loads the settings as the binary does, from `args` (after the
    /// program name; `agent` is a subcommand) and exactly the variables `env`.
    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let _turn = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
        for name in variables() {
            std::env::remove_var(name);
        }
        for (name, value) in env {
            std::env::set_var(name, value);
        }
        let command =
            Settings::command(Command::new("caddy-fleet").subcommand(Command::new("agent")));
        let parsed = command
            .try_get_matches_from(std::iter::once("caddy-fleet").chain(args.iter().copied()));
        for (name, _) in env {
            std::env::remove_var(name);
        }
        match parsed {
            Ok(matches) => Settings::from_matches(&matches),
            Err(error) => Err(SettingsError::from_clap(&error)
                .unwrap_or_else(|| panic!("not a settings error: {error}"))),
        }
    }

    fn one_line(error: &SettingsError) -> String {
        let text = error.to_string();
        assert!(!text.contains('\n'), "more than one line: {text}");
        text
    }

    #[test]
    fn defaults() {
        let s = load(&[], &[]).unwrap();
        assert_eq!(s.agent_mode, Mode::Standalone);
        assert_eq!(s.agent_id, None);
        assert_eq!(s.docker_label_prefix, "caddy");
        assert_eq!(s.caddy_api_url, "http://127.0.0.1:2019");
        assert_eq!(s.status_listen, "127.0.0.1:9180".parse().unwrap());
        assert_eq!(s.agent_ttl, None);
        assert_eq!(s.coalesce_quiet, None);
        assert_eq!(s.stream_close_delay, Duration::from_secs(3600));
        assert_eq!(s.sync_interval, Duration::from_secs(300));
        assert_eq!(s.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(s.ready_timeout, Duration::from_secs(30));
        assert_eq!(s.stream_max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(s.stream_replicas, 1);
        assert!(s.stream_owner);
        assert_eq!(s.nats_url.0, vec!["nats://127.0.0.1:4222".to_string()]);
        assert!(!s.nats_tls_required);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn flag_beats_variable_beats_file_beats_default() {
        let file = TempFile::new(
            "agent_id = \"from-file\"\nhost_ip = \"10.0.0.1\"\nnats_url = \"nats://file:4222\"\nstream_replicas = 3\n",
        );
        let s = load(
            &["--config", file.path(), "--agent-id", "from-flag"],
            &[
                ("AGENT_ID", "from-env"),
                ("NATS_URL", "nats://env:4222"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(s.agent_id, Some(AgentId::new("from-flag").unwrap()));
        assert_eq!(s.nats_url.0, vec!["nats://env:4222".to_string()]);
        assert_eq!(s.host_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(s.stream_replicas, 3);
        assert_eq!(s.docker_label_prefix, "caddy");
        assert_eq!(s.agent_mode, Mode::Standalone);
    }

    #[test]
    fn the_file_is_named_by_flag_or_variable_and_flags_follow_subcommands() {
        let file = TempFile::new("docker_label_prefix = \"fleet\"\n");
        let by_variable = load(&["agent"], &[("CADDY_FLEET_CONFIG", file.path())]).unwrap();
        assert_eq!(by_variable.docker_label_prefix, "fleet");
        let after_subcommand = load(
            &["agent", "--config", file.path(), "--agent-id", "web-1"],
            &[],
        )
        .unwrap();
        assert_eq!(after_subcommand.docker_label_prefix, "fleet");
        assert_eq!(after_subcommand.agent(), AgentId::new("web-1").unwrap());
    }

    #[test]
    fn variables_are_typed() {
        let s = load(
            &[],
            &[
                ("AGENT_MODE", "server"),
                ("NATS_TLS_REQUIRED", "yes"),
                ("STREAM_REPLICAS", "3"),
                ("STREAM_MAX_AGE", "1m30s"),
                ("AGENT_TTL", "90"),
                ("AGENT_FILTER_LABEL", "fleet=edge"),
                ("NATS_URL", "nats://a:4222, nats://b:4222"),
                ("LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(s.agent_mode, Mode::Server);
        assert!(s.nats_tls_required);
        assert_eq!(s.stream_replicas, 3);
        assert_eq!(s.stream_max_age, Duration::from_secs(90));
        assert_eq!(s.agent_ttl, Some(Duration::from_secs(90)));
        assert_eq!(s.agent_filter_label, Some("fleet=edge".parse().unwrap()));
        assert_eq!(s.nats_url.0, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(s.log_format, LogFormat::Json);
    }

    #[test]
    fn file_values_are_typed() {
        let file = TempFile::new(
            "agent_mode = \"applier\"\nnats_tls_required = true\nstream_replicas = 5\nstream_max_age = \"1h30m\"\ncoalesce_quiet = 1\nstatus_listen = \"0.0.0.0:9999\"\n",
        );
        let s = load(&["--config", file.path()], &[]).unwrap();
        assert_eq!(s.agent_mode, Mode::Applier);
        assert!(s.nats_tls_required);
        assert_eq!(s.stream_replicas, 5);
        assert_eq!(s.stream_max_age, Duration::from_secs(5400));
        assert_eq!(s.coalesce_quiet, Some(Duration::from_secs(1)));
        assert_eq!(s.status_listen, "0.0.0.0:9999".parse().unwrap());
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let file = TempFile::new("host_ip = \"10.0.0.1\"\n");
        let s = load(
            &["--config", file.path()],
            &[
                ("HOST_IP", ""),
                ("NATS_USER", ""),
                ("NATS_PASSWORD", ""),
                ("DOCKER_LABEL_PREFIX", ""),
                ("NATS_TLS_REQUIRED", ""),
                ("STREAM_REPLICAS", ""),
            ],
        )
        .unwrap();
        assert_eq!(s.host_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!((s.nats_user, s.nats_password), (None, None));
        assert_eq!(s.docker_label_prefix, "caddy");
        assert!(!s.nats_tls_required);
        assert_eq!(s.stream_replicas, 1);
    }

    #[test]
    fn every_declared_setting_is_a_file_key() {
        let file = TempFile::new(
            r#"
agent_mode = "agent"
agent_id = "web-1"
host_ip = "10.0.0.1"
docker_label_prefix = "caddy"
agent_filter_label = "fleet"
caddy_api_url = "http://127.0.0.1:2019"
caddy_base_caddyfile = "/etc/caddy/Caddyfile"
policy_file = "/etc/caddy-fleet/policy.toml"
caddy_ingress_network = "ingress"
applier_name = "main"
status_listen = "127.0.0.1:9180"
agent_ttl = "90s"
coalesce_quiet = "200ms"
coalesce_max_delay = "2s"
stream_close_delay = "1h"
proxy_try_duration = "5s"
applier_domains = "*.eu.example.com,eu.example.com"
upstreams_mode = "dynamic"
upstream_dns_listen = "127.0.0.1:8053"
upstream_dns_refresh = "1s"
upstream_dns_grace = "5s"
sync_interval = "5m"
ready_timeout = "30s"
heartbeat_interval = "10s"
stream_max_age = "7d"
stream_replicas = 1
stream_owner = true
nats_url = "nats://nats:4222"
nats_token = "t"
nats_user = "u"
nats_password = "p"
nats_creds_file = "/etc/agent.creds"
nats_tls_required = false
nats_tls_ca = "/etc/ca.pem"
nats_tls_cert = "/etc/cert.pem"
nats_tls_key = "/etc/key.pem"
log_format = "json"
"#,
        );
        load(&["--config", file.path()], &[]).unwrap();
        let keys: Vec<String> = std::fs::read_to_string(&file.0)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_string()))
            .collect();
        let declared: Vec<String> = declared()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        assert_eq!(
            keys, declared,
            "the file above lists every setting, in order"
        );
    }

    #[test]
    fn file_errors_are_typed_and_name_the_key() {
        let unknown = TempFile::new("nats_urll = \"nats://x:4222\"\n");
        let err = load(&["--config", unknown.path()], &[]).unwrap_err();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "nats_urll"),
            "{err:?}"
        );
        assert!(one_line(&err).contains("unknown setting `nats_urll`"));

        let nested = TempFile::new("[nats]\nurl = \"nats://x:4222\"\n");
        let err = load(&["--config", nested.path()], &[]).unwrap_err();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "nats"),
            "{err:?}"
        );

        let bad = TempFile::new("stream_max_age = \"a week\"\n");
        let err = load(&["--config", bad.path()], &[]).unwrap_err();
        assert!(
            matches!(&err, SettingsError::InvalidFileValue { key, .. } if key == "stream_max_age"),
            "{err:?}"
        );
        assert!(one_line(&err).contains("stream_max_age: \"a week\" is not a duration"));

        let wrong_type = TempFile::new("stream_replicas = [1]\n");
        let err = load(&["--config", wrong_type.path()], &[]).unwrap_err();
        assert!(
            matches!(&err, SettingsError::InvalidFileValue { key, .. } if key == "stream_replicas"),
            "{err:?}"
        );
        one_line(&err);

        let syntax = TempFile::new("agent_id = \"a\"\nnats_url = \n");
        let err = load(&["--config", syntax.path()], &[]).unwrap_err();
        assert!(
            matches!(err, SettingsError::MalformedFile { line: Some(2), .. }),
            "{err:?}"
        );
        assert!(one_line(&err).contains("not valid TOML at line 2"));

        let err = load(&["--config", "/nonexistent/fleet.toml"], &[]).unwrap_err();
        assert!(
            matches!(err, SettingsError::UnreadableFile { .. }),
            "{err:?}"
        );
        assert!(one_line(&err).starts_with("--config /nonexistent/fleet.toml: cannot read it"));
    }

    #[test]
    fn flag_and_variable_errors_name_the_variable() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                &[],
                &[("AGENT_MODE", "edge")],
                "AGENT_MODE: \"edge\" is not a mode",
            ),
            (
                &["--agent-mode", "edge"],
                &[],
                "AGENT_MODE: \"edge\" is not a mode",
            ),
            (
                &[],
                &[("AGENT_ID", "web.1")],
                "AGENT_ID: invalid agent ID \"web.1\"",
            ),
            (
                &["agent", "--agent-id", "web 1"],
                &[("AGENT_ID", "fine")],
                "AGENT_ID: invalid agent ID \"web 1\"",
            ),
            (
                &[],
                &[("HOST_IP", "not an address")],
                "HOST_IP: \"not an address\" is neither an IP address nor a DNS name",
            ),
            (
                &[],
                &[("AGENT_FILTER_LABEL", "=x")],
                "AGENT_FILTER_LABEL: invalid AGENT_FILTER_LABEL",
            ),
            (
                &["--caddy-api-url", "localhost:2019"],
                &[],
                "CADDY_API_URL: malformed URL \"localhost:2019\"",
            ),
            (
                &[],
                &[("CADDY_API_URL", "http://")],
                "CADDY_API_URL: malformed URL",
            ),
            (
                &[],
                &[("APPLIER_NAME", "main applier")],
                "APPLIER_NAME: invalid name \"main applier\"",
            ),
            (
                &[],
                &[("STATUS_LISTEN", "9180")],
                "STATUS_LISTEN: \"9180\" is not an address",
            ),
            (
                &[],
                &[("AGENT_TTL", "soon")],
                "AGENT_TTL: \"soon\" is not a duration",
            ),
            (
                &[],
                &[("COALESCE_QUIET", "1,5s")],
                "COALESCE_QUIET: \"1,5s\" is not a duration",
            ),
            (
                &[],
                &[("COALESCE_MAX_DELAY", "2 parsecs")],
                "COALESCE_MAX_DELAY: \"2 parsecs\" is not a duration",
            ),
            (
                &[],
                &[("SYNC_INTERVAL", "-5m")],
                "SYNC_INTERVAL: \"-5m\" is not a duration",
            ),
            (
                &["--heartbeat-interval", "10x"],
                &[],
                "HEARTBEAT_INTERVAL: \"10x\" is not a duration",
            ),
            (
                &[],
                &[("STREAM_MAX_AGE", "300000000000000d")],
                "STREAM_MAX_AGE: \"300000000000000d\" is too long",
            ),
            (
                &[],
                &[("STREAM_REPLICAS", "7")],
                "STREAM_REPLICAS: 7 replicas: use 1 to 5",
            ),
            (
                &[],
                &[("STREAM_REPLICAS", "three")],
                "STREAM_REPLICAS: \"three\" is not a number of replicas",
            ),
            (
                &[],
                &[("NATS_URL", "nats://bad host:x")],
                "NATS_URL: malformed URL \"nats://bad host:x\"",
            ),
            (&[], &[("NATS_URL", " , ")], "NATS_URL: no URL given"),
            (
                &[],
                &[("NATS_TLS_REQUIRED", "maybe")],
                "NATS_TLS_REQUIRED: \"maybe\" is not a yes or no",
            ),
            (
                &[],
                &[("LOG_FORMAT", "xml")],
                "LOG_FORMAT: \"xml\" is not a log format",
            ),
        ];
        for (args, env, expected) in cases {
            let err = load(args, env).expect_err(expected);
            assert!(
                matches!(err, SettingsError::InvalidValue { .. }),
                "{expected}: {err:?}"
            );
            let text = one_line(&err);
            assert!(
                text.starts_with(expected),
                "{text:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn settings_that_do_not_work_together_are_refused_in_one_line() {
        let nats = |env: &[(&str, &str)]| load(&[], env).unwrap().nats_config("t".into());
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("NATS_USER", "u")],
                "NATS_PASSWORD: NATS_USER is set without a password",
            ),
            (
                &[("NATS_PASSWORD", "p")],
                "NATS_USER: NATS_PASSWORD is set without a user",
            ),
            (
                &[
                    ("NATS_TOKEN", "t"),
                    ("NATS_USER", "u"),
                    ("NATS_PASSWORD", "p"),
                ],
                "NATS_TOKEN: several NATS credentials are set",
            ),
            (
                &[("NATS_CREDS_FILE", "/nonexistent/agent.creds")],
                "NATS_CREDS_FILE: cannot read /nonexistent/agent.creds",
            ),
            (
                &[("NATS_TLS_CA", "/nonexistent/ca.pem")],
                "NATS_TLS_CA: cannot read /nonexistent/ca.pem",
            ),
            (
                &[("NATS_TLS_CERT", "/nonexistent/cert.pem")],
                "NATS_TLS_CERT: cannot read /nonexistent/cert.pem",
            ),
            (
                &[("NATS_TLS_KEY", "/nonexistent/key.pem")],
                "NATS_TLS_KEY: cannot read /nonexistent/key.pem",
            ),
        ];
        for (env, expected) in cases {
            let err = nats(env).expect_err(expected);
            let text = one_line(&err);
            assert!(
                text.starts_with(expected),
                "{text:?} should start with {expected:?}"
            );
        }
        let certificate = TempFile::new("not really a certificate");
        let err = nats(&[("NATS_TLS_CERT", certificate.path())]).unwrap_err();
        assert!(one_line(&err).starts_with("NATS_TLS_CERT: a client certificate needs its key"));

        let err = load(&[], &[("CADDY_BASE_CADDYFILE", "/nonexistent/Caddyfile")])
            .unwrap()
            .applier_config(None)
            .unwrap_err();
        assert!(
            one_line(&err).starts_with("CADDY_BASE_CADDYFILE: cannot read /nonexistent/Caddyfile")
        );

        let err = load(&[], &[("APPLIER_DOMAINS", "a.test,https://b.test")])
            .unwrap()
            .applier_config(None)
            .unwrap_err();
        assert!(
            one_line(&err).starts_with("APPLIER_DOMAINS: \"https://b.test\" is not a host pattern"),
            "{}",
            one_line(&err)
        );

        let err = load(
            &[],
            &[("UPSTREAMS", "dynamic"), ("UPSTREAM_DNS_GRACE", "1s")],
        )
        .unwrap()
        .applier_config(None)
        .unwrap_err();
        assert!(
            one_line(&err)
                .starts_with("UPSTREAM_DNS_GRACE: 1s is not longer than UPSTREAM_DNS_REFRESH (1s)"),
            "{}",
            one_line(&err)
        );
    }

    #[test]
    fn settings_become_the_components_configurations() {
        let s = load(
            &[],
            &[
                ("AGENT_ID", "web-1"),
                ("HOST_IP", "10.0.0.7"),
                ("DOCKER_LABEL_PREFIX", "fleet"),
                ("SYNC_INTERVAL", "1m"),
                ("READY_TIMEOUT", "0s"),
                ("STREAM_CLOSE_DELAY", "90s"),
                ("PROXY_TRY_DURATION", "0s"),
                ("APPLIER_DOMAINS", "*.eu.test, eu.test"),
                ("UPSTREAMS", "Dynamic"),
                ("UPSTREAM_DNS_LISTEN", "127.0.0.1:5399"),
                ("UPSTREAM_DNS_REFRESH", "2s"),
                ("AGENT_TTL", "2m"),
                ("CADDY_INGRESS_NETWORK", "ingress"),
                ("STREAM_MAX_AGE", "2d"),
                ("STREAM_REPLICAS", "3"),
                ("NATS_USER", "agent1"),
                ("NATS_PASSWORD", "secret"),
            ],
        )
        .unwrap();
        let agent = s.agent();
        let publisher = s.publisher_config(&agent).unwrap();
        assert_eq!(publisher.host_address, "10.0.0.7");
        assert_eq!(publisher.label_prefix, "fleet");
        assert_eq!(publisher.sync_interval, Duration::from_secs(60));
        assert_eq!(publisher.ready_timeout, Duration::ZERO);
        let applier = s.applier_config(Some(&agent)).unwrap();
        assert_eq!(applier.name, "web-1");
        assert_eq!(
            applier.translate.stream_close_delay,
            Some(Duration::from_secs(90))
        );
        assert_eq!(applier.translate.proxy_try_duration, None);
        assert_eq!(
            applier.translate.dynamic_upstreams,
            Some(DynamicUpstreams {
                resolver: "127.0.0.1:5399".parse().unwrap(),
                refresh: Duration::from_secs(2),
                grace_period: Duration::from_secs(5),
            })
        );
        assert_eq!(
            applier
                .translate
                .shard
                .as_ref()
                .map(|s| s.patterns().to_vec()),
            Some(vec!["*.eu.test".to_string(), "eu.test".to_string()])
        );
        assert_eq!(applier.agent_ttl, Some(Duration::from_secs(120)));
        assert_eq!(applier.translate.label_prefix, "fleet");
        assert_eq!(applier.translate.local.unwrap().network, "ingress");
        let stream = s.stream();
        assert_eq!(
            (stream.max_age, stream.replicas),
            (Duration::from_secs(2 * 86_400), 3)
        );
        let nats = s.publisher_nats_config(&agent).unwrap();
        assert_eq!(nats.inbox_prefix.as_deref(), Some("_INBOX_web-1"));
        assert!(matches!(nats.auth, NatsAuth::UserPassword { .. }));
    }

    #[test]
    fn durations() {
        let ok = |text: &str| parse_duration(text).unwrap();
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h 30m"), Duration::from_secs(5400));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(ok(" 2s "), Duration::from_secs(2));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("7"), Duration::from_secs(7), "a bare number is seconds");
        assert_eq!(ok("36500d"), MAX_DURATION);
        for too_long in [
            "36501d",
            "300000000000000d",
            "18446744073709551616",
            "99999999999999999999999s",
        ] {
            assert!(
                matches!(parse_duration(too_long), Err(DurationError::TooLong { .. })),
                "{too_long}: {:?}",
                parse_duration(too_long)
            );
        }
        for malformed in ["", "soon", "1,5h", "-5s", "5 parsecs", "ms"] {
            assert!(
                matches!(
                    parse_duration(malformed),
                    Err(DurationError::Malformed { .. })
                ),
                "{malformed}: {:?}",
                parse_duration(malformed)
            );
        }
    }

    #[test]
    fn the_command_is_well_formed() {
        Settings::command(Command::new("caddy-fleet")).debug_assert();
    }

    /// The README's settings table lists exactly the declared settings,
    /// each with its file key and default.
    #[test]
    fn the_readme_settings_table_matches_the_declaration() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Settings\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README has a Settings section");
        let rows: Vec<Vec<&str>> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
            .collect();
        let names = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                })
                .map(str::to_string)
                .collect()
        };
        let mut in_readme: Vec<String> = rows.iter().flat_map(|row| names(row[0])).collect();
        let mut declared_variables: Vec<String> =
            declared().get_arguments().map(variable).collect();
        in_readme.sort();
        declared_variables.sort();
        assert_eq!(
            in_readme, declared_variables,
            "README settings table vs. the settings declared in src/settings.rs"
        );
        let declared = declared();
        for row in rows.iter().filter(|row| names(row[0]).len() == 1) {
            let name = &names(row[0])[0];
            let arg = declared
                .get_arguments()
                .find(|arg| variable(arg) == *name)
                .unwrap();
            let key = arg.get_id().as_str();
            assert!(
                row[0].contains(&format!("`{key}`")),
                "{name}: file key `{key}` missing"
            );
            if let Some(default) = arg.get_default_values().first() {
                let default = format!("`{}`", default.to_string_lossy());
                assert!(
                    row[2].contains(&default),
                    "{name}: README default {:?}, declared {default}",
                    row[2]
                );
            }
        }
    }
}
