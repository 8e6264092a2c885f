//! Cut points: every change the installer makes to a disk goes through
//! these functions, one call each.
//!
//! On a device they do exactly what `std::fs` does. In tests, a budget
//! stops the install after any given number of calls, as a power cut
//! would, so a test can cut an install after every single write and check
//! what the bootloader would boot next. Each call is all or nothing here:
//! that is the model the tests check against.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

thread_local! {
    /// Calls left before the simulated power cut; `None` on a device.
    static BUDGET: Cell<Option<u64>> = const { Cell::new(None) };
    /// Whether a call found the budget spent.
    static HIT: Cell<bool> = const { Cell::new(false) };
}

/// The error of a call made after the simulated power cut.
pub const CUT: &str = "simulated power cut";

/// Counts one change; fails once the test's budget is spent.
fn point() -> io::Result<()> {
    BUDGET.with(|b| match b.get() {
        None => Ok(()),
        Some(0) => {
            HIT.with(|h| h.set(true));
            Err(io::Error::other(CUT))
        }
        Some(n) => {
            b.set(Some(n - 1));
            Ok(())
        }
    })
}

/// Writes all of `buf` (one cut point).
pub fn write_all(w: &mut impl Write, buf: &[u8]) -> io::Result<()> {
    point()?;
    w.write_all(buf)
}

/// Creates or truncates a file (one cut point).
pub fn create(path: &Path) -> io::Result<File> {
    point()?;
    File::create(path)
}

/// Renames a file, replacing `to` (one cut point).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    point()?;
    std::fs::rename(from, to)
}

/// Removes a file; a file that does not exist is not an error (one cut
/// point, only when there was something to remove).
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    point()?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Creates a directory and its parents (one cut point, only when one is
/// missing).
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    point()?;
    std::fs::create_dir_all(path)
}

/// Flushes a file's data to the disk (one cut point).
pub fn sync(file: &File) -> io::Result<()> {
    point()?;
    file.sync_all()
}

/// Flushes a directory, so that renames and removals in it are on the disk
/// (one cut point).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    point()?;
    File::open(dir)?.sync_all()
}

/// Runs `f` with a budget of `calls` cut points; returns its result and
/// whether the cut happened (the budget ran out before `f` finished).
#[cfg(test)]
pub fn with_budget<T>(calls: u64, f: impl FnOnce() -> T) -> (T, bool) {
    BUDGET.with(|b| b.set(Some(calls)));
    HIT.with(|h| h.set(false));
    let out = f();
    BUDGET.with(|b| b.set(None));
    (out, HIT.with(|h| h.replace(false)))
}

/// Counts the cut points `f` passes through.
#[cfg(test)]
pub fn count<T>(f: impl FnOnce() -> T) -> (T, u64) {
    const LOTS: u64 = u64::MAX / 2;
    BUDGET.with(|b| b.set(Some(LOTS)));
    let out = f();
    let left = BUDGET.with(|b| b.replace(None)).unwrap_or(LOTS);
    (out, LOTS - left)
}
