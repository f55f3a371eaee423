//! A folder of manifests (YAML, several documents per file, or JSON) holding
//! Services and EndpointSlices as real k8s-openapi types. The folder is
//! re-read when any file's content changes.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use crate::model::{RejectReason, Rejection, Snapshot, Sourced};

use super::{Changes, Source};

/// How often the folder is compared with what was last read. Polling keeps
/// working on every filesystem and coalesces an editor's burst of writes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

type Contents = BTreeMap<PathBuf, Vec<u8>>;

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn read_contents(dir: &Path) -> std::io::Result<Contents> {
    let mut out = Contents::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && is_manifest(&path) {
            // A file removed between listing and reading is simply gone.
            if let Ok(bytes) = std::fs::read(&path) {
                out.insert(path, bytes);
            }
        }
    }
    Ok(out)
}

/// Parses every document of every file; unreadable documents become rejections.
fn parse(contents: &Contents) -> Snapshot {
    let mut snap = Snapshot::default();
    for (path, bytes) in contents {
        let origin = path.display().to_string();
        for (index, doc) in serde_yaml::Deserializer::from_slice(bytes).enumerate() {
            let position = format!("document {}", index + 1);
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    snap.rejected.push(Rejection { origin: origin.clone(), object: position, kind: RejectReason::Unreadable, reason: e.to_string() });
                    // The YAML stream cannot be resumed after a syntax error.
                    break;
                }
            };
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
            let named = |v: &serde_yaml::Value| {
                let name = v.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str());
                format!("{kind} {} ({position})", name.unwrap_or("<unnamed>"))
            };
            match kind.as_str() {
                "Service" => match serde_yaml::from_value::<Service>(value.clone()) {
                    Ok(object) => snap.services.push(Sourced::new(origin.as_str(), object)),
                    Err(e) => snap.rejected.push(Rejection { origin: origin.clone(), object: named(&value), kind: RejectReason::Unreadable, reason: e.to_string() }),
                },
                "EndpointSlice" => match serde_yaml::from_value::<EndpointSlice>(value.clone()) {
                    Ok(object) => snap.slices.push(Sourced::new(origin.as_str(), object)),
                    Err(e) => snap.rejected.push(Rejection { origin: origin.clone(), object: named(&value), kind: RejectReason::Unreadable, reason: e.to_string() }),
                },
                "" => snap.rejected.push(Rejection { origin: origin.clone(), object: position, kind: RejectReason::Unreadable, reason: "has no kind".into() }),
                other => tracing::debug!(%origin, kind = other, "ignoring kind the proxy does not use"),
            }
        }
    }
    snap
}

/// Reads the folder once.
pub fn read(dir: &Path) -> std::io::Result<Snapshot> {
    Ok(parse(&read_contents(dir)?))
}

/// The folder's latest parsed contents.
pub struct DirSource {
    dir: PathBuf,
    latest: Mutex<Option<Snapshot>>,
    readable: AtomicBool,
}

impl DirSource {
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self { dir, latest: Mutex::new(None), readable: AtomicBool::new(true) })
    }

    /// Polls the folder until `changes` is closed, announcing every change.
    /// A folder that cannot be read is reported and retried; the last good
    /// snapshot stays in force meanwhile.
    pub async fn watch(self: Arc<Self>, changes: Changes) {
        let mut last: Option<Contents> = None;
        loop {
            match read_contents(&self.dir) {
                Ok(contents) => {
                    self.readable.store(true, Ordering::Relaxed);
                    if last.as_ref() != Some(&contents) {
                        *self.latest.lock().unwrap() = Some(parse(&contents));
                        last = Some(contents);
                        if changes.send(Instant::now()).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if self.readable.swap(false, Ordering::Relaxed) {
                        tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the manifest folder; keeping what is programmed");
                    }
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Source for DirSource {
    fn ready(&self) -> bool {
        self.latest.lock().unwrap().is_some()
    }

    fn snapshot(&self) -> Snapshot {
        self.latest.lock().unwrap().clone().unwrap_or_default()
    }

    fn connected(&self) -> bool {
        self.readable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(files: &[(&str, &str)]) -> Contents {
        files.iter().map(|(p, c)| (PathBuf::from(p), c.as_bytes().to_vec())).collect()
    }

    #[test]
    fn reads_several_documents_per_file() {
        let snap = parse(&contents(&[(
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\n---\n",
        )]));
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.slices.len(), 1);
        assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
    }

    #[test]
    fn bad_documents_are_rejected_with_file_and_object() {
        let snap = parse(&contents(&[
            ("bad.yaml", "kind: Service\nmetadata: {name: broken}\nspec: {ports: 7}\n"),
            ("good.yaml", "kind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.1}\n"),
            ("syntax.yaml", "kind: [unclosed\n"),
        ]));
        assert_eq!(snap.services.len(), 1, "the good file is still read");
        assert_eq!(snap.rejected.len(), 2);
        assert_eq!(snap.rejected[0].origin, "bad.yaml");
        assert!(snap.rejected[0].object.contains("Service broken"), "{}", snap.rejected[0]);
        assert_eq!(snap.rejected[1].origin, "syntax.yaml");
    }

    #[test]
    fn other_kinds_are_ignored() {
        let snap = parse(&contents(&[("cm.yaml", "kind: ConfigMap\nmetadata: {name: x}\n")]));
        assert!(snap.services.is_empty() && snap.rejected.is_empty());
    }
}
