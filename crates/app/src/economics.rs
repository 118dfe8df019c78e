//! The ducat/USD bridge (seed 000's `DUCAT_TO_USD_RATE`, `TRANSACTION_FEE_PERCENT`,
//! `MIN_INVESTMENT_USD`): exact money, one rounding rule, applied in one place.
//!
//! Money is [`Decimal`] from the request's text to the response's text: never a float, and
//! amounts travel as JSON strings. The rule, stated once (README, "Money"):
//!
//! - an input amount has at most two decimals (cents, or hundredths of a ducat);
//! - every other amount is computed exactly, then rounded **half-even to 0.01** by [`cents`];
//! - `net = gross − fee` of the rounded amounts, so gross always equals fee plus net.
//!
//! Example (rate 0.10, fee 2.5 %): 1,000 ducats are `"100.00"` USD gross, `"2.50"` fee,
//! `"97.50"` net; in ducats `"1000.00"`, `"25.00"`, `"975.00"`.

use std::str::FromStr;

use axum::Json;
use axum::extract::{Query, State};
use cascade_core::config::Parser;
use cascade_http::ApiError;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::AppModuleState;

/// The largest amount accepted (10^12), in either currency: far above any real investment.
/// With the rate bounded to [10^-6, 10^6], a converted amount stays below 10^18, inside the
/// database's `NUMERIC(24, 2)` columns and their sums.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

/// The bounds of `DUCAT_TO_USD_RATE` (see [`MAX_AMOUNT`]).
const RATE_MIN: Decimal = Decimal::from_parts(1, 0, 0, false, 6);
const RATE_MAX: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Decimals an input amount may carry.
const INPUT_DECIMALS: u32 = 2;

/// The exchange settings, parsed exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct EconomyConfig {
    /// USD value of one ducat, > 0.
    pub ducat_to_usd_rate: Decimal,
    /// The fee of an exchange, percent in [0, 100).
    pub transaction_fee_percent: Decimal,
    /// The smallest investment, USD (compared with the exact gross USD amount).
    pub min_investment_usd: Decimal,
}

impl EconomyConfig {
    pub fn parse(
        p: &mut Parser,
        rate: &Option<String>,
        fee: &Option<String>,
        min: &Option<String>,
    ) -> EconomyConfig {
        let mut setting = |var: &'static str, raw: &Option<String>, default: &str| {
            let text = raw.as_deref().unwrap_or(default);
            parse_setting(text).unwrap_or_else(|why| {
                p.fail(var, format!("{why}, got {text:?}"));
                Decimal::from_str(default).unwrap_or_default()
            })
        };
        let config = EconomyConfig {
            ducat_to_usd_rate: setting("DUCAT_TO_USD_RATE", rate, "0.10"),
            transaction_fee_percent: setting("TRANSACTION_FEE_PERCENT", fee, "2.5"),
            min_investment_usd: setting("MIN_INVESTMENT_USD", min, "100"),
        };
        if !(RATE_MIN..=RATE_MAX).contains(&config.ducat_to_usd_rate) {
            p.fail("DUCAT_TO_USD_RATE", "must be between 0.000001 and 1000000");
        }
        if config.transaction_fee_percent >= Decimal::ONE_HUNDRED {
            p.fail("TRANSACTION_FEE_PERCENT", "must be below 100");
        }
        config
    }
}

/// A setting: a non-negative plain decimal (`0.10`, `2.5`, `0.0733333333`), up to 28
/// significant digits; no sign, exponent or spaces inside.
fn parse_setting(text: &str) -> Result<Decimal, String> {
    let text = text.trim();
    plain_decimal(text, 28)
        .ok_or_else(|| "expected a non-negative decimal number (e.g. 0.10)".to_string())
}

/// `digits[.digits]` with at most `max_decimals` decimals, as an exact [`Decimal`]; `None`
/// for anything else (signs, exponents, spaces, `.5`, `5.`, overflow).
fn plain_decimal(text: &str, max_decimals: usize) -> Option<Decimal> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits(whole)
        || !digits(frac)
        || (text.contains('.') && frac.is_empty())
        || frac.len() > max_decimals
    {
        return None;
    }
    Decimal::from_str_exact(text).ok()
}

/// An amount as a client gives it: a string of digits with at most two decimals, above zero
/// and at most [`MAX_AMOUNT`]. `field` names it in the 400.
pub fn parse_amount(field: &'static str, text: &str) -> Result<Decimal, ApiError> {
    let amount = parse_quantity(field, text)?;
    if amount.is_zero() {
        return Err(ApiError::bad_request(
            field,
            format!("{field} must be above zero"),
        ));
    }
    Ok(amount)
}

/// As [`parse_amount`], zero included: what a quote accepts (a quote of nothing is nothing).
pub fn parse_quantity(field: &'static str, text: &str) -> Result<Decimal, ApiError> {
    let refuse = || {
        ApiError::bad_request(
            field,
            format!(
                "{field} must be a decimal string of digits with at most {INPUT_DECIMALS} decimals (e.g. \"150.00\")"
            ),
        )
    };
    if text.len() > 40 {
        return Err(refuse());
    }
    let amount = plain_decimal(text, INPUT_DECIMALS as usize).ok_or_else(refuse)?;
    if amount > MAX_AMOUNT {
        return Err(ApiError::bad_request(
            field,
            format!("{field} must be at most {MAX_AMOUNT}"),
        ));
    }
    Ok(amount)
}

/// The one rounding rule: half-even (banker's) to the cent, always shown with two decimals.
pub fn cents(exact: Decimal) -> Decimal {
    let mut rounded = exact.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    rounded.rescale(2);
    rounded
}

/// Which currency the client gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Currency {
    Ducats,
    Usd,
}

/// An amount split into what is paid, what the fee takes and what remains; decimal strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Split {
    #[schema(value_type = String, example = "100.00")]
    #[serde(serialize_with = "as_text")]
    pub gross: Decimal,
    #[schema(value_type = String, example = "2.50")]
    #[serde(serialize_with = "as_text")]
    pub fee: Decimal,
    #[schema(value_type = String, example = "97.50")]
    #[serde(serialize_with = "as_text")]
    pub net: Decimal,
}

/// A quote: the amount in both currencies, and the settings it used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Quote {
    pub from: Currency,
    pub usd: Split,
    pub ducats: Split,
    /// USD per ducat, as configured.
    #[schema(value_type = String, example = "0.10")]
    #[serde(serialize_with = "as_text")]
    pub rate: Decimal,
    #[schema(value_type = String, example = "2.5")]
    #[serde(serialize_with = "as_text")]
    pub fee_percent: Decimal,
    /// Always `"half-even to 0.01"`.
    pub rounding: &'static str,
    #[schema(value_type = String, example = "100.00")]
    #[serde(serialize_with = "as_text")]
    pub min_investment_usd: Decimal,
    /// Whether the exact gross USD amount (before rounding) is at least `min_investment_usd`.
    pub meets_minimum: bool,
}

fn as_text<S: serde::Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Splits an exact gross amount by the fee; gross and fee rounded, net their difference.
fn split(gross_exact: Decimal, fee_percent: Decimal) -> Split {
    let gross = cents(gross_exact);
    let fee = cents(gross_exact * fee_percent / Decimal::ONE_HUNDRED);
    Split {
        gross,
        fee,
        net: gross - fee,
    }
}

/// The quote of `amount` given in `from`.
pub fn quote(config: &EconomyConfig, from: Currency, amount: Decimal) -> Quote {
    let rate = config.ducat_to_usd_rate;
    let fee_percent = config.transaction_fee_percent;
    // `amount` ≤ 10^12 with two decimals and rate ≤ 28 digits: the exact product can still
    // exceed Decimal's 28 digits, whose arithmetic then rounds at the 28th significant digit,
    // far below the cent.
    let (usd_exact, ducats_exact) = match from {
        Currency::Ducats => (amount * rate, amount),
        Currency::Usd => (amount, amount / rate),
    };
    let usd = split(usd_exact, fee_percent);
    let ducats = split(ducats_exact, fee_percent);
    let mut min = config.min_investment_usd;
    min.rescale(min.scale().max(2));
    Quote {
        from,
        // The exact amount, not the rounded one: 999.99 ducats at 0.10 are 99.999 USD, which
        // rounds to 100.00 but is below a minimum of 100.
        meets_minimum: usd_exact >= config.min_investment_usd,
        usd,
        ducats,
        rate,
        fee_percent,
        rounding: "half-even to 0.01",
        min_investment_usd: min,
    }
}

/// `GET /economics/quote`'s query: `ducats` or `usd`, exactly one.
#[derive(Debug, Deserialize)]
pub struct QuoteParams {
    pub ducats: Option<String>,
    pub usd: Option<String>,
}

/// The pattern of an amount in a query (the parser also refuses more than [`MAX_AMOUNT`]).
pub const AMOUNT_PATTERN: &str = "^[0-9]{1,12}(\\.[0-9]{1,2})?$";

/// The query described as one exploded object of exactly one property, so that the API
/// document says "`ducats` or `usd`, not both" (two optional parameters cannot).
impl utoipa::PartialSchema for QuoteParams {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
        let amount = |what: &str, example: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(AMOUNT_PATTERN))
                .description(Some(format!(
                    "An amount of {what}: a decimal string, at most two decimals"
                )))
                .examples([serde_json::json!(example)])
        };
        ObjectBuilder::new()
            .property("ducats", amount("ducats", "1000"))
            .property("usd", amount("USD", "150.00"))
            .min_properties(Some(1))
            .max_properties(Some(1))
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl utoipa::ToSchema for QuoteParams {}

/// `GET /economics/quote?ducats=…` or `?usd=…`.
#[utoipa::path(get, path = "/economics/quote", tag = "economics",
    params(("quote" = inline(QuoteParams), Query, style = Form, explode,
        description = "Exactly one of `ducats` and `usd`: `?ducats=1000` or `?usd=150.00`")),
    responses(
        (status = 200, description = "The amount in both currencies: gross, fee and net, exact (decimal strings, half-even to the cent)", body = Quote),
        (status = 400, description = "Neither or both of ducats and usd, or an amount that is not a positive decimal string with at most two decimals"),
    )
)]
pub async fn quote_route(
    State(state): State<AppModuleState>,
    Query(params): Query<QuoteParams>,
) -> Result<Json<Quote>, ApiError> {
    let (from, amount) = match (&params.ducats, &params.usd) {
        (Some(ducats), None) => (Currency::Ducats, parse_quantity("ducats", ducats)?),
        (None, Some(usd)) => (Currency::Usd, parse_quantity("usd", usd)?),
        _ => {
            return Err(ApiError::bad_request(
                "ducats",
                "give exactly one of the query parameters ducats and usd",
            ));
        }
    };
    Ok(Json(quote(&state.config.economy, from, amount)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    fn config(rate: &str, fee: &str, min: &str) -> EconomyConfig {
        EconomyConfig {
            ducat_to_usd_rate: d(rate),
            transaction_fee_percent: d(fee),
            min_investment_usd: d(min),
        }
    }

    fn texts(split: &Split) -> [String; 3] {
        [
            split.gross.to_string(),
            split.fee.to_string(),
            split.net.to_string(),
        ]
    }

    #[test]
    fn the_seed_example_is_exact() {
        let q = quote(&config("0.10", "2.5", "100"), Currency::Ducats, d("1000"));
        assert_eq!(texts(&q.usd), ["100.00", "2.50", "97.50"]);
        assert_eq!(texts(&q.ducats), ["1000.00", "25.00", "975.00"]);
        assert!(q.meets_minimum);
        assert_eq!(q.min_investment_usd.to_string(), "100.00");
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["usd"]["net"], "97.50");
        assert_eq!(json["rate"], "0.10");
        assert_eq!(json["from"], "ducats");
    }

    /// (rate, fee %, from, amount, usd [gross, fee, net], ducats [gross, fee, net])
    type Case = (
        &'static str,
        &'static str,
        Currency,
        &'static str,
        [&'static str; 3],
        [&'static str; 3],
    );

    #[test]
    fn a_table_of_quotes_exact_to_the_cent() {
        let cases: &[Case] = &[
            (
                "0.10",
                "2.5",
                Currency::Usd,
                "150.00",
                ["150.00", "3.75", "146.25"],
                ["1500.00", "37.50", "1462.50"],
            ),
            // A third of a cent: 0.0733333… USD per ducat.
            (
                "0.0733333333",
                "2.5",
                Currency::Ducats,
                "1000",
                ["73.33", "1.83", "71.50"],
                ["1000.00", "25.00", "975.00"],
            ),
            // Many decimals in the fee; 7 ducats at 0.10 = 0.70 USD, fee 0.0123456789 % of it.
            (
                "0.10",
                "0.0123456789",
                Currency::Ducats,
                "7",
                ["0.70", "0.00", "0.70"],
                ["7.00", "0.00", "7.00"],
            ),
            // Division that does not end: 100 USD at 0.03 = 3333.333… ducats.
            (
                "0.03",
                "2.5",
                Currency::Usd,
                "100",
                ["100.00", "2.50", "97.50"],
                ["3333.33", "83.33", "3250.00"],
            ),
            // No fee.
            (
                "1.25",
                "0",
                Currency::Usd,
                "0.01",
                ["0.01", "0.00", "0.01"],
                ["0.01", "0.00", "0.01"],
            ),
            // The largest amount: no overflow, still exact.
            (
                "0.10",
                "2.5",
                Currency::Ducats,
                "1000000000000000000",
                [
                    "100000000000000000.00",
                    "2500000000000000.00",
                    "97500000000000000.00",
                ],
                [
                    "1000000000000000000.00",
                    "25000000000000000.00",
                    "975000000000000000.00",
                ],
            ),
        ];
        for (rate, fee, from, amount, usd, ducats) in cases {
            let q = quote(&config(rate, fee, "100"), *from, d(amount));
            assert_eq!(
                texts(&q.usd),
                usd.map(String::from),
                "usd of {amount} {from:?} at {rate}/{fee}%"
            );
            assert_eq!(
                texts(&q.ducats),
                ducats.map(String::from),
                "ducats of {amount} {from:?} at {rate}/{fee}%"
            );
            assert_eq!(q.usd.gross, q.usd.fee + q.usd.net);
            assert_eq!(q.ducats.gross, q.ducats.fee + q.ducats.net);
        }
    }

    #[test]
    fn rounding_is_half_even_at_the_cent() {
        assert_eq!(cents(d("0.125")).to_string(), "0.12");
        assert_eq!(cents(d("0.135")).to_string(), "0.14");
        assert_eq!(cents(d("0.1250000001")).to_string(), "0.13");
        assert_eq!(cents(d("0.1249999999")).to_string(), "0.12");
        assert_eq!(cents(d("2.5")).to_string(), "2.50");
        assert_eq!(cents(d("0")).to_string(), "0.00");
        // Through a quote: 5 ducats at 0.025 = 0.125 USD → 0.12; 7 ducats → 0.175 → 0.18.
        let c = config("0.025", "0", "100");
        assert_eq!(
            quote(&c, Currency::Ducats, d("5")).usd.gross.to_string(),
            "0.12"
        );
        assert_eq!(
            quote(&c, Currency::Ducats, d("7")).usd.gross.to_string(),
            "0.18"
        );
    }

    #[test]
    fn the_minimum_is_compared_after_conversion() {
        let c = config("0.10", "2.5", "100");
        assert!(quote(&c, Currency::Ducats, d("1000")).meets_minimum);
        assert!(!quote(&c, Currency::Ducats, d("999.99")).meets_minimum);
        assert!(quote(&c, Currency::Usd, d("100.00")).meets_minimum);
        assert!(!quote(&c, Currency::Usd, d("99.99")).meets_minimum);
    }

    #[test]
    fn amounts_are_plain_positive_decimals_with_two_decimals_at_most() {
        for good in ["1", "0.01", "150.00", "1000000000000", "007"] {
            assert!(parse_amount("usd", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "0",
            "0.00",
            "-1",
            "+1",
            "1e3",
            "1.5e2",
            " 1",
            "1 ",
            "1.",
            ".5",
            "1.234",
            "NaN",
            "inf",
            "1,5",
            "0x10",
            "1000000000000000000.01",
            "10000000000000000000",
            "١٢", // Arabic-Indic digits
        ] {
            assert!(parse_amount("usd", bad).is_err(), "{bad:?}");
        }
        assert!(parse_amount("usd", &"9".repeat(10_000)).is_err());
    }

    #[test]
    fn settings_are_exact_and_bounded() {
        let parse = |rate: &str, fee: &str, min: &str| {
            let mut p = Parser::default();
            let c = EconomyConfig::parse(
                &mut p,
                &Some(rate.into()),
                &Some(fee.into()),
                &Some(min.into()),
            );
            p.finish(c)
        };
        let c = parse("0.0733333333", "2.5", "100").unwrap();
        assert_eq!(c.ducat_to_usd_rate, d("0.0733333333"));
        assert!(parse("0", "2.5", "100").is_err());
        assert!(parse("0.0000009", "2.5", "100").is_err());
        assert!(parse("1000001", "2.5", "100").is_err());
        assert!(parse("0.000001", "2.5", "100").is_ok());
        assert!(parse("0.10", "100", "100").is_err());
        assert!(parse("-0.1", "2.5", "100").is_err());
        assert!(parse("0.10", "2.5", "1e2").is_err());
        let mut p = Parser::default();
        let c = EconomyConfig::parse(&mut p, &None, &None, &None);
        assert_eq!(c, config("0.10", "2.5", "100"));
        assert!(p.finish(()).is_ok());
    }
}
