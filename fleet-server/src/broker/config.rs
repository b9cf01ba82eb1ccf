//! Configuration of the embedded broker, and how it maps onto rumqttd's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Deserialize;

use super::{BrokerError, LINK_FILTERS};

/// Default MQTT 3.1.1 listener port: 1883 + a zero, so that a system Mosquitto on 1883
/// keeps working next to the fleet server.
pub const DEFAULT_PORT_V4: u16 = 18830;
/// Default MQTT 5 listener port, next to [`DEFAULT_PORT_V4`].
pub const DEFAULT_PORT_V5: u16 = 18831;

/// Upper bound of [`BrokerConfig::max_connections`].
pub const MAX_CONNECTIONS_LIMIT: usize = 100_000;
/// Lower bound of [`BrokerConfig::max_payload_size`]: the largest sealed frame (~1.1 KiB,
/// `docs/protocol.md`) plus its topic must always fit.
pub const MAX_PAYLOAD_SIZE_MIN: usize = 2 * 1024;
/// Upper bound of [`BrokerConfig::max_payload_size`].
pub const MAX_PAYLOAD_SIZE_LIMIT: usize = 1024 * 1024;
/// rumqttd panics (in its router thread) on a segment smaller than this.
pub const SEGMENT_SIZE_MIN: usize = 1024;
/// Upper bound of any `*_segment_size`.
pub const SEGMENT_SIZE_LIMIT: usize = 64 * 1024 * 1024;
/// Upper bound of any `*_segment_count`.
pub const SEGMENT_COUNT_LIMIT: usize = 1024;
/// Upper bound of the accounted bytes one commit log may retain
/// (`segment_size × segment_count`).
pub const LOG_BYTES_LIMIT: usize = 1024 * 1024 * 1024;
/// Upper bound of the in-process channels' capacities.
pub const CHANNEL_CAPACITY_LIMIT: usize = 1 << 20;
/// How many forwards rumqttd's router hands a QoS 0 subscriber (the in-process link) per
/// scheduling round. 200 is rumqttd's own example configuration and matches its internal
/// per-connection buffer (`MAX_CHANNEL_CAPACITY`).
pub(super) const ROUTER_BATCH: u64 = 200;

/// Settings of the embedded rumqttd broker, readable from the server's TOML configuration
/// (every field has a default; unknown fields are refused).
///
/// # Memory ceiling
///
/// rumqttd keeps, per *subscription filter* (not per client), an in-memory commit log of
/// at most `segment_count` segments; a segment is closed once its accounted size reaches
/// `segment_size`, so it can overshoot by one message. A message is accounted as
/// `4 + topic + payload` bytes. Logs are created on the first subscription to a filter
/// and never removed while the process runs, and retention is the only thing that frees
/// them, so a busy log sits at its ceiling:
///
/// * the two link filters (`wc/v1/dev/+/up/#`, `wc/v1/prov/+/up`) use `uplink_segment_*`:
///   with the defaults `2 × 32 × (256 KiB + 4 KiB)` ≈ **16.3 MiB** accounted;
/// * every other filter — in practice one `wc/v1/dev/{id}/down/#` per device — uses
///   `segment_*`: `2 × (1 KiB + 4 KiB)` = **10 KiB** accounted per filter, ≈ **98 MiB** for
///   10,000 devices.
///
/// Accounted bytes are not the resident memory: each retained message also costs one
/// `PublishData` entry in rumqttd ([`ENTRY_OVERHEAD`], ≈ 240 bytes), which
/// [`BrokerConfig::memory_estimate`] adds: with the defaults, 10,000 devices and 114-byte
/// messages (a detection on its topic) it gives ≈ 108 MiB when every log is full, and
/// ≈ 484 MiB in the worst case of clients flooding minimal publishes (the link's two logs
/// account for 49 and 234 MiB of these). Not counted: each new segment reserves room for 1,024 entries
/// (≈ 240 KiB of address space, resident only as written, allocator permitting), and
/// payloads keep slices of their connection's read buffer alive. Treat the estimate as a
/// figure to check against a measurement, not a guarantee.
///
/// # Loss budget
///
/// rumqttd acknowledges (PUBACK) a publish once it is in the commit log, whatever its
/// subscribers do: a slow consumer does **not** slow publishers down. A subscriber that
/// falls more than `(count − 1) × size` accounted bytes behind loses the oldest messages
/// (its read cursor jumps). For the link that is `31 × 256 KiB` ≈ 7.75 MiB, about 70,000
/// detections; the link counts such gaps ([`super::LinkStats::lost`]) and the trap's
/// end-to-end acknowledgements make it resend anything not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listener. Default `0.0.0.0:18830`; port 0 picks a free port (see
    /// [`super::EmbeddedBroker::listen_v4`]).
    pub listen_v4: SocketAddr,
    /// MQTT 5 listener. Default `0.0.0.0:18831`.
    pub listen_v5: SocketAddr,
    /// Most client connections at once, both listeners together (the in-process link is
    /// extra). Beyond it rumqttd closes new connections without a CONNACK. Default 10,000,
    /// at most [`MAX_CONNECTIONS_LIMIT`].
    pub max_connections: usize,
    /// Largest MQTT packet a client may send, in bytes of "remaining length" (topic,
    /// packet id, properties and payload). A bigger packet disconnects that client only.
    /// Default 4 KiB: the largest sealed frame is ~1.1 KiB.
    pub max_payload_size: usize,
    /// Time a new TCP connection has to send its CONNECT, in milliseconds (default 5,000).
    pub connection_timeout_ms: u16,
    /// Packets rumqttd reads from one connection before handing them to the router
    /// (rumqttd's `max_inflight_count`; default 100). rumqttd's outgoing QoS 1 window per
    /// connection is fixed at 100 in its source and not configurable.
    pub max_inflight_count: usize,
    /// Pause after each accepted connection, in milliseconds. rumqttd's default of 1 caps
    /// connects at ~280/s (MQTT-NOTES); default 0.
    pub next_connection_delay_ms: u64,
    /// Segment size of the link's commit logs (default 256 KiB).
    pub uplink_segment_size: usize,
    /// Segment count of the link's commit logs (default 32).
    pub uplink_segment_count: usize,
    /// Segment size of every other filter's commit log (default 1 KiB, rumqttd's minimum).
    pub segment_size: usize,
    /// Segment count of every other filter's commit log (default 2).
    pub segment_count: usize,
    /// Capacity of the channel from the link to its consumer (default 1,024 messages).
    pub link_capacity: usize,
    /// Capacity of the channel of pending downlink publishes (default 1,024).
    pub publish_capacity: usize,
    /// How long [`super::EmbeddedBroker::start`] waits for the listeners to accept
    /// connections, in milliseconds (default 5,000).
    pub ready_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Self {
            listen_v4: SocketAddr::new(any, DEFAULT_PORT_V4),
            listen_v5: SocketAddr::new(any, DEFAULT_PORT_V5),
            max_connections: 10_000,
            max_payload_size: 4 * 1024,
            connection_timeout_ms: 5_000,
            max_inflight_count: 100,
            next_connection_delay_ms: 0,
            uplink_segment_size: 256 * 1024,
            uplink_segment_count: 32,
            segment_size: 1024,
            segment_count: 2,
            link_capacity: 1024,
            publish_capacity: 1024,
            ready_timeout_ms: 5_000,
        }
    }
}

/// Estimated memory of the broker's commit logs at their ceiling; see
/// [`BrokerConfig::memory_estimate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Bytes as rumqttd accounts them (`4 + topic + payload` per message), all logs.
    pub accounted: u64,
    /// Accounted bytes plus rumqttd's per-entry overhead, assuming messages of
    /// `typical_message` accounted bytes.
    pub typical: u64,
    /// The same with the smallest message that matches each filter (an abusive client
    /// flooding tiny publishes), the worst case for entry overhead.
    pub worst: u64,
}

/// How often rumqttd reports its router meters (connection count), in seconds.
pub(super) const METER_INTERVAL_S: u64 = 1;

/// Size of one rumqttd commit-log entry besides its bytes (`PublishData`: a `Publish` of
/// 72 bytes, optional MQTT 5 properties of 144 and a timestamp of 16, on rumqttd 0.20 /
/// 64-bit), checked by the unit test `entry_overhead_matches_rumqttd`.
pub const ENTRY_OVERHEAD: u64 = 232;
/// Shortest topic matching the uplink filter (`wc/v1/dev//up`) plus rumqttd's 4 bytes.
const MIN_ENTRY_UPLINK: u64 = 4 + 13;
/// Shortest topic matching a device's downlink filter (`wc/v1/dev/x/down`) plus 4 bytes.
const MIN_ENTRY_DOWNLINK: u64 = 4 + 16;

impl BrokerConfig {
    /// A configuration listening on ephemeral ports of 127.0.0.1, for tests and tools.
    pub fn loopback_ephemeral() -> Self {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Self { listen_v4: SocketAddr::new(lo, 0), listen_v5: SocketAddr::new(lo, 0), ..Self::default() }
    }

    /// Checks every bound; rumqttd itself would panic in its router thread on some of them.
    pub fn validate(&self) -> Result<(), BrokerError> {
        in_range("max_connections", self.max_connections, 1, MAX_CONNECTIONS_LIMIT)?;
        in_range("max_payload_size", self.max_payload_size, MAX_PAYLOAD_SIZE_MIN, MAX_PAYLOAD_SIZE_LIMIT)?;
        in_range("connection_timeout_ms", usize::from(self.connection_timeout_ms), 100, usize::MAX)?;
        in_range("max_inflight_count", self.max_inflight_count, 1, 10_000)?;
        in_range("next_connection_delay_ms", self.next_connection_delay_ms as usize, 0, 1_000)?;
        validate_log("uplink_segment", self.uplink_segment_size, self.uplink_segment_count)?;
        validate_log("segment", self.segment_size, self.segment_count)?;
        in_range("link_capacity", self.link_capacity, 1, CHANNEL_CAPACITY_LIMIT)?;
        in_range("publish_capacity", self.publish_capacity, 1, CHANNEL_CAPACITY_LIMIT)?;
        in_range("ready_timeout_ms", self.ready_timeout_ms as usize, 10, 600_000)?;
        if self.listen_v4 == self.listen_v5 && self.listen_v4.port() != 0 {
            return Err(BrokerError::InvalidConfig(format!(
                "listen_v4 and listen_v5 are both {}",
                self.listen_v4
            )));
        }
        Ok(())
    }

    /// Estimated memory of all commit logs at their ceiling, given how many distinct
    /// non-link filters exist (in practice: devices ever connected since the process
    /// started, one downlink filter each) and a typical message's accounted size.
    pub fn memory_estimate(&self, other_filters: u64, typical_message: u64) -> MemoryEstimate {
        let typical_message = typical_message.max(1);
        let link = LINK_FILTERS.len() as u64;
        let (up_size, up_count) = (self.uplink_segment_size as u64, self.uplink_segment_count as u64);
        let (size, count) = (self.segment_size as u64, self.segment_count as u64);
        let max_msg = self.max_payload_size as u64;
        let accounted = link * up_count * (up_size + max_msg) + other_filters * count * (size + max_msg);
        let typical = link * log_estimate(up_size, up_count, typical_message)
            + other_filters * log_estimate(size, count, typical_message);
        let worst = link * log_worst(up_size, up_count, max_msg, MIN_ENTRY_UPLINK)
            + other_filters * log_worst(size, count, max_msg, MIN_ENTRY_DOWNLINK);
        MemoryEstimate { accounted, typical, worst }
    }

    /// The rumqttd configuration: both listeners with `auth` as their (only) credential
    /// check, router meters every [`METER_INTERVAL_S`] seconds (read by the link for the
    /// connection count), no TLS, no console, Prometheus exporter or cluster.
    pub(super) fn to_rumqttd(&self, auth: &rumqttd::AuthHandler) -> Result<rumqttd::Config, BrokerError> {
        let v4 = self.server("wildcam-v4", self.listen_v4, auth);
        let v5 = self.server("wildcam-v5", self.listen_v5, auth);
        // rumqttd's `MetricSettings` has private fields: it is built the way rumqttd reads it.
        let every = |seconds: u64| -> Result<rumqttd::MetricSettings, BrokerError> {
            toml::from_str(&format!("push_interval = {seconds}"))
                .map_err(|e| BrokerError::InvalidConfig(format!("rumqttd metric settings: {e}")))
        };
        // rumqttd 0.20's timer thread panics unless both kinds are configured. Alerts
        // (cursor jumps, which the link detects itself) are taken and dropped.
        let metrics = HashMap::from([
            (rumqttd::MetricType::Meters, every(METER_INTERVAL_S)?),
            (rumqttd::MetricType::Alerts, every(60)?),
        ]);
        Ok(rumqttd::Config {
            id: 0,
            router: self.router(),
            v4: Some(HashMap::from([(v4.name.clone(), v4)])),
            v5: Some(HashMap::from([(v5.name.clone(), v5)])),
            metrics: Some(metrics),
            ..rumqttd::Config::default()
        })
    }

    fn server(&self, name: &str, listen: SocketAddr, auth: &rumqttd::AuthHandler) -> rumqttd::ServerSettings {
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: self.connection_timeout_ms,
            max_payload_size: self.max_payload_size,
            max_inflight_count: self.max_inflight_count,
            auth: None,
            external_auth: Some(auth.clone()),
            dynamic_filters: false,
        };
        rumqttd::ServerSettings {
            name: name.to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: self.next_connection_delay_ms,
            connections,
        }
    }

    fn router(&self) -> rumqttd::RouterConfig {
        let uplink = rumqttd::SegmentConfig {
            max_segment_size: self.uplink_segment_size,
            max_segment_count: self.uplink_segment_count,
        };
        let custom = LINK_FILTERS
            .iter()
            .map(|f| ((*f).to_owned(), uplink.clone()))
            .collect();
        rumqttd::RouterConfig {
            // The in-process link is a router connection too.
            max_connections: self.max_connections + 1,
            max_outgoing_packet_count: ROUTER_BATCH,
            max_segment_size: self.segment_size,
            max_segment_count: self.segment_count,
            custom_segment: Some(custom),
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::default(),
        }
    }
}

/// One log at its ceiling filled with messages of `entry` accounted bytes: `count`
/// segments of `size / entry + 1` entries (a segment closes once it reaches `size`), each
/// entry costing its bytes plus [`ENTRY_OVERHEAD`].
fn log_estimate(size: u64, count: u64, entry: u64) -> u64 {
    let entry = entry.max(1);
    count * (size / entry + 1) * (entry + ENTRY_OVERHEAD)
}

/// The larger of a log full of the smallest possible entries and one where each segment
/// is overshot by a message of `max_msg` bytes.
fn log_worst(size: u64, count: u64, max_msg: u64, min_entry: u64) -> u64 {
    let overshoot = count * (size + max_msg + 2 * ENTRY_OVERHEAD);
    log_estimate(size, count, min_entry).max(overshoot)
}

fn validate_log(name: &str, size: usize, count: usize) -> Result<(), BrokerError> {
    in_range(&format!("{name}_size"), size, SEGMENT_SIZE_MIN, SEGMENT_SIZE_LIMIT)?;
    // One segment only would drop everything unread at each roll-over.
    in_range(&format!("{name}_count"), count, 2, SEGMENT_COUNT_LIMIT)?;
    if size.saturating_mul(count) > LOG_BYTES_LIMIT {
        return Err(BrokerError::InvalidConfig(format!(
            "{name}_size × {name}_count = {} bytes exceeds {LOG_BYTES_LIMIT}",
            size.saturating_mul(count)
        )));
    }
    Ok(())
}

pub(super) fn in_range(name: &str, value: usize, min: usize, max: usize) -> Result<(), BrokerError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(BrokerError::InvalidConfig(format!("{name} = {value} is outside {min}..={max}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_avoid_mosquitto() {
        let config = BrokerConfig::default();
        config.validate().expect("defaults must validate");
        assert_ne!(config.listen_v4.port(), 1883);
        assert_eq!(config.next_connection_delay_ms, 0);
    }

    #[test]
    fn toml_with_defaults_and_overrides() {
        let config: BrokerConfig =
            toml::from_str("listen_v4 = \"127.0.0.1:1\"\nsegment_count = 3\n").expect("valid TOML");
        assert_eq!(config.listen_v4, "127.0.0.1:1".parse().expect("address"));
        assert_eq!(config.segment_count, 3);
        assert_eq!(config.max_connections, 10_000);
        assert!(toml::from_str::<BrokerConfig>("no_such_field = 1").is_err());
    }

    #[test]
    fn bounds_are_enforced() {
        let tiny_segment = BrokerConfig { segment_size: 512, ..BrokerConfig::default() };
        assert!(tiny_segment.validate().is_err());
        let one_segment = BrokerConfig { uplink_segment_count: 1, ..BrokerConfig::default() };
        assert!(one_segment.validate().is_err());
        let huge_log = BrokerConfig {
            uplink_segment_size: 64 << 20,
            uplink_segment_count: 64,
            ..BrokerConfig::default()
        };
        assert!(huge_log.validate().is_err());
        let no_connections = BrokerConfig { max_connections: 0, ..BrokerConfig::default() };
        assert!(no_connections.validate().is_err());
    }

    #[test]
    fn entry_overhead_matches_rumqttd() {
        use rumqttd::protocol::{Publish, PublishProperties};
        let measured =
            size_of::<Publish>() + size_of::<Option<PublishProperties>>() + size_of::<std::time::Instant>();
        // Allow for padding: the constant must not underestimate by more than a few words.
        assert!(measured as u64 <= ENTRY_OVERHEAD + 16, "measured {measured}");
        assert!(measured as u64 + 64 >= ENTRY_OVERHEAD, "measured {measured}");
    }

    #[test]
    fn default_memory_estimate_for_10k_devices() {
        let estimate = BrokerConfig::default().memory_estimate(10_000, 114);
        // Accounted: link logs ≈ 16.3 MiB, device logs 10 KiB each.
        assert_eq!(estimate.accounted, 2 * 32 * (256 * 1024 + 4096) + 10_000 * 2 * (1024 + 4096));
        // The figures quoted in the docs of `BrokerConfig`.
        let mib = |bytes: u64| (bytes + (1 << 19)) >> 20;
        assert_eq!((mib(estimate.typical), mib(estimate.worst)), (108, 484));
        let link_only = BrokerConfig::default().memory_estimate(0, 114);
        assert_eq!((mib(link_only.typical), mib(link_only.worst)), (49, 234));
    }
}
