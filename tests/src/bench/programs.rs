//! What one run of the per-packet path's programs costs, by the kind of
//! packet, measured by `kpr-program-cost` (the bench-programs crate): each
//! program run by the kernel on one crafted frame over and over
//! (BPF_PROG_TEST_RUN with a repeat count), with its maps as the agent
//! creates them and N Services programmed; the time of a run is the
//! kernel's figure for the batch. The batches of a run agree to within a
//! few percent, where the connection-rate rows move by up to a third from
//! minute to minute; the whole table still moves with the machine, so two
//! builds are compared back to back.
//!
//! It is a floor, not the cost in traffic: the frame, the maps' entries and
//! the program stay in the CPU's caches from one run to the next, and the
//! kernel's test harness adds its own share to every run (the "direct"
//! rows, which the programs pass with a lookup or two, show how much),
//! and the rewrite's checksum updates are left out (the measured Service's
//! backend is its own VIP, so that the frame stays the same from run to run).
//! In traffic, where the node's stack runs between two packets, the
//! kernel's run-time statistics put each run at two to three times this.

use std::process::Command;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{Config, Stat};
use crate::kpr;

/// One kind of packet through one program, at one number of Services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProgramCost {
    pub services: usize,
    /// What the packet is, as the report names it.
    pub packet: String,
    /// The program it runs through: `kpr_from_pod` (ingress of the
    /// sender's interface) or `kpr_to_pod` (egress of the receiver's).
    pub program: String,
    /// Runs in each batch, the kernel timing the batch as a whole.
    pub runs: u32,
    /// Nanoseconds a run, over the batches.
    pub ns_per_run: Stat,
}

/// Batches of each kind in a full run (the quick one takes two).
const BATCHES: usize = 7;

/// Every kind of packet at every N of `cfg.services`, by the
/// `kpr-program-cost` built beside the `kpr` the bench runs.
pub fn measure(cfg: &Config) -> anyhow::Result<Vec<ProgramCost>> {
    let bin = kpr::binary()?.with_file_name("kpr-program-cost");
    let batches = if cfg.quick { 2 } else { BATCHES };
    let mut out = Vec::new();
    for &n in &cfg.services {
        let run = Command::new(&bin)
            .args([n.to_string(), batches.to_string()])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        anyhow::ensure!(
            run.status.success(),
            "program cost at {n} Services: {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        let costs: Vec<ProgramCost> = serde_json::from_slice(&run.stdout).context("kpr-program-cost's output")?;
        for c in &costs {
            eprintln!(
                "bench: program cost, {n} Services: {:<40} {:>5.0} ns a run ({})",
                c.packet, c.ns_per_run.median, c.program
            );
        }
        out.extend(costs);
    }
    Ok(out)
}
