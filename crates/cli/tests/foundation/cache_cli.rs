use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cascade_core::cache::{Backend, Cache, EngineOptions};
use cascade_core::redis::Redis;
use cascade_testkit::RedisServer;

use crate::common::{cascade, empty_dir, run_bounded};

#[tokio::test]
async fn cache_invalidate_removes_entries_for_every_instance() {
    let server = RedisServer::start().await;
    // The settings `cascade` itself reads, module namespaces (and their key names) included.
    let config = cascade_server::Settings::from_vars(&[("REDIS_URL", server.url())])
        .unwrap()
        .core;
    let engine = Cache::new(
        config.cache.clone(),
        Backend::Redis(Redis::new(config.redis.as_ref().unwrap()).unwrap()),
        EngineOptions::default(),
    );
    let loads = AtomicUsize::new(0);
    let load = |key: &'static str, tag: &'static str| {
        let engine = engine.clone();
        let loads = &loads;
        async move {
            engine
                .get_or_load("assets", key, &[tag.to_string()], || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(Some(key.to_string()))
                })
                .await
                .unwrap()
        }
    };
    load("a", "t1").await;
    load("b", "t2").await;
    load("c", "t2").await;
    assert_eq!(loads.load(Ordering::SeqCst), 3);

    let dir = empty_dir();
    for (args, reloaded) in [
        (vec!["--tag", "t1"], 1),
        (vec!["--key", "assets:b"], 1),
        (vec!["--ns", "assets"], 3),
    ] {
        let mut command = cascade(&dir);
        command
            .args(["cache", "invalidate"])
            .args(&args)
            .env("REDIS_URL", server.url());
        let (out, _) = run_bounded(command, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let before = loads.load(Ordering::SeqCst);
        load("a", "t1").await;
        load("b", "t2").await;
        load("c", "t2").await;
        assert_eq!(
            loads.load(Ordering::SeqCst) - before,
            reloaded,
            "after invalidate {args:?}"
        );
    }

    let mut command = cascade(&dir);
    command.args(["cache", "invalidate", "--tag", "t1"]);
    let (out, _) = run_bounded(command, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no shared tier"));
}
