//! The audit log (table `audit_log`, core migration 4): who changed what, when, from what to
//! what, under which request.
//!
//! A row is written by [`record`] or [`record_many`] **inside the caller's transaction**: a
//! change that rolls back leaves no row, and a row that cannot be written fails the change.
//! The table is append-only in PostgreSQL itself, not only in this code: a trigger refuses
//! `UPDATE`, `DELETE` and `TRUNCATE` for every role (core migration 4), and the table belongs
//! to `cascade_audit_owner`, a role nobody logs in as or is a member of, in the schema
//! `cascade_audit` (core migration 5), so the application's role, which keeps `INSERT` and
//! `SELECT` (through the view `audit_log`), can neither disable the trigger nor drop the
//! table. A superuser still can (see the migration for what else it cannot stop).
//!
//! [`list`] reads it newest first with filters and a cursor (the id of the last row seen).

use crate::db::Sql;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use crate::db::DbError;

/// One change to record.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// `user:<id>` for an account ([`user_actor`]), `system:<component>` for the server.
    pub actor: &'a str,
    /// `<entity>.<verb>`, e.g. `agent.create`.
    pub action: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    /// The entity before the change (`None` for a create).
    pub before: Option<&'a Value>,
    /// The entity after the change (`None` for a delete).
    pub after: Option<&'a Value>,
    /// The request's `x-request-id`, when a request made the change.
    pub request_id: Option<&'a str>,
}

/// The actor name of an account.
pub fn user_actor(user_id: i64) -> String {
    format!("user:{user_id}")
}

/// Writes one row in `tx`; returns its id.
pub async fn record(tx: &Transaction<'_>, change: &Change<'_>) -> Result<i64, DbError> {
    let row = tx
        .query_one(
            "INSERT INTO audit_log (actor, action, entity_type, entity_id, before, after, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &change.actor,
                &change.action,
                &change.entity_type,
                &change.entity_id,
                &change.before,
                &change.after,
                &change.request_id,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Writes one row per change in `tx`, in one statement, in the order given.
pub async fn record_many(tx: &Transaction<'_>, changes: &[Change<'_>]) -> Result<(), DbError> {
    if changes.is_empty() {
        return Ok(());
    }
    let column = |f: &dyn Fn(&Change<'_>) -> Option<String>| -> Vec<Option<String>> {
        changes.iter().map(f).collect()
    };
    let actors = column(&|c| Some(c.actor.to_string()));
    let actions = column(&|c| Some(c.action.to_string()));
    let types = column(&|c| Some(c.entity_type.to_string()));
    let ids = column(&|c| Some(c.entity_id.to_string()));
    let requests = column(&|c| c.request_id.map(str::to_string));
    let before: Vec<Option<Value>> = changes.iter().map(|c| c.before.cloned()).collect();
    let after: Vec<Option<Value>> = changes.iter().map(|c| c.after.cloned()).collect();
    tx.execute(
        "INSERT INTO audit_log (actor, action, entity_type, entity_id, before, after, request_id) \
         SELECT actor, action, entity_type, entity_id, before, after, request_id \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[]) \
           WITH ORDINALITY AS c(actor, action, entity_type, entity_id, before, after, request_id, n) \
         ORDER BY n",
        &[&actors, &actions, &types, &ids, &before, &after, &requests],
    )
    .await?;
    Ok(())
}

/// What [`list`] returns rows of; every field narrows the result.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    /// Rows at or after this time, milliseconds since the Unix epoch.
    pub since_ms: Option<i64>,
    /// Rows before this time, milliseconds since the Unix epoch.
    pub until_ms: Option<i64>,
    /// Rows older than this id (the cursor of the previous page).
    pub before_id: Option<i64>,
    /// At most this many rows.
    pub limit: i64,
}

/// A row of the audit log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    pub id: i64,
    /// RFC 3339, UTC, to the microsecond.
    pub at: String,
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub request_id: Option<String>,
}

/// A page of rows, newest first, and the cursor of the next page when there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub items: Vec<Entry>,
    pub next_cursor: Option<String>,
}

/// The rows `filter` selects, newest first (by id: ids grow with commit order closely enough
/// for reading, and exactly as a cursor needs).
pub async fn list(db: &impl Sql, filter: &Filter) -> Result<Page, DbError> {
    let mut conditions: Vec<String> = Vec::new();
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    // Each condition names its parameter by position; built in one place so they match.
    let texts = [
        ("actor", &filter.actor),
        ("action", &filter.action),
        ("entity_type", &filter.entity_type),
        ("entity_id", &filter.entity_id),
    ];
    for (column, value) in &texts {
        if let Some(value) = value {
            params.push(value);
            conditions.push(format!("{column} = ${}", params.len()));
        }
    }
    if let Some(since) = &filter.since_ms {
        params.push(since);
        conditions.push(format!(
            "at >= to_timestamp(${}::int8 / 1000.0)",
            params.len()
        ));
    }
    if let Some(until) = &filter.until_ms {
        params.push(until);
        conditions.push(format!(
            "at < to_timestamp(${}::int8 / 1000.0)",
            params.len()
        ));
    }
    if let Some(before) = &filter.before_id {
        params.push(before);
        conditions.push(format!("id < ${}", params.len()));
    }
    let fetch = filter.limit + 1;
    params.push(&fetch);
    let limit = params.len();
    let condition = if conditions.is_empty() {
        "TRUE".to_string()
    } else {
        conditions.join(" AND ")
    };
    let rows = db
        .query(
            &format!(
                "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                 actor, action, entity_type, entity_id, before, after, request_id \
                 FROM audit_log WHERE {condition} ORDER BY id DESC LIMIT ${limit}"
            ),
            &params,
        )
        .await?;
    let mut items: Vec<Entry> = rows
        .iter()
        .map(|row| Entry {
            id: row.get(0),
            at: row.get(1),
            actor: row.get(2),
            action: row.get(3),
            entity_type: row.get(4),
            entity_id: row.get(5),
            before: row.get(6),
            after: row.get(7),
            request_id: row.get(8),
        })
        .collect();
    let more = items.len() as i64 > filter.limit;
    items.truncate(filter.limit.max(0) as usize);
    let next_cursor = more
        .then(|| items.last().map(|last| last.id.to_string()))
        .flatten();
    Ok(Page { items, next_cursor })
}

/// Milliseconds since the Unix epoch of an RFC 3339 time (`2026-12-03T16:30:00Z`,
/// `2026-12-03T17:30:00.250+01:00`); `None` for anything else, including impossible dates.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let len = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..len.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[len..];
    }
    let offset_minutes = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (h, m) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return None,
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339_ms;

    #[test]
    fn rfc3339_times_are_read_exactly_and_impossible_ones_refused() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-12-03T16:30:00Z"),
            Some(1_796_315_400_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-12-03T17:30:00.25+01:00"),
            Some(1_796_315_400_250)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000)
        );
        for bad in [
            "",
            "2026-12-03",
            "2026-13-03T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T00:00:00",
            "2026-12-03T00:00:00.Z",
            "2026-12-03T00:00:00+1:00",
            "2026-12-03T00:00:00Zjunk",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
