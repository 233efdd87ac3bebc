//! The local addresses of this process's own upstream sockets, shared by
//! all workers, so a connection or datagram that comes back to the proxy
//! from one of them (a routing loop) is recognised whichever worker made
//! the socket. (Placeholder until the TCP loop guard lands; same API.)
//!
//! What must stay true:
//! - OWN-1: an address is present from `add` to the matching `remove`
//!   (a multiset: two sockets may share a local address).
//! - OWN-2: `contains` also matches an entry bound to its family's
//!   wildcard address at the same port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    #[allow(dead_code)] // until the TCP loop guard lands
    Tcp,
    Udp,
}

const SHARDS: usize = 16;

#[derive(Default)]
pub struct OwnSockets {
    shards: [Mutex<HashMap<(Proto, SocketAddr), usize>>; SHARDS],
}

fn shard(port: u16) -> usize {
    port as usize % SHARDS
}

impl OwnSockets {
    pub fn add(&self, proto: Proto, local: SocketAddr) {
        let local = sys::canonical(local);
        if let Ok(mut m) = self.shards[shard(local.port())].lock() {
            *m.entry((proto, local)).or_insert(0) += 1;
        }
    }

    pub fn remove(&self, proto: Proto, local: SocketAddr) {
        let local = sys::canonical(local);
        if let Ok(mut m) = self.shards[shard(local.port())].lock()
            && let Some(n) = m.get_mut(&(proto, local))
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&(proto, local));
            }
        }
    }

    pub fn contains(&self, proto: Proto, addr: SocketAddr) -> bool {
        let addr = sys::canonical(addr);
        let any: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        self.shards[shard(addr.port())].lock().is_ok_and(|m| {
            m.contains_key(&(proto, addr))
                || m.contains_key(&(proto, SocketAddr::new(any, addr.port())))
        })
    }
}
