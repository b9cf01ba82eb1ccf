//! Fuzzes the device side of provisioning with a server's arbitrary answers:
//! a decoded `ClaimChallenge` and arbitrary credential frames are given to a
//! `Provisioner`, which never panics and never accepts credentials that were
//! not sealed under the agreed key.
//! Run: `cd sdk && cargo +nightly fuzz run provisioning`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wildcam_sdk::protocol::{ProvisionDown, decode};
use wildcam_sdk::provision::{ClaimChallenge, ClaimToken, DeviceIdentity, Provisioner};
use wildcam_sdk::topic::SessionId;

fuzz_target!(|data: &[u8]| {
    let _ = ProvisionDown::decode(data);
    let token = ClaimToken::parse("batch-7.Zm9vYmFyYmF6cXV4cXV1eHp5enp5").ok();
    let mut device = Provisioner::new(
        DeviceIdentity::from_seed([1; 32]),
        token,
        SessionId::from_random([2; 8]),
        [3; 32],
        None,
    );
    let (head, tail) = data.split_at(
        data.len()
            .min(<ClaimChallenge as wildcam_sdk::protocol::Message>::ENCODED_LEN_MAX),
    );
    if let Ok(challenge) = decode::<ClaimChallenge>(head) {
        if device.on_challenge(&challenge).is_ok() {
            let mut frame = tail.to_vec();
            assert!(device.on_credentials(&mut frame).is_err(), "forged credentials accepted");
        }
    }
});
