//! What the tests driving the application with `oneshot` share.

use cascade_server::{Application, BuildOptions, Settings};
use cascade_testkit::PgServer;

/// The application on a fresh database of a private PostgreSQL (no Redis), built as
/// `cascade serve` builds it.
pub async fn application() -> (PgServer, Application) {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let settings = Settings::from_vars(&[("DATABASE_URL", url)]).expect("settings");
    let app = Application::build(settings, BuildOptions::default())
        .await
        .expect("the application builds");
    (pg, app)
}
