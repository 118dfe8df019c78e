//! Investments in collaboration spaces (seed 000's economic bridge): `POST /investments`
//! with an `Idempotency-Key`, `GET /investments` (the caller's), `GET /spaces/{id}/investments`
//! (a space's totals, cached).
//!
//! **Exactly once.** The key is claimed by inserting it into `app_idempotency_keys` in the
//! same transaction as the investment and the response that transaction stores; so either
//! both are committed or neither is. A second request with the key waits on the first's row
//! (PostgreSQL's unique index) until the first commits or rolls back, then replays the stored
//! response (same status, same body, and `Idempotent-Replayed: true`) or, if the first rolled
//! back, does the work itself. The body is compared by meaning (space, currency, amount as a
//! number: `"150"` and `"150.00"` are one request); another body under the same key is a 422.
//! Refusals (400, 403, 404, 409, 422) store nothing: they have no effect to protect, and a
//! retry is judged afresh. The write runs in the application's detached tasks, so a client that
//! hangs up cannot cancel it between commit and response: its retry finds the stored answer.
//! Keys are kept `IDEMPOTENCY_KEY_RETENTION` (24 h), as Stripe keeps its own.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cascade_core::cache::Invalidations;
use cascade_core::db::DbError;
use cascade_core::shutdown::ShutdownSignal;
use cascade_http::{ApiError, CurrentUser, JsonBody};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::AppModuleState;
use crate::config::INVESTMENTS;
use crate::economics::{self, Currency, Quote};
use crate::spaces::model::SpaceId;

/// The longest `Idempotency-Key` accepted (Stripe's limit).
pub const KEY_MAX: usize = 255;

/// How long a key is remembered.
pub const KEY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The scope of this route's keys in `app_idempotency_keys` (a key is per user and route).
const SCOPE: &str = "POST /investments";

/// The body of `POST /investments`: exactly one of `usd` and `ducats`, as decimal strings
/// (a JSON number is refused: money never travels as a float).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvestBody {
    /// The space invested in.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$"
    )]
    pub space_id: String,
    /// An amount of USD, at most two decimals.
    #[schema(example = "150.00", pattern = "^[0-9]+(\\.[0-9]{1,2})?$")]
    pub usd: Option<String>,
    /// An amount of ducats, at most two decimals.
    #[schema(example = "1500", pattern = "^[0-9]+(\\.[0-9]{1,2})?$")]
    pub ducats: Option<String>,
}

/// A request's meaning, what the key is bound to.
#[derive(Debug)]
struct Request {
    space_id: String,
    from: Currency,
    amount: Decimal,
}

impl Request {
    fn parse(body: InvestBody) -> Result<Request, ApiError> {
        // A space id as spaces take it (the one parser): a bad one is a 400 naming the field.
        let space_id = SpaceId::parse("space_id", &body.space_id)?;
        let (from, amount) = match (&body.usd, &body.ducats) {
            (Some(usd), None) => (Currency::Usd, economics::parse_amount("usd", usd)?),
            (None, Some(ducats)) => (Currency::Ducats, economics::parse_amount("ducats", ducats)?),
            _ => {
                return Err(ApiError::bad_request(
                    "usd",
                    "give exactly one of usd and ducats",
                ));
            }
        };
        Ok(Request {
            space_id: space_id.as_str().to_string(),
            from,
            amount,
        })
    }

    /// SHA-256 of the request's meaning.
    fn digest(&self) -> Vec<u8> {
        let currency = match self.from {
            Currency::Usd => "usd",
            Currency::Ducats => "ducats",
        };
        let mut hash = Sha256::new();
        for part in [
            self.space_id.as_str(),
            currency,
            &self.amount.normalize().to_string(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.finalize().to_vec()
    }
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let refuse = |why: &str| ApiError::bad_request("Idempotency-Key", why.to_string());
    let value = headers
        .get("idempotency-key")
        .ok_or_else(|| refuse("the Idempotency-Key header is required (e.g. a UUID)"))?;
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > KEY_MAX || !bytes.iter().all(|b| (0x21..0x7f).contains(b))
    {
        return Err(refuse(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn split_json(split: &economics::Split) -> Value {
    json!({
        "gross": split.gross.to_string(),
        "fee": split.fee.to_string(),
        "net": split.net.to_string(),
    })
}

/// `POST /investments`.
#[utoipa::path(post, path = "/investments", tag = "economics", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1 to 255 visible ASCII characters, e.g. a UUID; a retry with the same key and body returns the first response", min_length = 1, max_length = 255)),
    request_body = InvestBody,
    responses(
        (status = 201, description = "The investment, recorded once (a replay carries `Idempotent-Replayed: true`)", body = crate::openapi::Investment),
        (status = 400, description = "A malformed body, amount or Idempotency-Key"),
        (status = 401, description = "No valid access token"),
        (status = 403, description = "The caller's subscription tier does not allow investing"),
        (status = 404, description = "No such space"),
        (status = 409, description = "The space is closed"),
        (status = 422, description = "Below MIN_INVESTMENT_USD after conversion, or the key was used with another body"),
    )
)]
pub async fn invest(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<InvestBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let request = Request::parse(body)?;
    let quote = economics::quote(&state.config.economy, request.from, request.amount);
    let digest = request.digest();
    let task_state = state.clone();
    let user_id = me.user_id;
    let (status, body, replayed) = state
        .app
        .detached
        .clone()
        .run(async move { record(&task_state, user_id, key, request, digest, quote).await })
        .await
        .map_err(|stopping| ApiError::Unavailable {
            message: stopping.to_string(),
            retry_after: Duration::from_secs(1),
        })??;
    let status = StatusCode::from_u16(status).map_err(|e| ApiError::Internal(e.into()))?;
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The transaction: claim the key (or wait for and replay its first use), check the space,
/// insert the investment and the response; then invalidate the space's totals and the
/// investor's pages. `(status, body, replayed)`.
async fn record(
    state: &AppModuleState,
    user_id: i64,
    key: String,
    request: Request,
    digest: Vec<u8>,
    quote: Quote,
) -> Result<(u16, String, bool), ApiError> {
    let db_error = |err: tokio_postgres::Error| ApiError::from(DbError::from(err));
    let mut conn = state.app.db.conn().await?;
    let tx = conn.transaction().await.map_err(db_error)?;
    // A key used before answers as it did then, whatever changed since (the caller's tier,
    // the minimum, the rate): a client retrying a lost 201 must not be told it failed.
    if let Some(replay) = stored(&tx, user_id, &key, &digest).await? {
        return Ok(replay);
    }
    // The tier as the account's row has it now (not the session's copy): a tier change
    // applies to the next request on every instance.
    let tier: String = tx
        .query_one(
            "SELECT subscription_tier FROM cascade_users WHERE id = $1",
            &[&user_id],
        )
        .await
        .map_err(db_error)?
        .get(0);
    crate::tiers::check(crate::tiers::Feature::Invest, &tier)
        .map_err(|refused| ApiError::Forbidden(refused.to_string()))?;
    if !quote.meets_minimum {
        return Err(ApiError::Unprocessable(format!(
            "{} USD is below the minimum investment of {} USD",
            quote.usd.gross, quote.min_investment_usd
        )));
    }
    // Waits while another transaction holds the same key, until it commits or rolls back.
    let claimed = tx
        .execute(
            "INSERT INTO app_idempotency_keys (user_id, scope, key, request_hash, status, body) \
             VALUES ($1, $2, $3, $4, 0, '') ON CONFLICT DO NOTHING",
            &[&user_id, &SCOPE, &key, &digest],
        )
        .await
        .map_err(db_error)?;
    if claimed == 0 {
        // The concurrent first use committed meanwhile: its answer.
        return stored(&tx, user_id, &key, &digest)
            .await?
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a claimed key without a row")));
    }
    let space = tx
        .query_opt(
            "SELECT is_active FROM collaboration_spaces WHERE space_id = $1 FOR SHARE",
            &[&request.space_id],
        )
        .await
        .map_err(db_error)?;
    match space {
        None => {
            return Err(ApiError::NotFound(format!(
                "no space {:?}",
                request.space_id
            )));
        }
        Some(row) if !row.get::<_, bool>(0) => {
            return Err(ApiError::Conflict(format!(
                "space {:?} is closed",
                request.space_id
            )));
        }
        Some(_) => {}
    }
    let currency = match request.from {
        Currency::Usd => "usd",
        Currency::Ducats => "ducats",
    };
    let text = |d: Decimal| d.to_string();
    let row = tx
        .query_one(
            "INSERT INTO investments (user_id, space_id, given_currency, \
                 usd_gross, usd_fee, usd_net, ducats_gross, ducats_fee, ducats_net, rate, fee_percent) \
             VALUES ($1, $2, $3, $4::text::numeric, $5::text::numeric, $6::text::numeric, \
                     $7::text::numeric, $8::text::numeric, $9::text::numeric, \
                     $10::text::numeric, $11::text::numeric) \
             RETURNING id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            &[
                &user_id,
                &request.space_id,
                &currency,
                &text(quote.usd.gross),
                &text(quote.usd.fee),
                &text(quote.usd.net),
                &text(quote.ducats.gross),
                &text(quote.ducats.fee),
                &text(quote.ducats.net),
                &text(quote.rate),
                &text(quote.fee_percent),
            ],
        )
        .await
        .map_err(db_error)?;
    let id: i64 = row.get(0);
    let created_at: String = row.get(1);
    let body = json!({
        "id": id,
        "space_id": request.space_id,
        "from": currency,
        "usd": split_json(&quote.usd),
        "ducats": split_json(&quote.ducats),
        "rate": quote.rate.to_string(),
        "fee_percent": quote.fee_percent.to_string(),
        "created_at": created_at,
    })
    .to_string();
    tx.execute(
        "UPDATE app_idempotency_keys SET status = 201, body = $4 \
         WHERE user_id = $1 AND scope = $2 AND key = $3",
        &[&user_id, &SCOPE, &key, &body],
    )
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    drop(conn);
    let mut stale = Invalidations::new();
    stale.tags([space_tag(&request.space_id), investor_tag(user_id)]);
    state.app.cache.invalidate_batch(&stale).await;
    // After the commit: the space's channel hears of it (the amounts as strings, as served).
    let _ = state
        .app
        .events
        .publish(
            &format!("space:{}", request.space_id),
            "investment.created",
            json!({
                "id": id,
                "space_id": request.space_id,
                "user_id": user_id,
                "usd": split_json(&quote.usd),
                "ducats": split_json(&quote.ducats),
            }),
        )
        .await;
    Ok((201, body, false))
}

/// The stored answer of `key`, if it was used before: `(status, body, true)`; a 422 when it
/// was used with another request.
async fn stored(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: i64,
    key: &str,
    digest: &[u8],
) -> Result<Option<(u16, String, bool)>, ApiError> {
    let row = tx
        .query_opt(
            "SELECT request_hash, status, body FROM app_idempotency_keys \
             WHERE user_id = $1 AND scope = $2 AND key = $3",
            &[&user_id, &SCOPE, &key],
        )
        .await
        .map_err(|err| ApiError::from(DbError::from(err)))?;
    let Some(row) = row else { return Ok(None) };
    let hash: Vec<u8> = row.get(0);
    if hash != digest {
        return Err(ApiError::Unprocessable(
            "this Idempotency-Key was used with another request body".into(),
        ));
    }
    let status: i16 = row.get(1);
    Ok(Some((status as u16, row.get(2), true)))
}

/// The cache key of a space's totals (namespace `investments`).
pub fn totals_key(space_id: &str) -> String {
    format!("space:{space_id}")
}

fn space_tag(space_id: &str) -> String {
    format!("investments:space:{space_id}")
}

fn investor_tag(user_id: i64) -> String {
    format!("investments:user:{user_id}")
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// At most this many, 1 to 100 [default: 20].
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    pub cursor: Option<String>,
}

/// `GET /investments`: the caller's, newest first, `{"investments": [...], "next_cursor"}`.
#[utoipa::path(get, path = "/investments", tag = "economics", security(("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "The caller's investments, newest first", body = crate::openapi::InvestmentPage),
        (status = 400, description = "A bad limit or cursor"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn mine(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let limit: i64 = match params.limit.as_deref() {
        None => 20,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit", "limit must be 1 to 100"))?,
    };
    let before: i64 = match params.cursor.as_deref() {
        None => i64::MAX,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| *n > 0 && !text.starts_with('+'))
            .ok_or_else(|| ApiError::bad_request("cursor", "not a cursor this API gave"))?,
    };
    let key = format!("user:{}:{before}:{limit}", me.user_id);
    let db = state.app.db.clone();
    let user_id = me.user_id;
    let (body, _) = state
        .app
        .cache
        .get_or_load_bytes(INVESTMENTS, &key, &[investor_tag(user_id)], || async move {
            let conn = db.conn().await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT id, {INVESTMENT_JSON} FROM investments \
                         WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
                    ),
                    &[&user_id, &before, &(limit + 1)],
                )
                .await
                .map_err(DbError::from)?;
            let more = rows.len() as i64 > limit;
            let page = &rows[..rows.len().min(limit as usize)];
            let items: Vec<String> = page.iter().map(|row| row.get(1)).collect();
            let next = match page.last() {
                Some(row) if more => format!("\"{}\"", row.get::<_, i64>(0)),
                _ => "null".to_string(),
            };
            let body = format!(
                "{{\"investments\":[{}],\"next_cursor\":{next}}}",
                items.join(",")
            );
            Ok::<_, ApiError>(Some(body.into_bytes()))
        })
        .await?;
    Ok(json_response(body.map(|b| b.to_vec()).unwrap_or_default()))
}

/// One investment as JSON text, built by PostgreSQL: amounts as decimal strings.
const INVESTMENT_JSON: &str = "json_build_object(\
    'id', id, 'space_id', space_id, 'from', given_currency, \
    'usd', json_build_object('gross', usd_gross::text, 'fee', usd_fee::text, 'net', usd_net::text), \
    'ducats', json_build_object('gross', ducats_gross::text, 'fee', ducats_fee::text, 'net', ducats_net::text), \
    'rate', rate::text, 'fee_percent', fee_percent::text, \
    'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))::text";

fn json_response(body: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `GET /spaces/{id}/investments`: a space's totals, cached until the next investment in it.
#[utoipa::path(get, path = "/spaces/{space_id}/investments", tag = "economics",
    params(("space_id" = String, Path, description = "The space", min_length = 1, max_length = 100, pattern = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$")),
    responses(
        (status = 200, description = "The number of investments in the space and their sums in both currencies (decimal strings)", body = crate::openapi::SpaceInvestments),
        (status = 400, description = "A malformed space id"),
        (status = 404, description = "No such space"),
    )
)]
pub async fn space_totals(
    State(state): State<AppModuleState>,
    Path(space_id): Path<String>,
) -> Result<Response, ApiError> {
    let space_id = SpaceId::parse("space_id", &space_id)?.as_str().to_string();
    let db = state.app.db.clone();
    let key = totals_key(&space_id);
    let tags = [space_tag(&space_id)];
    let id = space_id.clone();
    let (body, _) = state
        .app
        .cache
        .get_or_load_bytes(INVESTMENTS, &key, &tags, || async move {
            let conn = db.conn().await?;
            let row = conn
                .query_opt(
                    "SELECT json_build_object('space_id', s.space_id, \
                         'investments', count(i.id), \
                         'usd', json_build_object('gross', coalesce(sum(i.usd_gross), 0.00)::text, \
                                                  'fee', coalesce(sum(i.usd_fee), 0.00)::text, \
                                                  'net', coalesce(sum(i.usd_net), 0.00)::text), \
                         'ducats', json_build_object('gross', coalesce(sum(i.ducats_gross), 0.00)::text, \
                                                     'fee', coalesce(sum(i.ducats_fee), 0.00)::text, \
                                                     'net', coalesce(sum(i.ducats_net), 0.00)::text))::text \
                     FROM collaboration_spaces s LEFT JOIN investments i ON i.space_id = s.space_id \
                     WHERE s.space_id = $1 GROUP BY s.space_id",
                    &[&id],
                )
                .await
                .map_err(DbError::from)?;
            Ok::<_, ApiError>(row.map(|row| row.get::<_, String>(0).into_bytes()))
        })
        .await?;
    match body {
        Some(body) => Ok(json_response(body.to_vec())),
        None => Err(ApiError::NotFound(format!("no space {space_id:?}"))),
    }
}

/// Deletes idempotency keys older than [`KEY_RETENTION`], in bounded batches, every hour.
pub async fn prune_keys(db: cascade_core::db::Db, mut stop: ShutdownSignal) {
    loop {
        loop {
            let deleted = match db.conn().await {
                Ok(conn) => conn
                    .execute(
                        "DELETE FROM app_idempotency_keys WHERE ctid IN \
                         (SELECT ctid FROM app_idempotency_keys \
                          WHERE created_at < now() - make_interval(secs => $1) LIMIT 1000)",
                        &[&(KEY_RETENTION.as_secs_f64())],
                    )
                    .await
                    .unwrap_or_else(|err| {
                        tracing::warn!(error = %err, "pruning idempotency keys failed");
                        0
                    }),
                Err(err) => {
                    tracing::warn!(error = %err, "pruning idempotency keys: no connection");
                    0
                }
            };
            if deleted < 1000 {
                break;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            () = stop.recv() => return,
        }
    }
}
