//! OpenLineage run events (`POST /lineage`): the JSON shape of the OpenLineage spec's
//! `RunEvent`, validated, and the parent → child edges between asset versions it implies.
//!
//! Required, as in the spec: `eventTime` (RFC 3339), `producer`, `schemaURL`, `run.runId` (a
//! UUID), `job.namespace`, `job.name`; `eventType`, when present, is one of the spec's values;
//! `inputs` and `outputs`, when present, are arrays of datasets with `namespace` and `name`.
//!
//! A dataset names an asset version by its `facets.version.datasetVersion` (the spec's
//! dataset-version facet) when it has one, otherwise by its `name`. Every input is a parent of
//! every output, except in `FAIL` and `ABORT` events (a failed run produced nothing) and for a
//! dataset that is both input and output of the run (an in-place update is not ancestry).

use std::collections::HashSet;

use serde_json::Value;

use crate::error::CatalogError;
use crate::model::{Timestamp, VersionId, nul_path};

const EVENT_TYPES: &[&str] = &["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"];

/// Most datasets on either side of one event. Every input is a parent of every output, so the
/// edges of one event grow as the product: input bounds the work (and the rows written) before
/// anything else looks at it.
pub const MAX_DATASETS: usize = 1_000;
/// Most edges one event may imply (inputs × outputs).
pub const MAX_EDGES: usize = 1_000;

/// A validated run event, with the edges it implies.
#[derive(Debug)]
pub struct RunEvent {
    pub run_id: String,
    pub event_type: Option<String>,
    pub event_time: Timestamp,
    pub job_namespace: String,
    pub job_name: String,
    pub producer: String,
    /// The event as received, for the audit table.
    pub raw: Value,
    /// (parent, child), without duplicates.
    pub edges: Vec<(VersionId, VersionId)>,
}

fn missing(field: &'static str, what: &str) -> CatalogError {
    CatalogError::bad_request(
        field,
        format!("{field}: required {what} is missing or mistyped"),
    )
}

fn string_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut at = value;
    for key in path {
        at = at.get(key)?;
    }
    at.as_str().filter(|s| !s.is_empty())
}

impl RunEvent {
    pub fn parse(raw: Value) -> Result<RunEvent, CatalogError> {
        if !raw.is_object() {
            return Err(CatalogError::BadRequest {
                field: None,
                message: "an OpenLineage event must be a JSON object".into(),
            });
        }
        // The event is stored as `jsonb`, which cannot hold a NUL anywhere.
        if let Some(path) = nul_path(&raw) {
            return Err(CatalogError::BadRequest {
                message: format!("{path}: must not contain a NUL character (\\u0000)"),
                field: Some(path),
            });
        }
        let event_time = Timestamp::parse(
            "eventTime",
            string_at(&raw, &["eventTime"]).ok_or_else(|| missing("eventTime", "string"))?,
        )?;
        let producer = string_at(&raw, &["producer"])
            .ok_or_else(|| missing("producer", "string"))?
            .to_string();
        string_at(&raw, &["schemaURL"]).ok_or_else(|| missing("schemaURL", "string"))?;
        let run_id = string_at(&raw, &["run", "runId"])
            .ok_or_else(|| missing("run.runId", "string"))?
            .to_string();
        if !is_uuid(&run_id) {
            return Err(CatalogError::bad_request(
                "run.runId",
                "run.runId: expected a UUID",
            ));
        }
        let job_namespace = string_at(&raw, &["job", "namespace"])
            .ok_or_else(|| missing("job.namespace", "string"))?
            .to_string();
        let job_name = string_at(&raw, &["job", "name"])
            .ok_or_else(|| missing("job.name", "string"))?
            .to_string();
        // Optional, and when given one of the spec's values: `null` is not one (the
        // OpenLineage schema types it as a string).
        let event_type = match raw.get("eventType") {
            None => None,
            Some(Value::String(t)) if EVENT_TYPES.contains(&t.as_str()) => Some(t.clone()),
            Some(_) => {
                return Err(CatalogError::bad_request(
                    "eventType",
                    format!("eventType: expected one of {}", EVENT_TYPES.join(", ")),
                ));
            }
        };
        let inputs = datasets(&raw, "inputs")?;
        let outputs = datasets(&raw, "outputs")?;
        // A failed or aborted run produced nothing: it implies no edges, so its size is bounded
        // by the dataset bound alone.
        let implies_edges = !matches!(event_type.as_deref(), Some("FAIL" | "ABORT"));
        if implies_edges && inputs.len() * outputs.len() > MAX_EDGES {
            return Err(CatalogError::bad_request(
                "outputs",
                format!(
                    "inputs × outputs: one event may imply at most {MAX_EDGES} edges, this one \
                     {} × {}; send the run's lineage in several events",
                    inputs.len(),
                    outputs.len()
                ),
            ));
        }
        // Both lists hold each version once, so their pairs are distinct: no dedupe needed.
        let mut edges = Vec::new();
        if implies_edges {
            for output in &outputs {
                for input in inputs.iter().filter(|input| *input != output) {
                    edges.push((input.clone(), output.clone()));
                }
            }
        }
        Ok(RunEvent {
            run_id,
            event_type,
            event_time,
            job_namespace,
            job_name,
            producer,
            raw,
            edges,
        })
    }
}

/// The asset versions named by `inputs` or `outputs`.
fn datasets(raw: &Value, field: &'static str) -> Result<Vec<VersionId>, CatalogError> {
    let list = match raw.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(CatalogError::bad_request(
                field,
                format!("{field}: expected an array of datasets"),
            ));
        }
    };
    if list.len() > MAX_DATASETS {
        return Err(CatalogError::bad_request(
            field,
            format!(
                "{field}: at most {MAX_DATASETS} datasets per event, got {}",
                list.len()
            ),
        ));
    }
    let mut versions = Vec::with_capacity(list.len());
    let mut seen = HashSet::with_capacity(list.len());
    for (i, dataset) in list.iter().enumerate() {
        for key in ["namespace", "name"] {
            if string_at(dataset, &[key]).is_none() {
                return Err(CatalogError::bad_request(
                    field,
                    format!("{field}[{i}].{key}: required string is missing or mistyped"),
                ));
            }
        }
        if dataset
            .get("facets")
            .is_some_and(|facets| !facets.is_object())
        {
            return Err(CatalogError::bad_request(
                field,
                format!("{field}[{i}].facets: expected an object of facets"),
            ));
        }
        let version = string_at(dataset, &["facets", "version", "datasetVersion"])
            .or_else(|| string_at(dataset, &["name"]))
            .unwrap_or_default();
        let version = VersionId::parse(field, version).map_err(|_| {
            CatalogError::bad_request(
                field,
                format!("{field}[{i}]: the dataset version is not a valid versionId"),
            )
        })?;
        if seen.insert(version.as_str().to_string()) {
            versions.push(version);
        }
    }
    Ok(versions)
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event() -> Value {
        json!({
            "eventType": "COMPLETE",
            "eventTime": "2025-01-31T12:00:00.000Z",
            "producer": "https://example.com/etl",
            "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
            "run": {"runId": "3f5e2a7c-1b2d-4c3e-8f9a-0b1c2d3e4f50"},
            "job": {"namespace": "etl", "name": "daily"},
            "inputs": [
                {"namespace": "s3", "name": "raw", "facets": {"version": {"datasetVersion": "raw@1"}}},
                {"namespace": "s3", "name": "ref"}
            ],
            "outputs": [{"namespace": "s3", "name": "clean@7"}]
        })
    }

    fn field_of(err: CatalogError) -> Option<String> {
        match err {
            CatalogError::BadRequest { field, .. } => field,
            _ => None,
        }
    }

    #[test]
    fn inputs_become_parents_of_outputs() {
        let parsed = RunEvent::parse(event()).unwrap();
        let edges: Vec<(&str, &str)> = parsed
            .edges
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        assert_eq!(edges, [("raw@1", "clean@7"), ("ref", "clean@7")]);
    }

    fn with_datasets(inputs: usize, outputs: usize) -> Value {
        let names = |prefix: &str, n: usize| -> Value {
            (0..n)
                .map(|i| json!({"namespace": "s3", "name": format!("{prefix}{i}")}))
                .collect()
        };
        let mut e = event();
        e["inputs"] = names("in", inputs);
        e["outputs"] = names("out", outputs);
        e
    }

    #[test]
    fn an_event_implies_at_most_max_edges_and_names_what_is_too_big() {
        let parsed = RunEvent::parse(with_datasets(100, 10)).unwrap();
        assert_eq!(parsed.edges.len(), MAX_EDGES);
        let err = RunEvent::parse(with_datasets(100, 11)).unwrap_err();
        assert!(err.to_string().contains("at most 1000 edges"), "{err}");
        assert_eq!(field_of(err).as_deref(), Some("outputs"));
        // 1,000 × 1,000 (the quadratic event that used to freeze a worker) is refused by its
        // product, before any edge is made; a longer list by its length alone.
        let started = std::time::Instant::now();
        let err = RunEvent::parse(with_datasets(1_000, 1_000)).unwrap_err();
        assert_eq!(field_of(err).as_deref(), Some("outputs"));
        let err = RunEvent::parse(with_datasets(MAX_DATASETS + 1, 1)).unwrap_err();
        assert_eq!(field_of(err).as_deref(), Some("inputs"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // A failed run of that size implies no edge, so it is recorded.
        let mut failed = with_datasets(40, 30);
        failed["eventType"] = json!("FAIL");
        assert!(RunEvent::parse(failed).unwrap().edges.is_empty());
        // One input feeding many outputs is fine (a fan-out job).
        assert_eq!(
            RunEvent::parse(with_datasets(1, 1_000))
                .unwrap()
                .edges
                .len(),
            1_000
        );
    }

    #[test]
    fn repeated_datasets_count_once_and_make_no_duplicate_edges() {
        let mut e = event();
        e["inputs"] = json!([
            {"namespace": "s3", "name": "a"},
            {"namespace": "s3", "name": "a"},
            {"namespace": "s3", "name": "b"}
        ]);
        e["outputs"] = json!([{"namespace": "s3", "name": "b"}, {"namespace": "s3", "name": "c"}]);
        let edges: Vec<(String, String)> = RunEvent::parse(e)
            .unwrap()
            .edges
            .iter()
            .map(|(p, c)| (p.as_str().to_string(), c.as_str().to_string()))
            .collect();
        assert_eq!(
            edges,
            [("a", "b"), ("a", "c"), ("b", "c")].map(|(p, c)| (p.to_string(), c.to_string()))
        );
    }

    #[test]
    fn an_event_type_of_null_is_refused_like_any_other_non_value() {
        let mut e = event();
        e["eventType"] = json!(null);
        let err = RunEvent::parse(e).unwrap_err();
        assert_eq!(field_of(err).as_deref(), Some("eventType"));
        let mut e = event();
        e.as_object_mut().unwrap().remove("eventType");
        assert!(RunEvent::parse(e).is_ok(), "absent is fine");
    }

    #[test]
    fn facets_that_are_not_an_object_are_refused_naming_the_dataset() {
        for facets in [json!([null, null]), json!(null), json!("v1")] {
            let mut e = event();
            e["outputs"][0]["facets"] = facets.clone();
            let err = RunEvent::parse(e).unwrap_err();
            assert!(
                err.to_string().contains("outputs[0].facets"),
                "{facets}: {err}"
            );
        }
    }

    #[test]
    fn failed_runs_imply_no_edges() {
        let mut e = event();
        e["eventType"] = json!("FAIL");
        assert!(RunEvent::parse(e).unwrap().edges.is_empty());
    }

    #[test]
    fn each_required_field_is_named_when_missing() {
        for (path, field) in [
            (&["eventTime"][..], "eventTime"),
            (&["producer"][..], "producer"),
            (&["schemaURL"][..], "schemaURL"),
            (&["run", "runId"][..], "run.runId"),
            (&["job", "namespace"][..], "job.namespace"),
            (&["job", "name"][..], "job.name"),
        ] {
            let mut e = event();
            let (last, parents) = path.split_last().unwrap();
            let mut at = &mut e;
            for p in parents {
                at = &mut at[*p];
            }
            at.as_object_mut().unwrap().remove(*last);
            assert_eq!(
                field_of(RunEvent::parse(e).unwrap_err()).as_deref(),
                Some(field)
            );
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        for (key, value, field) in [
            ("eventTime", json!("noon"), "eventTime"),
            ("eventType", json!("DONE"), "eventType"),
            ("inputs", json!({"name": "x"}), "inputs"),
            ("outputs", json!([{"namespace": "s3"}]), "outputs"),
        ] {
            let mut e = event();
            e[key] = value;
            assert_eq!(
                field_of(RunEvent::parse(e).unwrap_err()).as_deref(),
                Some(field)
            );
        }
        let mut e = event();
        e["run"]["runId"] = json!("not-a-uuid");
        assert_eq!(
            field_of(RunEvent::parse(e).unwrap_err()).as_deref(),
            Some("run.runId")
        );
    }
}
