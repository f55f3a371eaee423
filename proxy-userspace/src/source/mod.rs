//! Sources feed Kubernetes objects into the shared [`Index`], object by
//! object, and announce every change (with the time it arrived) on a
//! channel; the agent recomputes what changed when it syncs.

pub mod dir;
pub mod kube;
pub mod reflector;

use std::{path::PathBuf, time::Instant};

use tokio::sync::mpsc;

pub use crate::index::Index;

/// The index a source writes and the agent reads.
pub type SharedIndex = std::sync::Arc<std::sync::Mutex<Index>>;

/// Announces that a source's objects changed, and when the change arrived.
pub type Changes = mpsc::UnboundedSender<Instant>;

pub trait Source: Send + Sync {
    /// True once the initial state is complete (every kind listed), so a
    /// sync never programs Services before their endpoints are known.
    fn ready(&self) -> bool;
    /// False while the source is cut off from where its objects come from.
    fn connected(&self) -> bool;
}

/// Where Services and EndpointSlices come from, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A folder of YAML/JSON manifests, watched for changes.
    Dir(PathBuf),
    /// A Kubernetes API server (in-cluster config, or `--kubeconfig`).
    Kube,
}

impl std::str::FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(SourceSpec::Dir(path.into())),
            None if s == "kube" => Ok(SourceSpec::Kube),
            _ => Err(format!("unknown source {s:?}: expected kube or dir:PATH (a folder of manifests)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_spec_parses() {
        assert_eq!("dir:/m".parse(), Ok(SourceSpec::Dir("/m".into())));
        assert_eq!("kube".parse(), Ok(SourceSpec::Kube));
        assert!("dir:".parse::<SourceSpec>().is_err());
        assert!("etcd".parse::<SourceSpec>().is_err());
    }
}
