//! `caddy-fleet agent add|revoke <id>`: adding a host to the fleet is one
//! command.
//!
//! `add` writes, for a new agent ID:
//! - its NATS account block into the NATS config, between the
//!   `# BEGIN caddy-fleet agents` and `# END caddy-fleet agents` lines: a
//!   user named after the agent with a bcrypt hash of a new random
//!   password, allowed to publish only on `fleet.<id>.>` (imported from the
//!   FLEET account as a service) and to read only `_INBOX_<id>.>`;
//! - its `[agents.<id>]` table into the policy, granting the given domains;
//! - its credentials (`AGENT_ID`, `NATS_USER`, `NATS_PASSWORD`) into
//!   `<credentials dir>/<id>.env`, readable by the owner only, for the
//!   host's `docker-compose --env-file`.
//!
//! `revoke` removes all three. Nothing is written unless every file can be
//! changed: the new texts are computed first, then written. NATS reads its
//! config at start or on `--signal reload`; the applier re-reads the
//! policy by itself.

use std::path::{Path, PathBuf};

use caddy_fleet_schema::AgentId;

const BEGIN: &str = "# BEGIN caddy-fleet agents";
const END: &str = "# END caddy-fleet agents";

/// The files `agent add|revoke` edits.
#[derive(Debug, Clone)]
pub struct AgentFiles {
    /// The NATS server config (`compose/nats/nats.conf`).
    pub nats_config: PathBuf,
    /// The policy (`POLICY_FILE`).
    pub policy: PathBuf,
    /// Where `<id>.env` credential files go.
    pub credentials_dir: PathBuf,
}

/// Why an agent could not be added or revoked.
#[derive(Debug, thiserror::Error)]
pub enum AgentAdminError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no `{BEGIN}` … `{END}` section; add those two lines inside its `accounts {{ }}` block")]
    NoSection { path: PathBuf },
    #[error("agent {agent} already exists in {path}; revoke it first to issue new credentials")]
    Exists { agent: String, path: PathBuf },
    #[error("agent {agent} is not in {path}")]
    Unknown { agent: String, path: PathBuf },
    #[error("{path} is not valid TOML: {reason}")]
    Policy { path: PathBuf, reason: String },
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// What `add` made: the new password is shown once.
#[derive(Debug, Clone)]
pub struct Added {
    pub password: String,
    pub credentials_file: PathBuf,
}

fn read(path: &Path) -> Result<String, AgentAdminError> {
    std::fs::read_to_string(path).map_err(|source| AgentAdminError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), AgentAdminError> {
    std::fs::write(path, text).map_err(|source| AgentAdminError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn block_markers(agent: &AgentId) -> (String, String) {
    (format!("# agent {agent}"), format!("# end agent {agent}"))
}

/// The account block of `agent`, with `hash` as its password.
fn account_block(agent: &AgentId, hash: &str) -> String {
    let (open, close) = block_markers(agent);
    format!(
        "  {open}\n  \"agent-{agent}\" {{\n    users = [\n      {{ user: \"{agent}\", password: {hash}, permissions: {{\n          publish: {{ allow: [\"fleet.{agent}.>\"] }}\n          subscribe: {{ allow: [\"_INBOX_{agent}.>\"] }}\n      }} }}\n    ]\n    imports = [\n      {{ service: {{ account: FLEET, subject: \"fleet.{agent}.>\" }} }}\n    ]\n  }}\n  {close}\n"
    )
}

/// The NATS config with `agent`'s block added before the end marker.
fn nats_with(
    text: &str,
    path: &Path,
    agent: &AgentId,
    hash: &str,
) -> Result<String, AgentAdminError> {
    let (open, _) = block_markers(agent);
    let (Some(_), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        return Err(AgentAdminError::NoSection {
            path: path.to_path_buf(),
        });
    };
    if text.lines().any(|l| l.trim() == open) {
        return Err(AgentAdminError::Exists {
            agent: agent.to_string(),
            path: path.to_path_buf(),
        });
    }
    let line_start = text[..end].rfind('\n').map_or(0, |i| i + 1);
    Ok(format!(
        "{}{}{}",
        &text[..line_start],
        account_block(agent, hash),
        &text[line_start..]
    ))
}

/// The NATS config without `agent`'s block.
fn nats_without(text: &str, path: &Path, agent: &AgentId) -> Result<String, AgentAdminError> {
    let (open, close) = block_markers(agent);
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    let mut found = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed == open {
            inside = true;
            found = true;
        }
        if !inside {
            out.push_str(line);
        }
        if trimmed == close {
            inside = false;
        }
    }
    if found {
        Ok(out)
    } else {
        Err(AgentAdminError::Unknown {
            agent: agent.to_string(),
            path: path.to_path_buf(),
        })
    }
}

fn policy_document(text: &str, path: &Path) -> Result<toml_edit::DocumentMut, AgentAdminError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| AgentAdminError::Policy {
            path: path.to_path_buf(),
            reason: e.to_string().lines().next().unwrap_or_default().to_string(),
        })
}

/// Adds `agent`, granted `domains`.
pub fn add(
    files: &AgentFiles,
    agent: &AgentId,
    domains: &[String],
) -> Result<Added, AgentAdminError> {
    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let hash = bcrypt::hash_with_result(&password, 11)
        .map_err(|e| AgentAdminError::Hash(e.to_string()))?
        .format_for_version(bcrypt::Version::TwoA);

    let nats = nats_with(&read(&files.nats_config)?, &files.nats_config, agent, &hash)?;
    let policy_text = match std::fs::read_to_string(&files.policy) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(AgentAdminError::Read {
                path: files.policy.clone(),
                source,
            })
        }
    };
    let mut policy = policy_document(&policy_text, &files.policy)?;
    let agents = policy
        .entry("agents")
        .or_insert_with(|| {
            let mut table = toml_edit::Table::new();
            table.set_implicit(true);
            toml_edit::Item::Table(table)
        })
        .as_table_mut()
        .ok_or_else(|| AgentAdminError::Policy {
            path: files.policy.clone(),
            reason: "`agents` is not a table".into(),
        })?;
    if agents.contains_key(agent.as_str()) {
        return Err(AgentAdminError::Exists {
            agent: agent.to_string(),
            path: files.policy.clone(),
        });
    }
    let mut grant = toml_edit::Table::new();
    grant["domains"] = toml_edit::value(toml_edit::Array::from_iter(
        domains.iter().map(String::as_str),
    ));
    agents.insert(agent.as_str(), toml_edit::Item::Table(grant));

    let credentials_file = files.credentials_dir.join(format!("{agent}.env"));
    let credentials = format!("AGENT_ID={agent}\nNATS_USER={agent}\nNATS_PASSWORD={password}\n");

    // The only new file first: a missing or unwritable credentials
    // directory then leaves the NATS config and the policy untouched.
    write_private(&credentials_file, &credentials)?;
    let written =
        write(&files.nats_config, &nats).and_then(|()| write(&files.policy, &policy.to_string()));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&credentials_file);
        return Err(error);
    }
    Ok(Added {
        password,
        credentials_file,
    })
}

/// Removes `agent`'s account, policy entry and credentials file.
pub fn revoke(files: &AgentFiles, agent: &AgentId) -> Result<(), AgentAdminError> {
    let nats = nats_without(&read(&files.nats_config)?, &files.nats_config, agent)?;
    let mut policy = policy_document(&read(&files.policy)?, &files.policy)?;
    if let Some(agents) = policy.get_mut("agents").and_then(|a| a.as_table_mut()) {
        agents.remove(agent.as_str());
    }
    write(&files.nats_config, &nats)?;
    write(&files.policy, &policy.to_string())?;
    let credentials_file = files.credentials_dir.join(format!("{agent}.env"));
    match std::fs::remove_file(&credentials_file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AgentAdminError::Write {
            path: credentials_file,
            source,
        }),
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), AgentAdminError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| AgentAdminError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str =
        "accounts {\n  FLEET { }\n  # BEGIN caddy-fleet agents\n  # END caddy-fleet agents\n}\n";

    #[test]
    fn blocks_are_added_once_and_removed_exactly() {
        let agent = AgentId::new("web-1").unwrap();
        let path = Path::new("nats.conf");
        let added = nats_with(CONF, path, &agent, "$2a$11$hash").unwrap();
        assert!(added.contains("\"agent-web-1\" {"), "{added}");
        assert!(added.contains("allow: [\"fleet.web-1.>\"]"), "{added}");
        assert!(added.find("# agent web-1").unwrap() < added.find(END).unwrap());
        assert!(matches!(
            nats_with(&added, path, &agent, "x"),
            Err(AgentAdminError::Exists { .. })
        ));
        assert_eq!(nats_without(&added, path, &agent).unwrap(), CONF);
        assert!(matches!(
            nats_without(CONF, path, &agent),
            Err(AgentAdminError::Unknown { .. })
        ));
        assert!(matches!(
            nats_with("accounts { }", path, &agent, "x"),
            Err(AgentAdminError::NoSection { .. })
        ));
    }

    #[test]
    fn a_missing_credentials_directory_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("agent-admin-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = AgentFiles {
            nats_config: dir.join("nats.conf"),
            policy: dir.join("policy.toml"),
            credentials_dir: dir.join("missing"),
        };
        std::fs::write(&files.nats_config, CONF).unwrap();
        std::fs::write(&files.policy, "[default]\n").unwrap();
        let agent = AgentId::new("web-1").unwrap();
        let error = add(&files, &agent, &["a.test".into()]).unwrap_err();
        assert!(matches!(error, AgentAdminError::Write { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(&files.nats_config).unwrap(), CONF);
        assert_eq!(
            std::fs::read_to_string(&files.policy).unwrap(),
            "[default]\n"
        );
        // Once the directory exists, the same command works.
        std::fs::create_dir_all(&files.credentials_dir).unwrap();
        let added = add(&files, &agent, &["a.test".into()]).unwrap();
        assert!(added.credentials_file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
