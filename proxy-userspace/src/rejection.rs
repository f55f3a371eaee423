//! Why an object (or part of one) was skipped. Bad input is reported with
//! one of these and skipped; nothing else is lost.

use std::fmt;

/// Why an object (or part of one) was skipped, as a stable metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    Unreadable,
    MissingName,
    MissingSpec,
    InvalidClusterIp,
    UnsupportedProtocol,
    InvalidPort,
    FrontendConflict,
    MissingServiceLabel,
    InvalidAddressType,
    InvalidEndpointAddress,
    InvalidExternalAddress,
    InvalidSourceRange,
}

impl RejectReason {
    pub const fn label(self) -> &'static str {
        match self {
            RejectReason::Unreadable => "unreadable",
            RejectReason::MissingName => "missing_name",
            RejectReason::MissingSpec => "missing_spec",
            RejectReason::InvalidClusterIp => "invalid_cluster_ip",
            RejectReason::UnsupportedProtocol => "unsupported_protocol",
            RejectReason::InvalidPort => "invalid_port",
            RejectReason::FrontendConflict => "frontend_conflict",
            RejectReason::MissingServiceLabel => "missing_service_label",
            RejectReason::InvalidAddressType => "invalid_address_type",
            RejectReason::InvalidEndpointAddress => "invalid_endpoint_address",
            RejectReason::InvalidExternalAddress => "invalid_external_address",
            RejectReason::InvalidSourceRange => "invalid_source_range",
        }
    }
}

/// An object (or part of one) that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from: a file path, or the API server.
    pub origin: String,
    /// `Kind namespace/name`, or the document's position when it has no name.
    pub object: String,
    pub kind: RejectReason,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.object, self.reason)
    }
}

/// What was skipped of one object. Most objects have nothing skipped, and
/// the index holds every object, so an empty list takes one word.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[expect(clippy::box_collection, reason = "a thin pointer: one word for the many objects without rejections")]
pub struct Rejections(Option<Box<Vec<Rejection>>>);

impl Rejections {
    pub fn push(&mut self, rejection: Rejection) {
        self.0.get_or_insert_default().push(rejection);
    }
}

impl std::ops::Deref for Rejections {
    type Target = [Rejection];

    fn deref(&self) -> &[Rejection] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl<'a> IntoIterator for &'a Rejections {
    type Item = &'a Rejection;
    type IntoIter = std::slice::Iter<'a, Rejection>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}
