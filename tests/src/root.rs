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

/// Returns from the calling test when it may not touch the kernel (see
/// [`require_root`]).
#[macro_export]
macro_rules! root_or_skip {
    () => {
        if !$crate::root::require_root(module_path!()) {
            return;
        }
    };
}

/// Declares each listed `fn name(mode: Mode)` as two tests, one per
/// dataplane, in modules `ebpf` and `iptables`: the same test code must pass
/// in both, as the modes are interchangeable from a client's point of view.
#[macro_export]
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $(#[test] fn $name() { super::$name($crate::kpr::Mode::Ebpf) })*
        }
        mod iptables {
            $(#[test] fn $name() { super::$name($crate::kpr::Mode::Iptables) })*
        }
    };
}
