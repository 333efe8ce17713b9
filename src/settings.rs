//! Every setting of caddy-fleet, from four layers: `--flags` over
//! environment variables over the TOML file (`--config`) over defaults.
//!
//! A setting has one name everywhere: the environment variable
//! (`NATS_URL`), its lowercase form as the file key (`nats_url = "…"`) and
//! the flag (`--nats-url`). The doc comments below are the user docs; the
//! README's settings table repeats them.
//!
//! Loading never half-succeeds: an unknown file key, a malformed URL, an
//! invalid agent ID or an unreadable credentials file stops start-up with
//! one line naming the setting and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caddy_fleet_nats::{NatsAuth, NatsConfig, NatsTls};
use caddy_fleet_publisher::FilterLabel;
use caddy_fleet_schema::AgentId;
use serde::Deserialize;

/// What runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// The raw settings, as the layers give them. Field names are the file
/// keys; upper-cased they are the environment variables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `standalone` (default), `server` or `agent`; used when no subcommand is given.
    #[serde(default = "defaults::mode")]
    pub agent_mode: Mode,
    /// This host's agent ID, `[A-Za-z0-9_-]`, at most 64 characters. Default: the hostname, sanitised.
    pub agent_id: Option<String>,
    /// Address (IP or DNS name) other hosts reach this host's published ports at. Default: the default route's interface address.
    pub host_ip: Option<String>,
    /// Only labels under this prefix are read.
    #[serde(default = "defaults::label_prefix")]
    pub docker_label_prefix: String,
    /// Only containers with this label (`key` or `key=value`) are published.
    pub agent_filter_label: Option<String>,
    /// Caddy's admin API (keep it on loopback).
    #[serde(default = "defaults::caddy_api_url")]
    pub caddy_api_url: String,
    /// The Caddyfile Caddy runs with; generated sites are merged into it.
    pub caddy_base_caddyfile: Option<PathBuf>,
    /// The applier's durable consumer and checkpoint name. Default: the agent ID.
    pub applier_name: Option<String>,
    /// Where the applier serves /healthz, /readyz, /metrics and /status.
    #[serde(default = "defaults::status_listen")]
    pub status_listen: String,
    /// Remove a silent agent's routes after this long (e.g. `90s`). Default: never.
    pub agent_ttl: Option<String>,
    /// Push once no event arrived for this long.
    #[serde(default = "defaults::coalesce_quiet")]
    pub coalesce_quiet: String,
    /// …but at most this long after the first event of a burst.
    #[serde(default = "defaults::coalesce_max_delay")]
    pub coalesce_max_delay: String,
    /// How often a publisher re-sends its full container set.
    #[serde(default = "defaults::sync_interval")]
    pub sync_interval: String,
    /// How often a publisher sends a heartbeat.
    #[serde(default = "defaults::heartbeat_interval")]
    pub heartbeat_interval: String,
    /// Docker network Caddy shares with this host's containers (server and
    /// standalone modes): they are reached at their IP there, without published ports.
    pub caddy_ingress_network: Option<String>,
    /// How long the log keeps history (the applier creates the stream with it).
    #[serde(default = "defaults::stream_max_age")]
    pub stream_max_age: String,
    /// Stream replicas: 1 on a single NATS, 3 on a 3-node cluster.
    #[serde(default = "defaults::stream_replicas")]
    pub stream_replicas: usize,
    /// NATS servers, comma-separated.
    #[serde(default = "defaults::nats_url")]
    pub nats_url: String,
    /// NATS token.
    pub nats_token: Option<String>,
    /// NATS user (with `nats_password`).
    pub nats_user: Option<String>,
    /// NATS password.
    pub nats_password: Option<String>,
    /// NATS credentials file (user JWT and NKey seed).
    pub nats_creds_file: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS.
    #[serde(default)]
    pub nats_tls_required: bool,
    /// CA bundle for the NATS server certificate.
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate for NATS.
    pub nats_tls_cert: Option<PathBuf>,
    /// Key of the client certificate.
    pub nats_tls_key: Option<PathBuf>,
}

mod defaults {
    use super::Mode;
    pub fn mode() -> Mode {
        Mode::Standalone
    }
    pub fn label_prefix() -> String {
        "caddy".into()
    }
    pub fn caddy_api_url() -> String {
        "http://127.0.0.1:2019".into()
    }
    pub fn status_listen() -> String {
        "127.0.0.1:9180".into()
    }
    pub fn coalesce_quiet() -> String {
        "200ms".into()
    }
    pub fn coalesce_max_delay() -> String {
        "2s".into()
    }
    pub fn sync_interval() -> String {
        "5m".into()
    }
    pub fn heartbeat_interval() -> String {
        "10s".into()
    }
    pub fn stream_max_age() -> String {
        "7d".into()
    }
    pub fn stream_replicas() -> usize {
        1
    }
    pub fn nats_url() -> String {
        "nats://127.0.0.1:4222".into()
    }
}

/// Every key, in the order of the README's table.
pub const KEYS: &[&str] = &[
    "agent_mode",
    "agent_id",
    "host_ip",
    "docker_label_prefix",
    "agent_filter_label",
    "caddy_api_url",
    "caddy_base_caddyfile",
    "applier_name",
    "status_listen",
    "agent_ttl",
    "coalesce_quiet",
    "coalesce_max_delay",
    "sync_interval",
    "heartbeat_interval",
    "caddy_ingress_network",
    "stream_max_age",
    "stream_replicas",
    "nats_url",
    "nats_token",
    "nats_user",
    "nats_password",
    "nats_creds_file",
    "nats_tls_required",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
];

/// The predecessor's variables that no longer apply, and what replaces them.
pub const RETIRED: &[(&str, &str)] = &[
    ("CADDY_SERVER_URL", "agents no longer talk to Caddy: set NATS_URL to the server's NATS"),
    ("CADDY_API_TOKEN", "agents no longer talk to Caddy: use NATS credentials (NATS_USER/NATS_PASSWORD, NATS_CREDS_FILE or NATS_TOKEN)"),
];

/// A setting that stops start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct SettingsError {
    /// The setting, as its environment variable (or the config file).
    pub setting: String,
    /// What is wrong and what to do.
    pub message: String,
}

fn error(setting: &str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        setting: setting.to_string(),
        message: message.into(),
    }
}

/// Where each value comes from, for tests: the environment as a list.
pub type Env = Vec<(String, String)>;

impl Settings {
    /// Loads the settings: defaults, then `file`, then `env`, then `flags`
    /// (`(key, value)` pairs of the flags given).
    pub fn load(
        file: Option<&Path>,
        env: &Env,
        flags: &[(&'static str, String)],
    ) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error("--config", format!("cannot read {}: {e}", path.display())))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        for (name, value) in env {
            let key = name.to_ascii_lowercase();
            // An empty variable counts as unset (compose files pass `${X:-}`).
            if KEYS.contains(&key.as_str()) && !value.is_empty() {
                builder = builder
                    .set_override(key, value.clone())
                    .map_err(|e| error(name, e.to_string()))?;
            }
        }
        for (key, value) in flags {
            builder = builder
                .set_override(*key, value.clone())
                .map_err(|e| error(&format!("--{}", key.replace('_', "-")), e.to_string()))?;
        }
        let config = builder
            .build()
            .map_err(|e| error("--config", e.to_string()))?;
        config.try_deserialize::<Settings>().map_err(|e| {
            let message = e.to_string();
            match message.split('`').nth(1).filter(|_| message.contains("unknown field")) {
                Some(key) => error(
                    "--config",
                    format!("unknown setting `{key}` in the config file; valid keys are the settings table's, e.g. nats_url, agent_id"),
                ),
                None => error("--config", message),
            }
        })
    }

    /// This host's agent ID (validated), defaulting to the hostname.
    pub fn agent(&self) -> Result<AgentId, SettingsError> {
        match &self.agent_id {
            Some(id) => AgentId::new(id.clone()).map_err(|e| error("AGENT_ID", e.to_string())),
            None => Ok(AgentId::sanitize(&hostname())),
        }
    }

    /// The applier's name: `APPLIER_NAME`, else the agent ID.
    pub fn applier(&self) -> Result<String, SettingsError> {
        match &self.applier_name {
            Some(name) => AgentId::new(name.clone())
                .map(|a| a.to_string())
                .map_err(|_| error("APPLIER_NAME", format!("invalid name {name:?}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"))),
            None => Ok(self.agent()?.to_string()),
        }
    }

    /// The label filter, parsed.
    pub fn filter_label(&self) -> Result<Option<FilterLabel>, SettingsError> {
        self.agent_filter_label
            .as_deref()
            .map(|f| {
                f.parse::<FilterLabel>()
                    .map_err(|e| error("AGENT_FILTER_LABEL", e.to_string()))
            })
            .transpose()
    }

    /// Caddy's admin URL, checked.
    pub fn caddy_api(&self) -> Result<String, SettingsError> {
        let url = self.caddy_api_url.trim();
        let ok = (url.starts_with("http://") || url.starts_with("https://")) && reqwest_url_ok(url);
        if ok {
            Ok(url.to_string())
        } else {
            Err(error(
                "CADDY_API_URL",
                format!("malformed URL {url:?}: write e.g. http://127.0.0.1:2019"),
            ))
        }
    }

    /// A duration setting, parsed.
    pub fn duration(&self, setting: &str, value: &str) -> Result<Duration, SettingsError> {
        parse_duration(value).map_err(|m| error(setting, m))
    }

    /// The stream settings the applier creates the log with.
    pub fn stream(&self) -> Result<caddy_fleet_nats::StreamSettings, SettingsError> {
        if !(1..=5).contains(&self.stream_replicas) {
            return Err(error(
                "STREAM_REPLICAS",
                format!(
                    "{} replicas: use 1 to 5 (3 on a 3-node cluster)",
                    self.stream_replicas
                ),
            ));
        }
        Ok(caddy_fleet_nats::StreamSettings {
            max_age: self.duration("STREAM_MAX_AGE", &self.stream_max_age)?,
            replicas: self.stream_replicas,
            ..caddy_fleet_nats::StreamSettings::default()
        })
    }

    /// The status listener address.
    pub fn status_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.status_listen.parse().map_err(|_| {
            error(
                "STATUS_LISTEN",
                format!(
                    "{:?} is not an address: write e.g. 127.0.0.1:9180",
                    self.status_listen
                ),
            )
        })
    }

    /// The NATS connection settings, checked (URLs parse, exactly one kind
    /// of credentials, files readable).
    pub fn nats(&self, name: String) -> Result<NatsConfig, SettingsError> {
        let urls: Vec<String> = self
            .nats_url
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(error(
                "NATS_URL",
                "no URL given: write e.g. nats://nats:4222",
            ));
        }
        for url in &urls {
            if let Err(e) = url.parse::<caddy_fleet_nats::async_nats::ServerAddr>() {
                return Err(error(
                    "NATS_URL",
                    format!("malformed URL {url:?} ({e}): write e.g. nats://nats:4222"),
                ));
            }
        }
        let auth = match (&self.nats_token, &self.nats_user, &self.nats_password, &self.nats_creds_file) {
            (None, None, None, None) => NatsAuth::None,
            (Some(token), None, None, None) => NatsAuth::Token { token: token.clone() },
            (None, Some(user), Some(password), None) => NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, Some(_), None, None) => return Err(error("NATS_PASSWORD", "NATS_USER is set without a password: set NATS_PASSWORD")),
            (None, None, Some(_), None) => return Err(error("NATS_USER", "NATS_PASSWORD is set without a user: set NATS_USER")),
            (None, None, None, Some(path)) => {
                readable("NATS_CREDS_FILE", path)?;
                NatsAuth::CredentialsFile { path: path.clone() }
            }
            _ => {
                return Err(error(
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
            return Err(error("NATS_TLS_CERT", "a client certificate needs its key and the reverse: set both NATS_TLS_CERT and NATS_TLS_KEY"));
        }
        Ok(NatsConfig {
            urls,
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
}

fn reqwest_url_ok(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or("");
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    !host.is_empty() && !host.contains(char::is_whitespace) && {
        match host.rsplit_once(':') {
            Some((h, port)) if !h.ends_with(']') || host.starts_with('[') => {
                !h.is_empty() && port.parse::<u16>().is_ok()
            }
            _ => true,
        }
    }
}

fn readable(setting: &str, path: &Path) -> Result<(), SettingsError> {
    std::fs::File::open(path).map(|_| ()).map_err(|e| {
        error(
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

/// Parses `500ms`, `2s`, `5m`, `1h`, `7d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration: write e.g. 500ms, 30s, 5m, 1h or 7d");
    let number: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "" | "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        "d" => Ok(Duration::from_secs(number * 86_400)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile_path::TempFile {
        tempfile_path::TempFile::new(text)
    }

    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new(text: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "caddy-fleet-settings-{}.toml",
                    uuid::Uuid::new_v4().simple()
                ));
                std::fs::write(&path, text).unwrap();
                TempFile(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let f = file(
            "agent_id = \"from-file\"\nhost_ip = \"10.0.0.1\"\nnats_url = \"nats://file:4222\"\n",
        );
        let s = Settings::load(
            Some(&f.0),
            &env(&[
                ("AGENT_ID", "from-env"),
                ("NATS_URL", "nats://env:4222"),
                ("UNRELATED", "x"),
            ]),
            &[("agent_id", "from-flag".to_string())],
        )
        .unwrap();
        assert_eq!(s.agent_id.as_deref(), Some("from-flag"));
        assert_eq!(s.nats_url, "nats://env:4222");
        assert_eq!(s.host_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(s.docker_label_prefix, "caddy");
        assert_eq!(s.agent_mode, Mode::Standalone);
    }

    #[test]
    fn environment_values_are_typed() {
        let s = Settings::load(
            None,
            &env(&[("AGENT_MODE", "server"), ("NATS_TLS_REQUIRED", "true")]),
            &[],
        )
        .unwrap();
        assert_eq!(s.agent_mode, Mode::Server);
        assert!(s.nats_tls_required);
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let f = file("nats_urll = \"nats://x:4222\"\n");
        let err = Settings::load(Some(&f.0), &env(&[]), &[]).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting `nats_urll`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_urls_name_the_setting() {
        let s = Settings::load(None, &env(&[("NATS_URL", "nats://bad host:x")]), &[]).unwrap();
        let err = s.nats("t".into()).unwrap_err();
        assert_eq!(err.setting, "NATS_URL", "{err}");
        let s = Settings::load(None, &env(&[("CADDY_API_URL", "127.0.0.1:2019")]), &[]).unwrap();
        let err = s.caddy_api().unwrap_err();
        assert!(
            err.to_string().starts_with("CADDY_API_URL: malformed URL"),
            "{err}"
        );
    }

    #[test]
    fn invalid_agent_ids_and_unreadable_creds_are_refused() {
        let s = Settings::load(None, &env(&[("AGENT_ID", "web.1")]), &[]).unwrap();
        assert!(s
            .agent()
            .unwrap_err()
            .to_string()
            .starts_with("AGENT_ID: invalid agent ID"));
        let s = Settings::load(
            None,
            &env(&[("NATS_CREDS_FILE", "/nonexistent/agent.creds")]),
            &[],
        )
        .unwrap();
        let err = s.nats("t".into()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("NATS_CREDS_FILE: cannot read /nonexistent/agent.creds"),
            "{err}"
        );
    }

    #[test]
    fn stream_settings_are_checked() {
        let s = Settings::load(
            None,
            &env(&[("STREAM_MAX_AGE", "2d"), ("STREAM_REPLICAS", "3")]),
            &[],
        )
        .unwrap();
        let stream = s.stream().unwrap();
        assert_eq!(
            (stream.max_age, stream.replicas),
            (Duration::from_secs(2 * 86_400), 3)
        );
        let s = Settings::load(None, &env(&[("STREAM_REPLICAS", "7")]), &[]).unwrap();
        assert!(s
            .stream()
            .unwrap_err()
            .to_string()
            .starts_with("STREAM_REPLICAS: 7 replicas"));
        let s = Settings::load(None, &env(&[("STREAM_MAX_AGE", "a week")]), &[]).unwrap();
        assert!(s
            .stream()
            .unwrap_err()
            .to_string()
            .starts_with("STREAM_MAX_AGE:"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
    }
}
