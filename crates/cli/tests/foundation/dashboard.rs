//! `/dashboard` in a real headless Chromium against a server with traffic: the numbers it
//! shows are those of `/metrics`, the seed-003 thresholds are flagged, it loads nothing from
//! elsewhere, and a screenshot is kept as a test artifact.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cascade_testkit::{PgServer, RedisServer, temp_dir};

use crate::common::{ADMIN_TOKEN, Served, http};
use crate::identity::call;
use crate::metrics::{get_n, register, serve_with_redis};
use crate::prometheus::scrape;

/// The dashboard's own polling is not application traffic (as in the page).
const OWN_ROUTES: [&str; 3] = ["/metrics", "/metrics/live", "/dashboard"];

#[tokio::test]
async fn dashboard_in_headless_chromium_shows_the_numbers_of_metrics() {
    let chromium = find_chromium().unwrap_or_else(|| {
        panic!(
            "no chromium on PATH: the dashboard test needs a real browser; install Debian's \
             `chromium` package (scripts/test does: apt-get install chromium)"
        )
    });
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let served = serve_with_redis(&pg, &redis).await;

    // Known traffic: one busy session (1 miss, 3 hits) and four sessions read once (4 misses),
    // so the `sessions` namespace sits at 3/8, below seed 003's 70 %.
    let busy = register(&served, "busy-reader").await;
    get_n(&served, "/me", Some(&busy), 4, 200).await;
    for n in 0..4 {
        let token = register(&served, &format!("occasional-{n}")).await;
        get_n(&served, "/me", Some(&token), 1, 200).await;
    }
    get_n(&served, "/health", None, 9, 200).await;

    // The page is self-contained: no absolute URL anywhere, and a policy that forbids loading.
    let response = http()
        .get(format!("{}/dashboard", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = response.text().await.unwrap();
    for external in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "@import",
        "url(",
    ] {
        assert!(!html.contains(external), "the page references {external}");
    }

    let url = format!("{}/dashboard", served.base);
    let dom = run_chromium(&chromium, &["--dump-dom", &url]);
    let metrics = scrape(&served).await;
    let dom = Dom(dom);

    assert!(
        dom.value("scrapes", None).0.parse::<u32>().unwrap() >= 2,
        "the page refreshes itself"
    );
    assert_eq!(
        dom.value("ops", None).1,
        Some(0.0),
        "no traffic between its refreshes"
    );

    // Cumulative counts, exactly as /metrics has them.
    for (method, route, status) in [
        ("GET", "/health", "200"),
        ("GET", "/me", "200"),
        ("POST", "/auth/register", "201"),
    ] {
        let key = format!("{method} {route} {status}");
        let labels = [("method", method), ("route", route), ("status", status)];
        assert_eq!(
            dom.value("requests", Some(&key)).1,
            Some(metrics.one("cascade_http_requests_total", &labels)),
            "{key}"
        );
    }
    let app_requests: f64 = metrics
        .matching("cascade_http_requests_total", &[])
        .filter(|s| !OWN_ROUTES.contains(&s.labels["route"].as_str()))
        .map(|s| s.value)
        .sum();
    assert_eq!(dom.value("requests-total", None).1, Some(app_requests));

    // Latency quantiles since start, over application routes, as Prometheus computes them.
    for (q, key) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
        let expected = metrics
            .quantile_where(q, "cascade_http_request_duration_seconds", |s| {
                !OWN_ROUTES.contains(&s.labels["route"].as_str())
            })
            .unwrap();
        let shown = dom.value(key, None).1.unwrap();
        assert!(
            (shown - expected).abs() <= 1e-12 * expected.max(1.0),
            "{key}: {shown} vs {expected}"
        );
        // Seed 003's alert is on p95 only: p50 and p99 are shown, never flagged.
        assert_eq!(
            dom.has_warning(key, None),
            key == "p95" && expected > 0.5,
            "{key} flag"
        );
    }

    // The pool.
    assert_eq!(
        dom.value("pool-max", None).1,
        Some(metrics.one("cascade_pg_pool_max_size", &[]))
    );
    assert_eq!(dom.value("pool-max", None).0, "7");
    let utilisation = dom.value("pool-utilisation", None).1.unwrap();
    assert_eq!(dom.has_warning("pool-utilisation", None), utilisation > 0.8);

    // Cache hit rates, and the < 70 % warning.
    let sessions = [("namespace", "sessions")];
    let ratio = metrics.one("cascade_cache_hit_ratio", &sessions);
    assert!(
        ratio < 0.7,
        "the traffic above leaves `sessions` cold: {ratio}"
    );
    assert_eq!(
        dom.value("cache-hit-ratio", Some("sessions")).1,
        Some(ratio)
    );
    assert!(
        dom.has_warning("cache-hit-ratio", Some("sessions")),
        "hit ratio below 70 % is flagged"
    );
    assert!(
        dom.0.contains("cache hit ratio of sessions"),
        "and listed among the alerts"
    );
    for (field, tier) in [("cache-near-hits", "near"), ("cache-shared-hits", "shared")] {
        let labels = [("namespace", "sessions"), ("tier", tier)];
        assert_eq!(
            dom.value(field, Some("sessions")).1,
            Some(metrics.one("cascade_cache_hits_total", &labels))
        );
    }
    assert_eq!(
        dom.value("cache-misses", Some("sessions")).1,
        Some(metrics.one("cascade_cache_misses_total", &sessions))
    );

    // Health, Redis memory, tables.
    assert_eq!(dom.value("pg-status", None).0, "up");
    assert_eq!(dom.value("redis-status", None).0, "up");
    assert_eq!(dom.value("breaker", None).0, "closed");
    let memory = dom.value("redis-memory-ratio", None).1.unwrap();
    assert!(memory > 0.0 && memory < 1.0, "{memory}");
    assert_eq!(dom.has_warning("redis-memory-ratio", None), memory > 0.8);
    // The in-process tier holds the sessions read above, well within its 64 MiB bound: never
    // flagged, as it evicts at its bound.
    let filled = dom.value("memory-ratio", None).1.unwrap();
    assert!(filled > 0.0 && filled < 0.01, "{filled}");
    assert!(!dom.has_warning("memory-ratio", None));
    let detail = dom.value("memory-detail", None).0;
    assert!(
        detail.contains(" entries, ") && detail.contains("of 64.0 MiB"),
        "{detail}"
    );
    assert_eq!(
        metrics.one("cascade_cache_memory_capacity_bytes", &[]),
        64.0 * 1024.0 * 1024.0
    );
    let shown_tables: BTreeSet<String> = dom.keys("table-name");
    let metric_tables: BTreeSet<String> = metrics
        .matching("cascade_pg_table_size_bytes", &[])
        .map(|s| s.labels["table"].clone())
        .collect();
    assert!(shown_tables.contains("auth_sessions"), "{shown_tables:?}");
    assert_eq!(shown_tables, metric_tables);

    // A picture for humans, kept as an artifact.
    let artifacts = artifacts_dir();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &chromium,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1800",
            &url,
        ],
    );
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "no screenshot at {}", png.display());
    println!("dashboard screenshot: {}", png.display());
}

#[tokio::test]
async fn dashboard_flags_a_busy_pool_slow_requests_and_a_full_redis() {
    let chromium = find_chromium().expect("chromium (scripts/test installs it)");
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let database_url = pg.fresh_database().await;
    let served = Served::start(&[
        ("DATABASE_URL", database_url.clone()),
        ("REDIS_URL", redis.url()),
        ("PG_POOL_MIN", "2".into()),
        ("PG_POOL_MAX", "2".into()),
        ("PG_ACQUIRE_TIMEOUT", "500ms".into()),
        ("PG_STATEMENT_TIMEOUT", "60s".into()),
    ])
    .await;
    let base = served.base.clone();
    let _ = http(); // installs the TLS provider reqwest needs to build a client
    // No overall timeout: these reads wait as long as the test holds the lock.
    let patient = reqwest::Client::new();
    let read = |version: String| {
        let (client, url) = (patient.clone(), format!("{base}/listings/{version}"));
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    // A lock taken from outside makes catalog reads wait inside PostgreSQL, each holding a
    // pool connection: the pool is busy (and the server's own probes cannot get a connection).
    let locker = pg.client(database_url.rsplit('/').next().unwrap()).await;
    let lock = || async {
        locker
            .batch_execute("BEGIN; LOCK TABLE assets IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
    };
    // Until `n` backends of another session wait for the lock (bounded).
    let waiting = |n: i64| {
        let locker = &locker;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let row = locker
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                         AND datname = current_database()",
                        &[],
                    )
                    .await
                    .unwrap();
                if row.get::<_, i64>(0) >= n {
                    return;
                }
                assert!(Instant::now() < deadline, "reads never reached the lock");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Slow requests: two reads wait at least a second for the lock.
    lock().await;
    let slow: Vec<_> = (0..2).map(|i| read(format!("slow-{i}"))).collect();
    waiting(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    locker.batch_execute("COMMIT").await.unwrap();
    for request in slow {
        assert_eq!(request.await.unwrap().unwrap(), 404);
    }

    // Both connections held while the page loads.
    lock().await;
    let held: Vec<_> = (0..2).map(|i| read(format!("held-{i}"))).collect();
    waiting(2).await;
    // Redis nearly full: maxmemory just above what it uses now.
    let used: u64 = redis_cli(&redis, &["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    redis_cli(
        &redis,
        &["CONFIG", "SET", "maxmemory", &(used * 11 / 10).to_string()],
    );

    let url = format!("{}/dashboard", served.base);
    // Off the runtime's thread, so the held requests keep being driven meanwhile.
    let dom =
        tokio::task::spawn_blocking(move || Dom(run_chromium(&chromium, &["--dump-dom", &url])))
            .await
            .unwrap();
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory", "0"]);
    locker.batch_execute("COMMIT").await.unwrap();
    for request in held {
        assert_eq!(
            request.await.unwrap().unwrap(),
            404,
            "held reads end with the lock"
        );
    }

    let utilisation = dom.value("pool-utilisation", None).1.unwrap();
    assert_eq!(utilisation, 1.0, "both connections in use");
    assert!(dom.has_warning("pool-utilisation", None));
    let p95 = dom.value("p95", None).1.unwrap();
    assert!(p95 > 0.5, "p95 {p95}");
    assert!(dom.has_warning("p95", None));
    let memory = dom.value("redis-memory-ratio", None).1.unwrap();
    assert!(memory > 0.8, "{memory}");
    assert!(dom.has_warning("redis-memory-ratio", None));
    for alert in ["PostgreSQL pool 100", "p95 latency", "Redis memory"] {
        assert!(dom.0.contains(alert), "alert {alert:?} listed:\n{}", dom.0);
    }
}

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port().to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `target/test-artifacts` of this workspace (or of `CARGO_TARGET_DIR`).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2);
            workspace
                .expect("crates/cli is two levels down")
                .join("target")
        });
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Runs headless Chromium with `args` in a private profile, in its own process group so a
/// hang kills every process it started (signalled only while its leader is unreaped, so the
/// group id cannot have been reused); returns its stdout.
fn run_chromium(chromium: &Path, args: &[&str]) -> String {
    let profile = temp_dir("chromium");
    let mut child = Command::new(chromium)
        .args([
            "--headless=new",
            // Tests run as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Timers run on virtual time: three refreshes of the page in well under a second.
            "--virtual-time-budget=12000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let pid = child.id();
    let bound = Duration::from_secs(90);
    let started = Instant::now();
    let (stdout_pipe, stderr_pipe) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stdout =
        std::thread::spawn(move || std::io::read_to_string(stdout_pipe).unwrap_or_default());
    let stderr =
        std::thread::spawn(move || std::io::read_to_string(stderr_pipe).unwrap_or_default());
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if started.elapsed() > bound {
            kill_process_group(pid);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {bound:?}: {}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_dir_all(&profile);
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "chromium failed ({status}): {stderr}");
    stdout
}

/// The serialised DOM, read through the page's `data-metric` / `data-key` / `data-value`.
struct Dom(String);

impl Dom {
    /// The start tag and text of the element with `data-metric="metric"` (and `data-key`).
    fn element(&self, metric: &str, key: Option<&str>) -> (&str, &str) {
        let needle = format!("data-metric=\"{metric}\"");
        for (at, _) in self.0.match_indices(&needle) {
            let open = self.0[..at].rfind('<').unwrap();
            let close = at + self.0[at..].find('>').unwrap();
            let tag = &self.0[open..close];
            if key.is_none_or(|key| tag.contains(&format!("data-key=\"{key}\""))) {
                let text_end = close + 1 + self.0[close + 1..].find('<').unwrap();
                return (tag, &self.0[close + 1..text_end]);
            }
        }
        panic!("no element {metric} {key:?} in the dashboard:\n{}", self.0);
    }

    /// The shown text and the raw `data-value`, if any.
    fn value(&self, metric: &str, key: Option<&str>) -> (String, Option<f64>) {
        let (tag, text) = self.element(metric, key);
        let raw = tag.split_once("data-value=\"").map(|(_, rest)| {
            let raw = &rest[..rest.find('"').unwrap()];
            raw.parse::<f64>()
                .unwrap_or_else(|_| panic!("{metric}: data-value {raw:?}"))
        });
        (text.trim().to_string(), raw)
    }

    fn has_warning(&self, metric: &str, key: Option<&str>) -> bool {
        let (tag, _) = self.element(metric, key);
        tag.split_once("class=\"").is_some_and(|(_, rest)| {
            rest[..rest.find('"').unwrap()]
                .split(' ')
                .any(|c| c == "warn")
        })
    }

    /// The attribute `name` of the element whose id is `id`.
    fn attribute(&self, id: &str, name: &str) -> &str {
        let at = self
            .0
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} in the dashboard:\n{}", self.0));
        let open = self.0[..at].rfind('<').unwrap();
        let close = at + self.0[at..].find('>').unwrap();
        attribute_of(&self.0[open..close], name)
            .unwrap_or_else(|| panic!("#{id} has no {name}: {}", &self.0[open..close]))
    }

    /// The attribute `name` of the chart `chart` (its `data-chart` box).
    fn chart(&self, chart: &str, name: &str) -> &str {
        let at = self
            .0
            .find(&format!("data-chart=\"{chart}\""))
            .unwrap_or_else(|| panic!("no chart {chart} in the dashboard:\n{}", self.0));
        let open = self.0[..at].rfind('<').unwrap();
        let close = at + self.0[at..].find('>').unwrap();
        attribute_of(&self.0[open..close], name)
            .unwrap_or_else(|| panic!("chart {chart} has no {name}: {}", &self.0[open..close]))
    }

    /// Every `data-key` of the elements with `data-metric="metric"`.
    fn keys(&self, metric: &str) -> BTreeSet<String> {
        let needle = format!("data-metric=\"{metric}\"");
        self.0
            .match_indices(&needle)
            .filter_map(|(at, _)| {
                let close = at + self.0[at..].find('>')?;
                let (_, rest) = self.0[at..close].split_once("data-key=\"")?;
                Some(rest[..rest.find('"')?].to_string())
            })
            .collect()
    }
}

/// The charts of the last 15 minutes: a chart moves with traffic, seed 003's thresholds are
/// drawn on them, and samples arrive live over the WebSocket channel `admin:metrics` when the
/// page has the ADMIN_TOKEN, by polling `/metrics/live` when it has not.
#[tokio::test]
async fn dashboard_charts_move_with_traffic_live_over_the_socket() {
    let chromium = find_chromium().expect("chromium (scripts/test installs it)");
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let admin = "an-operator-token-of-at-least-32-bytes!";
    let served = Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        ("REDIS_URL", redis.url()),
        ("ADMIN_TOKEN", admin.into()),
        ("RATE_LIMIT_API", "100000/1s".into()),
    ])
    .await;

    // A quiet start: a few samples with no application traffic.
    let live = |after: Option<i64>| {
        let url = match after {
            Some(t) => format!("{}/metrics/live?after={t}", served.base),
            None => format!("{}/metrics/live", served.base),
        };
        async move {
            let body: serde_json::Value =
                http().get(url).send().await.unwrap().json().await.unwrap();
            body
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while live(None).await["samples"].as_array().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "no samples in /metrics/live");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet = live(None).await;
    assert_eq!(quiet["thresholds"]["p95_ms"], 500.0);
    assert_eq!(quiet["every_ms"], 1000);
    let quiet_peak = quiet["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests_per_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(quiet_peak < 5.0, "no traffic yet: {quiet_peak} requests/s");

    // Traffic for the rest of the test: /health as fast as one client goes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), format!("{}/health", served.base));
        tokio::spawn(async move {
            let client = http();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
                sent += 1;
            }
            sent
        })
    };
    // The server samples it: a point of the requests chart above the quiet ones.
    let last_quiet = quiet["samples"].as_array().unwrap().last().unwrap()["t"]
        .as_i64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let busy = live(Some(last_quiet)).await;
        let peak = busy["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["requests_per_s"].as_f64().unwrap())
            .fold(0.0, f64::max);
        if peak > 20.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the traffic never showed: {busy}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Polling only (no token): the charts are drawn from /metrics/live.
    let url = format!("{}/dashboard", served.base);
    let chromium_path = chromium.clone();
    let polled = tokio::task::spawn_blocking(move || {
        Dom(run_chromium(&chromium_path, &["--dump-dom", &url]))
    })
    .await
    .unwrap();
    assert_eq!(polled.attribute("live-source", "data-source"), "polling");
    let points: usize = polled.chart("requests", "data-points").parse().unwrap();
    assert!(points >= 4, "{points} points");
    let peak: f64 = polled.chart("requests", "data-peak").parse().unwrap();
    assert!(
        peak > 20.0,
        "the requests chart moved with the traffic: peak {peak}"
    );
    assert!(
        polled.0.contains("class=\"threshold\" data-value=\"500\""),
        "the p95 threshold is drawn on the latency chart"
    );
    assert!(polled.0.contains("class=\"threshold\" data-value=\"80\""));
    // The samples carry the in-process tier's fill (a value, not a gap), far from its bound.
    let filled: f64 = polled
        .chart("memory", "data-last")
        .parse()
        .expect("a point of the in-process tier");
    assert!((0.0..100.0).contains(&filled), "in-process tier {filled} %");

    // With the ADMIN_TOKEN: live over the socket, the charts still moving. Messages arrive in
    // real time, so this page runs on the wall clock, driven through ChromeDriver.
    let url = format!("{}/dashboard#admin_token={admin}", served.base);
    let (html, png) = live_page(&url, Duration::from_secs(5)).await;
    let socket = Dom(html);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(traffic.await.unwrap() > 0);
    assert_eq!(
        socket.attribute("live-source", "data-source"),
        "websocket",
        "{}",
        socket.0
    );
    let received: u32 = socket
        .attribute("live-source", "data-received")
        .parse()
        .unwrap();
    assert!(received >= 2, "samples pushed over the socket: {received}");
    let peak: f64 = socket.chart("requests", "data-peak").parse().unwrap();
    assert!(peak > 20.0, "peak {peak}");
    let path = artifacts_dir().join("dashboard-live.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "no screenshot"
    );
    println!("live dashboard screenshot: {}", path.display());
}

/// Opens `url` in headless Chromium through ChromeDriver (Debian's `chromium-driver`, the
/// W3C WebDriver protocol over HTTP), lets it run for `real` on the wall clock, and returns its
/// DOM and a PNG screenshot.
async fn live_page(url: &str, real: Duration) -> (String, Vec<u8>) {
    use base64::Engine as _;
    let port = cascade_testkit::free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromedriver (scripts/test installs chromium-driver)");
    // Its group (the browsers it started too) is killed once, at the end or on a panic, and
    // only while its leader is unreaped: a group id whose leader was reaped may be another
    // process's by then (pids wrap at 32768 here).
    let mut driver = Some(driver);
    let kill_group = Defer(move || {
        if let Some(mut driver) = driver.take() {
            kill_process_group(driver.id());
            let _ = driver.kill();
            let _ = driver.wait();
        }
    });
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/status")).send().await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = temp_dir("chromium");
    let args = [
        "--headless=new".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        "--hide-scrollbars".into(),
        "--window-size=1280,1800".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let capabilities = serde_json::json!({ "capabilities": { "alwaysMatch": {
        "goog:chromeOptions": { "binary": find_chromium().expect("chromium"), "args": args }
    }}});
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let request = client.request(method, format!("{base}{path}"));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        async move {
            let response = request.send().await.expect("chromedriver answers");
            let status = response.status();
            let body: serde_json::Value = response.json().await.expect("chromedriver's JSON");
            assert!(status.is_success(), "chromedriver: {status} {body}");
            body["value"].clone()
        }
    };
    let session = call(reqwest::Method::POST, "/session".into(), Some(capabilities)).await;
    let session = session["sessionId"]
        .as_str()
        .expect("a session")
        .to_string();
    let at = |path: &str| format!("/session/{session}{path}");
    call(
        reqwest::Method::POST,
        at("/url"),
        Some(serde_json::json!({ "url": url })),
    )
    .await;
    tokio::time::sleep(real).await;
    let html = call(reqwest::Method::GET, at("/source"), None).await;
    let png = call(reqwest::Method::GET, at("/screenshot"), None).await;
    call(reqwest::Method::DELETE, at(""), None).await;
    drop(kill_group);
    let _ = std::fs::remove_dir_all(&profile);
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().expect("a base64 screenshot"))
        .expect("base64");
    (html.as_str().expect("the page source").to_string(), png)
}

/// SIGKILL to the process group `leader` leads (call it while the leader is unreaped).
/// procps' `kill` reads `-<pgid>` after a signal as another signal, not a group: `--` first.
fn kill_process_group(leader: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{leader}")])
        .status();
}

/// Runs its closure when dropped (a test that panics still kills what it started).
struct Defer<F: FnMut()>(F);
impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The value of attribute `name` in a start tag.
fn attribute_of<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let (_, rest) = tag.split_once(&format!(" {name}=\""))?;
    Some(&rest[..rest.find('"')?])
}

/// Makes `pg` preload pg_stat_statements (one restart), as `crates/bench` does for its
/// embedded server; returns a fresh database with the extension created in it.
async fn with_pg_stat_statements(pg: &mut PgServer) -> String {
    pg.client("postgres")
        .await
        .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        .await
        .unwrap();
    pg.restart().await;
    let db = pg.fresh_database().await;
    let name = db.rsplit('/').next().unwrap();
    pg.client(name)
        .await
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .unwrap();
    db
}

async fn statements(served: &Served, query: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = http().get(format!("{}/dashboard/statements{query}", served.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or_default(),
    )
}

/// The agents module's queue on the dashboard: the numbers of `/metrics`, and PostgreSQL's
/// slowest statements listed for an operator when pg_stat_statements is loaded.
#[tokio::test]
async fn dashboard_shows_the_agents_queue_and_the_slowest_statements() {
    let chromium = find_chromium().expect("chromium (scripts/test installs it)");
    let mut pg = PgServer::start().await;
    let db = with_pg_stat_statements(&mut pg).await;
    // No workers: what is enqueued stays queued, and the maintenance tick reports it.
    let served = Served::start(&[
        ("DATABASE_URL", db.clone()),
        (
            "JWT_SECRET",
            "test-secret-test-secret-test-secret-0123".into(),
        ),
        ("AGENTS_WORKERS", "0".into()),
        ("AGENTS_HEARTBEAT_INTERVAL", "200ms".into()),
        ("AGENTS_HEARTBEAT_TIMEOUT", "2s".into()),
    ])
    .await;
    let token = register(&served, "operator").await;
    let steps = serde_json::json!({"name": "w", "steps": [{"capability": "echo"}]});
    let workflow = call(&served, "POST", "/workflows", Some(&token), Some(steps)).await;
    assert_eq!(workflow.status, 201, "{}", workflow.body);
    let path = format!("/workflows/{}/executions", workflow.body["id"]);
    for _ in 0..3 {
        let input = serde_json::json!({"input": {}});
        let enqueued = call(&served, "POST", &path, Some(&token), Some(input)).await;
        assert_eq!(enqueued.status, 202, "{}", enqueued.body);
    }
    // Until the queue gauge and the audit table's row estimate have caught up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = scrape(&served).await;
        // The gauge appears at the first maintenance tick: absent before it.
        let queued = metrics
            .matching("cascade_executions_queued", &[])
            .map(|s| s.value)
            .next()
            .unwrap_or(0.0);
        let audit = metrics
            .matching(
                "cascade_pg_table_rows",
                &[("table", "cascade_audit.audit_log")],
            )
            .map(|s| s.value)
            .next()
            .unwrap_or(0.0);
        if queued == 3.0 && audit >= 4.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queued {queued}, audit rows {audit}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The endpoint itself: operators only, bad input named, slowest first.
    assert_eq!(statements(&served, "", None).await.0, 401);
    assert_eq!(statements(&served, "", Some("wrong")).await.0, 401);
    for (query, field) in [("?limit=0", "limit"), ("?order=fastest", "order")] {
        let (status, body) = statements(&served, query, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    let (status, body) = statements(&served, "?limit=5&order=total", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "available", "{body}");
    let listed = body["statements"].as_array().unwrap();
    assert!(!listed.is_empty() && listed.len() <= 5, "{body}");
    let totals: Vec<f64> = listed
        .iter()
        .map(|s| s["total_ms"].as_f64().unwrap())
        .collect();
    assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{totals:?}");
    for statement in listed {
        assert!(statement["query"].as_str().unwrap().chars().count() <= 300);
        assert!(statement["calls"].as_i64().unwrap() >= 1);
    }
    let (_, by_mean) = statements(&served, "", Some(ADMIN_TOKEN)).await;
    let texts: Vec<&str> = by_mean["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["query"].as_str().unwrap())
        .collect();
    assert!(!texts.is_empty(), "{by_mean}");

    // The page, given the token in its address's fragment.
    let url = format!("{}/dashboard#admin_token={ADMIN_TOKEN}", served.base);
    let chromium_path = chromium.clone();
    let dom = tokio::task::spawn_blocking(move || {
        Dom(run_chromium(&chromium_path, &["--dump-dom", &url]))
    })
    .await
    .unwrap();
    let metrics = scrape(&served).await;
    assert_eq!(dom.value("agents-queued", None).1, Some(3.0));
    assert_eq!(
        dom.value("agents-running", None).1,
        Some(metrics.one("cascade_executions_running", &[]))
    );
    let oldest = dom.value("agents-oldest", None).1.unwrap();
    assert!(oldest > 0.0, "{oldest}");
    assert_eq!(
        dom.value("agents-rescued", None).1,
        Some(metrics.one("cascade_executions_rescued_total", &[]))
    );
    assert_eq!(
        dom.value("agents-audit-rows", None).1,
        Some(metrics.one(
            "cascade_pg_table_rows",
            &[("table", "cascade_audit.audit_log")]
        ))
    );
    assert_eq!(
        dom.attribute("statements-status", "data-status"),
        "available"
    );
    assert!(!dom.keys("statement-query").is_empty(), "{}", dom.0);
}

/// Without pg_stat_statements the endpoint says it is unavailable, and why.
#[tokio::test]
async fn slowest_statements_are_unavailable_without_pg_stat_statements() {
    let pg = PgServer::start().await;
    let served = Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        (
            "JWT_SECRET",
            "test-secret-test-secret-test-secret-0123".into(),
        ),
    ])
    .await;
    let (status, body) = statements(&served, "", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("pg_stat_statements"),
        "{body}"
    );
    assert_eq!(statements(&served, "", None).await.0, 401);
}
