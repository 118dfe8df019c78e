//! Input parsed into values that cannot be wrong: [`NewAgent`], [`AgentPatch`], [`ListQuery`],
//! [`AuditQuery`]. Each parse names the offending field (`agents[2].name`); nothing reaches
//! PostgreSQL before it passed.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::AgentError;

/// Most bytes of an agent's `config` (as compact JSON).
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Most capabilities of one agent.
pub const MAX_CAPABILITIES: usize = 32;
/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// The largest page of a list.
pub const MAX_LIMIT: i64 = 100;
pub const DEFAULT_LIMIT: i64 = 20;

/// What an agent can be.
pub const STATUSES: [&str; 3] = ["active", "inactive", "paused"];

/// An agent to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAgent {
    pub name: String,
    pub kind: String,
    pub config: Value,
    pub capabilities: Vec<String>,
    pub status: String,
}

/// A change to an agent: the fields present are replaced, the others kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentPatch {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub config: Option<Value>,
    pub capabilities: Option<Vec<String>>,
    pub status: Option<String>,
}

impl AgentPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == AgentPatch::default()
    }
}

const FIELDS: [&str; 5] = ["name", "type", "config", "capabilities", "status"];

fn object<'a>(at: &str, value: &'a Value) -> Result<&'a Map<String, Value>, AgentError> {
    let object = value
        .as_object()
        .ok_or_else(|| AgentError::invalid(field_path(at, ""), "must be a JSON object"))?;
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(AgentError::invalid(
            field_path(at, &unknown.replace('\0', "\\u0000")),
            format!("unknown field; the fields are {}", FIELDS.join(", ")),
        ));
    }
    Ok(object)
}

/// `at.field`, or `field` at the top.
fn field_path(at: &str, field: &str) -> String {
    match (at.is_empty(), field.is_empty()) {
        (true, true) => "body".into(),
        (true, false) => field.into(),
        (false, true) => at.into(),
        (false, false) => format!("{at}.{field}"),
    }
}

impl NewAgent {
    /// The body of `POST /agents`; `at` prefixes field names (`agents[3]` in a bulk create).
    pub fn parse(at: &str, value: &Value) -> Result<NewAgent, AgentError> {
        let object = object(at, value)?;
        let required = |field: &str| {
            object
                .get(field)
                .ok_or_else(|| AgentError::invalid(field_path(at, field), "is required"))
        };
        Ok(NewAgent {
            name: name(&field_path(at, "name"), required("name")?)?,
            kind: word(&field_path(at, "type"), required("type")?)?,
            config: match object.get("config") {
                None => Value::Object(Map::new()),
                Some(config) => parse_config(&field_path(at, "config"), config)?,
            },
            capabilities: match object.get("capabilities") {
                None => Vec::new(),
                Some(list) => capabilities(&field_path(at, "capabilities"), list)?,
            },
            status: match object.get("status") {
                None => "active".into(),
                Some(status) => parse_status(&field_path(at, "status"), status)?,
            },
        })
    }

    /// The body of `POST /agents/bulk`: `{"agents": [...]}`, 1 to `max` of them.
    pub fn parse_bulk(value: &Value, max: usize) -> Result<Vec<NewAgent>, AgentError> {
        let object = value
            .as_object()
            .ok_or_else(|| AgentError::invalid("body", "must be a JSON object"))?;
        if let Some(unknown) = object.keys().find(|k| *k != "agents") {
            return Err(AgentError::invalid(
                unknown.replace('\0', "\\u0000"),
                "unknown field; the body is {\"agents\": [...]}",
            ));
        }
        let list = object
            .get("agents")
            .ok_or_else(|| AgentError::invalid("agents", "is required"))?
            .as_array()
            .ok_or_else(|| AgentError::invalid("agents", "must be an array of agents"))?;
        if list.is_empty() || list.len() > max {
            return Err(AgentError::invalid(
                "agents",
                format!("must hold 1 to {max} agents, got {}", list.len()),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, item)| NewAgent::parse(&format!("agents[{i}]"), item))
            .collect()
    }
}

impl AgentPatch {
    /// The body of `PATCH /agents/{id}`: the fields present are replaced; `{}` changes nothing.
    pub fn parse(value: &Value) -> Result<AgentPatch, AgentError> {
        let object = object("", value)?;
        Ok(AgentPatch {
            name: object.get("name").map(|v| name("name", v)).transpose()?,
            kind: object.get("type").map(|v| word("type", v)).transpose()?,
            config: object
                .get("config")
                .map(|v| parse_config("config", v))
                .transpose()?,
            capabilities: object
                .get("capabilities")
                .map(|v| capabilities("capabilities", v))
                .transpose()?,
            status: object
                .get("status")
                .map(|v| parse_status("status", v))
                .transpose()?,
        })
    }
}

/// A name: 1 to 200 characters, no control characters.
pub fn name(field: &str, value: &Value) -> Result<String, AgentError> {
    let text = value
        .as_str()
        .ok_or_else(|| AgentError::invalid(field, "must be a string"))?;
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(AgentError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(AgentError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(text.to_string())
}

/// A type or a capability: lowercase letters, digits, `_ . -`, 1 to 64, starting with a letter
/// or digit (as the table's CHECK says).
fn word(field: &str, value: &Value) -> Result<String, AgentError> {
    let text = value
        .as_str()
        .ok_or_else(|| AgentError::invalid(field, "must be a string"))?;
    parse_word(field, text)
}

/// [`word`] of a text (query parameters).
pub fn parse_word(field: &str, text: &str) -> Result<String, AgentError> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && (text.as_bytes()[0].is_ascii_lowercase() || text.as_bytes()[0].is_ascii_digit());
    if ok {
        Ok(text.to_string())
    } else {
        Err(AgentError::invalid(
            field,
            "must be 1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
        ))
    }
}

fn capabilities(field: &str, value: &Value) -> Result<Vec<String>, AgentError> {
    let list = value
        .as_array()
        .ok_or_else(|| AgentError::invalid(field, "must be an array of strings"))?;
    if list.len() > MAX_CAPABILITIES {
        return Err(AgentError::invalid(
            field,
            format!("at most {MAX_CAPABILITIES} capabilities"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let capability = word(&format!("{field}[{i}]"), item)?;
        // A set: a repeated capability says nothing new.
        if !out.contains(&capability) {
            out.push(capability);
        }
    }
    Ok(out)
}

fn parse_status(field: &str, value: &Value) -> Result<String, AgentError> {
    value.as_str().and_then(status_word).ok_or_else(|| {
        AgentError::invalid(field, format!("must be one of {}", STATUSES.join(", ")))
    })
}

/// A status, when `text` is one.
pub fn status_word(text: &str) -> Option<String> {
    STATUSES.contains(&text).then(|| text.to_string())
}

/// An agent's configuration: a JSON object of at most [`MAX_CONFIG_BYTES`] that PostgreSQL's
/// `jsonb` can store (no NUL in any key or string).
fn parse_config(field: &str, value: &Value) -> Result<Value, AgentError> {
    if !value.is_object() {
        return Err(AgentError::invalid(field, "must be a JSON object"));
    }
    if has_nul(value) {
        return Err(AgentError::invalid(
            field,
            "must not contain a NUL character (\\u0000) in any key or string",
        ));
    }
    let size = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
    if size > MAX_CONFIG_BYTES {
        return Err(AgentError::invalid(
            field,
            format!("at most {MAX_CONFIG_BYTES} bytes of JSON, got {size}"),
        ));
    }
    Ok(value.clone())
}

/// Whether a NUL is in any key or string of `value` (PostgreSQL cannot store one).
pub fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The query string of `GET /agents`.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    pub status: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub capability: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// `GET /agents`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub capability: Option<String>,
    pub limit: i64,
    /// Agents with ids below this one (the last id of the previous page).
    pub before_id: Option<i64>,
}

impl ListQuery {
    pub fn parse(params: &ListParams) -> Result<ListQuery, AgentError> {
        Ok(ListQuery {
            status: params
                .status
                .as_deref()
                .map(|s| {
                    status_word(s).ok_or_else(|| {
                        AgentError::invalid(
                            "status",
                            format!("must be one of {}", STATUSES.join(", ")),
                        )
                    })
                })
                .transpose()?,
            kind: params
                .kind
                .as_deref()
                .map(|s| parse_word("type", s))
                .transpose()?,
            capability: params
                .capability
                .as_deref()
                .map(|s| parse_word("capability", s))
                .transpose()?,
            limit: parse_limit(params.limit.as_deref())?,
            before_id: parse_cursor(params.cursor.as_deref())?,
        })
    }

    /// The cache key of this page, for `owner`: every field, in a fixed order.
    pub fn key(&self, owner: i64) -> String {
        format!(
            "{owner}:s={}:t={}:c={}:l={}:b={}",
            self.status.as_deref().unwrap_or("*"),
            self.kind.as_deref().unwrap_or("*"),
            self.capability.as_deref().unwrap_or("*"),
            self.limit,
            self.before_id.map_or("*".to_string(), |b| b.to_string()),
        )
    }
}

/// `limit`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
pub fn parse_limit(raw: Option<&str>) -> Result<i64, AgentError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                AgentError::invalid(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_LIMIT}"),
                )
            }),
    }
}

/// `cursor`: the `next_cursor` a previous page gave (a positive id).
pub fn parse_cursor(raw: Option<&str>) -> Result<Option<i64>, AgentError> {
    raw.map(|text| {
        parse_id_text(text).ok_or_else(|| {
            AgentError::invalid("cursor", "must be the next_cursor of a previous page")
        })
    })
    .transpose()
}

/// A positive id in decimal.
pub fn parse_id_text(text: &str) -> Option<i64> {
    // As the documented pattern `^[1-9][0-9]{0,17}$`: one spelling per id.
    (!text.is_empty()
        && text.len() <= 18
        && !text.starts_with('0')
        && text.bytes().all(|b| b.is_ascii_digit()))
    .then(|| text.parse::<i64>().ok())
    .flatten()
    .filter(|id| *id > 0)
}

/// The query string of `GET /audit`.
#[derive(Debug, Default, Deserialize)]
pub struct AuditParams {
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub action: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// `GET /audit/all`'s parameters: `GET /audit`'s and `actor`.
#[derive(Debug, Default, Deserialize)]
pub struct AllAuditParams {
    pub actor: Option<String>,
    #[serde(flatten)]
    pub rest: AuditParams,
}

/// `GET /audit` and `GET /audit/all`, parsed: `actor` is the caller's own (an account's
/// rows) or the operator's choice (`None`: every actor).
pub fn audit_filter(
    params: &AuditParams,
    actor: Option<String>,
) -> Result<cascade_core::audit::Filter, AgentError> {
    let text = |field: &str, value: &Option<String>| -> Result<Option<String>, AgentError> {
        match value {
            Some(v) if v.is_empty() || v.chars().count() > 200 || v.contains('\0') => Err(
                AgentError::invalid(field, "must be 1 to 200 bytes with no NUL"),
            ),
            other => Ok(other.clone()),
        }
    };
    let time = |field: &str, value: &Option<String>| -> Result<Option<i64>, AgentError> {
        value
            .as_deref()
            .map(|v| {
                cascade_core::audit::parse_rfc3339_ms(v).ok_or_else(|| {
                    AgentError::invalid(
                        field,
                        "must be an RFC 3339 time, e.g. 2026-12-03T16:30:00Z",
                    )
                })
            })
            .transpose()
    };
    if let Some(actor) = &actor {
        text("actor", &Some(actor.clone()))?;
    }
    Ok(cascade_core::audit::Filter {
        actor,
        action: text("action", &params.action)?,
        entity_type: text("entity_type", &params.entity_type)?,
        entity_id: text("entity_id", &params.entity_id)?,
        since_ms: time("since", &params.since)?,
        until_ms: time("until", &params.until)?,
        before_id: parse_cursor(params.cursor.as_deref())?,
        limit: parse_limit(params.limit.as_deref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(err: AgentError) -> String {
        match err {
            AgentError::Invalid { field, .. } => field,
            other => panic!("not a 400: {other}"),
        }
    }

    #[test]
    fn a_new_agent_takes_defaults_and_names_the_bad_field() {
        let agent = NewAgent::parse("", &json!({"name": "Scout", "type": "chat"})).unwrap();
        assert_eq!(agent.name, "Scout");
        assert_eq!(agent.status, "active");
        assert_eq!(agent.config, json!({}));
        for (body, field) in [
            (json!({"type": "chat"}), "name"),
            (json!({"name": "a\nb", "type": "chat"}), "name"),
            (json!({"name": "a", "type": "Chat"}), "type"),
            (
                json!({"name": "a", "type": "chat", "status": "gone"}),
                "status",
            ),
            (json!({"name": "a", "type": "chat", "config": []}), "config"),
            (
                json!({"name": "a", "type": "chat", "config": {"k": "\u{0}"}}),
                "config",
            ),
            (
                json!({"name": "a", "type": "chat", "capabilities": ["ok", 3]}),
                "capabilities[1]",
            ),
            (json!({"name": "a", "type": "chat", "owner": 1}), "owner"),
            (json!("text"), "body"),
        ] {
            assert_eq!(
                field_of(NewAgent::parse("", &body).unwrap_err()),
                field,
                "{body}"
            );
        }
    }

    #[test]
    fn bulk_names_the_item_and_bounds_the_count() {
        let ok = json!({"name": "a", "type": "t"});
        let bad = json!({"agents": [ok, ok, {"name": "", "type": "t"}]});
        assert_eq!(
            field_of(NewAgent::parse_bulk(&bad, 10).unwrap_err()),
            "agents[2].name"
        );
        let many = json!({"agents": [ok, ok, ok]});
        assert_eq!(
            field_of(NewAgent::parse_bulk(&many, 2).unwrap_err()),
            "agents"
        );
        assert_eq!(NewAgent::parse_bulk(&many, 3).unwrap().len(), 3);
    }

    #[test]
    fn a_patch_needs_a_field_and_list_parameters_are_checked() {
        assert!(AgentPatch::parse(&json!({})).unwrap().is_empty());
        let patch = AgentPatch::parse(&json!({"status": "paused"})).unwrap();
        assert_eq!(patch.status.as_deref(), Some("paused"));
        let bad_limit = ListParams {
            limit: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(field_of(ListQuery::parse(&bad_limit).unwrap_err()), "limit");
        let bad_cursor = ListParams {
            cursor: Some("-4".into()),
            ..Default::default()
        };
        assert_eq!(
            field_of(ListQuery::parse(&bad_cursor).unwrap_err()),
            "cursor"
        );
    }
}
