//! Signals: sets of signal numbers, the blocked mask, the signalfd the
//! control loop reads them from, their names for the log, and the actions
//! the daemon sets before the first thread starts (main.rs MAIN-2).
//!
//! What must stay true: SYS-1..3 (mod.rs); no handler of ours is ever
//! installed: signals are blocked and read, or given SIG_DFL or SIG_IGN.

use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A set of signal numbers, real-time ones included (nix's `Signal` has none
/// of those).
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    pub fn of(signals: &[libc::c_int]) -> io::Result<SignalSet> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        syscall!(sigemptyset(set.as_mut_ptr()))?;
        // SAFETY: sigemptyset succeeded, so it initialised the set.
        let mut set = unsafe { set.assume_init() };
        for &signo in signals {
            syscall!(sigaddset(&mut set, signo))?;
        }
        Ok(SignalSet(set))
    }
}

/// Block `set` in the calling thread, and so in every thread it starts
/// afterwards: those signals then wait for a [`SignalFd`] and never run a
/// handler or a default action.
pub fn block_signals(set: &SignalSet) -> io::Result<()> {
    // SAFETY: `set` is an initialised sigset_t; no old mask is asked for.
    // pthread_sigmask returns its error rather than setting errno.
    match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set.0, std::ptr::null_mut()) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// A non-blocking signalfd for a blocked set, to poll with mio.
pub struct SignalFd(OwnedFd);

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

pub fn signal_fd(set: &SignalSet) -> io::Result<SignalFd> {
    let fd = syscall!(signalfd(-1, &set.0, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC))?;
    // SAFETY: signalfd(2) just returned this descriptor and nothing else owns it.
    Ok(SignalFd(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One signal taken from a signalfd, and who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalInfo {
    pub signo: libc::c_int,
    /// The sender's pid and uid; 0 when the kernel raised it.
    pub pid: u32,
    pub uid: u32,
}

/// The next pending signal on `fd`; `Ok(None)` when there is none.
pub fn read_signal(fd: &SignalFd) -> io::Result<Option<SignalInfo>> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = mem::size_of::<libc::signalfd_siginfo>();
    loop {
        match syscall!(read(
            fd.as_raw_fd(),
            info.as_mut_ptr() as *mut libc::c_void,
            size
        )) {
            Ok(n) if n as usize == size => {
                // SAFETY: the kernel filled in the whole struct.
                let info = unsafe { info.assume_init() };
                return Ok(Some(SignalInfo {
                    signo: info.ssi_signo as libc::c_int,
                    pid: info.ssi_pid,
                    uid: info.ssi_uid,
                }));
            }
            Ok(n) => return Err(io::Error::other(format!("signalfd: read {n} bytes"))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A signal's name for the log: `SIGHUP`, `SIGRTMIN+3`, `SIGRTMAX`.
pub fn signal_name(signo: libc::c_int) -> String {
    if let Ok(s) = nix::sys::signal::Signal::try_from(signo) {
        return s.as_str().to_string();
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    match signo {
        s if s == min => "SIGRTMIN".to_string(),
        s if s == max => "SIGRTMAX".to_string(),
        s if min < s && s < max => format!("SIGRTMIN+{}", s - min),
        s => format!("signal {s}"),
    }
}

/// Give `signals` their default action. Rust's runtime catches SIGSEGV and
/// SIGBUS to report stack overflows; for anything else its handler only
/// puts the default back and returns, so a SIGSEGV sent with kill(2) does
/// nothing the first time.
pub fn default_action(signals: &[libc::c_int]) -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    for &signo in signals {
        let sig = nix::sys::signal::Signal::try_from(signo).map_err(io::Error::from)?;
        let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: SIG_DFL runs no code of ours, and nothing in tproxyd relies
        // on the handler it replaces.
        unsafe { sigaction(sig, &dfl) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// The kernel's first real-time signal. glibc keeps the numbers from here up
/// to its SIGRTMIN() for itself (SIGCANCEL, SIGSETXID).
const KERNEL_SIGRTMIN: libc::c_int = 32;

/// The kernel's `struct sigaction` on x86_64 and arm64 (not glibc's): the
/// raw rt_sigaction(2) takes it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

impl KernelSigaction {
    /// An action with `handler` (SIG_DFL or SIG_IGN), no flags, no
    /// restorer and an empty mask.
    fn plain(handler: libc::sighandler_t) -> KernelSigaction {
        KernelSigaction {
            handler,
            flags: 0,
            restorer: 0,
            mask: 0,
        }
    }
}

/// Ignore the real-time signals glibc keeps for itself that have no
/// handler: their default action ends the process, and glibc will neither
/// block them nor set their action (it answers EINVAL), so the raw system
/// call does it. tproxyd never uses them: 32, SIGCANCEL, serves only
/// pthread_cancel. One with a handler is left alone (glibc's own for 33,
/// SIGSETXID, ignores a signal it did not send itself). Returns the
/// signals it set to ignored.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn ignore_reserved_signals() -> io::Result<Vec<libc::c_int>> {
    let size_of_mask = mem::size_of::<u64>();
    let mut ignored = Vec::new();
    for signo in KERNEL_SIGRTMIN..libc::SIGRTMIN() {
        let mut old = KernelSigaction::plain(libc::SIG_DFL);
        // A null new action only reads the current one into `old`, which is
        // the kernel's struct, with the kernel's mask size.
        syscall!(syscall(
            libc::SYS_rt_sigaction,
            signo as libc::c_long,
            std::ptr::null::<KernelSigaction>(),
            &mut old as *mut KernelSigaction,
            size_of_mask
        ))?;
        if old.handler != libc::SIG_DFL {
            continue;
        }
        let ignore = KernelSigaction::plain(libc::SIG_IGN);
        // SIG_IGN needs no restorer: no handler is ever entered.
        syscall!(syscall(
            libc::SYS_rt_sigaction,
            signo as libc::c_long,
            &ignore as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            size_of_mask
        ))?;
        ignored.push(signo);
    }
    Ok(ignored)
}

/// Elsewhere the kernel's struct differs; those signals keep their action.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn ignore_reserved_signals() -> io::Result<Vec<libc::c_int>> {
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named_for_the_log() {
        let min = libc::SIGRTMIN();
        assert_eq!(signal_name(libc::SIGHUP), "SIGHUP");
        assert_eq!(signal_name(min), "SIGRTMIN");
        assert_eq!(signal_name(min + 3), "SIGRTMIN+3");
        assert_eq!(signal_name(libc::SIGRTMAX()), "SIGRTMAX");
        assert_eq!(signal_name(32), "signal 32");
    }
}
