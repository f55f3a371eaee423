//! XDP on the node's devices (`--xdp`): where traffic from outside enters,
//! the XDP program forwards what it can without the node's stack (see
//! proxy-ebpf's `nodeport`) and passes the rest to the TC programs beside
//! it. Native XDP (in the driver) is tried first, then generic XDP (on the
//! kernel's skb path, any device), then none: the TC programs alone serve
//! the device, as they do with `--xdp=off`. The path each device took is
//! logged, written to the devices map (the XDP program redirects only to
//! devices running it natively) and exported as `kpr_device_path`.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{Xdp, links::FdLink},
};
use proxy_common::maps::hook;

use super::{links, load as loader, pins::LinkPins};
use crate::dataplane::DataplaneError;

/// The XDP program's name in the object.
pub const XDP_PROGRAM: &str = "kpr_xdp";

/// `--xdp`: how the XDP program is attached to the node's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// In the driver, falling back to generic and then to TC alone.
    #[default]
    Native,
    /// On the kernel's generic path, falling back to TC alone.
    Generic,
    /// No XDP: the TC programs serve traffic from outside.
    Off,
}

impl XdpMode {
    /// The attachments to try, in order, with the path each gives.
    fn attempts(self) -> &'static [(aya::programs::XdpMode, u8)] {
        match self {
            XdpMode::Native => {
                &[(aya::programs::XdpMode::Driver, hook::XDP_NATIVE), (aya::programs::XdpMode::Skb, hook::XDP_GENERIC)]
            }
            XdpMode::Generic => &[(aya::programs::XdpMode::Skb, hook::XDP_GENERIC)],
            XdpMode::Off => &[],
        }
    }
}

/// Loads the XDP program (before any device needs it, so a verifier
/// rejection is known at start): with it refused, devices get TC alone.
pub fn load(ebpf: &mut Ebpf, mode: XdpMode) -> XdpMode {
    if mode == XdpMode::Off {
        return mode;
    }
    let loaded =
        loader::program::<Xdp>(ebpf, XDP_PROGRAM).and_then(|p| p.load().map_err(loader::load_error(XDP_PROGRAM)));
    match loaded {
        Ok(()) => mode,
        Err(e) => {
            tracing::warn!(error = %e, "XDP program refused: traffic from outside takes the TC path on every device");
            XdpMode::Off
        }
    }
}

/// The node's devices and the XDP program on them.
pub struct Devices {
    mode: XdpMode,
    /// `--devices`: names and patterns.
    patterns: Vec<String>,
    /// ifindex -> path (a [`hook`] value; `TC_INGRESS` for TC alone).
    paths: HashMap<MapData, u32, u8>,
    /// Devices seen, by name: index, and the XDP link's name in the pins
    /// (if XDP is on them) with the path written for them.
    attached: BTreeMap<String, (u32, (Option<String>, u8))>,
}

impl Devices {
    pub fn new(mode: XdpMode, patterns: Vec<String>, paths: HashMap<MapData, u32, u8>) -> Self {
        Self { mode, patterns, paths, attached: BTreeMap::new() }
    }

    /// Whether `name` is one of the node's devices.
    pub fn is_device(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| links::matches(p, name))
    }

    /// Puts the XDP program on device `name` (the TC programs are on it
    /// already), in the best mode it takes, and records the path. A link
    /// the previous run left on the device in a mode allowed is adopted.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        pins: &mut LinkPins,
        name: &str,
        index: u32,
    ) -> Result<(), DataplaneError> {
        if self.attached.contains_key(name) {
            return Ok(());
        }
        let pin = |path: u8| super::pins::interface_link("xdp", index, name, hook::name(path));
        let adopted = self
            .mode
            .attempts()
            .iter()
            .map(|(_, path)| (pin(*path), *path))
            .find(|(pin, _)| pins.adopt(pin, XDP_PROGRAM, |info| info.ifindex == index));
        let mut outcome = adopted.map_or((None, hook::TC_INGRESS), |(pin, path)| (Some(pin), path));
        for (flags, path) in self.mode.attempts().iter().filter(|_| outcome.0.is_none()) {
            let program = loader::program::<Xdp>(ebpf, XDP_PROGRAM)?;
            let link = program.attach(name, *flags).and_then(|id| program.take_link(id));
            let kept = link.map_err(|e| loader::with_sources(&e)).and_then(|link| {
                let link =
                    FdLink::try_from(link).map_err(|e| format!("not a bpf_link, so it cannot be pinned: {e}"))?;
                pins.keep(&pin(*path), link).map_err(|e| e.to_string())
            });
            match kept {
                Ok(()) => {
                    outcome = (Some(pin(*path)), *path);
                    break;
                }
                Err(e) => tracing::warn!(
                    device = %name,
                    path = hook::name(*path),
                    error = %e,
                    "XDP refused; trying the next path"
                ),
            }
        }
        let (link, path) = outcome;
        self.attached.insert(name.to_string(), (index, (link, path)));
        tracing::info!(device = %name, path = crate::inspect::path_name(path), "traffic from outside enters here");
        self.paths
            .insert(index, path, 0)
            .map_err(|e| DataplaneError::MapWrite { map: proxy_common::maps::DEVICES, reason: e.to_string() })
    }

    /// Drift repair: writes again each device's path that is missing or
    /// altered, and removes paths of indexes that are not devices (the
    /// per-packet path would take their traffic for traffic from outside).
    /// Returns how many entries it repaired.
    pub fn repair(&mut self) -> usize {
        let wanted: BTreeMap<u32, u8> = self.attached.values().map(|(index, (_, path))| (*index, *path)).collect();
        let mut repaired = 0;
        let present: Vec<(u32, u8)> = self.paths.iter().filter_map(Result::ok).collect();
        for (index, path) in &present {
            if !wanted.contains_key(index) {
                match self.paths.remove(index) {
                    Ok(()) => repaired += 1,
                    Err(e) => tracing::warn!(index, error = %e, "could not remove a stray device path"),
                }
            } else if wanted[index] != *path {
                repaired += usize::from(self.paths.insert(index, wanted[index], 0).is_ok());
            }
        }
        for (index, path) in wanted.iter().filter(|(i, _)| !present.iter().any(|(p, _)| p == *i)) {
            match self.paths.insert(index, path, 0) {
                Ok(()) => repaired += 1,
                Err(e) => tracing::warn!(index, error = %e, "could not restore a device path"),
            }
        }
        repaired
    }

    /// Forgets devices gone from `present` (their XDP went with them).
    pub fn forget_gone(&mut self, pins: &mut LinkPins, present: &BTreeMap<String, u32>) {
        for (name, index, (link, _)) in links::take_gone(&mut self.attached, present) {
            if let Some(link) = link {
                pins.release(&link);
            }
            // A new interface may get the index: it is written again when attached.
            if let Err(e) = self.paths.remove(&index) {
                tracing::debug!(device = %name, error = %e, "forgetting a gone device's path");
            }
        }
    }
}
