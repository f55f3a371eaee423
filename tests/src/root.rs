/// True when the tests may touch the kernel (root). Without root they are
/// skipped with a note, except in CI (`CI` set), where that is a failure:
/// root-only tests never skip silently there.
pub fn require_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root, and CI is set: run the suite as root");
    }
    eprintln!("skipping {test}: needs root");
    false
}
