//! The suite's results: one [`Row`] per scenario, printed as a Markdown table and written to
//! `results.md` and `results.json` (which CI and the quick-suite test read).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::measure::{ms, percentiles};

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub requests: u64,
    pub req_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
    /// Throughput over the same-stack baseline's (what the work behind the route costs).
    pub ratio_to_baseline: Option<f64>,
    /// Throughput over the bare ceiling's (SPEC's figure: the fraction of the machine's bare
    /// HTTP throughput).
    pub ratio_to_ceiling: Option<f64>,
    pub notes: String,
}

impl Row {
    /// A row measured by the suite's own client: `latencies` of every request over `elapsed`.
    pub fn from_latencies(
        scenario: String,
        latencies: &mut [Duration],
        elapsed: Duration,
        errors: u64,
        notes: String,
    ) -> Row {
        let requests = latencies.len() as u64;
        let (p50, p99) = percentiles(latencies);
        Row {
            scenario,
            requests,
            req_per_sec: requests as f64 / elapsed.as_secs_f64(),
            p50_ms: ms(p50),
            p99_ms: ms(p99),
            errors,
            ratio_to_baseline: None,
            ratio_to_ceiling: None,
            notes,
        }
    }
}

/// Every row and how they were measured.
pub struct Report {
    pub assets: usize,
    pub seconds: u64,
    pub connections: usize,
    pub quick: bool,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} assets; {} s per wrk scenario, {} connections; one run, one machine ({} cores)\n",
            self.assets,
            self.seconds,
            self.connections,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let _ = writeln!(
            out,
            "| scenario | req/s | p50 ms | p99 ms | errors | × ceiling | × baseline | notes |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|");
        for row in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |",
                row.scenario,
                row.req_per_sec,
                row.p50_ms,
                row.p99_ms,
                row.errors,
                row.ratio_to_ceiling
                    .map_or_else(|| "–".into(), |r| format!("{r:.2}")),
                row.ratio_to_baseline
                    .map_or_else(|| "–".into(), |r| format!("{r:.2}")),
                row.notes
            );
        }
        out
    }

    /// Writes `results.md` and `results.json` into `out`.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::write(out.join("results.md"), self.markdown())?;
        let json = json!({
            "assets": self.assets,
            "seconds_per_scenario": self.seconds,
            "connections": self.connections,
            "quick": self.quick,
            "rows": self.rows,
        });
        std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(&json)?)?;
        Ok(())
    }
}
