use std::time::Duration;

use crate::common::{cascade, empty_dir, run_bounded};

fn config_with(env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = empty_dir();
    let mut command = cascade(&dir);
    command.arg("config");
    for (k, v) in env {
        command.env(k, v);
    }
    let (out, _) = run_bounded(command, Duration::from_secs(20));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_invalid_value_is_refused_naming_its_variable() {
    let cases: &[(&str, &str, &str)] = &[
        ("JWT_SECRET", "too-short", "at least 32 bytes"),
        ("DATABASE_URL", "mysql://root@localhost/db", "postgresql://"),
        (
            "DATABASE_URL",
            "postgresql://u@host:notaport/db",
            "postgresql://",
        ),
        ("PG_URL", "not a url", "postgresql://"),
        ("PG_POOL_MIN", "five", "whole number"),
        ("PG_POOL_MAX", "-3", "whole number"),
        ("POSTGRES_POOL_MAX_SIZE", "lots", "whole number"),
        ("PORT", "eighty", "port"),
        ("REDIS_URL", "http://localhost:6379", "redis[s]://"),
        ("CACHE_TTLS_JSON", "{assets: 5}", "not valid JSON"),
        ("CACHE_TTLS_JSON", "{\"assets\": \"soon\"}", "milliseconds"),
        ("CACHE_DEFAULT_TTL", "forever", "duration"),
        ("CACHE_BACKEND", "mongodb", "redis, postgres or memory"),
        ("SESSION_DEFAULT_TTL", "0", "greater than zero"),
        ("PG_STARTUP_TIMEOUT", "a while", "duration"),
        ("VENICE_API_URL", "serenissima.ai", "http"),
        ("DUCAT_TO_USD_RATE", "ten cents", "decimal"),
        ("TRANSACTION_FEE_PERCENT", "150", "below 100"),
        ("MIN_INVESTMENT_USD", "1e2", "decimal"),
        ("VERIFICATION_THRESHOLD", "2", "between 0 and 1"),
        ("USE_REDIS_BUNDLES", "sometimes", "true or false"),
        ("LOG_FORMAT", "xml", "text or json"),
    ];
    for (var, value, hint) in cases {
        let (code, _, stderr) = config_with(&[(var, value)]);
        assert_eq!(code, 2, "{var}={value} should be refused; stderr: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("{var}:")))
            .unwrap_or_else(|| panic!("{var}={value}: no line names {var}: {stderr}"));
        assert!(
            line.contains(hint),
            "{var}={value}: {line:?} should mention {hint:?}"
        );
    }
}

#[test]
fn pool_min_above_max_is_refused() {
    let (code, _, stderr) = config_with(&[("PG_POOL_MIN", "30"), ("PG_POOL_MAX", "10")]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("PG_POOL_MIN: must not exceed PG_POOL_MAX"),
        "{stderr}"
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let (code, _, stderr) = config_with(&[
        ("JWT_SECRET", "x"),
        ("PORT", "http"),
        ("PG_POOL_MAX", "many"),
    ]);
    assert_eq!(code, 2);
    for var in ["JWT_SECRET:", "PORT:", "PG_POOL_MAX:"] {
        assert!(stderr.contains(var), "{var} missing from {stderr}");
    }
}

#[test]
fn dotenv_is_read_and_the_environment_wins() {
    let dir = empty_dir();
    std::fs::write(
        dir.join(".env"),
        "PORT=9123\nHOST=0.0.0.0\nCACHE_TTLS_JSON='{\"assets\":1500}'\n",
    )
    .unwrap();
    let mut command = cascade(&dir);
    command.arg("config").env("HOST", "127.0.0.2");
    let (out, _) = run_bounded(command, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("PORT") && l.trim_end().ends_with("9123")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("HOST") && l.trim_end().ends_with("127.0.0.2")),
        "{stdout}"
    );
    assert!(stdout.contains("assets=1.5s"), "{stdout}");

    std::fs::write(dir.join(".env"), "JWT_SECRET=short\n").unwrap();
    let mut command = cascade(&dir);
    command.arg("config");
    let (out, _) = run_bounded(command, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_SECRET"));
}

#[test]
fn secrets_never_appear_in_output() {
    let secrets = [
        (
            "DATABASE_URL",
            "postgresql://cascade:pg-password-1234@127.0.0.1:1/cascade",
            "pg-password-1234",
        ),
        (
            "REDIS_URL",
            "redis://:redis-password-5678@127.0.0.1:1",
            "redis-password-5678",
        ),
        (
            "JWT_SECRET",
            "jwt-secret-0123456789abcdefghijklmnop",
            "jwt-secret-0123456789",
        ),
        ("VENICE_API_KEY", "venice-key-abcdef", "venice-key-abcdef"),
        (
            "STRIPE_API_KEY",
            "sk_test_stripe_key_42",
            "sk_test_stripe_key_42",
        ),
        (
            "STRIPE_WEBHOOK_SECRET",
            "whsec_hook_secret_42",
            "whsec_hook_secret_42",
        ),
    ];
    let dir = empty_dir();
    for subcommand in ["config", "check", "serve"] {
        let mut command = cascade(&dir);
        command
            .arg(subcommand)
            .env("PG_STARTUP_TIMEOUT", "1s")
            .env("VENICE_API_URL", "http://127.0.0.1:1")
            .env("PORT", "0");
        for (var, value, _) in &secrets {
            command.env(var, value);
        }
        let (out, _) = run_bounded(command, Duration::from_secs(60));
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (var, _, needle) in &secrets {
            assert!(
                !all.contains(needle),
                "`cascade {subcommand}` printed the value of {var}:\n{all}"
            );
        }
        if subcommand != "serve" {
            assert!(
                all.contains("postgresql://cascade:***@127.0.0.1:1/cascade"),
                "{all}"
            );
        }
    }
}

#[test]
fn help_lists_every_seed_variable() {
    let dir = empty_dir();
    let mut command = cascade(&dir);
    command.arg("--help");
    let (out, _) = run_bounded(command, Duration::from_secs(20));
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "DATABASE_URL",
        "PG_URL",
        "POSTGRES_HOST",
        "POSTGRES_PORT",
        "POSTGRES_DB",
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "REDIS_URL",
        "PG_POOL_MIN",
        "PG_POOL_MAX",
        "POSTGRES_POOL_MIN_SIZE",
        "POSTGRES_POOL_MAX_SIZE",
        "CACHE_TTLS_JSON",
        "CACHE_DEFAULT_TTL",
        "CACHE_CLEANUP_INTERVAL",
        "SESSION_DEFAULT_TTL",
        "SESSION_CLEANUP_INTERVAL",
        "JWT_SECRET",
        "VENICE_API_URL",
        "VENICE_API_KEY",
        "DUCAT_TO_USD_RATE",
        "TRANSACTION_FEE_PERCENT",
        "MIN_INVESTMENT_USD",
        "CONSCIOUSNESS_SYNC_INTERVAL",
        "CONSCIOUSNESS_CACHE_TTL",
        "VERIFICATION_THRESHOLD",
        "USE_REDIS_BUNDLES",
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "STRIPE_API_URL",
        "CACHE_BACKEND",
        "HOST",
        "PORT",
    ] {
        assert!(
            help.contains(&format!("env: {var}=")) || help.contains(&format!("env: {var}]")),
            "--help lacks {var}"
        );
    }
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.env.example"))
            .expect(".env.example");
    for line in help.lines().filter_map(|l| l.split("[env: ").nth(1)) {
        let var = line.split(['=', ']']).next().unwrap();
        assert!(
            example.contains(&format!("{var}=")),
            ".env.example does not document {var}"
        );
    }
}
