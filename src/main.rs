//! tproxyd: a transparent TCP proxy for Linux TPROXY, thread-per-core and
//! zero-copy.
//!
//! This file turns the command line into a [`config::Command`], runs it
//! (the daemon, daemon.rs; `doctor`, doctor/; help; version) and turns the
//! outcome into the exit status. daemon.rs checks what only the running
//! host can tell (capabilities, limits, address families), starts one
//! pinned worker per core with its own listeners, and hands the signals to
//! the control loop (control.rs says what each one does).
//!
//! What must stay true:
//! - MAIN-1: every failure that has an exit status happens before the first
//!   worker starts: 2 for a usage error, 1 for anything the host refused
//!   (missing capability, address in use). Each is one line on stderr. (A
//!   thread that cannot be started is the one exception; the exit then
//!   resets whatever the threads already started hold, MAIN-3.)
//! - MAIN-2: every signal whose default action would end the process, but
//!   the faults and those that cannot be caught, is blocked before the first
//!   thread starts, so in every thread, and taken synchronously by the
//!   control loop through a signalfd: no code of ours runs in a signal
//!   handler, and none of them ends the process by surprise. The faults get
//!   their plain default action back (Rust's runtime handles SIGSEGV and
//!   SIGBUS, and would let the first one sent with kill(2) do nothing), and
//!   the real-time signals glibc keeps for itself are ignored.
//! - MAIN-3: no way out of the process hands a peer a FIN for a stream that
//!   did not finish. Every proxied socket is armed (tcp/close.rs CONN-8), so
//!   returning from main with an error, exit(1), a panic, and death by any
//!   signal, SIGKILL included, reset whatever is still open; only a
//!   completed connection is closed gracefully, and a drain closes
//!   everything before main returns 0.

// SYS-1: unsafe code only in sys, every unsafe block says why it holds, and
// an unsafe fn's body is no blanket licence for the calls inside it.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod budget;
mod busy_poll;
mod config;
mod control;
mod daemon;
mod doctor;
mod metrics;
mod own_sockets;
mod pause;
mod stats;
#[allow(unsafe_code)]
mod sys;
mod tcp;
mod timers;
mod token;
mod udp;
mod worker;

use std::process::ExitCode;

use crate::config::Command;
use crate::daemon::Failure;

fn main() -> ExitCode {
    let cfg = match config::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Doctor(c)) => {
            return if doctor::run_doctor(&c) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        Ok(Command::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("tproxyd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tproxyd: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new()
        .filter_level(cfg.log_level)
        .format_timestamp_millis()
        .init();
    match daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { status, msg }) => {
            eprintln!("tproxyd: {msg}");
            ExitCode::from(status)
        }
    }
}
