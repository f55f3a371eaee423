//! Where the socket hooks attach: a cgroup v2 directory. Every process in
//! it or below (pods and node processes alike, in any network namespace) has
//! its connects and sends to Service VIPs given a backend.

use std::path::PathBuf;

/// The mount point of the cgroup v2 hierarchy in `mountinfo` (the text of
/// `/proc/self/mountinfo`), preferring one that shows the hierarchy's root.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut found = None;
    for line in mountinfo.lines() {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`
        let Some((before, after)) = line.split_once(" - ") else { continue };
        if after.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = before.split_whitespace();
        let (Some(root), Some(point)) = (fields.nth(3), fields.next()) else { continue };
        let point = PathBuf::from(unescape(point));
        if root == "/" {
            return Some(point);
        }
        found.get_or_insert(point);
    }
    found
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4).and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup v2 mount this process sees, if any.
pub fn find_root() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_hierarchy_of_a_hybrid_layout() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn prefers_the_root_of_the_hierarchy_and_unescapes_the_path() {
        let info = "\
50 1 0:40 /kubepods /var/lib/sub rw - cgroup2 cgroup2 rw
51 1 0:40 / /run/my\\040cgroup rw - cgroup2 none rw
";
        assert_eq!(cgroup2_mount(info), Some(PathBuf::from("/run/my cgroup")));
        assert_eq!(cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), None);
    }
}
