//! The bpf(2) commands aya 0.14 does not wrap: the batched map commands,
//! and BPF_LINK_DETACH.

use std::{io, os::fd::RawFd};

use super::BATCH;

pub(super) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(super) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub(super) const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP, which it leaks to user space for map types
/// without a batch operation.
pub(super) const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`'s element member (lookup, update, delete).
#[repr(C)]
#[derive(Default)]
pub(super) struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

pub(super) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    sys_bpf(cmd, attr).map(|_| ())
}

/// bpf(2) itself: its non-negative result (an fd for the commands that
/// make one).
pub(super) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out, live bpf_attr member of
    // the size passed; the kernel reads the user buffers it points to,
    // which the callers keep alive and sized for `count` elements.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_long,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) const BPF_OBJ_GET: libc::c_long = 7;
pub(super) const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr`'s object member (pin, get).
#[repr(C)]
#[derive(Default)]
pub(super) struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr`'s link_detach member (padded to 8 bytes).
#[repr(C)]
#[derive(Default)]
pub(super) struct LinkDetachAttr {
    link_fd: u32,
    _pad: u32,
}

/// Detaches the link pinned at `path` now, whoever else holds it: an
/// unpinned link is only released after an RCU grace period and a work
/// item, so the program would go on judging packets for a while after
/// `unload` returned (long enough to see on a slow machine).
pub fn detach_pinned_link(path: &std::path::Path) -> io::Result<()> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut get = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // The path outlives the call.
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: a fresh fd the kernel just returned, owned here.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) };
    use std::os::fd::AsRawFd;
    let mut a = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
        _pad: 0,
    };
    bpf(BPF_LINK_DETACH, &mut a)
}

pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOTSUPP) | Some(libc::EOPNOTSUPP))
}

pub fn update(
    fd: RawFd,
    keys: &[u8],
    key_size: usize,
    values: &[u8],
    value_size: usize,
) -> io::Result<()> {
    let n = keys.len() / key_size;
    let mut done = 0;
    while done < n {
        let c = (n - done).min(BATCH);
        let mut a = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: c as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut a)?;
        done += a.count as usize;
    }
    Ok(())
}

pub fn delete(fd: RawFd, keys: &[u8], key_size: usize) -> io::Result<()> {
    let n = keys.len() / key_size;
    let mut done = 0;
    while done < n {
        let c = (n - done).min(BATCH);
        let mut a = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            count: c as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_BATCH, &mut a)?;
        done += a.count as usize;
    }
    Ok(())
}

pub fn update_one(fd: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut a = ElemAttr {
        map_fd: fd as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut a)
}

pub fn delete_one(fd: RawFd, key: &[u8]) -> io::Result<()> {
    let mut a = ElemAttr {
        map_fd: fd as u32,
        key: key.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut a)
}

/// Every element, `BATCH` per syscall; the kernel answers ENOENT once
/// it has returned the last one.
pub fn lookup_all(fd: RawFd, key_size: usize, value_size: usize) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut kbuf = vec![0u8; BATCH * key_size];
    let mut vbuf = vec![0u8; BATCH * value_size];
    // The position tokens of generic batch lookups are keys.
    let mut token_in = vec![0u8; key_size.max(8)];
    let mut token_out = vec![0u8; key_size.max(8)];
    let mut first = true;
    loop {
        let mut a = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: kbuf.as_mut_ptr() as u64,
            values: vbuf.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
        let got = a.count as usize;
        keys.extend_from_slice(&kbuf[..got * key_size]);
        values.extend_from_slice(&vbuf[..got * value_size]);
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((keys, values)),
            Err(e) => return Err(e),
        }
        if got == 0 {
            return Ok((keys, values));
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// Unix time of boot in nanoseconds: CLOCK_REALTIME minus CLOCK_BOOTTIME,
/// the offset that turns the kernel's `bpf_ktime_get_boot_ns` into the Unix
/// time the deadlines of time-limited entries are written in. The boot
/// clock is read on both sides of the wall clock and averaged, so the
/// offset is exact to the time of one read.
pub fn unix_at_boot_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    let ns = |c: ClockId| {
        clock_gettime(c).map_or(0i128, |t| {
            i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
        })
    };
    let b0 = ns(ClockId::CLOCK_BOOTTIME);
    let real = ns(ClockId::CLOCK_REALTIME);
    let b1 = ns(ClockId::CLOCK_BOOTTIME);
    u64::try_from(real - (b0 + b1) / 2).unwrap_or(0)
}
