//! Fuzzes the postcard decoding of the wire types that exist so far (`DeviceId`,
//! `Chip`, `FirmwareVersion`) with arbitrary bytes: decoding never panics, a
//! decoded `DeviceId` is always valid, and whatever decodes re-encodes within its
//! `POSTCARD_MAX_SIZE` and decodes back to the same value.
//! Run: `cd sdk && cargo +nightly fuzz run wire_types`.
//!
//! This is the template for the protocol, sealed-frame and OTA decoders: one
//! `round_trip::<T>(data)` line per type.

#![no_main]

use core::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use postcard::experimental::max_size::MaxSize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

/// Larger than every type's `POSTCARD_MAX_SIZE` here.
const BUFFER_LEN: usize = 256;

fuzz_target!(|data: &[u8]| {
    if let Some(id) = round_trip::<DeviceId>(data) {
        assert_eq!(DeviceId::new(id.as_str()).as_ref(), Ok(&id));
    }
    round_trip::<Chip>(data);
    round_trip::<FirmwareVersion>(data);
});

/// Decodes `data` as a `T`; if that works, checks the value re-encodes within its
/// maximum size and decodes back equal. Returns the decoded value.
fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + MaxSize + PartialEq + Debug,
{
    let value: T = postcard::from_bytes(data).ok()?;
    let mut buffer = [0u8; BUFFER_LEN];
    let encoded = postcard::to_slice(&value, &mut buffer).expect("a decoded value re-encodes");
    assert!(encoded.len() <= T::POSTCARD_MAX_SIZE, "{value:?} encodes to {} bytes", encoded.len());
    let decoded: T = postcard::from_bytes(encoded).expect("a re-encoded value decodes");
    assert_eq!(decoded, value);
    Some(value)
}
