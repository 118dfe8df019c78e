//! Extractors whose rejections are our JSON errors.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body. Unlike `axum::Json`, a body that does not fit the type is a 400 whose
/// `field` is the path of the offending value (`run.runId`, `inputs[2].name`), a missing or
/// wrong content type is a 415, and a body over `BODY_LIMIT_BYTES` is a 413: all with the
/// JSON error shape.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "expected a JSON body with Content-Type: application/json".into(),
            ));
        }
        let bytes =
            Bytes::from_request(req, state)
                .await
                .map_err(|rejection: BytesRejection| {
                    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::PayloadTooLarge(
                            "request body is larger than BODY_LIMIT_BYTES".into(),
                        )
                    } else {
                        ApiError::BadRequest {
                            field: None,
                            message: format!("could not read the request body: {rejection}"),
                        }
                    }
                })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Deserialises `bytes`, naming the path of the offending value on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = strip_position(&inner.to_string());
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::BadRequest {
                field: None,
                message: format!("malformed JSON: {message}"),
            };
        }
        let field = (path != ".").then_some(path);
        // A missing field is reported at its parent; name the field itself.
        let field = match missing_field(&message) {
            Some(name) => Some(match field {
                Some(parent) => format!("{parent}.{name}"),
                None => name.to_string(),
            }),
            None => field,
        };
        ApiError::BadRequest {
            message: match &field {
                Some(field) => format!("{field}: {message}"),
                None => message,
            },
            field,
        }
    })?;
    deserializer.end().map_err(|_| ApiError::BadRequest {
        field: None,
        message: "malformed JSON: trailing characters after the value".into(),
    })?;
    Ok(value)
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        name: String,
    }

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    struct Outer {
        count: u32,
        inner: Inner,
    }

    fn field_of(json: &str) -> Option<String> {
        match parse_json::<Outer>(json.as_bytes()) {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected a 400, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn errors_name_the_offending_field() {
        assert_eq!(
            field_of(r#"{"count": "x", "inner": {"name": "a"}}"#).as_deref(),
            Some("count")
        );
        assert_eq!(
            field_of(r#"{"count": 1, "inner": {}}"#).as_deref(),
            Some("inner.name")
        );
        assert_eq!(
            field_of(r#"{"inner": {"name": "a"}}"#).as_deref(),
            Some("count")
        );
        assert_eq!(
            field_of(r#"{"count": 1, "inner": {"name": "a", "x": 1}}"#).as_deref(),
            Some("inner.x")
        );
        assert_eq!(field_of(r#"{"count": 1,"#), None);
        assert_eq!(field_of(r#"{"count": 1, "inner": {"name": "a"}} x"#), None);
        assert!(parse_json::<Outer>(br#"{"count": 1, "inner": {"name": "a"}}"#).is_ok());
    }
}
