//! Agent attributes, typed as in Mesos: text, scalar, ranges and sets.
//! Text form: `rack:r1;zone:a;cores:8;ports:[1-5];blocks:{b17,b42}`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::resources::{format_milli, parse_milli};

/// An attribute value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttrValue {
    Text(String),
    /// Thousandths, like resource scalars.
    Scalar(u64),
    Ranges(Vec<(u64, u64)>),
    Set(BTreeSet<String>),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Text(t) => write!(f, "{t}"),
            AttrValue::Scalar(v) => write!(f, "{}", format_milli(*v)),
            AttrValue::Ranges(r) => {
                let parts: Vec<String> = r.iter().map(|(b, e)| format!("{b}-{e}")).collect();
                write!(f, "[{}]", parts.join(","))
            }
            AttrValue::Set(s) => {
                let parts: Vec<&str> = s.iter().map(String::as_str).collect();
                write!(f, "{{{}}}", parts.join(","))
            }
        }
    }
}

/// A text attribute description that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid attribute `{item}`: {why}")]
pub struct AttributeError {
    pub item: String,
    pub why: String,
}

/// An agent's attributes, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attributes(pub BTreeMap<String, AttrValue>);

impl Attributes {
    pub fn parse(text: &str) -> Result<Self, AttributeError> {
        let mut out = BTreeMap::new();
        for item in text.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let err = |why: &str| AttributeError { item: item.to_string(), why: why.to_string() };
            let (name, value) = item.split_once(':').ok_or_else(|| err("expected `name:value`"))?;
            let (name, value) = (name.trim(), value.trim());
            if name.is_empty() || value.is_empty() {
                return Err(err("both a name and a value are needed"));
            }
            let v = if let Some(inner) = value.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                AttrValue::Set(
                    inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
                )
            } else if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                let mut ranges = Vec::new();
                for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let (b, e) = part.split_once('-').unwrap_or((part, part));
                    let b: u64 = b.trim().parse().map_err(|_| err("ranges are `[1-5,8-9]`"))?;
                    let e: u64 = e.trim().parse().map_err(|_| err("ranges are `[1-5,8-9]`"))?;
                    if b > e {
                        return Err(err("a range is backwards"));
                    }
                    ranges.push((b, e));
                }
                AttrValue::Ranges(ranges)
            } else if let Some(m) = parse_milli(value) {
                AttrValue::Scalar(m)
            } else {
                if value.contains(['{', '}', '[', ']', ',']) {
                    return Err(err("a text value has no brackets or commas"));
                }
                AttrValue::Text(value.to_string())
            };
            if out.insert(name.to_string(), v).is_some() {
                return Err(err("this attribute is given twice"));
            }
        }
        Ok(Attributes(out))
    }

    pub fn get(&self, name: &str) -> Option<&AttrValue> {
        self.0.get(name)
    }
}

impl fmt::Display for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        write!(f, "{}", parts.join(";"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_values() {
        let a = Attributes::parse("rack:r1;zone:a;cores:8;ids:[1-5];blocks:{b17,b42}").unwrap();
        assert_eq!(a.get("rack"), Some(&AttrValue::Text("r1".into())));
        assert_eq!(a.get("cores"), Some(&AttrValue::Scalar(8000)));
        assert_eq!(a.get("ids"), Some(&AttrValue::Ranges(vec![(1, 5)])));
        assert!(matches!(a.get("blocks"), Some(AttrValue::Set(s)) if s.contains("b42")));
        assert_eq!(Attributes::parse(&a.to_string()).unwrap(), a);
        assert!(Attributes::parse("rack").is_err());
        assert!(Attributes::parse("rack:r1;rack:r2").is_err());
    }
}
