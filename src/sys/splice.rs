//! splice(2) and the pipes it moves bytes through: one non-blocking
//! splice, the urgent mark it stops at, a copy into a pipe, and making and
//! sizing pipes.
//!
//! What must stay true: SYS-1..3 (mod.rs); a pipe's two ends are owned
//! from the moment pipe2(2) returns them (SYS-2).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// One splice(2) call, non-blocking, moving pages rather than copying them.
/// `Ok(0)` from a socket means end of stream.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    syscall!(splice(
        from,
        std::ptr::null_mut(),
        to,
        std::ptr::null_mut(),
        len,
        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
    ))
    .map(|n| n as usize)
}

/// SIOCATMARK from <asm-generic/sockios.h>; the libc crate has it only for
/// BSDs.
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Is the next byte to read from this TCP socket its urgent mark? splice(2)
/// stops there and, when the FIN is in too, answers 0 as if at EOF.
pub fn at_urgent_mark(fd: RawFd) -> io::Result<bool> {
    let mut at: libc::c_int = 0;
    syscall!(ioctl(fd, SIOCATMARK as _, &mut at as *mut libc::c_int))?;
    Ok(at != 0)
}

/// Copy `buf` into a pipe with write(2); `Ok(n)` may be short when the pipe
/// has less room than `buf`.
pub fn write_pipe(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    syscall!(write(fd, buf.as_ptr() as *const libc::c_void, buf.len())).map(|n| n as usize)
}

/// A non-blocking pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))?;
    // SAFETY: pipe2(2) just returned these two descriptors, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ask for a pipe capacity of `size` bytes and return what the kernel granted
/// (it rounds up to a power-of-two number of pages, and refuses sizes over
/// fs.pipe-max-size without CAP_SYS_RESOURCE).
pub fn set_pipe_size(fd: RawFd, size: usize) -> io::Result<usize> {
    syscall!(fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int))?;
    pipe_size(fd)
}

pub fn pipe_size(fd: RawFd) -> io::Result<usize> {
    syscall!(fcntl(fd, libc::F_GETPIPE_SZ)).map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn splice_moves_socket_bytes_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (mut c, d) = {
            let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
            (c, l2.accept().unwrap().0)
        };
        let (r, w) = pipe().unwrap();
        let cap = set_pipe_size(w.as_raw_fd(), 128 * 1024).unwrap();
        assert!(cap >= 128 * 1024);
        a.write_all(b"hello through a pipe").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let n = splice(b.as_raw_fd(), w.as_raw_fd(), cap).unwrap();
        assert_eq!(n, 20);
        assert_eq!(splice(r.as_raw_fd(), d.as_raw_fd(), n).unwrap(), 20);
        let mut buf = [0u8; 20];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello through a pipe");
        // An empty pipe read non-blocking is EAGAIN, not end of stream.
        let e = splice(r.as_raw_fd(), d.as_raw_fd(), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
