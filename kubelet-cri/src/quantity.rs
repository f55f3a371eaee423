//! Kubernetes resource quantities, as numbers: millicores and bytes.

use crate::error::{KubeletError, Result};

/// Millicores of a CPU quantity (`500m`, `2`, `0.5`).
pub fn parse_cpu(q: &str) -> Result<i64> {
    let q = q.trim();
    let invalid = |e: &dyn std::fmt::Display| KubeletError::Invalid(format!("CPU quantity {q:?}: {e}"));
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().map_err(|e| invalid(&e));
    }
    let cores: f64 = q.parse().map_err(|e| invalid(&e))?;
    Ok((cores * 1000.0).round() as i64)
}

/// Bytes of a memory quantity (`128Mi`, `1G`, `1000`, `1.5Gi`).
pub fn parse_memory(q: &str) -> Result<i64> {
    let q = q.trim();
    let units: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, factor) =
        units.iter().find_map(|(suffix, f)| q.strip_suffix(suffix).map(|n| (n, *f))).unwrap_or((q, 1.0));
    let n: f64 = number.parse().map_err(|e| KubeletError::Invalid(format!("memory quantity {q:?}: {e}")))?;
    Ok((n * factor).round() as i64)
}
