//! Fuzzes the topic scheme with arbitrary UTF-8: `DeviceId::new`,
//! `parse_device_topic` and `parse_provision_topic` never panic, accept exactly
//! what the documented grammar allows, and what they accept rebuilds to the same
//! text. Run: `cd sdk && cargo +nightly fuzz run topic -- -dict=fuzz/topic.dict`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wildcam_sdk::DeviceId;
use wildcam_sdk::topic::{self, DEVICE_ID_LEN_MAX, TOPIC_LEN_MAX};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    check_device_id(text);
    check_device_topic(text);
    check_provision_topic(text);
});

/// `DeviceId::new` agrees with the grammar `[A-Za-z0-9._-]{1,32}` minus `.`/`..`.
fn check_device_id(text: &str) {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-');
    let valid = (1..=DEVICE_ID_LEN_MAX).contains(&text.len())
        && text.bytes().all(allowed)
        && text != "."
        && text != "..";
    match DeviceId::new(text) {
        Ok(id) => {
            assert!(valid, "accepted invalid id {text:?}");
            assert_eq!(id.as_str(), text);
            assert_eq!(text.parse::<DeviceId>().as_ref(), Ok(&id));
        }
        Err(_) => assert!(!valid, "refused valid id {text:?}"),
    }
}

/// A parsed device topic has a valid id and a non-empty last level, and rebuilds
/// to the same text whenever it fits in a `Topic`.
fn check_device_topic(text: &str) {
    let Ok(parsed) = topic::parse_device_topic(text) else {
        return;
    };
    assert!(!parsed.kind.is_empty() && !parsed.kind.contains('/'));
    assert_eq!(DeviceId::new(parsed.device.as_str()).as_ref(), Ok(&parsed.device));
    if text.len() <= TOPIC_LEN_MAX {
        let rebuilt = topic::device_topic(&parsed.device, parsed.direction, parsed.kind);
        assert_eq!(rebuilt.as_str(), text);
    }
}

/// A parsed provisioning topic always rebuilds to the same text.
fn check_provision_topic(text: &str) {
    let Ok((session, direction)) = topic::parse_provision_topic(text) else {
        return;
    };
    assert_eq!(topic::provision_topic(&session, direction).as_str(), text);
}
