//! Resources: named quantities an agent offers and a task consumes.
//!
//! `cpus` are fixed-point millicores and custom scalars fixed-point thousandths, so arithmetic
//! never touches floats; `mem` and `disk` are bytes; `ports` are sorted, merged ranges.
//! Text form: `cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000];gpus:2`.
//!
//! **Reservations.** A quantity may be reserved for a role: `cpus(analytics):2;cpus:2` is four
//! CPUs of which two are offered only to frameworks of role `analytics`. The plain fields
//! (`cpus`, `mem`, ...) always hold the *totals*, reserved parts included, and
//! [`Resources::reserved`] says how much of them each role holds. So code that ignores
//! reservations keeps working: a framework offered `cpus(analytics):2;cpus:2` sees `cpus == 4`
//! and may launch a task of 3 CPUs on it.
//!
//! Arithmetic with reservations: a set without a breakdown (a task's flat request) is served by
//! any part, the unreserved part first; a set with a breakdown is served role by role
//! ([`Resources::contains`] checks every part it names).

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
    /// Ports in the range (0 for a backwards range off the wire, which never panics).
    pub fn len(&self) -> u64 {
        (u64::from(self.end) + 1).saturating_sub(u64::from(self.begin))
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
    /// How much of the totals above is reserved for each role (never empty parts, never a
    /// nested breakdown, never more than the totals). Empty for unreserved resources.
    #[serde(default)]
    pub reserved: BTreeMap<String, Resources>,
}

/// Most port ranges a resource set from the wire may carry (before merging).
pub const MAX_PORT_RANGES: usize = 1024;
/// Most custom scalars a resource set from the wire may carry.
pub const MAX_SCALARS: usize = 64;
/// Most roles a resource set from the wire may hold reservations for.
pub const MAX_RESERVED_ROLES: usize = 64;
/// Longest custom resource name.
pub const MAX_RESOURCE_NAME: usize = 64;

/// Whether `name` may name a custom scalar: letters, digits, `_`, `-` or `.` (at most
/// [`MAX_RESOURCE_NAME`]), and not one of the built-in kinds.
pub fn valid_scalar_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_RESOURCE_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        && !matches!(name, "cpus" | "mem" | "disk" | "ports")
}

/// The role name that means "unreserved" (`cpus(*):2` is the same as `cpus:2`).
pub const UNRESERVED_ROLE: &str = "*";

/// Whether `role` is a valid role name for a reservation.
pub fn valid_role(role: &str) -> bool {
    !role.is_empty()
        && role.len() <= 64
        && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' || c == '/')
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
    if v.is_multiple_of(1000) {
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
    /// Parses `cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000];gpus:2`, with reservations
    /// written `cpus(analytics):2`.
    pub fn parse(text: &str) -> Result<Self, ResourceError> {
        let mut r = Resources::default();
        let mut seen = std::collections::BTreeSet::new();
        for item in text.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = item.split_once(':').ok_or_else(|| invalid(item, "expected `name:value`"))?;
            let name = name.trim();
            let (name, role) = match name.split_once('(') {
                None => (name, None),
                Some((n, rest)) => {
                    let role = rest
                        .strip_suffix(')')
                        .map(str::trim)
                        .ok_or_else(|| invalid(item, "a reservation is written `cpus(role):2`"))?;
                    if !valid_role(role) && role != UNRESERVED_ROLE {
                        return Err(invalid(
                            item,
                            "a role is letters, digits, `_`, `-`, `.` or `/` (at most 64)",
                        ));
                    }
                    (n.trim(), (role != UNRESERVED_ROLE).then(|| role.to_string()))
                }
            };
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(invalid(item, "a resource name is letters, digits, `_`, `-` or `.`"));
            }
            let key = match &role {
                Some(role) => format!("{name}({role})"),
                None => name.to_string(),
            };
            if !seen.insert(key.clone()) {
                return Err(ResourceError::Duplicate(key));
            }
            let mut part = Resources::default();
            let value = value.trim();
            match name {
                "cpus" => {
                    part.cpus = parse_milli(value).ok_or_else(|| {
                        invalid(item, "cpus is a number with at most 3 decimals, e.g. `0.5`")
                    })?
                }
                "mem" => part.mem = parse_size(value).map_err(|e| invalid(item, e.to_string()))?,
                "disk" => part.disk = parse_size(value).map_err(|e| invalid(item, e.to_string()))?,
                "ports" => part.ports = parse_ranges(item, value)?,
                _ => {
                    let v = parse_milli(value).ok_or_else(|| {
                        invalid(item, "a custom scalar is a number with at most 3 decimals")
                    })?;
                    part.scalars.insert(name.to_string(), v);
                }
            }
            if name == "ports" && !ranges_sub(&part.ports, &r.ports).eq(&part.ports) {
                return Err(invalid(item, "these ports are given twice"));
            }
            if let Some(role) = role {
                part = part.reserved_as(&role);
            }
            r.add_assign(&part);
        }
        Ok(r)
    }

    /// Checks and normalises a set that came off the wire, where a peer can send what
    /// [`Resources::parse`] would never produce: port ranges sorted and merged (a backwards
    /// range such as `31500-0` is refused), at most [`MAX_PORT_RANGES`] ranges,
    /// [`MAX_SCALARS`] scalars and [`MAX_RESERVED_ROLES`] roles, scalar and role names
    /// checked, zero scalars and empty reserved parts dropped, and a reservation breakdown
    /// that is flat and never more than the totals.
    pub fn normalize_wire(&mut self) -> Result<(), ResourceError> {
        self.normalize_flat(None)?;
        if self.reserved.len() > MAX_RESERVED_ROLES {
            return Err(invalid(
                "reservations",
                format!("{} roles (at most {MAX_RESERVED_ROLES})", self.reserved.len()),
            ));
        }
        for (role, part) in self.reserved.iter_mut() {
            if !valid_role(role) {
                return Err(invalid(
                    &format!("reservation for `{}`", role.escape_debug()),
                    "not a valid role",
                ));
            }
            if !part.reserved.is_empty() {
                return Err(invalid(
                    &format!("reservation for {role}"),
                    "a reserved part has no breakdown of its own",
                ));
            }
            part.normalize_flat(Some(role))?;
        }
        self.reserved.retain(|_, p| !p.is_empty());
        let mut sum = Resources::default();
        for p in self.reserved.values() {
            sum = sum.totals_add(p);
        }
        if !self.totals_contain(&sum) {
            return Err(invalid("reservations", format!("reserved parts ({sum}) exceed the totals")));
        }
        Ok(())
    }

    /// The flat half of [`Resources::normalize_wire`].
    fn normalize_flat(&mut self, role: Option<&str>) -> Result<(), ResourceError> {
        let item = |name: &str| match role {
            Some(r) => format!("{name}({r})"),
            None => name.to_string(),
        };
        if self.ports.len() > MAX_PORT_RANGES {
            return Err(invalid(
                &item("ports"),
                format!("{} ranges (at most {MAX_PORT_RANGES})", self.ports.len()),
            ));
        }
        if let Some(r) = self.ports.iter().find(|r| r.begin > r.end) {
            return Err(invalid(&item("ports"), format!("range {}-{} is backwards", r.begin, r.end)));
        }
        self.ports = normalize(std::mem::take(&mut self.ports));
        if self.scalars.len() > MAX_SCALARS {
            return Err(invalid(
                "scalars",
                format!("{} custom scalars (at most {MAX_SCALARS})", self.scalars.len()),
            ));
        }
        if let Some(bad) = self.scalars.keys().find(|k| !valid_scalar_name(k)) {
            return Err(invalid(
                &item(&bad.escape_debug().to_string()),
                "a resource name is letters, digits, `_`, `-` or `.` (at most 64) and not a built-in kind",
            ));
        }
        self.scalars.retain(|_, v| *v > 0);
        Ok(())
    }

    /// `millicores` unreserved CPUs.
    pub fn cpus(millicores: u64) -> Self {
        Resources { cpus: millicores, ..Default::default() }
    }

    /// True when there is nothing at all.
    pub fn is_empty(&self) -> bool {
        self.cpus == 0
            && self.mem == 0
            && self.disk == 0
            && self.ports.is_empty()
            && self.scalars.values().all(|v| *v == 0)
    }

    /// The same quantities with no reservation breakdown.
    pub fn flatten(&self) -> Resources {
        Resources { reserved: BTreeMap::new(), ..self.clone() }
    }

    /// Totals only, compared kind by kind (no breakdown).
    fn totals_contain(&self, other: &Resources) -> bool {
        self.cpus >= other.cpus
            && self.mem >= other.mem
            && self.disk >= other.disk
            && ranges_contain(&self.ports, &other.ports)
            && other.scalars.iter().all(|(k, v)| *v == 0 || self.scalars.get(k).is_some_and(|s| s >= v))
    }

    /// True when every quantity in `other` fits in `self`. A flat `other` (no breakdown) is
    /// compared on totals; a reserved part of `other` must fit in the same role's part of
    /// `self`, and its unreserved part in `self`'s unreserved part.
    pub fn contains(&self, other: &Resources) -> bool {
        if !self.totals_contain(other) {
            return false;
        }
        if other.reserved.is_empty() {
            return true;
        }
        other
            .reserved
            .iter()
            .all(|(role, part)| self.reserved.get(role).is_some_and(|p| p.totals_contain(part)))
            && self.unreserved().totals_contain(&other.unreserved())
    }

    /// `self - other`, or `None` when `other` does not fit.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        if !self.contains(other) {
            return None;
        }
        Some(self.saturating_sub(other))
    }

    /// The totals of `self - other`, clamping at zero, without a breakdown.
    fn totals_sub(&self, other: &Resources) -> Resources {
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
            reserved: BTreeMap::new(),
        }
    }

    /// `self - other`, clamping at zero (for bookkeeping that must never panic). The reserved
    /// parts `other` names are taken from the same roles; the rest of `other` comes from the
    /// unreserved part first, then from the reservations.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        if other.is_empty() {
            return self.clone();
        }
        let mut out = self.totals_sub(other);
        if self.reserved.is_empty() {
            return out;
        }
        let mut reserved = self.reserved.clone();
        for (role, part) in &other.reserved {
            if let Some(p) = reserved.get_mut(role) {
                *p = p.totals_sub(part);
            }
        }
        out.reserved = reserved;
        out.clamp_reserved();
        out
    }

    /// Restores the invariants of the breakdown: no empty parts, and the parts never add up
    /// to more than the totals (a flat subtraction that went past the unreserved part took
    /// the rest from the reservations, in role order from the last).
    fn clamp_reserved(&mut self) {
        self.reserved.retain(|_, p| !p.is_empty());
        if self.reserved.is_empty() {
            return;
        }
        let mut sum = Resources::default();
        for p in self.reserved.values() {
            sum = sum.totals_add(p);
        }
        if self.totals_contain(&sum) {
            return;
        }
        let mut excess = sum.totals_sub(self);
        excess.ports = ranges_sub(&sum.ports, &self.ports);
        for p in self.reserved.values_mut().rev() {
            let take = excess.totals_min(p);
            *p = p.totals_sub(&take);
            excess = excess.totals_sub(&take);
        }
        self.reserved.retain(|_, p| !p.is_empty());
    }

    /// Kind by kind minimum of two flat sets (ports: the intersection).
    fn totals_min(&self, other: &Resources) -> Resources {
        let mut scalars = BTreeMap::new();
        for (k, v) in &self.scalars {
            let m = (*v).min(other.scalars.get(k).copied().unwrap_or(0));
            if m > 0 {
                scalars.insert(k.clone(), m);
            }
        }
        Resources {
            cpus: self.cpus.min(other.cpus),
            mem: self.mem.min(other.mem),
            disk: self.disk.min(other.disk),
            ports: ranges_sub(&self.ports, &ranges_sub(&self.ports, &other.ports)),
            scalars,
            reserved: BTreeMap::new(),
        }
    }

    fn totals_add(&self, other: &Resources) -> Resources {
        let mut scalars = self.scalars.clone();
        for (k, v) in &other.scalars {
            let e = scalars.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
        let ports = if other.ports.is_empty() {
            self.ports.clone()
        } else {
            let mut ports = self.ports.clone();
            ports.extend_from_slice(&other.ports);
            normalize(ports)
        };
        Resources {
            cpus: self.cpus.saturating_add(other.cpus),
            mem: self.mem.saturating_add(other.mem),
            disk: self.disk.saturating_add(other.disk),
            ports,
            scalars,
            reserved: BTreeMap::new(),
        }
    }

    /// `self + other` (saturating; ports are merged; reserved parts add up role by role).
    pub fn add(&self, other: &Resources) -> Resources {
        if other.is_empty() {
            return self.clone();
        }
        let mut out = self.totals_add(other);
        if self.reserved.is_empty() && other.reserved.is_empty() {
            return out;
        }
        out.reserved = self.reserved.clone();
        for (role, part) in &other.reserved {
            let e = out.reserved.entry(role.clone()).or_default();
            *e = e.totals_add(part);
        }
        out.clamp_reserved();
        out
    }

    /// Adds `other` in place.
    pub fn add_assign(&mut self, other: &Resources) {
        *self = self.add(other);
    }

    /// The same quantities, all reserved for `role` (`*` means unreserved).
    pub fn reserved_as(&self, role: &str) -> Resources {
        let flat = self.flatten();
        if role == UNRESERVED_ROLE || flat.is_empty() {
            return flat;
        }
        let mut out = flat.clone();
        out.reserved.insert(role.to_string(), flat);
        out
    }

    /// The unreserved part, flat.
    pub fn unreserved(&self) -> Resources {
        if self.reserved.is_empty() {
            return self.clone();
        }
        let mut out = self.flatten();
        for p in self.reserved.values() {
            out = out.totals_sub(p);
        }
        out
    }

    /// The part reserved for `role`, flat (the unreserved part for `*`).
    pub fn reserved_for(&self, role: &str) -> Resources {
        if role == UNRESERVED_ROLE {
            return self.unreserved();
        }
        self.reserved.get(role).cloned().unwrap_or_default()
    }

    /// What a framework of `role` may be offered out of `self`: the unreserved part and the
    /// part reserved for `role` (with its breakdown).
    pub fn for_role(&self, role: &str) -> Resources {
        if self.reserved.is_empty() || (self.reserved.len() == 1 && self.reserved.contains_key(role)) {
            return self.clone();
        }
        let mut out = self.unreserved();
        if let Some(p) = self.reserved.get(role) {
            out = out.totals_add(p);
            out.reserved.insert(role.to_string(), p.clone());
        }
        out
    }

    /// Takes the flat quantities `want` out of `self` for a framework of `role`: first from
    /// the part reserved for `role`, then from the unreserved part. Returns the labelled slice,
    /// or `None` when it does not fit there.
    pub fn take_for_role(&self, role: &str, want: &Resources) -> Option<Resources> {
        let own = self.reserved_for(role);
        let from_reserved = if role == UNRESERVED_ROLE { Resources::default() } else { own.totals_min(want) };
        let rest = want.flatten().totals_sub(&from_reserved);
        if !self.unreserved().totals_contain(&rest) || !from_reserved.totals_add(&rest).totals_contain(want) {
            return None;
        }
        Some(from_reserved.reserved_as(role).add(&rest))
    }

    /// Caps every kind `cap` names at `cap`'s quantity (kinds `cap` does not name are kept;
    /// ports are never capped). Reserved parts shrink with the totals.
    pub fn capped_by(&self, cap: &Resources, named: &ResourceKinds) -> Resources {
        let mut out = self.clone();
        if named.cpus {
            out.cpus = out.cpus.min(cap.cpus);
        }
        if named.mem {
            out.mem = out.mem.min(cap.mem);
        }
        if named.disk {
            out.disk = out.disk.min(cap.disk);
        }
        for k in &named.scalars {
            let c = cap.scalars.get(k).copied().unwrap_or(0);
            if let Some(v) = out.scalars.get_mut(k) {
                *v = (*v).min(c);
            }
        }
        out.scalars.retain(|_, v| *v > 0);
        // Reserved parts are kept first: what is cut goes from the unreserved part.
        out.clamp_reserved();
        out
    }

    /// The kinds this set names with a non-zero quantity.
    pub fn kinds(&self) -> ResourceKinds {
        ResourceKinds {
            cpus: self.cpus > 0,
            mem: self.mem > 0,
            disk: self.disk > 0,
            scalars: self.scalars.iter().filter(|(_, v)| **v > 0).map(|(k, _)| k.clone()).collect(),
        }
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

impl Resources {
    /// The `name:value` items of a flat set, with `(role)` after each name when given.
    fn items(&self, role: Option<&str>, parts: &mut Vec<String>) {
        let n = |name: &str| match role {
            Some(r) => format!("{name}({r})"),
            None => name.to_string(),
        };
        if self.cpus > 0 {
            parts.push(format!("{}:{}", n("cpus"), format_milli(self.cpus)));
        }
        if self.mem > 0 {
            parts.push(format!("{}:{}", n("mem"), format_size(self.mem)));
        }
        if self.disk > 0 {
            parts.push(format!("{}:{}", n("disk"), format_size(self.disk)));
        }
        if !self.ports.is_empty() {
            let r: Vec<String> = self
                .ports
                .iter()
                .map(
                    |p| if p.begin == p.end { p.begin.to_string() } else { format!("{}-{}", p.begin, p.end) },
                )
                .collect();
            parts.push(format!("{}:[{}]", n("ports"), r.join(",")));
        }
        for (k, v) in &self.scalars {
            if *v > 0 {
                parts.push(format!("{}:{}", n(k), format_milli(*v)));
            }
        }
    }
}

/// Which kinds a set of resources names (for quotas: a limit caps only the kinds it names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceKinds {
    pub cpus: bool,
    pub mem: bool,
    pub disk: bool,
    pub scalars: Vec<String>,
}

impl fmt::Display for Resources {
    /// The text form [`Resources::parse`] reads back: the unreserved part, then each role's.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        self.unreserved().items(None, &mut parts);
        for (role, part) in &self.reserved {
            part.items(Some(role), &mut parts);
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
        assert!(Resources::parse("cpus(web:2").unwrap_err().to_string().contains("reservation"));
        assert!(Resources::parse("cpus(a b):2").unwrap_err().to_string().contains("role"));
        assert!(Resources::parse("cpus(web):2;cpus(web):1").is_err());
        assert!(Resources::parse("ports:[1-10];ports(web):[5-6]").is_err());
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

    #[test]
    fn reservations_parse_display_and_round_trip() {
        let r = Resources::parse("cpus(analytics):2;mem(analytics):4GiB;cpus:2;ports(web):[80-81]").unwrap();
        assert_eq!(r.cpus, 4000, "totals include reserved parts");
        assert_eq!(r.mem, 4 << 30);
        assert_eq!(r.reserved_for("analytics"), Resources::parse("cpus:2;mem:4GiB").unwrap());
        assert_eq!(r.unreserved(), Resources::parse("cpus:2").unwrap());
        assert_eq!(r.to_string(), "cpus:2;cpus(analytics):2;mem(analytics):4GiB;ports(web):[80-81]");
        assert_eq!(Resources::parse(&r.to_string()).unwrap(), r);
        assert_eq!(Resources::parse("cpus(*):1").unwrap(), Resources::cpus(1000));
        // Postcard round-trip keeps the breakdown.
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<Resources>(&bytes).unwrap(), r);
    }

    #[test]
    fn reservations_are_offered_per_role() {
        let r = Resources::parse("cpus(analytics):2;mem(analytics):4GiB;cpus:2;mem:1GiB").unwrap();
        let web = r.for_role("web");
        assert_eq!(web, Resources::parse("cpus:2;mem:1GiB").unwrap());
        let an = r.for_role("analytics");
        assert_eq!(an, r);
        // A flat task is served from the role's reservation first, then the unreserved part.
        let slice = r.take_for_role("analytics", &Resources::parse("cpus:3;mem:1GiB").unwrap()).unwrap();
        assert_eq!(slice.to_string(), "cpus:1;cpus(analytics):2;mem(analytics):1GiB");
        assert!(r.contains(&slice));
        let left = r.checked_sub(&slice).unwrap();
        assert_eq!(left.to_string(), "cpus:1;mem:1GiB;mem(analytics):3GiB");
        assert!(r.take_for_role("web", &Resources::parse("cpus:3").unwrap()).is_none());
        // A labelled request needs the same role's part.
        assert!(!r.contains(&Resources::parse("cpus(web):1").unwrap()));
        assert!(!r.contains(&Resources::parse("cpus:3;cpus(analytics):1").unwrap()));
        // Flat arithmetic (what frameworks do) sees totals: 4 CPUs fit.
        let flat = r.checked_sub(&Resources::parse("cpus:3").unwrap()).unwrap();
        assert_eq!(flat.cpus, 1000);
        assert_eq!(flat.reserved_for("analytics").cpus, 1000, "taken from unreserved first");
        assert_eq!(flat.add(&slice).cpus, 4000);
    }

    #[test]
    fn wire_sets_are_normalised_or_refused() {
        let mut r = Resources {
            ports: vec![
                PortRange { begin: 40, end: 50 },
                PortRange { begin: 10, end: 20 },
                PortRange { begin: 21, end: 30 },
            ],
            ..Default::default()
        };
        r.scalars.insert("gpus".into(), 0);
        r.normalize_wire().unwrap();
        assert_eq!(r.ports, vec![PortRange { begin: 10, end: 30 }, PortRange { begin: 40, end: 50 }]);
        assert!(r.scalars.is_empty(), "zero scalars are dropped");
        let mut backwards =
            Resources { ports: vec![PortRange { begin: 31500, end: 0 }], ..Default::default() };
        let e = backwards.normalize_wire().unwrap_err().to_string();
        assert!(e.contains("31500-0 is backwards"), "{e}");
        let mut many = Resources {
            ports: vec![PortRange { begin: 1, end: 1 }; MAX_PORT_RANGES + 1],
            ..Default::default()
        };
        assert!(many.normalize_wire().is_err());
        for name in ["", "a/b", "cpus", "x\n", &"g".repeat(65)] {
            let mut bad = Resources::default();
            bad.scalars.insert(name.to_string(), 1000);
            assert!(bad.normalize_wire().is_err(), "{name:?}");
        }
        let mut over = Resources::cpus(1000);
        over.reserved.insert("a".into(), Resources::cpus(2000));
        assert!(over.normalize_wire().unwrap_err().to_string().contains("exceed"));
        let mut bad_role = Resources::cpus(1000);
        bad_role.reserved.insert("a b".into(), Resources::cpus(500));
        assert!(bad_role.normalize_wire().is_err());
        let mut nested = Resources::parse("cpus(a):1").unwrap();
        nested.reserved.insert("a".into(), Resources::parse("cpus(b):1").unwrap());
        assert!(nested.normalize_wire().is_err());
        let mut ok = Resources::parse("cpus(a):1;cpus:1;ports(web):[80-81]").unwrap();
        let before = ok.clone();
        ok.normalize_wire().unwrap();
        assert_eq!(ok, before, "what parse produces is already normal");
    }

    #[test]
    fn capping_cuts_the_unreserved_part_first() {
        let r = Resources::parse("cpus(a):1;cpus:3;mem:8GiB").unwrap();
        let cap = Resources::parse("cpus:2").unwrap();
        let c = r.capped_by(&cap, &cap.kinds());
        assert_eq!(c.to_string(), "cpus:1;mem:8GiB;cpus(a):1");
    }
}
