//! Resource limits: RLIMIT_NOFILE, raised to its hard limit at start, and
//! which errors mean the process or the system ran out of something.
//!
//! What must stay true: SYS-1..3 (mod.rs).

use std::io;
use std::mem::MaybeUninit;

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so it filled the struct in.
    let mut lim = unsafe { lim.assume_init() };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    }
    Ok(lim.rlim_cur)
}

/// The hard RLIMIT_NOFILE: what the soft limit can be raised to.
pub fn nofile_hard_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so it filled the struct in.
    Ok(unsafe { lim.assume_init() }.rlim_max)
}

/// The current soft RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so it filled the struct in.
    Ok(unsafe { lim.assume_init() }.rlim_cur)
}

/// Is errno one that says "the process or system ran out of descriptors or
/// memory": a reason to pause accepting, not to give up.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
