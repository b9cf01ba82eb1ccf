//! The broker a server runs with, whichever the mode: what [`crate::Server`] holds.

use std::net::SocketAddr;

use super::{
    Authenticator, BrokerConfig, BrokerError, BrokerLink, EmbeddedBroker, ExternalBroker,
    ExternalBrokerConfig,
};

/// The embedded rumqttd broker, or the client of an external one.
#[derive(Debug)]
pub enum RunningBroker {
    /// rumqttd in this process ([`EmbeddedBroker`]); devices connect to its listeners.
    Embedded(EmbeddedBroker),
    /// A client of an external broker ([`ExternalBroker`]); devices connect to that broker.
    External(ExternalBroker),
}

impl RunningBroker {
    /// Connects to the external broker when `external.enabled`, else starts the embedded
    /// one with `embedded` and `authenticator` (an external broker authenticates devices
    /// itself, e.g. through the server's `POST /mqtt/auth` hook).
    pub async fn start(
        embedded: BrokerConfig,
        external: ExternalBrokerConfig,
        authenticator: impl Authenticator,
    ) -> Result<(Self, BrokerLink), BrokerError> {
        if external.enabled {
            if embedded != BrokerConfig::default() {
                tracing::warn!("external_mqtt.enabled: the [mqtt] settings (embedded broker) are not used");
            }
            let (broker, link) = ExternalBroker::connect(external).await?;
            Ok((Self::External(broker), link))
        } else {
            let (broker, link) = EmbeddedBroker::start(embedded, authenticator).await?;
            Ok((Self::Embedded(broker), link))
        }
    }

    /// The embedded MQTT 3.1.1 listener; `None` with an external broker.
    pub fn listen_v4(&self) -> Option<SocketAddr> {
        match self {
            Self::Embedded(broker) => Some(broker.listen_v4()),
            Self::External(_) => None,
        }
    }

    /// The embedded MQTT 5 listener; `None` with an external broker.
    pub fn listen_v5(&self) -> Option<SocketAddr> {
        match self {
            Self::Embedded(broker) => Some(broker.listen_v5()),
            Self::External(_) => None,
        }
    }

    /// Where devices connect with MQTT 3.1.1 and with MQTT 5, as `host:port`: the embedded
    /// listeners, or the external broker's address for both (brokers such as Mosquitto
    /// and EMQX serve both versions on one port).
    pub fn device_endpoints(&self) -> (String, String) {
        match self {
            Self::Embedded(broker) => (broker.listen_v4().to_string(), broker.listen_v5().to_string()),
            Self::External(broker) => (broker.address().to_owned(), broker.address().to_owned()),
        }
    }

    /// Stops the broker or the client; see [`EmbeddedBroker::shutdown`] and
    /// [`ExternalBroker::shutdown`].
    pub async fn shutdown(self) {
        match self {
            Self::Embedded(broker) => broker.shutdown(),
            Self::External(broker) => broker.shutdown().await,
        }
    }
}
