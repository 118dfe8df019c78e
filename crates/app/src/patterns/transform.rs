//! What a pattern computes from Venice's lists: pure functions of the JSON Venice gave, so the
//! same answer always makes the same pattern (and the same content hash).
//!
//! Every pattern has `venice_citizens` (the five citizens who weigh most in it, seed 001's
//! field) and an `emergence_score` in [0, 1], rounded to 4 decimals:
//!
//! - `economic_consciousness` (`GET /citizens`): citizens, total and mean ducats, citizens per
//!   social class; emergence = 1 − the Gini coefficient of the citizens' ducats (1: wealth
//!   evenly spread, 0: one citizen holds it all or there is nobody to compare).
//! - `social_consciousness` (`GET /relationships`): distinct relationships (a pair counted
//!   once, whichever order Venice names it in), citizens in them, mean trust and strength
//!   (0–100), density = relationships / possible pairs among those citizens; emergence =
//!   density × mean trust / 100 (many relationships, and trusting ones).
//! - `collective_activity` (`GET /activities`): activities, citizens acting, activities per
//!   type and per status; emergence = the Shannon entropy of the types normalised by its
//!   maximum, ln(number of types) (1: activity spread evenly over every type, 0: one type).
//!
//! Venice lists come as `{"success": true, "<name>": [...]}` or as a bare array; fields are
//! read in Venice's camelCase or its Airtable PascalCase. An entry without its citizen name is
//! skipped; a missing or negative number counts as 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value, json};

/// The most entries a list may have: the work is O(n log n) on a request's worker thread.
pub const MAX_ENTRIES: usize = 200_000;
/// How many names `venice_citizens` lists.
const TOP: usize = 5;

/// Venice's answer could not be read as the list a pattern needs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("Venice's {list} answer is unusable: {why}")]
pub struct Unusable {
    pub list: &'static str,
    pub why: String,
}

/// The entries of Venice's list `name`.
fn entries<'a>(answer: &'a Value, name: &'static str) -> Result<&'a [Value], Unusable> {
    let list = match answer {
        Value::Array(items) => items,
        Value::Object(object) => match object.get(name) {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(Unusable {
                    list: name,
                    why: format!("no \"{name}\" array"),
                });
            }
        },
        _ => {
            return Err(Unusable {
                list: name,
                why: "neither an object nor an array".into(),
            });
        }
    };
    if list.len() > MAX_ENTRIES {
        return Err(Unusable {
            list: name,
            why: format!("{} entries, more than {MAX_ENTRIES}", list.len()),
        });
    }
    Ok(list)
}

/// `entry[camel]` or `entry[Pascal]`.
fn field<'a>(entry: &'a Value, camel: &str) -> Option<&'a Value> {
    entry.get(camel).or_else(|| {
        let mut pascal = camel.to_string();
        if let Some(first) = pascal.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        entry.get(&pascal)
    })
}

fn text<'a>(entry: &'a Value, camel: &str) -> Option<&'a str> {
    field(entry, camel)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn number(entry: &Value, camel: &str) -> f64 {
    field(entry, camel)
        .and_then(Value::as_f64)
        .filter(|n| n.is_finite() && *n > 0.0)
        .unwrap_or(0.0)
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// The `TOP` names with the highest weight, ties by name.
fn top(weights: &HashMap<&str, f64>) -> Vec<String> {
    let mut ranked: Vec<(&str, f64)> = weights.iter().map(|(k, v)| (*k, *v)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    ranked
        .into_iter()
        .take(TOP)
        .map(|(name, _)| name.to_string())
        .collect()
}

fn counts(map: BTreeMap<String, u64>) -> Value {
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// The Gini coefficient of `values` (non-negative); 0 when there is nothing to compare.
pub fn gini(values: &mut [f64]) -> f64 {
    let n = values.len() as f64;
    let total: f64 = values.iter().sum();
    if values.len() < 2 || total <= 0.0 {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let weighted: f64 = values
        .iter()
        .enumerate()
        .map(|(i, x)| (i as f64 + 1.0) * x)
        .sum();
    (2.0 * weighted / (n * total) - (n + 1.0) / n).clamp(0.0, 1.0)
}

/// `economic_consciousness` from `GET /citizens`.
pub fn economic(answer: &Value) -> Result<Value, Unusable> {
    let mut ducats = Vec::new();
    let mut wealth = HashMap::new();
    let mut classes = BTreeMap::new();
    for citizen in entries(answer, "citizens")? {
        let Some(username) = text(citizen, "username") else {
            continue;
        };
        let amount = number(citizen, "ducats");
        ducats.push(amount);
        wealth.insert(username, amount);
        let class = text(citizen, "socialClass").unwrap_or("unknown");
        *classes.entry(class.to_string()).or_default() += 1;
    }
    let total: f64 = ducats.iter().sum();
    let citizens = ducats.len();
    let emerging = citizens >= 2 && total > 0.0;
    let emergence = if emerging {
        1.0 - gini(&mut ducats)
    } else {
        0.0
    };
    Ok(json!({
        "citizens": citizens,
        "total_ducats": round(total, 2),
        "mean_ducats": round(if citizens > 0 { total / citizens as f64 } else { 0.0 }, 2),
        "by_social_class": counts(classes),
        "venice_citizens": top(&wealth),
        "emergence_score": round(emergence, 4),
    }))
}

/// `social_consciousness` from `GET /relationships`.
pub fn social(answer: &Value) -> Result<Value, Unusable> {
    let mut pairs: HashMap<(&str, &str), (f64, f64)> = HashMap::new();
    for relationship in entries(answer, "relationships")? {
        let (Some(a), Some(b)) = (
            text(relationship, "citizen1"),
            text(relationship, "citizen2"),
        ) else {
            continue;
        };
        if a == b {
            continue;
        }
        let pair = if a < b { (a, b) } else { (b, a) };
        let scores = (
            number(relationship, "trustScore").min(100.0),
            number(relationship, "strengthScore").min(100.0),
        );
        pairs.insert(pair, scores);
    }
    let mut degree: HashMap<&str, f64> = HashMap::new();
    for (a, b) in pairs.keys() {
        *degree.entry(a).or_default() += 1.0;
        *degree.entry(b).or_default() += 1.0;
    }
    let (relationships, citizens) = (pairs.len() as f64, degree.len() as f64);
    let mean = |pick: fn(&(f64, f64)) -> f64| {
        if pairs.is_empty() {
            0.0
        } else {
            pairs.values().map(pick).sum::<f64>() / relationships
        }
    };
    let (trust, strength) = (mean(|s| s.0), mean(|s| s.1));
    let possible = citizens * (citizens - 1.0) / 2.0;
    let density = if possible > 0.0 {
        (relationships / possible).min(1.0)
    } else {
        0.0
    };
    Ok(json!({
        "relationships": pairs.len(),
        "citizens": degree.len(),
        "mean_trust": round(trust, 2),
        "mean_strength": round(strength, 2),
        "density": round(density, 4),
        "venice_citizens": top(&degree),
        "emergence_score": round(density * trust / 100.0, 4),
    }))
}

/// `collective_activity` from `GET /activities`.
pub fn activity(answer: &Value) -> Result<Value, Unusable> {
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_citizen: HashMap<&str, f64> = HashMap::new();
    let mut total = 0u64;
    for item in entries(answer, "activities")? {
        let Some(citizen) = text(item, "citizen") else {
            continue;
        };
        total += 1;
        *per_citizen.entry(citizen).or_default() += 1.0;
        *by_type
            .entry(text(item, "type").unwrap_or("unknown").to_string())
            .or_default() += 1;
        *by_status
            .entry(text(item, "status").unwrap_or("unknown").to_string())
            .or_default() += 1;
    }
    let kinds = by_type.len();
    let entropy = if kinds < 2 {
        0.0
    } else {
        let h: f64 = by_type
            .values()
            .map(|&n| {
                let p = n as f64 / total as f64;
                -p * p.ln()
            })
            .sum();
        h / (kinds as f64).ln()
    };
    let citizens: BTreeSet<&str> = per_citizen.keys().copied().collect();
    Ok(json!({
        "activities": total,
        "citizens": citizens.len(),
        "by_type": counts(by_type),
        "by_status": counts(by_status),
        "venice_citizens": top(&per_citizen),
        "emergence_score": round(entropy.clamp(0.0, 1.0), 4),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn economic_emergence_is_one_minus_the_gini_of_ducats() {
        let answer = json!({"success": true, "citizens": [
            {"username": "a", "socialClass": "Nobili", "ducats": 100.0},
            {"username": "b", "socialClass": "Popolani", "ducats": 100.0},
            {"Username": "c", "SocialClass": "Popolani", "Ducats": 100.0},
            {"socialClass": "nobody"},
        ]});
        let p = economic(&answer).unwrap();
        assert_eq!(p["citizens"], 3);
        assert_eq!(p["total_ducats"], 300.0);
        assert_eq!(p["by_social_class"], json!({"Nobili": 1, "Popolani": 2}));
        assert_eq!(p["emergence_score"], 1.0, "equal wealth");
        let unequal =
            json!([{"username": "rich", "ducats": 1000.0}, {"username": "poor", "ducats": 0}]);
        let p = economic(&unequal).unwrap();
        // Gini of (0, 1000) is 0.5 with the n/(n-1)-free formula.
        assert_eq!(p["emergence_score"], 0.5);
        assert_eq!(p["venice_citizens"], json!(["rich", "poor"]));
    }

    #[test]
    fn social_counts_each_pair_once_and_weighs_density_by_trust() {
        let answer = json!({"relationships": [
            {"citizen1": "a", "citizen2": "b", "trustScore": 80, "strengthScore": 40},
            {"citizen1": "b", "citizen2": "a", "trustScore": 80, "strengthScore": 40},
            {"citizen1": "b", "citizen2": "c", "trustScore": 40, "strengthScore": 20},
            {"citizen1": "c", "citizen2": "c", "trustScore": 100},
        ]});
        let p = social(&answer).unwrap();
        assert_eq!(p["relationships"], 2);
        assert_eq!(p["citizens"], 3);
        assert_eq!(p["mean_trust"], 60.0);
        // 2 of 3 possible pairs, mean trust 60: 0.6667 * 0.6.
        assert_eq!(p["density"], 0.6667);
        assert_eq!(p["emergence_score"], 0.4);
        assert_eq!(p["venice_citizens"], json!(["b", "a", "c"]));
    }

    #[test]
    fn activity_emergence_is_the_normalised_entropy_of_types() {
        let even = json!({"activities": [
            {"citizen": "a", "type": "trade", "status": "done"},
            {"citizen": "b", "type": "loan", "status": "done"},
        ]});
        assert_eq!(activity(&even).unwrap()["emergence_score"], 1.0);
        let one = json!({"activities": [{"citizen": "a", "type": "trade"}, {"citizen": "a", "type": "trade"}]});
        let p = activity(&one).unwrap();
        assert_eq!(p["emergence_score"], 0.0);
        assert_eq!(p["citizens"], 1);
        assert_eq!(p["by_status"], json!({"unknown": 2}));
    }

    #[test]
    fn unusable_answers_are_refused_not_guessed() {
        assert!(economic(&json!("text")).is_err());
        assert!(social(&json!({"success": true})).is_err());
        assert!(activity(&json!({"activities": {}})).is_err());
        assert_eq!(economic(&json!([])).unwrap()["emergence_score"], 0.0);
    }
}
