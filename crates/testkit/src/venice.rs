//! A stand-in for the Venice citizen ledger API (seed 001: `GET /get-ledger?citizenUsername=`,
//! `GET /health`; and the city's lists that consciousness patterns read: `GET /citizens`,
//! `GET /relationships`, `GET /activities`): a real HTTP server on a free loopback port,
//! serving citizens from fixture data, that a test can slow down, make fail, make hang, stop and start again, and that
//! counts the calls it receives (so a test can say "exactly one upstream call").
//!
//! It is what the production client talks to in tests and in development (the
//! `cascade-venice-standin` binary); nothing in Cascade knows it is not Venice.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

/// How the stand-in answers, set by the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// From the fixtures (after the configured delay).
    Normal,
    /// Every request gets this status and a JSON error.
    Fail(u16),
    /// Requests are read and never answered (the connection stays open).
    Hang,
}

struct Shared {
    citizens: Mutex<HashMap<String, Value>>,
    /// What `/relationships` and `/activities` answer (endpoint name → body).
    lists: Mutex<HashMap<&'static str, Value>>,
    /// Requests per list endpoint (`citizens`, `relationships`, `activities`).
    list_calls: Mutex<HashMap<&'static str, u64>>,
    behaviour: Mutex<Behaviour>,
    delay: Mutex<Duration>,
    ledger_calls: AtomicU64,
    health_calls: AtomicU64,
}

/// A running stand-in; stopped when dropped.
pub struct VeniceStandin {
    address: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl VeniceStandin {
    /// Serves `citizens` (username → ledger JSON) on a free loopback port.
    pub async fn start(citizens: HashMap<String, Value>) -> VeniceStandin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::serve_on(listener, citizens)
    }

    /// Serves `citizens` on `listener` (the binary binds the port it is told).
    pub fn serve_on(listener: TcpListener, citizens: HashMap<String, Value>) -> VeniceStandin {
        let address = listener.local_addr().expect("a bound listener");
        let shared = Arc::new(Shared {
            citizens: Mutex::new(citizens),
            lists: Mutex::new(HashMap::from([
                ("relationships", sample_relationships()),
                ("activities", sample_activities()),
            ])),
            list_calls: Mutex::default(),
            behaviour: Mutex::new(Behaviour::Normal),
            delay: Mutex::new(Duration::ZERO),
            ledger_calls: AtomicU64::new(0),
            health_calls: AtomicU64::new(0),
        });
        let server = Some(tokio::spawn(serve(listener, shared.clone())));
        VeniceStandin {
            address,
            shared,
            server,
        }
    }

    /// The base URL to give Cascade as `VENICE_API_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `/get-ledger` requests received so far, answered or not.
    pub fn ledger_calls(&self) -> u64 {
        self.shared.ledger_calls.load(Ordering::SeqCst)
    }

    pub fn health_calls(&self) -> u64 {
        self.shared.health_calls.load(Ordering::SeqCst)
    }

    /// Requests received so far by a list endpoint: `"citizens"`, `"relationships"` or
    /// `"activities"`.
    pub fn list_calls(&self, endpoint: &str) -> u64 {
        lock(&self.shared.list_calls)
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Replaces what `/relationships` (`endpoint = "relationships"`) or `/activities` answers.
    /// `/citizens` is always the `citizen` object of each ledger fixture ([`set_citizen`](Self::set_citizen)).
    pub fn set_list(&self, endpoint: &'static str, body: Value) {
        lock(&self.shared.lists).insert(endpoint, body);
    }

    /// Adds or replaces a citizen.
    pub fn set_citizen(&self, username: &str, ledger: Value) {
        lock(&self.shared.citizens).insert(username.to_string(), ledger);
    }

    /// Waits `delay` before each answer.
    pub fn slow_down(&self, delay: Duration) {
        *lock(&self.shared.delay) = delay;
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Every request gets `status` from now on.
    pub fn fail(&self, status: u16) {
        self.set_behaviour(Behaviour::Fail(status));
    }

    /// Requests are accepted and never answered from now on.
    pub fn hang(&self) {
        self.set_behaviour(Behaviour::Hang);
    }

    /// Back to answering from the fixtures, without delay.
    pub fn recover(&self) {
        self.set_behaviour(Behaviour::Normal);
        self.slow_down(Duration::ZERO);
    }

    /// Stops listening and closes every open connection: connections are refused.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Listens again on the same port, with the same fixtures and counters.
    pub async fn restart(&mut self) {
        self.stop();
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("rebind {}: {err}", self.address),
            }
        };
        self.server = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }
}

impl Drop for VeniceStandin {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The accept loop. Connections live in a `JoinSet` owned by this task, so aborting the task
/// (a stop) closes them all, hung ones included.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let router = Router::new()
        .route("/health", get(health))
        .route("/get-ledger", get(ledger))
        .route("/citizens", get(citizens))
        .route(
            "/relationships",
            get(|state: State<Arc<Shared>>| list(state, "relationships")),
        )
        .route(
            "/activities",
            get(|state: State<Arc<Shared>>| list(state, "activities")),
        )
        .with_state(shared);
    accept_loop(listener, router).await;
}

/// Serves `router` on `listener` until the task is aborted (the other stand-ins share it).
pub(crate) async fn accept_loop(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            async move {
                Ok::<_, Infallible>(
                    router
                        .oneshot(request.map(Body::new))
                        .await
                        .unwrap_or_else(|never| match never {}),
                )
            }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Applies the test's behaviour: `Some` is the answer to give instead of the normal one.
async fn behave(shared: &Shared) -> Option<Response> {
    let delay = *lock(&shared.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let behaviour = *lock(&shared.behaviour);
    match behaviour {
        Behaviour::Normal => None,
        Behaviour::Fail(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            Some(
                (
                    status,
                    axum::Json(json!({"success": false, "error": "stand-in failing"})),
                )
                    .into_response(),
            )
        }
        Behaviour::Hang => std::future::pending().await,
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    shared.health_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(answer) = behave(&shared).await {
        return answer;
    }
    axum::Json(json!({"status": "ok", "standin": true})).into_response()
}

async fn ledger(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    shared.ledger_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(answer) = behave(&shared).await {
        return answer;
    }
    let Some(username) = query.get("citizenUsername") else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"success": false, "error": "citizenUsername is required"})),
        )
            .into_response();
    };
    match lock(&shared.citizens).get(username) {
        Some(ledger) => axum::Json(ledger.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"success": false, "error": format!("Citizen {username} not found")})),
        )
            .into_response(),
    }
}

/// `GET /citizens`: every fixture ledger's `citizen`, by username.
async fn citizens(State(shared): State<Arc<Shared>>) -> Response {
    *lock(&shared.list_calls).entry("citizens").or_default() += 1;
    if let Some(answer) = behave(&shared).await {
        return answer;
    }
    let mut citizens: Vec<(String, Value)> = lock(&shared.citizens)
        .iter()
        .map(|(name, ledger)| {
            (
                name.clone(),
                ledger.get("citizen").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    citizens.sort_by(|a, b| a.0.cmp(&b.0));
    let citizens: Vec<Value> = citizens.into_iter().map(|(_, c)| c).collect();
    axum::Json(json!({"success": true, "citizens": citizens})).into_response()
}

/// `GET /relationships`, `GET /activities`: the fixture list as set.
async fn list(State(shared): State<Arc<Shared>>, endpoint: &'static str) -> Response {
    *lock(&shared.list_calls).entry(endpoint).or_default() += 1;
    if let Some(answer) = behave(&shared).await {
        return answer;
    }
    let body = lock(&shared.lists)
        .get(endpoint)
        .cloned()
        .unwrap_or_else(|| json!({"success": true, endpoint: []}));
    axum::Json(body).into_response()
}

/// Relationships between the sample citizens, as La Serenissima's `/api/relationships` lists
/// them (`citizen1` before `citizen2`, trust and strength 0-100).
pub fn sample_relationships() -> Value {
    json!({"success": true, "relationships": [
        {"citizen1": "Foscari_Banker", "citizen2": "Italia", "trustScore": 82.5, "strengthScore": 61.0},
        {"citizen1": "Foscari_Banker", "citizen2": "sea_trader", "trustScore": 55.0, "strengthScore": 30.0},
    ]})
}

/// Recent activities of the sample citizens, as `/api/activities` lists them.
pub fn sample_activities() -> Value {
    json!({"success": true, "activities": [
        {"citizen": "Italia", "type": "trade", "status": "processed"},
        {"citizen": "Foscari_Banker", "type": "trade", "status": "processed"},
        {"citizen": "Foscari_Banker", "type": "loan", "status": "created"},
        {"citizen": "sea_trader", "type": "fishing", "status": "in_progress"},
    ]})
}

/// A few citizens, for tests and `cascade-venice-standin` without `--ledger`.
pub fn sample_citizens() -> HashMap<String, Value> {
    let citizen = |username: &str, class: &str, ducats: f64| {
        json!({
            "success": true,
            "citizen": {
                "username": username,
                "socialClass": class,
                "ducats": ducats,
                "influence": 120,
            },
            "ledger": {
                "ownedLands": 2,
                "ownedBuildings": 3,
                "relationships": 7,
                "activeContracts": 4,
            },
        })
    };
    HashMap::from([
        ("Italia".to_string(), citizen("Italia", "Nobili", 250_000.0)),
        (
            "Foscari_Banker".to_string(),
            citizen("Foscari_Banker", "Cittadini", 90_500.5),
        ),
        (
            "sea_trader".to_string(),
            citizen("sea_trader", "Popolani", 1_200.0),
        ),
    ])
}
