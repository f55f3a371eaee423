//! What outlives the agent, so a restart or an upgrade is invisible to
//! traffic: the maps and the program links, pinned under `--bpf-root`.
//!
//! - Maps live in `kpr/maps-v<LAYOUT>/` and are reused by the next start of
//!   the same layout and sizes (flows, NAT ports and backend sets go on).
//!   A binary of another layout, or new `--max-*` sizes, starts from fresh
//!   maps, with the old ones set aside in `kpr/previous/` for `migrate` to
//!   copy from; the programs still attached keep using them until they are
//!   swapped.
//! - Links live in `kpr/links/`, one per attach point, named after it. A
//!   link pinned by the previous run is adopted: it keeps running the old
//!   program until the first complete sync has programmed the maps, then
//!   is switched to the new program in one atomic `BPF_LINK_UPDATE`
//!   ([`LinkPins::commit`]). Pins no attach point claimed by then (an
//!   interface gone, another cgroup) are removed, which detaches them.
//!
//! Without a bpf filesystem nothing is pinned: links are held in memory and
//! detach when the agent exits, as before.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};

use proxy_common::maps::LAYOUT;

use crate::{
    dataplane::DataplaneError,
    inspect::{maps_dir, pin_dir as kpr_dir},
};

fn links_dir(bpf_root: &Path) -> PathBuf {
    kpr_dir(bpf_root).join("links")
}

/// What a start finds pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinnedMaps {
    /// Nothing: fresh maps.
    Nothing,
    /// This layout's maps at the sizes asked: reused as they are.
    Reusable,
    /// Maps of another layout or other sizes, moved to this folder: fresh
    /// maps are made, and what can be is copied over (see `migrate`).
    Previous(PathBuf),
}

/// Where a previous run's maps wait while they are migrated.
fn previous_dir(bpf_root: &Path) -> PathBuf {
    kpr_dir(bpf_root).join("previous")
}

/// Sorts out what is pinned before the load: this layout's maps are
/// reused when every map named in `capacities` holds as many entries as
/// asked; otherwise they, or another layout's (the newest), or the loose
/// pins from before layouts were versioned, are moved to `kpr/previous` to
/// be migrated. Anything older is removed.
pub fn prepare_maps(bpf_root: &Path, capacities: &[(&str, u32)]) -> PinnedMaps {
    let kpr = kpr_dir(bpf_root);
    let current = maps_dir(bpf_root);
    let previous = previous_dir(bpf_root);
    let remove = |path: &Path| {
        let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
        if let Err(e) = removed {
            tracing::warn!(pin = %path.display(), error = %e, "could not remove an old pin");
        }
    };
    // A migration that did not finish: its maps are older than what is there now.
    if previous.exists() {
        remove(&previous);
    }
    let Ok(entries) = std::fs::read_dir(&kpr) else { return PinnedMaps::Nothing };
    let (mut layouts, mut loose) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let path = entry.path();
        if path == current || path == links_dir(bpf_root) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        match name.strip_prefix("maps-v").and_then(|v| v.parse::<u32>().ok()) {
            Some(version) if path.is_dir() => layouts.push((version, path)),
            _ if !path.is_dir() => loose.push(path),
            _ => remove(&path),
        }
    }
    let sizes_match = || {
        capacities.iter().all(|(name, wanted)| {
            aya::maps::MapInfo::from_pin(current.join(name)).is_ok_and(|info| info.max_entries() == *wanted)
        })
    };
    let moved = |from: &Path| match std::fs::rename(from, &previous) {
        Ok(()) => PinnedMaps::Previous(previous.clone()),
        Err(e) => {
            tracing::warn!(pin = %from.display(), error = %e, "could not set the old maps aside: starting from fresh maps");
            remove(from);
            PinnedMaps::Nothing
        }
    };
    layouts.sort();
    let newest_other = layouts.pop();
    for (_, path) in &layouts {
        remove(path);
    }
    if current.exists() {
        for path in newest_other.iter().map(|(_, p)| p).chain(&loose) {
            remove(path);
        }
        if sizes_match() {
            return PinnedMaps::Reusable;
        }
        tracing::info!("map sizes changed: fresh maps, with what fits copied from the old ones");
        return moved(&current);
    }
    if let Some((version, path)) = newest_other {
        for path in &loose {
            remove(path);
        }
        tracing::info!(
            from = version,
            to = LAYOUT,
            "the map layout changed: fresh maps, with what keeps its format copied"
        );
        return moved(&path);
    }
    if loose.is_empty() {
        return PinnedMaps::Nothing;
    }
    // Maps pinned directly in kpr/ (before layouts were versioned).
    if let Err(e) = std::fs::create_dir(&previous) {
        tracing::warn!(error = %e, "could not set the old maps aside: starting from fresh maps");
        loose.iter().for_each(|p| remove(p));
        return PinnedMaps::Nothing;
    }
    for path in &loose {
        let to = previous.join(path.file_name().unwrap_or_default());
        if std::fs::rename(path, to).is_err() {
            remove(path);
        }
    }
    PinnedMaps::Previous(previous)
}

/// One attach point's link as the agent holds it.
enum Held {
    /// Not pinned (no bpf filesystem, or a netlink classifier before Linux
    /// 6.6, which is no bpf_link): dropping it detaches the program.
    Unpinned(#[allow(dead_code, reason = "held for its drop")] Box<dyn std::any::Any + Send>),
    /// Pinned by this run.
    Pinned(#[allow(dead_code, reason = "held for its drop")] PinnedLink),
    /// Pinned by an earlier run, still running its program; switched to
    /// `program` at [`LinkPins::commit`].
    Adopted { fd: OwnedFd, program: &'static str },
    /// Adopted and switched.
    Switched(#[allow(dead_code, reason = "held for its drop")] OwnedFd),
}

/// The links of every attach point, pinned where a bpf filesystem allows.
pub struct LinkPins {
    dir: Option<PathBuf>,
    held: BTreeMap<String, Held>,
    committed: bool,
}

impl LinkPins {
    /// Links pinned under `bpf_root` if it is a bpf filesystem, else held in memory.
    pub fn new(bpf_root: Option<&Path>) -> Self {
        let dir = bpf_root.map(links_dir).and_then(|dir| match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "links not pinned: programs detach when the agent exits");
                None
            }
        });
        Self { dir, held: BTreeMap::new(), committed: false }
    }

    /// Adopts the pinned link `name` of an earlier run if one is there and
    /// still attached where `check` says it should be (its kernel link info).
    /// Before the first commit only: later the maps are this run's already.
    pub fn adopt(&mut self, name: &str, program: &'static str, check: impl Fn(&LinkInfo) -> bool) -> bool {
        let Some(path) = self.dir.as_ref().map(|d| d.join(name)) else { return false };
        if self.held.contains_key(name) || !path.exists() {
            return false;
        }
        let adopted = obj_get(&path).and_then(|fd| Ok((link_info(fd.as_fd())?, fd)));
        match adopted {
            Ok((info, fd)) if check(&info) && !self.committed => {
                tracing::info!(link = name, "adopted a link of the previous run; it serves until the first sync");
                self.held.insert(name.to_string(), Held::Adopted { fd, program });
                true
            }
            outcome => {
                if let Err(e) = outcome {
                    tracing::debug!(link = name, error = %e, "pinned link unreadable");
                }
                tracing::info!(link = name, "a pinned link no longer attached where expected: replaced");
                if let Err(e) = detach_and_unpin(&path) {
                    tracing::warn!(link = name, error = %e, "could not remove a stale pinned link");
                }
                false
            }
        }
    }

    /// Keeps `link`, just attached for the attach point `name`, pinned if it can be.
    pub fn keep(&mut self, name: &str, link: FdLink) -> Result<(), DataplaneError> {
        let held = match &self.dir {
            None => Held::Unpinned(Box::new(link)),
            Some(dir) => Held::Pinned(link.pin(dir.join(name)).map_err(|e| DataplaneError::Attach {
                program: "(pin)",
                target: name.to_string(),
                reason: e.to_string(),
            })?),
        };
        self.held.insert(name.to_string(), held);
        Ok(())
    }

    /// Keeps `link`, which cannot be pinned, for the attach point `name`:
    /// it detaches when the agent exits.
    pub fn keep_unpinned(&mut self, name: &str, link: impl Send + 'static) {
        self.held.insert(name.to_string(), Held::Unpinned(Box::new(link)));
    }

    /// Detaches the attach point `name` (its interface is gone, or it failed half-way).
    pub fn release(&mut self, name: &str) {
        if self.held.remove(name).is_some()
            && let Some(dir) = &self.dir
            && let Err(e) = detach_and_unpin(&dir.join(name))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(link = name, error = %e, "could not unpin a link");
        }
    }

    /// Once this run's maps are programmed: switches every adopted link to
    /// this run's program (`program_fd` finds it by name) and removes the
    /// pins no attach point claimed. Runs once; returns how many links were
    /// switched and how many removed.
    pub fn commit(&mut self, program_fd: impl Fn(&str) -> Option<OwnedFd>) -> (usize, usize) {
        if std::mem::replace(&mut self.committed, true) {
            return (0, 0);
        }
        let mut switched = 0;
        let held = std::mem::take(&mut self.held);
        self.held = held
            .into_iter()
            .map(|(name, held)| {
                let Held::Adopted { fd, program } = held else { return (name, held) };
                let updated = program_fd(program)
                    .ok_or_else(|| std::io::Error::other(format!("program {program} not loaded")))
                    .and_then(|prog| link_update(fd.as_fd(), prog.as_fd()));
                match updated {
                    Ok(()) => switched += 1,
                    // The old program goes on serving there; the next start tries again.
                    Err(e) => tracing::error!(link = %name, error = %e, "could not switch a link to the new program"),
                }
                (name, Held::Switched(fd))
            })
            .collect();
        let mut removed = 0;
        if let Some(dir) = &self.dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if self.held.contains_key(&name) {
                    continue;
                }
                match detach_and_unpin(&entry.path()) {
                    Ok(()) => {
                        tracing::info!(link = %name, "detached a link of the previous run no attach point needs");
                        removed += 1;
                    }
                    Err(e) => tracing::warn!(link = %name, error = %e, "could not remove a stale pinned link"),
                }
            }
        }
        (switched, removed)
    }
}

/// What the kernel says of a link: where it is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// The interface of a TCX or XDP link (0 once the interface is gone).
    pub ifindex: u32,
    /// The cgroup of a cgroup link.
    pub cgroup_id: u64,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The bpf() system call with a zeroed, bpf_attr-sized buffer.
pub(super) fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer the command reads and writes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_info(link: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then the union at byte 16.
    let mut info = [0u64; 8];
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0] as u32;
    Ok(match link_type {
        BPF_LINK_TYPE_TCX | BPF_LINK_TYPE_XDP => LinkInfo { ifindex: info[2] as u32, cgroup_id: 0 },
        BPF_LINK_TYPE_CGROUP => LinkInfo { ifindex: 0, cgroup_id: info[2] },
        _ => LinkInfo::default(),
    })
}

fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((program.as_raw_fd() as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The pin name of the attach point `kind` on interface `iface` (index
/// `ifindex`), with `what` there: bpffs refuses dots in names (as in
/// `flannel.1`), and the index keeps the names unique.
pub fn interface_link(kind: &str, ifindex: u32, iface: &str, what: &str) -> String {
    format!("{kind}-{ifindex}-{}-{what}", iface.replace('.', "_"))
}

/// Detaches the link pinned at `path` now and unpins it. Unpinning alone
/// releases the link later, from a kernel work queue: the program can
/// still run for tens of milliseconds, and whoever takes over (iptables
/// mode, `kpr cleanup`'s caller) would share packets with it.
pub fn detach_and_unpin(path: &Path) -> std::io::Result<()> {
    if let Ok(fd) = obj_get(path) {
        let mut attr = [0u64; 16];
        attr[0] = fd.as_raw_fd() as u64;
        if let Err(e) = bpf(BPF_LINK_DETACH, &mut attr) {
            tracing::debug!(link = %path.display(), error = %e, "link not detached at once; it goes when unpinned");
        }
    }
    std::fs::remove_file(path)
}

/// Detaches and unpins every link under `bpf_root`; returns how many.
pub fn detach_all(bpf_root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(links_dir(bpf_root)) else { return 0 };
    entries.flatten().filter(|e| detach_and_unpin(&e.path()).is_ok()).count()
}

/// The cgroup id of the cgroup v2 folder `path` (its inode number), as link info gives it.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.ino())
}
