//! Cache entries of spaces, and which entries each write removes.
//!
//! | entry | namespace : key | tags |
//! |---|---|---|
//! | a space (`GET /spaces/{id}`) | `spaces:<space_id>` | — (removed by key) |
//! | its participants | `space_participants:<space_id>` | — (removed by key) |
//! | a page of `GET /spaces` | `space_lists:<canonical query>` | `spaces-list:<active>:<creator>` |
//!
//! A list page's tag names its filters (`active` as `true`, `false` or `any`; the creator's
//! case-folded username or `*`). A page shows no participant count, so joins and leaves leave
//! every page valid; a create by `C` changes the pages of the lists it belongs to (active or
//! any, by `C` or anyone), a close those and the `false` lists. Pages are keyed by cursor, but
//! a create invalidates the later pages too: ids are handed out before commit, so a space can
//! become visible behind a page that was cached already.

use cascade_core::cache::Invalidations;

pub use crate::config::{SPACE_LISTS, SPACE_PARTICIPANTS, SPACES};

use super::model::ListQuery;

/// The tag of every page of the lists that `query` filters.
pub fn list_tag(query: &ListQuery) -> String {
    let active = match query.active {
        Some(true) => "true",
        Some(false) => "false",
        None => "any",
    };
    tag(active, query.creator.as_deref().unwrap_or("*"))
}

fn tag(active: &str, creator: &str) -> String {
    format!("spaces-list:{active}:{creator}")
}

/// After a space by `creator` (case-folded) was created (`closed`: or closed).
pub fn listed(stale: &mut Invalidations, creator: &str, closed: bool) {
    let states: &[&str] = if closed {
        &["any", "true", "false"]
    } else {
        &["any", "true"]
    };
    stale.tags(
        states
            .iter()
            .flat_map(|state| [tag(state, "*"), tag(state, creator)]),
    );
}

/// After a space's details or participants changed (a join, a leave, a create that replaces
/// a cached "no such space").
pub fn space_changed(stale: &mut Invalidations, space_id: &str) {
    stale
        .keys(SPACES, &[space_id])
        .keys(SPACE_PARTICIPANTS, &[space_id])
        // Its investment totals may hold a cached "no such space" from before the create.
        .keys(
            crate::config::INVESTMENTS,
            &[&crate::investments::totals_key(space_id)],
        );
}
