//! Array maps (`BPF_F_MMAPABLE`) mapped into the daemon's memory: how the
//! lookups' tables are written, with no syscall per entry.

use std::ptr::NonNull;

use super::*;

/// A shared, writable mapping of a whole array map.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    pub(super) len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the kernel's
// readers never see a slot while it is written (see `Maps::apply`).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn new(map: &MapData, name: &'static str, len: usize) -> Result<Self> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length against the map and keeps the pages alive while
        // mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DatapathError::MapIo {
                name,
                op: "mmap",
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(DatapathError::MapIo {
            name,
            op: "mmap",
            source: io::Error::other("a null mapping"),
        })?;
        Ok(Self { ptr, len })
    }

    /// Copies `src` in at element `at` of `T`s.
    pub(super) fn write<T: Copy>(&self, at: usize, src: &[T]) {
        let size = std::mem::size_of::<T>();
        let end = (at + src.len()) * size;
        assert!(end <= self.len, "write past the mapping");
        // SAFETY: in bounds (checked above); T is a plain `repr(C)` type of
        // the shared layout; the mapping is page aligned.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().cast::<u8>(),
                self.ptr.as_ptr().add(at * size),
                std::mem::size_of_val(src),
            );
        }
    }

    pub(super) fn read<T: Copy + Default>(&self, at: usize, n: usize) -> Vec<T> {
        let size = std::mem::size_of::<T>();
        assert!((at + n) * size <= self.len, "read past the mapping");
        let mut out = vec![T::default(); n];
        // SAFETY: in bounds (checked above); any bytes are a valid T.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(at * size),
                out.as_mut_ptr().cast::<u8>(),
                n * size,
            );
        }
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub(super) fn page_round(n: usize) -> usize {
    n.div_ceil(4096) * 4096
}

/// `words` packed `N` to an array value (`value` makes one of each `N`),
/// as the lookups' tables of 64-byte values are written; `words` fills
/// whole values.
pub(super) fn pack<const N: usize, T>(words: &[u32], value: impl Fn([u32; N]) -> T) -> Vec<T> {
    words
        .chunks_exact(N)
        .map(|c| value(c.try_into().expect("a chunk of N words")))
        .collect()
}

/// A pinned array map that can be mapped whole. It is mapped only while a
/// slot is written or read: a mapping's pages count in the daemon's
/// resident memory although they are the kernel's (at a million prefixes
/// 84 MB of the daemon's 385 MB were these), and mapping again costs a
/// page fault per 4 KiB touched, about a millisecond per write.
pub(super) struct MappableArray {
    data: MapData,
    name: &'static str,
    pub(super) len: usize,
}

impl MappableArray {
    /// The map and its entries.
    pub(super) fn open(pin_dir: &Path, name: &'static str) -> Result<(Self, u32)> {
        let path = pin_dir.join(name);
        if !path.exists() {
            return Err(DatapathError::NotLoaded(pin_dir.to_path_buf()));
        }
        let data = MapData::from_pin(&path).map_err(map_err(name))?;
        let info = data.info().map_err(map_err(name))?;
        // An array map lays its values out at 8-byte strides.
        let stride = (info.value_size() as usize).div_ceil(8) * 8;
        let entries = info.max_entries();
        let len = page_round(stride * entries as usize);
        Ok((Self { data, name, len }, entries))
    }

    /// A mapping of the whole map, unmapped when dropped.
    pub(super) fn map(&self) -> Result<Mapping> {
        Mapping::new(&self.data, self.name, self.len)
    }
}
