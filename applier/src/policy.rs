//! The policy file: read at start, and again when it changes or on SIGHUP.
//!
//! A policy that cannot be read at start stops the applier; one that
//! cannot be read later is logged and the policy in force is kept, so a
//! typo never opens (or closes) the fleet by accident.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use caddy_fleet_schema::policy::{Policy, PolicyError};

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("POLICY_FILE: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

/// Reads and parses the policy at `path`.
pub fn load(path: &Path) -> Result<Policy, PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyLoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Policy::parse(&text)?)
}

/// A policy file and what it looked like when last read.
#[derive(Debug, Clone)]
pub struct PolicyWatch {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
}

impl PolicyWatch {
    /// Watches `path`, as it is now.
    pub fn new(path: PathBuf) -> Self {
        let stamp = stamp(&path);
        PolicyWatch { path, stamp }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file changed (modification time or size) since the last
    /// call; a file that disappeared counts as unchanged.
    pub fn changed(&mut self) -> bool {
        let now = stamp(&self.path);
        if now.is_some() && now != self.stamp {
            self.stamp = now;
            true
        } else {
            false
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
