//! `--send-proxy v1|v2` (tcp/proxy_header.rs PPH-1..3, tcp/relay.rs
//! CONN-11): every upstream connection starts with a PROXY protocol header
//! naming the client's own address and port and the original destination,
//! and then carries the client's bytes exactly.
//!
//! Checked against two independent parsers, in both versions and both
//! families, each run in the server namespace and answering with what the
//! header told it, which must be the address and port curl really used
//! (curl's own `%{local_ip} %{local_port}`) and the address and port it
//! dialled:
//! - nginx, `listen ... proxy_protocol`, answering with
//!   `$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr
//!   $proxy_protocol_server_port`;
//! - HAProxy, `bind ... accept-proxy`, answering with `%[src] %[src_port]
//!   %[dst] %[dst_port]`.
//!
//! And byte-exactly, by a server of our own that parses the header itself
//! (a third parser, written from the spec here): a client that speaks
//! first with an 8 MiB upload, most of it sent before the upstream connect
//! has completed, so that it waits behind the header; and a server that
//! speaks first, whose 8 MiB reach the client with no header in that
//! direction, before the client says anything. The upload also runs with
//! `--no-splice`.
//!
//! Without `--send-proxy` nothing changes: every other test file runs
//! without it.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::{
    Daemon, Lab, Proxy, Role, accept, describe, family, recv_pattern_to_eof, send_pattern,
    server_addr, wait_until,
};

/// Where the parsers listen in the server namespace.
const HTTP_PORT: u16 = 80;
/// How long a parser may take to start listening, and curl to get its answer.
const WAIT: Duration = Duration::from_secs(10);
/// The uploads and downloads of the byte-exact cases.
const BULK: u64 = 8 << 20;

// ------------------------------------------------------------ the parsers

/// A server program in the lab's server namespace with its configuration
/// in a directory of its own, stopped and removed on drop.
struct Server {
    daemon: Option<Daemon>,
    dir: PathBuf,
}

impl Server {
    /// Write `conf` (with `@DIR@` for the directory) to `file`, start `args`
    /// (with `@DIR@` too) and wait until it listens on `HTTP_PORT`.
    fn start(lab: &Lab, what: &str, file: &str, conf: &str, args: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("{}-{what}", lab.name()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let d = dir.to_str().expect("a UTF-8 temporary directory");
        fs::write(dir.join(file), conf.replace("@DIR@", d)).expect("write the configuration");
        let args: Vec<String> = args.iter().map(|a| a.replace("@DIR@", d)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut daemon = Daemon::start(lab, Role::Server, what, &args);
        let up = wait_until(WAIT, || {
            daemon.exited().is_none() && lab.is_listening(Role::Server, HTTP_PORT)
        });
        assert!(
            up,
            "{what} did not come up ({:?}); stderr: {}",
            daemon.exited(),
            daemon.stderr()
        );
        Server {
            daemon: Some(daemon),
            dir,
        }
    }

    /// nginx, one process, its listeners taking the PROXY protocol
    /// (either version: nginx tells them apart by the first bytes).
    fn nginx(lab: &Lab) -> Server {
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path @DIR@/body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
    default_type text/plain;
    server {{
        listen {v4}:{port} proxy_protocol;
        listen [{v6}]:{port} proxy_protocol;
        return 200 "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port";
    }}
}}
"#,
            v4 = common::SERVER_V4,
            v6 = common::SERVER_V6,
            port = HTTP_PORT
        );
        Server::start(
            lab,
            "nginx",
            "nginx.conf",
            &conf,
            &[
                "nginx",
                "-e",
                "@DIR@/error.log",
                "-p",
                "@DIR@",
                "-c",
                "@DIR@/nginx.conf",
            ],
        )
    }

    /// HAProxy in the foreground, its listeners requiring the PROXY
    /// protocol (either version), answering every request itself.
    fn haproxy(lab: &Lab) -> Server {
        let conf = format!(
            r#"global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend parse
    bind {v4}:{port} accept-proxy
    bind [{v6}]:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port]"
"#,
            v4 = common::SERVER_V4,
            v6 = common::SERVER_V6,
            port = HTTP_PORT
        );
        Server::start(
            lab,
            "haproxy",
            "haproxy.cfg",
            &conf,
            &["haproxy", "-db", "-f", "@DIR@/haproxy.cfg"],
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.daemon.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// curl from the client, through tproxyd, to the parser at `dst`: what the
/// parser answered (its four words) and the address and port curl used.
fn curl(lab: &Lab, dst: SocketAddr) -> (Vec<String>, SocketAddr) {
    let url = format!("http://{dst}/");
    let ran = lab.exec_bounded(
        Role::Client,
        WAIT + Duration::from_secs(5),
        &[
            "curl",
            "-sS",
            "-g",
            "--max-time",
            "10",
            "-w",
            "\n%{local_ip} %{local_port}",
            &url,
        ],
    );
    assert!(
        !ran.killed && ran.out.status.success(),
        "curl {url}: {}",
        describe(&ran.out)
    );
    let text = String::from_utf8_lossy(&ran.out.stdout).into_owned();
    let (body, local) = text
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl {url}: no write-out line in {text:?}"));
    let (ip, port) = local
        .split_once(' ')
        .unwrap_or_else(|| panic!("curl {url}: write-out {local:?}"));
    let local = SocketAddr::new(
        ip.parse()
            .unwrap_or_else(|_| panic!("curl's local_ip {ip:?}")),
        port.parse()
            .unwrap_or_else(|_| panic!("curl's local_port {port:?}")),
    );
    let words = body.split_whitespace().map(str::to_string).collect();
    (words, local)
}

/// The client's address in a family.
fn client_ip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(common::CLIENT_V6)
    } else {
        IpAddr::V4(common::CLIENT_V4)
    }
}

/// For both families: the parser behind tproxyd `--send-proxy version`
/// reports the client's real address and port as the source and the
/// original destination as the destination.
fn parser_sees_the_client_and_the_original_destination(version: &str, start: fn(&Lab) -> Server) {
    let lab = Lab::tproxy();
    let _server = start(&lab);
    let _proxy = Proxy::start(&lab, &["--send-proxy", version]);
    for v6 in [false, true] {
        let dst = server_addr(v6, HTTP_PORT);
        let (words, local) = curl(&lab, dst);
        let what = format!("{} {version}: the parser said {words:?}", family(v6));
        assert_eq!(local.ip(), client_ip(v6), "{what}: curl's own address");
        let [src_ip, src_port, dst_ip, dst_port] = &words[..] else {
            panic!("{what}: not four words");
        };
        let ip = |s: &str| {
            s.parse::<IpAddr>()
                .unwrap_or_else(|_| panic!("{what}: {s:?}"))
        };
        let port = |s: &str| s.parse::<u16>().unwrap_or_else(|_| panic!("{what}: {s:?}"));
        assert_eq!(
            SocketAddr::new(ip(src_ip), port(src_port)),
            local,
            "{what}: the source is the client's address and port"
        );
        assert_eq!(
            SocketAddr::new(ip(dst_ip), port(dst_port)),
            dst,
            "{what}: the destination is the one the client dialled"
        );
    }
}

#[test]
fn nginx_sees_the_client_through_a_v1_header() {
    parser_sees_the_client_and_the_original_destination("v1", Server::nginx);
}

#[test]
fn nginx_sees_the_client_through_a_v2_header() {
    parser_sees_the_client_and_the_original_destination("v2", Server::nginx);
}

#[test]
fn haproxy_sees_the_client_through_a_v1_header() {
    parser_sees_the_client_and_the_original_destination("v1", Server::haproxy);
}

#[test]
fn haproxy_sees_the_client_through_a_v2_header() {
    parser_sees_the_client_and_the_original_destination("v2", Server::haproxy);
}

// -------------------------------------------------- a parser of our own

/// Read one PROXY header of `version` from `s`, not a byte more, and
/// return its (source, destination); anything else the spec does not
/// allow, or that tproxyd must not send (UNKNOWN, LOCAL, UDP, TLVs), is an
/// error.
fn read_header(s: &mut TcpStream, version: &str) -> Result<(SocketAddr, SocketAddr), String> {
    match version {
        "v1" => {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                if line.len() == 107 {
                    return Err(format!("no CRLF in 107 bytes: {:?}", line.escape_ascii()));
                }
                s.read_exact(&mut b)
                    .map_err(|e| format!("after {} bytes: {e}", line.len()))?;
                line.push(b[0]);
            }
            let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|e| e.to_string())?;
            let words: Vec<&str> = text.split(' ').collect();
            let bad = || format!("not a TCP4/TCP6 line: {text:?}");
            let ["PROXY", proto, sip, dip, sport, dport] = words[..] else {
                return Err(bad());
            };
            let ip = |w: &str| -> Result<IpAddr, String> {
                match (proto, w.parse::<IpAddr>()) {
                    ("TCP4", Ok(ip @ IpAddr::V4(_))) | ("TCP6", Ok(ip @ IpAddr::V6(_))) => Ok(ip),
                    _ => Err(bad()),
                }
            };
            // Decimal, no leading zero, no sign.
            let port = |w: &str| -> Result<u16, String> {
                match w.parse::<u16>() {
                    Ok(p) if p.to_string() == w => Ok(p),
                    _ => Err(bad()),
                }
            };
            Ok((
                SocketAddr::new(ip(sip)?, port(sport)?),
                SocketAddr::new(ip(dip)?, port(dport)?),
            ))
        }
        _ => {
            let mut fixed = [0u8; 16];
            s.read_exact(&mut fixed).map_err(|e| e.to_string())?;
            if &fixed[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
                return Err(format!("not the v2 signature: {:?}", fixed.escape_ascii()));
            }
            if fixed[12] != 0x21 {
                return Err(format!("version/command {:#04x}, not 0x21", fixed[12]));
            }
            let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let (want, alen) = match fixed[13] {
                0x11 => (12, 4),
                0x21 => (36, 16),
                f => return Err(format!("family/transport {f:#04x}")),
            };
            if len != want {
                return Err(format!(
                    "length {len} for family {:#04x}, not {want}",
                    fixed[13]
                ));
            }
            let mut rest = vec![0u8; len];
            s.read_exact(&mut rest).map_err(|e| e.to_string())?;
            let ip = |b: &[u8]| -> IpAddr {
                match <[u8; 4]>::try_from(b) {
                    Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
                    Err(_) => {
                        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")))
                    }
                }
            };
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            let p = 2 * alen;
            Ok((
                SocketAddr::new(ip(&rest[..alen]), port(&rest[p..])),
                SocketAddr::new(ip(&rest[alen..p]), port(&rest[p + 2..])),
            ))
        }
    }
}

/// The header a case's server read must name the client's socket and the
/// destination it connected to.
fn check_header(
    what: &str,
    header: Result<(SocketAddr, SocketAddr), String>,
    client: SocketAddr,
    dst: SocketAddr,
) {
    let (src, to) = header.unwrap_or_else(|e| panic!("{what}: the header: {e}"));
    assert_eq!(src, client, "{what}: the header's source");
    assert_eq!(to, dst, "{what}: the header's destination");
}

/// Cases of a byte-exact test, a port each: one per family.
fn cases() -> [(bool, u16); 2] {
    [(false, 9001), (true, 9002)]
}

/// `extra`: more tproxyd arguments (`--no-splice`).
fn client_speaks_first_with_a_large_upload(version: &str, extra: &[&str]) {
    let lab = Lab::tproxy();
    let mut args = vec!["--send-proxy", version];
    args.extend_from_slice(extra);
    let _proxy = Proxy::start(&lab, &args);
    for (v6, port) in cases() {
        let what = format!("{} {version} {extra:?} upload", family(v6));
        let listener = lab.listen_server(port);
        let ver = version.to_string();
        let server = thread::spawn(move || {
            let (mut s, _) = accept(&listener);
            let header = read_header(&mut s, &ver);
            let body = recv_pattern_to_eof(&mut s, 0x5E4D, BULK);
            let _ = s.write_all(b"done");
            (header, body)
        });
        let dst = server_addr(v6, port);
        let (local, answer) = lab.client(move || {
            let mut s = common::connect(dst).expect("connect");
            let local = s.local_addr().expect("local_addr");
            // Written at once, whether or not the upstream is connected
            // yet: what comes early waits behind the header.
            let sent =
                send_pattern(&mut s, 0x5E4D, BULK).and_then(|()| s.shutdown(Shutdown::Write));
            let mut answer = Vec::new();
            let read = s.read_to_end(&mut answer);
            (local, sent.and(read).map(|_| answer))
        });
        let (header, body) = server.join().expect("server thread");
        check_header(&what, header, local, dst);
        body.unwrap_or_else(|e| panic!("{what}: the upload: {e}"));
        let answer = answer.unwrap_or_else(|e| panic!("{what}: the client: {e}"));
        assert_eq!(answer, b"done", "{what}: the server's answer, then EOF");
    }
}

fn server_speaks_first(version: &str) {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &["--send-proxy", version]);
    for (v6, port) in cases() {
        let what = format!("{} {version} server first", family(v6));
        let listener = lab.listen_server(port);
        let ver = version.to_string();
        let server = thread::spawn(move || {
            let (mut s, _) = accept(&listener);
            // Speak before reading anything: the banner, all of it, and FIN.
            let sent =
                send_pattern(&mut s, 0xBA77, BULK).and_then(|()| s.shutdown(Shutdown::Write));
            let header = read_header(&mut s, &ver);
            let reply = recv_pattern_to_eof(&mut s, 0x7E1, 1000);
            (sent, header, reply)
        });
        let dst = server_addr(v6, port);
        let (local, got) = lab.client(move || {
            let mut s = common::connect(dst).expect("connect");
            let local = s.local_addr().expect("local_addr");
            // Every byte of the server's, and no header, before the client
            // says a word.
            let got = recv_pattern_to_eof(&mut s, 0xBA77, BULK).and_then(|()| {
                send_pattern(&mut s, 0x7E1, 1000)
                    .and_then(|()| s.shutdown(Shutdown::Write))
                    .map_err(|e| format!("reply: {e}"))
            });
            (local, got)
        });
        let (sent, header, reply) = server.join().expect("server thread");
        sent.unwrap_or_else(|e| panic!("{what}: the server's banner: {e}"));
        got.unwrap_or_else(|e| panic!("{what}: the client: {e}"));
        check_header(&what, header, local, dst);
        reply.unwrap_or_else(|e| panic!("{what}: the client's reply: {e}"));
    }
}

#[test]
fn a_large_upload_arrives_byte_exact_behind_a_v1_header() {
    client_speaks_first_with_a_large_upload("v1", &[]);
}

#[test]
fn a_large_upload_arrives_byte_exact_behind_a_v2_header() {
    client_speaks_first_with_a_large_upload("v2", &[]);
}

/// Copying instead of splicing: the header and the first bytes go the
/// same way, the rest through the copy buffer.
#[test]
fn a_large_upload_arrives_byte_exact_behind_a_header_when_copying() {
    client_speaks_first_with_a_large_upload("v2", &["--no-splice"]);
}

#[test]
fn a_server_speaking_first_reaches_the_client_without_a_header_v1() {
    server_speaks_first("v1");
}

#[test]
fn a_server_speaking_first_reaches_the_client_without_a_header_v2() {
    server_speaks_first("v2");
}
