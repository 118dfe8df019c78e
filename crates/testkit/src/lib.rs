//! Real servers for tests: a private PostgreSQL and a private Redis per test, on free
//! loopback ports, in temporary directories, killed on drop (also when the test panics).
//!
//! Tests can [`kill`](PgServer::kill), [`pause`](PgServer::pause) (SIGSTOP) and
//! [`restart`](PgServer::restart) either server to prove fault handling. Nothing here is a
//! mock: these are the `postgres` and `redis-server` binaries installed on the machine.
//!
//! Each server runs in its own process group, so a kill takes its children (PostgreSQL's
//! backends) with it and a restart finds no orphan holding the shared memory.

mod pg;
mod pgbouncer;
mod pki;
mod proxy;
mod redis_cluster;
mod redis_server;
mod stall_proxy;
pub mod stripe;
pub mod venice;

pub use pg::PgServer;
pub use pgbouncer::{PgBouncer, SERVER_POOL_SIZE, direct_url, through_pgbouncer};
pub use pki::Pki;
pub use proxy::Proxy;
pub use redis_cluster::RedisCluster;
pub use redis_server::{RedisSentinels, RedisServer};
pub use stall_proxy::StallProxy;
pub use stripe::StripeStandin;
pub use venice::VeniceStandin;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A port nothing listens on right now, chosen by the kernel (binding port 0), so it is never
/// a hard-coded port a client could self-connect to.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A fresh, empty directory under the system temp dir, unique to this process and call.
pub fn temp_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "cascade-{label}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Sends `signal` to the process group led by `pid` and to every child of `pid`.
/// PostgreSQL's backends each call `setsid()`, so the group alone would miss them.
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
    for child in children(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(child as i32), signal);
    }
}

/// Processes whose parent is `pid`, read from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command name is in parentheses and may contain spaces: parse after it.
                    let after = &stat[stat.rfind(')')? + 2..];
                    after.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
