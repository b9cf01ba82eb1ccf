//! The MQTT topic scheme and device-id validation.
//!
//! Every topic starts with [`ROOT`]. Device traffic lives under
//! `wc/v1/dev/{device_id}/up/{kind}` (device → server) and
//! `wc/v1/dev/{device_id}/down/{kind}` (server → device); provisioning, before a
//! device has an id, under `wc/v1/prov/{session}/up|down`.
//!
//! A [`DeviceId`] can only hold `[A-Za-z0-9._-]`, so it can never inject an MQTT
//! wildcard (`+`, `#`), a level separator (`/`), a `$` system prefix, a NUL or any
//! other control character into a topic.

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every WildCAM topic; the `v1` follows [`crate::PROTOCOL_VERSION`].
pub const ROOT: &str = "wc/v1";
/// Longest device id, in bytes.
pub const DEVICE_ID_LEN_MAX: usize = 32;
/// Length of a provisioning session id: 16 lowercase hex characters.
pub const SESSION_ID_LEN: usize = 16;
/// Longest topic this module produces, in bytes.
pub const TOPIC_LEN_MAX: usize = 64;

/// A topic string built by this module.
pub type Topic = heapless::String<TOPIC_LEN_MAX>;

/// Why a device id (or a topic) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum TopicError {
    /// The id is empty.
    IdEmpty,
    /// The id is longer than [`DEVICE_ID_LEN_MAX`].
    IdTooLong,
    /// The id holds a byte outside `[A-Za-z0-9._-]` (wildcard, `/`, `$`,
    /// control character, space, non-ASCII...).
    IdBadCharacter,
    /// The id is `.` or `..`, which some brokers and tools treat specially.
    IdReserved,
    /// The topic is not a WildCAM topic of the expected shape.
    TopicUnknown,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::IdEmpty => "device id is empty",
            Self::IdTooLong => "device id is longer than 32 bytes",
            Self::IdBadCharacter => "device id may only contain A-Z a-z 0-9 . _ -",
            Self::IdReserved => "device id may not be '.' or '..'",
            Self::TopicUnknown => "not a WildCAM topic",
        })
    }
}

impl core::error::Error for TopicError {}

/// A validated device identifier (1 to 32 bytes of `[A-Za-z0-9._-]`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(heapless::String<DEVICE_ID_LEN_MAX>);

impl DeviceId {
    /// Validates `id` and wraps it.
    pub fn new(id: &str) -> Result<Self, TopicError> {
        validate_id(id)?;
        let mut inner = heapless::String::new();
        // Cannot fail: length was checked above.
        inner.push_str(id).map_err(|_| TopicError::IdTooLong)?;
        Ok(Self(inner))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's bytes (bound into every sealed frame's associated data).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn validate_id(id: &str) -> Result<(), TopicError> {
    if id.is_empty() {
        return Err(TopicError::IdEmpty);
    }
    if id.len() > DEVICE_ID_LEN_MAX {
        return Err(TopicError::IdTooLong);
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if !id.bytes().all(allowed) {
        return Err(TopicError::IdBadCharacter);
    }
    if id == "." || id == ".." {
        return Err(TopicError::IdReserved);
    }
    Ok(())
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.as_str())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for DeviceId {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "{=str}", self.as_str())
    }
}

impl core::str::FromStr for DeviceId {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = heapless::String::<DEVICE_ID_LEN_MAX>::deserialize(deserializer)?;
        DeviceId::new(&raw).map_err(serde::de::Error::custom)
    }
}

impl postcard::experimental::max_size::MaxSize for DeviceId {
    const POSTCARD_MAX_SIZE: usize = heapless::String::<DEVICE_ID_LEN_MAX>::POSTCARD_MAX_SIZE;
}

/// Direction of a message relative to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Direction {
    /// Device → server.
    Up,
    /// Server → device.
    Down,
}

impl Direction {
    fn segment(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// A provisioning session id: 16 lowercase hex characters chosen at random by
/// the device, so two unclaimed devices never share a reply topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionId([u8; SESSION_ID_LEN]);

impl SessionId {
    /// Builds the id from 8 random bytes.
    pub fn from_random(random: [u8; 8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; SESSION_ID_LEN];
        for (i, byte) in random.iter().enumerate() {
            out[2 * i] = HEX[usize::from(byte >> 4)];
            out[2 * i + 1] = HEX[usize::from(byte & 0x0f)];
        }
        Self(out)
    }

    /// Parses an id as found in a topic.
    pub fn parse(text: &str) -> Result<Self, TopicError> {
        let bytes = text.as_bytes();
        let hex = |b: &u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
        if bytes.len() != SESSION_ID_LEN || !bytes.iter().all(hex) {
            return Err(TopicError::TopicUnknown);
        }
        let mut out = [0u8; SESSION_ID_LEN];
        out.copy_from_slice(bytes);
        Ok(Self(out))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        core::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// Builds `wc/v1/dev/{id}/{up|down}/{kind}`.
pub fn device_topic(id: &DeviceId, direction: Direction, kind: &str) -> Topic {
    let mut topic = Topic::new();
    // Cannot overflow: ROOT (5) + "/dev/" (5) + id (≤32) + "/down/" (6) + kind (≤8) < 64.
    for part in [ROOT, "/dev/", id.as_str(), "/", direction.segment(), "/", kind] {
        let _ = topic.push_str(part);
    }
    topic
}

/// Builds `wc/v1/prov/{session}/{up|down}`.
pub fn provision_topic(session: &SessionId, direction: Direction) -> Topic {
    let mut topic = Topic::new();
    for part in [ROOT, "/prov/", session.as_str(), "/", direction.segment()] {
        let _ = topic.push_str(part);
    }
    topic
}

/// The filter a device subscribes to for all its downlink traffic:
/// `wc/v1/dev/{id}/down/#`.
pub fn device_downlink_filter(id: &DeviceId) -> Topic {
    let mut topic = device_topic(id, Direction::Down, "");
    let _ = topic.push('#');
    topic
}

/// The filter the server subscribes to for all device uplink traffic.
pub const SERVER_UPLINK_FILTER: &str = "wc/v1/dev/+/up/#";
/// The filter the server subscribes to for provisioning requests.
pub const SERVER_PROVISION_FILTER: &str = "wc/v1/prov/+/up";

/// A parsed device topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDeviceTopic<'a> {
    /// The device the topic belongs to.
    pub device: DeviceId,
    /// Up or down.
    pub direction: Direction,
    /// The last level (`det`, `health`, ...).
    pub kind: &'a str,
}

/// Parses `wc/v1/dev/{id}/{up|down}/{kind}`, validating the id.
pub fn parse_device_topic(topic: &str) -> Result<ParsedDeviceTopic<'_>, TopicError> {
    let rest = topic
        .strip_prefix(ROOT)
        .and_then(|r| r.strip_prefix("/dev/"))
        .ok_or(TopicError::TopicUnknown)?;
    let mut parts = rest.split('/');
    let (Some(id), Some(direction), Some(kind), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TopicError::TopicUnknown);
    };
    let direction = match direction {
        "up" => Direction::Up,
        "down" => Direction::Down,
        _ => return Err(TopicError::TopicUnknown),
    };
    if kind.is_empty() {
        return Err(TopicError::TopicUnknown);
    }
    Ok(ParsedDeviceTopic { device: DeviceId::new(id)?, direction, kind })
}

/// Parses `wc/v1/prov/{session}/{up|down}`.
pub fn parse_provision_topic(topic: &str) -> Result<(SessionId, Direction), TopicError> {
    let rest = topic
        .strip_prefix(ROOT)
        .and_then(|r| r.strip_prefix("/prov/"))
        .ok_or(TopicError::TopicUnknown)?;
    let (session, direction) = rest.split_once('/').ok_or(TopicError::TopicUnknown)?;
    let direction = match direction {
        "up" => Direction::Up,
        "down" => Direction::Down,
        _ => return Err(TopicError::TopicUnknown),
    };
    Ok((SessionId::parse(session)?, direction))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for id in ["trap-0001", "A.b_c-9", "x", "0123456789abcdef0123456789abcdef"] {
            assert_eq!(DeviceId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_injection() {
        let cases = [
            ("", TopicError::IdEmpty),
            ("a/b", TopicError::IdBadCharacter),
            ("+", TopicError::IdBadCharacter),
            ("#", TopicError::IdBadCharacter),
            ("$SYS", TopicError::IdBadCharacter),
            ("a\0b", TopicError::IdBadCharacter),
            ("a\nb", TopicError::IdBadCharacter),
            ("a b", TopicError::IdBadCharacter),
            ("caméra", TopicError::IdBadCharacter),
            ("..", TopicError::IdReserved),
            ("0123456789abcdef0123456789abcdef0", TopicError::IdTooLong),
        ];
        for (id, error) in cases {
            assert_eq!(DeviceId::new(id), Err(error), "{id:?}");
        }
    }

    #[test]
    fn topics_round_trip() {
        let id = DeviceId::new("trap-7").unwrap();
        let topic = device_topic(&id, Direction::Up, "det");
        assert_eq!(topic.as_str(), "wc/v1/dev/trap-7/up/det");
        let parsed = parse_device_topic(&topic).unwrap();
        assert_eq!(parsed, ParsedDeviceTopic { device: id.clone(), direction: Direction::Up, kind: "det" });
        assert_eq!(device_downlink_filter(&id).as_str(), "wc/v1/dev/trap-7/down/#");
        let longest = DeviceId::new(&"z".repeat(DEVICE_ID_LEN_MAX)).unwrap();
        assert!(device_topic(&longest, Direction::Down, "health").ends_with("/down/health"));
    }

    #[test]
    fn parse_refuses_foreign_topics() {
        for topic in [
            "wc/v1/dev/a+b/up/det",
            "wc/v1/dev/a/sideways/det",
            "wc/v1/dev/a/up/",
            "wc/v1/dev/a/up/det/extra",
            "wc/v2/dev/a/up/det",
            "other",
        ] {
            assert!(parse_device_topic(topic).is_err(), "{topic}");
        }
    }

    #[test]
    fn session_topics() {
        let session = SessionId::from_random([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff]);
        assert_eq!(session.as_str(), "deadbeef000102ff");
        let topic = provision_topic(&session, Direction::Up);
        assert_eq!(topic.as_str(), "wc/v1/prov/deadbeef000102ff/up");
        assert_eq!(parse_provision_topic(&topic), Ok((session, Direction::Up)));
        assert!(parse_provision_topic("wc/v1/prov/DEADBEEF000102FF/up").is_err());
    }
}
