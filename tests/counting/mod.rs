//! A counting global allocator for the memory tests: bytes asked for, and
//! bytes malloc reserved for them. A test binary installs it with
//! `#[global_allocator] static GLOBAL: counting::Counting = counting::Counting;`.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Forwards to the system allocator, counting bytes.
pub struct Counting;
/// Bytes the program asked for.
pub static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Bytes malloc set aside for them: each block's usable size (requests are
/// rounded up) plus its 8-byte header, so per-allocation overhead counts.
pub static RESERVED: AtomicUsize = AtomicUsize::new(0);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn reserved(p: *mut u8, _size: usize) -> usize {
    unsafe extern "C" {
        fn malloc_usable_size(p: *mut std::ffi::c_void) -> usize;
    }
    // SAFETY: `p` is a live block from the system allocator (glibc malloc).
    unsafe { malloc_usable_size(p.cast()) + 8 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn reserved(_p: *mut u8, size: usize) -> usize {
    size
}

// SAFETY: forwards to `System` unchanged, counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: caller's layout.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
            RESERVED.fetch_add(reserved(p, l.size()), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        RESERVED.fetch_sub(reserved(p, l.size()), Ordering::Relaxed);
        // SAFETY: allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let old = reserved(p, l.size());
        // SAFETY: caller's arguments.
        let q = unsafe { System.realloc(p, l, n) };
        if !q.is_null() {
            LIVE.fetch_add(n, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            RESERVED.fetch_add(reserved(q, n), Ordering::Relaxed);
            RESERVED.fetch_sub(old, Ordering::Relaxed);
        }
        q
    }
}
