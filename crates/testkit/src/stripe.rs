//! A stand-in for Stripe: a real HTTP server on a free loopback port that plays the parts of
//! Stripe's API Cascade uses (form-encoded `POST /v1/customers`, `POST /v1/checkout/sessions`,
//! `GET /v1/subscriptions/{id}`, `GET /v1/events` (newest first, `created[gte]`, `types[]`,
//! `limit`, `starting_after`, `has_more`), bearer key, `Idempotency-Key` honoured as Stripe does: a
//! replayed key returns the first answer and creates nothing), and the life of subscriptions
//! driven by the test (complete a checkout, change the price, fail or pay an invoice, cancel).
//!
//! Every change records the events Stripe would send, with Stripe's shape (`id`, `type`,
//! `created`, `data.object`) and a `created` clock that advances one second per event, or,
//! in burst mode ([`StripeStandin::bursts`]), one second per action (or per few actions),
//! its events sharing that second as Stripe's do. The
//! test then has them delivered, signed (`Stripe-Signature`, HMAC-SHA256 over `{t}.{body}`)
//! with the secret it gives, to the URL it gives: in order, or shuffled, duplicated, dropped
//! and delayed by a seeded [`Delivery`] plan. A delivery answered other than 2xx is retried,
//! as Stripe retries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The API key the stand-in accepts when none is set with [`StripeStandin::with_key`].
pub const TEST_KEY: &str = "sk_test_cascade_standin";

#[derive(Default)]
struct Books {
    next: u64,
    /// `created` of the next event: Unix seconds, one more per event.
    clock: i64,
    customers: HashMap<String, Value>,
    sessions: HashMap<String, Value>,
    subscriptions: HashMap<String, Value>,
    events: Vec<Value>,
    /// `Idempotency-Key` → the status and body first answered.
    idempotent: HashMap<String, (u16, Value)>,
    /// Requests per path, answered or not.
    calls: HashMap<String, u64>,
    delay: Duration,
    /// An outage: every API request is answered with this status.
    outage: Option<u16>,
    /// 0: `clock` advances one second per event. `n`: one second per `n` actions (a test's
    /// call that changes something), whose events all share it (see [`StripeStandin::bursts`]).
    actions_per_second: u32,
    actions: u32,
    /// Subscriptions whose `GET /v1/subscriptions/{id}` answers 500.
    broken: std::collections::HashSet<String>,
}

impl Books {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}_{:06}", self.next)
    }

    /// An action begins (see `actions_per_second`).
    fn step(&mut self) {
        if self.actions_per_second > 0 {
            if self.actions.is_multiple_of(self.actions_per_second) {
                self.clock += 1;
            }
            self.actions += 1;
        }
    }

    fn emit(&mut self, kind: &str, object: Value) -> Value {
        let id = self.id("evt");
        if self.actions_per_second == 0 {
            self.clock += 1;
        }
        let event = json!({
            "id": id,
            "object": "event",
            "type": kind,
            "created": self.clock,
            "livemode": false,
            "data": { "object": object },
        });
        self.events.push(event.clone());
        event
    }
}

struct Shared {
    key: String,
    books: Mutex<Books>,
}

/// A running stand-in; stopped when dropped.
pub struct StripeStandin {
    address: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    client: reqwest::Client,
}

/// How [`StripeStandin::deliver`] sends a batch of events: seeded, so a failing run can be
/// replayed.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub seed: u64,
    /// Deliver in a random order instead of the order of the events.
    pub shuffle: bool,
    /// Fraction of events delivered a second time (at another random place when shuffled).
    pub duplicate: f64,
    /// Fraction of events never delivered.
    pub drop: f64,
    /// Wait between two deliveries.
    pub delay: Duration,
    /// Concurrent deliveries (1: one after the other).
    pub concurrency: usize,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            seed: 1,
            shuffle: false,
            duplicate: 0.0,
            drop: 0.0,
            delay: Duration::ZERO,
            concurrency: 1,
        }
    }
}

/// What a batch delivery did.
#[derive(Debug, Default, Clone)]
pub struct Delivered {
    /// HTTP attempts made (retries included).
    pub attempts: usize,
    /// Ids of the events never delivered (the plan dropped them, or every retry failed).
    pub dropped: Vec<String>,
    /// Statuses of every attempt, in no particular order.
    pub statuses: Vec<u16>,
}

impl StripeStandin {
    /// Serves on a free loopback port, accepting [`TEST_KEY`].
    pub async fn start() -> StripeStandin {
        Self::with_key(TEST_KEY).await
    }

    pub async fn with_key(key: &str) -> StripeStandin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("a bound listener");
        let books = Books {
            clock: unix_now(),
            ..Books::default()
        };
        let shared = Arc::new(Shared {
            key: key.to_string(),
            books: Mutex::new(books),
        });
        let router = Router::new()
            .route("/v1/customers", post(create_customer))
            .route("/v1/checkout/sessions", post(create_session))
            .route("/v1/subscriptions/{id}", get(subscription))
            .route("/v1/billing_portal/sessions", post(create_portal_session))
            .route("/v1/events", get(list_events))
            .with_state(shared.clone());
        let server = Some(tokio::spawn(crate::venice::accept_loop(listener, router)));
        // Plain HTTP to loopback, but reqwest's TLS layer wants a provider all the same.
        let _ = rustls::crypto::ring::default_provider().install_default();
        StripeStandin {
            address,
            shared,
            server,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// The base URL to give Cascade as `STRIPE_API_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        lock(&self.shared.books)
    }

    /// Requests received on `path` (e.g. `/v1/customers`), answered or not.
    pub fn calls(&self, path: &str) -> u64 {
        self.books().calls.get(path).copied().unwrap_or(0)
    }

    /// Customers created (a replayed idempotency key creates none).
    pub fn customers(&self) -> usize {
        self.books().customers.len()
    }

    /// Checkout sessions created.
    pub fn sessions(&self) -> Vec<Value> {
        self.books().sessions.values().cloned().collect()
    }

    /// Waits `delay` before answering each API request, after doing its work (to make a
    /// client time out on a call that succeeded).
    pub fn slow_down(&self, delay: Duration) {
        self.books().delay = delay;
    }

    /// Answers every API request with `status` (a Stripe error body) until `None`: an
    /// outage at Stripe.
    pub fn outage(&self, status: Option<u16>) {
        self.books().outage = status;
    }

    /// Bursts, as Stripe sends them: from now on the events of `actions` consecutive actions
    /// (1: of each action alone, as Stripe's `customer.subscription.created` and
    /// `invoice.paid` of one signup, or an invoice and the status change it causes) share one
    /// `created` second. 0: back to one second per event.
    pub fn bursts(&self, actions: u32) {
        let mut books = self.books();
        books.actions_per_second = actions;
        books.actions = 0;
    }

    fn step(&self) {
        self.books().step();
    }

    /// `GET /v1/subscriptions/{id}` answers 500 (`broken`) or as usual for this one
    /// subscription.
    pub fn break_subscription(&self, id: &str, broken: bool) {
        let mut books = self.books();
        if broken {
            books.broken.insert(id.to_string());
        } else {
            books.broken.remove(id);
        }
    }

    /// Records an event of the test's own making (`kind`, `object`) as the next action, as if
    /// Stripe had sent it: it is listed by `GET /v1/events`. The event.
    pub fn record(&self, kind: &str, object: Value) -> Value {
        let mut books = self.books();
        books.step();
        books.emit(kind, object)
    }

    /// Every event recorded so far, in order.
    pub fn events(&self) -> Vec<Value> {
        self.books().events.clone()
    }

    /// The subscription `id` as Stripe has it now.
    pub fn subscription(&self, id: &str) -> Option<Value> {
        self.books().subscriptions.get(id).cloned()
    }

    /// A subscription to `price` for `customer` (created if `None`), owned by the Cascade
    /// account `user_id` (its `metadata.cascade_user_id`, as Cascade's checkout sets):
    /// `customer.subscription.created` (active) and `invoice.paid`. Its id.
    pub fn create_subscription(&self, customer: Option<&str>, user_id: i64, price: &str) -> String {
        let mut books = self.books();
        books.step();
        let customer = match customer {
            Some(customer) => customer.to_string(),
            None => {
                let id = books.id("cus");
                books
                    .customers
                    .insert(id.clone(), json!({"id": id, "object": "customer"}));
                id
            }
        };
        new_subscription(&mut books, &customer, user_id, price)
    }

    /// Completes checkout session `session`: its subscription starts (active) and Stripe
    /// sends `checkout.session.completed`, `customer.subscription.created`, `invoice.paid`.
    pub fn complete_checkout(&self, session: &str) -> Option<String> {
        let mut books = self.books();
        let mut object = books.sessions.get(session)?.clone();
        books.step();
        let customer = object["customer"].as_str()?.to_string();
        let price = object["line_items"][0]["price"].as_str()?.to_string();
        let user_id = object["client_reference_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let subscription = new_subscription(&mut books, &customer, user_id, &price);
        object["status"] = json!("complete");
        object["subscription"] = json!(subscription);
        books.sessions.insert(session.to_string(), object.clone());
        // Stripe sends the session's event first; the subscription's were recorded just before.
        let completed = books.emit("checkout.session.completed", object);
        let at = books.events.len() - 1;
        books.events.remove(at);
        books.events.insert(at - 2, completed);
        Some(subscription)
    }

    /// Moves subscription `id` to `price` (`customer.subscription.updated`).
    pub fn change_price(&self, id: &str, price: &str) {
        self.step();
        self.update(id, |sub| {
            sub["items"]["data"][0]["price"] = json!({"id": price})
        });
    }

    /// A renewal payment fails: `invoice.payment_failed`, then the subscription `past_due`.
    pub fn fail_payment(&self, id: &str) {
        self.step();
        self.invoice(id, "invoice.payment_failed", "open");
        self.update(id, |sub| sub["status"] = json!("past_due"));
    }

    /// A payment succeeds: `invoice.paid`, then the subscription `active`.
    pub fn pay(&self, id: &str) {
        self.step();
        self.invoice(id, "invoice.paid", "paid");
        self.update(id, |sub| sub["status"] = json!("active"));
    }

    /// Retries exhausted: the subscription becomes `unpaid`.
    pub fn mark_unpaid(&self, id: &str) {
        self.step();
        self.update(id, |sub| sub["status"] = json!("unpaid"));
    }

    /// Cancels now: `customer.subscription.deleted`.
    pub fn cancel(&self, id: &str) {
        let mut books = self.books();
        books.step();
        let Some(sub) = books.subscriptions.get_mut(id) else {
            return;
        };
        sub["status"] = json!("canceled");
        let object = sub.clone();
        books.emit("customer.subscription.deleted", object);
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut Value)) {
        let mut books = self.books();
        let Some(sub) = books.subscriptions.get_mut(id) else {
            return;
        };
        change(sub);
        let object = sub.clone();
        books.emit("customer.subscription.updated", object);
    }

    fn invoice(&self, subscription: &str, kind: &str, status: &str) {
        let mut books = self.books();
        let Some(customer) = books
            .subscriptions
            .get(subscription)
            .map(|s| s["customer"].clone())
        else {
            return;
        };
        let id = books.id("in");
        books.emit(
            kind,
            json!({"id": id, "object": "invoice", "customer": customer,
                   "subscription": subscription, "status": status}),
        );
    }

    /// Delivers `events` to `url` signed with `secret`, as `plan` says; an attempt answered
    /// other than 2xx (or not at all) is retried up to 5 times, 50 ms apart.
    pub async fn deliver(
        &self,
        url: &str,
        secret: &str,
        events: &[Value],
        plan: Delivery,
    ) -> Delivered {
        let mut rng = fastrand::Rng::with_seed(plan.seed);
        let mut queue: Vec<&Value> = Vec::new();
        let mut dropped = Vec::new();
        for event in events {
            if rng.f64() < plan.drop {
                dropped.push(event["id"].as_str().unwrap_or_default().to_string());
                continue;
            }
            queue.push(event);
            if rng.f64() < plan.duplicate {
                queue.push(event);
            }
        }
        if plan.shuffle {
            rng.shuffle(&mut queue);
        }
        let mut result = Delivered {
            dropped,
            ..Delivered::default()
        };
        for chunk in queue.chunks(plan.concurrency.max(1)) {
            let sends = chunk
                .iter()
                .map(|event| self.send_with_retries(url, secret, event));
            for (attempts, last, delivered) in futures_util::future::join_all(sends).await {
                result.attempts += attempts.len();
                result.statuses.extend(attempts);
                if !delivered {
                    result.dropped.push(last);
                }
            }
            if !plan.delay.is_zero() {
                tokio::time::sleep(plan.delay).await;
            }
        }
        result
    }

    /// Every event recorded so far, in order, once each.
    pub async fn deliver_all(&self, url: &str, secret: &str) -> Delivered {
        let events = self.events();
        self.deliver(url, secret, &events, Delivery::default())
            .await
    }

    async fn send_with_retries(
        &self,
        url: &str,
        secret: &str,
        event: &Value,
    ) -> (Vec<u16>, String, bool) {
        let body = event.to_string();
        let mut statuses = Vec::new();
        for attempt in 0..6 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let status = self.post_signed(url, secret, unix_now(), &body).await;
            statuses.push(status);
            if (200..300).contains(&status) {
                return (statuses, String::new(), true);
            }
        }
        let id = event["id"].as_str().unwrap_or_default().to_string();
        (statuses, id, false)
    }

    /// One delivery of `body` signed with `secret` at `timestamp`: the status (0 when the
    /// request failed).
    pub async fn post_signed(&self, url: &str, secret: &str, timestamp: i64, body: &str) -> u16 {
        let header = signature_header(&[secret], timestamp, body.as_bytes());
        self.client
            .post(url)
            .header("content-type", "application/json")
            .header("stripe-signature", header)
            .body(body.to_string())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }
}

impl Drop for StripeStandin {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn new_subscription(books: &mut Books, customer: &str, user_id: i64, price: &str) -> String {
    let id = books.id("sub");
    let start = books.clock;
    let end = start + 30 * 86_400;
    let sub = json!({
        "id": id,
        "object": "subscription",
        "customer": customer,
        "status": "active",
        "metadata": { "cascade_user_id": user_id.to_string() },
        "items": { "data": [ {
            "price": { "id": price },
            "current_period_start": start,
            "current_period_end": end,
        } ] },
        "created": start,
    });
    books.subscriptions.insert(id.clone(), sub.clone());
    books.emit("customer.subscription.created", sub);
    let invoice = books.id("in");
    books.emit(
        "invoice.paid",
        json!({"id": invoice, "object": "invoice", "customer": customer,
               "subscription": id, "status": "paid"}),
    );
    id
}

/// A `Stripe-Signature` value for `payload` at `timestamp`, one `v1` per secret (Stripe signs
/// with the old and the new secret during a rotation).
pub fn signature_header(secrets: &[&str], timestamp: i64, payload: &[u8]) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(payload);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        header.push_str(&format!(",v1={hex}"));
    }
    header
}

/// What Cascade's billing wrote for account `user_id`, read from its database: the account's
/// tier, its subscriptions (`id:status:tier`, sorted), and the number of Stripe events
/// recorded (for every account).
pub async fn billing_state(
    db: &tokio_postgres::Client,
    user_id: i64,
) -> (String, Vec<String>, i64) {
    let tier: String = db
        .query_one(
            "SELECT subscription_tier FROM cascade_users WHERE id = $1",
            &[&user_id],
        )
        .await
        .expect("the account")
        .get(0);
    let subs = db
        .query(
            "SELECT format('%s:%s:%s', stripe_subscription_id, status, tier) \
             FROM cascade_subscriptions WHERE user_id = $1 ORDER BY 1",
            &[&user_id],
        )
        .await
        .expect("its subscriptions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let events: i64 = db
        .query_one("SELECT count(*) FROM cascade_stripe_events", &[])
        .await
        .expect("the events recorded")
        .get(0);
    (tier, subs, events)
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks the bearer key, counts the call and replays an idempotent answer:
/// `Err` is the answer to give instead of doing the work.
async fn admit(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
) -> Result<Option<String>, Response> {
    *lock(&shared.books)
        .calls
        .entry(path.to_string())
        .or_default() += 1;
    if let Some(status) = lock(&shared.books).outage {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Err(stripe_error(
            status,
            "Stripe is having an outage (stand-in)",
        ));
    }
    let bearer = format!("Bearer {}", shared.key);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
        return Err(stripe_error(
            StatusCode::UNAUTHORIZED,
            "Invalid API Key provided",
        ));
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("{path} {k}"));
    if let Some(key) = &key
        && let Some((status, body)) = lock(&shared.books).idempotent.get(key).cloned()
    {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        return Err((status, axum::Json(body)).into_response());
    }
    Ok(key)
}

/// Keeps the answer under the idempotency key, then answers after the configured delay: as at
/// Stripe, the work is done even when the client gave up waiting.
async fn remember(shared: &Shared, key: Option<String>, body: Value) -> Response {
    let delay = {
        let mut books = lock(&shared.books);
        if let Some(key) = key {
            books.idempotent.insert(key, (200, body.clone()));
        }
        books.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    axum::Json(body).into_response()
}

fn stripe_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"type": "invalid_request_error", "message": message}})),
    )
        .into_response()
}

async fn create_customer(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match admit(&shared, "/v1/customers", &headers).await {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let form = parse_form(&body);
    let customer = {
        let mut books = lock(&shared.books);
        let id = books.id("cus");
        let customer = json!({
            "id": id,
            "object": "customer",
            "email": form.get("email"),
            "metadata": { "cascade_user_id": form.get("metadata[cascade_user_id]") },
        });
        books.customers.insert(id, customer.clone());
        customer
    };
    remember(&shared, key, customer).await
}

async fn create_session(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match admit(&shared, "/v1/checkout/sessions", &headers).await {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let form = parse_form(&body);
    let (Some(customer), Some(price)) = (form.get("customer"), form.get("line_items[0][price]"))
    else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "customer and line_items[0][price] are required",
        );
    };
    if form.get("mode").map(String::as_str) != Some("subscription") {
        return stripe_error(StatusCode::BAD_REQUEST, "mode must be subscription");
    }
    let session = {
        let mut books = lock(&shared.books);
        if !books.customers.contains_key(customer) {
            return stripe_error(StatusCode::BAD_REQUEST, "No such customer");
        }
        let id = books.id("cs_test");
        let session = json!({
            "id": id,
            "object": "checkout.session",
            "mode": "subscription",
            "status": "open",
            "customer": customer,
            "client_reference_id": form.get("client_reference_id"),
            "success_url": form.get("success_url"),
            "cancel_url": form.get("cancel_url"),
            "line_items": [ { "price": price } ],
            "subscription": null,
            "url": format!("https://checkout.stripe.test/c/pay/{id}"),
        });
        books.sessions.insert(id, session.clone());
        session
    };
    remember(&shared, key, session).await
}

async fn create_portal_session(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match admit(&shared, "/v1/billing_portal/sessions", &headers).await {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let form = parse_form(&body);
    let session = {
        let mut books = lock(&shared.books);
        let Some(customer) = form
            .get("customer")
            .filter(|c| books.customers.contains_key(*c))
        else {
            return stripe_error(StatusCode::BAD_REQUEST, "No such customer");
        };
        let id = books.id("bps");
        json!({
            "id": id,
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": form.get("return_url"),
            "url": format!("https://billing.stripe.test/p/session/{id}"),
        })
    };
    remember(&shared, key, session).await
}

async fn subscription(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(answer) = admit(&shared, "/v1/subscriptions", &headers).await {
        return answer;
    }
    let books = lock(&shared.books);
    if books.broken.contains(&id) {
        return stripe_error(StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong");
    }
    match books.subscriptions.get(&id) {
        Some(sub) => axum::Json(sub.clone()).into_response(),
        None => stripe_error(StatusCode::NOT_FOUND, "No such subscription"),
    }
}

/// `GET /v1/events`: the recorded events, newest first as Stripe lists them, filtered by
/// `created[gte]` and `types[]`, `limit` (1 to 100, default 10) after `starting_after`.
async fn list_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if let Err(answer) = admit(&shared, "/v1/events", &headers).await {
        return answer;
    }
    let params: Vec<(String, String)> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect();
    let one = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let since: i64 = one("created[gte]")
        .and_then(|v| v.parse().ok())
        .unwrap_or(i64::MIN);
    let types: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    let limit = match one("limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(limit @ 1..=100)) => limit,
        Some(_) => return stripe_error(StatusCode::BAD_REQUEST, "limit must be 1 to 100"),
    };
    let books = lock(&shared.books);
    let mut listed = books.events.iter().rev().filter(|event| {
        event["created"].as_i64().unwrap_or(0) >= since
            && (types.is_empty() || types.iter().any(|t| event["type"] == *t))
    });
    if let Some(after) = one("starting_after")
        && !listed.any(|event| event["id"] == after)
    {
        return stripe_error(StatusCode::BAD_REQUEST, "No such event");
    }
    let data: Vec<Value> = listed.by_ref().take(limit).cloned().collect();
    let has_more = listed.next().is_some();
    axum::Json(json!({"object": "list", "url": "/v1/events", "data": data, "has_more": has_more}))
        .into_response()
}

/// `application/x-www-form-urlencoded` as Stripe reads it (`a[b][0]=c` keys kept verbatim).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
