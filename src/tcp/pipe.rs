//! Splice pipes and the per-worker pool they come from.
//!
//! A direction takes a pipe when bytes start to move and gives it back as
//! soon as it is empty, so an idle connection holds no pipe (HAProxy's
//! `get_pipe`/`put_pipe`). The pool keeps a bounded number of empty pipes for
//! reuse; the rest are closed.
//!
//! What must stay true:
//! - PIPE-1: a pipe in the pool is empty. Only the direction that filled a
//!   pipe knows how much it holds, so `put` is called by it only when its
//!   count of pending bytes is zero.
//! - PIPE-2: the pool never holds more than `max_pooled` pipes; its fds count
//!   against RLIMIT_NOFILE like any other.
//! - PIPE-3: a pipe whose size could not be set is still used at the size the
//!   kernel gave it (reported once), never refused.
//!
//! [`Buffers`] adds the worker's one scratch buffer, through which small
//! messages are relayed with recv/send instead of being spliced (see
//! `conn.rs`, CONN-6). It is shared by all of the worker's connections and
//! holds nothing between two calls: whatever a relay could not send at once
//! goes into a pipe before the call returns.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use log::warn;

use crate::stats::WorkerStats;
use crate::sys;

/// Bytes one relay moves at most: a read that fills it marks the flow as
/// bulk, which then goes through splice (CONN-6).
pub const SCRATCH_SIZE: usize = 16 * 1024;

/// What a worker's connections borrow to move bytes.
pub struct Buffers {
    pub pipes: PipePool,
    pub scratch: Box<[u8]>,
}

impl Buffers {
    pub fn new(pipe_size: usize, max_pooled: usize) -> Buffers {
        Buffers {
            pipes: PipePool::new(pipe_size, max_pooled),
            scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
        }
    }
}

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

pub struct PipePool {
    free: Vec<Pipe>,
    size: usize,
    max_pooled: usize,
    warned_size: bool,
}

impl PipePool {
    pub fn new(size: usize, max_pooled: usize) -> PipePool {
        PipePool {
            free: Vec::with_capacity(max_pooled),
            size,
            max_pooled,
            warned_size: false,
        }
    }

    pub fn get(&mut self, stats: &WorkerStats) -> io::Result<Pipe> {
        let pipe = match self.free.pop() {
            Some(p) => p,
            None => self.create()?,
        };
        stats.pipes_in_use.add(1);
        stats.pipes_pooled.set(self.free.len() as u64);
        Ok(pipe)
    }

    /// Return an empty pipe (PIPE-1).
    pub fn put(&mut self, pipe: Pipe, stats: &WorkerStats) {
        stats.pipes_in_use.sub(1);
        if self.free.len() < self.max_pooled {
            self.free.push(pipe);
        }
        stats.pipes_pooled.set(self.free.len() as u64);
    }

    /// Close a pipe that may still hold bytes (its connection is going away).
    pub fn discard(&mut self, pipe: Pipe, stats: &WorkerStats) {
        stats.pipes_in_use.sub(1);
        drop(pipe);
    }

    fn create(&mut self) -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        let capacity = match sys::set_pipe_size(write.as_raw_fd(), self.size) {
            Ok(n) => n,
            Err(e) => {
                let n = sys::pipe_size(write.as_raw_fd())?;
                if !self.warned_size {
                    warn!(
                        "pipe size {} refused ({e}); using {n} bytes (see fs.pipe-max-size and fs.pipe-user-pages-soft in tune/)",
                        self.size
                    );
                    self.warned_size = true;
                }
                n
            }
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_stays_bounded() {
        let stats = WorkerStats::default();
        let mut pool = PipePool::new(64 * 1024, 1);
        let a = pool.get(&stats).unwrap();
        let b = pool.get(&stats).unwrap();
        assert!(a.capacity() >= 64 * 1024);
        let a_fd = a.read_fd();
        assert_eq!(stats.pipes_in_use.get(), 2);
        pool.put(a, &stats);
        pool.put(b, &stats); // over max_pooled: closed
        assert_eq!(stats.pipes_in_use.get(), 0);
        assert_eq!(stats.pipes_pooled.get(), 1);
        assert_eq!(pool.get(&stats).unwrap().read_fd(), a_fd);
    }
}
