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
//! - PIPE-4: directions moving bulk (relay.rs CONN-6) get bulk pipes
//!   (`--bulk-pipe-size`, 1 MiB by default where the kernel allows it):
//!   one splice then moves up to 16 times as much. At most
//!   [`BULK_BUDGET_BYTES`] of them are in use per worker; past that, bulk
//!   directions get ordinary pipes, so slow readers cannot pin more kernel
//!   memory than that.
//!
//! [`Buffers`] adds the worker's one scratch buffer, through which small
//! messages are relayed with recv/send instead of being spliced (see
//! `relay.rs`, CONN-6). It is shared by all of the worker's connections and
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
    pub fn new(pipe_size: usize, bulk_pipe_size: usize, max_pooled: usize) -> Buffers {
        Buffers {
            pipes: PipePool::new(pipe_size, bulk_pipe_size, max_pooled),
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

/// Bulk pipe capacity a worker may have in use at once (PIPE-4): with 1 MiB
/// bulk pipes, 32 of them. A stalled reader can pin what its pipe holds, so
/// this bounds the kernel memory slow readers can tie up per worker.
pub const BULK_BUDGET_BYTES: usize = 32 << 20;

pub struct PipePool {
    free: Vec<Pipe>,
    bulk_free: Vec<Pipe>,
    size: usize,
    bulk_size: usize,
    max_pooled: usize,
    /// Bulk pipes that may be in use at once; 0 when there are none.
    bulk_budget: usize,
    bulk_in_use: usize,
    warned_size: bool,
}

impl PipePool {
    /// Pipes of `size` bytes, and for bulk directions pipes of `bulk_size`
    /// (no bulk pipes when it is not larger).
    pub fn new(size: usize, bulk_size: usize, max_pooled: usize) -> PipePool {
        let bulk_budget = if bulk_size > size {
            (BULK_BUDGET_BYTES / bulk_size).max(1)
        } else {
            0
        };
        PipePool {
            free: Vec::with_capacity(max_pooled),
            bulk_free: Vec::with_capacity(bulk_budget),
            size,
            bulk_size,
            max_pooled,
            bulk_budget,
            bulk_in_use: 0,
            warned_size: false,
        }
    }

    /// Is `pipe` a bulk pipe? Judged by the capacity it really has, so one
    /// the kernel would not enlarge counts, and is pooled, as a small one.
    pub fn is_bulk(&self, pipe: &Pipe) -> bool {
        pipe.capacity > self.size
    }

    /// Would `get(true, ..)` give a bulk pipe now?
    pub fn bulk_available(&self) -> bool {
        self.bulk_in_use < self.bulk_budget
    }

    /// A pipe for a direction; a bulk one if `bulk` asks and the budget
    /// allows (PIPE-4), otherwise one of the ordinary size.
    pub fn get(&mut self, bulk: bool, stats: &WorkerStats) -> io::Result<Pipe> {
        let pipe = if bulk && self.bulk_available() {
            match self.bulk_free.pop() {
                Some(p) => p,
                None => self.create(self.bulk_size)?,
            }
        } else {
            match self.free.pop() {
                Some(p) => p,
                None => self.create(self.size)?,
            }
        };
        if self.is_bulk(&pipe) {
            self.bulk_in_use += 1;
            stats.pipes_bulk_in_use.add(1);
        }
        stats.pipes_in_use.add(1);
        stats
            .pipes_pooled
            .set((self.free.len() + self.bulk_free.len()) as u64);
        Ok(pipe)
    }

    /// Return an empty pipe (PIPE-1).
    pub fn put(&mut self, pipe: Pipe, stats: &WorkerStats) {
        stats.pipes_in_use.sub(1);
        if self.is_bulk(&pipe) {
            self.bulk_in_use = self.bulk_in_use.saturating_sub(1);
            stats.pipes_bulk_in_use.sub(1);
            if self.bulk_free.len() < self.bulk_budget {
                self.bulk_free.push(pipe);
            }
        } else if self.free.len() < self.max_pooled {
            self.free.push(pipe);
        }
        stats
            .pipes_pooled
            .set((self.free.len() + self.bulk_free.len()) as u64);
    }

    /// Close a pipe that may still hold bytes (its connection is going away).
    pub fn discard(&mut self, pipe: Pipe, stats: &WorkerStats) {
        stats.pipes_in_use.sub(1);
        if self.is_bulk(&pipe) {
            self.bulk_in_use = self.bulk_in_use.saturating_sub(1);
            stats.pipes_bulk_in_use.sub(1);
        }
        drop(pipe);
    }

    fn create(&mut self, size: usize) -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        let capacity = match sys::set_pipe_size(write.as_raw_fd(), size) {
            Ok(n) => n,
            Err(e) => {
                let n = sys::pipe_size(write.as_raw_fd())?;
                if !self.warned_size {
                    warn!(
                        "pipe size {size} refused ({e}); using {n} bytes (see fs.pipe-max-size and fs.pipe-user-pages-soft in tune/)"
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
        let mut pool = PipePool::new(64 * 1024, 64 * 1024, 1);
        let a = pool.get(false, &stats).unwrap();
        let b = pool.get(true, &stats).unwrap(); // no bulk pipes: an ordinary one
        assert!(a.capacity() >= 64 * 1024);
        let a_fd = a.read_fd();
        assert_eq!(stats.pipes_in_use.get(), 2);
        pool.put(a, &stats);
        pool.put(b, &stats); // over max_pooled: closed
        assert_eq!(stats.pipes_in_use.get(), 0);
        assert_eq!(stats.pipes_pooled.get(), 1);
        assert_eq!(pool.get(false, &stats).unwrap().read_fd(), a_fd);
    }

    #[test]
    fn bulk_pipes_are_bigger_and_bounded_by_the_budget() {
        // As root (the test suite's premise) F_SETPIPE_SZ up to 1 MiB holds.
        let stats = WorkerStats::default();
        let (small, bulk) = (64 * 1024, 1 << 20);
        let mut pool = PipePool::new(small, bulk, 4);
        let budget = BULK_BUDGET_BYTES / bulk;
        let mut held: Vec<Pipe> = (0..budget)
            .map(|_| pool.get(true, &stats).unwrap())
            .collect();
        assert!(held.iter().all(|p| p.capacity() == bulk && pool.is_bulk(p)));
        // Budget spent: a bulk request gets an ordinary pipe.
        let extra = pool.get(true, &stats).unwrap();
        assert_eq!(extra.capacity(), small);
        assert!(!pool.bulk_available());
        assert_eq!(stats.pipes_bulk_in_use.get(), budget as u64);
        // A bulk pipe given back frees budget and is reused as a bulk pipe.
        let p = held.pop().unwrap();
        let fd = p.read_fd();
        pool.put(p, &stats);
        assert!(pool.bulk_available());
        let again = pool.get(true, &stats).unwrap();
        assert_eq!((again.read_fd(), again.capacity()), (fd, bulk));
        // Ordinary pipes go back to the ordinary list, whatever was asked.
        pool.put(extra, &stats);
        assert_eq!(pool.get(false, &stats).unwrap().capacity(), small);
    }
}
