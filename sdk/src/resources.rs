//! Resources: named quantities an agent offers and a task consumes.
//!
//! `cpus` are fixed-point millicores and custom scalars fixed-point thousandths, so arithmetic
//! never touches floats; `mem` and `disk` are bytes; `ports` are sorted, merged ranges.
//! Text form: `cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000];gpus:2`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::units::{format_size, parse_size};

/// A text resource description that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("invalid resource `{item}`: {why}")]
    Invalid { item: String, why: String },
    #[error("resource `{0}` is given twice")]
    Duplicate(String),
}

fn invalid(item: &str, why: impl Into<String>) -> ResourceError {
    ResourceError::Invalid { item: item.to_string(), why: why.into() }
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub begin: u16,
    pub end: u16,
}

impl PortRange {
    pub fn len(&self) -> u64 {
        u64::from(self.end) - u64::from(self.begin) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A set of resources. Ports are kept sorted and merged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Millicores (1000 = one CPU).
    pub cpus: u64,
    /// Bytes.
    pub mem: u64,
    /// Bytes.
    pub disk: u64,
    pub ports: Vec<PortRange>,
    /// Custom scalars in thousandths (1000 = 1 unit).
    pub scalars: BTreeMap<String, u64>,
}

/// Parses a decimal with up to three fractional digits into thousandths, without floats.
pub fn parse_milli(s: &str) -> Option<u64> {
    let s = s.trim();
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 3 {
        return None;
    }
    let i: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut f: u64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    for _ in frac.len()..3 {
        f *= 10;
    }
    i.checked_mul(1000)?.checked_add(f)
}

/// Formats thousandths as a short decimal (`1500` → `1.5`).
pub fn format_milli(v: u64) -> String {
    if v % 1000 == 0 {
        format!("{}", v / 1000)
    } else {
        let s = format!("{}.{:03}", v / 1000, v % 1000);
        s.trim_end_matches('0').to_string()
    }
}

fn parse_ranges(item: &str, s: &str) -> Result<Vec<PortRange>, ResourceError> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| invalid(item, "ranges are written `[31000-32000,33000-33010]`"))?;
    let mut out = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (b, e) = part.split_once('-').unwrap_or((part, part));
        let begin: u16 = b.trim().parse().map_err(|_| invalid(item, format!("`{b}` is not a port")))?;
        let end: u16 = e.trim().parse().map_err(|_| invalid(item, format!("`{e}` is not a port")))?;
        if begin > end {
            return Err(invalid(item, format!("range {begin}-{end} is backwards")));
        }
        out.push(PortRange { begin, end });
    }
    Ok(normalize(out))
}

fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.begin) <= u32::from(last.end) + 1 => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

fn ranges_contain(outer: &[PortRange], inner: &[PortRange]) -> bool {
    inner.iter().all(|r| outer.iter().any(|o| o.begin <= r.begin && r.end <= o.end))
}

fn ranges_sub(outer: &[PortRange], inner: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for o in outer {
        let mut pieces = vec![*o];
        for r in inner {
            let mut next = Vec::new();
            for p in pieces {
                if r.end < p.begin || r.begin > p.end {
                    next.push(p);
                    continue;
                }
                if r.begin > p.begin {
                    next.push(PortRange { begin: p.begin, end: r.begin - 1 });
                }
                if r.end < p.end {
                    next.push(PortRange { begin: r.end + 1, end: p.end });
                }
            }
            pieces = next;
        }
        out.extend(pieces);
    }
    normalize(out)
}

impl Resources {
    /// Parses `cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000];gpus:2`.
    pub fn parse(text: &str) -> Result<Self, ResourceError> {
        let mut r = Resources::default();
        let mut seen = std::collections::BTreeSet::new();
        for item in text.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = item.split_once(':').ok_or_else(|| invalid(item, "expected `name:value`"))?;
            let name = name.trim();
            if name.contains('(') {
                return Err(invalid(item, "role reservations such as `cpus(role):2` are not supported yet"));
            }
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(invalid(item, "a resource name is letters, digits, `_`, `-` or `.`"));
            }
            if !seen.insert(name.to_string()) {
                return Err(ResourceError::Duplicate(name.to_string()));
            }
            let value = value.trim();
            match name {
                "cpus" => {
                    r.cpus = parse_milli(value).ok_or_else(|| {
                        invalid(item, "cpus is a number with at most 3 decimals, e.g. `0.5`")
                    })?
                }
                "mem" => r.mem = parse_size(value).map_err(|e| invalid(item, e.to_string()))?,
                "disk" => r.disk = parse_size(value).map_err(|e| invalid(item, e.to_string()))?,
                "ports" => r.ports = parse_ranges(item, value)?,
                _ => {
                    let v = parse_milli(value).ok_or_else(|| {
                        invalid(item, "a custom scalar is a number with at most 3 decimals")
                    })?;
                    r.scalars.insert(name.to_string(), v);
                }
            }
        }
        Ok(r)
    }

    pub fn cpus(millicores: u64) -> Self {
        Resources { cpus: millicores, ..Default::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.cpus == 0
            && self.mem == 0
            && self.disk == 0
            && self.ports.is_empty()
            && self.scalars.values().all(|v| *v == 0)
    }

    /// True when every quantity in `other` fits in `self`.
    pub fn contains(&self, other: &Resources) -> bool {
        self.cpus >= other.cpus
            && self.mem >= other.mem
            && self.disk >= other.disk
            && ranges_contain(&self.ports, &other.ports)
            && other.scalars.iter().all(|(k, v)| *v == 0 || self.scalars.get(k).is_some_and(|s| s >= v))
    }

    /// `self - other`, or `None` when `other` does not fit.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        if !self.contains(other) {
            return None;
        }
        let mut scalars = self.scalars.clone();
        for (k, v) in &other.scalars {
            if let Some(s) = scalars.get_mut(k) {
                *s -= *v;
            }
        }
        scalars.retain(|_, v| *v > 0);
        Some(Resources {
            cpus: self.cpus - other.cpus,
            mem: self.mem - other.mem,
            disk: self.disk - other.disk,
            ports: ranges_sub(&self.ports, &other.ports),
            scalars,
        })
    }

    /// `self - other`, clamping at zero (for bookkeeping that must never panic).
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        let mut scalars = self.scalars.clone();
        for (k, v) in &other.scalars {
            if let Some(s) = scalars.get_mut(k) {
                *s = s.saturating_sub(*v);
            }
        }
        scalars.retain(|_, v| *v > 0);
        Resources {
            cpus: self.cpus.saturating_sub(other.cpus),
            mem: self.mem.saturating_sub(other.mem),
            disk: self.disk.saturating_sub(other.disk),
            ports: ranges_sub(&self.ports, &other.ports),
            scalars,
        }
    }

    /// `self + other` (saturating; ports are merged).
    pub fn add(&self, other: &Resources) -> Resources {
        let mut scalars = self.scalars.clone();
        for (k, v) in &other.scalars {
            let e = scalars.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
        let mut ports = self.ports.clone();
        ports.extend_from_slice(&other.ports);
        Resources {
            cpus: self.cpus.saturating_add(other.cpus),
            mem: self.mem.saturating_add(other.mem),
            disk: self.disk.saturating_add(other.disk),
            ports: normalize(ports),
            scalars,
        }
    }

    pub fn add_assign(&mut self, other: &Resources) {
        *self = self.add(other);
    }

    /// The largest fraction of `total` this set uses over every resource kind (for DRF).
    /// Kinds absent from `total` are ignored.
    pub fn dominant_share(&self, total: &Resources) -> f64 {
        fn frac(a: u64, b: u64) -> f64 {
            if b == 0 {
                0.0
            } else {
                a as f64 / b as f64
            }
        }
        let port_count = |p: &[PortRange]| p.iter().map(PortRange::len).sum::<u64>();
        let mut share = frac(self.cpus, total.cpus)
            .max(frac(self.mem, total.mem))
            .max(frac(self.disk, total.disk))
            .max(frac(port_count(&self.ports), port_count(&total.ports)));
        for (k, v) in &self.scalars {
            share = share.max(frac(*v, total.scalars.get(k).copied().unwrap_or(0)));
        }
        share
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.cpus > 0 {
            parts.push(format!("cpus:{}", format_milli(self.cpus)));
        }
        if self.mem > 0 {
            parts.push(format!("mem:{}", format_size(self.mem)));
        }
        if self.disk > 0 {
            parts.push(format!("disk:{}", format_size(self.disk)));
        }
        if !self.ports.is_empty() {
            let r: Vec<String> = self
                .ports
                .iter()
                .map(
                    |p| if p.begin == p.end { p.begin.to_string() } else { format!("{}-{}", p.begin, p.end) },
                )
                .collect();
            parts.push(format!("ports:[{}]", r.join(",")));
        }
        for (k, v) in &self.scalars {
            parts.push(format!("{k}:{}", format_milli(*v)));
        }
        write!(f, "{}", parts.join(";"))
    }
}

impl std::str::FromStr for Resources {
    type Err = ResourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Resources::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let r = Resources::parse("cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000];gpus:2").unwrap();
        assert_eq!(r.cpus, 4000);
        assert_eq!(r.mem, 8 << 30);
        assert_eq!(r.ports, vec![PortRange { begin: 31000, end: 32000 }]);
        assert_eq!(r.scalars["gpus"], 2000);
        assert_eq!(r.to_string(), "cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000];gpus:2");
        assert_eq!(Resources::parse(&r.to_string()).unwrap(), r);
        assert_eq!(Resources::parse("cpus:0.25").unwrap().cpus, 250);
    }

    #[test]
    fn bad_input_is_named() {
        let e = Resources::parse("cpus:four").unwrap_err().to_string();
        assert!(e.contains("cpus:four"), "{e}");
        assert!(Resources::parse("cpus:1;cpus:2").is_err());
        assert!(Resources::parse("mem").is_err());
        assert!(Resources::parse("ports:[5-1]").is_err());
        assert!(Resources::parse("cpus:0.0001").is_err());
        assert!(Resources::parse("cpus(web):2").unwrap_err().to_string().contains("reservation"));
    }

    #[test]
    fn arithmetic() {
        let total = Resources::parse("cpus:4;mem:4GiB;ports:[100-200]").unwrap();
        let a = Resources::parse("cpus:2;mem:1GiB;ports:[150-150]").unwrap();
        let rest = total.checked_sub(&a).unwrap();
        assert_eq!(rest.cpus, 2000);
        assert_eq!(rest.ports, vec![PortRange { begin: 100, end: 149 }, PortRange { begin: 151, end: 200 }]);
        assert!(!rest.contains(&a));
        assert_eq!(rest.add(&a), total);
        assert!(total.checked_sub(&Resources::parse("cpus:5").unwrap()).is_none());
        assert!(!total.contains(&Resources::parse("gpus:1").unwrap()));
        let share = a.dominant_share(&total);
        assert!((share - 0.5).abs() < 1e-9);
    }
}
