//! `cascade-bench serve`: the product's server, built as `cascade serve` builds it
//! ([`Application::build`]), plus the `/bench/*` routes behind the same middleware: a fixed body
//! (the same-stack baseline) and the catalog's reads straight to PostgreSQL. The suite runs it as a separate process so that the load
//! generator and the server do not share a runtime or a core budget they compete for unseen.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use cascade_catalog::{CatalogModule, bench_routes};
use cascade_server::http::ExtraRoutes;
use cascade_server::{Application, BuildOptions, Settings};

/// Serves until SIGTERM or SIGINT, then drains and stops as `cascade serve` does.
pub async fn run(settings: Settings, migrate: bool) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let http = &settings.core.http;
    // Bind first: a taken port is reported before PostgreSQL is started.
    let listener = tokio::net::TcpListener::bind((http.host.as_str(), http.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", http.host, http.port))?;
    let local = listener.local_addr()?;
    let app = Application::build(
        settings,
        BuildOptions {
            migrate,
            ..BuildOptions::default()
        },
    )
    .await?;
    tracing::info!(
        address = %local,
        startup_ms = started.elapsed().as_millis() as u64,
        "cascade-bench is serving, with the /bench routes"
    );
    println!("cascade-bench listening on http://{local}");
    let catalog = CatalogModule::new(app.settings.catalog.clone()).state(&app.state);
    let bench = ExtraRoutes {
        router: crate::fixed::router().merge(bench_routes::router().with_state(catalog)),
        // Their path templates, the metrics' route labels.
        templates: vec![
            crate::fixed::PATH,
            bench_routes::LISTINGS,
            bench_routes::BUNDLE,
        ],
        // The baseline is served past the router, as the hot read is.
        fast: vec![crate::fixed::fast_route()],
    };
    app.serve_with(listener, bench, cascade_server::process::termination())
        .await?;
    Ok(ExitCode::SUCCESS)
}
