//! A small client for Caddy's admin API: adapt a Caddyfile, read the
//! running `admin` block, load a whole JSON config.
//!
//! [`CaddyApi`] is what the applier needs of Caddy; [`CaddyAdmin`] is the
//! real one over HTTP, and the convergence loop's unit tests drive an
//! in-memory one.

use std::future::Future;
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::Value;

/// Why Caddy did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaddyError {
    /// Caddy could not be reached (down, restarting, wrong address).
    #[error("cannot reach Caddy's admin API at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    /// A config could not be read or written as JSON (a bug of ours: the
    /// push is not made).
    #[error("the config to load is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Caddy answered with an error, e.g. a config it refuses.
    #[error("Caddy refused {what} ({status}): {message}")]
    Refused {
        what: &'static str,
        status: u16,
        message: String,
    },
}

impl CaddyError {
    /// Whether Caddy accepted the connection but did not answer in time:
    /// busy (with a long load, perhaps another client's), not gone.
    pub fn timed_out(&self) -> bool {
        matches!(self, CaddyError::Unreachable { source, .. } if source.is_timeout() && !source.is_connect())
    }
}

/// What the applier asks of Caddy.
pub trait CaddyApi: Send + Sync {
    /// Adapts a Caddyfile to JSON without loading it.
    fn adapt(&self, caddyfile: &str) -> impl Future<Output = Result<Value, CaddyError>> + Send;
    /// Adapts a whole Caddyfile and keeps the answer as JSON text: a
    /// whole config is only forwarded, never walked, and as a `Value` it
    /// takes about fifteen times its text's size.
    fn adapt_raw(
        &self,
        caddyfile: &str,
    ) -> impl Future<Output = Result<Box<RawValue>, CaddyError>> + Send;
    /// The running config's `admin` block, if any.
    fn running_admin(&self) -> impl Future<Output = Result<Option<Value>, CaddyError>> + Send;
    /// Whether the running config holds an object with `@id` `id`.
    fn has_id(&self, id: &str) -> impl Future<Output = Result<bool, CaddyError>> + Send;
    /// Replaces Caddy's whole config with `config` (JSON text).
    fn load(&self, config: &str) -> impl Future<Output = Result<(), CaddyError>> + Send;
}

impl CaddyApi for CaddyAdmin {
    async fn adapt(&self, caddyfile: &str) -> Result<Value, CaddyError> {
        CaddyAdmin::adapt(self, caddyfile).await
    }
    async fn adapt_raw(&self, caddyfile: &str) -> Result<Box<RawValue>, CaddyError> {
        CaddyAdmin::adapt_raw(self, caddyfile).await
    }
    async fn running_admin(&self) -> Result<Option<Value>, CaddyError> {
        CaddyAdmin::running_admin(self).await
    }
    async fn has_id(&self, id: &str) -> Result<bool, CaddyError> {
        CaddyAdmin::has_id(self, id).await
    }
    async fn load(&self, config: &str) -> Result<(), CaddyError> {
        CaddyAdmin::load(self, config).await
    }
}

/// How long a read of Caddy's config (a health check) may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an `/adapt` or `/load` may take: at 100,000 sites one load
/// took 17 s on two cores, and one waits behind any other client's.
const WRITE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long connecting may take: an unreachable Caddy is known soon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Caddy's admin API at one address.
#[derive(Debug, Clone)]
pub struct CaddyAdmin {
    base: String,
    http: reqwest::Client,
}

impl CaddyAdmin {
    /// A client for the admin API at `base_url` (e.g. `http://127.0.0.1:2019`).
    pub fn new(base_url: &str) -> Result<Self, reqwest::Error> {
        CaddyAdmin::with_read_timeout(base_url, READ_TIMEOUT)
    }

    /// [`CaddyAdmin::new`] with another timeout for reads (tests).
    pub fn with_read_timeout(base_url: &str, read: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(read)
            // Caddy replaces its admin server on every load and closes the
            // connection, so pooled connections would go stale.
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(CaddyAdmin {
            base: base_url.trim_end_matches('/').to_string(),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CaddyError> {
        let response = request
            .send()
            .await
            .map_err(|source| CaddyError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(body);
        Err(CaddyError::Refused {
            what,
            status: status.as_u16(),
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        response: reqwest::Response,
    ) -> Result<T, CaddyError> {
        response
            .json()
            .await
            .map_err(|source| CaddyError::Unreachable {
                url: format!("{} ({what})", self.base),
                source,
            })
    }

    /// Adapts a Caddyfile to JSON without loading it.
    pub async fn adapt(&self, caddyfile: &str) -> Result<Value, CaddyError> {
        Ok(self.adapt_result(caddyfile).await?.unwrap_or(Value::Null))
    }

    /// Adapts a Caddyfile and keeps the answer's `result` as JSON text
    /// (`null` when there is none).
    pub async fn adapt_raw(&self, caddyfile: &str) -> Result<Box<RawValue>, CaddyError> {
        Ok(self
            .adapt_result(caddyfile)
            .await?
            .unwrap_or_else(|| RawValue::NULL.to_owned()))
    }

    /// The `result` of Caddy's `/adapt` of `caddyfile`, read as `T`; its
    /// warnings are not read.
    async fn adapt_result<T: serde::de::DeserializeOwned>(
        &self,
        caddyfile: &str,
    ) -> Result<Option<T>, CaddyError> {
        #[derive(serde::Deserialize)]
        struct Answer<T> {
            result: Option<T>,
        }
        let request = self
            .http
            .post(self.url("/adapt"))
            .timeout(WRITE_TIMEOUT)
            .header("Content-Type", "text/caddyfile")
            .body(caddyfile.to_string());
        let response = self.send("the Caddyfile", request).await?;
        let answer: Answer<T> = self.json("adapt", response).await?;
        Ok(answer.result)
    }

    /// The running config's `admin` block, if any.
    pub async fn running_admin(&self) -> Result<Option<Value>, CaddyError> {
        let response = self
            .send("reading config", self.http.get(self.url("/config/admin")))
            .await;
        match response {
            Ok(response) => {
                let admin: Value = self.json("config/admin", response).await?;
                Ok(Some(admin).filter(|v| !v.is_null()))
            }
            // Caddy ≥ 2.7.5 answers 404 for a path that is not set.
            Err(CaddyError::Refused { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The whole running config.
    pub async fn running_config(&self) -> Result<Value, CaddyError> {
        let response = self
            .send("reading config", self.http.get(self.url("/config/")))
            .await?;
        self.json("config", response).await
    }

    /// Whether the running config holds an object with `@id` `id`.
    pub async fn has_id(&self, id: &str) -> Result<bool, CaddyError> {
        match self
            .send(
                "reading config",
                self.http.get(self.url(&format!("/id/{id}"))),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(CaddyError::Refused { status: 404, .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Replaces Caddy's whole config with `config` (JSON text).
    pub async fn load(&self, config: &str) -> Result<(), CaddyError> {
        let request = self
            .http
            .post(self.url("/load"))
            .timeout(WRITE_TIMEOUT)
            .header("Content-Type", "application/json")
            .body(config.to_string());
        self.send("the config", request).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_caddy_that_does_not_answer_in_time_is_busy_not_gone() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let busy = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let caddy =
            CaddyAdmin::with_read_timeout(&format!("http://{busy}"), Duration::from_millis(200))
                .unwrap();
        let error = caddy.has_id("x").await.unwrap_err();
        assert!(error.timed_out(), "{error}");
        hold.abort();

        // Nothing listens: gone, not busy.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let caddy =
            CaddyAdmin::with_read_timeout(&format!("http://{closed}"), Duration::from_millis(200))
                .unwrap();
        let error = caddy.has_id("x").await.unwrap_err();
        assert!(!error.timed_out(), "{error}");
    }
}
