//! Keeps `docs/protocol.md` and `docs/benchmarks.md` true to the code: the
//! message table and the typical detection's sizes are generated here and
//! compared with the documents. Regenerate with
//! `UPDATE_DOCS=1 cargo test -p wildcam-sdk --test protocol_doc`.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;

use common::typical_detection;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{self, Message, MessageKind, Route};
use wildcam_sdk::seal::{SEAL_OVERHEAD, Sealer, SessionKey};
use wildcam_sdk::topic::Direction;

fn message_table() -> String {
    let mut table = String::from(
        "| kind | message | direction | topic | max envelope (bytes) | max sealed (bytes) |\n|---|---|---|---|---|---|\n",
    );
    for kind in MessageKind::ALL {
        let max = kind.encoded_len_max();
        let (direction, topic, sealed) = match kind.route() {
            Route::Device(Direction::Up, suffix) => {
                ("device → server", format!("`wc/v1/dev/{{id}}/up/{suffix}`"), max + SEAL_OVERHEAD)
            }
            Route::Device(Direction::Down, suffix) => {
                ("server → device", format!("`wc/v1/dev/{{id}}/down/{suffix}`"), max + SEAL_OVERHEAD)
            }
            Route::Provision(Direction::Up) => ("device → server", "`wc/v1/prov/{session}/up`".into(), max),
            Route::Provision(Direction::Down) => {
                ("server → device", "`wc/v1/prov/{session}/down`".into(), max)
            }
        };
        let sealed =
            if matches!(kind.route(), Route::Device(..)) { sealed.to_string() } else { "in clear".into() };
        writeln!(
            table,
            "| `0x{:02x}` | `{}` | {direction} | {topic} | {max} | {sealed} |",
            *kind as u8,
            kind.name()
        )
        .unwrap();
    }
    table
}

fn typical_sizes() -> String {
    let detection = typical_detection();
    let mut buf = [0u8; protocol::Detection::ENCODED_LEN_MAX];
    let envelope = protocol::encode(&detection, &mut buf).unwrap().len();
    let mut sealer = Sealer::new(SessionKey::from_bytes([7; 32]), Direction::Up);
    let device = DeviceId::new("trap-0042").unwrap();
    let mut frame = [0u8; protocol::Detection::ENCODED_LEN_MAX + SEAL_OVERHEAD];
    let sealed = sealer
        .seal(device.as_bytes(), &buf[..envelope], &mut frame)
        .unwrap()
        .len;
    let json = serde_json::to_string(&detection).unwrap();
    format!(
        "| encoding | bytes |\n|---|---|\n\
         | postcard envelope (version, kind, body) | {envelope} |\n\
         | sealed frame (AES-256-GCM, header and tag) | {sealed} |\n\
         | the same data as compact JSON | {} |\n\
         | maximum `Detection` envelope | {} |\n\nThe JSON: `{json}`\n",
        json.len(),
        protocol::Detection::ENCODED_LEN_MAX,
    )
}

/// Replaces, or checks, the text between the markers named `section`.
fn check_section(doc: &str, section: &str, generated: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(doc);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let begin = format!("<!-- BEGIN GENERATED: {section} -->\n");
    let end = format!("<!-- END GENERATED: {section} -->");
    let start = text
        .find(&begin)
        .unwrap_or_else(|| panic!("{doc} lacks {begin:?}"))
        + begin.len();
    let stop = start
        + text[start..]
            .find(&end)
            .unwrap_or_else(|| panic!("{doc} lacks {end:?}"));
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let updated = format!("{}{generated}{}", &text[..start], &text[stop..]);
        std::fs::write(&path, updated).unwrap();
    } else {
        assert_eq!(
            &text[start..stop],
            generated,
            "{doc} section {section} is stale: run UPDATE_DOCS=1 cargo test -p wildcam-sdk --test protocol_doc"
        );
    }
}

#[test]
fn protocol_md_message_table_is_current() {
    check_section("docs/protocol.md", "messages", &message_table());
}

#[test]
fn benchmarks_md_typical_detection_is_current() {
    check_section("docs/benchmarks.md", "typical-detection", &typical_sizes());
}

#[test]
fn typical_detection_is_small() {
    let mut buf = [0u8; protocol::Detection::ENCODED_LEN_MAX];
    let len = protocol::encode(&typical_detection(), &mut buf)
        .unwrap()
        .len();
    assert!(len <= 48, "typical detection is {len} bytes");
}
