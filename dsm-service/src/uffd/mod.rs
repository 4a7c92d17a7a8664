//! The userfaultfd engine: a safe wrapper over the few userfaultfd operations
//! the DSM needs.
//!
//! Regions are registered in MISSING + WRITE-PROTECT mode, and the uffd is
//! created *without* `UFFD_USER_MODE_ONLY`, because the faults that matter come
//! from the kernel (KVM's EPT faults, `copy_from_user` in device emulation).

mod sys;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use sys::UffdMsg;

/// The page size the DSM works in.
pub const PAGE_SIZE: usize = 4096;

/// Errors of the userfaultfd engine.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd is not available.
    #[error("cannot create a userfaultfd (need Linux >= 5.7, and root or vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)")]
    Create(#[source] io::Error),
    /// The kernel lacks a feature the DSM needs.
    #[error("the kernel's userfaultfd lacks {0}")]
    MissingFeature(&'static str),
    /// An ioctl failed.
    #[error("{op} at {addr:#x}+{len:#x} failed")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A range is not page aligned.
    #[error("range {addr:#x}+{len:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
    },
}

/// What a `copy` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The page was installed.
    Copied,
    /// The page was already present (`EEXIST`); waiters were woken.
    AlreadyPresent,
}

/// A page fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address, rounded down to its page.
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
    /// The fault hit a write-protected present page (else: a missing page).
    pub wp: bool,
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a non-blocking userfaultfd that takes kernel-mode faults and
    /// negotiates the write-protect feature.
    pub fn new() -> Result<Self, UffdError> {
        let fd = open_uffd().map_err(UffdError::Create)?;
        let uffd = Uffd { fd };
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP | sys::UFFD_FEATURE_THREAD_ID,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `UffdioApi`, which `api` is,
        // and lives for the call.
        let r = unsafe { libc::ioctl(uffd.fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Err(UffdError::MissingFeature(
                    "anonymous write-protect (Linux 5.7)",
                ));
            }
            return Err(UffdError::Ioctl {
                op: "UFFDIO_API",
                addr: 0,
                len: 0,
                source: e,
            });
        }
        if api.features & sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::MissingFeature("UFFD_FEATURE_PAGEFAULT_FLAG_WP"));
        }
        Ok(uffd)
    }

    /// Registers `[addr, addr+len)` for MISSING and WRITE-PROTECT faults.
    pub fn register(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        check_aligned(addr, len)?;
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange { start: addr, len },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", sys::UFFDIO_REGISTER, &mut reg, addr, len)?;
        let needed = (1 << sys::_UFFDIO_COPY) | (1 << sys::_UFFDIO_WRITEPROTECT);
        if reg.ioctls & needed != needed {
            return Err(UffdError::MissingFeature(
                "UFFDIO_COPY/UFFDIO_WRITEPROTECT on this range",
            ));
        }
        Ok(())
    }

    /// Unregisters a range.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = sys::UffdioRange { start: addr, len };
        self.ioctl(
            "UFFDIO_UNREGISTER",
            sys::UFFDIO_UNREGISTER,
            &mut range,
            addr,
            len,
        )
    }

    /// Installs `src` (whole pages) at `dst`, write-protected when `wp`, and
    /// wakes the threads that wait on it.
    ///
    /// # Safety
    ///
    /// `dst..dst+src.len()` must lie in a range registered with this uffd.
    pub unsafe fn copy(&self, dst: u64, src: &[u8], wp: bool) -> Result<CopyOutcome, UffdError> {
        check_aligned(dst, src.len() as u64)?;
        let mut copy = sys::UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wp { sys::UFFDIO_COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        loop {
            match self.ioctl(
                "UFFDIO_COPY",
                sys::UFFDIO_COPY,
                &mut copy,
                dst,
                src.len() as u64,
            ) {
                Ok(()) => return Ok(CopyOutcome::Copied),
                Err(UffdError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EEXIST) =>
                {
                    // Another copy won the race (or a duplicate event): the
                    // page is there; make sure nobody keeps sleeping on it.
                    self.wake(dst, src.len() as u64)?;
                    return Ok(CopyOutcome::AlreadyPresent);
                }
                Err(UffdError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    // A concurrent change of the mapping; the kernel asks us
                    // to retry (it reports progress in `copy` for partial
                    // copies, which we redo in full: it is idempotent).
                    copy.copy = 0;
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets (`protect`) or clears write protection on a present range; clearing
    /// wakes the threads waiting on it.
    pub fn write_protect(&self, addr: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        check_aligned(addr, len)?;
        let mut wp = sys::UffdioWriteprotect {
            range: sys::UffdioRange { start: addr, len },
            mode: if protect {
                sys::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        loop {
            match self.ioctl(
                "UFFDIO_WRITEPROTECT",
                sys::UFFDIO_WRITEPROTECT,
                &mut wp,
                addr,
                len,
            ) {
                Err(UffdError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    std::thread::yield_now();
                }
                r => return r,
            }
        }
    }

    /// Wakes the threads waiting on a range without changing it.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = sys::UffdioRange { start: addr, len };
        self.ioctl("UFFDIO_WAKE", sys::UFFDIO_WAKE, &mut range, addr, len)
    }

    /// Reads the pending fault events into `out` (cleared first). Returns
    /// without blocking when there are none.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<()> {
        out.clear();
        let mut msgs = [UffdMsg::default(); 64];
        // SAFETY: reading into a buffer of `msgs.len()` `UffdMsg`s, which is
        // what the kernel writes (whole 32-byte messages).
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        for m in &msgs[..count] {
            if m.event != sys::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            out.push(Fault {
                addr: m.pf_address & !(PAGE_SIZE as u64 - 1),
                write: m.pf_flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: m.pf_flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0,
            });
        }
        Ok(())
    }

    fn ioctl<T>(
        &self,
        op: &'static str,
        req: u64,
        arg: &mut T,
        addr: u64,
        len: u64,
    ) -> Result<(), UffdError> {
        // SAFETY: every caller passes the struct type that matches `req`
        // (checked against the kernel ABI in `sys`), borrowed for the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(UffdError::Ioctl {
                op,
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn check_aligned(addr: u64, len: u64) -> Result<(), UffdError> {
    let mask = PAGE_SIZE as u64 - 1;
    if addr & mask != 0 || len & mask != 0 {
        return Err(UffdError::Unaligned { addr, len });
    }
    Ok(())
}

fn open_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd syscall takes only flags; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall_err = io::Error::last_os_error();
    // Fall back to /dev/userfaultfd (Linux 6.1+), which allows kernel-mode
    // faults for users with access to the device.
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(f) => f,
        Err(_) => return Err(syscall_err),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Drops the pages of a private anonymous range (`MADV_DONTNEED`); the next
/// touch raises a MISSING fault.
///
/// # Safety
///
/// The range must be mapped memory whose contents the caller may discard.
pub unsafe fn discard(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is mapped and discardable.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which pages of a range are resident (`mincore`), as one bool per page.
pub fn resident_pages(addr: u64, len: u64) -> io::Result<Vec<bool>> {
    let pages = (len as usize).div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, as mincore writes.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// An anonymous private mapping for a test, unmapped when dropped.
    struct Map {
        _map: memmap2::MmapMut,
        addr: u64,
        len: usize,
    }
    impl Map {
        fn new(len: usize) -> Map {
            let mut map = memmap2::MmapMut::map_anon(len).expect("mmap");
            let addr = map.as_mut_ptr() as u64;
            Map {
                _map: map,
                addr,
                len,
            }
        }
    }

    fn next_fault(uffd: &Uffd) -> Fault {
        let mut v = Vec::new();
        loop {
            let mut pfd = libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 5000) };
            uffd.read_faults(&mut v).unwrap();
            if let Some(f) = v.first() {
                return *f;
            }
        }
    }

    #[test]
    fn missing_then_wp_fault_is_resolved() {
        let uffd = Arc::new(Uffd::new().expect("userfaultfd"));
        let map = Map::new(2 * PAGE_SIZE);
        uffd.register(map.addr, map.len as u64).unwrap();
        let addr = map.addr;
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below).
            let v = unsafe { std::ptr::read_volatile(addr as *const u64) };
            assert_eq!(v, 7);
            // SAFETY: as above; this write hits a write-protected page.
            unsafe { std::ptr::write_volatile(addr as *mut u64, 9) };
            d2.store(true, Ordering::SeqCst);
        });
        let f = next_fault(&uffd);
        assert_eq!(
            f,
            Fault {
                addr,
                write: false,
                wp: false
            }
        );
        let mut page = vec![0u8; PAGE_SIZE];
        page[0] = 7;
        // SAFETY: the destination is in the registered range.
        let out = unsafe { uffd.copy(addr, &page, true) }.unwrap();
        assert_eq!(out, CopyOutcome::Copied);
        let f = next_fault(&uffd);
        assert_eq!(
            f,
            Fault {
                addr,
                write: true,
                wp: true
            }
        );
        assert!(!done.load(Ordering::SeqCst));
        uffd.write_protect(addr, PAGE_SIZE as u64, false).unwrap();
        t.join().unwrap();
        // SAFETY: the page is present and writable now.
        assert_eq!(unsafe { std::ptr::read_volatile(addr as *const u64) }, 9);
        // A second copy onto a present page reports EEXIST as AlreadyPresent.
        // SAFETY: in the registered range.
        let out = unsafe { uffd.copy(addr, &page, false) }.unwrap();
        assert_eq!(out, CopyOutcome::AlreadyPresent);
        // Discard: the next touch faults as missing again.
        // SAFETY: our own mapping.
        unsafe { discard(addr, PAGE_SIZE as u64) }.unwrap();
        assert_eq!(resident_pages(addr, PAGE_SIZE as u64).unwrap(), vec![false]);
    }
}
