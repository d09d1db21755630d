//! Properties of the pure model API (`parse_body`, `validate_all`) under hostile request bodies: whatever the bytes,
//! no panic, no hang, no recursion that a deep body could turn into a stack overflow, and memory in proportion to the
//! body.
//!
//! A test binary of its own because it weighs each parse with a counting global allocator: there is one allocator
//! per binary, and in a shared one it would count every other test's allocations too (and slow them down).

mod cases;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use cases::{max_body_bytes, max_updates, Expected, FieldCase, Stream, MAX_ERRORS, NESTING_LEVELS};
use ingest_gateway::model::location::is_valid_device_id;
use ingest_gateway::model::{
    parse_body, validate_all, BodyError, BodyFormat, LocationUpdate, PollResult, Update, ValidationFailure,
    ValidationRules, MAX_ATTRIBUTES_BYTES,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::OffsetDateTime;

const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);

fn config() -> ProptestConfig {
    // Enough cases to reach the odd corners, few enough that a debug build stays well under 20 s.
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Heap accounting: each thread counts what it allocates, so that a parse can be weighed while other tests run.

struct CountingAllocator;

thread_local! {
    // Const-initialised and without destructor: safe to touch from inside the allocator.
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn note_allocation(delta: isize) {
    // `try_with` because a thread being torn down may still free memory after its slots are gone.
    let _ = LIVE_BYTES.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            note_allocation(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc_zeroed(layout);
        if !ptr.is_null() {
            note_allocation(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note_allocation(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        if !new.is_null() {
            // A moving realloc briefly holds both blocks: count the new one before the old one goes.
            note_allocation(new_size as isize);
            note_allocation(-(layout.size() as isize));
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result with the most heap it held at once, on this thread, beyond what was held before.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE_BYTES.with(Cell::get);
    PEAK_BYTES.with(|p| p.set(start));
    let result = f();
    let peak = PEAK_BYTES.with(Cell::get);
    (result, (peak - start).max(0) as usize)
}

// ---------------------------------------------------------------------------------------------------------------
// The checks every body goes through, whatever produced it.

/// The rules every accepted update must obey, so that a parser bug cannot let a broken one through.
trait ObeysRules: Update + std::fmt::Debug {
    fn assert_obeys_rules(&self, rules: &ValidationRules);
}

fn assert_well_formed_attributes(attributes: &Option<String>) {
    if let Some(a) = attributes {
        assert!(a.len() <= MAX_ATTRIBUTES_BYTES, "attributes of {} bytes", a.len());
        assert!(a.starts_with('{') && a.ends_with('}'), "attributes not an object: {a}");
        // `IgnoredAny` checks the syntax without the number range, which jsonb is wider in than f64.
        serde_json::from_str::<serde::de::IgnoredAny>(a).unwrap_or_else(|e| panic!("attributes {a}: {e}"));
    }
}

fn assert_in_window(at: OffsetDateTime, rules: &ValidationRules) {
    assert!(
        at <= rules.now + rules.max_future_skew && at >= rules.now - rules.max_age,
        "{at}"
    );
}

impl ObeysRules for LocationUpdate {
    fn assert_obeys_rules(&self, rules: &ValidationRules) {
        assert!(is_valid_device_id(&self.device_id), "{:?}", self.device_id);
        assert_in_window(self.recorded_at, rules);
        assert!((-90.0..=90.0).contains(&self.lat), "lat {}", self.lat);
        assert!((-180.0..=180.0).contains(&self.lon), "lon {}", self.lon);
        assert!(self.speed_kmh.is_none_or(|v| (0.0..=400.0).contains(&v)));
        assert!(self.heading_deg.is_none_or(|v| (0.0..360.0).contains(&v)));
        assert!(self.accuracy_m.is_none_or(|v| (0.0..=100_000.0).contains(&v)));
        assert_well_formed_attributes(&self.attributes);
        assert_eq!(self.received_at, NOW);
    }
}

impl ObeysRules for PollResult {
    fn assert_obeys_rules(&self, rules: &ValidationRules) {
        assert!(self.project_id >= 1);
        assert_in_window(self.polled_at, rules);
        assert!(self.status_code.is_none_or(|c| (100..=599).contains(&c)));
        assert!(self.response_time_ms.is_none_or(|t| (0..=3_600_000).contains(&t)));
        assert!(self.error_message.as_ref().is_none_or(|m| m.chars().count() <= 1024));
        assert_well_formed_attributes(&self.attributes);
        assert_eq!(self.received_at, NOW);
    }
}

/// What one body came to: the parse error, or the validation outcome.
type Outcome<U> = Result<Result<Vec<U>, ValidationFailure>, BodyError>;

/// Parses and validates `body` as the gateway does, checking every promise the model makes along the way.
fn check<U: ObeysRules>(body: &[u8], format: BodyFormat, max_updates: usize, max_errors: usize) -> Outcome<U> {
    let rules = ValidationRules::with_defaults(NOW);
    let raw = match parse_body(body, format, U::FIELDS, max_updates) {
        Ok(raw) => raw,
        Err(e) => {
            match &e {
                BodyError::InvalidJson { line, message, .. } => {
                    assert!(*line >= 1, "line {line}");
                    assert!(!message.is_empty());
                }
                BodyError::TooManyUpdates { limit } => assert_eq!(*limit, max_updates),
                BodyError::OverBudget => unreachable!("parse_body charges no allowance"),
            }
            return Err(e);
        }
    };
    let count = raw.len();
    assert!(
        count <= max_updates,
        "{count} updates read with a limit of {max_updates}"
    );
    let outcome = validate_all::<U>(raw, &rules, NOW, max_errors);
    match &outcome {
        Ok(valid) => {
            assert_eq!(valid.len(), count, "an accepted request keeps every update");
            valid.iter().for_each(|u| u.assert_obeys_rules(&rules));
        }
        Err(failure) => {
            assert!((1..=count).contains(&failure.invalid_updates), "{failure:?}");
            assert!(failure.errors.len() <= max_errors);
            // Every refused update says why, up to the cap.
            assert!(
                failure.errors.len() >= failure.invalid_updates.min(max_errors),
                "{failure:?}"
            );
            for e in &failure.errors {
                assert!(e.index < count, "index {} of {count} updates", e.index);
                assert!(!e.reason.is_empty(), "{e:?}");
            }
        }
    }
    Ok(outcome)
}

/// Runs [`check`] for both streams and both formats.
fn check_everywhere(body: &[u8], max_updates: usize) {
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        let _ = check::<LocationUpdate>(body, format, max_updates, MAX_ERRORS);
        let _ = check::<PollResult>(body, format, max_updates, MAX_ERRORS);
    }
}

/// What a body came to on one stream, without the updates themselves: the parse error, the validation failure, or
/// how many updates passed.
type Verdict = Result<Result<usize, ValidationFailure>, BodyError>;

/// Runs [`check`] on `stream` with the default limits, as the gateway would for a request to that stream.
fn judge(stream: Stream, body: &[u8], format: BodyFormat) -> Verdict {
    fn on<U: ObeysRules>(body: &[u8], format: BodyFormat) -> Verdict {
        check::<U>(body, format, max_updates(), MAX_ERRORS).map(|outcome| outcome.map(|valid| valid.len()))
    }
    match stream {
        Stream::Location => on::<LocationUpdate>(body, format),
        Stream::Poll => on::<PollResult>(body, format),
    }
}

/// Whether `verdict` is the outcome a shared case expects: the same one the gateway's answer is held to.
fn is_expected(verdict: &Verdict, expected: Expected) -> bool {
    match (expected, verdict) {
        (Expected::Accepted, Ok(Ok(_))) => true,
        (Expected::InvalidJson, Err(BodyError::InvalidJson { .. })) => true,
        (Expected::TooManyUpdates, Err(BodyError::TooManyUpdates { .. })) => true,
        (Expected::Refused { index, field }, Ok(Err(failure))) => failure
            .errors
            .iter()
            .any(|e| e.index == index && e.field.as_deref() == field),
        _ => false,
    }
}

/// The first 300 characters of a verdict, so that a failure message stays readable.
fn abridged(verdict: &Verdict) -> String {
    format!("{verdict:?}").chars().take(300).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Generators.

/// Marks a string that stands for a number `serde_json::Value` cannot hold; [`splice_numbers`] unwraps it.
const NUMBER_MARK: &str = "\u{1}number:";

/// Numbers at and past the edges of i64, u64 and f64, written as text.
const EDGE_NUMBERS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e-400",
    "1e999999",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1.7976931348623157e308",
    "1.7976931348623159e308",
    "4.9e-324",
    "-0",
    "-0.0e-0",
    "0.1000000000000000000000000000000000000000000000000001",
];

/// Replaces every marked string (`"\u0001number:1e400"`) with the bare number it stands for.
fn splice_numbers(json: &str) -> String {
    let mark = "\"\\u0001number:";
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(start) = rest.find(mark) {
        out.push_str(&rest[..start]);
        let after = &rest[start + mark.len()..];
        match after.find('"') {
            Some(end) => {
                out.push_str(&after[..end]);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every field name either stream knows, so that generated objects hit the known-field paths often.
fn field_names() -> Vec<&'static str> {
    LocationUpdate::FIELDS
        .iter()
        .chain(PollResult::FIELDS)
        .copied()
        .collect()
}

/// Strings a parser or a database may trip on: empty, control characters, escapes, BOM, the last code point,
/// right-to-left marks, and long runs.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,12}",
        2 => "[\\x00-\\x1f\"\\\\/]{0,6}",
        1 => prop::sample::select(vec![
            "", " ", "\u{0}", "\u{feff}", "\u{10ffff}", "\u{202e}lat", "lat\u{0}", "la\u{301}t", "\u{fffd}", "ümlaut", "🚚",
        ])
        .prop_map(String::from),
        1 => (0usize..6000).prop_map(|n| "x".repeat(n)),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(field_names()).prop_map(String::from),
        1 => odd_string(),
    ]
}

/// Values that look like what a field wants, so that validation also runs past the type checks.
fn field_shaped() -> impl Strategy<Value = Value> {
    let window_ms = -(31 * 86_400_000i64)..(10 * 60_000);
    prop_oneof![
        "[A-Za-z0-9._:-]{1,70}".prop_map(Value::from),
        window_ms.clone().prop_map(|offset| {
            let at = NOW + time::Duration::milliseconds(offset);
            Value::from(at.format(&Rfc3339).unwrap())
        }),
        window_ms.prop_map(|offset| Value::from(NOW.unix_timestamp() * 1000 + offset)),
        (-400.0f64..400.0).prop_map(Value::from),
        (-10i64..4_000_000).prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        // A non-finite f64 would become `null`; keep the draw a real number.
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        1 => prop::sample::select(EDGE_NUMBERS).prop_map(|n| Value::from(format!("{NUMBER_MARK}{n}"))),
        2 => odd_string().prop_map(Value::from),
        4 => field_shaped(),
    ]
}

/// Any JSON value; kept a few levels deep because building and dropping a `Value` recurses (deep nesting is
/// added as text by [`body`]).
fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 96, 10, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..10).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..10)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// An object written by hand from a list of entries, so that a key may come twice (a `Value` cannot hold that).
fn update_text() -> impl Strategy<Value = String> {
    prop::collection::vec((key(), json_value()), 0..10).prop_map(|entries| {
        let fields: Vec<String> = entries
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}:{}",
                    serde_json::to_string(k).unwrap(),
                    serde_json::to_string(v).unwrap()
                )
            })
            .collect();
        splice_numbers(&format!("{{{}}}", fields.join(",")))
    })
}

/// The elements of a request: mostly objects, sometimes any value where an update belongs.
fn elements() -> impl Strategy<Value = Vec<String>> {
    let element = prop_oneof![
        4 => update_text(),
        1 => json_value().prop_map(|v| splice_numbers(&serde_json::to_string(&v).unwrap())),
    ];
    prop::collection::vec(element, 1..12)
}

/// How many array levels to wrap a body in: mostly none, sometimes thousands.
fn nesting() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 1 => 1usize..5000]
}

/// The update count limit: the real one mostly, sometimes one a generated body can pass.
fn update_limit() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(max_updates()), 1 => 1usize..8]
}

/// Bodies that parse and pass, to be broken by [`mutate`].
fn valid_bodies() -> Vec<String> {
    let at = NOW.format(&Rfc3339).unwrap();
    let location = format!(
        r#"{{"device_id":"truck-1","recorded_at":"{at}","lat":45.5,"lon":-73.25,"speed_kmh":88.5,"heading_deg":359.9,"accuracy_m":3,"driver":"ana","temp":{{"c":[4,-1e3]}}}}"#
    );
    let poll = format!(
        r#"{{"project_id":9223372036854775807,"polled_at":"{at}","success":false,"status_code":503,"response_time_ms":3600000,"error_message":"upstream \"down\"\n","region":"eu"}}"#
    );
    let ms = NOW.unix_timestamp() * 1000;
    let small = format!(
        r#"{{"device_id":"a","recorded_at":{ms},"lat":0,"lon":0,"project_id":1,"polled_at":{ms},"success":true}}"#
    );
    vec![
        location.clone(),
        poll.clone(),
        format!("[{location},{small}]"),
        format!("{location}\n{small}\n"),
        format!("[{poll},{small}]"),
        format!("{poll}\r\n\r\n{small}"),
    ]
}

/// One change to a body: flip bits of a byte, insert a byte, or delete one.
#[derive(Debug, Clone)]
enum Edit {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Bytes that change the meaning of JSON are worth more than random ones.
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\",:\\-+.eE0u9 \n\r\xff\xc3NI".to_vec())
    ];
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Edit::Flip(at, mask)),
        (any::<Index>(), byte).prop_map(|(at, b)| Edit::Insert(at, b)),
        any::<Index>().prop_map(Edit::Delete),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        match edit {
            Edit::Flip(at, mask) if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            Edit::Insert(at, b) => {
                let i = at.index(bytes.len() + 1);
                bytes.insert(i, *b);
            }
            Edit::Delete(at) if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes.remove(i);
            }
            _ => {}
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_in_either_format_for_either_stream(
        body in prop::collection::vec(any::<u8>(), 0..4096),
        max_updates in update_limit(),
    ) {
        check_everywhere(&body, max_updates);
    }

    #[test]
    fn bytes_drawn_from_json_punctuation_never_panic(
        body in prop::collection::vec(prop::sample::select(b"{}[]\",:\\0123456789.eE+-tfnrul \n\x00\xff".to_vec()), 0..4096),
        max_updates in update_limit(),
    ) {
        check_everywhere(&body, max_updates);
    }

    #[test]
    fn arbitrary_json_never_panics_and_every_error_names_an_update_it_has(
        elements in elements(),
        as_array in any::<bool>(),
        depth in nesting(),
        max_updates in update_limit(),
        max_errors in 1usize..120,
    ) {
        let json = if as_array { format!("[{}]", elements.join(",")) } else { elements[0].clone() };
        let body = format!("{}{json}{}", "[".repeat(depth), "]".repeat(depth));
        let ndjson = elements.join("\n");
        let location = check::<LocationUpdate>(body.as_bytes(), BodyFormat::Json, max_updates, max_errors);
        let poll = check::<PollResult>(body.as_bytes(), BodyFormat::Json, max_updates, max_errors);
        let location_lines = check::<LocationUpdate>(ndjson.as_bytes(), BodyFormat::Ndjson, max_updates, max_errors);
        let poll_lines = check::<PollResult>(ndjson.as_bytes(), BodyFormat::Ndjson, max_updates, max_errors);
        if as_array && depth == 0 {
            // One array and the same elements one per line are the same request: same verdict, same errors.
            prop_assert_eq!(location.is_ok(), location_lines.is_ok(), "{}", body);
            prop_assert_eq!(poll.is_ok(), poll_lines.is_ok(), "{}", body);
            if let (Ok(array), Ok(lines)) = (location, location_lines) {
                prop_assert_eq!(array, lines);
            }
            if let (Ok(array), Ok(lines)) = (poll, poll_lines) {
                prop_assert_eq!(array, lines);
            }
        }
    }

    #[test]
    fn mutated_valid_bodies_never_panic_and_whatever_passes_obeys_every_rule(
        body in prop::sample::select(valid_bodies()),
        edits in prop::collection::vec(edit(), 1..8),
    ) {
        let mutated = mutate(body.into_bytes(), &edits);
        check_everywhere(&mutated, max_updates());
    }
}

#[test]
fn the_bodies_the_mutations_start_from_are_valid() {
    // Otherwise the mutation property would only ever see refusals.
    for body in valid_bodies() {
        let format = if body.starts_with('{') && body.contains('\n') {
            BodyFormat::Ndjson
        } else {
            BodyFormat::Json
        };
        let location = check::<LocationUpdate>(body.as_bytes(), format, max_updates(), MAX_ERRORS);
        let poll = check::<PollResult>(body.as_bytes(), format, max_updates(), MAX_ERRORS);
        assert!(matches!(location, Ok(Ok(_))) || matches!(poll, Ok(Ok(_))), "{body}");
    }
}

#[test]
fn the_edge_numbers_reach_the_parser_as_bare_numbers() {
    let value = Value::from(vec![Value::from(format!("{NUMBER_MARK}1e400")), Value::from("plain")]);
    assert_eq!(
        splice_numbers(&serde_json::to_string(&value).unwrap()),
        r#"[1e400,"plain"]"#
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Bodies too big or too deep to draw at random.

#[test]
fn two_million_empty_objects_are_refused_as_too_many_updates_without_reading_them_all() {
    let max_updates = max_updates();
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        let body = cases::empty_objects(2_000_000, format);
        let (result, peak) =
            peak_heap(|| parse_body(body.as_bytes(), format, LocationUpdate::FIELDS, max_updates).map(|u| u.len()));
        assert_eq!(
            result,
            Err(BodyError::TooManyUpdates { limit: max_updates }),
            "{format:?}"
        );
        // 10 001 updates are read at most, whatever follows them.
        assert!(peak < 16 * 1024 * 1024, "{format:?}: {peak} bytes held while refusing");
    }
}

#[test]
fn empty_objects_up_to_the_update_limit_are_each_refused_and_past_it_the_request_is_refused_whole() {
    for (count, expected) in cases::update_counts() {
        for format in [BodyFormat::Json, BodyFormat::Ndjson] {
            let body = cases::empty_objects(count, format);

            let verdict = judge(Stream::Location, body.as_bytes(), format);

            assert!(
                is_expected(&verdict, expected),
                "{count} in {format:?}: {}",
                abridged(&verdict)
            );
            if let Ok(Err(failure)) = &verdict {
                assert_eq!(failure.invalid_updates, count, "{format:?}");
                assert_eq!(failure.errors.len(), MAX_ERRORS, "{format:?}");
            }
        }
    }
}

/// Runs `f` on a thread with a 256 KiB stack: a parser that recursed once per nesting level would overflow it
/// (and abort the test binary) long before a million levels.
fn on_a_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .expect("spawn a thread")
        .join()
        .expect("the small-stack thread panicked");
}

#[test]
fn a_million_nesting_levels_are_read_without_recursion() {
    on_a_small_stack(|| {
        let at = NOW.format(&Rfc3339).unwrap();
        for body in cases::unclosed_nesting(&at, NESTING_LEVELS) {
            for format in [BodyFormat::Json, BodyFormat::Ndjson] {
                let result = parse_body(body.as_bytes(), format, LocationUpdate::FIELDS, max_updates());
                assert!(matches!(result, Err(BodyError::InvalidJson { .. })), "{format:?}");
            }
        }

        for case in cases::nesting() {
            let body = case.body(&at, NESTING_LEVELS);
            for format in [BodyFormat::Json, BodyFormat::Ndjson] {
                let verdict = judge(case.stream, body.as_bytes(), format);
                let what = format!(
                    "{:?} in {:?} of a {:?} update, {format:?}",
                    case.shape, case.field, case.stream
                );
                let Ok(Err(failure)) = &verdict else {
                    panic!("{what}: a million levels must be read, and refused by the rules");
                };
                assert_eq!(failure.errors.len(), 1, "{what}: {failure:?}");
                assert!(is_expected(&verdict, case.expected), "{what}: {failure:?}");
            }
        }
    });
}

/// At most this many bytes of heap per byte of body. The worst shape, 10 000 updates of tiny keys, holds under
/// 2 × its size: each update keeps at most 64 of its unknown fields, 16 bytes each, whatever it sends.
const HEAP_PER_BODY_BYTE: usize = 4;

#[test]
fn an_8_mib_body_of_any_shape_is_read_in_memory_and_time_in_proportion_to_its_size() {
    let (tx, rx) = std::sync::mpsc::channel();
    // On its own thread so that a hang fails the test instead of stalling the run; the heap is counted per thread.
    std::thread::spawn(move || {
        let at = NOW.format(&Rfc3339).unwrap();
        for cases::LargeBody {
            what,
            format,
            body,
            expected,
        } in cases::largest_bodies(&at)
        {
            assert!(body.len() <= max_body_bytes(), "{what}: {} bytes", body.len());
            let (location, location_peak) = peak_heap(|| judge(Stream::Location, body.as_bytes(), format));
            let (_, poll_peak) = peak_heap(|| judge(Stream::Poll, body.as_bytes(), format).is_ok());
            let peak = location_peak.max(poll_peak);
            eprintln!(
                "{what}: {peak} bytes of heap at most, {:.1} × the body",
                peak as f64 / body.len() as f64
            );
            assert!(is_expected(&location, expected), "{what}: {}", abridged(&location));
            assert!(
                peak <= HEAP_PER_BODY_BYTE * body.len(),
                "{what}: {peak} bytes for a {}-byte body",
                body.len()
            );
        }
        let _ = tx.send(());
    });
    // Far beyond what a linear parse of these bodies needs even unoptimised: the bound catches a quadratic step or
    // a hang, it measures nothing.
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("a body broke a bound (see above)"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("parsing 8 MiB bodies took over two minutes"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Values that pass for JSON but not for PostgreSQL, and numbers out of a field's range.

/// Runs every case of a shared table and lists those that do not come to what they expect, so that one run shows
/// them all. `alone` also requires a refusal to list that one broken rule and no other.
fn unexpected(cases: &[FieldCase], alone: bool) -> Vec<String> {
    let at = NOW.format(&Rfc3339).unwrap();
    cases
        .iter()
        .filter_map(|case| {
            let body = case.body(&at);
            let verdict = judge(case.stream, body.as_bytes(), BodyFormat::Json);
            let only_fault = !alone || !matches!(&verdict, Ok(Err(f)) if f.errors.len() != 1);
            let right = is_expected(&verdict, case.expected) && only_fault;
            (!right).then(|| format!("{body} → {}", abridged(&verdict)))
        })
        .collect()
}

#[test]
fn an_update_postgresql_cannot_store_is_refused_by_validation() {
    // The value is each update's only fault: the refusal must name where it is, and nothing else.
    let wrong = unexpected(&cases::unstorable(), true);

    assert!(wrong.is_empty(), "PostgreSQL cannot store these:\n{}", wrong.join("\n"));
}

#[test]
fn numbers_and_escapes_postgresql_does_store_pass_validation() {
    // The counterpart of the test above: what jsonb takes must keep passing once the refusals are added.
    let wrong = unexpected(&cases::storable(), false);

    assert!(wrong.is_empty(), "PostgreSQL stores these:\n{}", wrong.join("\n"));
}

#[test]
fn a_number_beyond_f64_is_not_json_and_one_beyond_i64_but_within_f64_is_refused_naming_its_field() {
    let at = NOW.format(&Rfc3339).unwrap();
    let wrong = unexpected(&cases::numbers_out_of_range(), true);

    assert!(wrong.is_empty(), "out of range:\n{}", wrong.join("\n"));
    for case in cases::numbers_out_of_range() {
        let body = case.body(&at);
        if let Err(BodyError::InvalidJson { message, .. }) = judge(case.stream, body.as_bytes(), BodyFormat::Json) {
            assert!(message.contains("number out of range"), "{body} → {message}");
        }
    }
}
