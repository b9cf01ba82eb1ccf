//! Protocol v1: every message the device and the server exchange.
//!
//! # Envelope
//!
//! Every message is encoded as `[PROTOCOL_VERSION][kind][postcard body]`:
//! the version byte makes the protocol version explicit in every message, the
//! kind byte ([`MessageKind`]) names the body's type, and the body is the
//! [postcard] encoding of the message struct. Device traffic is then sealed
//! ([`crate::seal`]) before it is published; provisioning traffic travels in
//! clear (it carries no secret: the credentials inside it are sealed).
//!
//! Each message type implements [`Message`], which fixes its kind, its topic
//! and its compile-time maximum encoded size [`Message::ENCODED_LEN_MAX`]. A
//! receiver decodes with [`decode`] (one expected type) or [`Uplink::decode`] /
//! [`Downlink::decode`] (any type of one direction); both refuse an unknown
//! version or kind, trailing bytes, and values out of their documented range.
//!
//! See `docs/protocol.md` for the table of messages, topics and sizes.

use core::fmt;

use heapless::{String, Vec};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::topic::{DeviceId, Direction};

/// The protocol version carried by every message.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes before the postcard body: version and kind.
pub const HEADER_LEN: usize = 2;
/// Most classifier results one detection carries.
pub const CLASSES_MAX: usize = 4;
/// Most capture windows in a configuration.
pub const CAPTURE_WINDOWS_MAX: usize = 4;
/// Longest hardware model name, in bytes.
pub const HARDWARE_MODEL_LEN_MAX: usize = 24;
/// Scale of a normalised bounding-box coordinate: 10,000 is the full frame.
pub const BBOX_SCALE: u16 = 10_000;
/// Minutes in a day: capture windows are expressed in minutes since midnight.
pub const MINUTES_PER_DAY: u16 = 1_440;

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ProtocolError {
    /// The output buffer is smaller than the encoded message.
    EncodeBufferFull,
    /// The input ends before the message does.
    DecodeTruncated,
    /// The input is not a valid encoding of the expected message.
    DecodeMalformed,
    /// The input has bytes after the end of the message.
    DecodeTrailingBytes,
    /// The version byte is not [`PROTOCOL_VERSION`].
    VersionUnsupported,
    /// The kind byte names no known message.
    KindUnknown,
    /// The kind byte names a message other than the one expected here.
    KindUnexpected,
    /// A field holds a value outside its documented range.
    ValueOutOfRange,
    /// The body decodes, but not from its one canonical encoding (e.g. an
    /// over-long varint): every value has exactly one accepted encoding.
    DecodeNonCanonical,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EncodeBufferFull => "output buffer too small for the encoded message",
            Self::DecodeTruncated => "message is truncated",
            Self::DecodeMalformed => "message is malformed",
            Self::DecodeTrailingBytes => "message has trailing bytes",
            Self::VersionUnsupported => "unsupported protocol version",
            Self::KindUnknown => "unknown message kind",
            Self::KindUnexpected => "message kind not expected here",
            Self::ValueOutOfRange => "a field is out of its documented range",
            Self::DecodeNonCanonical => "message is not canonically encoded",
        })
    }
}

impl core::error::Error for ProtocolError {}

impl From<postcard::Error> for ProtocolError {
    fn from(error: postcard::Error) -> Self {
        match error {
            postcard::Error::SerializeBufferFull => Self::EncodeBufferFull,
            postcard::Error::DeserializeUnexpectedEnd => Self::DecodeTruncated,
            _ => Self::DecodeMalformed,
        }
    }
}

/// Where a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Route {
    /// On a device topic `wc/v1/dev/{id}/{up|down}/{suffix}`, sealed.
    Device(Direction, &'static str),
    /// On a provisioning topic `wc/v1/prov/{session}/{up|down}`, in clear.
    Provision(Direction),
}

macro_rules! message_kinds {
    ($( $(#[$doc:meta])* $name:ident($ty:ty) = $value:literal => $route:expr, )*) => {
        /// The kind byte of the envelope: which message the body holds.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum MessageKind {
            $( $(#[$doc])* $name = $value, )*
        }

        impl MessageKind {
            /// Every kind, in wire-value order.
            pub const ALL: &'static [MessageKind] = &[$(MessageKind::$name,)*];

            /// The kind for a wire byte.
            pub fn from_byte(byte: u8) -> Result<Self, ProtocolError> {
                match byte {
                    $( $value => Ok(Self::$name), )*
                    _ => Err(ProtocolError::KindUnknown),
                }
            }

            /// Where messages of this kind travel.
            pub const fn route(self) -> Route {
                match self {
                    $( Self::$name => $route, )*
                }
            }

            /// The longest envelope a message of this kind encodes to.
            pub const fn encoded_len_max(self) -> usize {
                match self {
                    $( Self::$name => <$ty as Message>::ENCODED_LEN_MAX, )*
                }
            }

            /// The Rust type of the message, for documentation and logs.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$name => stringify!($ty), )*
                }
            }
        }
    };
}

use Direction::{Down, Up};

message_kinds! {
    /// [`Hello`], sent on every connection.
    Hello(Hello) = 0x01 => Route::Device(Up, "hello"),
    /// [`Detection`].
    Detection(Detection) = 0x02 => Route::Device(Up, "det"),
    /// [`Health`].
    Health(Health) = 0x03 => Route::Device(Up, "health"),
    /// [`ReportedConfig`].
    ReportedConfig(ReportedConfig) = 0x04 => Route::Device(Up, "cfg"),
    /// [`CommandResult`].
    CommandResult(CommandResult) = 0x05 => Route::Device(Up, "cmd"),
    /// [`OtaChunkRequest`].
    OtaChunkRequest(OtaChunkRequest) = 0x06 => Route::Device(Up, "ota"),
    /// [`OtaProgress`].
    OtaProgress(OtaProgress) = 0x07 => Route::Device(Up, "ota"),
    /// [`OtaResult`].
    OtaResult(OtaResult) = 0x08 => Route::Device(Up, "ota"),
    /// [`Ack`].
    Ack(Ack) = 0x40 => Route::Device(Down, "ack"),
    /// [`DesiredConfig`].
    DesiredConfig(DesiredConfig) = 0x41 => Route::Device(Down, "cfg"),
    /// [`Command`].
    Command(Command) = 0x42 => Route::Device(Down, "cmd"),
    /// [`OtaOffer`].
    OtaOffer(OtaOffer) = 0x43 => Route::Device(Down, "ota"),
    /// [`OtaChunk`].
    OtaChunk(OtaChunk) = 0x44 => Route::Device(Down, "ota"),
    /// [`ClaimRequest`].
    ClaimRequest(ClaimRequest) = 0x80 => Route::Provision(Up),
    /// [`ClaimProof`].
    ClaimProof(ClaimProof) = 0x81 => Route::Provision(Up),
    /// [`ClaimChallenge`].
    ClaimChallenge(ClaimChallenge) = 0x82 => Route::Provision(Down),
    /// [`SealedCredentials`].
    Credentials(SealedCredentials) = 0x83 => Route::Provision(Down),
    /// [`ClaimRejected`].
    ClaimRejected(ClaimRejected) = 0x84 => Route::Provision(Down),
}

/// A protocol message: its kind, route and maximum encoded size are fixed at
/// compile time.
pub trait Message: Serialize + DeserializeOwned + MaxSize {
    /// The envelope's kind byte for this message.
    const KIND: MessageKind;
    /// The longest envelope this message can encode to (header included,
    /// before sealing).
    const ENCODED_LEN_MAX: usize = HEADER_LEN + Self::POSTCARD_MAX_SIZE;

    /// Checks ranges that the type system does not; called by [`decode`].
    fn validate(&self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

/// Encodes `message` with its envelope into `buf`, returning the used prefix.
pub fn encode<'a, M: Message>(message: &M, buf: &'a mut [u8]) -> Result<&'a mut [u8], ProtocolError> {
    let (header, body) = buf
        .split_at_mut_checked(HEADER_LEN)
        .ok_or(ProtocolError::EncodeBufferFull)?;
    header[0] = PROTOCOL_VERSION;
    header[1] = M::KIND as u8;
    let body_len = postcard::to_slice(message, body)?.len();
    Ok(&mut buf[..HEADER_LEN + body_len])
}

/// Reads the envelope header: checks the version and returns the kind and body.
pub fn split_envelope(bytes: &[u8]) -> Result<(MessageKind, &[u8]), ProtocolError> {
    let [version, kind, body @ ..] = bytes else {
        return Err(ProtocolError::DecodeTruncated);
    };
    if *version != PROTOCOL_VERSION {
        return Err(ProtocolError::VersionUnsupported);
    }
    Ok((MessageKind::from_byte(*kind)?, body))
}

/// Decodes a message of type `M`, refusing any other kind.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, ProtocolError> {
    let (kind, body) = split_envelope(bytes)?;
    if kind != M::KIND {
        return Err(ProtocolError::KindUnexpected);
    }
    decode_body(body)
}

fn decode_body<M: Message>(body: &[u8]) -> Result<M, ProtocolError> {
    let (message, rest) = postcard::take_from_bytes::<M>(body)?;
    if !rest.is_empty() {
        return Err(ProtocolError::DecodeTrailingBytes);
    }
    if !encodes_to(&message, body) {
        return Err(ProtocolError::DecodeNonCanonical);
    }
    message.validate()?;
    Ok(message)
}

/// Whether `value` encodes to exactly `expected`, checked byte by byte as it
/// serializes: no buffer, no allocation.
fn encodes_to<T: Serialize>(value: &T, expected: &[u8]) -> bool {
    postcard::serialize_with_flavor(value, Compare { expected, position: 0 }).unwrap_or(false)
}

/// A postcard output that compares instead of storing.
struct Compare<'a> {
    expected: &'a [u8],
    position: usize,
}

impl postcard::ser_flavors::Flavor for Compare<'_> {
    type Output = bool;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        match self.expected.get(self.position) {
            Some(&expected) if expected == byte => {
                self.position += 1;
                Ok(())
            }
            // Stops serializing at the first difference.
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn finalize(self) -> postcard::Result<bool> {
        Ok(self.position == self.expected.len())
    }
}

fn check(condition: bool) -> Result<(), ProtocolError> {
    if condition { Ok(()) } else { Err(ProtocolError::ValueOutOfRange) }
}

/// Seconds since 1970-01-01T00:00:00Z (UTC), as kept by the trap's RTC.
pub type UnixSeconds = u32;

/// Why the device last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ResetReason {
    /// Power applied (cold boot).
    PowerOn,
    /// Supply voltage dropped below the brown-out threshold.
    Brownout,
    /// A watchdog fired.
    Watchdog,
    /// The firmware panicked.
    Panic,
    /// The firmware asked for it (command, update).
    Software,
    /// Wake from deep sleep at a check-in or on a trigger.
    DeepSleepWake,
    /// External reset pin.
    External,
    /// Anything else.
    Unknown,
}

/// Feature bits a device announces in its [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// Has a PIR motion sensor.
    pub const PIR: Self = Self(1 << 0);
    /// Runs an on-device classifier.
    pub const CLASSIFIER: Self = Self(1 << 1);
    /// Can upload full images on request.
    pub const FULL_IMAGE_UPLOAD: Self = Self(1 << 2);
    /// Has a solar charger with a measurable input.
    pub const SOLAR: Self = Self(1 << 3);
    /// Has removable storage (SD card).
    pub const REMOVABLE_STORAGE: Self = Self(1 << 4);
    /// Accepts OTA updates.
    pub const OTA: Self = Self(1 << 5);

    /// Both sets of bits.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// First message on every connection: who the device is, what it runs, and
/// where its queue stands. Also serves as the catch-up request: on a hello the
/// server re-sends the desired configuration, pending commands and any offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello {
    /// The device's id (also in the topic; both must match).
    pub device_id: DeviceId,
    /// Board or product name, e.g. `wildcam-c3-rev2`.
    pub hardware_model: String<HARDWARE_MODEL_LEN_MAX>,
    /// The chip.
    pub chip: Chip,
    /// Running firmware.
    pub firmware: FirmwareVersion,
    /// Anti-rollback counter of the running firmware.
    pub secure_version: u32,
    /// Why the device last reset.
    pub reset_reason: ResetReason,
    /// Feature bits.
    pub capabilities: Capabilities,
    /// Version of the configuration the device runs (0: factory defaults).
    pub config_version: u32,
    /// Lowest detection sequence still owed: every sequence below it was acked
    /// or dropped by the queue's full policy, so the server may advance its
    /// contiguous ack past any gap below it.
    pub queue_floor: u32,
    /// Next sequence number the device will assign.
    pub queue_next: u32,
}

impl Message for Hello {
    const KIND: MessageKind = MessageKind::Hello;
    fn validate(&self) -> Result<(), ProtocolError> {
        check(self.queue_floor <= self.queue_next)
    }
}

/// What fired the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Trigger {
    /// The PIR sensor saw motion.
    Pir,
    /// The time-lapse timer.
    TimeLapse,
    /// An operator's capture-now command or a button.
    Manual,
}

/// One classifier result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Classification {
    /// Label id in the deployed classifier's label table.
    pub label: u16,
    /// Confidence in percent, 0..=100.
    pub confidence_pct: u8,
}

/// A bounding box in normalised coordinates: 0..=[`BBOX_SCALE`] across the
/// frame, origin top left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BoundingBox {
    /// Left edge.
    pub x: u16,
    /// Top edge.
    pub y: u16,
    /// Width.
    pub width: u16,
    /// Height.
    pub height: u16,
}

impl BoundingBox {
    fn is_valid(&self) -> bool {
        u32::from(self.x) + u32::from(self.width) <= u32::from(BBOX_SCALE)
            && u32::from(self.y) + u32::from(self.height) <= u32::from(BBOX_SCALE)
    }
}

/// One captured frame and what the trap made of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Detection {
    /// Per-device sequence number from the offline queue (starts at 1).
    pub seq: u32,
    /// When the frame was captured.
    pub captured_at: UnixSeconds,
    /// What fired the capture.
    pub trigger: Trigger,
    /// Index of this frame in its burst, 0-based, below `burst_len`.
    pub burst_index: u8,
    /// Frames in the burst, at least 1.
    pub burst_len: u8,
    /// Classifier results, best first (empty: no classifier, or blank).
    pub classes: Vec<Classification, CLASSES_MAX>,
    /// Where the best result sits in the frame.
    pub bbox: Option<BoundingBox>,
    /// Size of the stored image, in bytes.
    pub image_len: u32,
    /// First 8 bytes of the SHA-256 of the stored image.
    pub image_digest: [u8; 8],
    /// Battery voltage at capture, in millivolts.
    pub battery_mv: u16,
}

impl Message for Detection {
    const KIND: MessageKind = MessageKind::Detection;
    fn validate(&self) -> Result<(), ProtocolError> {
        check(self.seq != 0)?;
        check(self.burst_len >= 1 && self.burst_index < self.burst_len)?;
        check(self.classes.iter().all(|c| c.confidence_pct <= 100))?;
        check(self.bbox.is_none_or(|b| b.is_valid()))
    }
}

/// State of the battery charger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ChargeState {
    /// Running from the battery.
    Discharging,
    /// Charging from solar or external power.
    Charging,
    /// Full, on external power.
    Full,
    /// No gauge.
    Unknown,
}

/// Periodic health report, sent at every check-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Health {
    /// When the report was taken.
    pub taken_at: UnixSeconds,
    /// Battery voltage, millivolts.
    pub battery_mv: u16,
    /// Battery state of charge, percent 0..=100.
    pub battery_soc_pct: u8,
    /// Charger state.
    pub charge_state: ChargeState,
    /// Solar panel input power, milliwatts.
    pub solar_mw: u16,
    /// Board temperature, tenths of a degree Celsius.
    pub temperature_decicelsius: i16,
    /// Free image storage, KiB.
    pub storage_free_kib: u32,
    /// Storage errors since boot.
    pub storage_errors: u16,
    /// Received signal strength, dBm.
    pub rssi_dbm: i8,
    /// Seconds since boot.
    pub uptime_s: u32,
    /// Why the device last reset.
    pub reset_reason: ResetReason,
    /// Triggers (PIR or time-lapse) since the previous report.
    pub triggers_since_last: u16,
    /// Detections waiting in the offline queue.
    pub queue_depth: u32,
    /// Detections ever dropped by the queue's full policy.
    pub queue_dropped_total: u32,
}

impl Message for Health {
    const KIND: MessageKind = MessageKind::Health;
    fn validate(&self) -> Result<(), ProtocolError> {
        check(self.battery_soc_pct <= 100)
    }
}

/// Acknowledgement of detections: every sequence up to and including
/// `through` is durably stored by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ack {
    /// Highest contiguous sequence durably stored.
    pub through: u32,
}

impl Message for Ack {
    const KIND: MessageKind = MessageKind::Ack;
}

/// A daily window in which PIR captures are armed, in minutes since local
/// midnight; `start > end` wraps past midnight (e.g. 18:00–06:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CaptureWindow {
    /// Start, minutes since midnight, below 1,440.
    pub start_min: u16,
    /// End, minutes since midnight, below 1,440.
    pub end_min: u16,
}

impl CaptureWindow {
    /// Whether `minute` (since midnight) falls inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start_min <= self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        }
    }
}

/// What the trap uploads besides detection metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum UploadPolicy {
    /// Metadata only; images stay on the card until asked for.
    MetadataOnly,
    /// Metadata, and full images of non-blank detections.
    NonBlankImages,
    /// Metadata and every full image.
    AllImages,
}

/// A trap's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TrapConfig {
    /// PIR sensitivity, percent 0..=100.
    pub pir_sensitivity_pct: u8,
    /// Frames per trigger, 1..=10.
    pub burst_len: u8,
    /// Windows in which PIR captures are armed; empty: always armed.
    pub capture_windows: Vec<CaptureWindow, CAPTURE_WINDOWS_MAX>,
    /// Seconds between time-lapse frames; 0 disables time-lapse.
    pub timelapse_interval_s: u32,
    /// Seconds between check-ins (health report, queue flush), 60..=86,400.
    pub checkin_interval_s: u32,
    /// What to upload besides metadata.
    pub upload_policy: UploadPolicy,
}

/// Most frames one trigger may take.
pub const BURST_LEN_MAX: u8 = 10;
/// Shortest check-in interval, seconds.
pub const CHECKIN_INTERVAL_MIN_S: u32 = 60;
/// Longest check-in interval, seconds.
pub const CHECKIN_INTERVAL_MAX_S: u32 = 86_400;

impl TrapConfig {
    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        check(self.pir_sensitivity_pct <= 100)?;
        check((1..=BURST_LEN_MAX).contains(&self.burst_len))?;
        check(
            self.capture_windows
                .iter()
                .all(|w| w.start_min < MINUTES_PER_DAY && w.end_min < MINUTES_PER_DAY),
        )?;
        check((CHECKIN_INTERVAL_MIN_S..=CHECKIN_INTERVAL_MAX_S).contains(&self.checkin_interval_s))
    }
}

impl Default for TrapConfig {
    fn default() -> Self {
        Self {
            pir_sensitivity_pct: 60,
            burst_len: 3,
            capture_windows: Vec::new(),
            timelapse_interval_s: 0,
            checkin_interval_s: 3_600,
            upload_policy: UploadPolicy::MetadataOnly,
        }
    }
}

/// The configuration an operator wants the trap to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DesiredConfig {
    /// Increases with every change; the trap ignores versions it already has.
    pub version: u32,
    /// The configuration.
    pub config: TrapConfig,
}

impl Message for DesiredConfig {
    const KIND: MessageKind = MessageKind::DesiredConfig;
    fn validate(&self) -> Result<(), ProtocolError> {
        self.config.validate()
    }
}

/// Whether the trap applied a desired configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConfigStatus {
    /// Applied; `config` is now running.
    Applied,
    /// Refused: the hardware cannot do it (e.g. time-lapse without an RTC).
    RejectedUnsupported,
    /// Refused: a value out of range; `config` is the one still running.
    RejectedInvalid,
}

/// The configuration the trap runs, sent after every change and on request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ReportedConfig {
    /// The version the trap runs.
    pub version: u32,
    /// What happened to the most recent desired version.
    pub status: ConfigStatus,
    /// The most recent desired version the trap saw.
    pub desired_version: u32,
    /// The configuration it runs.
    pub config: TrapConfig,
}

impl Message for ReportedConfig {
    const KIND: MessageKind = MessageKind::ReportedConfig;
    fn validate(&self) -> Result<(), ProtocolError> {
        self.config.validate()
    }
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CommandKind {
    /// Restart the trap.
    Reboot,
    /// Take a burst now (a `Manual` trigger).
    CaptureNow,
    /// Erase image storage (not the offline queue).
    FormatStorage,
    /// Upload the full image of the detection with this sequence.
    SendFullImage {
        /// Sequence of the detection.
        seq: u32,
    },
}

/// An operator's command, queued by the server until the trap connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Command {
    /// Server-assigned id, echoed in the result; a trap runs each id once.
    pub id: u32,
    /// Seconds the command stays valid from the moment it is sent; the server
    /// recomputes it on each delivery and never sends an expired command.
    pub ttl_s: u32,
    /// What to do.
    pub kind: CommandKind,
}

impl Message for Command {
    const KIND: MessageKind = MessageKind::Command;
    fn validate(&self) -> Result<(), ProtocolError> {
        check(self.ttl_s > 0)
    }
}

/// What became of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CommandStatus {
    /// Done (for a reboot: sent just before restarting).
    Done,
    /// Its time-to-live ran out before it could run.
    Expired,
    /// This trap cannot do it.
    Unsupported,
    /// It was tried and failed.
    Failed,
    /// Already ran (the same id arrived again).
    Duplicate,
}

/// The trap's answer to a [`Command`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CommandResult {
    /// The command's id.
    pub id: u32,
    /// What became of it.
    pub status: CommandStatus,
}

impl Message for CommandResult {
    const KIND: MessageKind = MessageKind::CommandResult;
}

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

pub use crate::provision::{ClaimChallenge, ClaimProof, ClaimRejected, ClaimRequest};

impl Message for ClaimRequest {
    const KIND: MessageKind = MessageKind::ClaimRequest;
}

impl Message for ClaimProof {
    const KIND: MessageKind = MessageKind::ClaimProof;
}

impl Message for ClaimChallenge {
    const KIND: MessageKind = MessageKind::ClaimChallenge;
}

impl Message for ClaimRejected {
    const KIND: MessageKind = MessageKind::ClaimRejected;
}

/// The device's credentials, sealed under a key derived from the freshly
/// agreed session key (see [`crate::provision::seal_credentials`]); opened by
/// [`crate::provision::Provisioner::on_credentials`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SealedCredentials {
    /// The sealed frame.
    pub frame: Vec<u8, { crate::provision::CREDENTIALS_FRAME_LEN_MAX }>,
}

impl Message for SealedCredentials {
    const KIND: MessageKind = MessageKind::Credentials;
    fn validate(&self) -> Result<(), ProtocolError> {
        check(self.frame.len() >= crate::seal::SEAL_OVERHEAD)
    }
}

pub use crate::ota::{Chunk as OtaChunk, ChunkRequest as OtaChunkRequest, OtaOffer, OtaProgress, OtaResult};

impl Message for OtaOffer {
    const KIND: MessageKind = MessageKind::OtaOffer;
}

impl Message for OtaChunk {
    const KIND: MessageKind = MessageKind::OtaChunk;
}

impl Message for OtaChunkRequest {
    const KIND: MessageKind = MessageKind::OtaChunkRequest;
    fn validate(&self) -> Result<(), ProtocolError> {
        check(usize::from(self.len) <= crate::ota::OTA_CHUNK_LEN_MAX)
    }
}

impl Message for OtaProgress {
    const KIND: MessageKind = MessageKind::OtaProgress;
}

impl Message for OtaResult {
    const KIND: MessageKind = MessageKind::OtaResult;
}

impl MessageKind {
    /// Whether this kind may arrive on a device topic with this direction and
    /// last level: a receiver refuses a message published on the wrong topic.
    pub fn fits_device_topic(self, direction: Direction, suffix: &str) -> bool {
        matches!(self.route(), Route::Device(d, s) if d == direction && s == suffix)
    }
}

macro_rules! message_set {
    ($(#[$doc:meta])* $set:ident { $( $variant:ident($ty:ty), )* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        #[allow(clippy::large_enum_variant)] // Decoded on the stack once, then matched.
        pub enum $set {
            $(
                #[doc = concat!("A [`", stringify!($ty), "`].")]
                $variant($ty),
            )*
        }

        impl $set {
            /// Decodes any message of this set, refusing other kinds.
            pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
                let (kind, body) = split_envelope(bytes)?;
                match kind {
                    $( MessageKind::$variant => decode_body::<$ty>(body).map(Self::$variant), )*
                    _ => Err(ProtocolError::KindUnexpected),
                }
            }

            /// Encodes the message with its envelope.
            pub fn encode<'a>(&self, buf: &'a mut [u8]) -> Result<&'a mut [u8], ProtocolError> {
                match self {
                    $( Self::$variant(message) => encode(message, buf), )*
                }
            }

            /// The message's kind.
            pub fn kind(&self) -> MessageKind {
                match self {
                    $( Self::$variant(_) => MessageKind::$variant, )*
                }
            }

            /// The longest envelope of any message in this set.
            pub const ENCODED_LEN_MAX: usize = {
                let mut max = 0;
                $( if <$ty as Message>::ENCODED_LEN_MAX > max { max = <$ty as Message>::ENCODED_LEN_MAX; } )*
                max
            };
        }
    };
}

message_set! {
    /// Any message a device publishes on its own uplink topics.
    Uplink {
        Hello(Hello),
        Detection(Detection),
        Health(Health),
        ReportedConfig(ReportedConfig),
        CommandResult(CommandResult),
        OtaChunkRequest(OtaChunkRequest),
        OtaProgress(OtaProgress),
        OtaResult(OtaResult),
    }
}

message_set! {
    /// Any message the server publishes on a device's downlink topics.
    Downlink {
        Ack(Ack),
        DesiredConfig(DesiredConfig),
        Command(Command),
        OtaOffer(OtaOffer),
        OtaChunk(OtaChunk),
    }
}

message_set! {
    /// Any message a device publishes on its provisioning topic.
    ProvisionUp {
        ClaimRequest(ClaimRequest),
        ClaimProof(ClaimProof),
    }
}

message_set! {
    /// Any message the server publishes on a provisioning topic.
    ProvisionDown {
        ClaimChallenge(ClaimChallenge),
        Credentials(SealedCredentials),
        ClaimRejected(ClaimRejected),
    }
}
