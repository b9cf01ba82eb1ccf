//! Protocol v1 messages.
/// The protocol version carried by every message.
pub const PROTOCOL_VERSION: u8 = 1;
