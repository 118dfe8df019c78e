//! The catalog's part of the OpenAPI document: its paths (the `#[utoipa::path]` attributes on
//! the handlers in [`reads`](crate::reads) and [`writes`](crate::writes)) and the schemas of
//! their bodies.
//!
//! Request bodies are parsed field by field ([`model`](crate::model)), and responses are built
//! by PostgreSQL (`json_build_object`, [`queries`](crate::queries); one asset's by the server,
//! byte for byte as PostgreSQL spells it), so neither has a Rust type
//! a schema could be derived from: the types here describe them, and the fuzz test
//! (`crates/server/tests/fuzz.rs`) checks every response against them and that inputs the
//! schemas call valid are accepted, so a drift fails CI.

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use serde_json::Value;
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, OneOfBuilder, SchemaType,
};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, OpenApi, PartialSchema, ToSchema};

/// The catalog's operations and schemas, merged by the server into the one document.
#[derive(OpenApi)]
#[openapi(
    paths(
        crate::writes::create_producer,
        crate::writes::create_asset,
        crate::writes::create_policy,
        crate::writes::create_receipt,
        crate::writes::record_lineage,
        crate::writes::remove_lineage,
        crate::reads::listings,
        crate::reads::asset,
        crate::writes::update_asset,
        crate::writes::delete_asset,
        crate::reads::bundle,
        crate::reads::ready,
    ),
    modifiers(&NulFree),
    tags((name = "catalog", description = "Producers publish versioned assets; receipts and policies make a version usable; OpenLineage events say which versions derive from which."))
)]
pub struct CatalogApi;

/// A lineage event is refused whole when any key or string in it holds a NUL
/// ([`refuse_nul`](crate::model::refuse_nul)), unknown fields included: its objects say so
/// (`propertyNames`, `additionalProperties` of the platform's NUL-free `JsonValue`, a pattern
/// on every string without one).
struct NulFree;

const NO_NUL: &str = r"^[^\x00]*$";

impl utoipa::Modify for NulFree {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let Some(components) = doc.components.as_mut() else {
            return;
        };
        for name in ["RunEvent", "Run", "Job", "Dataset"] {
            let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) else {
                continue;
            };
            object.property_names = Some(Box::new(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(NO_NUL))
                    .build(),
            )));
            object.additional_properties = Some(Box::new(AdditionalProperties::RefOr(RefOr::Ref(
                Ref::from_schema_name("JsonValue"),
            ))));
            for property in object.properties.values_mut() {
                if let RefOr::T(Schema::Object(field)) = property
                    && field.pattern.is_none()
                    && matches!(field.schema_type, SchemaType::Type(Type::String))
                {
                    field.pattern = Some(NO_NUL.to_string());
                }
            }
        }
    }
}

/// The rule of [`VersionId`](crate::model::VersionId) and [`ProducerId`](crate::model::ProducerId).
pub const ID_PATTERN: &str = r"^[A-Za-z0-9._:@/+=~-]+$";

/// A string schema (the derive cannot put length limits on a newtype).
fn string(
    min: usize,
    max: Option<usize>,
    pattern: Option<&str>,
    format: Option<SchemaFormat>,
    description: &str,
    example: Option<&str>,
) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .examples(example)
        .min_length(Some(min))
        .max_length(max)
        .pattern(pattern)
        .format(format)
        .description(Some(description))
        .into()
}

/// A version or producer id: 1 to 256 bytes, no white space or control characters.
#[derive(serde::Deserialize)]
pub struct Id;

impl PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        string(
            1,
            Some(256),
            Some(ID_PATTERN),
            None,
            "1 to 256 of ASCII letters, digits and - _ . : @ / + = ~",
            Some("ds-orders@v3"),
        )
    }
}
impl ToSchema for Id {}

/// A display name: at most 1,000 bytes, not only white space (it is trimmed).
#[derive(serde::Deserialize)]
pub struct Name;

impl PartialSchema for Name {
    fn schema() -> RefOr<Schema> {
        string(
            1,
            Some(1000),
            Some(r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$"),
            None,
            "at most 1,000 bytes, trimmed, not empty, no control characters",
            None,
        )
    }
}
impl ToSchema for Name {}

/// The form [`Timestamp`](crate::model::Timestamp) accepts (PostgreSQL refuses offsets of 16
/// hours or more).
pub const DATE_TIME_PATTERN: &str = r"^(?!0000)[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-](0[0-9]|1[0-5]):[0-5][0-9])$";

/// An RFC 3339 date-time with a time zone (`2025-01-31T12:00:00Z`).
#[derive(serde::Deserialize)]
pub struct DateTime;

impl PartialSchema for DateTime {
    fn schema() -> RefOr<Schema> {
        string(
            1,
            None,
            Some(DATE_TIME_PATTERN),
            Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)),
            "RFC 3339 with a time zone within ±15:59, years 0001 to 9999: 2025-01-31T12:00:00Z",
            Some("2025-01-31T12:00:00Z"),
        )
    }
}
impl ToSchema for DateTime {}

/// `POST /producers`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewProducer {
    producer_id: Id,
    name: Name,
}

/// A producer, as created.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Producer {
    producer_id: String,
    name: String,
    created_at: String,
}

/// `POST /assets`: a new version of an asset, under a producer the caller owns.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewAsset {
    version_id: Id,
    producer_id: Id,
    name: Name,
    /// Free-form; stored and returned as given.
    #[schema(value_type = Option<JsonObject>)]
    metadata: Option<Value>,
}

/// `PATCH /listings/{version_id}`: a new name, new metadata (replacing the old), or both; at
/// least one of them not `null`. (Written out: the derive's `min_properties` emits
/// `maxProperties` in utoipa 5.5, and it cannot say "at least one of these is not null".)
pub struct AssetChange;

impl PartialSchema for AssetChange {
    fn schema() -> RefOr<Schema> {
        let name = || Ref::from_schema_name("Name");
        let metadata = || Ref::from_schema_name("JsonObject");
        let or_null = |r: Ref| {
            OneOfBuilder::new()
                .item(r)
                .item(ObjectBuilder::new().schema_type(Type::Null))
        };
        let fields = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("name", or_null(name()))
            .property("metadata", or_null(metadata()));
        let one_of_them = AnyOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("name", name())
                    .required("name"),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("metadata", metadata())
                    .required("metadata"),
            );
        AllOfBuilder::new()
            .item(fields)
            .item(one_of_them)
            .description(Some(
                "A new name, new metadata (replacing the old), or both; at least one not null.",
            ))
            .into()
    }
}

impl ToSchema for AssetChange {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push(("Name".into(), Name::schema()));
        schemas.push(("JsonObject".into(), JsonObject::schema()));
    }
}

/// An asset version.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Asset {
    version_id: String,
    producer_id: String,
    name: String,
    #[schema(value_type = JsonObject)]
    metadata: Value,
    created_at: String,
    updated_at: String,
}

/// A page of `GET /listings`, newest first.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetPage {
    items: Vec<Asset>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// A parent → child edge of the lineage.
#[derive(ToSchema, serde::Deserialize)]
pub struct Edge {
    parent: String,
    child: String,
}

/// An ancestor in a bundle; `asset` is `null` when the lineage names a version the catalog
/// does not have.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ancestor {
    version_id: String,
    depth: i32,
    asset: Option<Asset>,
}

/// `GET /bundle`: the asset, its ancestors to `depth`, and the edges between them.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    version_id: String,
    depth: i32,
    asset: Asset,
    ancestors: Vec<Ancestor>,
    edges: Vec<Edge>,
}

/// What keeps one version of the tree from being ready.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Missing {
    version_id: String,
    depth: i32,
    missing: Vec<MissingPart>,
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingPart {
    Asset,
    Receipt,
    Policy,
}

/// `GET /ready`: whether the asset and every ancestor has a valid receipt and policy.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    version_id: String,
    ready: bool,
    /// Versions checked (the asset and its ancestors).
    checked: i64,
    /// Lineage goes deeper than the walk: not vouched for, so not ready.
    truncated: bool,
    missing: Vec<Missing>,
    /// When the first receipt or policy this answer relies on expires.
    valid_until: Option<String>,
    valid_until_ms: Option<i64>,
}

/// `POST /policies`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewPolicy {
    version_id: Id,
    #[schema(value_type = JsonObject)]
    document: Value,
    /// Absent or `null`: never expires.
    expires_at: Option<DateTime>,
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    policy_id: i64,
    version_id: String,
    #[schema(value_type = JsonObject)]
    document: Value,
    created_at: String,
    expires_at: Option<String>,
}

/// `POST /receipts`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewReceipt {
    version_id: Id,
    payer: Name,
    #[schema(minimum = 0)]
    amount: i64,
    /// Absent or `null`: never expires.
    expires_at: Option<DateTime>,
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    receipt_id: i64,
    version_id: String,
    payer: String,
    amount: i64,
    created_at: String,
    expires_at: Option<String>,
}

/// A dataset of an OpenLineage run event; it names an asset version by
/// `facets.version.datasetVersion` when it has one, else by `name`.
#[derive(ToSchema, serde::Deserialize)]
pub struct Dataset {
    #[schema(min_length = 1)]
    namespace: String,
    /// The asset version, unless `facets.version.datasetVersion` names it: the id rules apply.
    #[schema(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._:@/+=~-]+$")]
    name: String,
    #[schema(value_type = Option<JsonObject>, nullable = false)]
    facets: Option<Value>,
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    #[schema(format = "uuid")]
    run_id: String,
}

#[derive(ToSchema, serde::Deserialize)]
pub struct Job {
    #[schema(min_length = 1)]
    namespace: String,
    #[schema(min_length = 1)]
    name: String,
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Start,
    Running,
    Complete,
    Abort,
    Fail,
    Other,
}

/// `POST /lineage`: an OpenLineage `RunEvent`. Every input is a parent of every output (not
/// in `FAIL`/`ABORT` events); at most 1,000 datasets a side and 1,000 edges an event.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunEvent {
    #[schema(nullable = false)]
    event_type: Option<EventType>,
    event_time: DateTime,
    #[schema(min_length = 1)]
    producer: String,
    #[serde(rename = "schemaURL")]
    #[schema(min_length = 1)]
    schema_url: String,
    run: Run,
    job: Job,
    /// Absent or `null`: none.
    #[schema(max_items = 1000)]
    inputs: Option<Vec<Dataset>>,
    #[schema(max_items = 1000)]
    outputs: Option<Vec<Dataset>>,
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LineageRecorded {
    event_id: i64,
    /// Edges now in effect.
    edges_added: Vec<Edge>,
    /// Edges into versions not in the catalog: in effect only if the caller publishes the child.
    edges_pending: Vec<Edge>,
}

/// The version in the path.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Path)]
pub struct VersionPath {
    /// The asset version's id.
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[A-Za-z0-9._:@/+=~-]+$",
        example = "ds-orders@v3"
    )]
    version_id: String,
}

/// `GET /listings` filters.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ListingParams {
    /// Search of names and descriptions (`websearch_to_tsquery` syntax, English stems: `price`
    /// finds `Prices`) and of names by prefix (`mach`) or with typos (`machne lerning`), at most
    /// 200 bytes. The order stays newest first.
    #[param(max_length = 200, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    q: Option<String>,
    /// Only this producer's assets.
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._:@/+=~-]+$")]
    producer: Option<String>,
    #[param(value_type = Option<String>, format = DateTime, pattern = r"^(?!0000)[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-](0[0-9]|1[0-5]):[0-5][0-9])$")]
    created_after: Option<String>,
    #[param(value_type = Option<String>, format = DateTime, pattern = r"^(?!0000)[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-](0[0-9]|1[0-5]):[0-5][0-9])$")]
    created_before: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `nextCursor` of the previous page: `<microseconds>.<versionId>`.
    #[param(
        max_length = 277,
        pattern = r"^-?[0-9]{1,16}\.[A-Za-z0-9._:@/+=~-]{1,256}$"
    )]
    cursor: Option<String>,
}

/// `GET /bundle` and `GET /ready`.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct BundleParams {
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[A-Za-z0-9._:@/+=~-]+$",
        example = "ds-orders@v3"
    )]
    version_id: String,
    /// Ancestor levels, 0 to 10 (default 3).
    #[param(minimum = 0, maximum = 10)]
    depth: Option<i32>,
}

#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ReadyParams {
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[A-Za-z0-9._:@/+=~-]+$",
        example = "ds-orders@v3"
    )]
    version_id: String,
}

/// `DELETE /lineage`: the edge `parent` → `child`.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Query)]
pub struct EdgeParams {
    /// An asset of the caller's.
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._:@/+=~-]+$")]
    child: String,
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._:@/+=~-]+$")]
    parent: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_spells_the_input_rules() {
        let doc = serde_json::to_value(CatalogApi::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let change = serde_json::to_string(&schemas["AssetChange"]).unwrap();
        assert!(change.contains(r#""required":["name"]"#), "{change}");
        assert!(change.contains(r#""required":["metadata"]"#), "{change}");
        assert_eq!(
            schemas["NewProducer"]["properties"]["producerId"]["$ref"],
            "#/components/schemas/Id"
        );
        assert_eq!(schemas["Id"]["pattern"], ID_PATTERN);
        assert!(doc["paths"]["/listings/{version_id}"]["patch"]["security"].is_array());
    }
}
