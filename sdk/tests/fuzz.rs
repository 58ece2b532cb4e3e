//! Fuzzing of everything a peer or a user controls in the SDK, as proptest properties (stable
//! toolchain, no cargo-fuzz): the frame decoder, every wire message enum, the resource and
//! attribute parsers and the units parser. Nothing may panic, the frame decoder may not
//! buffer past its cap, and whatever decodes or parses must survive a round trip.
//!
//! CI runs [`DEFAULT_CASES`] cases per property (the whole file well under a minute in a
//! debug build); `AGORA_FUZZ_CASES=100000 cargo test -p agora-sdk --test fuzz` runs longer.
//! A failing case is written to `sdk/proptest-regressions/fuzz.txt`, kept in the repository
//! and replayed first on every later run.

use agora_sdk::executor_proto::{AgentToExecutor, ExecutorMessage};
use agora_sdk::frame::{FrameError, FrameReader};
use agora_sdk::proto::*;
use agora_sdk::units::{format_size, parse_duration, parse_size};
use agora_sdk::{Attributes, Resources};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Cases per property in CI.
const DEFAULT_CASES: u32 = 2000;

fn config() -> ProptestConfig {
    let cases = std::env::var("AGORA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    // Beside the crate's manifest, whatever directory the test runs in.
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/fuzz.txt");
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(corpus))),
        ..ProptestConfig::default()
    }
}

/// Decodes `bytes` as a `T`; when that works, the value encodes and decodes to the same bytes.
fn decode_round_trip<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = postcard::from_bytes::<T>(bytes) {
        let once = postcard::to_stdvec(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let again: T = postcard::from_bytes(&once).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let twice = postcard::to_stdvec(&again).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(once, twice);
    }
    Ok(())
}

/// Every message type that comes off a stream: the connection's first message, each control
/// enum of both directions, the bulk-stream requests and replies, and the executor link's.
fn decode_every_message(bytes: &[u8]) -> Result<(), TestCaseError> {
    decode_round_trip::<Hello>(bytes)?;
    decode_round_trip::<HelloReply>(bytes)?;
    decode_round_trip::<AgentMessage>(bytes)?;
    decode_round_trip::<MasterToAgent>(bytes)?;
    decode_round_trip::<SchedulerCall>(bytes)?;
    decode_round_trip::<SchedulerEvent>(bytes)?;
    decode_round_trip::<OperatorCall>(bytes)?;
    decode_round_trip::<OperatorReply>(bytes)?;
    decode_round_trip::<StreamRequest>(bytes)?;
    decode_round_trip::<FilesReply>(bytes)?;
    decode_round_trip::<UploadReply>(bytes)?;
    decode_round_trip::<FetchReply>(bytes)?;
    decode_round_trip::<OutputReply>(bytes)?;
    decode_round_trip::<ExecutorMessage>(bytes)?;
    decode_round_trip::<AgentToExecutor>(bytes)?;
    Ok(())
}

/// Random bytes that often start with a valid variant index (postcard's varint), so that the
/// decoders get past the first byte and into the variants' fields.
fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
    (0u8..48, proptest::collection::vec(any::<u8>(), 0..384)).prop_map(|(tag, mut rest)| {
        rest.insert(0, tag);
        rest
    })
}

/// One frame on the wire: its declared length and the bytes that follow (often not that many).
fn frame() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let len = prop_oneof![
        0u32..64,
        Just(FUZZ_MAX as u32),
        Just(FUZZ_MAX as u32 + 1),
        Just(u32::MAX),
        any::<u32>(),
    ];
    (len, proptest::collection::vec(any::<u8>(), 0..128))
}

/// The frame cap in these tests: small, so that the properties reach it.
const FUZZ_MAX: usize = 1024;

fn read_all(wire: &[u8]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async {
        let mut reader = FrameReader::with_max(wire, FUZZ_MAX);
        for _ in 0..wire.len() + 1 {
            match reader.recv::<SchedulerCall>().await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(FrameError::TooLarge { max }) => {
                    prop_assert_eq!(max, FUZZ_MAX);
                    break;
                }
                Err(_) => break,
            }
        }
        // Never more than about one frame buffered, whatever length the prefix claims.
        let (_, buffered) = reader.into_parts();
        prop_assert!(
            buffered.capacity() <= 4 * FUZZ_MAX + 16 * 1024,
            "buffered {} bytes",
            buffered.capacity()
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_decode_into_every_message_type_without_panic(bytes in message_bytes()) {
        decode_every_message(&bytes)?;
    }

    #[test]
    fn the_frame_decoder_survives_any_stream(frames in proptest::collection::vec(frame(), 0..6), cut in any::<usize>()) {
        let mut wire = Vec::new();
        for (len, body) in &frames {
            wire.extend_from_slice(&len.to_be_bytes());
            wire.extend_from_slice(body);
        }
        // Truncated anywhere, too.
        let cut = if wire.is_empty() { 0 } else { cut % (wire.len() + 1) };
        read_all(&wire[..cut])?;
        read_all(&wire)?;
    }

    #[test]
    fn an_oversized_length_prefix_is_refused_before_its_body(len in (FUZZ_MAX as u32 + 1)..=u32::MAX) {
        let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let wire = len.to_be_bytes();
        let got = rt.block_on(FrameReader::with_max(&wire[..], FUZZ_MAX).recv::<Hello>());
        prop_assert!(matches!(got, Err(FrameError::TooLarge { .. })), "{:?}", got);
    }

    #[test]
    fn resource_text_parses_or_is_refused_and_what_parses_prints_back(text in resource_text()) {
        if let Ok(r) = Resources::parse(&text) {
            // Printing is for people and rounds sizes (`mem:1025GB` prints as GiB with one
            // decimal): what it prints parses back to the same resources, sizes within 5 %.
            let printed = r.to_string();
            let back = Resources::parse(&printed);
            prop_assert!(back.is_ok(), "{:?} printed as {:?}: {:?}", text, printed, back);
            if let Ok(back) = back {
                prop_assert!(close(&r, &back), "{:?} printed as {:?}, read back as {:?}", r, printed, back);
            }
        }
    }

    #[test]
    fn attribute_text_parses_or_is_refused_and_what_parses_prints_back(text in attribute_text()) {
        if let Ok(a) = Attributes::parse(&text) {
            // Printing is for people and rounds sizes (`mem:1025GB` prints as GiB with one
            // decimal): what it prints parses, and prints the same again.
            let printed = a.to_string();
            let back = Attributes::parse(&printed);
            prop_assert!(back.is_ok(), "{:?} printed as {:?}: {:?}", text, printed, back);
            prop_assert_eq!(back.map(|b| b.to_string()).ok(), Some(printed));
        }
    }

    #[test]
    fn units_parse_without_panic(text in unit_text(), n in any::<u64>()) {
        let _ = parse_size(&text);
        let _ = parse_duration(&text);
        // A size printed is read back as the same number of bytes, or at worst rounded.
        let printed = format_size(n);
        prop_assert!(parse_size(&printed).is_ok(), "{} printed as {:?}", n, printed);
        prop_assert_eq!(parse_size(&format!("{n}B")).ok(), Some(n));
    }
}

/// `a` and `b` hold the same resources, sizes (mem, disk) within 5 % (printing rounds them).
fn close(a: &Resources, b: &Resources) -> bool {
    let near = |x: u64, y: u64| x.abs_diff(y) <= x / 20 + 1;
    a.cpus == b.cpus
        && near(a.mem, b.mem)
        && near(a.disk, b.disk)
        && a.ports == b.ports
        && a.scalars == b.scalars
        && a.reserved.len() == b.reserved.len()
        && a.reserved.iter().zip(&b.reserved).all(|((ra, xa), (rb, xb))| ra == rb && close(xa, xb))
}

/// Resource-shaped text: names, reservations, scalars with units, ranges (inverted, huge,
/// overlapping), sets, and arbitrary characters between them.
fn resource_text() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("cpus".to_string()),
        Just("mem".to_string()),
        Just("disk".to_string()),
        Just("ports".to_string()),
        Just("gpus".to_string()),
        "[a-z_]{1,6}",
    ];
    let role = prop_oneof![Just(String::new()), "\\([a-z*/._-]{0,6}\\)", "\\(.{0,4}\\)"];
    let value = prop_oneof![
        "[0-9]{1,20}(\\.[0-9]{0,4})?([KMGTP]i?B|B)?",
        "\\[([0-9]{1,20}-[0-9]{1,20}(, ?)?){0,4}\\]",
        "\\{([a-z0-9]{0,4},?){0,4}\\}",
        "-?[0-9.eE+]{0,10}",
        ".{0,12}",
    ];
    let item = (name, role, value).prop_map(|(n, r, v)| format!("{n}{r}:{v}"));
    prop_oneof![proptest::collection::vec(item, 0..6).prop_map(|items| items.join(";")), ".{0,64}",]
}

/// Attribute-shaped text: text, scalar, range and set values, and anything else.
fn attribute_text() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        "[a-zA-Z0-9_.-]{1,8}",
        "-?[0-9]{1,20}(\\.[0-9]{0,6})?",
        "\\[([0-9]{1,20}-[0-9]{1,20},?){0,3}\\]",
        "\\{([a-z0-9]{0,4},?){0,4}\\}",
        ".{0,10}",
    ];
    let item = ("[a-z_]{1,6}", value).prop_map(|(n, v)| format!("{n}:{v}"));
    prop_oneof![proptest::collection::vec(item, 0..6).prop_map(|items| items.join(";")), ".{0,64}"]
}

/// Sizes and durations, well-formed or not.
fn unit_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,25}(\\.[0-9]{0,25})? ?(B|KiB|MiB|GiB|TiB|PiB|EiB|kB|KB|MB|GB|TB|ns|us|ms|s|m|min|h|d|µs)?",
        "[0-9eE.+-]{0,12}[a-zµ]{0,3}",
        ".{0,16}",
    ]
}

/// What the fuzzing found, kept as plain cases: printing rounds sizes (`mem:1025GB` is
/// `mem:954.6GiB`, `mem:9700000000` is `mem:9.0GiB`, which reads back as 9 GiB), so printed
/// resources are for people, not a lossless format; the wire carries exact numbers.
#[test]
fn found_cases() {
    for text in ["mem:1025GB", "mem:9700000000", "disk:1.5GiB;cpus:0.001", "ports:[5-3]", "cpus(a/b):1"] {
        if let Ok(r) = Resources::parse(text) {
            let back = Resources::parse(&r.to_string()).expect("printed resources parse");
            assert!(close(&r, &back), "{text}: {r:?} vs {back:?}");
        }
    }
}
