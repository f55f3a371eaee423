//! The agent's status file, which `kpr status` reads: mode, why eBPF was
//! not used (if so), interfaces, source, last sync.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
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

impl Status {
    /// Writes atomically so a reader never sees half a file.
    pub fn write(&self, state_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let tmp = state_dir.join(".status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path(state_dir))?;
        Ok(())
    }

    pub fn read(state_dir: &Path) -> anyhow::Result<Self> {
        let p = path(state_dir);
        let bytes = std::fs::read(&p).with_context(|| {
            format!("no status at {}: is kpr running with --state-dir {}?", p.display(), state_dir.display())
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", p.display()))
    }

    /// Whether the agent that wrote this is still alive.
    pub fn running(&self) -> bool {
        unsafe { libc::kill(self.pid as i32, 0) == 0 }
    }
}
