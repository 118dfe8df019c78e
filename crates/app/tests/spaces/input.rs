//! Bad input: a 4xx with the JSON error body, naming the field where there is one, and
//! nothing written.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{World, code, send_raw};

/// Rows of every table these routes write, as text: what a refused request must not change.
async fn snapshot(world: &World) -> String {
    let mut all = String::new();
    for table in [
        "collaboration_spaces",
        "consciousness_sessions",
        "space_participants",
    ] {
        let rows = world
            .sql()
            .await
            .query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
            .await
            .unwrap();
        for row in rows {
            all.push_str(&row.get::<_, String>(0));
            all.push('\n');
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_json_4xx_and_writes_nothing() {
    let world = World::start(1, &[]).await;
    let owner = world.paid("owner").await;
    world.space(&owner, "open", 2, "0.50").await;
    world.space(&owner, "shut", 2, "0.50").await;
    let (status, _) = world
        .call(0, Method::POST, "/spaces/shut/close", Some(&owner), None)
        .await;
    assert_eq!(status, 200);
    let session = world.session(&owner, "0.90", None).await;
    let before = snapshot(&world).await;

    let space = |patch: Value| {
        let mut body = json!({"space_id": "new-space", "title": "A title"});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let ten_kb = "t".repeat(10 * 1024);
    let cases: Vec<(Method, String, Value, u16, Option<&str>)> = vec![
        // Spaces: ids, titles, descriptions, limits, thresholds, unknown fields.
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"space_id": "Bad_Slug"})),
            400,
            Some("space_id"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"space_id": "-edge"})),
            400,
            Some("space_id"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"space_id": "x".repeat(101)})),
            400,
            Some("space_id"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"space_id": ""})),
            400,
            Some("space_id"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"title": ten_kb})),
            400,
            Some("title"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"title": "   "})),
            400,
            Some("title"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"title": "a\u{0}b"})),
            400,
            Some("title"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"title": 5})),
            400,
            Some("title"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"description": "d".repeat(4001)})),
            400,
            Some("description"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"max_participants": 0})),
            400,
            Some("max_participants"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"max_participants": 1001})),
            400,
            Some("max_participants"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"max_participants": 10.5})),
            400,
            Some("max_participants"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"max_participants": "10"})),
            400,
            Some("max_participants"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"consciousness_threshold": "1.01"})),
            400,
            Some("consciousness_threshold"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"consciousness_threshold": "-0.1"})),
            400,
            Some("consciousness_threshold"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"consciousness_threshold": "0.555"})),
            400,
            Some("consciousness_threshold"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"consciousness_threshold": 0.5})),
            400,
            Some("consciousness_threshold"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"consciousness_threshold": "1e-1"})),
            400,
            Some("consciousness_threshold"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"owner": "me"})),
            400,
            Some("owner"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            json!({"title": "no id"}),
            400,
            Some("space_id"),
        ),
        (
            Method::POST,
            "/spaces".into(),
            space(json!({"space_id": "open"})),
            409,
            None,
        ),
        // Sessions: levels as numbers, out of range, three decimals; spaces unknown or closed.
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": 0.5}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "1.5"}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "-0.01"}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "0.333"}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "abc"}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "0.5", "space_id": "Nope!"}),
            400,
            Some("space_id"),
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "0.5", "space_id": "nowhere"}),
            404,
            None,
        ),
        (
            Method::POST,
            "/consciousness/sessions".into(),
            json!({"consciousness_level": "0.5", "space_id": "shut"}),
            409,
            None,
        ),
        (
            Method::PATCH,
            format!("/consciousness/sessions/{}", session["id"]),
            json!({"consciousness_level": "0.999"}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::PATCH,
            format!("/consciousness/sessions/{}", session["id"]),
            json!({"consciousness_level": 1}),
            400,
            Some("consciousness_level"),
        ),
        (
            Method::PATCH,
            format!("/consciousness/sessions/{}", session["id"]),
            json!({"level": "0.5"}),
            400,
            Some("level"),
        ),
        // Unknown and closed spaces.
        (
            Method::POST,
            "/spaces/nowhere/join".into(),
            Value::Null,
            404,
            None,
        ),
        (
            Method::POST,
            "/spaces/nowhere/leave".into(),
            Value::Null,
            404,
            None,
        ),
        (
            Method::POST,
            "/spaces/nowhere/close".into(),
            Value::Null,
            404,
            None,
        ),
        (
            Method::POST,
            "/spaces/shut/join".into(),
            Value::Null,
            409,
            None,
        ),
        (
            Method::POST,
            "/spaces/Not_A_Slug/join".into(),
            Value::Null,
            400,
            Some("space_id"),
        ),
        (
            Method::GET,
            "/spaces/nowhere".into(),
            Value::Null,
            404,
            None,
        ),
        (
            Method::GET,
            "/spaces/nowhere/participants".into(),
            Value::Null,
            404,
            None,
        ),
        (
            Method::GET,
            format!("/spaces/{}", "x".repeat(10 * 1024)),
            Value::Null,
            400,
            Some("space_id"),
        ),
        (
            Method::GET,
            "/spaces?limit=0".into(),
            Value::Null,
            400,
            Some("limit"),
        ),
        (
            Method::GET,
            "/spaces?limit=abc".into(),
            Value::Null,
            400,
            Some("limit"),
        ),
        (
            Method::GET,
            "/spaces?active=maybe".into(),
            Value::Null,
            400,
            Some("active"),
        ),
        (
            Method::GET,
            "/spaces?creator=a%00b".into(),
            Value::Null,
            400,
            Some("creator"),
        ),
        (
            Method::GET,
            "/spaces?cursor=-5".into(),
            Value::Null,
            400,
            Some("cursor"),
        ),
        (
            Method::GET,
            "/spaces?cursor=05".into(),
            Value::Null,
            400,
            Some("cursor"),
        ),
    ];
    for (method, path, body, status, field) in cases {
        let body = (!body.is_null()).then_some(body);
        let (got, answer) = world
            .call(0, method.clone(), &path, Some(&owner), body.clone())
            .await;
        let shown = format!("{method} {:.60} {:.80}", path, format!("{body:?}"));
        assert_eq!(got, status, "{shown}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{shown}: {answer}");
        let expected_code = match status {
            400 => "bad_request",
            404 => "not_found",
            _ => "conflict",
        };
        assert_eq!(code(&answer), expected_code, "{shown}");
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], field, "{shown}: {answer}");
        }
    }

    // Bodies that are not JSON, or not a JSON object.
    for (content_type, raw, status) in [
        ("text/plain", r#"{"space_id": "x", "title": "y"}"#, 415),
        ("application/json", r#"{"space_id": "x", "title": "y""#, 400),
        ("application/json", "[]", 400),
        ("application/json", "", 400),
    ] {
        let (got, answer) = send_raw(
            world.base(0),
            "/spaces",
            &owner.token,
            content_type,
            raw.into(),
        )
        .await;
        assert_eq!(got, status, "{content_type} {raw}: {answer}");
        assert!(answer["error"]["code"].is_string());
    }
    // Writes without a token.
    let (status, answer) = world
        .call(0, Method::POST, "/spaces/open/join", None, None)
        .await;
    assert_eq!(status, 401);
    assert_eq!(code(&answer), "unauthorized");

    assert_eq!(snapshot(&world).await, before, "nothing was written");
}
