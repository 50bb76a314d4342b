//! Memory of a stretch of work, for the benchmarks: the heap the CLI's counting allocator
//! sees, and the process's resident set from `/proc/self/status` (Linux; elsewhere none),
//! which is what a PyTorch process can be compared on.

use versatile::kernels::alloc::{heap_in_use, heap_peak, reset_heap_peak};

/// Where a measured stretch started.
#[derive(Debug, Clone, Copy)]
pub struct MemoryMark {
    heap: usize,
    rss: Option<u64>,
}

/// What a stretch took beyond what was in use at its [`MemoryMark`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryUse {
    /// Most heap bytes in use at once above the mark.
    pub heap_peak_bytes: usize,
    /// How far the resident set's high-water mark rose above the resident set at the mark.
    pub rss_growth_bytes: Option<u64>,
    /// The process's resident-set high-water mark (since the mark).
    pub rss_peak_bytes: Option<u64>,
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn resident() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts a stretch: resets both high-water marks to what is in use now (writing `5` to
/// `/proc/self/clear_refs` resets `VmHWM`).
pub fn mark() -> MemoryMark {
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    reset_heap_peak();
    MemoryMark {
        heap: heap_in_use(),
        rss: if reset {
            resident().map(|(rss, _)| rss)
        } else {
            None
        },
    }
}

impl MemoryMark {
    /// What the work since the mark took.
    pub fn used(&self) -> MemoryUse {
        let peak = self.rss.and(resident()).map(|(_, peak)| peak);
        MemoryUse {
            heap_peak_bytes: heap_peak().saturating_sub(self.heap),
            rss_growth_bytes: self
                .rss
                .zip(peak)
                .map(|(start, peak)| peak.saturating_sub(start)),
            rss_peak_bytes: peak,
        }
    }
}
