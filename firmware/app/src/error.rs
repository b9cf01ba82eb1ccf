//! The application's error type: one flat `Copy` enum wrapping the SDK's.

use core::fmt;

use wildcam_sdk::ota::OtaError;
use wildcam_sdk::protocol::ProtocolError;
use wildcam_sdk::provision::ProvisionError;
use wildcam_sdk::queue::QueueError;
use wildcam_sdk::seal::{OpenError, SealError};
use wildcam_sdk::topic::TopicError;

use crate::storage::StateError;

/// Why an operation of the trap failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrapError {
    /// The trap has no credentials yet.
    NotProvisioned,
    /// The state journal failed.
    State(StateError),
    /// The offline queue failed.
    Queue(QueueError),
    /// A message did not encode or decode.
    Protocol(ProtocolError),
    /// A frame could not be sealed.
    Seal(SealError),
    /// A downlink frame was refused (forged, replayed, for someone else).
    Open(OpenError),
    /// A topic is not one of this trap's downlink topics, or does not fit
    /// the message it carries.
    Topic(TopicError),
    /// A message arrived on a topic that is not its route.
    TopicMismatch,
    /// A provisioning step failed.
    Provision(ProvisionError),
    /// An OTA step was refused.
    Ota(OtaError),
}

impl fmt::Display for TrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotProvisioned => f.write_str("the trap is not provisioned"),
            Self::State(error) => write!(f, "device state: {error}"),
            Self::Queue(error) => write!(f, "offline queue: {error}"),
            Self::Protocol(error) => write!(f, "protocol: {error}"),
            Self::Seal(error) => write!(f, "sealing: {error}"),
            Self::Open(error) => write!(f, "downlink frame refused: {error}"),
            Self::Topic(error) => write!(f, "topic: {error}"),
            Self::TopicMismatch => f.write_str("message arrived on a topic that is not its route"),
            Self::Provision(error) => write!(f, "provisioning: {error}"),
            Self::Ota(error) => write!(f, "OTA: {error}"),
        }
    }
}

impl core::error::Error for TrapError {}

macro_rules! from_error {
    ($($source:ty => $variant:ident,)*) => {
        $(impl From<$source> for TrapError {
            fn from(error: $source) -> Self {
                Self::$variant(error)
            }
        })*
    };
}

from_error! {
    StateError => State,
    QueueError => Queue,
    ProtocolError => Protocol,
    SealError => Seal,
    OpenError => Open,
    TopicError => Topic,
    ProvisionError => Provision,
}
