//! What runs a workflow step: an [`Executor`] per capability. Built in: `echo` (answers its
//! input), `noop` (answers `null`), and `http` (a call through the core's upstream connector,
//! when `AGENTS_HTTP_URL` is set). Other executors are registered by the code that composes
//! the module ([`Executors::register`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cascade_core::upstream::Connector;
use serde_json::{Value, json};

/// A step's answer: its output, or why it failed (retried while attempts remain).
pub type StepResult = Result<Value, String>;

/// What a step sees.
#[derive(Debug, Clone)]
pub struct Step {
    pub execution_id: i64,
    /// The step's position in the workflow, from 0.
    pub index: usize,
    pub attempt: i32,
    /// The step's own input, from the workflow.
    pub input: Value,
    /// The execution's input.
    pub execution_input: Value,
    /// The previous step's output (`null` for the first step).
    pub previous: Value,
}

/// Runs the steps that name one capability.
pub trait Executor: Send + Sync + 'static {
    fn run<'a>(&'a self, step: &'a Step) -> Pin<Box<dyn Future<Output = StepResult> + Send + 'a>>;
}

/// Answers the step's input: what tests and benchmarks run.
pub struct Echo;

impl Executor for Echo {
    fn run<'a>(&'a self, step: &'a Step) -> Pin<Box<dyn Future<Output = StepResult> + Send + 'a>> {
        Box::pin(async move { Ok(step.input.clone()) })
    }
}

/// Does nothing.
pub struct Noop;

impl Executor for Noop {
    fn run<'a>(&'a self, _step: &'a Step) -> Pin<Box<dyn Future<Output = StepResult> + Send + 'a>> {
        Box::pin(async { Ok(Value::Null) })
    }
}

/// A call to the configured HTTP service through the core's connector (its pool, deadline,
/// retries and breaker): `{"method": "GET", "path": "/x", "query": {..}}` or
/// `{"method": "POST", "path": "/x", "form": {..}}`. A POST carries the idempotency key
/// `execution-<id>-step-<n>`, the same on every attempt, so a retried step is done once.
/// Its output: `{"status": .., "body": ..}`; a 4xx answer is the step's failure.
pub struct Http {
    pub connector: Connector,
}

fn pairs(value: &Value) -> Vec<(String, String)> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Executor for Http {
    fn run<'a>(&'a self, step: &'a Step) -> Pin<Box<dyn Future<Output = StepResult> + Send + 'a>> {
        Box::pin(async move {
            let path = step.input["path"].as_str().unwrap_or("/");
            if !path.starts_with('/') {
                return Err(format!("http step: path must start with '/', got {path:?}"));
            }
            let method = step.input["method"].as_str().unwrap_or("GET");
            let answer = match method {
                "GET" => {
                    let query = pairs(&step.input["query"]);
                    let query: Vec<(&str, &str)> = query
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    self.connector.get_uncached(path, &query).await
                }
                "POST" => {
                    let form = pairs(&step.input["form"]);
                    let form: Vec<(&str, &str)> =
                        form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let key = format!("execution-{}-step-{}", step.execution_id, step.index);
                    self.connector.post_form(path, &form, &key).await
                }
                other => {
                    return Err(format!(
                        "http step: method must be GET or POST, got {other:?}"
                    ));
                }
            };
            match answer {
                Ok((status, body)) if status < 400 => Ok(json!({"status": status, "body": body})),
                Ok((status, body)) => Err(format!(
                    "http step: {method} {path} answered {status}: {body}"
                )),
                Err(err) => Err(format!("http step: {err}")),
            }
        })
    }
}

/// The executors by capability.
#[derive(Clone)]
pub struct Executors(Arc<HashMap<String, Arc<dyn Executor>>>);

impl Executors {
    /// `echo` and `noop`, and `http` when a connector is given.
    pub fn builtin(http: Option<Connector>) -> Executors {
        let mut map: HashMap<String, Arc<dyn Executor>> = HashMap::new();
        map.insert("echo".into(), Arc::new(Echo));
        map.insert("noop".into(), Arc::new(Noop));
        if let Some(connector) = http {
            map.insert("http".into(), Arc::new(Http { connector }));
        }
        Executors(Arc::new(map))
    }

    /// Adds (or replaces) the executor of `capability`.
    pub fn register(&mut self, capability: &str, executor: Arc<dyn Executor>) {
        Arc::make_mut(&mut self.0).insert(capability.to_string(), executor);
    }

    pub fn get(&self, capability: &str) -> Option<&Arc<dyn Executor>> {
        self.0.get(capability)
    }

    /// The capabilities that have an executor, sorted.
    pub fn capabilities(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.keys().cloned().collect();
        names.sort();
        names
    }
}
