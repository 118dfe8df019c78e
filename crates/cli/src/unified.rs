//! `cascade migrate-to-unified`: the switch to unified mode (`CACHE_BACKEND=postgres`, seed
//! 002's migration script). Copies the live cache entries of the Redis at `REDIS_URL` into
//! PostgreSQL's `cache_entries`, each with its remaining TTL and its tags, then reads them
//! back and reports.
//!
//! Sessions need no copy: their truth has always been PostgreSQL (`auth_sessions`), Redis
//! only held cached copies of them. A user logged in before the switch stays logged in after
//! it, with the same tokens; the command says so in its output.
//!
//! Run it with the servers stopped (or between stopping the Redis-mode servers and starting
//! the unified ones): an entry invalidated in Redis after it was copied would otherwise live
//! on in PostgreSQL until its TTL.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use cascade_core::cache::unified::{self, Row, Snapshot};
use cascade_core::config::DatabaseSource;
use cascade_core::redis::Redis;
use cascade_server::Settings;
use cascade_server::application::{self, Database};
use serde_json::json;

/// The command's flags.
pub struct Options {
    pub dry_run: bool,
    pub backup: Option<PathBuf>,
}

/// Exit 2 with why when there is nothing to copy from or to: no `REDIS_URL`, or no
/// `DATABASE_URL` and no embedded PostgreSQL yet (one started afresh would not be the one
/// the servers use).
fn configured(settings: &Settings) -> Result<(), ExitCode> {
    if settings.core.redis.is_none() {
        eprintln!(
            "cascade: migrate-to-unified copies from Redis: set REDIS_URL to the Redis the \
             servers used (and CACHE_KEY_PREFIX if they set one)"
        );
        return Err(ExitCode::from(2));
    }
    if let DatabaseSource::Embedded { data_dir } = &settings.core.database.source
        && !data_dir.is_dir()
    {
        eprintln!(
            "cascade: migrate-to-unified needs the servers' database: set DATABASE_URL (the \
             embedded PostgreSQL's data directory {} does not exist)",
            data_dir.display()
        );
        return Err(ExitCode::from(2));
    }
    Ok(())
}

pub async fn run(settings: Settings, options: Options) -> anyhow::Result<ExitCode> {
    if let Err(code) = configured(&settings) {
        return Ok(code);
    }
    let config = &settings.core;
    let redis_config = config.redis.as_ref().expect("checked by configured");
    let redis = Redis::new(redis_config)?;
    if let Some(error) = redis.health().await.error {
        anyhow::bail!("Redis at {} does not answer: {error}", redis.display());
    }
    let database = Database::open(config).await?;
    let result = migrate(&settings, &redis, &database, &options).await;
    database.db.close();
    result
}

async fn migrate(
    settings: &Settings,
    redis: &Redis,
    database: &Database,
    options: &Options,
) -> anyhow::Result<ExitCode> {
    let db = &database.db;
    // The same schema the unified servers will start with (cache_entries among it).
    if !options.dry_run {
        application::migrate(db, &application::modules(settings)).await?;
    }
    let prefix = &settings.core.cache.key_prefix;
    let snapshot = unified::read_redis(redis, prefix)
        .await
        .context("reading the cache entries from Redis")?;
    let keys: Vec<String> = snapshot.entries.iter().map(|e| e.key.clone()).collect();
    println!(
        "read {} cache key(s) under the prefix {prefix:?} from Redis at {}: {} live, {} expired",
        snapshot.read(),
        redis.display(),
        snapshot.entries.len(),
        snapshot.expired.len()
    );
    let sessions = match unified::live_sessions(db).await {
        Ok(n) => format!("{n} live session(s) there"),
        Err(err) => format!("not counted: {err}"),
    };
    println!(
        "sessions: nothing to copy. Their truth is already PostgreSQL (auth_sessions; {sessions}); \
         Redis held only cached copies (namespace sessions), copied below like any entry. \
         Users stay logged in with the tokens they have."
    );
    println!(
        "not copied: rate-limit and login-backoff counters (they start afresh), and the \
         real-time channels' history"
    );
    if options.dry_run {
        for entry in &snapshot.entries {
            println!(
                "would copy {} ({} bytes, {} ms left, tags {})",
                entry.key,
                entry.value.len(),
                entry.ttl.as_millis(),
                entry.tags.join(",")
            );
        }
        println!(
            "dry run: would copy {}, skip {} expired; nothing written",
            snapshot.entries.len(),
            snapshot.expired.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = &options.backup {
        let before = unified::existing_rows(db, &keys)
            .await
            .context("reading the rows the copy will replace")?;
        write_backup(path, &keys, &before)
            .with_context(|| format!("writing the backup {}", path.display()))?;
        println!(
            "backup: {} line(s) in {} ({} existing row(s) the copy replaces)",
            keys.len(),
            path.display(),
            before.len()
        );
    }
    let copied = unified::write_postgres(db, &snapshot)
        .await
        .context("writing cache_entries")?;
    let mismatches = unified::verify(db, &snapshot, &copied.copied)
        .await
        .context("reading cache_entries back")?;
    report(&snapshot, &copied, &mismatches);
    Ok(if mismatches.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One JSON line per key the copy writes: the row it replaces (`before`), or `null` when
/// there was none. Synced before anything is written, so a crash leaves the backup whole.
fn write_backup(path: &Path, keys: &[String], before: &[Row]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let by_key: std::collections::HashMap<&str, &Row> =
        before.iter().map(|r| (r.key.as_str(), r)).collect();
    for key in keys {
        let row = by_key.get(key.as_str()).map(|r| {
            json!({
                "value_hex": hex(&r.value),
                "tags": r.tags,
                "expires_at_ms": r.expires_at_ms,
            })
        });
        let line = json!({ "table": "cache_entries", "key": key, "before": row });
        writeln!(file, "{line}")?;
    }
    file.into_inner()?.sync_all()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn report(snapshot: &Snapshot, copied: &unified::Copied, mismatches: &[String]) {
    for key in mismatches {
        println!("mismatch: {key} is not in PostgreSQL as Redis held it");
    }
    println!("validation report:");
    println!("  read            {}", snapshot.read());
    println!("  copied          {}", copied.copied.len());
    println!(
        "  skipped-expired {}",
        snapshot.expired.len() + copied.expired.len()
    );
    println!("  mismatches      {}", mismatches.len());
}
