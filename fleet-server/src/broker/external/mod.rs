//! The fleet server as an MQTT 5 client of an external broker, feeding the same
//! [`BrokerLink`] as the embedded broker.
//!
//! Two connections, three tasks:
//!
//! * the **uplink** connection (`client_id`) holds a persistent session with the shared
//!   subscriptions. Its task owns the rumqttc event loop and awaits the bounded inbound
//!   channel for each uplink: while ingest is behind, the loop is not polled, no PUBACK
//!   goes out, the broker's in-flight window (`receive_maximum`) fills and it stops
//!   sending. That is real backpressure, unlike the embedded link. The task never awaits
//!   rumqttc's request channel (only its own polling drains it): acknowledgements are
//!   rumqttc's automatic ones and subscriptions are queued with `try_subscribe`, their
//!   SUBACKs matched by packet id ([`subscriptions`]).
//! * the **downlink** connection (`{client_id}-downlink`) publishes with QoS 1; its task
//!   only polls. Downlinks have their own connection because acks must keep flowing while
//!   the uplink connection is held back: ingest's reader waits for its committer, which
//!   waits for acks to go out, so acks queued behind a paused uplink loop would deadlock.
//! * the **command** task takes [`Command`]s from the link's [`Publisher`]s: publishes
//!   go to the downlink client (waiting while its queue is full), subscriptions to the
//!   uplink connection's table.
//!
//! Each connection reconnects on its own, with exponential backoff and jitter up to
//! `reconnect_delay_max_ms`, logging each loss and each reconnection; reconnections are
//! counted in [`LinkStats::reconnects`](super::LinkStats::reconnects). After a CONNACK
//! without a session the uplink subscriptions are made again.
//!
//! An uplink is acknowledged to the broker once read, before ingest commits it: as with
//! the embedded broker, the broker's PUBACK means nothing end to end, and the trap
//! resends whatever the server did not acknowledge with a sealed ack. After a
//! reconnection into a present session the broker may deliver an uplink twice; ingest's
//! replay window refuses the second copy.

mod config;
mod subscriptions;

pub use config::{
    AUTH_HOOK_SECRET_LEN_MIN, CLIENT_ID_LEN_MAX, DOWNLINK_CLIENT_SUFFIX, ExternalBrokerConfig,
    SESSION_EXPIRY_S_MAX, SHARED_GROUP_LEN_MAX,
};

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, Request};
use rumqttc::{Outgoing, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use wildcam_sdk::backoff::{Backoff, BackoffConfig};

use self::subscriptions::{Outcome, QueueFull, Subscriptions};
use super::link::{Command, Counters};
use super::{BrokerError, BrokerLink, Inbound, LINK_FILTERS, Publisher};

/// Requests (subscriptions, publishes, the final DISCONNECT) waiting in each rumqttc client.
const CLIENT_QUEUE_LEN: usize = 64;
/// Outgoing QoS 1 publishes in flight on one connection, at most (the broker's Receive
/// Maximum may lower it). rumqttc reserves a slot per possible packet id.
const OUTGOING_INFLIGHT_MAX: u16 = 100;
/// Room left in `max_packet_size` for a downlink's fixed header, topic and properties.
const DOWNLINK_PACKET_OVERHEAD: usize = 256;
/// How long a connection may take to send its DISCONNECT at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the command task spends handing queued downlinks over at shutdown (below
/// [`TASK_STOP_TIMEOUT`] minus [`DISCONNECT_TIMEOUT`]).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long shutdown waits for each task before aborting it.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The filter of `filter` in the shared-subscription group `group`.
pub fn shared_filter(group: &str, filter: &str) -> String {
    format!("$share/{group}/{filter}")
}

/// A running client of an external broker.
///
/// Dropping it (or [`ExternalBroker::shutdown`]) stops its tasks; the link's inbound
/// channel then ends and publishes fail with [`BrokerError::Closed`].
#[derive(Debug)]
pub struct ExternalBroker {
    address: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What [`ExternalBroker::connect`] waits for, reported by the connection tasks.
#[derive(Debug, Default)]
struct Progress {
    uplink_connected: bool,
    downlink_connected: bool,
    /// The reason code of a refused CONNACK.
    refused: Option<String>,
    /// The last connection error, for a timeout's message.
    last_error: Option<String>,
}

/// The uplink connection's subscription table, shared with the command task.
type Table = Arc<Mutex<Subscriptions>>;

fn lock(table: &Table) -> MutexGuard<'_, Subscriptions> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ExternalBroker {
    /// Connects to the broker `config` names and returns once both connections are up and
    /// the broker granted the shared subscriptions to [`LINK_FILTERS`], or fails: at once
    /// when the broker refuses a connection (bad credentials) or a subscription, after
    /// `connect_timeout_ms` when it cannot be reached.
    pub async fn connect(config: ExternalBrokerConfig) -> Result<(Self, BrokerLink), BrokerError> {
        config.validate()?;
        let backoff = BackoffConfig::new(config.reconnect_delay_initial_ms, config.reconnect_delay_max_ms)
            .map_err(|error| {
                BrokerError::InvalidConfig(format!("external_mqtt reconnect delays: {error}"))
            })?;
        let address = config.address();
        let (stop, stop_rx) = watch::channel(false);
        let (progress, progress_rx) = watch::channel(Progress::default());
        let counters = Arc::new(Counters::default());
        let table = Table::default();
        let transport = config.transport()?;
        let (uplink_client, uplink_loop) = client(&config, config.client_id.clone(), transport.clone());
        let (downlink_client, downlink_loop) = client(&config, config.downlink_client_id(), transport);
        let granted = subscribe_link_filters(&table, &uplink_client, &config.shared_group);
        let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_queue_len_max);
        let (commands_tx, commands_rx) = mpsc::channel(config.downlink_queue_len_max);
        let connection = |side| Connection {
            side,
            address: address.clone(),
            progress: progress.clone(),
            counters: Arc::clone(&counters),
            backoff: Backoff::new(backoff),
            connected_now: false,
            connected_once: false,
        };
        let uplink = Uplink {
            eventloop: uplink_loop,
            client: uplink_client.clone(),
            table: Arc::clone(&table),
            inbound: inbound_tx,
            connection: connection(Side::Uplink),
        };
        let downlink = Downlink {
            eventloop: downlink_loop,
            client: downlink_client.clone(),
            connection: connection(Side::Downlink),
        };
        let commands = Commands {
            commands: commands_rx,
            downlink: downlink_client,
            uplink: uplink_client,
            table,
            group: config.shared_group.clone(),
        };
        let (commands_done, commands_done_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(uplink.run(stop_rx.clone())),
            tokio::spawn(downlink.run(commands_done_rx)),
            tokio::spawn(commands.run(stop_rx, commands_done)),
        ];
        let this = Self { address, stop, tasks };
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        if let Err(error) = this.wait_ready(granted, progress_rx, timeout).await {
            this.shutdown().await;
            return Err(error);
        }
        tracing::info!(
            broker = %this.address, client_id = %config.client_id, group = %config.shared_group,
            "connected to the external MQTT broker"
        );
        let max_payload = (config.max_packet_size as usize).saturating_sub(DOWNLINK_PACKET_OVERHEAD);
        let link = BrokerLink::new(inbound_rx, Publisher::new(commands_tx, max_payload), counters);
        Ok((this, link))
    }

    /// `host:port` of the broker.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops the tasks: each connection sends DISCONNECT (keeping its session for
    /// `session_expiry_s`), the link's inbound channel ends, publishes fail with
    /// [`BrokerError::Closed`]. Bounded: a task that does not stop in time is aborted.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            match tokio::time::timeout(TASK_STOP_TIMEOUT, task).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "external broker: a link task failed"),
                Err(_) => {
                    tracing::warn!("external broker: a link task did not stop in time; aborted");
                    abort.abort();
                }
            }
        }
        tracing::info!(broker = %self.address, "external broker link shut down");
    }

    /// Waits for the subscriptions to be granted and both connections to be up, or for a
    /// refusal, at most `timeout`.
    async fn wait_ready(
        &self,
        granted: Vec<oneshot::Receiver<Result<(), BrokerError>>>,
        progress: watch::Receiver<Progress>,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let mut refusals = progress.clone();
        let mut connections = progress.clone();
        let ready = async move {
            for answer in granted {
                answer.await.map_err(|_| BrokerError::Closed)??;
            }
            connections
                .wait_for(|p| p.uplink_connected && p.downlink_connected)
                .await
                .map_err(|_| BrokerError::Closed)?;
            Ok(())
        };
        let refused = async move {
            let progress = refusals.wait_for(|p| p.refused.is_some()).await;
            progress
                .map(|p| p.refused.clone().unwrap_or_default())
                .unwrap_or_default()
        };
        let outcome = tokio::time::timeout(timeout, async {
            tokio::select! {
                ready = ready => ready,
                reason = refused => Err(BrokerError::ConnectRefused { broker: self.address.clone(), reason }),
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            Err(BrokerError::ConnectTimeout {
                broker: self.address.clone(),
                waited_ms: timeout.as_millis() as u64,
                detail: not_ready_detail(&progress.borrow()),
            })
        })
    }
}

impl Drop for ExternalBroker {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Why `connect` gave up waiting, as precisely as the tasks know.
fn not_ready_detail(progress: &Progress) -> String {
    let connected = progress.uplink_connected && progress.downlink_connected;
    match &progress.last_error {
        Some(error) if !connected => format!("last error: {error}"),
        _ if !connected => "no CONNACK from the broker".into(),
        _ => "the broker did not confirm the uplink subscriptions".into(),
    }
}

fn client(
    config: &ExternalBrokerConfig,
    client_id: String,
    transport: Transport,
) -> (AsyncClient, EventLoop) {
    let mut options = config.options(client_id, transport);
    options.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT_MAX);
    AsyncClient::new(options, CLIENT_QUEUE_LEN)
}

/// Queues the shared subscriptions to [`LINK_FILTERS`]; the receivers hear the SUBACKs.
fn subscribe_link_filters(
    table: &Table,
    client: &AsyncClient,
    group: &str,
) -> Vec<oneshot::Receiver<Result<(), BrokerError>>> {
    let mut table = lock(table);
    LINK_FILTERS
        .iter()
        .map(|filter| {
            let (answer, granted) = oneshot::channel();
            table.subscribe(shared_filter(group, filter), Some(answer), |f| try_subscribe(client, f));
            granted
        })
        .collect()
}

/// Queues a QoS 1 subscription without waiting; call with the table locked.
fn try_subscribe(client: &AsyncClient, filter: &str) -> Result<(), QueueFull> {
    client
        .try_subscribe(filter, QoS::AtLeastOnce)
        .map_err(|_| QueueFull)
}

/// Which of the two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Uplink,
    Downlink,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Uplink => "uplink",
            Side::Downlink => "downlink",
        }
    }
}

/// What both connection tasks share: reconnect pacing, logs, progress, counters.
struct Connection {
    side: Side,
    address: String,
    progress: watch::Sender<Progress>,
    counters: Arc<Counters>,
    backoff: Backoff,
    connected_now: bool,
    connected_once: bool,
}

impl Connection {
    /// A CONNACK arrived.
    fn connected(&mut self, session_present: bool) {
        let (name, broker) = (self.side.name(), self.address.as_str());
        if self.connected_once {
            self.counters.reconnected();
            tracing::info!(connection = name, broker, session_present, "external broker: reconnected");
        } else {
            tracing::debug!(connection = name, broker, session_present, "external broker: connected");
        }
        self.connected_now = true;
        self.connected_once = true;
        self.backoff.reset();
        self.progress.send_modify(|progress| match self.side {
            Side::Uplink => progress.uplink_connected = true,
            Side::Downlink => progress.downlink_connected = true,
        });
    }

    /// The connection failed or could not be made: log, report, wait before the next
    /// attempt (rumqttc reconnects on the next poll). Breaks when `stop` fires meanwhile.
    async fn lost(&mut self, error: ConnectionError, stop: &mut watch::Receiver<bool>) -> ControlFlow<()> {
        let refused = match &error {
            ConnectionError::ConnectionRefused(code) => Some(format!("{code:?}")),
            _ => None,
        };
        let message = error.to_string();
        self.progress.send_modify(|progress| {
            progress.last_error = Some(message.clone());
            if refused.is_some() {
                progress.refused.clone_from(&refused);
            }
        });
        let delay_ms = self.backoff.next_delay_ms(rand::random()).unwrap_or(1_000);
        let (name, broker) = (self.side.name(), self.address.as_str());
        if std::mem::take(&mut self.connected_now) {
            tracing::warn!(connection = name, broker, %error, delay_ms, "external broker: connection lost; reconnecting");
        } else {
            tracing::warn!(connection = name, broker, %error, delay_ms, "external broker: connection attempt failed");
        }
        tokio::select! {
            biased;
            _ = stop.changed() => ControlFlow::Break(()),
            () = tokio::time::sleep(Duration::from_millis(u64::from(delay_ms))) => ControlFlow::Continue(()),
        }
    }
}

/// Sends DISCONNECT if connected and waits (briefly) until it is written.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop, connection: &Connection) {
    if !connection.connected_now || client.try_disconnect().is_err() {
        return;
    }
    let written = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    if tokio::time::timeout(DISCONNECT_TIMEOUT, written)
        .await
        .is_err()
    {
        tracing::warn!(connection = connection.side.name(), "external broker: DISCONNECT not sent in time");
    }
}

/// The uplink connection's task: broker → inbound channel.
struct Uplink {
    eventloop: EventLoop,
    client: AsyncClient,
    table: Table,
    inbound: mpsc::Sender<Inbound>,
    connection: Connection,
}

impl Uplink {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let polled = tokio::select! {
                biased;
                _ = stop.changed() => break,
                polled = self.eventloop.poll() => polled,
            };
            let flow = match polled {
                Ok(Event::Incoming(packet)) => self.incoming(packet, &mut stop).await,
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    lock(&self.table).on_sent(pkid);
                    ControlFlow::Continue(())
                }
                Ok(Event::Outgoing(_)) => ControlFlow::Continue(()),
                Err(error) => {
                    self.take_back_subscriptions();
                    self.connection.lost(error, &mut stop).await
                }
            };
            if flow.is_break() {
                break;
            }
        }
        lock(&self.table).close();
        disconnect(&self.client, &mut self.eventloop, &self.connection).await;
        tracing::debug!("external broker: uplink task stopped");
    }

    async fn incoming(&mut self, packet: Packet, stop: &mut watch::Receiver<bool>) -> ControlFlow<()> {
        match packet {
            Packet::Publish(publish) => return self.forward(publish, stop).await,
            Packet::ConnAck(connack) => {
                self.connection.connected(connack.session_present);
                let client = &self.client;
                lock(&self.table).on_connected(connack.session_present, |f| try_subscribe(client, f));
            }
            Packet::SubAck(suback) => {
                let granted = suback
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                match lock(&self.table).on_suback(suback.pkid, granted) {
                    Outcome::Granted(filter) => tracing::debug!(filter, "external broker: subscribed"),
                    Outcome::Refused(filter) => tracing::error!(
                        filter, codes = ?suback.return_codes,
                        "external broker: subscription refused; these uplinks will not arrive"
                    ),
                    Outcome::Unknown => {}
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    /// Hands one uplink to ingest, waiting while its queue is full (the backpressure).
    async fn forward(&mut self, publish: Publish, stop: &mut watch::Receiver<bool>) -> ControlFlow<()> {
        let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
            tracing::warn!("external broker: dropped a publish with a non-UTF-8 topic");
            return ControlFlow::Continue(());
        };
        let inbound = Inbound { topic, payload: publish.payload };
        tokio::select! {
            biased;
            _ = stop.changed() => ControlFlow::Break(()),
            sent = self.inbound.send(inbound) => match sent {
                Ok(()) => {
                    self.connection.counters.delivered();
                    ControlFlow::Continue(())
                }
                Err(_) => {
                    tracing::info!("external broker: consumer dropped, uplink task stops");
                    ControlFlow::Break(())
                }
            },
        }
    }

    /// After a loss rumqttc forgets subscriptions it wrote, and may forget queued ones
    /// (fresh session) or send them (present session): take them all back, with their
    /// buffered events, so that the table queues each exactly once after the CONNACK.
    fn take_back_subscriptions(&mut self) {
        let mut table = lock(&self.table);
        // Moves whatever is still in the request channel to `pending` (the table's lock
        // keeps other tasks from queueing meanwhile).
        self.eventloop.clean();
        self.eventloop
            .pending
            .retain(|request| !matches!(request, Request::Subscribe(_)));
        self.eventloop.state.events.retain(|event| {
            !matches!(event, Event::Outgoing(Outgoing::Subscribe(_)) | Event::Incoming(Packet::SubAck(_)))
        });
        table.on_connection_lost();
    }
}

/// The downlink connection's task: only polls, so that publishes flow.
struct Downlink {
    eventloop: EventLoop,
    client: AsyncClient,
    connection: Connection,
}

impl Downlink {
    /// Runs until the command task is done (`stop` is that task's completion, so every
    /// publish it handed over is written before the DISCONNECT).
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let polled = tokio::select! {
                biased;
                _ = stop.changed() => break,
                polled = self.eventloop.poll() => polled,
            };
            let flow = match polled {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    self.connection.connected(connack.session_present);
                    ControlFlow::Continue(())
                }
                Ok(_) => ControlFlow::Continue(()),
                Err(error) => self.connection.lost(error, &mut stop).await,
            };
            if flow.is_break() {
                break;
            }
        }
        disconnect(&self.client, &mut self.eventloop, &self.connection).await;
        tracing::debug!("external broker: downlink task stopped");
    }
}

/// The command task: [`Publisher`] commands → the two clients.
struct Commands {
    commands: mpsc::Receiver<Command>,
    downlink: AsyncClient,
    uplink: AsyncClient,
    table: Table,
    group: String,
}

impl Commands {
    async fn run(mut self, mut stop: watch::Receiver<bool>, done: watch::Sender<bool>) {
        loop {
            let command = tokio::select! {
                biased;
                _ = stop.changed() => {
                    self.drain().await;
                    break;
                }
                command = self.commands.recv() => command,
            };
            let Some(command) = command else { break };
            match command {
                Command::Publish { topic, payload } => {
                    let sent = tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        sent = self.downlink.publish_bytes(topic, QoS::AtLeastOnce, false, payload) => sent,
                    };
                    if sent.is_err() {
                        tracing::error!("external broker: the downlink task is gone");
                        break;
                    }
                }
                Command::Subscribe { filter, done } => {
                    let uplink = &self.uplink;
                    let filter = shared_filter(&self.group, &filter);
                    lock(&self.table).subscribe(filter, Some(done), |f| try_subscribe(uplink, f));
                }
            }
        }
        // The downlink connection sends its DISCONNECT only now, after what was queued.
        done.send_replace(true);
        tracing::debug!("external broker: command task stopped");
    }

    /// Hands the downlink connection the publishes queued before the stop (the acks of
    /// ingest's last commit among them), for at most [`DRAIN_TIMEOUT`]; the downlink
    /// task keeps polling until this task is done, so they are written before its
    /// DISCONNECT.
    async fn drain(&mut self) {
        self.commands.close();
        let drained = async {
            while let Ok(command) = self.commands.try_recv() {
                if let Command::Publish { topic, payload } = command
                    && self
                        .downlink
                        .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                {
                    return;
                }
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!("external broker: downlinks queued at shutdown not all handed over in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_prefix_the_group() {
        assert_eq!(shared_filter("wildcam-fleet", LINK_FILTERS[0]), "$share/wildcam-fleet/wc/v1/dev/+/up/#");
        assert_eq!(shared_filter("g", LINK_FILTERS[1]), "$share/g/wc/v1/prov/+/up");
    }

    #[test]
    fn timeouts_say_what_was_missing() {
        let mut progress =
            Progress { last_error: Some("I/O: connection refused".into()), ..Progress::default() };
        assert_eq!(not_ready_detail(&progress), "last error: I/O: connection refused");
        progress.last_error = None;
        assert_eq!(not_ready_detail(&progress), "no CONNACK from the broker");
        progress.uplink_connected = true;
        progress.downlink_connected = true;
        assert!(not_ready_detail(&progress).contains("subscriptions"));
    }
}
