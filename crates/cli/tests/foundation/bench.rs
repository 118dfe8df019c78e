//! `cascade bench --quick` end to end, so the suite cannot rot: it starts its own PostgreSQL,
//! Redis and server, runs every scenario, and writes the table. The figures themselves are not
//! asserted (this is a shared 2-core machine); what the suite reports about correctness is.

use std::time::Duration;

use serde_json::Value;

use crate::common::{cascade, empty_dir, run_bounded};

#[test]
fn quick_bench_runs_every_scenario_and_writes_the_table() {
    let dir = empty_dir();
    let out = dir.join("bench");
    let mut command = cascade(&dir);
    command
        .args(["bench", "--quick", "--connections", "16", "--out"])
        .arg(&out);
    let (output, _) = run_bounded(command, Duration::from_secs(600));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cascade bench --quick failed:\n{stderr}"
    );

    let results: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("results.json parses");
    let rows = results["rows"].as_array().expect("rows");
    let row = |prefix: &str| -> &Value {
        rows.iter()
            .find(|r| r["scenario"].as_str().unwrap_or("").starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?} in {results}"))
    };
    for name in [
        "baseline",
        "hot reads",
        "PostgreSQL reads",
        "miss-heavy reads",
        "bundle depth 3 GET",
        "bundle depth 3, straight",
        "writes",
    ] {
        let r = row(name);
        assert!(r["requests"].as_u64().unwrap() > 0, "{name}: {r}");
        assert_eq!(r["errors"], 0, "{name}: {r}");
        assert!(
            r["ratio_to_baseline"].as_f64().unwrap() > 0.0,
            "{name}: {r}"
        );
    }
    assert_eq!(row("baseline")["ratio_to_baseline"], 1.0);
    let hot = row("hot reads")["notes"].as_str().unwrap().to_string();
    assert!(
        hot.starts_with("hit ratio 100.0 %"),
        "hot set is all hits: {hot}"
    );
    assert!(
        hot.contains(", 0.0 PostgreSQL statements per 1000 requests"),
        "and PostgreSQL ran no catalog statement for it: {hot}"
    );
    let misses = row("miss-heavy")["notes"].as_str().unwrap().to_string();
    assert!(
        !misses.contains(", 0.0 PostgreSQL statements"),
        "misses reach PostgreSQL, counted there: {misses}"
    );

    let stampede = row("cold-key stampede");
    assert_eq!(stampede["errors"], 0);
    assert!(
        stampede["notes"]
            .as_str()
            .unwrap()
            .starts_with("1 PostgreSQL query for 200 requests (pg_stat_statements"),
        "one load for a cold key: {stampede}"
    );
    let outage = row("Redis killed");
    let notes = outage["notes"].as_str().unwrap();
    assert!(notes.starts_with("0 failed, 0 stale reads"), "{notes}");
    assert!(
        !notes.contains("not within"),
        "cache hits came back: {notes}"
    );

    let restart = row("PostgreSQL stopped");
    let notes = restart["notes"].as_str().unwrap();
    assert_eq!(restart["errors"], 0, "{notes}");
    assert!(notes.contains("acknowledged writes lost: 0;"), "{notes}");
    assert!(notes.contains("other errors: 0;"), "{notes}");
    assert!(
        !notes.contains("writes refused with 503: 0 "),
        "writes were refused: {notes}"
    );
    assert!(
        !notes.contains("not before the end"),
        "writes came back: {notes}"
    );

    let markdown = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(markdown.contains("| scenario | req/s | p50 ms | p99 ms |"));
    assert_eq!(
        markdown.matches("\n| ").count(),
        rows.len() + 1,
        "{markdown}"
    );
}
