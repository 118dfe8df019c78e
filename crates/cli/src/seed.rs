//! `cascade seed catalog`: migrations, the generated rows, then the catalog's cache
//! namespaces are emptied so running servers do not keep serving what the seed replaced.

use std::process::ExitCode;

use anyhow::Context;
use cascade_catalog::config::{ASSETS, BUNDLE_MEMBERS, BUNDLES, LISTINGS, READY};
use cascade_catalog::seed::{SeedOptions, SeedReport, seed};
use cascade_server::{Application, BuildOptions, Settings};

fn print_seed(report: &SeedReport) {
    println!(
        "seeded {} assets, {} lineage edges, {} receipts, {} policies, {} producers in {:.1}s",
        report.assets,
        report.edges,
        report.receipts,
        report.policies,
        report.producers,
        report.elapsed.as_secs_f64()
    );
}

pub async fn catalog(
    settings: Settings,
    mut options: SeedOptions,
    owner: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let app = Application::build(settings, BuildOptions::default()).await?;
    let result = async {
        if let Some(username) = owner {
            let Some(user) = app.state.identity.find_user_id(username).await? else {
                eprintln!("cascade: --owner: no account named {username:?} (register it first)");
                return Ok(ExitCode::from(2));
            };
            options.owner = Some(user);
        }
        let report = seed(&app.state.db, &options)
            .await
            .context("seeding the catalog")?;
        for namespace in [ASSETS, LISTINGS, BUNDLE_MEMBERS, BUNDLES, READY] {
            app.state.cache.invalidate_namespace(namespace).await;
        }
        cascade_catalog::seed::vacuum(&app.state.db).await;
        print_seed(&report);
        Ok(ExitCode::SUCCESS)
    }
    .await;
    app.stop().await;
    result
}
