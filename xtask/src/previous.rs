//! The previous release's `kpr`, built from the commit `xtask/previous-release`
//! names (in this repository's history), for the upgrade test. Built once
//! into `target/previous-release/` with its own target folder (the two
//! builds' binaries share a name), and kept while the commit stays.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// The commit of the previous release.
fn commit(root: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(root.join("xtask/previous-release")).context("reading xtask/previous-release")?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .context("xtask/previous-release names no commit")
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new("git").args(args).current_dir(root).output().with_context(|| format!("running git {}", args.join(" ")))
}

fn has_commit(root: &Path, commit: &str) -> bool {
    git(root, &["cat-file", "-e", &format!("{commit}^{{commit}}")]).is_ok_and(|o| o.status.success())
}

/// Builds the previous release's `kpr` into `target/previous-release/kpr`
/// unless it is there for the same commit.
pub(crate) fn build(root: &Path) -> anyhow::Result<()> {
    let commit = commit(root)?;
    let out = root.join("target/previous-release");
    let stamp = out.join("commit");
    if out.join("kpr").exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == commit) {
        return Ok(());
    }
    if !has_commit(root, &commit) {
        // A shallow clone: its history may be fetched.
        git(root, &["fetch", "--quiet", "--unshallow"]).ok();
        if !has_commit(root, &commit) {
            bail!(
                "the previous release {commit} is not in this clone's history (a shallow clone?): the upgrade test needs it"
            );
        }
    }
    eprintln!("xtask: building the previous release ({}) for the upgrade test", &commit[..12.min(commit.len())]);
    let src = out.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!("git archive --format=tar {commit} | tar -x -C '{}'", src.display()))
        .current_dir(root)
        .status()
        .context("extracting the previous release")?;
    if !archive.success() {
        bail!("git archive {commit} failed ({archive})");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--package", "proxy-userspace", "--bin", "kpr"])
        .env("CARGO_TARGET_DIR", out.join("target"))
        // Only the binary is kept: no debug info or incremental state to
        // fill the disk with.
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .env("CARGO_INCREMENTAL", "0")
        .current_dir(&src)
        .status()
        .context("building the previous release")?;
    if !status.success() {
        bail!("building the previous release {commit} failed ({status})");
    }
    std::fs::copy(out.join("target/debug/kpr"), out.join("kpr"))?;
    std::fs::write(&stamp, &commit)?;
    // The build folder is several GB and the stamp makes it unneeded.
    std::fs::remove_dir_all(out.join("target")).ok();
    std::fs::remove_dir_all(&src).ok();
    Ok(())
}
