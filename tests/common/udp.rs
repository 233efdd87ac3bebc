//! UDP sockets for the tests: bound with bounded waits (LAB-3), and the
//! checks that a datagram came whole from the address it must come from.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{IO_TIMEOUT, Lab, server_addr};

/// How long a reply the proxy owes may take. The lab's links lose nothing, so
/// a missing reply is the proxy's; this only has to outlast a loaded 2-core
/// machine.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest UDP payloads: 65,535 minus the 8-byte UDP header, minus the
/// 20-byte IPv4 header for IPv4 (IPv6's header is outside its length field).
pub const MAX_PAYLOAD_V4: usize = 65_507;
pub const MAX_PAYLOAD_V6: usize = 65_527;
/// Receive buffer: one byte more than any datagram, so a reply longer than
/// what was sent would show.
pub const RECV_BUF: usize = 65_536;

/// A UDP socket bound to `addr` with `REPLY_TIMEOUT` on reads (LAB-3). Make
/// it inside the namespace it belongs to (LAB-2).
pub fn udp_bind(addr: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    s.set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("SO_RCVTIMEO");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("SO_SNDTIMEO");
    s
}

/// The next datagram on `s` must be `want`, from `from`.
pub fn expect_datagram(s: &UdpSocket, from: SocketAddr, want: &[u8], what: &str) {
    let mut buf = vec![0u8; RECV_BUF];
    let (n, src) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: nothing within {REPLY_TIMEOUT:?}: {e}"));
    assert_eq!(src, from, "{what}: from the wrong address");
    assert_same(&buf[..n], want, what);
}

/// Byte-exact comparison that names the first difference rather than
/// printing 64 KiB.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => panic!(
            "{what}: byte {i} differs (got {:#04x}, sent {:#04x}); {} bytes back of {}",
            got[i],
            want[i],
            got.len(),
            want.len()
        ),
        None => panic!(
            "{what}: {} bytes came back for {} sent",
            got.len(),
            want.len()
        ),
    }
}

/// A UDP server that reads and counts every datagram on `port`, on both of
/// the server's addresses, until dropped.
pub struct UdpSink {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(lab: &Lab, port: u16) -> UdpSink {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = [false, true]
            .into_iter()
            .map(|v6| {
                let s = lab.server(move || {
                    UdpSocket::bind(server_addr(v6, port))
                        .unwrap_or_else(|e| panic!("bind the UDP sink: {e}"))
                });
                s.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("SO_RCVTIMEO");
                let (stop, count, seen) = (stop.clone(), count.clone(), seen.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, from)) = s.recv_from(&mut buf) {
                            count.fetch_add(1, Ordering::SeqCst);
                            seen.lock().expect("sink lock").push(from);
                        }
                    }
                })
            })
            .collect();
        UdpSink {
            stop,
            count,
            seen,
            threads,
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP echo server on the server's IPv4 address, until dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(lab: &Lab, port: u16) -> UdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let s =
            lab.server(move || UdpSocket::bind(server_addr(false, port)).expect("bind udp echo"));
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        UdpEcho {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Send `msg` to `dst` from the client namespace on a connected socket and
/// return the reply (which the kernel only lets through from `dst` itself).
pub fn udp_round_trip(lab: &Lab, dst: SocketAddr, msg: &'static [u8]) -> Vec<u8> {
    lab.client(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(dst).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 2048];
        // UDP may lose the first datagram while a session opens; try a few times.
        for _ in 0..6 {
            s.send(msg).unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                return buf[..n].to_vec();
            }
        }
        panic!("no UDP reply from {dst}");
    })
}
