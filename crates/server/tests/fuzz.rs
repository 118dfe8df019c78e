//! Schemathesis against the real application: every operation of `/openapi.json`, positive
//! and negative cases, with a real bearer token and a seeded catalog, under a bounded budget.
//! It fails on any 5xx, any response the document does not allow (status, headers, body
//! schema, content type), any accepted invalid input or refused valid one, and any request
//! that takes longer than [`REQUEST_TIMEOUT_S`].
//!
//! What it found is kept in `tests/fuzz-corpus/regressions.json` (committed, one request per
//! finding and the status it must get) and replayed first on every run; schemathesis's own
//! example database lives in the build directory, so local runs also replay what the last ones
//! found without the work tree changing under a test run.
//!
//! `scripts/test` installs schemathesis (PyPI) when it is missing.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::{PgServer, RedisServer};
use serde_json::{Value, json};

/// Examples per operation and phase: with ~25 operations this keeps a run under ~2 minutes
/// on two cores.
const MAX_EXAMPLES: &str = "100";
/// A request slower than this is a failure (a hang). Generous: the suite shares two cores
/// with the rest of the tests, and a slow answer is not what this run looks for.
const REQUEST_TIMEOUT_S: &str = "15";
/// The whole run; past it the test fails rather than waiting.
const RUN_DEADLINE: Duration = Duration::from_secs(300);
/// The version the document's examples name, seeded so positive cases reach real rows.
const SEEDED_VERSION: &str = "ds-orders@v3";

fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("schemathesis"))
        .find(|candidate| candidate.is_file())
}

/// Schemathesis's example database: in the build directory, kept between local runs.
fn example_database() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-examples")
}

/// One earlier finding: a request and the status it must get.
#[derive(serde::Deserialize)]
struct Regression {
    finding: String,
    method: String,
    path: String,
    #[serde(default)]
    auth: bool,
    body: Option<Value>,
    expect: u16,
}

/// Replays `tests/fuzz-corpus/regressions.json`; one line per request that got another status.
async fn replay(base: &str, token: &str) -> Vec<String> {
    let cases: Vec<Regression> =
        serde_json::from_str(include_str!("fuzz-corpus/regressions.json")).expect("the corpus");
    let client =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
            .expect("client");
    let mut wrong = Vec::new();
    for case in cases {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).expect("a method");
        let mut request = client.request(method, format!("{base}{}", case.path));
        if case.auth {
            request = request.bearer_auth(token);
        }
        if let Some(body) = &case.body {
            request = request.json(body);
        }
        let (status, body) = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(err) => (0, format!("no answer: {err}")),
        };
        if status != case.expect {
            wrong.push(format!(
                "{} {} -> {status} (expected {}): {}\n      {}",
                case.method,
                case.path,
                case.expect,
                case.finding,
                body.chars().take(300).collect::<String>()
            ));
        }
    }
    wrong
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    path: &str,
    body: Value,
) -> Value {
    let mut request = client.post(format!("{base}{path}")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

/// An account and a small catalog: a producer, a chain of three versions with lineage, the
/// last one entitled (receipt and policy), so reads and writes find real rows.
async fn seed(base: &str) -> String {
    let client =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
            .expect("client");
    let registered = send(
        &client,
        base,
        None,
        "/auth/register",
        json!({"username": "fuzzer", "password": "fuzzer's password"}),
    )
    .await;
    let token = registered["access_token"]
        .as_str()
        .expect("a token")
        .to_string();
    let t = Some(token.as_str());
    send(
        &client,
        base,
        t,
        "/producers",
        json!({"producerId": "acme", "name": "Acme"}),
    )
    .await;
    for version in ["ds-raw@v1", "ds-clean@v2", SEEDED_VERSION] {
        send(&client, base, t, "/assets",
            json!({"versionId": version, "producerId": "acme", "name": version, "metadata": {"owner": "fuzz"}})).await;
    }
    for (input, output) in [
        ("ds-raw@v1", "ds-clean@v2"),
        ("ds-clean@v2", SEEDED_VERSION),
    ] {
        send(&client, base, t, "/lineage", json!({
            "eventType": "COMPLETE", "eventTime": "2025-01-31T12:00:00Z",
            "producer": "https://example.org/fuzz", "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
            "run": {"runId": "3f5e2a7c-1b2d-4c3e-8f9a-0b1c2d3e4f50"}, "job": {"namespace": "etl", "name": "nightly"},
            "inputs": [{"namespace": "s3://lake", "name": input}],
            "outputs": [{"namespace": "s3://lake", "name": output}],
        })).await;
    }
    send(
        &client,
        base,
        t,
        "/receipts",
        json!({"versionId": SEEDED_VERSION, "payer": "alice", "amount": 100}),
    )
    .await;
    send(
        &client,
        base,
        t,
        "/policies",
        json!({"versionId": SEEDED_VERSION, "document": {"license": "CC-BY-4.0"}}),
    )
    .await;
    token
}

/// Runs schemathesis on the operations `filter` selects; `Err` carries its report.
async fn run(base: &str, token: &str, filter: &[&str]) -> Result<(), String> {
    let program = schemathesis().expect("schemathesis is on PATH (scripts/test installs it)");
    let mut command = tokio::process::Command::new(program);
    command
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--url", base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all"])
        .args(["--mode", "all"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--request-timeout", REQUEST_TIMEOUT_S])
        .args(["--max-response-time", REQUEST_TIMEOUT_S])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--workers", "1"])
        // Reproducible in CI; `FUZZ_SEED=<n>` explores other inputs locally.
        .args([
            "--seed",
            &std::env::var("FUZZ_SEED").unwrap_or_else(|_| "12".into()),
        ])
        .args(["--generation-allow-x00", "true"])
        .arg("--generation-database")
        .arg(example_database())
        .args(["--suppress-health-check", "all"])
        .args(["--no-color", "--output-truncate", "true"])
        .args(filter)
        // It keeps a cache in its working directory: the build directory, not the work tree.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_DEADLINE, command.output())
        .await
        .map_err(|_| format!("schemathesis did not finish within {RUN_DEADLINE:?}"))?
        .map_err(|e| format!("schemathesis did not run: {e}"))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        println!("{report}");
        Ok(())
    } else {
        Err(report)
    }
}

/// One line per failure of a schemathesis report: the operation, the check, the status and
/// the body it got, and the request that reproduces it.
fn findings(report: &str) -> String {
    let failures = report
        .split("=== FAILURES ===")
        .nth(1)
        .unwrap_or(report)
        .split("=== WARNINGS ===")
        .next()
        .unwrap_or("");
    let mut out = Vec::new();
    for line in failures.lines() {
        let line = line.trim();
        let keep = (line.starts_with("__") && line.ends_with("__"))
            || line.starts_with("- ")
            || line.starts_with("Invalid component")
            || (line.starts_with('[') && line.contains("] "))
            || line.starts_with('`')
            || line.starts_with("curl ");
        if keep {
            let line: String = line.chars().take(400).collect();
            out.push(if line.starts_with("__") {
                line.trim_matches('_').trim().to_string()
            } else {
                format!("    {line}")
            });
        }
    }
    out.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let url = pg.fresh_database().await;
    // Venice is the stand-in (it knows no citizen: `/citizens/{username}` answers 404), never
    // the real one over the network.
    let venice = cascade_testkit::VeniceStandin::start(Default::default()).await;
    // Stripe too: billing answers (a 503 `billing_not_configured` would read as a server error).
    let stripe = cascade_testkit::StripeStandin::start().await;
    let server = TestApp::start(&[
        ("DATABASE_URL", url),
        ("VENICE_API_URL", venice.url()),
        ("STRIPE_API_URL", stripe.url()),
        (
            "STRIPE_API_KEY",
            cascade_testkit::stripe::TEST_KEY.to_string(),
        ),
        (
            "STRIPE_WEBHOOK_SECRET",
            "whsec_fuzz-tests-secret".to_string(),
        ),
        (
            "STRIPE_PRICES_JSON",
            r#"{"explorer":"price_explorer","architect":"price_architect"}"#.to_string(),
        ),
        ("REDIS_URL", redis.url()),
        (
            "JWT_SECRET",
            "fuzz-tests-secret-fuzz-tests-secret!".to_string(),
        ),
        // Limits are tested elsewhere; here they would turn most cases into 429s.
        ("RATE_LIMIT_API", "off".to_string()),
        ("RATE_LIMIT_AUTH", "off".to_string()),
        ("RATE_LIMIT_LOGIN", "off".to_string()),
        // Configured, so `/health/db` answers 401 to a missing or account token (unconfigured,
        // it is closed to everyone with a 403).
        (
            "ADMIN_TOKEN",
            "fuzz-admin-token-fuzz-admin-token-0123".to_string(),
        ),
    ])
    .await;
    let token = seed(&server.base).await;

    let mut failures = Vec::new();
    let regressions = replay(&server.base, &token).await;
    if !regressions.is_empty() {
        failures.push(format!(
            "earlier findings (tests/fuzz-corpus/regressions.json) that came back:\n  {}",
            regressions.join("\n  ")
        ));
    }
    // Logging out ends the session whose token every other case uses: it goes last, alone.
    let mut reports = Vec::new();
    // Some operations cannot take every schema-valid request: a Stripe webhook needs a
    // `Stripe-Signature` made with the secret, a checkout's tier is one of
    // `STRIPE_PRICES_JSON`'s, and an investment must reach `MIN_INVESTMENT_USD` after
    // conversion (a 422), and `GET /ws` answers only a WebSocket handshake (its headers are
    // HTTP/1.1's upgrade, not parameters an OpenAPI document describes; crates/realtime's
    // tests drive it), none of which a static document can say. Every check but "a
    // schema-valid request is accepted" still runs on them (their refusals are tested in
    // crates/app/tests/billing and crates/app/tests/citizens/investments.rs).
    let filters: [&[&str]; 3] = [
        &[
            "--exclude-path",
            "/auth/logout",
            "--exclude-path",
            "/webhooks/stripe",
            "--exclude-path",
            "/billing/checkout",
            "--exclude-path",
            "/investments",
            "--exclude-path",
            "/ws",
        ],
        &[
            "--include-path",
            "/webhooks/stripe",
            "--include-path",
            "/billing/checkout",
            "--include-path",
            "/investments",
            "--include-path",
            "/ws",
            "--exclude-checks",
            "positive_data_acceptance",
        ],
        &["--include-path", "/auth/logout"],
    ];
    for filter in filters {
        if let Err(report) = run(&server.base, &token, filter).await {
            failures.push(format!("schemathesis:\n{}", findings(&report)));
            reports.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "the fuzz run failed:\n\n{}\n\nschemathesis's full report:\n{}",
        failures.join("\n\n"),
        reports.join("\n\n")
    );
}
