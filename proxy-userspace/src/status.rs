//! The agent's status file, which `kpr status` reads: mode, why eBPF was
//! not used (if so), interfaces, source, last sync.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_STATE_DIR: &str = "/run/kpr";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub mode: String,
    /// Set when `--mode auto` fell back to iptables: the probe's error.
    pub fallback_reason: Option<String>,
    pub pid: u32,
    pub interfaces: Vec<String>,
    pub source: String,
    pub source_connected: bool,
    pub started_at: f64,
    pub last_sync_at: Option<f64>,
    pub frontends: usize,
    pub backends: usize,
}

pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// Why the status file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no status at {path}: is kpr running with --state-dir {state_dir}? ({source})")]
    Missing {
        path: PathBuf,
        state_dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Status {
    /// Writes atomically so a reader never sees half a file.
    pub fn write(&self, state_dir: &Path) -> Result<(), StatusError> {
        let tmp = state_dir.join(".status.json.tmp");
        let failed = |source| StatusError::Write { path: path(state_dir), source };
        std::fs::create_dir_all(state_dir).map_err(failed)?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| failed(e.into()))?;
        std::fs::write(&tmp, bytes).map_err(failed)?;
        std::fs::rename(tmp, path(state_dir)).map_err(failed)
    }

    pub fn read(state_dir: &Path) -> Result<Self, StatusError> {
        let p = path(state_dir);
        let bytes = std::fs::read(&p).map_err(|source| StatusError::Missing {
            path: p.clone(),
            state_dir: state_dir.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StatusError::Unreadable { path: p, source })
    }

    /// Whether the agent that wrote this is still alive.
    pub fn running(&self) -> bool {
        unsafe { libc::kill(self.pid as i32, 0) == 0 }
    }
}
