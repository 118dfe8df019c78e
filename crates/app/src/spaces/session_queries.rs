//! The SQL of consciousness sessions (table `consciousness_sessions`,
//! `migrations/0004_spaces.sql`), and of the participations that end with them. The lock
//! order is the one `queries.rs` states: sessions, then spaces by id, then participants.

use cascade_core::db::Sql;
use serde::Serialize;
use tokio_postgres::error::SqlState;

use super::error::SpaceError;
use super::model::{Level, NewSession, SpaceId};
use super::queries::{closed, level, unknown};

/// A consciousness session as its user sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: i32,
    #[serde(skip)]
    pub user_id: i64,
    pub space_id: Option<String>,
    pub consciousness_level: Level,
    /// `consciousness_level` ≥ `VERIFICATION_THRESHOLD` (set by the handler).
    pub verified: bool,
    pub is_active: bool,
    pub started_at: String,
    pub last_activity: String,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    /// Given once, when the session starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
}

const SESSION_COLUMNS: &str = concat!(
    "c.id, c.user_id, c.space_id, (c.consciousness_level * 100)::int4, c.is_active, ",
    utc!("c.started_at"),
    ", ",
    utc!("c.last_activity"),
    ", ",
    utc!("c.ended_at"),
    ", c.end_reason"
);

impl Session {
    fn from_row(row: &tokio_postgres::Row) -> Result<Session, SpaceError> {
        Ok(Session {
            id: row.get(0),
            user_id: row.get(1),
            space_id: row.get(2),
            consciousness_level: level(row.get(3))?,
            verified: false,
            is_active: row.get(4),
            started_at: row.get(5),
            last_activity: row.get(6),
            ended_at: row.get(7),
            end_reason: row.get(8),
            session_token: None,
        })
    }
}

/// Starts a session; 404 for an unknown space, 409 for a closed one or when the user has an
/// active session for that space already (the partial unique index decides races).
pub async fn start_session(
    db: &impl Sql,
    user: i64,
    new: &NewSession,
) -> Result<Session, SpaceError> {
    if let Some(id) = &new.space_id {
        let active: bool = db
            .query_opt(
                "SELECT is_active FROM collaboration_spaces WHERE space_id = $1",
                &[&id.as_str()],
            )
            .await?
            .ok_or_else(|| unknown(id))?
            .get(0);
        if !active {
            return Err(closed(id));
        }
    }
    let space = new.space_id.as_ref().map(SpaceId::as_str);
    let row = db
        .query_one(
            &format!(
                "WITH c AS ( \
                   INSERT INTO consciousness_sessions \
                     (user_id, session_token, consciousness_level, space_id) \
                   VALUES ($1, 'cs_' || replace(gen_random_uuid()::text, '-', ''), \
                           $2::int4::numeric / 100, $3) \
                   RETURNING *) \
                 SELECT {SESSION_COLUMNS}, c.session_token FROM c"
            ),
            &[&user, &new.level.hundredths(), &space],
        )
        .await
        .map_err(|err| match err.code() {
            Some(code) if *code == SqlState::UNIQUE_VIOLATION => {
                SpaceError::Conflict(match space {
                    Some(id) => format!("you have an active session for space {id:?} already"),
                    None => "you have an active session bound to no space already".to_string(),
                })
            }
            _ => err.into(),
        })?;
    let mut session = Session::from_row(&row)?;
    session.session_token = Some(row.get(9));
    Ok(session)
}

/// What a change of level did: the session after it, and its level before.
pub struct LevelChange {
    pub session: Session,
    pub before: Level,
}

/// Sets the level of the user's active session (which counts as activity).
pub async fn set_level(
    db: &impl Sql,
    user: i64,
    id: i32,
    to: Level,
) -> Result<LevelChange, SpaceError> {
    let row = db
        .query_opt(
            &format!(
                "WITH old AS ( \
                   SELECT id, consciousness_level FROM consciousness_sessions \
                   WHERE id = $1 AND user_id = $2 AND is_active FOR UPDATE), \
                 c AS ( \
                   UPDATE consciousness_sessions s \
                   SET consciousness_level = $3::int4::numeric / 100, last_activity = now() \
                   FROM old WHERE s.id = old.id RETURNING s.*) \
                 SELECT {SESSION_COLUMNS}, (old.consciousness_level * 100)::int4 \
                 FROM c JOIN old ON old.id = c.id"
            ),
            &[&id, &user, &to.hundredths()],
        )
        .await?;
    match row {
        Some(row) => Ok(LevelChange {
            session: Session::from_row(&row)?,
            before: level(row.get(9))?,
        }),
        None => Err(inactive_or_missing(db, user, id).await),
    }
}

/// Records activity on the user's active session.
pub async fn heartbeat(db: &impl Sql, user: i64, id: i32) -> Result<Session, SpaceError> {
    let row = db
        .query_opt(
            &format!(
                "WITH c AS (UPDATE consciousness_sessions SET last_activity = now() \
                            WHERE id = $1 AND user_id = $2 AND is_active RETURNING *) \
                 SELECT {SESSION_COLUMNS} FROM c"
            ),
            &[&id, &user],
        )
        .await?;
    match row {
        Some(row) => Session::from_row(&row),
        None => Err(inactive_or_missing(db, user, id).await),
    }
}

/// Why an update of the user's session `id` touched nothing: it is not theirs (or does not
/// exist: 404 either way), or it has ended (409).
async fn inactive_or_missing(db: &impl Sql, user: i64, id: i32) -> SpaceError {
    let found = db
        .query_opt(
            "SELECT end_reason FROM consciousness_sessions WHERE id = $1 AND user_id = $2",
            &[&id, &user],
        )
        .await;
    match found {
        Ok(Some(row)) => SpaceError::Conflict(format!(
            "session {id} has ended ({})",
            row.get::<_, Option<String>>(0).unwrap_or_default()
        )),
        Ok(None) => no_session(id),
        Err(err) => err.into(),
    }
}

pub fn no_session(id: i32) -> SpaceError {
    SpaceError::NotFound(format!("no session {id} of yours"))
}

/// A session that ended, and the spaces its user left because of it.
#[derive(Debug)]
pub struct Ended {
    pub session: i32,
    pub user_id: i64,
    /// `(space_id, username)` of each participation that ended.
    pub left: Vec<(String, String)>,
}

/// Ends the user's session `id` (DELETE). `Ok(None)` when it had ended already.
pub async fn end_session(db: &impl Sql, user: i64, id: i32) -> Result<Option<Ended>, SpaceError> {
    let ended = db
        .query_opt(
            "UPDATE consciousness_sessions \
             SET is_active = false, ended_at = now(), end_reason = 'ended' \
             WHERE id = $1 AND user_id = $2 AND is_active RETURNING id",
            &[&id, &user],
        )
        .await?;
    if ended.is_none() {
        return match inactive_or_missing(db, user, id).await {
            SpaceError::Conflict(_) => Ok(None),
            other => Err(other),
        };
    }
    Ok(leave_ended(db, &[(id, user)]).await?.pop())
}

/// Ends up to `batch` sessions idle for longer than `idle_ms`. Each is ended by exactly one
/// caller cluster-wide: rows another instance's sweep holds are skipped (`SKIP LOCKED`), and
/// the `is_active` condition is checked again on the locked row.
pub async fn end_idle(db: &impl Sql, idle_ms: i64, batch: i64) -> Result<Vec<Ended>, SpaceError> {
    let rows = db
        .query(
            "UPDATE consciousness_sessions \
             SET is_active = false, ended_at = now(), end_reason = 'idle' \
             WHERE id IN (SELECT id FROM consciousness_sessions \
                          WHERE is_active \
                            AND last_activity < now() - $1::int8 * interval '1 millisecond' \
                          ORDER BY last_activity LIMIT $2 FOR UPDATE SKIP LOCKED) \
               AND is_active \
             RETURNING id, user_id",
            &[&idle_ms, &batch],
        )
        .await?;
    let ended: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if ended.is_empty() {
        return Ok(Vec::new());
    }
    leave_ended(db, &ended).await
}

/// Takes the participants of the ended `sessions` out of their spaces: locks those spaces by
/// id first (the module's lock order), then deletes.
async fn leave_ended(db: &impl Sql, sessions: &[(i32, i64)]) -> Result<Vec<Ended>, SpaceError> {
    let ids: Vec<i32> = sessions.iter().map(|(id, _)| *id).collect();
    db.execute(
        "SELECT 1 FROM collaboration_spaces WHERE id IN \
           (SELECT space_pk FROM space_participants WHERE session_id = ANY($1)) \
         ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await?;
    let rows = db
        .query(
            "WITH gone AS (DELETE FROM space_participants WHERE session_id = ANY($1) \
                           RETURNING space_pk, user_id, session_id) \
             SELECT gone.session_id, s.space_id, u.username FROM gone \
             JOIN collaboration_spaces s ON s.id = gone.space_pk \
             JOIN cascade_users u ON u.id = gone.user_id",
            &[&ids],
        )
        .await?;
    Ok(sessions
        .iter()
        .map(|(id, user)| Ended {
            session: *id,
            user_id: *user,
            left: rows
                .iter()
                .filter(|r| r.get::<_, i32>(0) == *id)
                .map(|r| (r.get(1), r.get(2)))
                .collect(),
        })
        .collect())
}
