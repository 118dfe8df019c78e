//! `cascade-bench worker`: the agents module's execution workers alone, built as `cascade
//! worker` builds them ([`cascade_agents::AgentsModule::start_workers`] on the configured
//! PostgreSQL), so the executions scenario can run them as processes of their own, and kill
//! them.

use std::process::ExitCode;

use cascade_core::cache::{Backend, Cache, EngineOptions};
use cascade_server::Settings;
use cascade_server::application::Database;

/// Runs the workers until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    let database = Database::open(&settings.core).await?;
    // The echo executor the scenario runs needs no cache; the `http` one's connector would.
    let cache = Cache::new(
        settings.core.cache.clone(),
        Backend::Memory,
        EngineOptions::default(),
    );
    let module = cascade_agents::AgentsModule::new(settings.agents.clone());
    let mut tasks = cascade_core::tasks::Supervisor::new();
    module.start_workers(&database.db, module.executors(&cache), &mut tasks);
    cascade_server::process::termination().await;
    tasks.stop(settings.core.http.shutdown_timeout).await;
    database.db.close();
    Ok(ExitCode::SUCCESS)
}
