//! The MQTT side of the fleet server: an embedded rumqttd broker and the in-process link
//! through which ingest receives uplinks and sends downlinks.
//!
//! [`EmbeddedBroker::start`] runs rumqttd 0.20 on its own OS threads with two listeners
//! (MQTT 3.1.1 and MQTT 5, see [`BrokerConfig`]) and returns a [`BrokerLink`]. The link
//! is one type whatever the broker: it is a bounded channel of [`Inbound`] messages plus a
//! cloneable [`Publisher`] for downlinks, fed by background workers. The external-broker
//! mode of a scale-out deployment (MQTT 5 shared subscriptions on a cluster) is to produce
//! the same `BrokerLink` from an MQTT client, so ingest will not change for it; it is
//! not written yet (see "Next step" below).
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
//!   stops the link workers (the inbound channel then ends) and joins them; established
//!   connections stay open and rumqttd's threads stay parked until the process exits.
//!   Those are plain detached threads, so they never keep the process from exiting, but
//!   the same port cannot be reused by a second broker within one process.
//! * **Client ids**: rumqttd disconnects an existing connection when a new one presents
//!   the same client id; the link's id ([`LINK_CLIENT_ID`]) is therefore refused to
//!   clients, and the authenticator should tie the client id to the credentials.
//! * **Filters** are never removed: each distinct subscription filter keeps its commit log
//!   until the process exits (memory: see [`BrokerConfig`]). Without per-topic ACLs an
//!   authenticated client can subscribe to many filters; that is a known limit.
//! * **Keep-alive**: rumqttd refuses a zero keep-alive (no CONNACK, as above) and drops a
//!   client silent for 1.5 × its keep-alive; it has no upper bound to configure, so none
//!   is offered here.
//!
//! # Next step: external broker (not written)
//!
//! For scale-out, `connect_external(ExternalBrokerConfig { host, port, client_id,
//! username, password, shared_group })` is to return the same [`BrokerLink`], driven by a
//! `rumqttc::v5` client instead of the in-process link:
//!
//! * subscribe QoS 1 to `$share/{group}/wc/v1/dev/+/up/#` and `$share/{group}/wc/v1/prov/+/up`
//!   with `clean_start = false` and a session expiry, and subscribe again whenever a
//!   CONNACK reports `session_present = false`;
//! * one task owns the event loop and awaits the bounded [`Inbound`] channel: while it
//!   waits the loop is not polled, so the broker's inflight window fills and it stops
//!   sending — real TCP backpressure, unlike rumqttd's in-process link;
//! * that task must never await the client's request channel (`ack`, `subscribe`) because
//!   only its own polling drains it: keep rumqttc's automatic PUBACK (a message is then
//!   acknowledged once read, and the trap's end-to-end acknowledgement covers a crash),
//!   issue subscriptions with `try_subscribe` and match SUBACKs by packet id;
//! * downlinks from [`Publisher`] commands go out with QoS 1 from a second task;
//! * `rumqttc` moves from dev-dependencies to dependencies, with `use-rustls` for any real
//!   deployment;
//! * it can be tested against this embedded broker, which implements `$share/` groups
//!   (round robin).

mod auth;
mod config;
mod embedded;
mod link;

pub use auth::Authenticator;
pub use config::{
    BrokerConfig, DEFAULT_PORT_V4, DEFAULT_PORT_V5, ENTRY_OVERHEAD, MAX_CONNECTIONS_LIMIT,
    MAX_PAYLOAD_SIZE_LIMIT, MAX_PAYLOAD_SIZE_MIN, MemoryEstimate, SEGMENT_SIZE_MIN,
};
pub use embedded::EmbeddedBroker;
pub use link::{BrokerLink, Inbound, LinkStats, LinkStatsReader, Publisher};

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
