//! Fuzzing of [`unpack`], which opens the `--dir` archives frameworks ship: hostile archives
//! (`..` components, absolute paths, symlinks and hard links pointing out, GNU long names and
//! PAX paths that say either, sizes far past the data, devices, random corruption) may fail,
//! but never panic and never create or change anything outside the target directory, and
//! leave no link inside it.
//!
//! CI runs [`DEFAULT_CASES`] cases; `AGORA_FUZZ_CASES=100000 cargo test -p agora-agent fuzz`
//! runs longer. Failing cases go to `agent/proptest-regressions/fetch_fuzz.txt`,
//! kept in the repository.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tar::{EntryType, Header};

use super::unpack;

const DEFAULT_CASES: u32 = 1000;

fn config() -> ProptestConfig {
    let cases = std::env::var("AGORA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    // Beside the crate's manifest, whatever directory the test runs in.
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/fetch_fuzz.txt");
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(corpus))),
        ..ProptestConfig::default()
    }
}

/// Stands for the absolute path of the directory beside the target (known only at run time).
const OUTSIDE: &str = "@OUTSIDE@";

/// How one entry names itself.
#[derive(Clone, Debug)]
enum Naming {
    /// In the header's own 100 bytes.
    Plain,
    /// In a GNU long-name entry before it.
    GnuLong,
    /// In a PAX extended header before it.
    Pax,
}

#[derive(Clone, Debug)]
struct Entry {
    path: String,
    naming: Naming,
    kind: u8,
    link: String,
    /// The size the header declares.
    declared: u64,
    data: Vec<u8>,
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("x/../..".to_string()),
        Just(OUTSIDE.to_string()),
        Just("canary".to_string()),
        "[a-z.]{1,4}",
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let path = proptest::collection::vec(component(), 1..5).prop_map(|c| c.join("/"));
    let abs = any::<bool>();
    let naming = prop_oneof![Just(Naming::Plain), Just(Naming::GnuLong), Just(Naming::Pax)];
    let kind = prop_oneof![
        Just(b'0'),
        Just(b'\0'),
        Just(b'5'),
        Just(b'2'),
        Just(b'1'),
        Just(b'3'),
        Just(b'6'),
        Just(b'S'),
        Just(b'7'),
        any::<u8>(),
    ];
    let link = prop_oneof![
        Just("..".to_string()),
        Just("../..".to_string()),
        Just("/".to_string()),
        Just(OUTSIDE.to_string()),
        Just(format!("{OUTSIDE}/canary")),
        Just("a".to_string()),
        Just("../outside/canary".to_string()),
    ];
    let declared = prop_oneof![
        Just(None),
        Just(Some(8u64 << 30)),
        Just(Some(u64::MAX >> 2)),
        (0u64..2048).prop_map(Some)
    ];
    let data = proptest::collection::vec(any::<u8>(), 0..600);
    (path, abs, naming, kind, link, declared, data).prop_map(
        |(path, abs, naming, kind, link, declared, data)| {
            let path = if abs { format!("/{path}") } else { path };
            Entry { path, naming, kind, link, declared: declared.unwrap_or(data.len() as u64), data }
        },
    )
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(512) * 512, 0);
    v
}

fn raw_header(name: &[u8], kind: u8, link: &[u8], size: u64) -> Header {
    let mut h = Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(old.linkname.len());
        old.linkname[..l].copy_from_slice(&link[..l]);
    }
    h.set_entry_type(EntryType::new(kind));
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    h
}

fn archive(entries: &[Entry], outside: &Path, flips: &[(usize, u8)], end: bool) -> Vec<u8> {
    let outside = outside.display().to_string();
    let mut out = Vec::new();
    for e in entries {
        let path = e.path.replace(OUTSIDE, &outside);
        let link = e.link.replace(OUTSIDE, &outside);
        match e.naming {
            Naming::Plain => {}
            Naming::GnuLong => {
                let mut name = path.clone().into_bytes();
                name.push(0);
                out.extend_from_slice(raw_header(b"././@LongLink", b'L', b"", name.len() as u64).as_bytes());
                out.extend(padded(&name));
            }
            Naming::Pax => {
                let record = |key: &str, value: &str| {
                    let body = format!(" {key}={value}\n");
                    let mut len = body.len() + 1;
                    while format!("{len}{body}").len() != len {
                        len += 1;
                    }
                    format!("{len}{body}")
                };
                let pax = format!("{}{}", record("path", &path), record("linkpath", &link));
                out.extend_from_slice(raw_header(b"pax", b'x', b"", pax.len() as u64).as_bytes());
                out.extend(padded(pax.as_bytes()));
            }
        }
        out.extend_from_slice(raw_header(path.as_bytes(), e.kind, link.as_bytes(), e.declared).as_bytes());
        out.extend(padded(&e.data));
    }
    if end {
        out.extend_from_slice(&[0u8; 1024]);
    }
    for &(pos, byte) in flips {
        if !out.is_empty() {
            let i = pos % out.len();
            out[i] ^= byte;
        }
    }
    out
}

/// Every path under `dir` (not following links), with whether it is a symlink.
fn walk(dir: &Path, out: &mut Vec<(std::path::PathBuf, bool)>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        out.push((p.clone(), link));
        if !link && p.is_dir() {
            walk(&p, out);
        }
    }
}

fn check(entries: &[Entry], flips: &[(usize, u8)], end: bool) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let dest = root.path().join("dest");
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).map_err(|e| TestCaseError::fail(e.to_string()))?;
    std::fs::write(outside.join("canary"), b"untouched").map_err(|e| TestCaseError::fail(e.to_string()))?;
    let bytes = archive(entries, &outside, flips, end);
    let file = root.path().join("archive.tar");
    std::fs::write(&file, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;

    let _ = unpack(&file, &dest, None);

    let mut all = Vec::new();
    walk(root.path(), &mut all);
    for (p, link) in all {
        if p.starts_with(&dest) {
            prop_assert!(!link, "a link was unpacked: {}", p.display());
            continue;
        }
        let known = [root.path().join("archive.tar"), outside.clone(), outside.join("canary"), dest.clone()];
        prop_assert!(known.contains(&p), "written outside the target: {}", p.display());
    }
    let canary = std::fs::read(outside.join("canary")).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(canary, b"untouched".to_vec());
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn hostile_archives_never_write_outside_the_target(
        entries in proptest::collection::vec(entry(), 0..6),
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..3),
        end in any::<bool>(),
    ) {
        check(&entries, &flips, end)?;
    }

    #[test]
    fn random_bytes_are_no_archive_to_fear(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let root = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let file = root.path().join("archive.tar");
        std::fs::write(&file, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let dest = root.path().join("dest");
        let _ = unpack(&file, &dest, None);
        let mut all = Vec::new();
        walk(root.path(), &mut all);
        for (p, link) in all {
            prop_assert!(p == file || p.starts_with(&dest), "written outside the target: {}", p.display());
            prop_assert!(!link, "a link was unpacked: {}", p.display());
        }
    }
}

/// The generator makes archives the unpacker reads: a plain one lands where it says.
#[test]
fn a_plain_archive_unpacks() {
    let root = tempfile::tempdir().unwrap();
    let entries = [Entry {
        path: "a/b.txt".into(),
        naming: Naming::GnuLong,
        kind: b'0',
        link: String::new(),
        declared: 5,
        data: b"hello".to_vec(),
    }];
    let file = root.path().join("archive.tar");
    std::fs::write(&file, archive(&entries, root.path(), &[], true)).unwrap();
    unpack(&file, &root.path().join("dest"), None).unwrap();
    assert_eq!(std::fs::read(root.path().join("dest/a/b.txt")).unwrap(), b"hello");
}

/// The cases above that matter most, spelled out (they run whatever the case count).
#[test]
fn known_escapes_are_refused() {
    let e = |path: &str, kind: u8, link: &str, naming: Naming| Entry {
        path: path.into(),
        naming,
        kind,
        link: link.into(),
        declared: 5,
        data: b"owned".to_vec(),
    };
    for entries in [
        vec![e("../outside/canary", b'0', "", Naming::Plain)],
        vec![e("a/../../outside/canary", b'0', "", Naming::GnuLong)],
        vec![e(&format!("{OUTSIDE}/canary"), b'0', "", Naming::Plain)],
        vec![e(&format!("{OUTSIDE}/new"), b'0', "", Naming::Pax)],
        vec![e("out", b'2', OUTSIDE, Naming::Plain), e("out/new", b'0', "", Naming::Plain)],
        vec![
            e("hard", b'1', &format!("{OUTSIDE}/canary"), Naming::Plain),
            e("hard", b'0', "", Naming::Plain),
        ],
        vec![e("../../x", b'5', "", Naming::Pax)],
    ] {
        check(&entries, &[], true).unwrap();
    }
}
