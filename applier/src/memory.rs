//! Giving the memory a push freed back to the system.
//!
//! A push allocates in proportion to the whole fleet (the rendered units,
//! the merged Caddyfile, the composed config) and frees it all when it
//! ends. glibc's allocator keeps such pages in its arenas and returns only
//! the top of each heap, so without a trim the applier's resident memory
//! stays at the peak of its largest push for good (at 10,000 routes the
//! heap peaks near 180 MB and the process kept over 300 MiB). After a
//! convergence the task asks the allocator to return every free page
//! ([`MemoryTrim::after_convergence`]), at most once per
//! [`MemoryTrim::EVERY`], on a blocking thread so the runtime goes on; a
//! trim skipped for being too soon is done at the task's next health tick
//! ([`MemoryTrim::if_pending`]), so memory does not wait for another push.
//!
//! The `caddy-fleet` binary allocates with mimalloc, which returns freed
//! pages by itself and fragments less (at 10,000 routes the applier's
//! resident memory fell from 172 to 134 MiB; the images set
//! `MIMALLOC_ARENA_EAGER_COMMIT=0`, 142 MiB there and 36 instead of 66 MiB
//! at 1,000 routes); the trim then only covers
//! what C code allocates with glibc, and keeps an embedding of this crate
//! on the system allocator (the tests) from holding its peak.

use std::time::{Duration, Instant};

/// When the allocator was last asked to give memory back.
#[derive(Debug, Default)]
pub struct MemoryTrim {
    last: Option<Instant>,
    /// A convergence freed memory since the last trim.
    pending: bool,
}

impl MemoryTrim {
    /// At most one trim per this long: under a burst of pushes the next
    /// one would take the pages back at once.
    pub const EVERY: Duration = Duration::from_secs(5);

    /// Gives free memory back to the system, unless that was done within
    /// [`Self::EVERY`].
    pub fn after_convergence(&mut self) {
        self.pending = true;
        self.if_pending();
    }

    /// Trims if a convergence freed memory since the last trim and that
    /// was not within [`Self::EVERY`].
    pub fn if_pending(&mut self) {
        if !self.pending || self.last.is_some_and(|at| at.elapsed() < Self::EVERY) {
            return;
        }
        self.pending = false;
        self.last = Some(Instant::now());
        drop(tokio::task::spawn_blocking(trim));
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: `malloc_trim` has no preconditions: it walks glibc's own
    // arenas under their locks and returns the free pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
