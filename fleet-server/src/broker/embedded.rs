//! rumqttd inside the fleet server, and the in-process link that feeds [`BrokerLink`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::meters::MetersLink;
use rumqttd::protocol::{Packet, SubscribeReasonCode};
use rumqttd::{Forward, Meter, Notification};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

use super::auth::AuthGate;
use super::config::METER_INTERVAL_S;
use super::link::{
    Command, Counters, SharedPending, close_pending, confirm_pending, push_pending, withdraw_pending,
};
use super::{
    Authenticator, BrokerConfig, BrokerError, BrokerLink, HEARTBEAT_TOPIC, Inbound, LINK_CLIENT_ID,
    LINK_FILTERS, Publisher,
};

/// Pause between two readiness probes of a listener.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// The running embedded broker.
///
/// Dropping it (or [`EmbeddedBroker::shutdown`]) refuses new connections and stops the
/// link; rumqttd's own threads cannot be stopped and end with the process (module docs).
#[derive(Debug)]
pub struct EmbeddedBroker {
    listen_v4: SocketAddr,
    listen_v5: SocketAddr,
    gate: Arc<AuthGate>,
    stop: watch::Sender<bool>,
    link_thread: Option<JoinHandle<()>>,
    broker_thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts rumqttd with `config`, admitting clients that `authenticator` accepts, and
    /// returns once the link is subscribed to [`LINK_FILTERS`] and both listeners accept
    /// connections (at most `ready_timeout_ms`).
    pub async fn start(
        config: BrokerConfig,
        authenticator: impl Authenticator,
    ) -> Result<(Self, BrokerLink), BrokerError> {
        config.validate()?;
        let (listen_v4, reserved_v4) = reserve(config.listen_v4)?;
        let (listen_v5, reserved_v5) = reserve(config.listen_v5)?;
        let config = BrokerConfig { listen_v4, listen_v5, ..config };
        let gate = AuthGate::new(authenticator);
        let broker = rumqttd::Broker::new(config.to_rumqttd(&gate.handler())?);
        let (link_tx, link_rx) = broker
            .link(LINK_CLIENT_ID)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let meters = broker
            .meters()
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let (stop, stop_rx) = watch::channel(false);
        let (link, link_thread) = spawn_link(link_tx, link_rx, meters, &config, stop_rx)?;
        let mut this =
            Self { listen_v4, listen_v5, gate, stop, link_thread: Some(link_thread), broker_thread: None };
        for filter in LINK_FILTERS.into_iter().chain([HEARTBEAT_TOPIC]) {
            link.subscribe(filter).await?;
        }
        drop((reserved_v4, reserved_v5));
        this.broker_thread = Some(spawn_broker(broker)?);
        let timeout = Duration::from_millis(config.ready_timeout_ms);
        for addr in [listen_v4, listen_v5] {
            this.wait_listening(addr, timeout).await?;
        }
        tracing::info!(v4 = %listen_v4, v5 = %listen_v5, "embedded MQTT broker listening");
        Ok((this, link))
    }

    /// The MQTT 3.1.1 listener's address, with the actual port when 0 was configured.
    pub fn listen_v4(&self) -> SocketAddr {
        self.listen_v4
    }

    /// The MQTT 5 listener's address, with the actual port when 0 was configured.
    pub fn listen_v5(&self) -> SocketAddr {
        self.listen_v5
    }

    /// `false` once rumqttd's listener threads have all ended (they only end on error).
    pub fn is_running(&self) -> bool {
        self.broker_thread
            .as_ref()
            .is_some_and(|thread| !thread.is_finished())
    }

    /// Refuses new connections, stops the link (its inbound channel ends, publishes fail
    /// with [`BrokerError::Closed`]) and waits for the link's worker thread, which takes
    /// milliseconds. Established client connections stay open until the process exits.
    pub fn shutdown(mut self) {
        self.signal_stop();
        if let Some(thread) = self.link_thread.take()
            && thread.join().is_err()
        {
            tracing::error!("broker link worker panicked");
        }
        tracing::info!("embedded MQTT broker shut down (rumqttd threads stay parked until exit)");
    }

    fn signal_stop(&self) {
        self.gate.close();
        self.stop.send_replace(true);
    }

    /// Waits until `addr` accepts a TCP connection, failing early if rumqttd's thread ended.
    async fn wait_listening(&self, addr: SocketAddr, timeout: Duration) -> Result<(), BrokerError> {
        let target = connectable(addr);
        let started = Instant::now();
        loop {
            let remaining = timeout.saturating_sub(started.elapsed());
            if let Ok(Ok(_probe)) = tokio::time::timeout(remaining, TcpStream::connect(target)).await {
                return Ok(());
            }
            if !self.is_running() || started.elapsed() >= timeout {
                return Err(BrokerError::NotReady { addr, waited_ms: timeout.as_millis() as u64 });
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// Resolves port 0 to a free port (holding it open until rumqttd binds) and checks that
/// a fixed port is free the way rumqttd will bind it (tokio, `SO_REUSEADDR`).
fn reserve(addr: SocketAddr) -> Result<(SocketAddr, Option<TcpListener>), BrokerError> {
    if addr.port() == 0 {
        let listener = TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
        let bound = listener.local_addr().map_err(|e| bind_error(addr, e))?;
        return Ok((bound, Some(listener)));
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| bind_error(addr, e))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| bind_error(addr, e))?;
    socket.bind(addr).map_err(|e| bind_error(addr, e))?;
    Ok((addr, None))
}

fn bind_error(addr: SocketAddr, source: io::Error) -> BrokerError {
    if source.kind() == io::ErrorKind::AddrInUse {
        BrokerError::AddrInUse { addr }
    } else {
        BrokerError::Bind { addr, source }
    }
}

/// Where to connect to reach a listener bound to `addr` (loopback for a wildcard address).
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Runs `Broker::start`, which spawns one thread per listener and blocks joining them.
fn spawn_broker(mut broker: rumqttd::Broker) -> Result<JoinHandle<()>, BrokerError> {
    let run = move || match broker.start() {
        Ok(()) => tracing::error!("rumqttd listeners stopped"),
        Err(error) => tracing::error!(%error, "rumqttd failed to start"),
    };
    thread::Builder::new()
        .name("wildcam-rumqttd".into())
        .spawn(run)
        .map_err(|source| BrokerError::Spawn { what: "rumqttd thread", source })
}

/// Starts the link's worker thread: a single-threaded runtime running the inbound and
/// outbound halves and the meter reader side by side.
fn spawn_link(
    link_tx: LinkTx,
    link_rx: LinkRx,
    meters: MetersLink,
    config: &BrokerConfig,
    stop: watch::Receiver<bool>,
) -> Result<(BrokerLink, JoinHandle<()>), BrokerError> {
    let (inbound_tx, inbound_rx) = mpsc::channel(config.link_capacity);
    let (commands_tx, commands_rx) = mpsc::channel(config.publish_capacity);
    let counters = Arc::new(Counters::default());
    let pending = SharedPending::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|source| BrokerError::Spawn { what: "link runtime", source })?;
    let inward = Inward {
        rx: link_rx,
        tx: inbound_tx,
        counters: Arc::clone(&counters),
        pending: Arc::clone(&pending),
        offsets: OffsetTracker::default(),
    };
    let outward = Outward { tx: link_tx, commands: commands_rx, pending, heartbeat_subscribed: false };
    let meter = read_meters(meters, Arc::clone(&counters), stop.clone());
    let work = async move {
        tokio::join!(inward.run(stop.clone()), outward.run(stop), meter);
    };
    let thread = thread::Builder::new()
        .name("wildcam-mqtt-link".into())
        .spawn(move || runtime.block_on(work))
        .map_err(|source| BrokerError::Spawn { what: "link thread", source })?;
    let link = BrokerLink::new(inbound_rx, Publisher::new(commands_tx, config.max_payload_size), counters);
    Ok((link, thread))
}

/// The inbound half: rumqttd notifications → consumer channel.
struct Inward {
    rx: LinkRx,
    tx: mpsc::Sender<Inbound>,
    counters: Arc<Counters>,
    pending: SharedPending,
    offsets: OffsetTracker,
}

impl Inward {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.changed() => break,
                next = self.rx.next() => next,
            };
            let flow = match next {
                Ok(Some(notification)) => self.handle(notification, &mut stop).await,
                Ok(None) => ControlFlow::Continue(()),
                Err(error) => {
                    tracing::error!(%error, "broker link: rumqttd's router is gone");
                    ControlFlow::Break(())
                }
            };
            if flow.is_break() {
                break;
            }
        }
        close_pending(&self.pending);
        tracing::debug!("broker link: inbound half stopped");
    }

    async fn handle(
        &mut self,
        notification: Notification,
        stop: &mut watch::Receiver<bool>,
    ) -> ControlFlow<()> {
        match notification {
            Notification::Forward(forward) => self.forward(forward, stop).await,
            // The router paused us after a full batch: everything before this marker has
            // been accepted by the consumer channel, so ask for the next batch.
            Notification::Unschedule => self
                .rx
                .wake()
                .await
                .map_or_else(link_gone, |()| ControlFlow::Continue(())),
            Notification::DeviceAck(ack) => {
                if let Packet::SubAck(suback, _) = Packet::from(ack) {
                    let accepted = suback.return_codes.iter().all(subscription_granted);
                    if let Some(filter) = confirm_pending(&self.pending, accepted) {
                        self.offsets.track(filter);
                    }
                }
                ControlFlow::Continue(())
            }
            Notification::Disconnect(disconnect, _) => {
                tracing::error!(?disconnect, "broker link: disconnected by rumqttd");
                ControlFlow::Break(())
            }
            other => {
                tracing::debug!(notification = ?other, "broker link: ignored notification");
                ControlFlow::Continue(())
            }
        }
    }

    async fn forward(&mut self, forward: Forward, stop: &mut watch::Receiver<bool>) -> ControlFlow<()> {
        let Forward { cursor, publish, .. } = forward;
        let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
            // rumqttd checks topics are UTF-8 before storing them; never expected.
            tracing::warn!("broker link: dropped a publish with a non-UTF-8 topic");
            return ControlFlow::Continue(());
        };
        if let Some((_, offset)) = cursor {
            self.count_gap(&topic, offset);
        }
        if topic == HEARTBEAT_TOPIC {
            return ControlFlow::Continue(());
        }
        let inbound = Inbound { topic, payload: publish.payload };
        tokio::select! {
            biased;
            _ = stop.changed() => ControlFlow::Break(()),
            sent = self.tx.send(inbound) => match sent {
                Ok(()) => {
                    self.counters.delivered();
                    ControlFlow::Continue(())
                }
                Err(_) => {
                    tracing::info!("broker link: consumer dropped, inbound half stops");
                    ControlFlow::Break(())
                }
            },
        }
    }

    fn count_gap(&mut self, topic: &str, offset: u64) {
        let skipped = self.offsets.observe(topic, offset);
        if skipped > 0 {
            self.counters.lost(skipped);
            tracing::error!(
                skipped,
                topic,
                "broker link: rumqttd dropped messages the consumer had not read yet \
                 (retention exceeded); traps will resend what was not acknowledged"
            );
        }
    }
}

fn subscription_granted(code: &SubscribeReasonCode) -> bool {
    matches!(
        code,
        SubscribeReasonCode::QoS0
            | SubscribeReasonCode::QoS1
            | SubscribeReasonCode::QoS2
            | SubscribeReasonCode::Success(_)
    )
}

fn link_gone(error: LinkError) -> ControlFlow<()> {
    tracing::error!(%error, "broker link: rumqttd's router is gone");
    ControlFlow::Break(())
}

/// The outbound half: [`Command`]s → rumqttd. `LinkTx` calls block while the router's
/// queue (1,000 events) is full; the router never waits on the link, so that is brief.
struct Outward {
    tx: LinkTx,
    commands: mpsc::Receiver<Command>,
    pending: SharedPending,
    /// The subscription to [`HEARTBEAT_TOPIC`] went to the router (before any heartbeat).
    heartbeat_subscribed: bool,
}

impl Outward {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(METER_INTERVAL_S));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = tokio::select! {
                biased;
                _ = stop.changed() => {
                    self.drain();
                    break;
                }
                command = self.commands.recv() => command,
                // Only once the link subscribes to it: rumqttd disconnects a client that
                // publishes to a topic no filter matches.
                _ = heartbeat.tick(), if self.heartbeat_subscribed => Some(Command::Publish {
                    topic: HEARTBEAT_TOPIC.to_owned(),
                    payload: bytes::Bytes::from_static(b"1"),
                }),
            };
            let Some(command) = command else { break };
            if let Err(error) = self.execute(command) {
                tracing::error!(%error, "broker link: rumqttd's router is gone");
                break;
            }
        }
        tracing::debug!("broker link: outbound half stopped");
    }

    /// Hands rumqttd the publishes queued before the stop (the acks of ingest's last
    /// commit among them); the queue is bounded, so this is brief.
    fn drain(&mut self) {
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Publish { .. } = command
                && self.execute(command).is_err()
            {
                break;
            }
        }
    }

    /// Hands one command to rumqttd; fails only when its router is gone.
    fn execute(&mut self, command: Command) -> Result<(), BrokerError> {
        let sent = match command {
            Command::Publish { topic, payload } => self.tx.publish(topic, payload).map(drop),
            Command::Subscribe { filter, done } => {
                if !push_pending(&self.pending, filter.clone(), done) {
                    return Ok(());
                }
                let heartbeat = filter == HEARTBEAT_TOPIC;
                let sent = self
                    .tx
                    .subscribe(filter)
                    .map(drop)
                    .inspect_err(|_| withdraw_pending(&self.pending));
                self.heartbeat_subscribed |= heartbeat && sent.is_ok();
                sent
            }
        };
        sent.map_err(|error| BrokerError::Link(error.to_string()))
    }
}

/// Reads rumqttd's router meters into the link's connection count until `stop`.
async fn read_meters(meters: MetersLink, counters: Arc<Counters>, mut stop: watch::Receiver<bool>) {
    loop {
        let batch = tokio::select! {
            biased;
            _ = stop.changed() => break,
            batch = meters.next() => batch,
        };
        let Ok(batch) = batch else {
            tracing::warn!("broker link: rumqttd's meters stopped; connection count frozen");
            break;
        };
        for meter in batch {
            if let Meter::Router(_, router) = meter {
                // The in-process link is one of the router's connections.
                counters.connections(router.total_connections.saturating_sub(1) as u64);
            }
        }
    }
}

/// Follows the commit-log offset of each subscribed filter to detect messages rumqttd
/// dropped before the link read them. Offsets of one filter's log are consecutive, so a
/// jump is a loss. A topic matching several of the link's filters arrives once per
/// filter with unrelated offsets; such topics are not followed.
#[derive(Debug, Default)]
struct OffsetTracker {
    filters: Vec<(String, Option<u64>)>,
}

impl OffsetTracker {
    fn track(&mut self, filter: String) {
        if !self.filters.iter().any(|(known, _)| *known == filter) {
            self.filters.push((filter, None));
        }
    }

    /// Records `offset` for the filter `topic` matches; returns how many were skipped.
    fn observe(&mut self, topic: &str, offset: u64) -> u64 {
        let mut matching = self
            .filters
            .iter_mut()
            .filter(|(filter, _)| rumqttd::protocol::matches(topic, filter));
        let (Some((_, last)), None) = (matching.next(), matching.next()) else {
            return 0;
        };
        let skipped = match *last {
            Some(previous) if offset > previous + 1 => offset - previous - 1,
            _ => 0,
        };
        *last = Some(offset);
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_gaps_are_counted_per_filter() {
        let mut tracker = OffsetTracker::default();
        tracker.track("a/+".into());
        tracker.track("b/#".into());
        assert_eq!(tracker.observe("a/1", 0), 0);
        assert_eq!(tracker.observe("a/2", 1), 0);
        assert_eq!(tracker.observe("b/x", 7), 0);
        assert_eq!(tracker.observe("a/3", 5), 3);
        assert_eq!(tracker.observe("b/x", 8), 0);
        assert_eq!(tracker.observe("c", 100), 0);
    }

    #[test]
    fn overlapping_filters_are_not_followed() {
        let mut tracker = OffsetTracker::default();
        tracker.track("a/#".into());
        tracker.track("a/+".into());
        assert_eq!(tracker.observe("a/1", 0), 0);
        assert_eq!(tracker.observe("a/1", 9), 0);
    }

    #[test]
    fn wildcard_listen_addresses_are_probed_on_loopback() {
        let any: SocketAddr = "0.0.0.0:18830".parse().expect("address");
        assert_eq!(connectable(any), "127.0.0.1:18830".parse().expect("address"));
        let lo: SocketAddr = "127.0.0.2:1".parse().expect("address");
        assert_eq!(connectable(lo), lo);
    }
}
