//! One MQTT connection of a virtual trap over rumqttc: connect, subscribe,
//! and hand the event loop to the trap, which polls it itself (no task per
//! connection, no channel: the trap's one task drives its link).

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};

/// Longest wait for a CONNACK, a SUBACK or a provisioning answer unless the scenario
/// says otherwise (`network.connect_timeout_s`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest packet a trap accepts (an OTA chunk is 1,060 bytes sealed).
const PACKET_LEN_MAX: usize = 4 * 1024;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    /// The broker.
    pub addr: SocketAddr,
    /// MQTT client id.
    pub client_id: &'a str,
    /// Username and password, if any.
    pub credentials: Option<(&'a str, &'a str)>,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Publishes in flight at the MQTT level (above the SDK's window).
    pub inflight: u16,
    /// Topic filter to subscribe to after connecting, if any.
    pub subscribe: Option<&'a str>,
    /// Longest wait for the CONNACK, and then for the SUBACK.
    pub timeout: Duration,
}

/// A connected client: publish through `client`, poll `eventloop`.
pub struct Link {
    /// Queues requests (bounded).
    pub client: AsyncClient,
    /// Must be polled for anything to move.
    pub eventloop: EventLoop,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    /// Connects, waits for the CONNACK and, if asked, subscribes and waits
    /// for the SUBACK; each within `options.timeout`.
    pub async fn connect(options: ConnectOptions<'_>) -> Result<Self, String> {
        let mut mqtt =
            MqttOptions::new(options.client_id, options.addr.ip().to_string(), options.addr.port());
        mqtt.set_keep_alive(options.keep_alive);
        mqtt.set_clean_session(true);
        mqtt.set_inflight(options.inflight.max(1));
        mqtt.set_max_packet_size(PACKET_LEN_MAX, PACKET_LEN_MAX);
        if let Some((username, password)) = options.credentials {
            mqtt.set_credentials(username, password);
        }
        // Room for the SDK's window plus hello, health and answers.
        let capacity = usize::from(options.inflight) + 16;
        let (client, mut eventloop) = AsyncClient::new(mqtt, capacity);
        let mut network = NetworkOptions::new();
        // Without it a publish written right after a PUBACK waits for the
        // broker's delayed ACK (~40 ms on Linux).
        network.set_tcp_nodelay(true);
        // rumqttc bounds the CONNACK wait *and every flush* by this (5 s by default): a
        // broker that stops reading for longer (rumqttd's warm-up at 10,000 traps) would
        // otherwise cut every busy connection (`NetworkTimeout`).
        network.set_connection_timeout(options.timeout.as_secs().max(1));
        eventloop.set_network_options(network);
        let timeout = options.timeout;
        expect(&mut eventloop, |p| matches!(p, Packet::ConnAck(_)), "connect", timeout).await?;
        if let Some(filter) = options.subscribe {
            client
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(|e| format!("subscribe: {e}"))?;
            expect(&mut eventloop, |p| matches!(p, Packet::SubAck(_)), "subscribe", timeout).await?;
        }
        Ok(Self { client, eventloop })
    }

    /// Publishes with QoS 1 without waiting; `Err` if the request queue is
    /// full or the connection is gone.
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| e.to_string())
    }

    /// Sends DISCONNECT and lets the event loop write it (bounded).
    pub async fn close(mut self) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Polls until a packet `wanted` accepts arrives.
async fn expect(
    eventloop: &mut EventLoop,
    wanted: fn(&Packet) -> bool,
    what: &str,
    timeout: Duration,
) -> Result<(), String> {
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) if wanted(&packet) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(format!("{what}: {error}")),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| format!("{what}: no answer within {} s", timeout.as_secs()))?
}
