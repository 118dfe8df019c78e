//! `GET /economics/quote` over HTTP with configured settings: the exact split in both
//! currencies, and the refusals.

use serde_json::Value;

use crate::support::{World, http};

async fn quote(world: &World, query: &str) -> (u16, Value) {
    let response = http()
        .get(world.url(&format!("/economics/quote{query}")))
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotes_are_exact_strings_and_bad_amounts_are_refused() {
    let world = World::start(&[
        ("DUCAT_TO_USD_RATE", "0.0733333333".to_string()),
        ("TRANSACTION_FEE_PERCENT", "2.5".to_string()),
        ("MIN_INVESTMENT_USD", "70".to_string()),
    ])
    .await;
    let (status, body) = quote(&world, "?ducats=1000").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["from"], "ducats");
    assert_eq!(body["usd"]["gross"], "73.33");
    assert_eq!(body["usd"]["fee"], "1.83");
    assert_eq!(body["usd"]["net"], "71.50");
    assert_eq!(body["ducats"]["net"], "975.00");
    assert_eq!(body["rate"], "0.0733333333");
    assert_eq!(body["fee_percent"], "2.5");
    assert_eq!(body["rounding"], "half-even to 0.01");
    assert_eq!(body["min_investment_usd"], "70.00");
    assert_eq!(body["meets_minimum"], true);

    let (status, body) = quote(&world, "?usd=150.00").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["from"], "usd");
    assert_eq!(body["usd"]["net"], "146.25");
    // 150 / 0.0733333333 = 2045.4545463… ducats.
    assert_eq!(body["ducats"]["gross"], "2045.45");

    let (status, body) = quote(&world, "?usd=0").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ducats"]["net"], "0.00");
    assert_eq!(body["meets_minimum"], false);

    let long = format!("?usd={}", "9".repeat(10_000));
    for bad in [
        "",
        "?ducats=1000&usd=10",
        "?usd=-5",
        "?usd=abc",
        "?usd=1e3",
        "?usd=1.234",
        "?usd=%2B5",
        "?ducats=NaN",
        long.as_str(),
    ] {
        let (status, body) = quote(&world, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{bad}: {body}");
    }
}
