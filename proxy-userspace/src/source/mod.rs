//! Sources turn Kubernetes objects into model snapshots.

pub mod dir;

use std::path::PathBuf;

/// Where Services and EndpointSlices come from, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A folder of YAML/JSON manifests, watched for changes.
    Dir(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(SourceSpec::Dir(path.into())),
            _ => Err(format!("unknown source {s:?}: expected dir:PATH (a folder of manifests)")),
        }
    }
}
