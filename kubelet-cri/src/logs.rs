//! Container logs in the CRI format the runtime writes
//! (`2016-10-06T00:17:09.669794202Z stdout F text`, `P` for a partial line),
//! read back for `kpr kubelet logs`.

use std::{
    io::{BufRead as _, Seek as _},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::error::{KubeletError, Result, io, io_at};

/// One line as the container wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp: String,
    pub stream: String,
    pub text: String,
}

/// Joins partial lines; lines that are not in the format are skipped.
#[derive(Default)]
pub struct Parser {
    partial: Option<LogLine>,
}

impl Parser {
    pub fn push(&mut self, raw: &str) -> Option<LogLine> {
        let mut parts = raw.trim_end_matches('\n').splitn(4, ' ');
        let (timestamp, stream, tag) = (parts.next()?, parts.next()?, parts.next()?);
        let text = parts.next().unwrap_or_default();
        let line = match self.partial.take() {
            Some(mut p) => {
                p.text.push_str(text);
                p
            }
            None => LogLine { timestamp: timestamp.into(), stream: stream.into(), text: text.into() },
        };
        match tag {
            "P" => {
                self.partial = Some(line);
                None
            }
            _ => Some(line),
        }
    }
}

/// Rotates a running container's log at `path` once it is over
/// `max_size` bytes, as the kubelet's container log manager does: renamed
/// to `PATH.NANOS`; the runtime is then asked to reopen `path`, and once it
/// has, [`prune`] keeps the newest rotated files. Returns the rotated
/// file's path when it rotated.
pub fn rotate(path: &Path, max_size: u64) -> std::io::Result<Option<PathBuf>> {
    if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) <= max_size {
        return Ok(None);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(format!(".{nanos}"));
    let rotated = PathBuf::from(rotated);
    std::fs::rename(path, &rotated)?;
    Ok(Some(rotated))
}

/// Keeps the newest `max_files - 1` rotated files of the log at `path`
/// beside the live one.
pub fn prune(path: &Path, max_files: usize) -> std::io::Result<()> {
    let mut old = rotated_files(path);
    // Oldest first: the names end in the rotation time.
    old.sort();
    let excess = old.len().saturating_sub(max_files.saturating_sub(1).max(1));
    for file in &old[..excess] {
        std::fs::remove_file(file)?;
    }
    Ok(())
}

/// The rotated files of the log at `path` (`PATH.NANOS`).
fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return Vec::new() };
    let prefix = format!("{name}.");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix(&prefix))
                        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the log of a removed container instance, rotated files included.
pub fn remove_instance(path: &Path) {
    for file in rotated_files(path).into_iter().chain([path.to_path_buf()]) {
        if let Err(e) = std::fs::remove_file(&file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(file = %file.display(), error = %e, "removing a dead container's log");
        }
    }
}

/// The log file of the latest instance of `container` in the pod log
/// folder `dir` (`CONTAINER/ATTEMPT.log`).
pub fn latest(dir: &Path, container: &str) -> Result<PathBuf> {
    let folder = dir.join(container);
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(&folder)
        .map_err(|e| KubeletError::NotFound(format!("no logs for container {container} in {}: {e}", dir.display())))?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let attempt = path.file_stem()?.to_str()?.parse().ok()?;
            Some((attempt, path))
        })
        .collect();
    files.sort();
    match files.pop() {
        Some((_, path)) => Ok(path),
        None => Err(KubeletError::NotFound(format!("container {container} has written no logs yet"))),
    }
}

/// The pod log folder of `namespace/name` under `logs_root` (NS_NAME_UID).
pub fn pod_dir(logs_root: &Path, namespace: &str, name: &str) -> Result<PathBuf> {
    let prefix = format!("{namespace}_{name}_");
    let mut found: Vec<PathBuf> = std::fs::read_dir(logs_root)
        .map_err(io_at("reading", logs_root))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    // The newest, if the pod was recreated under a new uid.
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found
        .pop()
        .ok_or_else(|| KubeletError::NotFound(format!("no pod {namespace}/{name} has logs in {}", logs_root.display())))
}

/// Writes the lines of `file` to `out`; with `follow`, keeps reading as the
/// container writes, moving on to a newer instance's file when one appears.
pub fn print(dir: &Path, container: &str, follow: bool, out: &mut impl std::io::Write) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let mut file = latest(dir, container)?;
    let mut parser = Parser::default();
    let open = |file: &Path| -> Result<(std::io::BufReader<std::fs::File>, u64)> {
        let f = std::fs::File::open(file).map_err(io_at("opening", file))?;
        let inode = f.metadata().map_err(io_at("reading", file))?.ino();
        Ok((std::io::BufReader::new(f), inode))
    };
    let (mut reader, mut inode) = open(&file)?;
    let mut line = String::new();
    loop {
        line.clear();
        let pos = reader.stream_position().map_err(io_at("reading", &file))?;
        if reader.read_line(&mut line).map_err(io_at("reading", &file))? > 0 && line.ends_with('\n') {
            if let Some(l) = parser.push(&line) {
                writeln!(out, "{}", l.text).map_err(io("writing the log out"))?;
            }
            continue;
        }
        // At the end (or mid-line): wait for more unless not following.
        reader.seek(std::io::SeekFrom::Start(pos)).map_err(io_at("reading", &file))?;
        if !follow {
            return Ok(());
        }
        out.flush().map_err(io("writing the log out"))?;
        let newest = latest(dir, container)?;
        // A newer instance's file, or this one rotated (the path names a
        // fresh file now): the old one is read to its end already.
        let rotated = std::fs::metadata(&newest).is_ok_and(|m| m.ino() != inode);
        if newest != file || rotated {
            file = newest;
            (reader, inode) = open(&file)?;
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_parsed_and_partials_joined() {
        let mut p = Parser::default();
        assert_eq!(
            p.push("2026-01-01T00:00:00.1Z stdout F hello world\n"),
            Some(LogLine {
                timestamp: "2026-01-01T00:00:00.1Z".into(),
                stream: "stdout".into(),
                text: "hello world".into()
            })
        );
        assert_eq!(p.push("2026-01-01T00:00:00.2Z stderr P par"), None);
        assert_eq!(p.push("2026-01-01T00:00:00.3Z stderr F tial").unwrap().text, "partial");
        assert_eq!(p.push("2026-01-01T00:00:00.4Z stdout F ").unwrap().text, "", "an empty line");
        assert_eq!(p.push("garbage"), None);
    }

    #[test]
    fn the_latest_instance_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app")).unwrap();
        for (attempt, text) in [(0, "first"), (1, "second"), (10, "eleventh")] {
            std::fs::write(dir.path().join(format!("app/{attempt}.log")), format!("t stdout F {text}\n")).unwrap();
        }
        let mut out = Vec::new();
        print(dir.path(), "app", false, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "eleventh\n");
        assert!(print(dir.path(), "other", false, &mut Vec::new()).is_err());
    }

    /// Takes lines until it has `want` (or its time is up), then refuses
    /// more, ending a follow.
    struct Lines {
        got: Vec<u8>,
        want: usize,
        until: std::time::Instant,
    }

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.got.iter().filter(|b| **b == b'\n').count() >= self.want {
                return Err(std::io::Error::other("enough"));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            // A follow flushes while it waits: the place to stop it.
            if self.got.iter().filter(|b| **b == b'\n').count() >= self.want || std::time::Instant::now() > self.until {
                return Err(std::io::Error::other("enough"));
            }
            Ok(())
        }
    }

    #[test]
    fn following_goes_on_in_the_fresh_file_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        let log = dir.path().join("app/0.log");
        std::fs::write(&log, "2026-01-01T00:00:00Z stdout F before\n").unwrap();
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                rotate(&log, 0).unwrap();
                std::fs::write(&log, "2026-01-01T00:00:01Z stdout F after\n").unwrap();
            })
        };
        let mut out = Lines { got: Vec::new(), want: 2, until: std::time::Instant::now() + Duration::from_secs(5) };
        let ended = print(dir.path(), "app", true, &mut out);
        writer.join().unwrap();
        assert!(ended.is_err(), "ended by the writer refusing more");
        assert_eq!(String::from_utf8(out.got).unwrap(), "before\nafter\n");
    }

    #[test]
    fn logs_rotate_over_their_size_and_keep_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(&log, "x".repeat(10)).unwrap();
        assert_eq!(rotate(&log, 10).unwrap(), None, "not over the size");
        for round in 0..4 {
            std::fs::write(&log, "y".repeat(11 + round)).unwrap();
            assert!(rotate(&log, 10).unwrap().is_some());
            assert!(!log.exists(), "the runtime reopens it");
            prune(&log, 3).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let mut kept = rotated_files(&log);
        kept.sort();
        assert_eq!(kept.len(), 2, "max 3 files: the live one and two rotated");
        assert_eq!(std::fs::read_to_string(&kept[1]).unwrap().len(), 14, "the newest kept");
        std::fs::write(&log, "z").unwrap();
        remove_instance(&log);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
