//! Reading small files whole, with a bound on their size: a file that is not what its
//! name says (a device, a log, a dataset under a configuration's name) is never read to
//! its end.

use std::io::Read;
use std::path::Path;

/// The bytes of `path` when it holds at most `max` bytes; `None` when it holds more
/// (of which only `max + 1` bytes were read).
pub(crate) fn read_at_most(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}
