//! Scratch directories for tests (shared by the library's and the CLI's tests).

use std::path::Path;

/// A directory for one test's files, removed with everything in it when dropped.
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.path()
    }
}

/// A fresh, empty directory for one test's files, named after the test; unique, since the
/// tests of one binary share the process and two may use one name.
pub fn scratch(test: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("versatile-{test}-"))
        .tempdir()
        .unwrap();
    Scratch(dir)
}
