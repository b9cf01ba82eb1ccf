//! Sending to a device: encode, seal under its key, publish on its downlink
//! topic. Everything that reaches a trap goes through [`Downlink::send`].

use std::sync::Arc;

use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{self, Message, MessageKind, Route};
use wildcam_sdk::topic::{self, Direction};

use crate::broker::{BrokerError, Publisher};
use crate::metrics::Metrics;
use crate::sessions::{SessionError, Sessions};
use crate::store::{Clock, Store, StoreError};

/// Why a downlink message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    /// Encoding failed (a bug: every message fits its maximum).
    #[error("encoding {kind:?} failed: {error}")]
    Encode {
        /// The message kind.
        kind: MessageKind,
        /// The cause.
        error: protocol::ProtocolError,
    },
    /// The device's session refused (unknown, revoked, store failure).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The broker refused the publish.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends sealed messages to devices.
#[derive(Clone)]
pub struct Downlink {
    sessions: Sessions,
    publisher: Publisher,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Downlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downlink").finish_non_exhaustive()
    }
}

impl Downlink {
    /// A sender over these sessions and this broker publisher.
    pub fn new(
        sessions: Sessions,
        publisher: Publisher,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { sessions, publisher, store, clock, metrics }
    }

    /// Encodes, seals and publishes `message` to `device`.
    pub async fn send<M: Message>(&self, device: &DeviceId, message: &M) -> Result<(), DownlinkError> {
        let Route::Device(Direction::Down, suffix) = M::KIND.route() else {
            return Err(DownlinkError::Encode {
                kind: M::KIND,
                error: protocol::ProtocolError::KindUnexpected,
            });
        };
        let mut buf = vec![0u8; M::ENCODED_LEN_MAX];
        let envelope = protocol::encode(message, &mut buf)
            .map_err(|error| DownlinkError::Encode { kind: M::KIND, error })?;
        let frame = self.sessions.seal(device, envelope).await?;
        let topic = topic::device_topic(device, Direction::Down, suffix);
        self.publisher.publish(topic.as_str(), frame).await?;
        if M::KIND == MessageKind::Ack {
            self.metrics.ack_sent();
        }
        Ok(())
    }

    /// What a device gets when it says hello: the desired configuration if it
    /// runs an older version, then every command still valid for it.
    pub async fn catch_up(&self, device: &DeviceId, config_version: u32) -> Result<(), DownlinkError> {
        if let Some(record) = self
            .store
            .get_device(device.clone())
            .await?
            .and_then(|d| d.desired_config)
            && record.desired.version > config_version
        {
            self.send(device, &record.desired).await?;
        }
        self.deliver_commands(device).await
    }

    /// Publishes every command still valid for `device` and records the delivery.
    pub async fn deliver_commands(&self, device: &DeviceId) -> Result<(), DownlinkError> {
        for record in self.store.commands_to_deliver(device.clone()).await? {
            let Some(command) = record.to_message(self.clock.now_ms()) else {
                continue;
            };
            self.send(device, &command).await?;
            self.store
                .mark_command_delivered(device.clone(), record.id)
                .await?;
        }
        Ok(())
    }
}
