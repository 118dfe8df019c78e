//! Who may use the real-time channel `space:{space_id}`: its participants, as of now (a
//! participant who left loses the channel at their next subscribe or publish).

use cascade_http::channels::{Allowed, ChannelAuthorizer};
use cascade_http::{ApiError, AppState};

/// The `space` family's authorizer, registered with the real-time module.
pub struct SpaceParticipants;

const IS_PARTICIPANT: &str = "SELECT EXISTS (SELECT 1 FROM space_participants p \
     JOIN collaboration_spaces s ON s.id = p.space_pk \
     WHERE s.space_id = $1 AND p.user_id = $2)";

impl ChannelAuthorizer for SpaceParticipants {
    fn allows<'a>(&'a self, state: &'a AppState, user_id: i64, id: &'a str) -> Allowed<'a> {
        Box::pin(async move {
            let conn = state.db.conn().await.map_err(ApiError::from)?;
            let stmt = conn
                .prepare_cached(IS_PARTICIPANT)
                .await
                .map_err(|e| ApiError::from(cascade_core::db::DbError::from(e)))?;
            let row = conn
                .query_one(&stmt, &[&id, &user_id])
                .await
                .map_err(|e| ApiError::from(cascade_core::db::DbError::from(e)))?;
            Ok(row.get::<_, bool>(0))
        })
    }
}
