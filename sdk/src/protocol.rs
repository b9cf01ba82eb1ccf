//! Protocol v1 messages.

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// The protocol version carried by every message.
pub const PROTOCOL_VERSION: u8 = 1;

/// The chip a firmware image is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Chip {
    /// ESP32-C3 (RISC-V, riscv32imc).
    Esp32c3,
    /// ESP32-C6 (RISC-V, riscv32imac).
    Esp32c6,
    /// The host build of the firmware (Linux, TAP networking).
    Host,
}

/// A firmware version, compared lexicographically (major, minor, patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FirmwareVersion {
    /// Incompatible changes.
    pub major: u16,
    /// Features.
    pub minor: u16,
    /// Fixes.
    pub patch: u16,
}
