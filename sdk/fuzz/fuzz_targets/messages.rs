//! Fuzzes every protocol v1 decoder with arbitrary bytes: `Uplink`, `Downlink`,
//! `ProvisionUp` and `ProvisionDown` never panic, and whatever decodes
//! re-encodes within its kind's `encoded_len_max` to the very same bytes
//! (postcard has one encoding per value, and decoders refuse trailing bytes).
//! Run: `cd sdk && cargo +nightly fuzz run messages`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wildcam_sdk::protocol::{Downlink, MessageKind, ProtocolError, ProvisionDown, ProvisionUp, Uplink};

macro_rules! check_set {
    ($set:ty, $data:expr) => {
        if let Ok(message) = <$set>::decode($data) {
            let mut buffer = [0u8; <$set>::ENCODED_LEN_MAX];
            let encoded = message
                .encode(&mut buffer)
                .expect("a decoded message re-encodes");
            assert!(encoded.len() <= message.kind().encoded_len_max());
            assert_eq!(&encoded[..], $data, "{message:?} re-encodes differently");
        }
    };
}

fuzz_target!(|data: &[u8]| {
    check_set!(Uplink, data);
    check_set!(Downlink, data);
    check_set!(ProvisionUp, data);
    check_set!(ProvisionDown, data);
    if let [_, kind, ..] = data {
        // Unknown kinds are refused by name, never misread.
        if MessageKind::from_byte(*kind).is_err() && data[0] == wildcam_sdk::PROTOCOL_VERSION {
            assert_eq!(Uplink::decode(data), Err(ProtocolError::KindUnknown));
        }
    }
});
