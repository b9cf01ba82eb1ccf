//! End-to-end message protection with a per-device session key.
//!
//! The MQTT broker authenticates connections but does not authorize topics, so
//! any connected client could read or publish on any device's topics. Every
//! device ↔ server payload is therefore sealed with AES-256-GCM under the
//! device's [`SessionKey`], independently of the broker (the LoRaWAN
//! session-key model).
//!
//! # Frame layout
//!
//! ```text
//! offset  size  field
//! 0       1     PROTOCOL_VERSION
//! 1       1     direction: 0 = up (device → server), 1 = down (server → device)
//! 2       4     counter, u32 little-endian, never 0
//! 6       n     ciphertext (same length as the plaintext)
//! 6 + n   16    GCM tag
//! ```
//!
//! A frame is [`SEAL_OVERHEAD`] (22) bytes longer than its plaintext.
//!
//! - **Nonce** (12 bytes): `[direction][0; 7][counter big-endian; 4]`. A
//!   [`Sealer`] never uses a counter twice, so the nonce is unique per
//!   (key, direction, counter).
//! - **Associated data**: the 6 header bytes followed by a caller-given
//!   `context` of at most [`CONTEXT_LEN_MAX`] bytes: the device id bytes for
//!   device traffic, the provisioning session id bytes for provisioning. A frame
//!   moved to another device's topic therefore fails authentication.
//!
//! # Counters and replay
//!
//! A [`Sealer`] reserves counters in blocks of [`COUNTER_RESERVE_BLOCK`]: when
//! [`Sealer::seal`] returns [`Sealed::persist_reservation`], the caller stores
//! that value durably *before* publishing the frame, and after a reboot
//! resumes with [`Sealer::resume`]. A reboot skips at most one block and never
//! reuses a counter. When the counter reaches `u32::MAX` the key must be
//! rotated (re-provisioning).
//!
//! An [`Opener`] (or [`open_with`] for a server keeping one [`ReplayWindow`]
//! per device) refuses frames whose counter was already accepted or is older
//! than the 64-counter window, so QoS 1 redeliveries and replays are dropped
//! while reordering across topics is tolerated. The window only advances after
//! the tag verifies: a forged frame changes nothing. A window that is not
//! persisted across restarts forgets what it saw, so the receiver must persist
//! it (see [`ReplayWindow::from_parts`]) wherever a replay after a restart
//! matters.

use core::fmt;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroize;

use crate::protocol::PROTOCOL_VERSION;
use crate::topic::Direction;

/// Length of the frame header (version, direction, counter).
pub const HEADER_LEN: usize = 6;
/// Length of the GCM authentication tag.
pub const TAG_LEN: usize = 16;
/// How many bytes a sealed frame adds to its plaintext.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// How many counters a [`Sealer`] reserves with each persisted reservation.
pub const COUNTER_RESERVE_BLOCK: u32 = 1024;
/// Longest `context` bound into a frame's associated data, in bytes.
pub const CONTEXT_LEN_MAX: usize = 64;
/// Length of a [`SessionKey`].
pub const SESSION_KEY_LEN: usize = 32;
/// Number of counters a [`ReplayWindow`] tracks below the highest one seen.
pub const REPLAY_WINDOW_LEN: u32 = 64;

const NONCE_LEN: usize = 12;
const AAD_LEN_MAX: usize = HEADER_LEN + CONTEXT_LEN_MAX;

/// Why a frame could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SealError {
    /// `out` is shorter than the plaintext plus [`SEAL_OVERHEAD`].
    BufferTooSmall,
    /// Every counter of this key and direction was used: rotate the key.
    CounterExhausted,
    /// The context is longer than [`CONTEXT_LEN_MAX`].
    ContextTooLong,
    /// The plaintext is longer than AES-GCM allows.
    PlaintextTooLong,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BufferTooSmall => "output buffer too small for the sealed frame",
            Self::CounterExhausted => "message counter exhausted, the session key must be rotated",
            Self::ContextTooLong => "seal context is longer than 64 bytes",
            Self::PlaintextTooLong => "plaintext too long for AES-GCM",
        })
    }
}

impl core::error::Error for SealError {}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OpenError {
    /// The frame is shorter than [`SEAL_OVERHEAD`].
    FrameTooShort,
    /// The frame's version byte is not [`PROTOCOL_VERSION`].
    VersionUnsupported,
    /// The frame was sealed for the other direction (or the byte is unknown).
    DirectionWrong,
    /// The counter is 0, which no sealer ever uses.
    CounterZero,
    /// This counter was already accepted.
    Replayed,
    /// The counter is older than the replay window.
    TooOld,
    /// The context is longer than [`CONTEXT_LEN_MAX`].
    ContextTooLong,
    /// The tag did not verify: wrong key, wrong context or tampered frame.
    Authentication,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FrameTooShort => "sealed frame is too short",
            Self::VersionUnsupported => "sealed frame has an unsupported version",
            Self::DirectionWrong => "sealed frame is for the other direction",
            Self::CounterZero => "sealed frame has counter 0",
            Self::Replayed => "sealed frame counter was already seen",
            Self::TooOld => "sealed frame counter is older than the replay window",
            Self::ContextTooLong => "open context is longer than 64 bytes",
            Self::Authentication => "sealed frame failed authentication",
        })
    }
}

impl core::error::Error for OpenError {}

/// A 32-byte AES-256-GCM session key, wiped from memory when dropped.
///
/// Its `Debug` output never shows the key bytes.
#[derive(Clone)]
pub struct SessionKey([u8; SESSION_KEY_LEN]);

impl SessionKey {
    /// Wraps key bytes (as derived by provisioning or loaded from storage).
    pub const fn from_bytes(bytes: [u8; SESSION_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key bytes, for persisting. Keep them secret.
    pub fn as_bytes(&self) -> &[u8; SESSION_KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        // Borrowed in place (no copy of the key on the stack); the length is
        // fixed at 32 bytes, so `from_slice` cannot fail.
        Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&self.0))
    }
}

impl Drop for SessionKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for SessionKey {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "SessionKey(..)")
    }
}

const fn direction_byte(direction: Direction) -> u8 {
    match direction {
        Direction::Up => 0,
        Direction::Down => 1,
    }
}

fn header(direction: Direction, counter: u32) -> [u8; HEADER_LEN] {
    let [c0, c1, c2, c3] = counter.to_le_bytes();
    [PROTOCOL_VERSION, direction_byte(direction), c0, c1, c2, c3]
}

fn nonce(direction: Direction, counter: u32) -> [u8; NONCE_LEN] {
    let [c0, c1, c2, c3] = counter.to_be_bytes();
    [direction_byte(direction), 0, 0, 0, 0, 0, 0, 0, c0, c1, c2, c3]
}

/// Header followed by context, without allocation.
struct Aad {
    bytes: [u8; AAD_LEN_MAX],
    len: usize,
}

impl Aad {
    fn new(header: &[u8; HEADER_LEN], context: &[u8]) -> Option<Self> {
        let len = HEADER_LEN
            .checked_add(context.len())
            .filter(|len| *len <= AAD_LEN_MAX)?;
        let mut bytes = [0u8; AAD_LEN_MAX];
        let (head, rest) = bytes.split_first_chunk_mut::<HEADER_LEN>()?;
        head.copy_from_slice(header);
        rest.get_mut(..context.len())?.copy_from_slice(context);
        Some(Self { bytes, len })
    }

    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }
}

/// The outcome of [`Sealer::seal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Sealed {
    /// Length of the frame written at the start of `out`.
    pub len: usize,
    /// When `Some`, the caller must store this value durably *before*
    /// publishing the frame, and pass it to [`Sealer::resume`] after a reboot.
    pub persist_reservation: Option<u32>,
}

/// Seals outgoing frames of one direction with a strictly increasing counter.
pub struct Sealer {
    key: SessionKey,
    direction: Direction,
    /// The next counter to use; `u32::MAX` means exhausted.
    next: u32,
    /// Counters below this value are covered by a persisted reservation.
    reserved_until: u32,
}

impl Sealer {
    /// A sealer for a key that never sealed anything in `direction`: starts at
    /// counter 1, and its first seal asks for a reservation.
    pub fn new(key: SessionKey, direction: Direction) -> Self {
        Self::resume(key, direction, 1)
    }

    /// Continues after a reboot from the last persisted reservation.
    ///
    /// Every counter used before the reboot is below that value, so none is
    /// reused; at most one block of counters is skipped.
    pub fn resume(key: SessionKey, direction: Direction, persisted_reservation: u32) -> Self {
        let next = persisted_reservation.max(1);
        Self { key, direction, next, reserved_until: next }
    }

    /// The counter the next frame will carry.
    pub fn next_counter(&self) -> u32 {
        self.next
    }

    /// The direction this sealer writes.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Seals `plaintext` into `out` (copying it, then encrypting in place).
    ///
    /// On success, `out[..len]` holds the frame. If
    /// [`Sealed::persist_reservation`] is `Some`, store it durably before
    /// publishing the frame; if that fails, drop the frame and this sealer and
    /// resume from the last value that was stored. On error nothing is
    /// consumed.
    pub fn seal(&mut self, context: &[u8], plaintext: &[u8], out: &mut [u8]) -> Result<Sealed, SealError> {
        let counter = self.next;
        if counter == u32::MAX {
            return Err(SealError::CounterExhausted);
        }
        let reservation =
            (counter >= self.reserved_until).then(|| counter.saturating_add(COUNTER_RESERVE_BLOCK));
        let len = seal_frame(&self.key, self.direction, counter, context, plaintext, out)?;
        self.next = counter.saturating_add(1);
        if let Some(reserved) = reservation {
            self.reserved_until = reserved;
        }
        Ok(Sealed { len, persist_reservation: reservation })
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("direction", &self.direction)
            .field("next", &self.next)
            .field("reserved_until", &self.reserved_until)
            .finish_non_exhaustive()
    }
}

/// Writes one frame with an explicit counter. Callers guarantee uniqueness.
fn seal_frame(
    key: &SessionKey,
    direction: Direction,
    counter: u32,
    context: &[u8],
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<usize, SealError> {
    let head_bytes = header(direction, counter);
    let aad = Aad::new(&head_bytes, context).ok_or(SealError::ContextTooLong)?;
    let len = plaintext
        .len()
        .checked_add(SEAL_OVERHEAD)
        .ok_or(SealError::BufferTooSmall)?;
    let frame = out.get_mut(..len).ok_or(SealError::BufferTooSmall)?;
    let (head, rest) = frame
        .split_first_chunk_mut::<HEADER_LEN>()
        .ok_or(SealError::BufferTooSmall)?;
    let (body, tag_out) = rest
        .split_last_chunk_mut::<TAG_LEN>()
        .ok_or(SealError::BufferTooSmall)?;
    *head = head_bytes;
    body.copy_from_slice(plaintext);
    let tag = key
        .cipher()
        .encrypt_in_place_detached(&Nonce::from(nonce(direction, counter)), aad.as_slice(), body)
        .map_err(|_| SealError::PlaintextTooLong)?;
    tag_out.copy_from_slice(&tag);
    Ok(len)
}

/// An IPsec-style sliding window over the last [`REPLAY_WINDOW_LEN`] counters.
///
/// Bit `i` of the bitmap records whether counter `highest - i` was accepted.
/// Export it with [`highest`](Self::highest) and [`bitmap`](Self::bitmap),
/// import it with [`from_parts`](Self::from_parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ReplayWindow {
    highest: u32,
    bitmap: u64,
}

impl ReplayWindow {
    /// A window that has seen nothing.
    pub const fn new() -> Self {
        Self { highest: 0, bitmap: 0 }
    }

    /// Restores a window exported with [`highest`](Self::highest) and
    /// [`bitmap`](Self::bitmap). The `highest` counter always counts as seen.
    pub const fn from_parts(highest: u32, bitmap: u64) -> Self {
        if highest == 0 { Self::new() } else { Self { highest, bitmap: bitmap | 1 } }
    }

    /// The highest counter accepted so far (0 if none).
    pub const fn highest(&self) -> u32 {
        self.highest
    }

    /// Which of the counters just below [`highest`](Self::highest) were seen.
    pub const fn bitmap(&self) -> u64 {
        self.bitmap
    }

    /// Whether a frame with `counter` may be accepted, without recording it.
    pub fn check(&self, counter: u32) -> Result<(), OpenError> {
        if counter == 0 {
            return Err(OpenError::CounterZero);
        }
        let Some(age) = self.highest.checked_sub(counter) else {
            return Ok(());
        };
        if age >= REPLAY_WINDOW_LEN {
            return Err(OpenError::TooOld);
        }
        if self.bitmap & (1u64 << age) != 0 {
            return Err(OpenError::Replayed);
        }
        Ok(())
    }

    /// Records `counter` as seen. Only call after [`check`](Self::check)
    /// passed and the frame authenticated.
    fn mark_seen(&mut self, counter: u32) {
        match counter.checked_sub(self.highest) {
            Some(0) => self.bitmap |= 1,
            Some(ahead) => {
                self.bitmap = self.bitmap.checked_shl(ahead).unwrap_or(0) | 1;
                self.highest = counter;
            }
            None => {
                let age = self.highest.wrapping_sub(counter);
                self.bitmap |= 1u64.checked_shl(age).unwrap_or(0);
            }
        }
    }
}

/// Opens frames of one direction, keeping its own [`ReplayWindow`].
pub struct Opener {
    key: SessionKey,
    direction: Direction,
    window: ReplayWindow,
}

impl Opener {
    /// An opener with an empty replay window.
    pub fn new(key: SessionKey, direction: Direction) -> Self {
        Self::resume(key, direction, ReplayWindow::new())
    }

    /// An opener continuing from a persisted replay window.
    pub fn resume(key: SessionKey, direction: Direction, window: ReplayWindow) -> Self {
        Self { key, direction, window }
    }

    /// The current replay window, for persisting.
    pub fn window(&self) -> ReplayWindow {
        self.window
    }

    /// Verifies and decrypts `frame` in place, returning the plaintext.
    ///
    /// See [`open_with`].
    pub fn open<'a>(&mut self, context: &[u8], frame: &'a mut [u8]) -> Result<&'a [u8], OpenError> {
        open_with(&mut self.window, &self.key, self.direction, context, frame)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("direction", &self.direction)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// Verifies and decrypts `frame` in place with a caller-held window (a
/// server keeps one per device), returning the plaintext inside `frame`.
///
/// Version, direction, context length and window are checked before any
/// decryption; the counter is recorded in `window` only once the tag
/// verified. On error `frame` still holds ciphertext (never unauthenticated
/// plaintext) and `window` is unchanged.
pub fn open_with<'a>(
    window: &mut ReplayWindow,
    key: &SessionKey,
    direction: Direction,
    context: &[u8],
    frame: &'a mut [u8],
) -> Result<&'a [u8], OpenError> {
    let (head, rest) = frame
        .split_first_chunk_mut::<HEADER_LEN>()
        .ok_or(OpenError::FrameTooShort)?;
    let (body, tag) = rest
        .split_last_chunk_mut::<TAG_LEN>()
        .ok_or(OpenError::FrameTooShort)?;
    let counter = check_header(head, direction)?;
    window.check(counter)?;
    let aad = Aad::new(head, context).ok_or(OpenError::ContextTooLong)?;
    key.cipher()
        .decrypt_in_place_detached(
            &Nonce::from(nonce(direction, counter)),
            aad.as_slice(),
            body,
            &Tag::from(*tag),
        )
        .map_err(|_| OpenError::Authentication)?;
    window.mark_seen(counter);
    Ok(body)
}

/// Validates version and direction, returning the counter.
fn check_header(head: &[u8; HEADER_LEN], direction: Direction) -> Result<u32, OpenError> {
    let [version, dir, c0, c1, c2, c3] = *head;
    if version != PROTOCOL_VERSION {
        return Err(OpenError::VersionUnsupported);
    }
    if dir != direction_byte(direction) {
        return Err(OpenError::DirectionWrong);
    }
    Ok(u32::from_le_bytes([c0, c1, c2, c3]))
}

/// The counter of a frame, read from its header without any verification
/// (for logging and diagnostics only).
pub fn frame_counter(frame: &[u8]) -> Option<u32> {
    let (head, _) = frame.split_first_chunk::<HEADER_LEN>()?;
    let [_, _, c0, c1, c2, c3] = *head;
    Some(u32::from_le_bytes([c0, c1, c2, c3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn sealed(sealer: &mut Sealer, context: &[u8], plaintext: &[u8]) -> std::vec::Vec<u8> {
        let mut out = [0u8; 256];
        let sealed = sealer.seal(context, plaintext, &mut out).unwrap();
        out[..sealed.len].to_vec()
    }

    #[test]
    fn layout_matches_the_documentation() {
        let mut sealer = Sealer::new(SessionKey::from_bytes(KEY), Direction::Down);
        let frame = sealed(&mut sealer, b"trap-1", b"hello");
        assert_eq!(frame.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(frame[..6], [PROTOCOL_VERSION, 1, 1, 0, 0, 0]);
        assert_eq!(nonce(Direction::Down, 0x0102_0304), [1, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(frame_counter(&frame), Some(1));
    }

    #[test]
    fn first_seal_reserves_then_once_per_block() {
        let mut sealer = Sealer::new(SessionKey::from_bytes(KEY), Direction::Up);
        let mut out = [0u8; 64];
        let first = sealer.seal(b"", b"x", &mut out).unwrap();
        assert_eq!(first.persist_reservation, Some(1 + COUNTER_RESERVE_BLOCK));
        for _ in 1..COUNTER_RESERVE_BLOCK {
            assert_eq!(
                sealer
                    .seal(b"", b"x", &mut out)
                    .unwrap()
                    .persist_reservation,
                None
            );
        }
        let next = sealer.seal(b"", b"x", &mut out).unwrap();
        assert_eq!(next.persist_reservation, Some(1 + 2 * COUNTER_RESERVE_BLOCK));
    }

    #[test]
    fn errors_consume_nothing() {
        let mut sealer = Sealer::new(SessionKey::from_bytes(KEY), Direction::Up);
        let mut small = [0u8; SEAL_OVERHEAD + 2];
        assert_eq!(sealer.seal(b"", b"abc", &mut small), Err(SealError::BufferTooSmall));
        let mut out = [0u8; 64];
        assert_eq!(sealer.seal(&[0; 65], b"abc", &mut out), Err(SealError::ContextTooLong));
        assert_eq!(sealer.next_counter(), 1);
        let ok = sealer.seal(b"", b"abc", &mut out).unwrap();
        assert_eq!(ok.persist_reservation, Some(1 + COUNTER_RESERVE_BLOCK));
    }

    #[test]
    fn window_accepts_in_window_and_refuses_the_rest() {
        let mut window = ReplayWindow::new();
        assert_eq!(window.check(0), Err(OpenError::CounterZero));
        for counter in [5, 3, 100, 37, 99] {
            window.check(counter).unwrap();
            window.mark_seen(counter);
        }
        assert_eq!(window.check(3), Err(OpenError::TooOld));
        assert_eq!(window.check(36), Err(OpenError::TooOld));
        assert_eq!(window.check(99), Err(OpenError::Replayed));
        assert_eq!(window.check(37), Err(OpenError::Replayed));
        assert_eq!(window.check(100), Err(OpenError::Replayed));
        assert_eq!(window.check(98), Ok(()));
        assert_eq!(window.check(101), Ok(()));
        window.mark_seen(u32::MAX);
        assert_eq!(window.check(u32::MAX), Err(OpenError::Replayed));
        let restored = ReplayWindow::from_parts(window.highest(), window.bitmap());
        assert_eq!(restored, window);
    }
}
