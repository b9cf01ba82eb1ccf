//! The uplink connection's subscriptions, matched to SUBACKs by packet id (sans-IO).
//!
//! rumqttc gives a subscription its packet id only when its event loop writes it
//! (`Outgoing::Subscribe(pkid)`), in the order the requests were queued. So every
//! subscription is queued with `try_subscribe` while this table's lock is held, which
//! keeps [`Subscriptions::queued`] in the order of rumqttc's request channel; the event
//! then moves the oldest queued entry to `sent` under its packet id, and the SUBACK with
//! that id answers it.
//!
//! rumqttc does not resend a subscription after a connection loss, and forgets queued
//! ones when the broker starts a fresh session. The driver therefore takes every
//! subscription request out of rumqttc on a loss (see `external/mod.rs`) and this table
//! queues them again after the next CONNACK, together with every confirmed filter when
//! the session is not present.

use std::collections::{HashMap, VecDeque};

use tokio::sync::oneshot;

use super::super::BrokerError;

/// Who waits for a subscription's answer (nobody for a re-subscription).
pub(super) type Answer = Option<oneshot::Sender<Result<(), BrokerError>>>;

/// One subscription request.
#[derive(Debug)]
pub(super) struct Request {
    /// The filter as sent (with the `$share/{group}/` prefix).
    pub(super) filter: String,
    answer: Answer,
}

impl Request {
    fn answer(self, result: Result<(), BrokerError>) {
        if let Some(answer) = self.answer {
            let _ = answer.send(result);
        }
    }
}

/// rumqttc's request channel is full. (It also refuses when its event loop is gone, but
/// the table is closed before that happens.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QueueFull;

/// What a SUBACK meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The broker granted the filter.
    Granted(String),
    /// The broker refused the filter.
    Refused(String),
    /// No subscription waits for this packet id (one from before a connection loss).
    Unknown,
}

/// The table; see the module docs.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Filters the broker granted: subscribed again when a session is not present.
    held: Vec<String>,
    /// Queued in rumqttc, not written yet, in queue order.
    queued: VecDeque<Request>,
    /// Written, waiting for the SUBACK with this packet id.
    sent: HashMap<u16, Request>,
    /// Taken back from rumqttc after a connection loss, to queue again after the CONNACK.
    lost: Vec<Request>,
    closed: bool,
}

impl Subscriptions {
    /// Queues `filter` with `queue` (which must call rumqttc's `try_subscribe`); `answer`
    /// hears the broker's verdict, or why it was never asked.
    pub(super) fn subscribe(
        &mut self,
        filter: String,
        answer: Answer,
        queue: impl FnMut(&str) -> Result<(), QueueFull>,
    ) {
        let request = Request { filter, answer };
        if self.closed {
            request.answer(Err(BrokerError::Closed));
            return;
        }
        self.queue(request, queue);
    }

    fn queue(&mut self, request: Request, mut queue: impl FnMut(&str) -> Result<(), QueueFull>) {
        match queue(&request.filter) {
            Ok(()) => self.queued.push_back(request),
            Err(QueueFull) => {
                let filter = request.filter.clone();
                request.answer(Err(BrokerError::SubscribeQueueFull { filter }));
            }
        }
    }

    /// rumqttc wrote the oldest queued subscription with packet id `pkid`.
    pub(super) fn on_sent(&mut self, pkid: u16) {
        if let Some(request) = self.queued.pop_front() {
            self.sent.insert(pkid, request);
        } else {
            tracing::warn!(pkid, "external broker: a subscription was sent that nobody queued");
        }
    }

    /// The broker answered packet id `pkid`.
    pub(super) fn on_suback(&mut self, pkid: u16, granted: bool) -> Outcome {
        let Some(request) = self.sent.remove(&pkid) else {
            return Outcome::Unknown;
        };
        let filter = request.filter.clone();
        if granted {
            if !self.held.contains(&filter) {
                self.held.push(filter.clone());
            }
            request.answer(Ok(()));
            Outcome::Granted(filter)
        } else {
            request.answer(Err(BrokerError::SubscribeRefused { filter: filter.clone() }));
            Outcome::Refused(filter)
        }
    }

    /// The connection is gone, and with it whatever rumqttc held of the subscriptions
    /// (the caller removed them from its queues): keep them for the next CONNACK.
    pub(super) fn on_connection_lost(&mut self) {
        let mut sent: Vec<(u16, Request)> = self.sent.drain().collect();
        // Oldest first; packet ids grow until they wrap, so this is only a best effort.
        sent.sort_by_key(|(pkid, _)| *pkid);
        self.lost
            .extend(sent.into_iter().map(|(_, request)| request));
        self.lost.extend(self.queued.drain(..));
    }

    /// A CONNACK arrived: queue again what was lost, and every granted filter when the
    /// broker has no session for us (it forgot our subscriptions).
    pub(super) fn on_connected(
        &mut self,
        session_present: bool,
        mut queue: impl FnMut(&str) -> Result<(), QueueFull>,
    ) {
        let mut again: Vec<Request> = Vec::new();
        if !session_present {
            again.extend(
                self.held
                    .iter()
                    .map(|filter| Request { filter: filter.clone(), answer: None }),
            );
        }
        for request in self.lost.drain(..) {
            match again
                .iter_mut()
                .find(|queued| queued.filter == request.filter)
            {
                Some(queued) if queued.answer.is_none() => queued.answer = request.answer,
                _ => again.push(request),
            }
        }
        for request in again {
            self.queue(request, &mut queue);
        }
    }

    /// Filters granted so far.
    #[cfg(test)]
    pub(super) fn held(&self) -> &[String] {
        &self.held
    }

    /// Answers everything still waiting with [`BrokerError::Closed`] and refuses new requests.
    pub(super) fn close(&mut self) {
        self.closed = true;
        let waiting = self
            .queued
            .drain(..)
            .chain(self.sent.drain().map(|(_, r)| r))
            .chain(self.lost.drain(..));
        for request in waiting.collect::<Vec<_>>() {
            request.answer(Err(BrokerError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for rumqttc's request channel: what was queued, in order.
    #[derive(Default)]
    struct Channel {
        queued: Vec<String>,
        full: bool,
    }

    impl Channel {
        fn queue(&mut self) -> impl FnMut(&str) -> Result<(), QueueFull> + '_ {
            |filter| {
                if self.full {
                    return Err(QueueFull);
                }
                self.queued.push(filter.to_owned());
                Ok(())
            }
        }
    }

    fn waiter() -> (Answer, oneshot::Receiver<Result<(), BrokerError>>) {
        let (sender, receiver) = oneshot::channel();
        (Some(sender), receiver)
    }

    #[tokio::test]
    async fn subacks_are_matched_by_packet_id_not_order() {
        let mut table = Subscriptions::default();
        let mut channel = Channel::default();
        let (a, a_answer) = waiter();
        let (b, b_answer) = waiter();
        table.subscribe("a".into(), a, channel.queue());
        table.subscribe("b".into(), b, channel.queue());
        table.on_sent(7);
        table.on_sent(8);
        assert_eq!(table.on_suback(8, false), Outcome::Refused("b".into()));
        assert_eq!(table.on_suback(7, true), Outcome::Granted("a".into()));
        assert_eq!(table.on_suback(9, true), Outcome::Unknown);
        assert!(a_answer.await.expect("answered").is_ok());
        assert!(matches!(b_answer.await, Ok(Err(BrokerError::SubscribeRefused { .. }))));
        assert_eq!(table.held(), ["a".to_owned()]);
    }

    #[tokio::test]
    async fn a_fresh_session_subscribes_everything_again() {
        let mut table = Subscriptions::default();
        let mut channel = Channel::default();
        table.subscribe("held".into(), None, channel.queue());
        table.on_sent(1);
        table.on_suback(1, true);
        let (sent, sent_answer) = waiter();
        let (queued, queued_answer) = waiter();
        table.subscribe("sent".into(), sent, channel.queue());
        table.subscribe("queued".into(), queued, channel.queue());
        table.on_sent(2);

        table.on_connection_lost();
        let mut channel = Channel::default();
        table.on_connected(false, channel.queue());
        assert_eq!(channel.queued, ["held", "sent", "queued"]);
        for pkid in 1..=3 {
            table.on_sent(pkid);
            table.on_suback(pkid, true);
        }
        assert!(sent_answer.await.expect("answered").is_ok());
        assert!(queued_answer.await.expect("answered").is_ok());
        assert_eq!(table.held(), ["held".to_owned(), "sent".to_owned(), "queued".to_owned()]);
    }

    #[test]
    fn a_present_session_only_resends_the_unanswered() {
        let mut table = Subscriptions::default();
        let mut channel = Channel::default();
        table.subscribe("held".into(), None, channel.queue());
        table.on_sent(1);
        table.on_suback(1, true);
        table.subscribe("pending".into(), None, channel.queue());
        table.on_connection_lost();
        let mut channel = Channel::default();
        table.on_connected(true, channel.queue());
        assert_eq!(channel.queued, ["pending"]);
    }

    #[test]
    fn a_lost_request_for_a_held_filter_is_sent_once() {
        let mut table = Subscriptions::default();
        let mut channel = Channel::default();
        table.subscribe("x".into(), None, channel.queue());
        table.on_sent(1);
        table.on_suback(1, true);
        table.subscribe("x".into(), None, channel.queue());
        table.on_connection_lost();
        let mut channel = Channel::default();
        table.on_connected(false, channel.queue());
        assert_eq!(channel.queued, ["x"]);
    }

    #[tokio::test]
    async fn full_queue_and_close_answer_at_once() {
        let mut table = Subscriptions::default();
        let mut full = Channel { full: true, ..Channel::default() };
        let (refused, refused_answer) = waiter();
        table.subscribe("a".into(), refused, full.queue());
        assert!(matches!(refused_answer.await, Ok(Err(BrokerError::SubscribeQueueFull { .. }))));
        let mut channel = Channel::default();
        let (waiting, waiting_answer) = waiter();
        table.subscribe("b".into(), waiting, channel.queue());
        table.close();
        assert!(matches!(waiting_answer.await, Ok(Err(BrokerError::Closed))));
        let (late, late_answer) = waiter();
        table.subscribe("c".into(), late, channel.queue());
        assert!(matches!(late_answer.await, Ok(Err(BrokerError::Closed))));
        assert_eq!(channel.queued, ["b"]);
    }
}
