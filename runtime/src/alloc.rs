//! The runtime's allocator: mimalloc under a cache of freed blocks that
//! the next inference takes again.
//!
//! The device binary is static musl, and musl's malloc maps blocks of more
//! than a few pages with `mmap` and unmaps them on free, and takes a lock on
//! every call: in the musl build the engine ran up to 2.6x slower than in a
//! glibc one (cnn 0.30 against 0.12 ms, mobilenetv3 at two threads 5.8
//! against 2.5 ms). The blocks come from mimalloc ([`MiMalloc`]) instead,
//! told by [`Global`] to return freed memory to the system at once, so the
//! idle server stays small.
//!
//! Returning memory at once would make every inference fault its buffers in
//! again, so [`Retaining`] wraps mimalloc: a freed block of at least
//! [`LARGE`] bytes (a plane of a small feature map already) goes into a
//! bounded cache instead, and the next allocation of the same size class
//! takes it, pages still mapped and faulted in. Large sizes are rounded up
//! to one of 8 classes per power of two (at most 12.5 % waste) so blocks of
//! nearly the same size share a class. Smaller allocations go straight to
//! [`MiMalloc`].
//!
//! The cache is a fixed array of [`SLOTS`] slots behind a [`Mutex`]
//! (which does not allocate on Linux), bounded in bytes; a block that does
//! not fit goes back to mimalloc. [`trim`] returns every cached block,
//! which the server does once it has been idle for a second, so the idle
//! RSS stays low; under load it calls [`release_unused`] every second,
//! which returns the blocks nobody took since the previous call (what a
//! burst of requests left), so RSS follows what the inferences use.
//!
//! The binary installs [`Global`], which uses the one [`CACHE`]:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: basalt_runtime::alloc::Global = basalt_runtime::alloc::Global;
//! ```
//!
//! Where it is not installed (tests, other programs) the cache stays empty,
//! mimalloc keeps its defaults, and [`trim`] only has mimalloc collect.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use mimalloc::MiMalloc;

/// The smallest block the cache keeps, in bytes; smaller ones go straight
/// to [`MiMalloc`].
pub const LARGE: usize = 4 * 1024;

/// How many blocks the cache holds at most.
pub const SLOTS: usize = 512;

/// The default bound of the cache in bytes (256 MiB). The cache fills to
/// what one inference's buffers take, which is more than the model's
/// largest tensors: resnet18 (224x224) at two threads needs about 100 MiB.
/// Under a bound of 64 MiB, blocks that did not fit went back to mimalloc
/// and every inference faulted them in again (3,900 page faults, 28 ms;
/// with this bound 25 ms). Only a server under load holds the cache; an
/// idle one returns it ([`trim`]).
pub const DEFAULT_LIMIT: usize = 256 * 1024 * 1024;

/// Size classes per power of two (so rounding wastes at most 1/8).
const STEPS_LOG2: u32 = 3;

/// The size a large allocation of `size` bytes really gets: `size` rounded
/// up to the next of 8 steps in its power of two. Smaller sizes are kept
/// as they are. `None` when rounding overflows.
pub fn size_class(size: usize) -> Option<usize> {
    if size < LARGE {
        return Some(size);
    }
    let log2 = usize::BITS - 1 - size.leading_zeros();
    let step = 1usize << (log2 - STEPS_LOG2);
    size.checked_add(step - 1).map(|s| s & !(step - 1))
}

/// The layout a large allocation is made with: its size class, its
/// alignment. Both the allocating and the freeing side compute it from the
/// caller's layout, so they agree.
fn class_layout(layout: Layout) -> Option<Layout> {
    let size = size_class(layout.size())?;
    Layout::from_size_align(size, layout.align()).ok()
}

/// One cached block: its address, its class layout's size and alignment,
/// and the period ([`Retaining::release_unused`]) it was cached in.
#[derive(Clone, Copy)]
struct Slot {
    addr: usize,
    size: usize,
    align: usize,
    period: usize,
}

const EMPTY: Slot = Slot { addr: 0, size: 0, align: 0, period: 0 };

/// The cached blocks, `slots[..len]`, newest last; the current period.
struct Blocks {
    slots: [Slot; SLOTS],
    len: usize,
    period: usize,
}

/// [`MiMalloc`] with a bounded cache of freed large blocks; see the module
/// documentation.
pub struct Retaining {
    blocks: Mutex<Blocks>,
    /// Bytes in the cache (also kept in `blocks`, readable without the lock).
    cached: AtomicUsize,
    limit: usize,
}

impl Retaining {
    /// An allocator whose cache holds at most `limit` bytes.
    pub const fn new(limit: usize) -> Retaining {
        Retaining {
            blocks: Mutex::new(Blocks { slots: [EMPTY; SLOTS], len: 0, period: 0 }),
            cached: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes the cache holds (rounded sizes of the blocks).
    pub fn cached_bytes(&self) -> usize {
        self.cached.load(Ordering::Relaxed)
    }

    /// Blocks the cache holds.
    pub fn cached_blocks(&self) -> usize {
        self.lock().len
    }

    /// The cache's bound in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Returns every cached block to [`MiMalloc`].
    pub fn trim(&self) {
        if self.cached_bytes() == 0 {
            return;
        }
        let mut b = self.lock();
        for s in &b.slots[..b.len] {
            // SAFETY: the block came from MiMalloc with this layout (the
            // class layout of the allocation), and nobody else holds it.
            unsafe {
                MiMalloc
                    .dealloc(s.addr as *mut u8, Layout::from_size_align_unchecked(s.size, s.align))
            };
        }
        b.len = 0;
        self.cached.store(0, Ordering::Relaxed);
    }

    /// Returns the cached blocks nobody took since the previous call, and
    /// starts a new period. Called every second under load, it keeps the
    /// cache to the blocks that are used again (an inference's buffers)
    /// rather than what a burst of requests left behind.
    pub fn release_unused(&self) {
        let mut b = self.lock();
        let current = b.period;
        let mut kept = 0;
        let mut freed = 0;
        for i in 0..b.len {
            let s = b.slots[i];
            if s.period == current {
                b.slots[kept] = s;
                kept += 1;
            } else {
                // SAFETY: as in `trim`.
                unsafe {
                    MiMalloc.dealloc(
                        s.addr as *mut u8,
                        Layout::from_size_align_unchecked(s.size, s.align),
                    )
                };
                freed += s.size;
            }
        }
        b.len = kept;
        b.period = current.wrapping_add(1);
        self.cached.fetch_sub(freed, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        // Nothing panics while holding the lock; should something, the
        // slots are still consistent.
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached block of exactly this class layout, newest first.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        if self.cached_bytes() < layout.size() {
            return None;
        }
        let mut b = self.lock();
        let len = b.len;
        let i = b.slots[..len]
            .iter()
            .rposition(|s| s.size == layout.size() && s.align == layout.align())?;
        let s = b.slots[i];
        b.slots[i] = b.slots[len - 1];
        b.len = len - 1;
        self.cached.fetch_sub(s.size, Ordering::Relaxed);
        Some(s.addr as *mut u8)
    }

    /// Keeps a freed block of this class layout; false when it does not
    /// fit (no free slot, or over the byte bound).
    fn put(&self, ptr: *mut u8, layout: Layout) -> bool {
        if layout.size() > self.limit {
            return false;
        }
        let mut b = self.lock();
        let cached = self.cached.load(Ordering::Relaxed);
        if b.len == SLOTS || cached.saturating_add(layout.size()) > self.limit {
            return false;
        }
        let len = b.len;
        let period = b.period;
        b.slots[len] =
            Slot { addr: ptr as usize, size: layout.size(), align: layout.align(), period };
        b.len = len + 1;
        self.cached.store(cached + layout.size(), Ordering::Relaxed);
        true
    }

    /// Allocates a large block of this class layout, zeroed if asked.
    unsafe fn alloc_large(&self, class: Layout, zeroed: bool) -> *mut u8 {
        match self.take(class) {
            Some(p) => {
                if zeroed {
                    // SAFETY: the block holds `class.size()` bytes.
                    unsafe { std::ptr::write_bytes(p, 0, class.size()) };
                }
                p
            }
            // SAFETY: `class` has a non-zero size (it is large).
            None if zeroed => unsafe { MiMalloc.alloc_zeroed(class) },
            None => unsafe { MiMalloc.alloc(class) },
        }
    }
}

impl Default for Retaining {
    /// An allocator bounded by [`DEFAULT_LIMIT`].
    fn default() -> Retaining {
        Retaining::new(DEFAULT_LIMIT)
    }
}

impl Drop for Retaining {
    fn drop(&mut self) {
        self.trim();
    }
}

// SAFETY: large blocks are allocated from MiMalloc with their class layout,
// which holds at least the requested size with the requested alignment,
// and freed (to MiMalloc or into the cache) with the class layout computed
// from the same caller layout; a cached block is handed out once.
unsafe impl GlobalAlloc for Retaining {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: the caller's contract.
            return unsafe { MiMalloc.alloc(layout) };
        }
        match class_layout(layout) {
            // SAFETY: as above; `class` is large.
            Some(class) => unsafe { self.alloc_large(class, false) },
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: the caller's contract.
            return unsafe { MiMalloc.alloc_zeroed(layout) };
        }
        match class_layout(layout) {
            // SAFETY: as above; `class` is large.
            Some(class) => unsafe { self.alloc_large(class, true) },
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < LARGE {
            // SAFETY: the caller's contract; small blocks came from MiMalloc.
            return unsafe { MiMalloc.dealloc(ptr, layout) };
        }
        // The allocation succeeded, so its class layout exists.
        let Some(class) = class_layout(layout) else { return };
        if !self.put(ptr, class) {
            // SAFETY: the block came from MiMalloc with the class layout.
            unsafe { MiMalloc.dealloc(ptr, class) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let large = |size| size >= LARGE;
        if !large(layout.size()) && !large(new_size) {
            // SAFETY: the caller's contract; small blocks are MiMalloc's.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        if large(layout.size())
            && large(new_size)
            && size_class(layout.size()) == size_class(new_size)
        {
            // The same block holds the new size.
            return ptr;
        }
        // SAFETY: `new` has a non-zero size (one of the sizes is large and
        // the other is then either large too or the new size, non-zero by
        // the caller's contract).
        let p = unsafe { self.alloc(new) };
        if !p.is_null() {
            // SAFETY: both blocks hold at least the smaller size and are
            // distinct (the old one is still allocated).
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        p
    }
}

/// The one cache [`Global`] uses.
pub static CACHE: Retaining = Retaining::new(DEFAULT_LIMIT);

/// The global allocator of the `basalt-runtime` binary: [`Retaining`] over
/// [`CACHE`]. Install it with `#[global_allocator]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

/// mimalloc's option numbers (`mi_option_e` of the mimalloc 3 that
/// libmimalloc-sys builds; `options_have_mimalloc_3_numbers` checks them).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_MS: std::ffi::c_long = 0;

/// Whether [`configure`] has run.
static CONFIGURED: AtomicBool = AtomicBool::new(false);

/// Sets mimalloc's options before its first allocation: memory freed to it
/// goes back to the system at once (purge delay 0; mimalloc's default is a
/// second, acted on only by a later call on the same thread, so an idle
/// server kept 80-260 MiB) and its arenas are committed as they are used,
/// not whole. The inference buffers stay mapped in [`CACHE`] anyway, so this
/// keeps the idle RSS near what the model needs at little cost in time.
fn configure() {
    if !CONFIGURED.load(Ordering::Relaxed) {
        CONFIGURED.store(true, Ordering::Relaxed);
        // SAFETY: plain option setters; setting twice (a race on the
        // first allocations) sets the same values.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

// SAFETY: every method forwards to CACHE, a Retaining.
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        configure();
        // SAFETY: forwarded.
        unsafe { CACHE.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        configure();
        // SAFETY: forwarded.
        unsafe { CACHE.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { CACHE.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { CACHE.realloc(ptr, layout, new_size) }
    }
}

/// Returns every block [`CACHE`] holds to mimalloc (nothing to do when
/// [`Global`] is not the global allocator), then has mimalloc return the
/// memory nobody uses to the system at once: on its own it does that only
/// after a delay and only when it is called again, which an idle server
/// does not do.
pub fn trim() {
    CACHE.trim();
    // SAFETY: no preconditions; mimalloc frees only memory it knows unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Returns the blocks [`CACHE`] kept and nobody took since the previous
/// call ([`Retaining::release_unused`]).
pub fn release_unused() {
    CACHE.release_unused();
}

/// Bytes [`CACHE`] holds.
pub fn cached_bytes() -> usize {
    CACHE.cached_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn options_have_mimalloc_3_numbers() {
        // Nothing in this test binary configures mimalloc, so the options
        // read their documented defaults: a wrong number reads another one.
        // SAFETY: plain option getters.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT), 2);
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
        }
    }

    #[test]
    fn size_classes_waste_at_most_an_eighth() {
        assert_eq!(size_class(100), Some(100));
        assert_eq!(size_class(LARGE - 1), Some(LARGE - 1));
        assert_eq!(size_class(LARGE), Some(LARGE));
        assert_eq!(size_class(LARGE + 1), Some(LARGE + LARGE / 8));
        assert_eq!(size_class(1 << 20), Some(1 << 20));
        assert_eq!(size_class((1 << 20) + 1), Some((1 << 20) + (1 << 17)));
        for size in (LARGE..8 << 20).step_by(4093) {
            let c = size_class(size).unwrap();
            assert!(c >= size && (c - size) * 8 <= size, "{size} -> {c}");
            assert_eq!(size_class(c), Some(c), "a class is its own class");
        }
        assert_eq!(size_class(usize::MAX), None);
    }

    #[test]
    fn a_freed_large_block_comes_back_for_its_class() {
        let a = Retaining::new(DEFAULT_LIMIT);
        let first = layout(300_000, 8);
        let p = unsafe { a.alloc(first) };
        assert!(!p.is_null());
        unsafe { p.write_bytes(7, first.size()) };
        unsafe { a.dealloc(p, first) };
        assert_eq!(a.cached_bytes(), size_class(300_000).unwrap());
        // A slightly different size of the same class gets the same block.
        let second = layout(300_100, 8);
        let q = unsafe { a.alloc(second) };
        assert_eq!(q, p);
        assert_eq!(a.cached_bytes(), 0);
        // Another class does not.
        let other = layout(600_000, 8);
        unsafe { a.dealloc(q, second) };
        let r = unsafe { a.alloc(other) };
        assert_ne!(r, p);
        assert_eq!(a.cached_blocks(), 1);
        unsafe { a.dealloc(r, other) };
        assert_eq!(a.cached_blocks(), 2);
        a.trim();
    }

    #[test]
    fn small_blocks_are_not_cached() {
        let a = Retaining::new(DEFAULT_LIMIT);
        let l = layout(LARGE - 1, 8);
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        unsafe { a.dealloc(p, l) };
        assert_eq!(a.cached_bytes(), 0);
        assert_eq!(a.cached_blocks(), 0);
    }

    #[test]
    fn alignment_is_honored_and_part_of_the_class() {
        let a = Retaining::new(DEFAULT_LIMIT);
        for align in [4096, 1 << 16] {
            let l = layout(200_000, align);
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            unsafe { a.dealloc(p, l) };
            let q = unsafe { a.alloc(l) };
            assert_eq!(q, p);
            unsafe { a.dealloc(q, l) };
        }
        // A cached 4096-aligned block is not handed to a 8-aligned layout
        // (it would be freed with the other alignment), nor the reverse.
        let loose = layout(200_000, 8);
        let p = unsafe { a.alloc(loose) };
        assert_eq!(a.cached_blocks(), 2);
        unsafe { a.dealloc(p, loose) };
        assert_eq!(a.cached_blocks(), 3);
        let strict = layout(200_000, 4096);
        let q = unsafe { a.alloc(strict) };
        assert_eq!(q as usize % 4096, 0);
        unsafe { a.dealloc(q, strict) };
        a.trim();
        assert_eq!(a.cached_blocks(), 0);
    }

    #[test]
    fn a_reused_block_is_zeroed_when_asked() {
        let a = Retaining::new(DEFAULT_LIMIT);
        let l = layout(256 * 1024, 16);
        let p = unsafe { a.alloc(l) };
        unsafe { p.write_bytes(0xAB, l.size()) };
        unsafe { a.dealloc(p, l) };
        let q = unsafe { a.alloc_zeroed(l) };
        assert_eq!(q, p);
        let bytes = unsafe { std::slice::from_raw_parts(q, size_class(l.size()).unwrap()) };
        assert!(bytes.iter().all(|&b| b == 0));
        unsafe { a.dealloc(q, l) };
        // A fresh zeroed block is zero too.
        let l2 = layout(512 * 1024, 16);
        let r = unsafe { a.alloc_zeroed(l2) };
        let bytes = unsafe { std::slice::from_raw_parts(r, l2.size()) };
        assert!(bytes.iter().all(|&b| b == 0));
        unsafe { a.dealloc(r, l2) };
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_and_slots() {
        let a = Retaining::new(1 << 20);
        assert_eq!(a.limit(), 1 << 20);
        let l = layout(256 * 1024, 8);
        let blocks: Vec<*mut u8> = (0..6).map(|_| unsafe { a.alloc(l) }).collect();
        for &p in &blocks {
            unsafe { a.dealloc(p, l) };
        }
        assert_eq!(a.cached_bytes(), 1 << 20, "4 blocks of 256 KiB fit, 2 went back");
        assert_eq!(a.cached_blocks(), 4);
        // A block bigger than the bound is never kept.
        let huge = layout(2 << 20, 8);
        let p = unsafe { a.alloc(huge) };
        unsafe { a.dealloc(p, huge) };
        assert_eq!(a.cached_bytes(), 1 << 20);
        a.trim();

        let a = Retaining::new(usize::MAX / 2);
        let l = layout(LARGE, 8);
        let blocks: Vec<*mut u8> = (0..SLOTS + 3).map(|_| unsafe { a.alloc(l) }).collect();
        for &p in &blocks {
            unsafe { a.dealloc(p, l) };
        }
        assert_eq!(a.cached_blocks(), SLOTS);
        assert_eq!(a.cached_bytes(), SLOTS * LARGE);
    }

    #[test]
    fn trim_empties_the_cache() {
        let a = Retaining::default();
        let l = layout(1 << 20, 8);
        let ps: Vec<*mut u8> = (0..3).map(|_| unsafe { a.alloc(l) }).collect();
        for p in ps {
            unsafe { a.dealloc(p, l) };
        }
        assert_eq!(a.cached_blocks(), 3);
        a.trim();
        assert_eq!(a.cached_bytes(), 0);
        assert_eq!(a.cached_blocks(), 0);
        a.trim();
        // It still allocates afterwards.
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        unsafe { a.dealloc(p, l) };
    }

    #[test]
    fn release_unused_keeps_what_was_cached_again_since() {
        let a = Retaining::default();
        let l = layout(1 << 20, 8);
        let p = unsafe { a.alloc(l) };
        let q = unsafe { a.alloc(l) };
        unsafe { a.dealloc(p, l) };
        unsafe { a.dealloc(q, l) };
        a.release_unused();
        assert_eq!(a.cached_blocks(), 2, "cached in this period: kept");
        // One is used again (and cached anew); the other sits.
        let r = unsafe { a.alloc(l) };
        unsafe { a.dealloc(r, l) };
        a.release_unused();
        assert_eq!(a.cached_blocks(), 1);
        assert_eq!(a.cached_bytes(), size_class(1 << 20).unwrap());
        a.release_unused();
        assert_eq!(a.cached_blocks(), 0);
        assert_eq!(a.cached_bytes(), 0);
    }

    #[test]
    fn realloc_keeps_the_data_across_small_and_large() {
        let a = Retaining::default();
        let fill = |p: *mut u8, n: usize| {
            for i in 0..n {
                unsafe { *p.add(i) = (i % 251) as u8 };
            }
        };
        let check =
            |p: *const u8, n: usize| (0..n).all(|i| unsafe { *p.add(i) } == (i % 251) as u8);
        // (from, to): small -> small, small -> large, large -> large in
        // the same class, large -> larger, large -> smaller, large -> small.
        let sizes = [1000, 4000, 200_000, 200_100, 1_500_000, 300_000, 100];
        let mut l = layout(sizes[0], 8);
        let mut p = unsafe { a.alloc(l) };
        fill(p, l.size());
        for &n in &sizes[1..] {
            let q = unsafe { a.realloc(p, l, n) };
            assert!(!q.is_null());
            let kept = l.size().min(n);
            assert!(check(q, kept), "{} -> {n}", l.size());
            if size_class(l.size()) == size_class(n) && l.size() >= LARGE {
                assert_eq!(q, p, "the same class keeps the block");
            }
            l = layout(n, 8);
            p = q;
            fill(p, n);
        }
        unsafe { a.dealloc(p, l) };
        // Aligned large blocks keep their alignment through realloc.
        let l = layout(100_000, 4096);
        let p = unsafe { a.alloc(l) };
        let q = unsafe { a.realloc(p, l, 900_000) };
        assert_eq!(q as usize % 4096, 0);
        unsafe { a.dealloc(q, layout(900_000, 4096)) };
    }

    #[test]
    fn the_global_cache_is_empty_where_not_installed() {
        let v = vec![0u8; 1 << 20];
        drop(v);
        assert_eq!(cached_bytes(), 0);
        trim();
    }
}
