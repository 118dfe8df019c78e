//! The application under test: PostgreSQL, Redis, the Venice stand-in and one server (the
//! real application in-process), with request helpers.

use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::venice::sample_citizens;
use cascade_testkit::{PgServer, RedisServer, VeniceStandin};

/// Fields drop in declaration order: the server stops before what it uses. `pg` and `redis`
/// are held so their servers live as long as the test.
#[allow(dead_code)]
pub struct World {
    pub server: TestApp,
    pub venice: VeniceStandin,
    pub pg: PgServer,
    pub redis: RedisServer,
}

impl World {
    /// The application with Venice played by the stand-in (its sample citizens), plus `extra`.
    pub async fn start(extra: &[(&str, String)]) -> World {
        let pg = PgServer::start().await;
        let redis = RedisServer::start().await;
        let venice = VeniceStandin::start(sample_citizens()).await;
        let mut env = vec![
            ("DATABASE_URL", pg.fresh_database().await),
            ("REDIS_URL", redis.url()),
            (
                "JWT_SECRET",
                "app-tests-secret-app-tests-secret-0123".to_string(),
            ),
            ("RATE_LIMIT_API", "off".to_string()),
            ("VENICE_API_URL", venice.url()),
        ];
        env.extend(extra.iter().cloned());
        let server = TestApp::start(&env).await;
        World {
            server,
            venice,
            pg,
            redis,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    /// `GET /citizens/{username}` (the username as given, not encoded).
    pub async fn citizen(&self, username: &str) -> reqwest::Response {
        http()
            .get(self.url(&format!("/citizens/{username}")))
            .send()
            .await
            .expect("the server answers")
    }
}

pub fn http() -> reqwest::Client {
    cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))
        .expect("client")
}
