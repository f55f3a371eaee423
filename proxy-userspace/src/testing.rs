//! Objects for tests, read from YAML by the real manifest parser (the dir
//! source's), so unit, scenario and integration tests see what users' files
//! produce.

use std::path::Path;

use crate::{index::Snapshot, validate::ModelConfig};

/// The objects of a multi-document YAML text, validated with the default config.
pub fn objects(yaml: &str) -> Snapshot {
    objects_with(yaml, &ModelConfig::default())
}

/// The objects of a multi-document YAML text, validated with `config`.
pub fn objects_with(yaml: &str, config: &ModelConfig) -> Snapshot {
    crate::source::dir::parse_file(Path::new("test.yaml"), yaml.as_bytes(), config)
}
