//! The command line's contract with whoever runs tproxyd: a missing
//! capability exits 1. (Usage errors, exit 2, are bad_input.rs's table.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Lab, Role, run_bounded, tproxyd_bin};

/// A missing capability is found before anything else happens; this is
/// plenty.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Run `cmd` to completion, killing it if it outlives `EXIT_WAIT` (a tproxyd
/// that wrongly accepted its flags would run forever).
fn run_exiting(mut cmd: Command) -> Output {
    let ran = run_bounded(&mut cmd, EXIT_WAIT);
    assert!(
        !ran.killed,
        "{cmd:?} still ran after {EXIT_WAIT:?}; stderr: {}",
        String::from_utf8_lossy(&ran.out.stderr)
    );
    ran.out
}

/// Without CAP_NET_ADMIN tproxyd cannot make transparent sockets; it says so
/// and exits 1 instead of running without them.
#[test]
fn missing_capability_exits_1_with_one_line() {
    let lab = Lab::tproxy();
    // An unprivileged user must be able to reach the binary: copy it to a
    // fresh directory anyone can read.
    let dir = std::env::temp_dir().join(format!("{}-bin", lab.name()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bin = dir.join("tproxyd");
    std::fs::copy(tproxyd_bin(), &bin).expect("copy tproxyd");
    for p in [&dir, &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(Role::Router)])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"])
        .arg(&bin)
        .args(["--port", "8080"]);
    let out = run_exiting(cmd);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        out.status.code() == Some(1) && lines.len() == 1,
        "want exit 1 and one line; got {}, stderr {lines:?}",
        out.status
    );
    assert!(
        lines[0].contains("CAP_NET_ADMIN"),
        "the message should name the capability: {}",
        lines[0]
    );
}
