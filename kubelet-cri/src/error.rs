//! What can go wrong in the slim kubelet, one kind per cause, so callers
//! (and tests) tell a runtime that is away from a pod it cannot run.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The runtime endpoint is malformed, nothing listens there, or it is
    /// not ready to run pods.
    #[error("{0}")]
    Runtime(String),
    /// A CRI call failed; the runtime's own words.
    #[error("{call}: {}", status.message())]
    Call {
        call: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Asked for something this kubelet cannot do or that is invalid: a
    /// pod spec, a quantity, a command-line choice.
    #[error("{0}")]
    Invalid(String),
    /// What was asked for does not exist (a pod's logs).
    #[error("{0}")]
    NotFound(String),
    #[error("the API server: {0}")]
    Api(#[from] kube::Error),
}

pub type Result<T> = std::result::Result<T, KubeletError>;

/// Maps a failed CRI call to [`KubeletError::Call`].
pub fn call(name: &'static str) -> impl FnOnce(tonic::Status) -> KubeletError {
    move |status| KubeletError::Call { call: name, status: Box::new(status) }
}

/// Maps an I/O error to [`KubeletError::Io`], saying what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KubeletError {
    let what = what.into();
    move |source| KubeletError::Io { what, source }
}

/// [`io`] for reading or writing `path`.
pub fn io_at(doing: &str, path: &Path) -> impl FnOnce(std::io::Error) -> KubeletError {
    io(format!("{doing} {}", path.display()))
}
