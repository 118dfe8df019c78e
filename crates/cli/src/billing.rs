//! `cascade billing reconcile` and `cascade billing replay FILE`: billing's own code (the
//! reconciliation run, the webhook's handler) run once by hand, on the application's state
//! built without its HTTP server or background tasks.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cascade_app::AppModuleState;
use cascade_app::billing::reconcile::{self, Interrupted, ReconcileError, Report};
use cascade_app::billing::webhook::{self, Event, Outcome};
use cascade_core::config::DatabaseSource;
use cascade_server::{Application, BuildOptions, Settings};
use serde_json::Value;

/// Exit 2 with why, when `STRIPE_API_KEY` is not set, or when no database is named and no
/// embedded one exists yet: these commands act on the server's database, and an embedded
/// PostgreSQL started afresh for them would be empty (they would report against nothing).
fn configured(settings: &Settings) -> Result<(), ExitCode> {
    if settings.app.stripe.api_key.is_none() {
        eprintln!(
            "cascade: billing is not configured: STRIPE_API_KEY is not set (set it, with \
             STRIPE_PRICES_JSON, as the server has them)"
        );
        return Err(ExitCode::from(2));
    }
    if let DatabaseSource::Embedded { data_dir } = &settings.core.database.source
        && !data_dir.is_dir()
    {
        eprintln!(
            "cascade: billing commands need the server's database: set DATABASE_URL (no \
             embedded PostgreSQL is started for them: its data directory {} does not exist, \
             so it would be empty)",
            data_dir.display()
        );
        return Err(ExitCode::from(2));
    }
    Ok(())
}

/// Runs `work` on the billing state (migrations applied, no background task), then stops.
async fn with_billing<F, Fut>(settings: Settings, work: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(AppModuleState) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let app = Application::build(settings, BuildOptions::without_tasks()).await?;
    let state = AppModuleState::new(&app.settings.app, &app.state);
    let result = work(state).await;
    app.stop().await;
    result
}

/// `cascade billing reconcile`: one reconciliation run; a line per subscription it repaired,
/// a line per account whose tier it changed (net), then a summary.
pub async fn reconcile(settings: Settings) -> anyhow::Result<ExitCode> {
    if let Err(code) = configured(&settings) {
        return Ok(code);
    }
    with_billing(settings, |state| async move {
        let report = match reconcile::reconcile_once(&state).await {
            Ok(report) => report,
            Err(Interrupted {
                error: ReconcileError::NotConfigured,
                ..
            }) => return Ok(ExitCode::from(2)),
            Err(Interrupted { error, partial }) => {
                // What was applied before the error is committed: say so.
                if partial.ran {
                    print!("{}", describe(&partial));
                    println!("interrupted: the cursor did not move; the next run lists these events again");
                }
                return Err(error)
                    .context("reconciliation failed (nothing was skipped: run it again)");
            }
        };
        if !report.ran {
            eprintln!(
                "cascade: another instance is reconciling right now: nothing done (run it again)"
            );
            return Ok(ExitCode::FAILURE);
        }
        print!("{}", describe(&report));
        Ok(if report.failed.is_empty() && report.unfetched.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
    .await
}

/// What `cascade billing reconcile` prints.
fn describe(report: &Report) -> String {
    let state = |s: &Option<(String, String)>| match s {
        Some((status, tier)) => format!("{status} ({tier})"),
        None => "unknown here".to_string(),
    };
    let mut out = String::new();
    for repair in &report.repaired {
        let account = match repair.user_id {
            Some(user) => format!("account {user}"),
            None => "no account".to_string(),
        };
        out.push_str(&format!(
            "repaired {} ({account}): {} -> {}\n",
            repair.subscription,
            state(&repair.before),
            state(&Some(repair.after.clone())),
        ));
    }
    let tiers = net_tier_changes(report);
    for (user, from, to) in &tiers {
        out.push_str(&format!("account {user}: tier {from} -> {to}\n"));
    }
    for id in &report.failed {
        out.push_str(&format!("failed {id}: not applicable (see the log)\n"));
    }
    for id in &report.unfetched {
        out.push_str(&format!(
            "not applied {id}: its subscription could not be fetched from Stripe (see the log; \
             the next run retries it)\n"
        ));
    }
    out.push_str(&format!(
        "reconciled: {} events listed, {} applied (their webhooks were lost), {} already applied, \
         {} older than the state here, {} failed, {} not applied yet; subscriptions repaired: {}, \
         tiers changed: {}\n",
        report.listed,
        report.applied.len(),
        report.duplicates,
        report.older,
        report.failed.len(),
        report.unfetched.len(),
        report.repaired.len(),
        tiers.len(),
    ));
    out
}

/// Per account, in the order first changed, its tier before the run's first change and after
/// its last; accounts whose tier came back to where it was are left out.
fn net_tier_changes(report: &Report) -> Vec<(i64, &str, &str)> {
    let mut net: Vec<(i64, &str, &str)> = Vec::new();
    for change in &report.tier_changes {
        match net.iter_mut().find(|(user, _, _)| *user == change.user_id) {
            Some(entry) => entry.2 = &change.to,
            None => net.push((change.user_id, &change.from, &change.to)),
        }
    }
    net.retain(|(_, from, to)| from != to);
    net
}

/// The events of a saved file: one event object, a JSON array of events, events one per line
/// (JSON lines, or any whitespace-separated sequence of objects), or a Stripe list object
/// (`{"object": "list", "data": [...]}`, as `GET /v1/events` answers). In file order.
pub fn read_events(text: &str) -> Result<Vec<Event>, String> {
    let mut values = Vec::new();
    for (n, value) in serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
    {
        let value = value.map_err(|err| format!("not JSON (value {}): {err}", n + 1))?;
        match value {
            Value::Array(items) => values.extend(items),
            Value::Object(ref object)
                if object.get("object").and_then(Value::as_str) == Some("list") =>
            {
                match object.get("data") {
                    Some(Value::Array(items)) => values.extend(items.iter().cloned()),
                    _ => return Err(format!("value {}: a list without data", n + 1)),
                }
            }
            other => values.push(other),
        }
    }
    if values.is_empty() {
        return Err("no events in the file".into());
    }
    values
        .into_iter()
        .enumerate()
        .map(|(n, value)| {
            let event: Event = serde_json::from_value(value)
                .map_err(|err| format!("event {}: not a Stripe event: {err}", n + 1))?;
            if event.id.is_empty() || event.id.len() > 255 {
                return Err(format!("event {}: the id must be 1 to 255 bytes", n + 1));
            }
            Ok(event)
        })
        .collect()
}

/// `cascade billing replay FILE`: each saved event through the webhook's handler (exactly
/// once still applies); a line per event, then a summary.
pub async fn replay(settings: Settings, file: &Path) -> anyhow::Result<ExitCode> {
    if let Err(code) = configured(&settings) {
        return Ok(code);
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // The whole file is checked before anything is applied.
    let events = match read_events(&text) {
        Ok(events) => events,
        Err(err) => {
            eprintln!("cascade: {}: {err}", file.display());
            return Ok(ExitCode::from(2));
        }
    };
    with_billing(settings, |state| async move {
        let mut counts = [0usize; 5];
        for event in &events {
            let (index, line) = match webhook::handle(&state, event).await {
                Ok(Outcome::Applied(change)) => (
                    0,
                    match change {
                        Some(c) => format!(
                            "applied (account {}: tier {} -> {})",
                            c.user_id, c.from, c.to
                        ),
                        None => "applied".to_string(),
                    },
                ),
                Ok(Outcome::Duplicate) => (1, "duplicate".to_string()),
                Ok(Outcome::Older) => (2, "ignored-older".to_string()),
                Ok(Outcome::Ignored) => (3, "unknown-type".to_string()),
                Err(err) => (4, format!("failed: {err}")),
            };
            counts[index] += 1;
            println!("{} {}: {line}", event.id, event.kind);
        }
        println!(
            "replayed {} events: {} applied, {} duplicate, {} ignored-older, {} unknown-type, {} failed",
            events.len(),
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            counts[4]
        );
        Ok(if counts[4] == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::{describe, read_events};
    use cascade_app::billing::reconcile::{Repair, Report};
    use cascade_app::billing::webhook::TierChange;

    #[test]
    fn an_accounts_tier_line_is_its_net_change_printed_once() {
        let change = |user_id, from: &str, to: &str| TierChange {
            user_id,
            from: from.into(),
            to: to.into(),
        };
        let repair = |subscription: &str, user_id| Repair {
            subscription: subscription.into(),
            user_id: Some(user_id),
            before: None,
            after: ("active".into(), "architect".into()),
        };
        let report = Report {
            ran: true,
            listed: 6,
            applied: vec!["evt_1".into(), "evt_2".into(), "evt_3".into()],
            repaired: vec![repair("sub_a", 7), repair("sub_b", 7)],
            // 7: created explorer, then updated architect (and a second subscription);
            // 8: up and back down; 9: through a checkout.session.completed (no repair line).
            tier_changes: vec![
                change(7, "observer", "explorer"),
                change(8, "observer", "explorer"),
                change(7, "explorer", "architect"),
                change(9, "observer", "architect"),
                change(8, "explorer", "observer"),
            ],
            unfetched: vec!["evt_4".into()],
            ..Report::default()
        };
        let out = describe(&report);
        let tier_lines: Vec<&str> = out.lines().filter(|l| l.contains(": tier ")).collect();
        assert_eq!(
            tier_lines,
            [
                "account 7: tier observer -> architect",
                "account 9: tier observer -> architect"
            ],
            "{out}"
        );
        assert!(out.contains("repaired sub_a (account 7): unknown here -> active (architect)\n"));
        assert!(out.contains("not applied evt_4: its subscription could not be fetched"));
        assert!(
            out.contains(
                "0 failed, 1 not applied yet; subscriptions repaired: 2, tiers changed: 2"
            ),
            "{out}"
        );
    }

    const EVENT: &str = r#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":{}}}"#;

    #[test]
    fn a_file_holds_one_event_an_array_json_lines_or_a_list() {
        let two = EVENT.replace("evt_1", "evt_2");
        let ids = |text: &str| -> Vec<String> {
            read_events(text)
                .unwrap()
                .into_iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(ids(EVENT), ["evt_1"]);
        assert_eq!(ids(&format!("[{EVENT}, {two}]")), ["evt_1", "evt_2"]);
        assert_eq!(ids(&format!("{EVENT}\n{two}\n")), ["evt_1", "evt_2"]);
        assert_eq!(
            ids(&format!(
                r#"{{"object":"list","data":[{two},{EVENT}],"has_more":false}}"#
            )),
            ["evt_2", "evt_1"]
        );
        for bad in [
            "",
            "[]",
            "{",
            r#"{"id":"evt_1"}"#,
            &EVENT.replace("evt_1", ""),
        ] {
            assert!(read_events(bad).is_err(), "{bad:?}");
        }
    }
}
