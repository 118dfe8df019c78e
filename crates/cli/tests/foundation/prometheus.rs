//! A strict reader of the Prometheus text exposition format (0.0.4), for tests: every line is a
//! comment (`# HELP`, `# TYPE`, or other) or `name{label="value",...} value [timestamp]`, and
//! every sample belongs to a family declared with both `# HELP` and `# TYPE` before it.

use std::collections::{BTreeMap, HashMap};

use crate::common::{Served, http};

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → type (`counter`, `gauge`, `histogram`, `summary`, `untyped`).
    pub types: HashMap<String, String>,
    pub helps: HashMap<String, String>,
}

impl Exposition {
    /// Parses `text`, panicking with the offending line on any violation.
    pub fn parse(text: &str) -> Exposition {
        let mut out = Exposition::default();
        for (number, line) in text.lines().enumerate() {
            let fail = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", number + 1) };
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("HELP"), Some(name), Some(help)) => {
                        check_name(name).unwrap_or_else(|e| fail(&e));
                        if out.helps.insert(name.into(), help.into()).is_some() {
                            fail("second HELP for one family");
                        }
                    }
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        check_name(name).unwrap_or_else(|e| fail(&e));
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                        {
                            fail("unknown TYPE");
                        }
                        if out.types.insert(name.into(), kind.into()).is_some() {
                            fail("second TYPE for one family");
                        }
                    }
                    (Some("HELP" | "TYPE"), _, _) => fail("HELP/TYPE without a name and text"),
                    _ => {}
                }
                continue;
            }
            let sample = parse_sample(line).unwrap_or_else(|e| fail(&e));
            let family = out.family_of(&sample.name);
            if !out.types.contains_key(&family) {
                fail(&format!("sample of family {family} before its # TYPE"));
            }
            if !out.helps.contains_key(&family) {
                fail(&format!("family {family} has no # HELP"));
            }
            out.samples.push(sample);
        }
        out
    }

    /// The family a sample name belongs to (`x_bucket`, `x_sum`, `x_count` of histogram `x`).
    fn family_of(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && matches!(
                    self.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
            {
                return base.to_string();
            }
        }
        name.to_string()
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples (0 when there are none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one matching sample's value; panics if there is not exactly one.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }

    /// Prometheus's `histogram_quantile` over the cumulative buckets of the matching series
    /// (summed across them): linear interpolation inside the bucket holding the rank.
    pub fn quantile(&self, q: f64, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.quantile_where(q, name, |s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// [`quantile`](Self::quantile) over the series `keep` accepts.
    pub fn quantile_where(
        &self,
        q: f64,
        name: &str,
        keep: impl Fn(&Sample) -> bool,
    ) -> Option<f64> {
        let bucket_name = format!("{name}_bucket");
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self
            .samples
            .iter()
            .filter(|s| s.name == bucket_name && keep(s))
        {
            let le: f64 = parse_value(&s.labels["le"]).expect("le");
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
        }
        let mut buckets: Vec<(f64, f64)> = buckets.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (upper, count) in buckets {
            if count >= rank {
                if upper.is_infinite() {
                    return Some(lower);
                }
                return Some(lower + (upper - lower) * (rank - below) / (count - below));
            }
            (lower, below) = (upper, count);
        }
        None
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        other => other.parse().map_err(|_| format!("bad value {other:?}")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (BTreeMap::new(), &line[name_end..]),
    };
    if !rest.starts_with(' ') {
        return Err("no space before the value".into());
    }
    let mut fields = rest.split(' ').filter(|f| !f.is_empty());
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `key="value",...}` (after the `{`) → the labels and the text after the `}`.
fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = &rest[..eq];
        check_name(key)?;
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut close = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in a label value".into()),
                },
                '"' => {
                    close = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        rest = &rest[close.ok_or("unterminated label value")? + 1..];
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// `GET /metrics`, checked for its content type and parsed strictly.
pub async fn scrape(served: &Served) -> Exposition {
    let response = http()
        .get(format!("{}/metrics", served.base))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Exposition::parse(&response.text().await.expect("body"))
}
