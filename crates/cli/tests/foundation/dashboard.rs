//! `/dashboard` in a real headless Chromium against a server with traffic: the numbers it
//! shows are those of `/metrics`, the seed-003 thresholds are flagged, it loads nothing from
//! elsewhere, and a screenshot is kept as a test artifact.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cascade_testkit::{PgServer, RedisServer, temp_dir};

use crate::common::{Served, http};
use crate::metrics::{get_n, register, serve_with_redis};
use crate::prometheus::scrape;

/// The dashboard's own polling is not application traffic (as in the page).
const OWN_ROUTES: [&str; 2] = ["/metrics", "/dashboard"];

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
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .status();
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
