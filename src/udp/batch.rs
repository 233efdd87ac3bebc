//! How a run of received buffers, all going out through one socket to one
//! destination, becomes as few sends as the kernel allows: consecutive
//! datagrams of one size (but for a shorter last) go out as one GSO message
//! (UDP_SEGMENT), which the stack carries as one packet to the device or
//! the receiving socket and cuts back into the same datagrams there. Pure
//! logic, unit-tested below.
//!
//! What must stay true:
//! - BAT-1: the messages, cut at their segment sizes, are exactly the
//!   datagrams of the parts, in order: nothing merged, split or reordered.
//!   A message that carries more than one datagram keeps UDPSYS-2 (every
//!   datagram but the last of its segment size; at most `MAX_SEGMENTS` and
//!   `MAX_GSO_BYTES`).
//! - BAT-2: a message never carries more than one datagram when GSO is off.

use std::ops::Range;

use crate::sys::{MAX_GSO_BYTES, MAX_SEGMENTS};

/// One received buffer: `len` bytes holding datagrams of `segment` bytes,
/// the last possibly shorter (sys UDPSYS-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub len: usize,
    pub segment: usize,
}

impl Part {
    pub fn datagrams(self) -> usize {
        self.len.div_ceil(self.segment.max(1)).max(1)
    }
}

/// One send: parts `start..end` of the run, cut into datagrams of
/// `segment` bytes when it is `Some`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    pub start: usize,
    pub end: usize,
    pub segment: Option<u16>,
    pub datagrams: usize,
}

impl Msg {
    pub fn parts(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// Where [`plan`] writes: never more messages than parts, so a run of at
/// most `BATCH` buffers fits a fixed array on the stack (the hot path does
/// not allocate).
pub struct Plan<const N: usize> {
    msgs: [Msg; N],
    len: usize,
}

impl<const N: usize> Default for Plan<N> {
    fn default() -> Self {
        Plan {
            msgs: [Msg {
                start: 0,
                end: 0,
                segment: None,
                datagrams: 0,
            }; N],
            len: 0,
        }
    }
}

impl<const N: usize> Plan<N> {
    pub fn as_slice(&self) -> &[Msg] {
        &self.msgs[..self.len]
    }

    fn push(&mut self, m: Msg) {
        // At most one message per part, and the caller gives at most N
        // parts; past that (a caller's bug) the plan is cut, never a panic.
        if let Some(slot) = self.msgs.get_mut(self.len) {
            *slot = m;
            self.len += 1;
        }
    }
}

/// The messages for `parts` (at most `N`), numbered from 0. With `gso` off
/// each datagram is its own message: a part that holds several (GRO) is
/// then one message with `segment: None` and `datagrams > 1`, which the
/// caller sends datagram by datagram ([`datagrams_of`]).
pub fn plan<const N: usize>(parts: &[Part], gso: bool) -> Plan<N> {
    let mut out = Plan::default();
    let mut cur: Option<(Msg, usize, usize)> = None; // (msg, bytes, segment)
    for (i, p) in parts.iter().enumerate() {
        let idx = i;
        let seg = p.segment.max(1);
        if let Some((m, bytes, s)) = &mut cur {
            // An empty datagram never shares a message: it has no bytes
            // for a segment to cut.
            let fits = gso
                && p.len > 0
                && *bytes > 0
                && *bytes % *s == 0
                && (if p.datagrams() > 1 {
                    seg == *s
                } else {
                    p.len <= *s
                })
                && *bytes + p.len <= MAX_GSO_BYTES
                && m.datagrams + p.datagrams() <= MAX_SEGMENTS;
            if fits {
                m.end = idx + 1;
                m.datagrams += p.datagrams();
                *bytes += p.len;
                m.segment = u16::try_from(*s).ok();
                continue;
            }
        }
        if let Some((m, _, _)) = cur.take() {
            out.push(m);
        }
        let whole = Msg {
            start: idx,
            end: idx + 1,
            segment: (p.datagrams() > 1 && p.datagrams() <= MAX_SEGMENTS && p.len <= MAX_GSO_BYTES)
                .then(|| u16::try_from(seg).ok())
                .flatten(),
            datagrams: p.datagrams(),
        };
        if p.datagrams() > 1 && (!gso || whole.segment.is_none()) {
            // BAT-2: a GRO buffer that cannot go as one GSO message; the
            // caller sends it datagram by datagram (`datagrams_of`).
            out.push(Msg {
                segment: None,
                ..whole
            });
            continue;
        }
        cur = Some((
            whole,
            p.len,
            if p.datagrams() > 1 { seg } else { p.len.max(1) },
        ));
    }
    if let Some((m, _, _)) = cur {
        out.push(m);
    }
    out
}

/// The datagrams of a buffer of `len` bytes cut at `segment`: byte ranges.
pub fn datagrams_of(len: usize, segment: usize) -> impl Iterator<Item = Range<usize>> {
    let seg = segment.max(1);
    let n = len.div_ceil(seg).max(1);
    (0..n).map(move |k| (k * seg).min(len)..((k + 1) * seg).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(len: usize) -> Part {
        Part { len, segment: len }
    }

    fn gro(len: usize, segment: usize) -> Part {
        Part { len, segment }
    }

    /// The datagram sizes a plan puts on the wire (BAT-1).
    fn wire(parts: &[Part], msgs: &[Msg]) -> Vec<usize> {
        let mut out = Vec::new();
        for m in msgs {
            let ps = &parts[m.parts()];
            match m.segment {
                Some(s) => {
                    let total: usize = ps.iter().map(|p| p.len).sum();
                    out.extend(datagrams_of(total, s as usize).map(|r| r.len()));
                }
                None => {
                    assert_eq!(ps.len(), 1, "one part without a segment size");
                    out.extend(datagrams_of(ps[0].len, ps[0].segment).map(|r| r.len()));
                }
            }
        }
        out
    }

    fn sent(parts: &[Part]) -> Vec<usize> {
        parts
            .iter()
            .flat_map(|p| datagrams_of(p.len, p.segment).map(|r| r.len()))
            .collect()
    }

    fn check(parts: &[Part], gso: bool) -> Vec<Msg> {
        let msgs = plan::<256>(parts, gso).as_slice().to_vec();
        assert_eq!(wire(parts, &msgs), sent(parts), "BAT-1 for {parts:?}");
        for m in &msgs {
            let total: usize = parts[m.parts()].iter().map(|p| p.len).sum();
            if m.segment.is_some() {
                assert!(gso, "BAT-2");
                assert!(total <= MAX_GSO_BYTES && m.datagrams <= MAX_SEGMENTS);
            }
        }
        msgs
    }

    #[test]
    fn equal_datagrams_become_one_gso_message_and_a_short_last_joins_it() {
        let parts = [part(1200), part(1200), part(1200), part(300)];
        let msgs = check(&parts, true);
        assert_eq!(
            msgs,
            vec![Msg {
                start: 0,
                end: 4,
                segment: Some(1200),
                datagrams: 4
            }]
        );
    }

    #[test]
    fn a_longer_datagram_or_one_after_a_short_one_starts_a_new_message() {
        let parts = [part(100), part(50), part(100), part(200)];
        let msgs = check(&parts, true);
        let shapes: Vec<_> = msgs.iter().map(|m| (m.parts(), m.segment)).collect();
        assert_eq!(shapes, vec![(0..2, Some(100)), (2..3, None), (3..4, None)]);
    }

    #[test]
    fn gro_buffers_merge_with_datagrams_of_their_segment_size() {
        let parts = [gro(3 * 64, 64), part(64), gro(2 * 64 + 10, 64), part(64)];
        let msgs = check(&parts, true);
        assert_eq!(msgs[0].parts(), 0..3);
        assert_eq!(msgs[0].segment, Some(64));
        assert_eq!(msgs[0].datagrams, 7);
        assert_eq!(msgs[1].parts(), 3..4);
    }

    #[test]
    fn without_gso_every_datagram_goes_alone() {
        let parts = [part(10), part(10), gro(30, 10)];
        let msgs = check(&parts, false);
        assert_eq!(msgs.len(), 3);
        assert!(msgs.iter().all(|m| m.segment.is_none()));
        assert_eq!(msgs[2].datagrams, 3, "the GRO buffer is cut by the caller");
    }

    #[test]
    fn messages_stay_within_the_segment_and_byte_limits() {
        let many: Vec<Part> = (0..200).map(|_| part(100)).collect();
        let msgs = check(&many, true);
        assert!(msgs.iter().all(|m| m.datagrams <= MAX_SEGMENTS));
        assert_eq!(msgs.len(), 200usize.div_ceil(MAX_SEGMENTS));
        let big: Vec<Part> = (0..10).map(|_| part(20_000)).collect();
        let msgs = check(&big, true);
        assert!(msgs.iter().all(|m| m.datagrams * 20_000 <= MAX_GSO_BYTES));
    }

    #[test]
    fn empty_datagrams_are_never_merged() {
        let parts = [part(0), part(0), part(5), part(0)];
        let msgs = check(&parts, true);
        assert_eq!(msgs.len(), 4);
    }

    #[test]
    fn random_runs_keep_every_datagram_in_order() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..2000 {
            let len = next(12) as usize;
            let parts: Vec<Part> = (0..len)
                .map(|_| {
                    let seg = [1, 64, 100, 1200, 9000][next(5) as usize];
                    if next(3) == 0 {
                        let k = 1 + next(70) as usize;
                        gro(
                            (k * seg).saturating_sub(next(seg as u64) as usize).max(1),
                            seg,
                        )
                    } else {
                        part([0, 10, 64, 100, 1200, 9000][next(6) as usize])
                    }
                })
                .collect();
            check(&parts, next(2) == 0);
        }
    }
}
