//! The MQTT side of the fleet server: an embedded rumqttd broker, or a client of an
//! external one, and the link through which ingest receives uplinks and sends downlinks.
//!
//! The link is one type whatever the broker: a [`BrokerLink`] is a bounded channel of
//! [`Inbound`] messages plus a cloneable [`Publisher`] for downlinks, fed by background
//! workers, so ingest, provisioning and downlink do not know which mode runs.
//!
//! * [`EmbeddedBroker::start`] (the default) runs rumqttd 0.20 on its own OS threads with
//!   two listeners (MQTT 3.1.1 and MQTT 5, see [`BrokerConfig`]) and an in-process link.
//! * [`ExternalBroker::connect`] (`[external_mqtt] enabled = true`, for scale-out) connects
//!   to an external broker as an MQTT 5 client with shared subscriptions; see "External
//!   broker" below.
//!
//! [`RunningBroker`] is either, as the server holds it.
//!
//! # What rumqttd 0.20 does, read from its source and checked by `tests/broker.rs`
//!
//! * **Authentication** is connect-time only: the [`Authenticator`] is installed with
//!   `ServerSettings::set_auth_handler` on both listeners. A connection without
//!   credentials, with empty fields, or with the link's client id is refused before the
//!   authenticator is asked. A refused client gets **no CONNACK**: rumqttd closes the TCP
//!   connection (`link/remote.rs`, `handle_auth` returns an error and the socket is
//!   dropped), so a client sees "connection closed" at once, not a return code. The same
//!   happens for a zero keep-alive and when `max_connections` is reached. There is no
//!   per-topic authorization and no API to disconnect a client: every decision is made on
//!   opened (sealed) frames.
//! * **Publisher identity does not reach the link.** The router appends a publish to the
//!   commit log of each matching filter as a bare `Publish` (topic, payload, QoS, flags)
//!   plus MQTT 5 properties (`router/logs.rs`, `PublishData`); the link receives
//!   `Notification::Forward { cursor, publish, properties }`. The connection id and client
//!   id are not stored, so ingest cannot know which client published. This is why the
//!   SDK seals every frame with the device's key and binds the device id into its
//!   associated data: the id in the topic is trusted only once the frame opens.
//! * **The 200-message stall.** The router gives a subscriber at most 200 notifications,
//!   then queues `Notification::Unschedule` and pauses it until it sends `Event::Ready`.
//!   The link answers every `Unschedule` with `LinkRx::wake` (the async `ready`), after
//!   the messages before it were accepted by the consumer channel.
//! * **No backpressure to publishers.** rumqttd acknowledges a QoS 1 publish as soon as it
//!   is appended to the commit log, whatever its subscribers do. When the consumer of the
//!   link is slow, the link's worker waits on the bounded channel and stops reading from
//!   rumqttd; rumqttd keeps accepting and retaining. Retention is bounded by
//!   `segment_size × segment_count` per filter; beyond it the slow reader's cursor jumps
//!   and messages are dropped with only a warning in rumqttd's log. The link detects such
//!   jumps from the commit-log offsets it receives and counts them in
//!   [`LinkStats::lost`] (with an error log), so nothing is lost silently; the trap
//!   resends whatever the server did not acknowledge end to end. Size the uplink log for
//!   the longest stall you want to ride out ([`BrokerConfig`], "Loss budget").
//! * **Downlink QoS**: the in-process link can only publish at QoS 0, but rumqttd forwards
//!   a message at the QoS of each *subscription*: a device subscribed with QoS 1 receives
//!   downlinks with QoS 1 and must PUBACK them (at most 100 in flight per connection,
//!   fixed in rumqttd).
//! * **Port 0**: rumqttd binds inside its listener thread and reports the address only in
//!   a log line. [`EmbeddedBroker::start`] therefore resolves port 0 itself (binds
//!   `ip:0` with the standard library, reads the port, closes it) and passes the concrete
//!   port. Another process could take the port in the microseconds between; rumqttd's
//!   listener would then fail and `start` reports [`BrokerError::NotReady`]. A fixed port
//!   already in use is detected before rumqttd starts ([`BrokerError::AddrInUse`]).
//!   `start` returns once both listeners accept TCP connections; the probe connection it
//!   uses is closed at once, which rumqttd logs once per listener as an error
//!   ("Error while handling MQTT connect packet").
//! * **Shutdown**: rumqttd has no way to stop its router or listener threads.
//!   [`EmbeddedBroker::shutdown`] refuses all new connections (the auth gate closes),
//!   stops the link workers (the inbound channel then ends, downlinks already queued are
//!   handed to rumqttd first, so the acks of ingest's last commit go out) and joins
//!   them; established
//!   connections stay open and rumqttd's threads stay parked until the process exits.
//!   Those are plain detached threads, so they never keep the process from exiting, but
//!   the same port cannot be reused by a second broker within one process.
//! * **Client ids**: rumqttd disconnects an existing connection when a new one presents
//!   the same client id; the link's id ([`LINK_CLIENT_ID`]) is therefore refused to
//!   clients, and the authenticator should tie the client id to the credentials.
//! * **Filters** are never removed: each distinct subscription filter keeps its commit log
//!   until the process exits (memory: see [`BrokerConfig`]). Without per-topic ACLs an
//!   authenticated client can subscribe to many filters; that is a known limit.
//! * **Topic matching is linear, once per topic and filter pair.** The router caches the
//!   filters each topic matches (`DataLog::matches` in `router/logs.rs`): the first
//!   publish on a topic tests every filter ever subscribed, and a new filter tests every
//!   topic seen so far (`next_native_offset`). Each device adds a filter
//!   (`wc/v1/dev/{id}/down/#`) and four to six topics (hello, health, detection and ack,
//!   later configuration and commands); each claim attempt adds a filter and two topics
//!   (`wc/v1/prov/{session}/...`), never removed. So a process pays about
//!   topics × filters string matches once, ~4 N² for N devices reconnecting after a
//!   restart, ~12 N² when the same process also provisioned them: 1.2 × 10⁹ for 10,000
//!   (minutes of one core), against 3 × 10⁷ for 1,000. All of it runs on the router's
//!   single thread, which also produces every CONNACK, SUBACK, PUBACK and PINGRESP, and
//!   each listener thread waits *synchronously* for the router's answer to every new
//!   connection (`LinkBuilder::build`), stopping all of that listener's connections
//!   meanwhile. Clients that give up on a late CONNACK (or PINGRESP) and reconnect make it
//!   worse (measurements in `docs/benchmarks.md`). Once warm, the cache makes matching a
//!   hash lookup; the warm-up is rumqttd's, not configurable.
//! * **"no-connection id N is already gone"** in rumqttd's log is a second disconnect
//!   event for a connection already removed (a client's DISCONNECT, then its socket
//!   closing): thousands during a provisioning wave, harmless.
//! * **Keep-alive**: rumqttd refuses a zero keep-alive (no CONNACK, as above) and drops a
//!   client silent for 1.5 × its keep-alive; it has no upper bound to configure, so none
//!   is offered here.
//!
//! # External broker
//!
//! [`ExternalBroker::connect`] ([`ExternalBrokerConfig`]; the design in `external/mod.rs`)
//! opens two rumqttc 0.25 `v5` connections to `host:port`, plain or TLS:
//!
//! * `client_id` subscribes with QoS 1 to `$share/{group}/wc/v1/dev/+/up/#` and
//!   `$share/{group}/wc/v1/prov/+/up` ([`LINK_FILTERS`] in the group, [`shared_filter`])
//!   with `clean_start = false` and a session expiry, and subscribes again whenever a
//!   CONNACK reports no session. `connect` returns once the broker granted both, and
//!   fails at once on a refused CONNACK (bad credentials) or subscription, or after
//!   `connect_timeout_ms` with the last connection error. [`BrokerLink::subscribe`] adds
//!   a filter in the same group.
//! * Its task owns the event loop and awaits the bounded inbound channel, so a slow ingest
//!   stops the PUBACKs and, through the Receive Maximum, the broker: real backpressure.
//!   That task never awaits rumqttc's request channel: acks are automatic, subscriptions
//!   are queued with `try_subscribe` and their SUBACKs matched by packet id.
//! * `{client_id}-downlink` publishes the [`Publisher`]'s downlinks with QoS 1. It is a
//!   connection of its own so that acks keep flowing while uplinks are held back (ingest
//!   waits for its acks before reading more; behind a paused uplink loop they would
//!   deadlock).
//! * Each connection reconnects with exponential backoff and jitter, capped by
//!   `reconnect_delay_max_ms`, logging each loss and reconnection
//!   ([`LinkStats::reconnects`]). Shutdown hands the downlink connection what is queued
//!   (at most a second), then sends DISCONNECT on both (the uplink session stays for
//!   `session_expiry_s`); then `recv` returns `None`.
//!
//! Devices connect to the external broker, which must authenticate them with the
//! server's registry: the server serves `POST /mqtt/auth` for brokers with an HTTP
//! authentication backend (EMQX's format; [`crate::mqtt_auth`]).
//!
//! What this mode does and does not do (yet):
//!
//! * **Several server instances** can share the uplinks (same `shared_group`, distinct
//!   `client_id`), but each needs the same registry, sessions and replay windows: SQLite is
//!   a single-instance store, so running more than one instance needs a shared store
//!   (PostgreSQL, future work). Until then run one instance per fleet.
//! * **TLS** is rustls with the *ring* provider (`tls`, `ca_file`, optional client
//!   certificate): rumqttc's `use-rustls-no-provider` feature, because its `use-rustls`
//!   brings aws-lc-rs, whose C build costs minutes on every clean build. No other TLS
//!   option (no ALPN, no system roots without naming the bundle as `ca_file`).
//! * **No per-topic authorization** hook: the broker only authenticates; the server decides
//!   on opened frames, as with the embedded broker. A device account can still subscribe
//!   to the server's shared group and take a share of the uplinks (sealed, so unreadable,
//!   and resent by their traps when not acknowledged): restrict `$share/` subscriptions to
//!   the server's account in the broker's ACL.
//! * **Losses inside the broker are not counted**: [`LinkStats::lost`] stays 0; a broker's
//!   own limits (Mosquitto's `max_queued_messages` for a session that is away or behind)
//!   show in its log, and traps resend whatever the server did not acknowledge.
//! * **Uplinks are acknowledged once read**, before ingest commits them, so the broker
//!   forgets what the server held at a crash or shutdown; traps resend it. A stall of
//!   ingest longer than 1.5 × `keep_alive_s` makes the broker drop the uplink connection
//!   (nothing is polled, so no PINGREQ goes out); it reconnects into its session and the
//!   broker redelivers, which ingest's replay windows deduplicate.
//! * **rumqttd as the external broker** is only good for tests: rumqttd 0.20 keeps a shared
//!   group's state per share name, not per share name and filter as MQTT 5 says, so once
//!   both filters of one group carry traffic one filter's read cursor is applied to the
//!   other's log and messages are lost (`tests/external.rs` shows the split on rumqttd with
//!   device uplinks only, and with both kinds on Mosquitto).

mod auth;
mod config;
mod embedded;
mod external;
mod link;
mod running;

pub use auth::Authenticator;
pub use config::{
    BrokerConfig, DEFAULT_PORT_V4, DEFAULT_PORT_V5, ENTRY_OVERHEAD, MAX_CONNECTIONS_LIMIT,
    MAX_PAYLOAD_SIZE_LIMIT, MAX_PAYLOAD_SIZE_MIN, MemoryEstimate, SEGMENT_SIZE_MIN,
};
pub use embedded::EmbeddedBroker;
pub use external::{
    AUTH_HOOK_SECRET_LEN_MIN, CLIENT_ID_LEN_MAX, DOWNLINK_CLIENT_SUFFIX, ExternalBroker,
    ExternalBrokerConfig, SESSION_EXPIRY_S_MAX, SHARED_GROUP_LEN_MAX, shared_filter,
};
pub use link::{BrokerLink, Inbound, LinkStats, LinkStatsReader, Publisher};
pub use running::RunningBroker;

use std::io;
use std::net::SocketAddr;

/// Client id of the in-process link; refused to network clients.
pub const LINK_CLIENT_ID: &str = "wildcam-ingest";

/// Topic the embedded link publishes to (and subscribes to, dropping what it reads) once
/// per meter interval. rumqttd reports its router meters, which carry the connection
/// count, only for an interval with at least one publish; this keeps the count fresh on
/// an idle fleet. A device publishing here is ignored. Never leaves the process.
pub const HEARTBEAT_TOPIC: &str = "wc/v1/srv/heartbeat";

/// Filters the link subscribes to before the listeners open: every device uplink and
/// every provisioning request (`docs/protocol.md`).
pub const LINK_FILTERS: [&str; 2] = ["wc/v1/dev/+/up/#", "wc/v1/prov/+/up"];

/// Everything that can go wrong starting or using the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A configuration value is out of its documented bounds.
    #[error("invalid broker configuration: {0}")]
    InvalidConfig(String),
    /// Another socket already listens on this address.
    #[error("cannot listen on {addr}: address already in use")]
    AddrInUse {
        /// The configured address.
        addr: SocketAddr,
    },
    /// The address cannot be bound for another reason (not local, permission...).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// rumqttd's listener did not accept connections in time (its thread failed: see
    /// rumqttd's log, e.g. the port was taken after it was checked).
    #[error("MQTT listener {addr} did not accept connections within {waited_ms} ms (see rumqttd's log)")]
    NotReady {
        /// The listener's address.
        addr: SocketAddr,
        /// How long `start` waited.
        waited_ms: u64,
    },
    /// A thread or its runtime could not be created.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was being started.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// rumqttd refused or dropped the in-process link.
    #[error("in-process broker link failed: {0}")]
    Link(String),
    /// The link is shut down (or its worker stopped): nothing more can be sent or received.
    #[error("broker link is closed")]
    Closed,
    /// The downlink queue is full (only from [`Publisher::try_publish`]).
    #[error("downlink queue is full")]
    Full,
    /// The external broker answered a CONNECT with an error code (bad credentials, not
    /// authorized, banned...).
    #[error(
        "external MQTT broker {broker} refused the connection: {reason} \
         (check external_mqtt.username and password, and the broker's access rules)"
    )]
    ConnectRefused {
        /// `host:port`.
        broker: String,
        /// The CONNACK reason code.
        reason: String,
    },
    /// The external broker could not be reached, or did not grant the subscriptions, in time.
    #[error("external MQTT broker {broker} not ready within {waited_ms} ms: {detail}")]
    ConnectTimeout {
        /// `host:port`.
        broker: String,
        /// How long `connect` waited.
        waited_ms: u64,
        /// What was missing, with the last connection error if any.
        detail: String,
    },
    /// The MQTT client's request queue is full (only with an external broker).
    #[error("subscription to {filter:?} not queued: the MQTT client's request queue is full")]
    SubscribeQueueFull {
        /// The filter.
        filter: String,
    },
    /// A subscription was not confirmed in time.
    #[error("subscription to {filter:?} not confirmed within {waited_ms} ms")]
    SubscribeTimeout {
        /// The filter.
        filter: String,
        /// How long the caller waited.
        waited_ms: u64,
    },
    /// The broker refused a subscription.
    #[error("subscription to {filter:?} refused by the broker")]
    SubscribeRefused {
        /// The filter.
        filter: String,
    },
    /// Not a topic one may publish to.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a topic filter the link may subscribe to.
    #[error("invalid topic filter {filter:?}: {reason}")]
    InvalidFilter {
        /// The filter.
        filter: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A downlink payload larger than devices accept.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The configured `max_payload_size`.
        max: usize,
    },
}
