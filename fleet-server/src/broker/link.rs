//! The broker-independent side of the link: what ingest holds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::BrokerError;

/// Longest topic or filter MQTT can carry.
const TOPIC_LEN_MAX: usize = u16::MAX as usize;

/// How long [`BrokerLink::subscribe`] waits for the broker's SUBACK.
pub(super) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A message a client published on a topic the link subscribes to.
///
/// It carries no publisher identity: the broker does not pass it on (see the module
/// docs). The sender is known only once the sealed payload opens with a device's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The topic as published.
    pub topic: String,
    /// The payload, unchanged.
    pub payload: Bytes,
}

/// Counters of a link, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Messages handed to the consumer channel.
    pub delivered: u64,
    /// Messages the broker dropped before the link could read them (its retention was
    /// exceeded while the consumer was slow), detected from commit-log offsets. Only the
    /// embedded broker's link can see such losses; an external broker's own limits (e.g.
    /// Mosquitto's `max_queued_messages`) show in its log, not here.
    pub lost: u64,
    /// MQTT client connections the broker holds (devices and unclaimed traps, not the
    /// link), as last reported; `None` until the broker reports it.
    pub connections: Option<u64>,
    /// Connections to an external broker made again after a loss (either connection);
    /// always 0 with the embedded broker.
    pub reconnects: u64,
}

/// Marks [`Counters::connections`] as not reported yet.
const UNKNOWN: u64 = u64::MAX;

/// Shared counters behind [`LinkStats`].
#[derive(Debug)]
pub(super) struct Counters {
    delivered: AtomicU64,
    lost: AtomicU64,
    connections: AtomicU64,
    reconnects: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            connections: AtomicU64::new(UNKNOWN),
            reconnects: AtomicU64::new(0),
        }
    }
}

impl Counters {
    pub(super) fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn lost(&self, count: u64) {
        self.lost.fetch_add(count, Ordering::Relaxed);
    }

    pub(super) fn connections(&self, count: u64) {
        self.connections
            .store(count.min(UNKNOWN - 1), Ordering::Relaxed);
    }

    pub(super) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LinkStats {
        let connections = self.connections.load(Ordering::Relaxed);
        LinkStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            connections: (connections != UNKNOWN).then_some(connections),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }
}

/// Requests from the link's handles to its worker.
#[derive(Debug)]
pub(super) enum Command {
    /// Publish a downlink.
    Publish { topic: String, payload: Bytes },
    /// Subscribe; `done` is answered when the broker confirms.
    Subscribe { filter: String, done: oneshot::Sender<Result<(), BrokerError>> },
}

/// Subscriptions sent to the broker and not yet confirmed, in order: the broker confirms
/// one link's subscriptions in the order they were sent.
#[derive(Debug, Default)]
pub(super) struct Pending {
    queue: VecDeque<(String, oneshot::Sender<Result<(), BrokerError>>)>,
    closed: bool,
}

/// [`Pending`], shared by the link's inbound and outbound halves.
pub(super) type SharedPending = Arc<Mutex<Pending>>;

/// Queues a subscription unless the inbound half has stopped (then answers `Closed`).
pub(super) fn push_pending(
    pending: &SharedPending,
    filter: String,
    done: oneshot::Sender<Result<(), BrokerError>>,
) -> bool {
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    if pending.closed {
        let _ = done.send(Err(BrokerError::Closed));
        return false;
    }
    pending.queue.push_back((filter, done));
    true
}

/// Answers the oldest pending subscription; returns its filter if it succeeded.
pub(super) fn confirm_pending(pending: &SharedPending, accepted: bool) -> Option<String> {
    let entry = pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .queue
        .pop_front();
    let (filter, done) = entry?;
    let result =
        if accepted { Ok(()) } else { Err(BrokerError::SubscribeRefused { filter: filter.clone() }) };
    let _ = done.send(result);
    accepted.then_some(filter)
}

/// Withdraws the newest pending subscription (sending it failed).
pub(super) fn withdraw_pending(pending: &SharedPending) {
    let entry = pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .queue
        .pop_back();
    if let Some((_, done)) = entry {
        let _ = done.send(Err(BrokerError::Closed));
    }
}

/// Answers every pending subscription with `Closed` and refuses new ones.
pub(super) fn close_pending(pending: &SharedPending) {
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    pending.closed = true;
    for (_, done) in pending.queue.drain(..) {
        let _ = done.send(Err(BrokerError::Closed));
    }
}

/// A cloneable handle for downlink publishes; usable from any number of tasks.
///
/// Publishes go through a bounded queue to the link's worker, in order per handle.
/// With the embedded broker a device receives them at the QoS of its subscription
/// (QoS 1 for WildCAM devices); an external broker gets them with QoS 1.
#[derive(Debug, Clone)]
pub struct Publisher {
    commands: mpsc::Sender<Command>,
    max_payload: usize,
}

impl Publisher {
    pub(super) fn new(commands: mpsc::Sender<Command>, max_payload: usize) -> Self {
        Self { commands, max_payload }
    }

    /// Queues a publish, waiting while the queue is full.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        let command = self.command(topic.into(), payload.into())?;
        self.commands
            .send(command)
            .await
            .map_err(|_| BrokerError::Closed)
    }

    /// Queues a publish, or fails with [`BrokerError::Full`] at once if the queue is full.
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        let command = self.command(topic.into(), payload.into())?;
        self.commands
            .try_send(command)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => BrokerError::Full,
                mpsc::error::TrySendError::Closed(_) => BrokerError::Closed,
            })
    }

    fn command(&self, topic: String, payload: Bytes) -> Result<Command, BrokerError> {
        validate_topic(&topic)?;
        if payload.len() > self.max_payload {
            return Err(BrokerError::PayloadTooLarge { len: payload.len(), max: self.max_payload });
        }
        Ok(Command::Publish { topic, payload })
    }

    async fn subscribe(&self, filter: &str) -> Result<(), BrokerError> {
        validate_filter(filter)?;
        let (done, confirmed) = oneshot::channel();
        let command = Command::Subscribe { filter: filter.to_owned(), done };
        self.commands
            .send(command)
            .await
            .map_err(|_| BrokerError::Closed)?;
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => Err(BrokerError::SubscribeTimeout {
                filter: filter.to_owned(),
                waited_ms: SUBSCRIBE_TIMEOUT.as_millis() as u64,
            }),
        }
    }
}

/// Ingest's end of the broker: inbound messages and downlink publishes.
///
/// The same type serves every broker mode; only the worker behind it differs. Dropping
/// it (or every [`Publisher`] and the link) lets the worker stop.
#[derive(Debug)]
pub struct BrokerLink {
    inbound: mpsc::Receiver<Inbound>,
    publisher: Publisher,
    counters: Arc<Counters>,
}

impl BrokerLink {
    pub(super) fn new(
        inbound: mpsc::Receiver<Inbound>,
        publisher: Publisher,
        counters: Arc<Counters>,
    ) -> Self {
        Self { inbound, publisher, counters }
    }

    /// The next inbound message, in broker order (per publisher: publish order); `None`
    /// once the link is shut down.
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.inbound.recv().await
    }

    /// Receives up to `limit` messages already waiting, appending them to `buffer`
    /// without waiting; returns how many were added. Useful to build batches.
    pub fn try_recv_many(&mut self, buffer: &mut Vec<Inbound>, limit: usize) -> usize {
        let before = buffer.len();
        while buffer.len() - before < limit {
            match self.inbound.try_recv() {
                Ok(message) => buffer.push(message),
                Err(_) => break,
            }
        }
        buffer.len() - before
    }

    /// A handle for downlink publishes, cloneable into other tasks.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Shorthand for [`Publisher::publish`].
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        self.publisher.publish(topic, payload).await
    }

    /// Subscribes the link to one more filter and waits until the broker confirms it;
    /// messages published before that are not delivered. The link already subscribes to
    /// [`super::LINK_FILTERS`] before any client can connect.
    ///
    /// With an external broker the filter is subscribed in the link's shared group
    /// (`$share/{group}/{filter}`), like the link filters: each matching message reaches
    /// one server of the group, not all of them. Pass the plain filter either way.
    pub async fn subscribe(&self, filter: &str) -> Result<(), BrokerError> {
        self.publisher.subscribe(filter).await
    }

    /// Delivered, lost and reconnection counts so far, and the broker's connection count.
    pub fn stats(&self) -> LinkStats {
        self.counters.snapshot()
    }

    /// A cloneable reader of [`stats`](Self::stats) for other tasks (metrics).
    pub fn stats_reader(&self) -> LinkStatsReader {
        LinkStatsReader(self.counters.clone())
    }
}

/// Reads a link's [`LinkStats`] from anywhere.
#[derive(Debug, Clone)]
pub struct LinkStatsReader(Arc<Counters>);

impl LinkStatsReader {
    /// Delivered, lost and reconnection counts so far.
    pub fn read(&self) -> LinkStats {
        self.0.snapshot()
    }
}

/// A topic the link may publish to: non-empty, no wildcard, no `$` prefix, no NUL.
pub(super) fn validate_topic(topic: &str) -> Result<(), BrokerError> {
    let reason = if topic.is_empty() {
        Some("empty")
    } else if topic.len() > TOPIC_LEN_MAX {
        Some("longer than 65,535 bytes")
    } else if topic.contains(['+', '#']) {
        Some("contains a wildcard")
    } else if topic.starts_with('$') {
        Some("starts with '$'")
    } else if topic.contains('\0') {
        Some("contains NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BrokerError::InvalidTopic { topic: topic.to_owned(), reason }),
        None => Ok(()),
    }
}

/// A filter the link may subscribe to. rumqttd disconnects a subscriber whose filter
/// starts with `$` (other than `$share`), which would kill the link; shared subscriptions
/// make no sense for it either.
pub(super) fn validate_filter(filter: &str) -> Result<(), BrokerError> {
    let levels: Vec<&str> = filter.split('/').collect();
    let levels_ok = levels
        .iter()
        .enumerate()
        .all(|(index, level)| match *level {
            "#" => index + 1 == levels.len(),
            "+" => true,
            other => !other.contains(['+', '#']),
        });
    let reason = if filter.is_empty() {
        Some("empty")
    } else if filter.len() > TOPIC_LEN_MAX {
        Some("longer than 65,535 bytes")
    } else if filter.starts_with('$') {
        Some("starts with '$'")
    } else if filter.contains('\0') {
        Some("contains NUL")
    } else if !levels_ok {
        Some("wildcards must fill a whole level, '#' only the last one")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BrokerError::InvalidFilter { filter: filter.to_owned(), reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(validate_topic("wc/v1/dev/trap-1/down/ack").is_ok());
        for bad in ["", "a/+/b", "a/#", "$SYS/x", "a\0b"] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filters() {
        for good in ["wc/v1/dev/+/up/#", "#", "+", "a/b", "a/+/c"] {
            assert!(validate_filter(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a/#/b", "a/b#", "a+/b", "$share/g/a", "$SYS/#"] {
            assert!(validate_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn pending_subscriptions_are_answered_in_order() {
        let pending = SharedPending::default();
        let (first, first_rx) = oneshot::channel();
        let (second, second_rx) = oneshot::channel();
        assert!(push_pending(&pending, "a".into(), first));
        assert!(push_pending(&pending, "b".into(), second));
        assert_eq!(confirm_pending(&pending, true).as_deref(), Some("a"));
        assert!(first_rx.await.expect("answered").is_ok());
        close_pending(&pending);
        assert!(matches!(second_rx.await, Ok(Err(BrokerError::Closed))));
        let (third, third_rx) = oneshot::channel();
        assert!(!push_pending(&pending, "c".into(), third));
        assert!(matches!(third_rx.await, Ok(Err(BrokerError::Closed))));
    }
}
