//! The platform's part of the OpenAPI document: the error shape and its codes, the bearer
//! scheme, and the responses every route can give because of the platform rather than its
//! handler (a body over the limit, a timeout, PostgreSQL away, a rate limit).
//!
//! A module documents what its handlers decide (`#[utoipa::path]` on each handler: its
//! parameters, body, success responses and the errors it returns itself, with a description
//! only); [`complete`] then fills in, for every operation, the platform's responses and the
//! error body, headers and status codes they carry. So the error shape is described once, here,
//! next to [`ApiError`](crate::ApiError) which renders it.

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, OpenApi, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// The name of the bearer security scheme: `security(("bearer" = []))` on a route that
/// takes [`CurrentUser`](crate::CurrentUser).
pub const BEARER: &str = "bearer";

/// The operators' scheme: `Authorization: Bearer <ADMIN_TOKEN>` (`GET /health/db`).
pub const ADMIN: &str = "admin";

/// Every error body: `{"error": {"code", "message", "field"?}}`.
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)] // a description of what `ApiError` renders, never built
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    code: ErrorCode,
    /// For a person; may change between releases. Act on `code`.
    message: String,
    /// The input the error is about (`versionId`, `limit`, `username`…), on 400s that have one.
    #[schema(nullable = false)]
    field: Option<String>,
}

/// The stable machine codes, one per kind of failure ([`ApiError`](crate::ApiError) and
/// [`code_for_status`](crate::error::code_for_status) are the table).
#[derive(ToSchema, serde::Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Timeout,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unprocessable,
    RateLimited,
    Unavailable,
    BillingNotConfigured,
    Internal,
    Error,
}

impl ErrorCode {
    pub const ALL: &[ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Timeout,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Unprocessable,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::BillingNotConfigured,
        ErrorCode::Internal,
        ErrorCode::Error,
    ];

    /// The code as it appears in a body.
    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// Free-form JSON as the platform accepts it: any object, but no NUL (U+0000) in a key or a
/// string at any depth (PostgreSQL's `jsonb` cannot store one; bodies with one are a 400).
/// Its full schema is recursive and uses `items` on an untyped schema, which utoipa's model
/// cannot spell; [`render`] writes it into the document as JSON.
pub struct JsonObject;

impl utoipa::PartialSchema for JsonObject {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        ObjectBuilder::new().schema_type(Type::Object).into()
    }
}

impl ToSchema for JsonObject {}

/// The schemas [`JsonObject`] stands for, by name.
fn json_schemas() -> serde_json::Value {
    let no_nul = serde_json::json!({ "pattern": "^[^\\x00]*$" });
    let value = serde_json::json!({ "$ref": "#/components/schemas/JsonValue" });
    serde_json::json!({
        "JsonObject": {
            "type": "object",
            "description": "A JSON object; no NUL (U+0000) in any key or string, at any depth.",
            "propertyNames": no_nul,
            "additionalProperties": value,
        },
        "JsonValue": {
            "description": "Any JSON value; no NUL (U+0000) in any key or string.",
            "pattern": "^[^\\x00]*$",
            "propertyNames": no_nul,
            "additionalProperties": value,
            "items": value,
        },
    })
}

/// The document as served: `doc` in JSON, with the schemas utoipa cannot spell written in.
pub fn render(doc: &OpenApi) -> serde_json::Value {
    let mut json = serde_json::to_value(doc).unwrap_or_default();
    if let Some(schemas) = json
        .pointer_mut("/components/schemas")
        .and_then(|s| s.as_object_mut())
        && let serde_json::Value::Object(extra) = json_schemas()
    {
        schemas.extend(extra);
    }
    json
}

/// What a status means when the platform adds it, or when a handler lists it without saying.
fn default_description(status: &str) -> &'static str {
    match status {
        "400" => "The input is malformed; `error.field` names it when there is one.",
        "401" => "No bearer token, or one that is invalid, expired or revoked.",
        "403" => "Authenticated, but not allowed.",
        "404" => "Not found.",
        "409" => "Conflicts with what exists.",
        "413" => "The body is larger than BODY_LIMIT_BYTES.",
        "415" => "The body is not `application/json`.",
        "429" => "Over a rate limit: retry after `Retry-After` seconds.",
        "500" => "An internal error; the server log has it under the `x-request-id`.",
        "503" => "PostgreSQL is unavailable: retry after `Retry-After` seconds.",
        "504" => "The request did not finish within REQUEST_TIMEOUT.",
        _ => "An error.",
    }
}

fn integer_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0)),
        )
        .description(Some(description))
        .build()
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(String::schema())
        .description(Some(description))
        .build()
}

/// `RateLimit-*` (IETF draft "RateLimit header fields for HTTP"), on responses to requests
/// that were counted against a limit.
fn add_rate_limit_headers(response: &mut Response) {
    let headers = [
        ("RateLimit-Limit", "Requests allowed in the window.", true),
        ("RateLimit-Remaining", "Requests left in the window.", true),
        (
            "RateLimit-Reset",
            "Seconds until the budget is full again.",
            true,
        ),
        (
            "RateLimit-Policy",
            "The limit, as `<limit>;w=<seconds>`.",
            false,
        ),
    ];
    for (name, description, integer) in headers {
        let header = if integer {
            integer_header(description)
        } else {
            string_header(description)
        };
        response.headers.entry(name.to_string()).or_insert(header);
    }
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "Error",
                ))))
                .build(),
        )
        .build()
}

/// Adds `status` with the platform's description unless the operation lists it already.
fn ensure(operation: &mut Operation, status: &str) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::T(error_response(default_description(status))));
}

/// Whether the operation takes an account's bearer token ([`BEARER`]), so
/// [`CurrentUser`](crate::CurrentUser) with its 401 and `RATE_LIMIT_API`.
fn is_authenticated(operation: &Operation) -> bool {
    serde_json::to_value(&operation.security)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|requirements| requirements.iter().any(|r| r.get(BEARER).is_some()))
}

/// Completes a document whose operations were described by their handlers: the error
/// schema and the bearer scheme as components, and on every operation the responses the
/// platform adds (see the module documentation), each error with the `Error` body and the
/// headers its status carries.
pub fn complete(doc: &mut OpenApi) {
    let components = doc
        .components
        .get_or_insert_with(|| ComponentsBuilder::new().build());
    let mut schemas = Vec::new();
    <ErrorBody as ToSchema>::schemas(&mut schemas);
    components.schemas.insert(
        <ErrorBody as ToSchema>::name().into_owned(),
        ErrorBody::schema(),
    );
    components.schemas.extend(schemas);
    components.security_schemes.insert(
        ADMIN.to_string(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The operators' token, ADMIN_TOKEN (not an account's).",
                ))
                .build(),
        ),
    );
    components.security_schemes.insert(
        BEARER.to_string(),
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").description(Some(
            "The `access_token` of `POST /auth/register`, `/auth/login` or `/auth/refresh`.",
        )).build()),
    );

    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            complete_operation(operation);
        }
    }
}

fn complete_operation(operation: &mut Operation) {
    for status in ["500", "503", "504"] {
        ensure(operation, status);
    }
    if is_authenticated(operation) {
        ensure(operation, "401");
        ensure(operation, "429");
    }
    if operation.request_body.is_some() {
        for status in ["400", "413", "415"] {
            ensure(operation, status);
        }
    }
    if operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
        ensure(operation, "400");
    }
    let counted = operation.responses.responses.contains_key("429");
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let is_error = status.starts_with('4') || status.starts_with('5');
        if is_error && response.content.is_empty() {
            response.content = error_response("").content;
        }
        if counted {
            add_rate_limit_headers(response);
        }
        match status.as_str() {
            "429" | "503" => {
                response.headers.insert(
                    "Retry-After".to_string(),
                    integer_header("Seconds to wait before retrying."),
                );
            }
            "401" => {
                response.headers.insert(
                    "WWW-Authenticate".to_string(),
                    string_header("`Bearer error=\"invalid_token\"`."),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn every_code_the_server_sends_is_documented() {
        let documented: Vec<String> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        for status in 400..=599u16 {
            let Ok(status) = StatusCode::from_u16(status) else {
                continue;
            };
            let code = crate::error::code_for_status(status);
            assert!(
                documented.iter().any(|d| d == code),
                "{code} is undocumented"
            );
        }
    }

    #[test]
    fn an_operation_gets_the_platform_responses_with_the_error_body() {
        let mut doc: OpenApi = serde_json::from_value(serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {"/x": {"post": {
                "security": [{"bearer": []}],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"201": {"description": "made"}, "404": {"description": "gone"}}
            }}}
        }))
        .unwrap();
        complete(&mut doc);
        let json = serde_json::to_value(&doc).unwrap();
        let responses = &json["paths"]["/x"]["post"]["responses"];
        for status in [
            "400", "401", "404", "413", "415", "429", "500", "503", "504",
        ] {
            assert_eq!(
                responses[status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/Error",
                "{status}"
            );
        }
        assert!(responses["429"]["headers"]["Retry-After"].is_object());
        assert!(responses["201"]["headers"]["RateLimit-Remaining"].is_object());
        assert_eq!(responses["404"]["description"], "gone");
        assert!(json["components"]["schemas"]["ErrorCode"].is_object());
    }
}
