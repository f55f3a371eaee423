//! A folder of manifests holding Services and EndpointSlices as real
//! k8s-openapi types: YAML (several documents per file) or JSON (one or
//! more values per file), either possibly a `kind: List`.
//!
//! inotify wakes the watcher on every change, and a short poll backs it up
//! on filesystems without inotify. Only files whose size, mtime or inode
//! changed are read and parsed again, so a one-object change beside a
//! 50,000-Service file costs one small parse.

use std::{
    collections::{BTreeMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::Watcher as _;
use serde::Deserialize;

use super::{Changes, SharedIndex, Source};
use crate::{
    index::{Index, Snapshot},
    name::ObjectName,
    rejection::{RejectReason, Rejection},
    validate::{self, ModelConfig, Object},
};

/// How often the folder is checked when no inotify event arrives.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What identifies a file's content without reading it.
type Stamp = (u64, i64, i64, u64);

/// What one file put into the index: only names, so a changed or removed
/// file's objects can be taken out again (the objects live in the index).
struct FileState {
    stamp: Stamp,
    names: FileNames,
}

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino())
}

/// A document of `origin` that could not be read as a Kubernetes object.
fn unreadable(origin: &str, object: String, reason: impl ToString) -> Rejection {
    Rejection { origin: origin.to_string(), object, kind: RejectReason::Unreadable, reason: reason.to_string() }
}

/// Reads documents into validated objects, one at a time, so a large file
/// never exists as Kubernetes objects all at once.
struct Reader<'a> {
    origin: Arc<str>,
    config: &'a ModelConfig,
    /// Where each validated object goes as soon as it is read.
    sink: &'a mut dyn FnMut(Object),
    unreadable: Vec<Rejection>,
}

impl Reader<'_> {
    /// Sorts one decoded document into the snapshot (expanding `kind: List`).
    fn add(&mut self, position: &str, value: serde_json::Value) {
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let named = |v: &serde_json::Value| {
            let name = v.pointer("/metadata/name").and_then(|n| n.as_str());
            format!("{kind} {} ({position})", name.unwrap_or("<unnamed>"))
        };
        let origin = &self.origin;
        match kind.as_str() {
            "Service" => match Service::deserialize(&value) {
                Ok(o) => (self.sink)(Object::Service(validate::service(&o, origin, self.config))),
                Err(e) => self.unreadable.push(unreadable(origin, named(&value), e)),
            },
            "EndpointSlice" => match EndpointSlice::deserialize(&value) {
                Ok(o) => (self.sink)(Object::Slice(validate::slice(&o, origin, self.config))),
                Err(e) => self.unreadable.push(unreadable(origin, named(&value), e)),
            },
            "List" | "ServiceList" | "EndpointSliceList" => {
                let items = match value {
                    serde_json::Value::Object(mut map) => match map.remove("items") {
                        Some(serde_json::Value::Array(items)) => items,
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                };
                for (i, item) in items.into_iter().enumerate() {
                    self.add(&format!("{position}, item {}", i + 1), item);
                }
            }
            "" => self.unreadable.push(unreadable(origin, position.to_string(), "has no kind")),
            other => tracing::debug!(%origin, kind = other, "ignoring kind the proxy does not use"),
        }
    }
}

/// Parses one file into validated objects; unreadable documents become
/// rejections.
pub fn parse_file(path: &Path, bytes: &[u8], config: &ModelConfig) -> Snapshot {
    parse(path, bytes, config)
}

/// [`parse_file`] from a reader.
pub fn parse(path: &Path, input: impl std::io::Read, config: &ModelConfig) -> Snapshot {
    let mut objects = Vec::new();
    let unreadable = parse_each(path, input, config, &mut |o| objects.push(o));
    Snapshot { objects, unreadable }
}

/// Reads `input`, handing each validated object to `sink` as soon as it is
/// read; returns the documents that could not be read. JSON is decoded as
/// it is read, so a large file never sits in memory whole, neither as text
/// nor as objects; a YAML stream is read first.
pub fn parse_each(
    path: &Path,
    mut input: impl std::io::Read,
    config: &ModelConfig,
    sink: &mut dyn FnMut(Object),
) -> Vec<Rejection> {
    let mut reader = Reader { origin: path.display().to_string().into(), config, sink, unreadable: Vec::new() };
    if path.extension().is_some_and(|e| e == "json") {
        let input = std::io::BufReader::new(input);
        for (index, value) in serde_json::Deserializer::from_reader(input).into_iter::<serde_json::Value>().enumerate()
        {
            let position = format!("value {}", index + 1);
            match value {
                Ok(v) => reader.add(&position, v),
                Err(e) => {
                    let origin = reader.origin.clone();
                    reader.unreadable.push(unreadable(&origin, position, e));
                    break;
                }
            }
        }
        return reader.unreadable;
    }
    let mut bytes = Vec::new();
    if let Err(e) = input.read_to_end(&mut bytes) {
        let origin = reader.origin.clone();
        reader.unreadable.push(unreadable(&origin, "the file".into(), e));
        return reader.unreadable;
    }
    for (index, doc) in serde_yaml::Deserializer::from_slice(&bytes).enumerate() {
        let position = format!("document {}", index + 1);
        match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => {}
            Ok(v) => reader.add(&position, v),
            Err(e) => {
                let origin = reader.origin.clone();
                reader.unreadable.push(unreadable(&origin, position, e));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        }
    }
    reader.unreadable
}

/// Takes out of the index what a file held before and holds no more.
fn remove_gone(index: &mut Index, old: Option<&FileState>, now: &FileNames) {
    let Some(old) = old.map(|f| &f.names) else { return };
    let services: HashSet<&ObjectName> = now.services.iter().collect();
    let slices: HashSet<&ObjectName> = now.slices.iter().collect();
    for name in old.services.iter().filter(|n| !services.contains(n)) {
        index.delete_service(name);
    }
    for name in old.slices.iter().filter(|n| !slices.contains(n)) {
        index.delete_slice(name);
    }
}

/// The objects one file holds, by name.
#[derive(Default)]
struct FileNames {
    services: Vec<ObjectName>,
    slices: Vec<ObjectName>,
}

/// The folder's latest parsed contents, per file, fed into the index.
pub struct DirSource {
    dir: PathBuf,
    config: ModelConfig,
    index: SharedIndex,
    files: Mutex<Option<BTreeMap<PathBuf, FileState>>>,
    readable: AtomicBool,
}

impl DirSource {
    pub fn new(dir: PathBuf, config: ModelConfig, index: SharedIndex) -> Arc<Self> {
        Arc::new(Self { dir, config, index, files: Mutex::new(None), readable: AtomicBool::new(true) })
    }

    /// Re-reads files that changed; returns whether anything did. The index
    /// is locked for one object at a time, never while the disk is read, so
    /// the sync loop never waits for the disk.
    fn rescan(&self) -> std::io::Result<bool> {
        let mut listed = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_manifest(&path) {
                continue;
            }
            // A file removed between listing and reading is simply gone.
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.is_file()
            {
                listed.insert(path, stamp(&meta));
            }
        }
        let mut guard = self.files.lock().unwrap();
        let first = guard.is_none();
        let files = guard.get_or_insert_with(BTreeMap::new);
        let mut changed = first;
        let gone: Vec<PathBuf> = files.keys().filter(|p| !listed.contains_key(*p)).cloned().collect();
        for path in gone {
            let old = files.remove(&path);
            let mut index = self.index.lock().unwrap();
            remove_gone(&mut index, old.as_ref(), &FileNames::default());
            index.set_unreadable(&path.display().to_string(), Vec::new());
            changed = true;
        }
        for (path, stamp) in listed {
            if files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let Ok(file) = std::fs::File::open(&path) else { continue };
            // Objects go into the index as they are read (replacing their
            // previous versions in place); what the file no longer holds is
            // removed after. A sync in between sees some objects already
            // new, as it would a stream of watch events, never one missing.
            let mut names = FileNames::default();
            let unreadable = parse_each(&path, file, &self.config, &mut |object| {
                match &object {
                    Object::Service(s) => names.services.push(s.name.clone()),
                    Object::Slice(s) => names.slices.push(s.name.clone()),
                }
                self.index.lock().unwrap().apply(object);
            });
            let old = files.remove(&path);
            let mut index = self.index.lock().unwrap();
            remove_gone(&mut index, old.as_ref(), &names);
            index.set_unreadable(&path.display().to_string(), unreadable);
            drop(index);
            // Held until the file changes: no spare capacity.
            names.services.shrink_to_fit();
            names.slices.shrink_to_fit();
            files.insert(path, FileState { stamp, names });
            changed = true;
        }
        Ok(changed)
    }

    /// Watches the folder until `changes` is closed, announcing every change.
    /// A folder that cannot be read is reported and retried; the last good
    /// contents stay in force meanwhile.
    pub async fn watch(self: Arc<Self>, changes: Changes) {
        let (wake_tx, mut wake) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if wakes(&event) {
                // The watch loop is gone only when the agent stops.
                wake_tx.send(()).ok();
            }
        })
        .and_then(|mut w| w.watch(&self.dir, notify::RecursiveMode::NonRecursive).map(|()| w));
        if let Err(e) = &watcher {
            tracing::warn!(dir = %self.dir.display(), error = %e, "no inotify on the manifest folder; polling only");
        }
        loop {
            // Reading and parsing files blocks: off the async threads.
            let scanner = self.clone();
            let scanned = tokio::task::spawn_blocking(move || scanner.rescan())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(format!("the folder scan panicked: {e}"))));
            match scanned {
                Ok(changed) => {
                    self.readable.store(true, Ordering::Relaxed);
                    if changed && changes.send(Instant::now()).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if self.readable.swap(false, Ordering::Relaxed) {
                        tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the manifest folder; keeping what is programmed");
                    }
                }
            }
            tokio::select! {
                _ = wake.recv() => {
                    // Coalesce the burst of events one write makes.
                    while wake.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }
}

/// Whether a folder event may mean changed manifests. Opening, reading and
/// closing unwritten are events too (the scan itself lists the folder and
/// makes some), and waking on them would rescan in a loop, busy forever.
fn wakes(event: &notify::Result<notify::Event>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event {
        Ok(e) => match e.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(_) => true,
    }
}

impl Source for DirSource {
    fn ready(&self) -> bool {
        self.files.lock().unwrap().is_some()
    }

    fn connected(&self) -> bool {
        self.readable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_the_folder_does_not_wake_the_watch_but_changing_it_does() {
        use notify::{
            Event, EventKind,
            event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind},
        };
        let event = |kind| Ok(Event::new(kind));
        assert!(!wakes(&event(EventKind::Access(AccessKind::Open(AccessMode::Any)))));
        assert!(!wakes(&event(EventKind::Access(AccessKind::Close(AccessMode::Read)))));
        assert!(wakes(&event(EventKind::Access(AccessKind::Close(AccessMode::Write)))), "a file written");
        assert!(wakes(&event(EventKind::Create(CreateKind::File))));
        assert!(wakes(&event(EventKind::Modify(ModifyKind::Any))));
        assert!(wakes(&event(EventKind::Remove(RemoveKind::File))));
        assert!(wakes(&Err(notify::Error::generic("overflow"))), "when in doubt, rescan");
    }

    /// Services, slices and unreadable documents of the files.
    struct Parsed {
        services: Vec<validate::ServiceInfo>,
        slices: Vec<validate::SliceInfo>,
        rejected: Vec<Rejection>,
    }

    fn parse(files: &[(&str, &str)]) -> Parsed {
        let mut parsed = Parsed { services: vec![], slices: vec![], rejected: vec![] };
        for (p, c) in files {
            let s = parse_file(Path::new(p), c.as_bytes(), &ModelConfig::default());
            for o in s.objects {
                match o {
                    Object::Service(s) => parsed.services.push(s),
                    Object::Slice(s) => parsed.slices.push(s),
                }
            }
            parsed.rejected.extend(s.unreadable);
        }
        parsed
    }

    #[test]
    fn reads_several_documents_per_file() {
        let snap = parse(&[(
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\n---\n",
        )]);
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.slices.len(), 1);
        assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
        assert!(snap.services[0].rejections.is_empty() && snap.slices[0].rejections.is_empty());
    }

    #[test]
    fn reads_json_values_and_lists() {
        let snap = parse(&[(
            "a.json",
            r#"{"kind": "List", "items": [{"kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1"}},
                                          {"kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "10.96.0.2"}}]}
               {"kind": "EndpointSlice", "metadata": {"name": "a-1"}, "addressType": "IPv4"}"#,
        )]);
        assert_eq!((snap.services.len(), snap.slices.len()), (2, 1), "{:?}", snap.rejected);
    }

    #[test]
    fn bad_documents_are_rejected_with_file_and_object() {
        let snap = parse(&[
            ("bad.yaml", "kind: Service\nmetadata: {name: broken}\nspec: {ports: 7}\n"),
            ("good.yaml", "kind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.1}\n"),
            ("syntax.yaml", "kind: [unclosed\n"),
        ]);
        assert_eq!(snap.services.len(), 1, "the good file is still read");
        assert_eq!(snap.rejected.len(), 2);
        assert_eq!(snap.rejected[0].origin, "bad.yaml");
        assert!(snap.rejected[0].object.contains("Service broken"), "{}", snap.rejected[0]);
        assert_eq!(snap.rejected[1].origin, "syntax.yaml");
    }

    #[test]
    fn other_kinds_are_ignored() {
        let snap = parse(&[("cm.yaml", "kind: ConfigMap\nmetadata: {name: x}\n")]);
        assert!(snap.services.is_empty() && snap.rejected.is_empty());
    }

    #[test]
    fn only_changed_files_are_read_again() {
        let dir = std::env::temp_dir().join(format!("kpr-dir-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n")
            .unwrap();
        let index = SharedIndex::default();
        let source = DirSource::new(dir.clone(), ModelConfig::default(), index.clone());
        assert!(source.rescan().unwrap());
        assert!(!source.rescan().unwrap(), "nothing changed");
        let key = |n: &str| ObjectName::new("default", n);
        assert_eq!(index.lock().unwrap().take_dirty(), crate::index::Dirty::All, "the first sync computes everything");
        std::fs::write(dir.join("b.yaml"), "kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2}\n")
            .unwrap();
        assert!(source.rescan().unwrap());
        assert_eq!(
            index.lock().unwrap().take_dirty(),
            crate::index::Dirty::Some([key("b")].into()),
            "only the new file's Service"
        );
        assert_eq!(index.lock().unwrap().service_count(), 2);
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(source.rescan().unwrap());
        assert_eq!(index.lock().unwrap().service_count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
