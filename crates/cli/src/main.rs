//! The `cascade` command: `serve`, `migrate`, `check`, `config`, `cache`, `bench` and `seed`.
//!
//! Exit codes: 0 success, 1 a dependency failed (unreachable PostgreSQL, failed migration),
//! 2 invalid configuration or usage.

mod bench;
mod catalog;
mod check;
mod serve;
mod suite;

use std::process::ExitCode;

use cascade_core::config::{Config, LogFormat, RawConfig};
use clap::{Parser, Subcommand};

/// Cascade: PostgreSQL as the truth, Redis as the cache, one fast and correct API.
///
/// Every option can also be set by the environment variable named in its help, or in a `.env`
/// file in the working directory.
#[derive(Parser)]
#[command(name = "cascade", version, max_term_width = 110)]
struct Cli {
    #[command(flatten)]
    config: RawConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (starts an embedded PostgreSQL when no DATABASE_URL is set).
    Serve {
        /// Do not apply pending migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective configuration and check PostgreSQL, Redis and the Venice API.
    Check,
    /// Print the effective configuration (secrets redacted) without connecting to anything.
    Config,
    /// Inspect or invalidate the shared cache tier.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Measure performance, side by side with a baseline in the same run. Without a
    /// subcommand: the whole suite (starts a private PostgreSQL, Redis and server; needs wrk).
    Bench(BenchArgs),
    /// Fill a module's tables with generated, realistic data.
    #[command(subcommand)]
    Seed(SeedCommand),
}

#[derive(Subcommand)]
enum SeedCommand {
    /// Producers, assets with lineage (a DAG), receipts and policies; reproducible by --seed.
    Catalog {
        /// Assets to generate.
        #[arg(long, default_value_t = 10_000)]
        assets: usize,
        /// Producers the assets are spread over.
        #[arg(long, default_value_t = 20)]
        producers: usize,
        /// Random seed: the same seed generates the same catalog.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Empty the catalog tables first (otherwise existing rows are kept and skipped).
        #[arg(long)]
        reset: bool,
        /// The account (username) that owns the generated producers and may then change their
        /// assets over the API; without it they are read-only over the API.
        #[arg(long, value_name = "USERNAME")]
        owner: Option<String>,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// A few seconds in all (small catalog, short runs), as CI runs it.
    #[arg(long)]
    quick: bool,
    /// Assets to seed [default: 100000, quick: 2000].
    #[arg(long)]
    assets: Option<usize>,
    /// Seconds per wrk scenario [default: 10, quick: 2].
    #[arg(long)]
    seconds: Option<u64>,
    /// Concurrent connections of wrk.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Where results.json and results.md are written.
    #[arg(long, default_value = "target/bench")]
    out: std::path::PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Cache hits (Redis and in-process tiers) and misses next to a raw Redis GET.
    Cache {
        /// Operations per case.
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
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Remove entries by tag, by namespace or by key, on every instance.
    Invalidate(CacheTarget),
    /// Print a running server's cache statistics (per namespace and tier) and breaker state.
    Stats {
        /// The server's base URL [default: http://HOST:PORT from the configuration].
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct CacheTarget {
    /// Every entry carrying this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Every entry of this namespace (e.g. assets).
    #[arg(long)]
    ns: Option<String>,
    /// One entry, as NAMESPACE:KEY (e.g. assets:v1).
    #[arg(long)]
    key: Option<String>,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    cascade_core::config::load_dotenv();
    let cli = Cli::parse();
    let config = match Config::from_raw(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("cascade: {err}");
            return ExitCode::from(2);
        }
    };
    if let Command::Config = cli.command {
        print_config(&config);
        return ExitCode::SUCCESS;
    }
    init_tracing(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cascade: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { no_migrate } => serve::run(config, !no_migrate).await,
            Command::Migrate => serve::migrate_only(config).await,
            Command::Check => check::run(&config).await,
            Command::Config => Ok(ExitCode::SUCCESS),
            Command::Cache(CacheCommand::Invalidate(target)) => {
                serve::cache_invalidate(config, target).await
            }
            Command::Cache(CacheCommand::Stats { url }) => check::cache_stats(&config, url).await,
            Command::Bench(BenchArgs {
                command: Some(BenchCommand::Cache { ops, concurrency }),
                ..
            }) => bench::cache(config, ops, concurrency).await,
            Command::Bench(BenchArgs {
                command:
                    Some(BenchCommand::Catalog {
                        assets,
                        requests,
                        concurrency,
                        hot,
                        quick,
                    }),
                ..
            }) => {
                let options = if quick {
                    catalog::BenchOptions {
                        assets: 2_000,
                        requests: 2_000,
                        concurrency: 8,
                        hot: 200,
                    }
                } else {
                    catalog::BenchOptions {
                        assets,
                        requests,
                        concurrency: concurrency.max(1),
                        hot,
                    }
                };
                catalog::bench_command(config, options).await
            }
            Command::Bench(args) => {
                suite::run(suite::Options {
                    quick: args.quick,
                    assets: args.assets,
                    seconds: args.seconds,
                    connections: args.connections,
                    out: args.out,
                })
                .await
            }
            Command::Seed(SeedCommand::Catalog {
                assets,
                producers,
                seed,
                reset,
                owner,
            }) => {
                let options = cascade_server::catalog::seed::SeedOptions {
                    assets,
                    producers,
                    seed,
                    reset,
                    owner: None,
                };
                catalog::seed_command(config, options, owner.as_deref()).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("cascade: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the redacted configuration; a closed stdout (`| head`) is not an error.
pub(crate) fn print_config(config: &Config) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "effective configuration (secrets redacted):");
    for (var, value) in config.describe() {
        let _ = writeln!(out, "  {var:<28} {value}");
    }
}
