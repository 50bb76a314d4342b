//! Crash-safe file writes: a file or directory appears under its name complete or not
//! at all, even if the process is killed or the machine loses power mid-write.
//!
//! Every write goes to a temporary sibling (`.NAME.tmp-PID-N`, unique per process and
//! call), is flushed to disk, renamed over the target, and the directory holding it is
//! flushed (on Unix) so the rename itself survives a power loss. On an error the temporary is
//! removed and the target is left as it was. A process killed mid-write leaves its
//! temporary behind; [`remove_stale_temporaries`] clears them out.
//!
//! Errors are the operating system's; callers add the path and what was being written.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a temporary's name carries after the target's name: `.tmp-PID-N`.
const TEMP_MARK: &str = ".tmp-";

/// A fresh path beside `target` for a temporary of it: `.NAME.tmp-PID-N`.
fn temp_path(target: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", target.display()),
        )
    })?;
    let mut temp = std::ffi::OsString::from(".");
    temp.push(name);
    temp.push(format!(
        "{TEMP_MARK}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(target.with_file_name(temp))
}

/// `true` for a name [`temp_path`] makes (`.NAME.tmp-PID-N`).
fn is_temporary(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((_, suffix)) = rest.rsplit_once(TEMP_MARK) else {
        return false;
    };
    let mut parts = suffix.split('-');
    let digits = |part: Option<&str>| {
        part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (names created, renamed or removed in it) to disk.
fn sync_dir(dir: &Path) -> io::Result<()> {
    // Only Unix can open a directory to fsync it; elsewhere the rename is all there is.
    if cfg!(unix) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Renames `temp` over `target` and flushes their directory; removes `temp` when
/// `result` (the writing) or the rename fails.
fn commit(temp: &Path, target: &Path, result: io::Result<()>) -> io::Result<()> {
    let result = result
        .and_then(|()| std::fs::rename(temp, target))
        .and_then(|()| sync_dir(parent_of(target)));
    if result.is_err() {
        // The target may already be in place if only the directory flush failed; a
        // temporary that is gone is not an error.
        let _ = std::fs::remove_file(temp);
    }
    result
}

/// Writes `contents` to `path` atomically and durably.
///
/// # Errors
/// The operating system's error (a full disk, no permission, ...); `path` is then as it
/// was before the call (unless only the last step, flushing its directory, failed).
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let temp = temp_path(path)?;
    let written = (|| {
        let mut file = File::create_new(&temp)?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    commit(&temp, path, written)
}

/// [`write_atomic`] for writers that open the file themselves: `write` is given the
/// temporary path to create, and its file is then flushed and renamed over `path`.
///
/// # Errors
/// `write`'s error or the operating system's, as [`write_atomic`].
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let temp = temp_path(path)?;
    let written = write(&temp).and_then(|()| File::open(&temp)?.sync_all());
    commit(&temp, path, written)
}

/// An empty temporary directory beside `target`, to fill and then
/// [`publish_dir`] as `target`.
///
/// # Errors
/// The operating system's error when it cannot be created.
pub fn create_temp_dir(target: &Path) -> io::Result<PathBuf> {
    let temp = temp_path(target)?;
    std::fs::create_dir(&temp)?;
    Ok(temp)
}

/// Makes the directory `temp` (from [`create_temp_dir`]) appear as `target`, which
/// must not exist: flushes every file in it and the directory itself, renames it, and
/// flushes the parent. On an error `temp` is removed and `target` does not appear.
///
/// # Errors
/// The operating system's error (`target` existing is one).
pub fn publish_dir(temp: &Path, target: &Path) -> io::Result<()> {
    let result = sync_tree(temp)
        .and_then(|()| {
            if target.exists() {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists already", target.display()),
                ))
            } else {
                std::fs::rename(temp, target)
            }
        })
        .and_then(|()| sync_dir(parent_of(target)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(temp);
    }
    result
}

/// Flushes every file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Removes the temporaries that killed writers left in `dir` (files and directories
/// named as this module names them); returns what it removed. Only for directories no
/// other process is writing to at the same time.
///
/// # Errors
/// The operating system's error when `dir` cannot be listed or an entry not removed. A
/// missing `dir` has nothing to remove.
pub fn remove_stale_temporaries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_name().to_str().is_some_and(is_temporary) {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn temporaries_are_unique_and_recognized() {
        let a = temp_path(Path::new("run/metrics.json")).unwrap();
        let b = temp_path(Path::new("run/metrics.json")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("run")));
        for temp in [&a, &b] {
            assert!(is_temporary(temp.file_name().unwrap().to_str().unwrap()));
        }
        for name in [
            "metrics.json",
            ".hidden",
            ".x.tmp-12",
            ".x.tmp-12-",
            ".x.tmp-a-1",
            "x.tmp-1-2",
            ".x.tmp-1-2-3",
        ] {
            assert!(!is_temporary(name), "{name}");
        }
    }

    #[test]
    fn write_replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        write_atomic_with(&path, |temp| std::fs::write(temp, b"newer")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bpk");
        write_atomic(&path, b"complete").unwrap();
        let err = write_atomic_with(&path, |temp| {
            std::fs::write(temp, b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"complete");
        assert_eq!(names(dir.path()), ["model.bpk"]);
        // A writer that creates nothing: the sync fails, the target is untouched.
        assert!(write_atomic_with(&path, |_| Ok(())).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"complete");
    }

    #[test]
    fn directories_publish_whole_and_never_over_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("step-1");
        let temp = create_temp_dir(&target).unwrap();
        std::fs::write(temp.join("a"), b"1").unwrap();
        std::fs::create_dir(temp.join("sub")).unwrap();
        std::fs::write(temp.join("sub/b"), b"2").unwrap();
        publish_dir(&temp, &target).unwrap();
        assert_eq!(std::fs::read(target.join("sub/b")).unwrap(), b"2");
        assert_eq!(names(dir.path()), ["step-1"]);

        let temp = create_temp_dir(&target).unwrap();
        std::fs::write(temp.join("a"), b"other").unwrap();
        let err = publish_dir(&temp, &target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");
        assert_eq!(names(dir.path()), ["step-1"]);
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint.json"), b"{}").unwrap();
        std::fs::write(dir.path().join(".notes"), b"").unwrap();
        std::fs::write(dir.path().join(".checkpoint.json.tmp-99-0"), b"{").unwrap();
        std::fs::create_dir(dir.path().join(".step-3.tmp-99-1")).unwrap();
        std::fs::write(dir.path().join(".step-3.tmp-99-1/model.bpk"), b"").unwrap();
        let mut removed = remove_stale_temporaries(dir.path()).unwrap();
        removed.sort();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(names(dir.path()), [".notes", "checkpoint.json"]);
        let missing = dir.path().join("missing");
        assert!(remove_stale_temporaries(&missing).unwrap().is_empty());
    }
}
