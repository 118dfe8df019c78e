//! Real-time under test: PostgreSQL, Redis and instances of the real application sharing
//! them, and a WebSocket client (yawc's, the server's own library) that speaks protocol v1.

use std::collections::VecDeque;
use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::{PgServer, RedisCluster, RedisServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use yawc::close::CloseCode;
use yawc::{Frame, HttpRequestBuilder, OpCode, TcpWebSocket, WebSocket};

/// Fields drop in declaration order: the servers stop before what they use.
#[allow(dead_code)]
pub struct World {
    pub servers: Vec<TestApp>,
    pub database: String,
    pub pg: PgServer,
    pub redis: Shared,
}

/// What the instances share as Redis.
pub enum Shared {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Shared {
    /// The one Redis server (not in a world on a cluster).
    pub fn server(&mut self) -> &mut RedisServer {
        match self {
            Shared::One(server) => server,
            Shared::Cluster(_) => panic!("this world runs on a Redis Cluster"),
        }
    }
}

const JWT_SECRET: &str = "realtime-tests-secret-realtime-tests-secret";
pub const ADMIN_TOKEN: &str = "realtime-tests-admin-token-0123456789";

/// An account: its id and access token.
#[derive(Clone)]
pub struct User {
    pub id: i64,
    pub token: String,
    pub refresh_token: String,
}

impl World {
    pub async fn start(instances: usize, extra: &[(&str, String)]) -> World {
        let redis = RedisServer::start().await;
        let env = [("REDIS_URL", redis.url())];
        World::start_on(Shared::One(redis), &env, instances, extra).await
    }

    /// Instances on a Redis Cluster of 3 masters and 3 replicas.
    pub async fn start_on_cluster(instances: usize) -> World {
        let cluster = RedisCluster::start(3, 1).await;
        let env = [("REDIS_CLUSTER_URLS", cluster.urls().join(","))];
        World::start_on(Shared::Cluster(cluster), &env, instances, &[]).await
    }

    async fn start_on(
        redis: Shared,
        redis_env: &[(&'static str, String)],
        instances: usize,
        extra: &[(&str, String)],
    ) -> World {
        let pg = PgServer::start().await;
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        let mut env = vec![
            ("DATABASE_URL", url),
            ("JWT_SECRET", JWT_SECRET.to_string()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("RATE_LIMIT_API", "off".to_string()),
            ("RATE_LIMIT_AUTH", "off".to_string()),
        ];
        env.extend(redis_env.iter().cloned());
        env.extend(extra.iter().cloned());
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(TestApp::start(&env).await);
        }
        for server in &servers {
            assert!(server.realtime_listening(Duration::from_secs(10)).await);
        }
        World {
            servers,
            database,
            pg,
            redis,
        }
    }

    pub fn base(&self, n: usize) -> &str {
        &self.servers[n % self.servers.len()].base
    }

    pub async fn register(&self, name: &str) -> User {
        let response = reqwest::Client::new()
            .post(format!("{}/auth/register", self.base(0)))
            .json(&json!({"username": name, "password": "correct horse battery"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        User {
            id: body["user"]["id"].as_i64().unwrap(),
            token: body["access_token"].as_str().unwrap().to_string(),
            refresh_token: body["refresh_token"].as_str().unwrap().to_string(),
        }
    }

    /// Gives `user` a paid tier (billing is another module's; set in SQL as its tests do).
    pub async fn set_tier(&self, user: &User, tier: &str) {
        let n = self
            .pg
            .client(&self.database)
            .await
            .execute(
                "UPDATE cascade_users SET subscription_tier = $2 WHERE id = $1",
                &[&user.id, &tier],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    /// An authenticated JSON request to instance 0; the status and body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        user: &User,
        body: Value,
    ) -> (u16, Value) {
        self.request(method, path, Some(&user.token), body).await
    }

    /// A JSON request to instance 0, with a bearer token when given; the status and body.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base(0)))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A client on instance `n`, authenticated by header when `token` is given; past the hello.
    pub async fn connect(&self, n: usize, token: Option<&str>) -> Client {
        Client::connect(self.base(n), token)
            .await
            .expect("WebSocket upgrade")
    }

    /// `POST /auth/logout` on instance `n` with `user`'s access token; the status.
    pub async fn logout(&self, n: usize, user: &User) -> u16 {
        reqwest::Client::new()
            .post(format!("{}/auth/logout", self.base(n)))
            .bearer_auth(&user.token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// An unauthenticated JSON `POST` to instance 0; the status and body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, None, body).await
    }

    /// Publishes `payload` on `channel` from instance 0 until Redis takes it (it delivers
    /// locally while Redis does not answer yet); its (epoch, offset).
    pub async fn publish_durable(&self, channel: &'static str, payload: Value) -> (String, u64) {
        let rt = self.servers[0].realtime.clone();
        self.servers[0]
            .run(async move {
                for _ in 0..500 {
                    match rt.publish(channel, payload.clone()).await.unwrap() {
                        cascade_realtime::Published::Durable(at) => {
                            return (at.epoch.to_string(), at.offset);
                        }
                        cascade_realtime::Published::LocalOnly => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                    }
                }
                panic!("Redis never took the publish");
            })
            .await
    }

    /// `cascade_ws_*` and other series of instance `n`'s `/metrics`, summed over labels that
    /// contain `labels`.
    pub async fn metric(&self, n: usize, name: &str, labels: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base(n)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// What the client read.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Json(Value),
    Close(Option<u16>),
}

pub struct Client {
    ws: TcpWebSocket,
    pub hello: Value,
    next_id: u64,
    /// Messages read while waiting for an answer, or the rest of a batch, handed out next.
    pending: VecDeque<Value>,
    /// Each `batch` frame read: how many messages it held and its size in bytes (its
    /// messages are handed out one by one, as if they had come alone).
    pub batches: Vec<(usize, usize)>,
}

/// How long a test waits for one frame.
pub const WAIT: Duration = Duration::from_secs(10);

impl Client {
    /// Connects; an `Err` carries the HTTP status of a refused upgrade.
    pub async fn connect(base: &str, token: Option<&str>) -> Result<Client, String> {
        Client::connect_to(base, "/ws", token).await
    }

    /// Connects asking for batches (`/ws?batch=1`).
    pub async fn connect_batched(base: &str, token: Option<&str>) -> Result<Client, String> {
        Client::connect_to(base, "/ws?batch=1", token).await
    }

    /// Connects to `path` (`/ws` with a query).
    pub async fn connect_to(base: &str, path: &str, token: Option<&str>) -> Result<Client, String> {
        let url = format!("{}{path}", base.replacen("http", "ws", 1));
        let mut request = HttpRequestBuilder::new();
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let ws = WebSocket::connect(url.parse().unwrap())
            .with_request(request)
            .with_options(yawc::Options::default().with_max_payload_read(64 << 20))
            .await
            .map_err(|e| format!("{e:?}"))?;
        let mut client = Client {
            ws,
            hello: Value::Null,
            next_id: 0,
            pending: VecDeque::new(),
            batches: Vec::new(),
        };
        match client.next().await {
            Some(Incoming::Json(hello)) if hello["type"] == "hello" => client.hello = hello,
            other => return Err(format!("no hello: {other:?}")),
        }
        Ok(client)
    }

    pub async fn send(&mut self, message: Value) {
        self.ws
            .send(Frame::text(message.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_frame(&mut self, frame: Frame) {
        self.ws.send(frame).await.unwrap();
    }

    /// The next JSON message or close (pings and pongs skipped); `None` when nothing came
    /// within [`WAIT`] or the stream ended without a close frame.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.next_within(WAIT).await
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Incoming> {
        if let Some(value) = self.pending.pop_front() {
            return Some(Incoming::Json(value));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match frame.opcode() {
                OpCode::Text => {
                    let mut value: Value = serde_json::from_slice(frame.payload())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text: {e}"));
                    if value["type"] == "batch" {
                        let Value::Array(messages) = value["messages"].take() else {
                            panic!("a batch without messages: {value}");
                        };
                        assert!(messages.len() >= 2, "a batch of {}", messages.len());
                        self.batches.push((messages.len(), frame.payload().len()));
                        self.pending.extend(messages);
                        return self.pending.pop_front().map(Incoming::Json);
                    }
                    return Some(Incoming::Json(value));
                }
                OpCode::Close => {
                    return Some(Incoming::Close(frame.close_code().map(u16::from)));
                }
                OpCode::Binary => panic!("the server sent a binary frame"),
                _ => continue,
            }
        }
    }

    /// What arrives until nothing more comes for a second.
    pub async fn drain(&mut self) -> Vec<Value> {
        let mut seen = Vec::new();
        while let Some(Incoming::Json(value)) = self.next_within(Duration::from_secs(1)).await {
            seen.push(value);
        }
        seen
    }

    /// The next JSON message; panics on a close or silence.
    pub async fn json(&mut self) -> Value {
        match self.next().await {
            Some(Incoming::Json(value)) => value,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads until the connection closes; the close code (None: ended without a close frame).
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Some(Incoming::Json(_)) => continue,
                Some(Incoming::Close(code)) => return code,
                None => return None,
            }
        }
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Sends `message` with a fresh id and returns the answer to it (`ack` or `error`), and
    /// the messages read meanwhile (which [`next`](Self::next) hands out too).
    pub async fn request(&mut self, mut message: Value) -> (Value, Vec<Value>) {
        let id = self.id();
        message["id"] = json!(id);
        self.send(message).await;
        let mut other = Vec::new();
        let mut held = std::mem::take(&mut self.pending);
        loop {
            let value = self.json().await;
            if value["id"] == json!(id) {
                held.extend(other.iter().cloned());
                held.append(&mut self.pending);
                self.pending = held;
                return (value, other);
            }
            other.push(value);
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        let (answer, _) = self
            .request(json!({"type": "subscribe", "channel": channel}))
            .await;
        answer
    }

    pub async fn publish(&mut self, channel: &str, payload: Value) -> Value {
        let (answer, _) = self
            .request(json!({"type": "publish", "channel": channel, "payload": payload}))
            .await;
        answer
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.send(Frame::close(CloseCode::Normal, "bye")).await;
    }
}
