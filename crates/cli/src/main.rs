//! The `cascade` command: `serve`, `migrate`, `worker`, `check`, `config`, `cache`, `seed`,
//! `billing` and `migrate-to-unified`. The
//! benchmarks are `cascade-bench` (crates/bench), outside the product.
//!
//! Exit codes: 0 success, 1 a dependency failed (unreachable PostgreSQL, failed migration),
//! 2 invalid configuration or usage.

mod billing;
mod check;
mod production;
mod redis_cluster;
mod replicas;
mod seed;
mod serve;
mod unified;

use std::process::ExitCode;

use cascade_server::{RawSettings, Settings};
use clap::{Parser, Subcommand};

/// Cascade: PostgreSQL as the truth, Redis as the cache, one fast and correct API.
///
/// Every option can also be set by the environment variable named in its help, or in a `.env`
/// file in the working directory.
#[derive(Parser)]
#[command(name = "cascade", version, max_term_width = 110)]
struct Cli {
    #[command(flatten)]
    settings: RawSettings,
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
    /// Run the agents module's execution workers (AGENTS_WORKERS of them) without the HTTP
    /// server, until SIGTERM/SIGINT; the schema must be migrated already.
    Worker,
    /// Print the effective configuration, check PostgreSQL, Redis and the Venice API, and
    /// review their settings for production (warnings only).
    Check {
        /// How many instances will share the database: their pools must fit in its
        /// max_connections.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        instances: u32,
    },
    /// Print the effective configuration (secrets redacted) without connecting to anything.
    Config,
    /// Inspect or invalidate the shared cache tier.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Fill a module's tables with generated, realistic data.
    #[command(subcommand)]
    Seed(SeedCommand),
    /// Stripe billing by hand: reconcile now, or replay saved events (needs STRIPE_API_KEY).
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Switch to unified mode (CACHE_BACKEND=postgres): copy the live cache entries of the
    /// Redis at REDIS_URL into PostgreSQL (remaining TTLs and tags kept), read them back and
    /// print a validation report. Sessions need no copy (their truth is PostgreSQL). Run it
    /// with the servers stopped. Exit 1 if an entry did not read back as written.
    MigrateToUnified {
        /// Print what would be copied; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Before writing, save the rows the copy replaces to FILE (JSON lines, one per key;
        /// `before` is null for a key that had no row).
        #[arg(long, value_name = "FILE")]
        backup: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Run one reconciliation pass now: list Stripe's recent events and apply those whose
    /// webhooks were lost. Prints a line per subscription it repaired, then a summary.
    Reconcile,
    /// Feed saved Stripe events through the webhook's handler (exactly once still applies:
    /// a second replay changes nothing). Prints per event: applied, duplicate, ignored-older
    /// or unknown-type.
    Replay {
        /// The events: one event object, a JSON array of events, one event per line (JSON
        /// lines), or a Stripe list object ({"object":"list","data":[...]}).
        file: std::path::PathBuf,
    },
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

fn main() -> ExitCode {
    cascade_core::config::load_dotenv();
    let cli = Cli::parse();
    let settings = match Settings::from_raw(&cli.settings) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("cascade: {err}");
            return ExitCode::from(2);
        }
    };
    if let Command::Config = cli.command {
        print_config(&settings);
        return ExitCode::SUCCESS;
    }
    cascade_server::process::init_tracing(settings.core.log_format, "info");
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
            Command::Serve { no_migrate } => serve::run(settings, !no_migrate).await,
            Command::Migrate => serve::migrate_only(settings).await,
            Command::Worker => serve::worker(settings).await,
            Command::Check { instances } => check::run(&settings, instances).await,
            Command::Config => Ok(ExitCode::SUCCESS),
            Command::Cache(CacheCommand::Invalidate(target)) => {
                serve::cache_invalidate(settings, target).await
            }
            Command::Cache(CacheCommand::Stats { url }) => {
                check::cache_stats(&settings.core, url).await
            }
            Command::Billing(BillingCommand::Reconcile) => billing::reconcile(settings).await,
            Command::Billing(BillingCommand::Replay { file }) => {
                billing::replay(settings, &file).await
            }
            Command::MigrateToUnified { dry_run, backup } => {
                unified::run(settings, unified::Options { dry_run, backup }).await
            }
            Command::Seed(SeedCommand::Catalog {
                assets,
                producers,
                seed,
                reset,
                owner,
            }) => {
                let options = cascade_catalog::seed::SeedOptions {
                    assets,
                    producers,
                    seed,
                    reset,
                    owner: None,
                };
                seed::catalog(settings, options, owner.as_deref()).await
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
pub(crate) fn print_config(settings: &Settings) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "effective configuration (secrets redacted):");
    for (var, value) in settings.describe() {
        let _ = writeln!(out, "  {var:<28} {value}");
    }
}
