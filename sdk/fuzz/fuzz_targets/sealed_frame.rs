//! Fuzzes opening sealed frames: arbitrary bytes, and genuine frames with
//! fuzzer-chosen mutations, given to `seal::open_with`. Opening never panics,
//! never accepts a frame that differs from a genuine one, and a refused frame
//! leaves the replay window as it was.
//! Run: `cd sdk && cargo +nightly fuzz run sealed_frame`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wildcam_sdk::seal::{ReplayWindow, SEAL_OVERHEAD, Sealer, SessionKey, open_with};
use wildcam_sdk::topic::Direction;

const KEY: [u8; 32] = [0x42; 32];
const CONTEXT: &[u8] = b"trap-0001";

fuzz_target!(|data: &[u8]| {
    let key = SessionKey::from_bytes(KEY);

    // Arbitrary bytes: whatever opens must be what a sealer could have made,
    // which the fuzzer cannot forge, so nothing opens.
    let mut arbitrary = data.to_vec();
    let mut window = ReplayWindow::new();
    assert!(open_with(&mut window, &key, Direction::Up, CONTEXT, &mut arbitrary).is_err());
    assert_eq!(window, ReplayWindow::new(), "a refused frame moved the window");

    // A genuine frame of the fuzzer's plaintext, with one fuzzer-chosen bit flipped.
    let Some((&selector, plaintext)) = data.split_first() else {
        return;
    };
    let mut sealer = Sealer::new(key.clone(), Direction::Up);
    let mut frame = vec![0u8; plaintext.len() + SEAL_OVERHEAD];
    let Ok(sealed) = sealer.seal(CONTEXT, plaintext, &mut frame) else {
        return;
    };
    let bit = usize::from(selector) % (sealed.len * 8);
    let mut flipped = frame[..sealed.len].to_vec();
    flipped[bit / 8] ^= 1 << (bit % 8);
    let mut window = ReplayWindow::new();
    assert!(open_with(&mut window, &key, Direction::Up, CONTEXT, &mut flipped).is_err());
    let opened = open_with(&mut window, &key, Direction::Up, CONTEXT, &mut frame[..sealed.len])
        .expect("the genuine frame opens");
    assert_eq!(opened, plaintext);
});
