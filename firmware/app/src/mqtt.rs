//! A thin layer over rust-mqtt (MQTT v5): connect with credentials, subscribe,
//! publish at QoS 1, and receive events as owned values. rust-mqtt leaves
//! reconnects, keep-alive and timeouts to its user; `session.rs` does them.
//!
//! Received packets are decoded into a bump buffer that must be reset after
//! each one: [`Mqtt::next_event`] copies what the app needs (topic, payload)
//! out of the packet, drops it, and only then resets the buffer.

use core::num::NonZero;

use embassy_time::{Duration, with_timeout};
use rust_mqtt::Bytes;
use rust_mqtt::buffer::BumpBuffer;
use rust_mqtt::client::event::Event;
use rust_mqtt::client::options::{
    ConnectOptions, DisconnectOptions, PublicationOptions, SubscriptionOptions, TopicReference,
};
use rust_mqtt::client::{Client, MqttError};
use rust_mqtt::config::KeepAlive;
use rust_mqtt::header::FixedHeader;
use rust_mqtt::io::Transport;
use rust_mqtt::types::{MqttBinary, MqttString, TopicFilter, TopicName};
use wildcam_sdk::topic::Topic;

/// Keep-alive announced to the broker, seconds.
pub const KEEP_ALIVE_S: u16 = 60;
/// Largest packet the trap accepts: the largest sealed downlink (an OTA
/// chunk, 1,060 bytes) plus topic and MQTT headers, with room to spare.
pub const PACKET_LEN_MAX: usize = 1_536;
/// The receive buffer rust-mqtt decodes each packet into.
pub const BUMP_LEN: usize = 2 * PACKET_LEN_MAX;
/// Unacknowledged QoS 1 publishes the trap keeps in flight (MQTT PUBACKs).
pub const SEND_MAX: usize = 16;
/// QoS 1 publishes the broker may have in flight towards the trap.
pub const RECEIVE_MAX: usize = 8;
/// Longest wait for a CONNACK, SUBACK or a write.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The rust-mqtt client as the trap configures it.
pub type MqttClient<'c, N> = Client<'c, 'c, N, BumpBuffer<'c>, 1, RECEIVE_MAX, SEND_MAX, 1, 2, 0, 0>;

/// Why an MQTT operation failed. The connection is unusable afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkError {
    /// No IP configuration, DNS failure, TCP refused or reset.
    Network,
    /// No answer in time.
    Timeout,
    /// The broker refused the connection or disconnected us.
    Refused,
    /// The broker broke the protocol, or a packet was too large.
    Protocol,
    /// A topic or credential does not fit MQTT's encoding.
    Encoding,
}

impl core::fmt::Display for LinkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Network => "network error",
            Self::Timeout => "no answer in time",
            Self::Refused => "refused by the broker",
            Self::Protocol => "MQTT protocol error",
            Self::Encoding => "value does not fit MQTT's encoding",
        })
    }
}

fn link_error<const N: usize>(error: &MqttError<'_, N>) -> LinkError {
    log::debug!("mqtt error: {error:?}");
    match error {
        MqttError::Network(_) => LinkError::Network,
        MqttError::Disconnect { .. } => LinkError::Refused,
        _ => LinkError::Protocol,
    }
}

/// An event, owned: nothing in it borrows the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A publish; its payload was copied to the start of the caller's buffer.
    Publish {
        /// The topic.
        topic: Topic,
        /// Payload length.
        len: usize,
    },
    /// A SUBACK.
    Subscribed,
    /// A PUBACK: the broker took the publish with this packet identifier.
    Acknowledged(u16),
    /// Anything else (PUBACK, PINGRESP, ...).
    Other,
}

/// One connected client.
pub struct Mqtt<'c, N: Transport> {
    client: MqttClient<'c, N>,
}

impl<N: Transport> core::fmt::Debug for Mqtt<'_, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mqtt").finish_non_exhaustive()
    }
}

/// Who connects.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    /// MQTT client id.
    pub client_id: &'a str,
    /// User name.
    pub user: &'a str,
    /// Password.
    pub password: &'a str,
}

impl<'c, N: Transport> Mqtt<'c, N> {
    /// Connects over `transport` (a connected TCP socket) with a clean start.
    pub async fn connect(
        bump: &'c mut BumpBuffer<'c>,
        transport: N,
        login: Login<'_>,
    ) -> Result<Self, LinkError> {
        let mut client = MqttClient::new(bump);
        let user = MqttString::try_from(login.user).map_err(|_| LinkError::Encoding)?;
        let password = MqttBinary::try_from(login.password).map_err(|_| LinkError::Encoding)?;
        let client_id = MqttString::try_from(login.client_id).map_err(|_| LinkError::Encoding)?;
        let keep_alive = NonZero::new(KEEP_ALIVE_S).map_or(KeepAlive::Infinite, KeepAlive::Seconds);
        let packet_max = NonZero::new(PACKET_LEN_MAX as u32).ok_or(LinkError::Encoding)?;
        let options = ConnectOptions::new()
            .clean_start()
            .keep_alive(keep_alive)
            .maximum_packet_size(packet_max)
            .user_name(user)
            .password(password);
        let connected =
            with_timeout(ANSWER_TIMEOUT, client.connect(transport, &options, Some(client_id))).await;
        let result = match connected {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(link_error(&error)),
            Err(_) => Err(LinkError::Timeout),
        };
        let mut mqtt = Self { client };
        mqtt.reset_buffer();
        result.map(|()| mqtt)
    }

    /// Subscribes at QoS 1 (the SUBACK arrives as [`Incoming::Subscribed`]).
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), LinkError> {
        let filter = MqttString::try_from(filter).map_err(|_| LinkError::Encoding)?;
        let filter = TopicFilter::new(filter).ok_or(LinkError::Encoding)?;
        let options = SubscriptionOptions::new().at_least_once();
        let sent = with_timeout(ANSWER_TIMEOUT, self.client.subscribe(filter, &options)).await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(link_error(&error)),
            Err(_) => Err(LinkError::Timeout),
        }
    }

    /// QoS 1 publishes sent and not yet acknowledged by the broker (at most
    /// [`SEND_MAX`]).
    pub fn in_flight(&self) -> usize {
        usize::from(self.client.session().active_outbound_publishes())
    }

    /// Publishes `payload` on `topic` at QoS 1; returns its packet
    /// identifier (its PUBACK arrives as [`Incoming::Acknowledged`]).
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<u16, LinkError> {
        let topic = MqttString::try_from(topic).map_err(|_| LinkError::Encoding)?;
        let topic = TopicName::new(topic).ok_or(LinkError::Encoding)?;
        let options = PublicationOptions::new(TopicReference::Name(topic)).at_least_once();
        let sent = with_timeout(ANSWER_TIMEOUT, self.client.publish(&options, Bytes::from(payload))).await;
        match sent {
            Ok(Ok(packet)) => Ok(packet.map_or(0, |id| id.get().get())),
            Ok(Err(error)) => Err(link_error(&error)),
            Err(_) => Err(LinkError::Timeout),
        }
    }

    /// Sends a PINGREQ (keep-alive).
    pub async fn ping(&mut self) -> Result<(), LinkError> {
        match with_timeout(ANSWER_TIMEOUT, self.client.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(link_error(&error)),
            Err(_) => Err(LinkError::Timeout),
        }
    }

    /// Waits for the next packet's header. Cancel-safe: use it in a `select`.
    pub async fn wait_header(&mut self) -> Result<FixedHeader, LinkError> {
        self.client
            .poll_header()
            .await
            .map_err(|error| link_error(&error))
    }

    /// Reads the body of the packet `header` announced; a publish's payload
    /// goes to the start of `payload` (refused if longer).
    pub async fn next_event(
        &mut self,
        header: FixedHeader,
        payload: &mut [u8],
    ) -> Result<Incoming, LinkError> {
        let result = match with_timeout(ANSWER_TIMEOUT, self.client.poll_body(header)).await {
            Err(_) => Err(LinkError::Timeout),
            Ok(Err(error)) => Err(link_error(&error)),
            Ok(Ok(event)) => own_event(event, payload),
        };
        // Every value borrowing the buffer is gone: `own_event` consumed it.
        self.reset_buffer();
        result
    }

    /// Says goodbye (best effort) and closes.
    pub async fn disconnect(mut self) {
        let _ = with_timeout(ANSWER_TIMEOUT, self.client.disconnect(&DisconnectOptions::new())).await;
    }

    /// Makes the whole receive buffer available for the next packet.
    fn reset_buffer(&mut self) {
        // SAFETY: rust-mqtt hands out slices of the bump buffer only inside
        // the values `connect` and `poll_body` return. Both are consumed
        // (`connect`'s result is dropped, `own_event` copies what it needs and
        // drops the event) before this is called, so no slice of the buffer
        // is alive when it is reused.
        #[allow(unsafe_code)]
        unsafe {
            self.client.buffer_mut().reset();
        }
    }
}

/// Copies what the app needs out of an event, dropping it.
fn own_event<const S: usize, const P: usize>(
    event: Event<'_, S, P>,
    payload: &mut [u8],
) -> Result<Incoming, LinkError> {
    match event {
        Event::Publish(publish) => {
            let Some(name) = publish.topic.name() else {
                return Err(LinkError::Protocol); // Topic aliases are not enabled.
            };
            let topic = Topic::try_from(name.as_ref().as_str()).map_err(|_| LinkError::Protocol)?;
            let message: &[u8] = &publish.message;
            let target = payload
                .get_mut(..message.len())
                .ok_or(LinkError::Protocol)?;
            target.copy_from_slice(message);
            Ok(Incoming::Publish { topic, len: message.len() })
        }
        Event::Suback(_) => Ok(Incoming::Subscribed),
        Event::PublishAcknowledged(puback) => {
            Ok(Incoming::Acknowledged(puback.packet_identifier.get().get()))
        }
        _ => Ok(Incoming::Other),
    }
}
