//! Fast paths of the `Resources` arithmetic the allocation cycle does per grant and per
//! offer. The general operations build a new set (ports, custom scalars and reservation
//! breakdowns included); for *plain* sets (cpus, mem and disk only, by far the common case)
//! the result is the same field-by-field arithmetic, done in place.

use agora_sdk::Resources;

/// Only cpus, mem and disk: no ports, no custom scalars, no reservation breakdown.
pub(crate) fn plain(r: &Resources) -> bool {
    r.ports.is_empty() && r.scalars.is_empty() && r.reserved.is_empty()
}

/// `a.add_assign(b)`.
pub(crate) fn add_assign(a: &mut Resources, b: &Resources) {
    if plain(a) && plain(b) {
        a.cpus = a.cpus.saturating_add(b.cpus);
        a.mem = a.mem.saturating_add(b.mem);
        a.disk = a.disk.saturating_add(b.disk);
    } else {
        a.add_assign(b);
    }
}

/// `*a = a.saturating_sub(b)`.
pub(crate) fn sub_assign(a: &mut Resources, b: &Resources) {
    if plain(a) && plain(b) {
        a.cpus = a.cpus.saturating_sub(b.cpus);
        a.mem = a.mem.saturating_sub(b.mem);
        a.disk = a.disk.saturating_sub(b.disk);
    } else {
        *a = a.saturating_sub(b);
    }
}

/// `a.saturating_sub(b)`.
pub(crate) fn sub(a: &Resources, b: &Resources) -> Resources {
    if plain(a) && plain(b) {
        Resources {
            cpus: a.cpus.saturating_sub(b.cpus),
            mem: a.mem.saturating_sub(b.mem),
            disk: a.disk.saturating_sub(b.disk),
            ..Resources::default()
        }
    } else {
        a.saturating_sub(b)
    }
}

/// `a.contains(b)`.
pub(crate) fn contains(a: &Resources, b: &Resources) -> bool {
    if plain(b) {
        a.cpus >= b.cpus && a.mem >= b.mem && a.disk >= b.disk
    } else {
        a.contains(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(s: &str) -> Resources {
        Resources::parse(s).expect("test resources")
    }

    #[test]
    fn fast_paths_agree_with_the_general_operations() {
        let sets = [
            "",
            "cpus:1",
            "cpus:2;mem:3GiB;disk:1GiB",
            "cpus:40;mem:1TiB",
            "mem:1B",
            "cpus:1;gpus:1",
            "cpus:1;ports:[1-10]",
            "cpus(a):1;cpus:2",
        ];
        for x in sets {
            for y in sets {
                let (a, b) = (res(x), res(y));
                let mut s = a.clone();
                add_assign(&mut s, &b);
                assert_eq!(s, a.add(&b), "{x} + {y}");
                let mut d = a.clone();
                sub_assign(&mut d, &b);
                assert_eq!(d, a.saturating_sub(&b), "{x} - {y}");
                assert_eq!(sub(&a, &b), a.saturating_sub(&b), "{x} - {y}");
                assert_eq!(contains(&a, &b), a.contains(&b), "{x} contains {y}");
            }
        }
    }
}
