//! `cascade-bench`: Cascade's benchmarks, kept out of the product.
//!
//! The release `cascade` binary neither measures itself nor carries the `/bench/*` routes a
//! measurement needs: those routes are behind cascade-server's `bench-routes` feature, which
//! only this crate turns on. What is measured is still the product: `cascade-bench serve` is
//! [`cascade_server::Application`], exactly as `cascade serve` builds it, plus those routes.
//!
//! - no subcommand, or `suite`: the whole suite (a private PostgreSQL, Redis and server; wrk);
//! - `cache`: the cache engine next to a raw Redis GET;
//! - `catalog`: the catalog's reads over HTTP with the cache, next to the same SQL direct;
//! - `serve`: the server with the bench routes, which the suite runs as its own process;
//! - `worker`: execution workers alone, which the executions scenario runs (and kills).
//!
//! Exit codes: 0 success, 1 a run failed, 2 invalid configuration or usage.

mod bare;
mod cache;
mod catalog;
mod fixed;
mod measure;
mod serve;
mod statements;
mod suite;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use cascade_server::{RawSettings, Settings};
use clap::{Parser, Subcommand};

/// Measures Cascade, side by side with a baseline in the same run. Without a subcommand: the
/// whole suite (starts a private PostgreSQL, Redis and server; needs wrk).
///
/// The server settings (flags or environment variables, as for `cascade`) apply to `serve`,
/// `cache` and `catalog`; the suite configures the servers it starts itself.
#[derive(Parser)]
// A repeated option takes its last value: `bench/run --out X` overrides the script's default.
#[command(
    name = "cascade-bench",
    version,
    max_term_width = 110,
    args_override_self = true
)]
struct Cli {
    #[command(flatten)]
    settings: RawSettings,
    #[command(flatten)]
    suite: SuiteArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The suite's options, accepted with or without the `suite` subcommand.
#[derive(clap::Args, Default)]
struct SuiteArgs {
    /// Short runs on a small catalog, as CI runs it; without the primary + replica rows
    /// (they add a PostgreSQL pair, a catalog and a server: `--quick --only replica` runs
    /// them) and the Redis Cluster rows (six redis-server processes, a server and four rows,
    /// ~17 s: `--quick --only cluster` runs them) and the three-instance drills (`--quick
    /// --only instances`).
    #[arg(long)]
    quick: bool,
    /// Assets to seed [default: 100000, quick: 2000].
    #[arg(long)]
    assets: Option<usize>,
    /// Seconds per wrk scenario [default: 10, quick: 2].
    #[arg(long)]
    seconds: Option<u64>,
    /// Concurrent connections of wrk [default: 64].
    #[arg(long)]
    connections: Option<usize>,
    /// Where results.json and results.md are written [default: target/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only this scenario (`realtime`: connections held, memory per idle one, broadcasts;
    /// `ws-memory`: the connections held alone; `executions`: the agents module's queue), on a
    /// small catalog; or, on the full catalog, `miss`: the miss-heavy walk with the ceiling
    /// and the direct PostgreSQL read beside it; `throughput`: the wrk rows (ceiling,
    /// baseline, hot, miss-heavy, bundles, writes), a few minutes; `replica`: hot reads, the
    /// miss-heavy walk and writes on one server, then on a primary with a streaming replica
    /// (which server ran each read, stale reads); `cluster`: the same on one server, then on a
    /// server whose cache is on a Redis Cluster of 3 masters and 3 replicas (hits from the
    /// cluster, Redis errors, stale reads), and a master killed under load; or, on a small
    /// catalog, `instances`: three servers on one PostgreSQL and one Redis, reads round-robin
    /// over them (stale reads across instances), then Redis killed and one instance
    /// SIGKILLed and started again under that traffic.
    #[arg(long, value_parser = ["realtime", "ws-memory", "executions", "miss", "throughput", "writes", "replica", "cluster", "instances"])]
    only: Option<String>,
}

impl SuiteArgs {
    fn given(&self) -> bool {
        self.quick
            || self.assets.is_some()
            || self.seconds.is_some()
            || self.connections.is_some()
            || self.out.is_some()
            || self.only.is_some()
    }

    /// These options, each one not given taken from `outer` (given before `suite`).
    fn or(self, outer: SuiteArgs) -> SuiteArgs {
        SuiteArgs {
            quick: self.quick || outer.quick,
            assets: self.assets.or(outer.assets),
            seconds: self.seconds.or(outer.seconds),
            connections: self.connections.or(outer.connections),
            only: self.only.or(outer.only),
            out: self.out.or(outer.out),
        }
    }

    fn into_options(self) -> suite::Options {
        suite::Options {
            quick: self.quick,
            assets: self.assets,
            seconds: self.seconds,
            connections: self.connections.unwrap_or(64).max(1),
            out: self.out.unwrap_or_else(|| PathBuf::from("target/bench")),
            only: self.only,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// The whole suite (the default).
    Suite(SuiteArgs),
    /// Cache hits (Redis and in-process tiers) and misses next to a raw Redis GET.
    Cache {
        /// Operations per case (ten times as many for the in-process mixed case).
        #[arg(long, default_value_t = 50_000)]
        ops: usize,
        /// Concurrent tasks.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Catalog reads over HTTP with the cache, next to the same queries straight to PostgreSQL.
    Catalog {
        /// Assets to seed (the catalog tables are emptied first).
        #[arg(long, default_value_t = 100_000)]
        assets: usize,
        /// Requests per case.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Versions in the hot set.
        #[arg(long, default_value_t = 1_000)]
        hot: usize,
        /// A few seconds' run for CI: 2,000 assets, 2,000 requests, 8 clients, hot set of 200.
        #[arg(long)]
        quick: bool,
    },
    /// A bare axum server (no middleware) returning a fixed JSON body on HOST:PORT: the
    /// suite's ceiling.
    Bare {
        /// Size of the body in bytes.
        #[arg(long, default_value_t = 1190)]
        bytes: usize,
    },
    /// Run the agents module's execution workers alone, as `cascade worker` does (the
    /// executions scenario's worker processes).
    Worker,
    /// Run the HTTP server with the `/bench/*` routes (the suite's server process).
    Serve {
        /// Do not apply pending migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
}

fn main() -> ExitCode {
    cascade_core::config::load_dotenv();
    let cli = Cli::parse();
    let settings = match Settings::from_raw(&cli.settings) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("cascade-bench: {err}");
            return ExitCode::from(2);
        }
    };
    let command = match cli.command {
        None => Command::Suite(cli.suite),
        Some(Command::Suite(args)) => Command::Suite(args.or(cli.suite)),
        Some(_) if cli.suite.given() => {
            eprintln!(
                "cascade-bench: --quick, --assets, --seconds, --connections and --out are the \
                 suite's options; `cache` and `catalog` take their own (see --help)"
            );
            return ExitCode::from(2);
        }
        Some(command) => command,
    };
    // A server logs what it does; a measurement prints its table and only warns.
    let default_filter = match command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    cascade_server::process::init_tracing(settings.core.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cascade-bench: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command, settings)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("cascade-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Suite(args) => suite::run(args.into_options()).await,
        Command::Cache { ops, concurrency } => cache::run(settings, ops, concurrency).await,
        Command::Catalog {
            assets,
            requests,
            concurrency,
            hot,
            quick,
        } => {
            let options = if quick {
                catalog::Options::QUICK
            } else {
                catalog::Options {
                    assets,
                    requests,
                    concurrency: concurrency.max(1),
                    hot,
                }
            };
            catalog::run(settings, options).await
        }
        Command::Serve { no_migrate } => serve::run(settings, !no_migrate).await,
        Command::Worker => worker::run(settings).await,
        Command::Bare { bytes } => {
            let http = &settings.core.http;
            bare::run(&http.host, http.port, bytes).await
        }
    }
}
