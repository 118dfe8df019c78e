//! The SQL of spaces and sessions (tables: `migrations/0004_spaces.sql`).
//!
//! **Lock order.** Every transaction that holds more than one row lock takes them in this
//! order: sessions, then spaces (by id when several), then participant rows. A join locks
//! its session (`FOR SHARE`, so the session cannot end under it) and then the space; ending
//! sessions locks the sessions, then their spaces by id, then deletes the participants (whose
//! trigger updates the spaces it already holds); a leave or a close locks the space before it
//! deletes participants. So no two of them wait for each other in a cycle.

use cascade_core::db::Sql;
use serde::Serialize;
use tokio_postgres::error::SqlState;

use super::error::SpaceError;
use super::model::{Level, ListQuery, NewSpace, SpaceId};

/// The columns [`Space::from_row`] reads, from `collaboration_spaces s JOIN cascade_users u`.
const SPACE_COLUMNS: &str = concat!(
    "s.id, s.space_id, s.title, s.description, u.username, s.max_participants, \
     (s.consciousness_threshold * 100)::int4, s.participant_count, s.is_active, ",
    utc!("s.created_at"),
    ", ",
    utc!("s.closed_at")
);

/// A space as `GET /spaces/{id}` shows it (`GET /spaces` leaves out the participant count,
/// which changes with every join: a list page stays valid across joins).
#[derive(Debug, Clone, Serialize)]
pub struct Space {
    #[serde(skip)]
    pub pk: i32,
    pub space_id: String,
    pub title: String,
    pub description: String,
    /// The creator's username.
    pub creator: String,
    pub max_participants: i32,
    pub consciousness_threshold: Level,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_count: Option<i32>,
    pub is_active: bool,
    pub created_at: String,
    pub closed_at: Option<String>,
}

impl Space {
    fn from_row(row: &tokio_postgres::Row) -> Result<Space, SpaceError> {
        Ok(Space {
            pk: row.get(0),
            space_id: row.get(1),
            title: row.get(2),
            description: row.get(3),
            creator: row.get(4),
            max_participants: row.get(5),
            consciousness_threshold: level(row.get(6))?,
            participant_count: Some(row.get(7)),
            is_active: row.get(8),
            created_at: row.get(9),
            closed_at: row.get(10),
        })
    }
}

/// A level read back from PostgreSQL; the column's CHECK makes a bad one impossible.
pub(super) fn level(hundredths: i32) -> Result<Level, SpaceError> {
    Level::from_hundredths(hundredths).ok_or_else(|| {
        SpaceError::Internal(format!(
            "a stored level of {hundredths} hundredths is outside [0, 1]"
        ))
    })
}

/// The caller's subscription tier, read from the row (not from the login session's cached
/// copy): a tier change applies to the next request on every instance.
pub async fn tier(db: &impl Sql, user_id: i64) -> Result<String, SpaceError> {
    let row = db
        .query_opt(
            "SELECT subscription_tier FROM cascade_users WHERE id = $1",
            &[&user_id],
        )
        .await?
        .ok_or_else(|| SpaceError::NotFound("no such account".into()))?;
    Ok(row.get(0))
}

/// Creates `space`, owned by `creator`; 409 when its id is taken.
pub async fn insert_space(
    db: &impl Sql,
    creator: i64,
    space: &NewSpace,
) -> Result<Space, SpaceError> {
    let row = db
        .query_opt(
            &format!(
                "WITH s AS ( \
                   INSERT INTO collaboration_spaces \
                     (space_id, creator_id, title, description, max_participants, \
                      consciousness_threshold) \
                   VALUES ($1, $2, $3, $4, $5, $6::int4::numeric / 100) \
                   ON CONFLICT (space_id) DO NOTHING RETURNING *) \
                 SELECT {SPACE_COLUMNS} FROM s JOIN cascade_users u ON u.id = s.creator_id"
            ),
            &[
                &space.space_id.as_str(),
                &creator,
                &space.title,
                &space.description,
                &space.max_participants,
                &space.threshold.hundredths(),
            ],
        )
        .await?;
    match row {
        Some(row) => Space::from_row(&row),
        None => Err(SpaceError::Conflict(format!(
            "space id {:?} is taken",
            space.space_id.as_str()
        ))),
    }
}

/// One space, or `None`.
pub async fn space(db: &impl Sql, id: &SpaceId) -> Result<Option<Space>, SpaceError> {
    db.query_opt(
        &format!(
            "SELECT {SPACE_COLUMNS} FROM collaboration_spaces s \
             JOIN cascade_users u ON u.id = s.creator_id WHERE s.space_id = $1"
        ),
        &[&id.as_str()],
    )
    .await?
    .map(|row| Space::from_row(&row))
    .transpose()
}

/// A page of `GET /spaces`: newest first (by internal id, which only grows), and the cursor
/// of the next page when there is one.
#[derive(Debug, Serialize)]
pub struct SpacePage {
    pub items: Vec<Space>,
    pub next_cursor: Option<String>,
}

pub async fn list(db: &impl Sql, query: &ListQuery) -> Result<SpacePage, SpaceError> {
    let rows = db
        .query(
            &format!(
                "SELECT {SPACE_COLUMNS} FROM collaboration_spaces s \
                 JOIN cascade_users u ON u.id = s.creator_id \
                 WHERE ($1::bool IS NULL OR s.is_active = $1) \
                   AND ($2::text IS NULL OR lower(u.username) = $2) \
                   AND ($3::int8 IS NULL OR s.id < $3) \
                 ORDER BY s.id DESC LIMIT $4"
            ),
            &[
                &query.active,
                &query.creator,
                &query.cursor,
                &(query.limit + 1),
            ],
        )
        .await?;
    let mut items = rows
        .iter()
        .map(Space::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let more = items.len() as i64 > query.limit;
    items.truncate(query.limit as usize);
    for item in &mut items {
        item.participant_count = None;
    }
    let next_cursor = more
        .then(|| items.last().map(|s| s.pk.to_string()))
        .flatten();
    Ok(SpacePage { items, next_cursor })
}

/// Who is in a space, in the order they joined.
#[derive(Debug, Serialize)]
pub struct Participants {
    pub space_id: String,
    pub max_participants: i32,
    pub count: usize,
    pub participants: Vec<Participant>,
}

#[derive(Debug, Serialize)]
pub struct Participant {
    pub username: String,
    pub joined_at: String,
}

/// One statement, so the count and the list agree.
pub async fn participants(db: &impl Sql, id: &SpaceId) -> Result<Option<Participants>, SpaceError> {
    let rows = db
        .query(
            concat!(
                "SELECT s.max_participants, u.username, ",
                utc!("p.joined_at"),
                " FROM collaboration_spaces s \
                 LEFT JOIN space_participants p ON p.space_pk = s.id \
                 LEFT JOIN cascade_users u ON u.id = p.user_id \
                 WHERE s.space_id = $1 ORDER BY p.joined_at, p.user_id"
            ),
            &[&id.as_str()],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let participants: Vec<Participant> = rows
        .iter()
        .filter_map(|row| {
            Some(Participant {
                username: row.get::<_, Option<String>>(1)?,
                joined_at: row.get::<_, Option<String>>(2)?,
            })
        })
        .collect();
    Ok(Some(Participants {
        space_id: id.as_str().to_string(),
        max_participants: first.get(0),
        count: participants.len(),
        participants,
    }))
}

/// What [`join`] did.
#[derive(Debug)]
pub struct Joined {
    pub space: Space,
    /// False when the caller was a participant already (nothing changed).
    pub new: bool,
}

/// Joins `user` to the space through their active session for it (bound to this space, else
/// one bound to no space), under the limit. See the module's lock order.
pub async fn join(db: &impl Sql, user: i64, id: &SpaceId) -> Result<Joined, SpaceError> {
    // The threshold never changes: read without a lock, to answer 404 before anything else.
    let space = space(db, id).await?.ok_or_else(|| unknown(id))?;
    // Closing is final, so a closed space read without the lock is closed for good.
    if !space.is_active {
        return Err(closed(id));
    }
    let session = db
        .query_opt(
            "SELECT id, (consciousness_level * 100)::int4 FROM consciousness_sessions \
             WHERE user_id = $1 AND is_active AND (space_id = $2 OR space_id IS NULL) \
             ORDER BY (space_id IS NULL), id DESC LIMIT 1 FOR SHARE",
            &[&user, &id.as_str()],
        )
        .await?
        .ok_or_else(|| {
            SpaceError::Forbidden(format!(
                "joining space {:?} needs an active consciousness session (POST \
                 /consciousness/sessions) bound to it or to no space, of level {} or more; \
                 you have none",
                id.as_str(),
                space.consciousness_threshold
            ))
        })?;
    let (session_id, session_level): (i32, Level) = (session.get(0), level(session.get(1))?);
    if session_level < space.consciousness_threshold {
        return Err(SpaceError::Forbidden(format!(
            "your consciousness level {session_level} (session {session_id}) is below space \
             {:?}'s threshold of {}",
            id.as_str(),
            space.consciousness_threshold
        )));
    }
    let locked = db
        .query_one(
            "SELECT is_active, participant_count, max_participants, \
                    EXISTS (SELECT 1 FROM space_participants WHERE space_pk = $1 AND user_id = $2) \
             FROM collaboration_spaces WHERE id = $1 FOR UPDATE",
            &[&space.pk, &user],
        )
        .await?;
    let (active, count, max, member): (bool, i32, i32, bool) =
        (locked.get(0), locked.get(1), locked.get(2), locked.get(3));
    if !active {
        return Err(closed(id));
    }
    if !member {
        if count >= max {
            return Err(SpaceError::Conflict(format!(
                "space {:?} is full: its limit is {max} participants",
                id.as_str()
            )));
        }
        db.execute(
            "INSERT INTO space_participants (space_pk, user_id, session_id) VALUES ($1, $2, $3)",
            &[&space.pk, &user, &session_id],
        )
        .await
        .map_err(|err| full_by_constraint(err, id, max))?;
    }
    let space = self::space(db, id).await?.ok_or_else(|| unknown(id))?;
    Ok(Joined {
        space,
        new: !member,
    })
}

/// The CHECK behind the limit, should the row lock ever be bypassed: still a 409.
fn full_by_constraint(err: tokio_postgres::Error, id: &SpaceId, max: i32) -> SpaceError {
    if err.code() == Some(&SqlState::CHECK_VIOLATION) {
        SpaceError::Conflict(format!(
            "space {:?} is full: its limit is {max} participants",
            id.as_str()
        ))
    } else {
        err.into()
    }
}

pub(super) fn unknown(id: &SpaceId) -> SpaceError {
    SpaceError::NotFound(format!("no space {:?}", id.as_str()))
}

pub(super) fn closed(id: &SpaceId) -> SpaceError {
    SpaceError::Conflict(format!("space {:?} is closed", id.as_str()))
}

/// Takes `user` out of the space. True when they were in it.
pub async fn leave(db: &impl Sql, user: i64, id: &SpaceId) -> Result<bool, SpaceError> {
    let pk: i32 = db
        .query_opt(
            "SELECT id FROM collaboration_spaces WHERE space_id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        .ok_or_else(|| unknown(id))?
        .get(0);
    let n = db
        .execute(
            "DELETE FROM space_participants WHERE space_pk = $1 AND user_id = $2",
            &[&pk, &user],
        )
        .await?;
    Ok(n > 0)
}

/// What [`close`] did.
#[derive(Debug)]
pub struct Closed {
    pub space: Space,
    /// False when it was closed already.
    pub now: bool,
    /// How many were in it (they have left).
    pub left: u64,
}

/// Closes a space (its creator only: 403 for anyone else) and takes everyone out of it.
pub async fn close(db: &impl Sql, user: i64, id: &SpaceId) -> Result<Closed, SpaceError> {
    let row = db
        .query_opt(
            "SELECT id, creator_id, is_active FROM collaboration_spaces \
             WHERE space_id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        .ok_or_else(|| unknown(id))?;
    let (pk, creator, active): (i32, i64, bool) = (row.get(0), row.get(1), row.get(2));
    if creator != user {
        return Err(SpaceError::Forbidden(format!(
            "only the creator of space {:?} may close it",
            id.as_str()
        )));
    }
    let mut left = 0;
    if active {
        left = db
            .execute("DELETE FROM space_participants WHERE space_pk = $1", &[&pk])
            .await?;
        db.execute(
            "UPDATE collaboration_spaces SET is_active = false, closed_at = now() WHERE id = $1",
            &[&pk],
        )
        .await?;
    }
    let space = space(db, id).await?.ok_or_else(|| unknown(id))?;
    Ok(Closed {
        space,
        now: active,
        left,
    })
}
