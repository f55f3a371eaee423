//! `fsGroup`: a pod's writable volumes (emptyDir) and configuration volumes
//! belong to its group, as the kubelet's `SetVolumeOwnership` makes them:
//! every file and folder gets the group, group access (read and write, or
//! read only for configuration volumes) and folders the setgid bit, so what
//! containers create inside keeps the group.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

const S_ISGID: u32 = 0o2000;

/// `mode` with the group's access added: read and write (or read only),
/// and search where the owner may execute; folders get setgid.
pub fn with_group(mode: u32, is_dir: bool, read_only: bool) -> u32 {
    let owner_x = mode & 0o100 != 0;
    let group = match (read_only, is_dir || owner_x) {
        (false, true) => 0o070,
        (false, false) => 0o060,
        (true, true) => 0o050,
        (true, false) => 0o040,
    };
    mode | group | if is_dir { S_ISGID } else { 0 }
}

/// Gives everything under `dir` (itself included) to group `gid`.
pub fn set(dir: &Path, gid: u32, read_only: bool) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    // The link itself changes group; what it points at is walked on its own.
    std::os::unix::fs::lchown(dir, None, Some(gid))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = with_group(meta.mode() & 0o7777, meta.is_dir(), read_only);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            set(&entry?.path(), gid, read_only)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_get_the_group_and_setgid_files_group_access() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(sub.join("f"), "x").unwrap();
        std::fs::set_permissions(sub.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("a/f", dir.path().join("link")).unwrap();
        // Our own group: this runs without privileges too.
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        set(dir.path(), gid, false).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&sub), 0o2770);
        assert_eq!(mode(&sub.join("f")), 0o660);
        set(dir.path(), gid, true).unwrap();
        assert_eq!(mode(&sub.join("f")), 0o660, "read only adds no write, and takes none away");
    }
}
