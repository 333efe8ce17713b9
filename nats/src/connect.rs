//! Connecting to NATS: URL list, authentication and TLS.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};
use serde::Deserialize;

/// How to reach and authenticate to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://nats-1:4222`; the client fails over between them.
    pub urls: Vec<String>,
    /// How the client authenticates.
    #[serde(default)]
    pub auth: NatsAuth,
    /// TLS settings.
    #[serde(default)]
    pub tls: NatsTls,
    /// The connection name shown in the server's monitoring.
    #[serde(default)]
    pub name: Option<String>,
    /// Keep retrying when no server is reachable at start, instead of failing.
    #[serde(default)]
    pub retry_initial_connect: bool,
    /// Prefix of this client's reply subjects (e.g. `_INBOX_agent1`), so a
    /// NATS user can be allowed to read only its own replies.
    #[serde(default)]
    pub inbox_prefix: Option<String>,
    /// How many messages a subscription buffers before dropping (async-nats'
    /// default when unset). A subscription to subjects agents publish on
    /// keeps it small, so a flood costs bounded memory.
    #[serde(default)]
    pub subscription_capacity: Option<usize>,
}

/// NATS authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, tag = "strategy", rename_all = "snake_case")]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A server token (`authorization { token: … }`).
    Token { token: String },
    /// A user and password.
    UserPassword { user: String, password: String },
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes it.
    CredentialsFile { path: PathBuf },
}

/// TLS to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// Refuse to talk to a server without TLS.
    #[serde(default)]
    pub required: bool,
    /// A PEM bundle of CAs to trust for the server certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate, for servers that verify clients.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The PEM key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No URL was given.
    #[error("no NATS URL given: set NATS_URL (e.g. nats://nats:4222)")]
    NoUrl,
    /// The credentials file cannot be read.
    #[error("cannot read NATS credentials file {path}: {source} (check NATS_CREDS_FILE)")]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A client certificate without its key, or the reverse.
    #[error("NATS TLS client authentication needs both a certificate and a key file")]
    IncompleteClientCert,
    /// The server refused the credentials.
    #[error("NATS at {urls} refused the credentials ({source}): check NATS_TOKEN, NATS_USER/NATS_PASSWORD or NATS_CREDS_FILE, and that this user exists in the server's authorization block")]
    Refused {
        urls: String,
        source: async_nats::ConnectError,
    },
    /// The server could not be reached.
    #[error("cannot connect to NATS at {urls}: {source} (is NATS_URL right and the server up?)")]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
}

impl ConnectError {
    /// True when the server refused the credentials.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, ConnectError::Refused { .. })
    }
}

/// Opens a NATS connection with `config`.
pub async fn connect(config: &NatsConfig) -> Result<Client, ConnectError> {
    if config.urls.is_empty() {
        return Err(ConnectError::NoUrl);
    }
    let mut options = match &config.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::Token { token } => ConnectOptions::new().token(token.clone()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::new().user_and_password(user.clone(), password.clone())
        }
        NatsAuth::CredentialsFile { path } => ConnectOptions::new()
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: path.clone(),
                source,
            })?,
    };
    if config.tls.required {
        options = options.require_tls(true);
    }
    if let Some(capacity) = config.subscription_capacity {
        options = options.subscription_capacity(capacity);
    }
    if let Some(ca) = &config.tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => return Err(ConnectError::IncompleteClientCert),
    }
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    if let Some(prefix) = &config.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    if config.retry_initial_connect {
        options = options.retry_on_initial_connect();
    }
    options = options
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| crate::retry::RetryPolicy::NATS.nth_delay(attempt))
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection event.");
        });
    options
        .connect(config.urls.as_slice())
        .await
        .map_err(|source| {
            let urls = config.urls.join(",");
            match source.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => {
                    ConnectError::Refused { urls, source }
                }
                _ => ConnectError::Connect { urls, source },
            }
        })
}
