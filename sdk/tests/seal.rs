//! Behaviour of `wildcam_sdk::seal` through its public API.

use proptest::prelude::*;
use wildcam_sdk::DeviceId;
use wildcam_sdk::seal::{
    COUNTER_RESERVE_BLOCK, OpenError, Opener, ReplayWindow, SEAL_OVERHEAD, SealError, Sealer, SessionKey,
    frame_counter, open_with,
};
use wildcam_sdk::topic::Direction;

const KEY_A: [u8; 32] = [0xa5; 32];
const KEY_B: [u8; 32] = [0x5a; 32];

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn seal_one(sealer: &mut Sealer, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; plaintext.len() + SEAL_OVERHEAD];
    let sealed = sealer.seal(context, plaintext, &mut out).unwrap();
    assert_eq!(sealed.len, out.len());
    out
}

fn seal_many(direction: Direction, context: &[u8], count: usize) -> Vec<Vec<u8>> {
    let mut sealer = Sealer::new(SessionKey::from_bytes(KEY_A), direction);
    (0..count)
        .map(|i| seal_one(&mut sealer, context, format!("message {i}").as_bytes()))
        .collect()
}

fn opener(key: [u8; 32], direction: Direction) -> Opener {
    Opener::new(SessionKey::from_bytes(key), direction)
}

#[test]
fn round_trip() {
    let id = device("trap-0001");
    let mut sealer = Sealer::new(SessionKey::from_bytes(KEY_A), Direction::Up);
    let mut opener = opener(KEY_A, Direction::Up);
    for plaintext in [&b""[..], b"x", b"a detection of a red fox at 03:12", &[0u8; 300][..]] {
        let mut frame = seal_one(&mut sealer, id.as_bytes(), plaintext);
        if !plaintext.is_empty() {
            assert_ne!(&frame[6..6 + plaintext.len()], plaintext, "payload must not travel in clear");
        }
        assert_eq!(opener.open(id.as_bytes(), &mut frame), Ok(plaintext));
    }
    assert_eq!(opener.window().highest(), 4);
}

#[test]
fn another_devices_key_is_refused() {
    let id = device("trap-1");
    let mut frame = seal_many(Direction::Up, id.as_bytes(), 1).remove(0);
    let mut other = opener(KEY_B, Direction::Up);
    assert_eq!(other.open(id.as_bytes(), &mut frame), Err(OpenError::Authentication));
}

#[test]
fn another_device_id_as_context_is_refused() {
    let mut frame = seal_many(Direction::Up, device("trap-1").as_bytes(), 1).remove(0);
    let mut opener = opener(KEY_A, Direction::Up);
    let moved = device("trap-2");
    assert_eq!(opener.open(moved.as_bytes(), &mut frame), Err(OpenError::Authentication));
    assert_eq!(opener.window(), ReplayWindow::new());
}

#[test]
fn replayed_counter_is_refused() {
    let id = device("trap-1");
    let frame = seal_many(Direction::Down, id.as_bytes(), 1).remove(0);
    let mut opener = opener(KEY_A, Direction::Down);
    assert!(opener.open(id.as_bytes(), &mut frame.clone()).is_ok());
    assert_eq!(opener.open(id.as_bytes(), &mut frame.clone()), Err(OpenError::Replayed));
}

#[test]
fn wrong_direction_is_refused() {
    let id = device("trap-1");
    let mut frame = seal_many(Direction::Down, id.as_bytes(), 1).remove(0);
    let mut opener = opener(KEY_A, Direction::Up);
    assert_eq!(opener.open(id.as_bytes(), &mut frame), Err(OpenError::DirectionWrong));
    frame[1] = 7;
    assert_eq!(opener.open(id.as_bytes(), &mut frame), Err(OpenError::DirectionWrong));
}

#[test]
fn malformed_headers_are_refused() {
    let id = device("trap-1");
    let mut opener = opener(KEY_A, Direction::Up);
    for len in 0..SEAL_OVERHEAD {
        let mut short = vec![1u8; len];
        assert_eq!(opener.open(id.as_bytes(), &mut short), Err(OpenError::FrameTooShort));
    }
    let mut frame = seal_many(Direction::Up, id.as_bytes(), 1).remove(0);
    frame[0] = 2;
    assert_eq!(opener.open(id.as_bytes(), &mut frame), Err(OpenError::VersionUnsupported));
    let mut zero = seal_many(Direction::Up, id.as_bytes(), 1).remove(0);
    zero[2..6].copy_from_slice(&[0; 4]);
    assert_eq!(opener.open(id.as_bytes(), &mut zero), Err(OpenError::CounterZero));
    assert_eq!(opener.open(&[0; 65], &mut frame), Err(OpenError::VersionUnsupported));
    frame[0] = 1;
    assert_eq!(opener.open(&[0; 65], &mut frame), Err(OpenError::ContextTooLong));
}

#[test]
fn counter_older_than_the_window_is_refused() {
    let id = device("trap-1");
    let frames = seal_many(Direction::Up, id.as_bytes(), 70);
    let mut opener = opener(KEY_A, Direction::Up);
    assert!(opener.open(id.as_bytes(), &mut frames[69].clone()).is_ok()); // counter 70
    assert_eq!(opener.open(id.as_bytes(), &mut frames[5].clone()), Err(OpenError::TooOld)); // 6
    assert_eq!(opener.open(id.as_bytes(), &mut frames[0].clone()), Err(OpenError::TooOld)); // 1
    assert!(opener.open(id.as_bytes(), &mut frames[6].clone()).is_ok()); // 7: oldest in window
}

#[test]
fn reordering_inside_the_window_is_accepted_once() {
    let id = device("trap-1");
    let frames = seal_many(Direction::Up, id.as_bytes(), 64);
    let mut order: Vec<usize> = (0..64).collect();
    order.reverse();
    order.swap(3, 40);
    let mut opener = opener(KEY_A, Direction::Up);
    for &i in &order {
        let mut frame = frames[i].clone();
        assert_eq!(opener.open(id.as_bytes(), &mut frame), Ok(format!("message {i}").as_bytes()));
    }
    for frame in &frames {
        assert_eq!(opener.open(id.as_bytes(), &mut frame.clone()), Err(OpenError::Replayed));
    }
}

#[test]
fn forged_frame_does_not_advance_the_window() {
    let id = device("trap-1");
    let frames = seal_many(Direction::Up, id.as_bytes(), 2);
    let mut opener = opener(KEY_A, Direction::Up);
    // A forgery claiming a far-future counter would push every genuine frame
    // out of the window if it were recorded before authentication.
    let mut forged = frames[1].clone();
    forged[2..6].copy_from_slice(&1_000_000u32.to_le_bytes());
    assert_eq!(opener.open(id.as_bytes(), &mut forged), Err(OpenError::Authentication));
    let mut bad_tag = frames[0].clone();
    *bad_tag.last_mut().unwrap() ^= 1;
    assert_eq!(opener.open(id.as_bytes(), &mut bad_tag), Err(OpenError::Authentication));
    assert_eq!(bad_tag[..6], frames[0][..6]);
    assert_eq!(opener.window(), ReplayWindow::new());
    assert!(opener.open(id.as_bytes(), &mut frames[0].clone()).is_ok());
    assert!(opener.open(id.as_bytes(), &mut frames[1].clone()).is_ok());
}

#[test]
fn every_single_bit_flip_is_refused() {
    let id = device("trap-1");
    let frame = seal_many(Direction::Up, id.as_bytes(), 1).remove(0);
    for bit in 0..frame.len() * 8 {
        let mut tampered = frame.clone();
        tampered[bit / 8] ^= 1 << (bit % 8);
        let mut opener = opener(KEY_A, Direction::Up);
        assert!(opener.open(id.as_bytes(), &mut tampered).is_err(), "bit {bit}");
        assert_eq!(opener.window(), ReplayWindow::new(), "bit {bit}");
    }
}

#[test]
fn server_keeps_windows_in_its_own_map() {
    let id = device("trap-9");
    let frames = seal_many(Direction::Up, id.as_bytes(), 3);
    let key = SessionKey::from_bytes(KEY_A);
    let mut stored = (0u32, 0u64);
    for frame in &frames {
        let mut window = ReplayWindow::from_parts(stored.0, stored.1);
        assert!(open_with(&mut window, &key, Direction::Up, id.as_bytes(), &mut frame.clone()).is_ok());
        stored = (window.highest(), window.bitmap());
    }
    assert_eq!(stored, (3, 0b111));
    let mut window = ReplayWindow::from_parts(stored.0, stored.1);
    let mut replay = frames[1].clone();
    let result = open_with(&mut window, &key, Direction::Up, id.as_bytes(), &mut replay);
    assert_eq!(result, Err(OpenError::Replayed));
}

#[test]
fn counter_exhaustion_requires_a_new_key() {
    let key = SessionKey::from_bytes(KEY_A);
    let mut sealer = Sealer::resume(key.clone(), Direction::Up, u32::MAX - 2);
    let mut out = [0u8; 64];
    let first = sealer.seal(b"trap-1", b"last", &mut out).unwrap();
    assert_eq!(first.persist_reservation, Some(u32::MAX));
    let mut opener = Opener::new(key.clone(), Direction::Up);
    assert!(opener.open(b"trap-1", &mut out[..first.len]).is_ok());
    let second = sealer.seal(b"trap-1", b"last", &mut out).unwrap();
    assert_eq!((second.persist_reservation, frame_counter(&out)), (None, Some(u32::MAX - 1)));
    assert_eq!(sealer.seal(b"trap-1", b"x", &mut out), Err(SealError::CounterExhausted));
    assert_eq!(sealer.seal(b"trap-1", b"x", &mut out), Err(SealError::CounterExhausted));
    let mut rebooted = Sealer::resume(key, Direction::Up, u32::MAX);
    assert_eq!(rebooted.seal(b"trap-1", b"x", &mut out), Err(SealError::CounterExhausted));
}

#[test]
fn debug_never_shows_key_bytes() {
    let key = SessionKey::from_bytes([0x42; 32]);
    let sealer = Sealer::new(key.clone(), Direction::Up);
    for text in [format!("{key:?}"), format!("{sealer:?}"), format!("{:?}", opener(KEY_A, Direction::Up))] {
        assert!(!text.contains("66") && !text.contains("42") && !text.contains("165"), "{text}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_bit_flip_is_refused(plaintext in proptest::collection::vec(any::<u8>(), 0..48), pick in any::<prop::sample::Index>()) {
        let mut sealer = Sealer::new(SessionKey::from_bytes(KEY_A), Direction::Down);
        let mut frame = seal_one(&mut sealer, b"deadbeef00112233", &plaintext);
        let bit = pick.index(frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        let mut opener = opener(KEY_A, Direction::Down);
        prop_assert!(opener.open(b"deadbeef00112233", &mut frame).is_err());
        prop_assert_eq!(opener.window(), ReplayWindow::new());
    }

    /// Seal some messages, "reboot" (losing everything not persisted), resume
    /// from the stored reservation, repeat: counters strictly increase across
    /// reboots, and each reboot skips less than a block.
    #[test]
    fn resume_never_reuses_a_counter(runs in proptest::collection::vec(0usize..2200, 1..5)) {
        let mut persisted: Option<u32> = None;
        let mut last_used = 0u32;
        let mut out = [0u8; 32];
        for run in runs {
            let key = SessionKey::from_bytes(KEY_A);
            let mut sealer = match persisted {
                None => Sealer::new(key, Direction::Up),
                Some(value) => Sealer::resume(key, Direction::Up, value),
            };
            for message in 0..run {
                let sealed = sealer.seal(b"trap-1", b"x", &mut out).unwrap();
                if let Some(value) = sealed.persist_reservation {
                    persisted = Some(value); // durably stored before publishing
                }
                let counter = frame_counter(&out).unwrap();
                prop_assert!(counter > last_used, "counter {} reused or reordered after {}", counter, last_used);
                if message == 0 && last_used != 0 {
                    prop_assert!(counter - last_used <= COUNTER_RESERVE_BLOCK, "skipped more than a block");
                }
                last_used = counter;
            }
        }
    }
}
