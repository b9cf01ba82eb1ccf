//! The network loop: claim the trap if it has no credentials, then connect
//! as itself, say hello, send health and queued detections, and answer what
//! the server sends (acks, configuration, commands, OTA offers and chunks).
//! Reconnects with jittered backoff; under [`Connectivity::CheckIn`] it
//! sleeps between check-ins.
//!
//! # OTA
//!
//! Chunks arrive as ordinary downlinks, one at a time: each one accepted is
//! answered with the next request, and queued detections go out between
//! them, so a download never starves the queue. A request unanswered for
//! [`OTA_REQUEST_TIMEOUT`] is sent again, at most [`OTA_REQUEST_RETRIES`]
//! times; then the connection is dropped and the usual backoff applies
//! (the next connection asks again from the same offset). A result counts
//! as delivered once the broker acknowledges its publish.

use core::convert::Infallible;
use core::fmt;

use embassy_futures::select::{Either, Either3, select, select3};
use embassy_net::tcp::TcpSocket;
use embassy_net::{IpAddress, IpEndpoint, Stack};
use embassy_time::{Duration, Instant, Timer, with_timeout};
use rust_mqtt::buffer::BumpBuffer;
use rust_mqtt::io::Transport;
use wildcam_sdk::backoff::{Backoff, BackoffConfig};
use wildcam_sdk::ota::OtaSlot;
use wildcam_sdk::protocol::{ProvisionDown, ProvisionUp, Trigger, Uplink};
use wildcam_sdk::provision::{ClaimRejectReason, ClaimToken};
use wildcam_sdk::queue::QueueStore;
use wildcam_sdk::seal::SEAL_OVERHEAD;
use wildcam_sdk::topic::{self, Direction, Topic};

use crate::error::TrapError;
use crate::hardware::{BatteryGauge, Clock, Entropy};
use crate::mqtt::{self, Incoming, LinkError, Login, Mqtt};
use crate::ota::{BootControl, Ota, OtaStep, SELF_TEST_TIMEOUT};
use crate::schedule::{self, Connectivity};
use crate::shared::Shared;
use crate::storage::{StateStore, StoredCredentials};

/// The MQTT user unclaimed traps connect as.
pub const PROVISION_USER: &str = "provision";
/// The fleet server's MQTT 5 listener port.
pub const DEFAULT_MQTT5_PORT: u16 = 18831;
/// Resend everything unacknowledged when no ack came for this long.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for each provisioning answer.
pub const CLAIM_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a requested OTA chunk before asking again.
pub const OTA_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Times an unanswered chunk request is sent again before the connection is
/// dropped (and retried with backoff).
pub const OTA_REQUEST_RETRIES: u8 = 3;
/// Free MQTT in-flight slots kept for hello, health and replies.
const RESERVED_PUBLISH_SLOTS: usize = 4;
/// TCP buffer sizes, each way.
const TCP_BUFFER_LEN: usize = 2_048;
/// Longest sealed uplink frame.
const FRAME_LEN_MAX: usize = Uplink::ENCODED_LEN_MAX + SEAL_OVERHEAD;

/// How the trap reaches its fleet server: given at flash time (never in the
/// repository) or provisioned over serial.
#[derive(Debug, Clone, Copy)]
pub struct NetworkSettings<'a> {
    /// Host name or IPv4 address of the fleet server's broker.
    pub server_host: &'a str,
    /// Its MQTT 5 port.
    pub server_port: u16,
    /// Password of the shared `provision` account (unclaimed traps only).
    pub provision_password: &'a str,
    /// The claim token `{id}.{secret}`; `None` when the identity is on the
    /// server's allow-list.
    pub claim_token: Option<&'a str>,
    /// The fleet server's identity key to pin while claiming.
    pub server_key: Option<[u8; 32]>,
    /// Always connected, or check-ins.
    pub connectivity: Connectivity,
}

/// Why a connection ended with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The network or the broker failed.
    Link(LinkError),
    /// The trap's own state failed.
    Trap(TrapError),
    /// The server refused the claim (unauthenticated: retried later).
    ClaimRejected(ClaimRejectReason),
    /// The claim token given at flash time does not parse.
    ClaimTokenInvalid,
    /// The server's host name did not resolve.
    Resolve,
    /// OTA chunk requests went unanswered.
    OtaStalled,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Link(error) => write!(f, "{error}"),
            Self::Trap(error) => write!(f, "{error}"),
            Self::ClaimRejected(reason) => write!(f, "claim rejected: {reason}"),
            Self::ClaimTokenInvalid => f.write_str("the claim token is malformed"),
            Self::Resolve => f.write_str("the server's name did not resolve"),
            Self::OtaStalled => f.write_str("OTA chunk requests went unanswered"),
        }
    }
}

impl From<LinkError> for SessionError {
    fn from(error: LinkError) -> Self {
        Self::Link(error)
    }
}

impl From<TrapError> for SessionError {
    fn from(error: TrapError) -> Self {
        Self::Trap(error)
    }
}

/// How a connection ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Claimed: connect again as the device.
    Claimed,
    /// Check-in done: sleep.
    Idle,
    /// A command asked for a restart, or the boot slot changed.
    Restart,
}

/// What one connection needs, allocated once.
struct Buffers {
    tcp_rx: [u8; TCP_BUFFER_LEN],
    tcp_tx: [u8; TCP_BUFFER_LEN],
    bump: [u8; mqtt::BUMP_LEN],
    payload: [u8; mqtt::PACKET_LEN_MAX],
    frame: [u8; FRAME_LEN_MAX],
}

/// The network hardware the loop owns.
#[derive(Debug)]
pub struct NetworkHardware<E, B, O> {
    /// Randomness for claims and backoff jitter.
    pub entropy: E,
    /// The bootloader interface; restarts the chip on a reboot command.
    pub boot: B,
    /// The inactive firmware slot updates are written to.
    pub slot: O,
}

/// Connects, serves and reconnects forever.
pub async fn network_loop<Q, S, G, C, E, B, O>(
    shared: &Shared<Q, S, G, C>,
    stack: Stack<'_>,
    settings: &NetworkSettings<'_>,
    hardware: &mut NetworkHardware<E, B, O>,
) -> Infallible
where
    Q: QueueStore,
    S: StateStore,
    G: BatteryGauge,
    C: Clock,
    E: Entropy,
    B: BootControl,
    O: OtaSlot,
{
    let NetworkHardware { entropy, boot, slot } = hardware;
    let (mut ota, started) = Ota::start(&mut shared.trap.borrow_mut(), boot, slot);
    if started.restart {
        ota.restart();
    }
    let self_test_due = ota
        .awaiting_self_test()
        .then(|| Instant::now() + SELF_TEST_TIMEOUT);
    let mut buffers = Buffers {
        tcp_rx: [0; TCP_BUFFER_LEN],
        tcp_tx: [0; TCP_BUFFER_LEN],
        bump: [0; mqtt::BUMP_LEN],
        payload: [0; mqtt::PACKET_LEN_MAX],
        frame: [0; FRAME_LEN_MAX],
    };
    let mut backoff = Backoff::new(BackoffConfig::new(1_000, 60_000).unwrap_or_default());
    stack.wait_config_up().await;
    if let Some(config) = stack.config_v4() {
        log::info!("network up: address {}", config.address);
    }
    loop {
        if ota.awaiting_self_test() && self_test_due.is_some_and(|due| Instant::now() >= due) {
            let _ = ota.self_test_timed_out(&mut shared.trap.borrow_mut());
            ota.restart();
        }
        match connect_once(shared, stack, settings, entropy, &mut ota, &mut buffers).await {
            Ok(Ended::Claimed) => backoff.reset(),
            Ok(Ended::Idle) => {
                backoff.reset();
                sleep_until_due(shared, settings.connectivity).await;
            }
            Ok(Ended::Restart) => ota.restart(),
            Err(error) => {
                let delay_ms = backoff.next_delay_ms(entropy.next_u32()).unwrap_or(60_000);
                log::warn!("connection to the fleet server failed: {error}; retrying in {delay_ms} ms");
                let mut wake = Instant::now() + Duration::from_millis(u64::from(delay_ms));
                if ota.awaiting_self_test()
                    && let Some(due) = self_test_due
                {
                    wake = wake.min(due);
                }
                Timer::at(wake).await;
            }
        }
    }
}

/// Between check-ins: sleep until the next one, or until queued detections
/// have waited their upload delay.
async fn sleep_until_due<Q: QueueStore, S: StateStore, G, C>(
    shared: &Shared<Q, S, G, C>,
    connectivity: Connectivity,
) {
    let Connectivity::CheckIn { upload_delay_s, .. } = connectivity else {
        return;
    };
    let went_idle = Instant::now();
    let mut first_waiting: Option<Instant> = None;
    loop {
        let (config, queue_len) = {
            let trap = shared.trap.borrow();
            (trap.config().clone(), trap.queue_stats().len)
        };
        if queue_len > 0 {
            first_waiting.get_or_insert_with(Instant::now);
        }
        let seconds = |since: Instant| u32::try_from(since.elapsed().as_secs()).unwrap_or(u32::MAX);
        let plan =
            schedule::sleep_plan(&config, upload_delay_s, seconds(went_idle), first_waiting.map(seconds));
        log::info!("sleeping up to {} s before the next check-in", plan.sleep_s());
        let wake = Timer::after_secs(u64::from(plan.sleep_s()));
        match select(wake, shared.detection_queued.wait()).await {
            Either::First(()) => return,
            Either::Second(()) => continue, // Re-plan: the upload may now be due.
        }
    }
}

async fn connect_once<Q, S, G, C, E, B, O>(
    shared: &Shared<Q, S, G, C>,
    stack: Stack<'_>,
    settings: &NetworkSettings<'_>,
    entropy: &mut E,
    ota: &mut Ota<'_, B, O>,
    buffers: &mut Buffers,
) -> Result<Ended, SessionError>
where
    Q: QueueStore,
    S: StateStore,
    G: BatteryGauge,
    C: Clock,
    E: Entropy,
    B: BootControl,
    O: OtaSlot,
{
    stack.wait_config_up().await;
    let endpoint = IpEndpoint::new(resolve(stack, settings.server_host).await?, settings.server_port);
    let mut socket = TcpSocket::new(stack, &mut buffers.tcp_rx, &mut buffers.tcp_tx);
    socket.set_timeout(Some(Duration::from_secs(u64::from(mqtt::KEEP_ALIVE_S) * 2)));
    match with_timeout(mqtt::ANSWER_TIMEOUT, socket.connect(endpoint)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(LinkError::Network.into()),
        Err(_) => return Err(LinkError::Timeout.into()),
    }
    let mut bump = BumpBuffer::new(&mut buffers.bump);
    let credentials = shared.trap.borrow().credentials().cloned();
    match credentials {
        None => claim(shared, socket, &mut bump, settings, entropy, &mut buffers.payload).await,
        Some(credentials) => {
            let connection = Connection { shared, settings, credentials: &credentials };
            connection
                .serve(socket, &mut bump, ota, &mut buffers.payload, &mut buffers.frame)
                .await
        }
    }
}

/// The server's address: an IPv4 literal, or a DNS lookup.
async fn resolve(stack: Stack<'_>, host: &str) -> Result<IpAddress, SessionError> {
    if let Ok(address) = host.parse() {
        return Ok(IpAddress::Ipv4(address));
    }
    let addresses = stack
        .dns_query(host, embassy_net::dns::DnsQueryType::A)
        .await
        .map_err(|_| SessionError::Resolve)?;
    addresses.first().copied().ok_or(SessionError::Resolve)
}

/// Waits for the SUBACK; anything else arriving first is dropped (nothing
/// else is subscribed yet).
async fn wait_subscribed<N: Transport>(
    mqtt: &mut Mqtt<'_, N>,
    payload: &mut [u8],
) -> Result<(), SessionError> {
    let wait = async {
        loop {
            let header = mqtt.wait_header().await?;
            if mqtt.next_event(header, payload).await? == Incoming::Subscribed {
                return Ok::<(), LinkError>(());
            }
        }
    };
    match with_timeout(mqtt::ANSWER_TIMEOUT, wait).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LinkError::Timeout.into()),
    }
}

// ---------------------------------------------------------------- claiming

async fn claim<'c, Q, S, G, C, E, N>(
    shared: &Shared<Q, S, G, C>,
    transport: N,
    bump: &'c mut BumpBuffer<'c>,
    settings: &NetworkSettings<'_>,
    entropy: &mut E,
    payload: &mut [u8],
) -> Result<Ended, SessionError>
where
    Q: QueueStore,
    S: StateStore,
    E: Entropy,
    N: Transport,
{
    let token = settings
        .claim_token
        .map(ClaimToken::parse)
        .transpose()
        .map_err(|_| SessionError::ClaimTokenInvalid)?;
    let mut provisioner = shared
        .trap
        .borrow()
        .provisioner(token, settings.server_key, entropy);
    let session = provisioner.session();
    let mut client_id = heapless::String::<32>::new();
    // Cannot fail: 10 + 16 characters.
    let _ = client_id.push_str("unclaimed-");
    let _ = client_id.push_str(session.as_str());
    let login = Login { client_id: &client_id, user: PROVISION_USER, password: settings.provision_password };
    let mut mqtt = Mqtt::connect(bump, transport, login).await?;
    let down = topic::provision_topic(&session, Direction::Down);
    let up = topic::provision_topic(&session, Direction::Up);
    mqtt.subscribe(&down).await?;
    wait_subscribed(&mut mqtt, payload).await?;
    log::info!("claiming with provisioning session {}", session.as_str());

    publish_provision(&mut mqtt, &up, &ProvisionUp::ClaimRequest(provisioner.request())).await?;
    let ProvisionDown::ClaimChallenge(challenge) = provision_answer(&mut mqtt, &down, payload).await? else {
        return Err(LinkError::Protocol.into());
    };
    let proof = provisioner
        .on_challenge(&challenge)
        .map_err(TrapError::from)?;
    publish_provision(&mut mqtt, &up, &ProvisionUp::ClaimProof(proof)).await?;
    let ProvisionDown::Credentials(mut sealed) = provision_answer(&mut mqtt, &down, payload).await? else {
        return Err(LinkError::Protocol.into());
    };
    let provisioned = provisioner
        .on_credentials(&mut sealed.frame)
        .map_err(TrapError::from)?;
    log::info!("claimed as device id {}", provisioned.device_id);
    shared.trap.borrow_mut().complete_claim(provisioned)?;
    mqtt.disconnect().await;
    Ok(Ended::Claimed)
}

async fn publish_provision<N: Transport>(
    mqtt: &mut Mqtt<'_, N>,
    up: &Topic,
    message: &ProvisionUp,
) -> Result<(), SessionError> {
    let mut buf = [0u8; ProvisionUp::ENCODED_LEN_MAX];
    let encoded = message.encode(&mut buf).map_err(TrapError::from)?;
    mqtt.publish(up, encoded).await?;
    Ok(())
}

/// The next message on the provisioning session's downlink; a rejection ends the claim.
async fn provision_answer<N: Transport>(
    mqtt: &mut Mqtt<'_, N>,
    down: &Topic,
    payload: &mut [u8],
) -> Result<ProvisionDown, SessionError> {
    let wait = async {
        loop {
            let header = mqtt.wait_header().await?;
            let Incoming::Publish { topic, len } = mqtt.next_event(header, payload).await? else {
                continue;
            };
            if topic != *down {
                continue;
            }
            match ProvisionDown::decode(payload.get(..len).unwrap_or_default()) {
                Ok(ProvisionDown::ClaimRejected(rejected)) => {
                    return Err(SessionError::ClaimRejected(rejected.reason));
                }
                Ok(message) => return Ok(message),
                Err(error) => log::warn!("ignored an undecodable provisioning answer: {error}"),
            }
        }
    };
    match with_timeout(CLAIM_ANSWER_TIMEOUT, wait).await {
        Ok(result) => result,
        Err(_) => Err(LinkError::Timeout.into()),
    }
}

// ---------------------------------------------------------------- serving

/// One connection of a claimed trap.
struct Connection<'a, Q: QueueStore, S: StateStore, G, C> {
    shared: &'a Shared<Q, S, G, C>,
    settings: &'a NetworkSettings<'a>,
    credentials: &'a StoredCredentials,
}

/// Deadlines of a connection.
struct Timers {
    /// Last packet sent: a PINGREQ is due half a keep-alive later.
    last_sent: Instant,
    /// The next health report.
    next_health: Instant,
    /// When unacknowledged detections are resent.
    ack_due: Option<Instant>,
    /// Under check-ins: stay connected at least until then.
    linger_until: Option<Instant>,
    /// When an unanswered OTA chunk request is sent again.
    ota_due: Option<Instant>,
    /// Chunk requests sent again since the last chunk.
    ota_retries: u8,
    /// Packet identifier of the published OTA result awaiting its PUBACK.
    ota_result_packet: Option<u16>,
}

impl Timers {
    fn next_deadline(&self) -> Instant {
        let ping = self.last_sent + Duration::from_secs(u64::from(mqtt::KEEP_ALIVE_S) / 2);
        let mut deadline = ping.min(self.next_health);
        for candidate in [self.ack_due, self.linger_until, self.ota_due]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(candidate);
        }
        deadline
    }
}

impl<Q, S, G, C> Connection<'_, Q, S, G, C>
where
    Q: QueueStore,
    S: StateStore,
    G: BatteryGauge,
    C: Clock,
{
    async fn serve<'c, N: Transport, B: BootControl, O: OtaSlot>(
        &self,
        transport: N,
        bump: &'c mut BumpBuffer<'c>,
        ota: &mut Ota<'_, B, O>,
        payload: &mut [u8],
        frame: &mut [u8],
    ) -> Result<Ended, SessionError> {
        let id = self.credentials.device_id.as_str();
        let login = Login { client_id: id, user: id, password: self.credentials.mqtt_password.as_str() };
        let mut mqtt = Mqtt::connect(bump, transport, login).await?;
        mqtt.subscribe(&topic::device_downlink_filter(&self.credentials.device_id))
            .await?;
        wait_subscribed(&mut mqtt, payload).await?;
        let hello = self.shared.trap.borrow_mut().on_connected()?;
        self.publish(&mut mqtt, &Uplink::Hello(hello), frame)
            .await?;
        self.publish_health(&mut mqtt, frame).await?;
        log::info!("connected to the fleet server as {id}");
        self.shared.connected.signal(());
        let now = Instant::now();
        let mut timers = Timers {
            last_sent: now,
            next_health: now + self.checkin_interval(),
            ack_due: None,
            linger_until: match self.settings.connectivity {
                Connectivity::AlwaysOn => None,
                Connectivity::CheckIn { linger_s, .. } => {
                    Some(now + Duration::from_secs(u64::from(linger_s)))
                }
            },
            ota_due: None,
            ota_retries: 0,
            ota_result_packet: None,
        };
        // A confirmation's result goes out with the connection's own OTA
        // messages below; a failure restarts into the previous image.
        let self_test = ota.on_server_reached(&mut self.shared.trap.borrow_mut())?;
        if self_test.restart {
            mqtt.disconnect().await;
            return Ok(Ended::Restart);
        }
        let connected = ota.on_connected();
        self.send_ota(&mut mqtt, connected, frame, &mut timers)
            .await?;
        loop {
            self.push_detections(&mut mqtt, frame, &mut timers).await?;
            if self.check_in_done(&timers, ota) {
                log::info!("check-in done: disconnecting");
                mqtt.disconnect().await;
                return Ok(Ended::Idle);
            }
            let event = select3(
                mqtt.wait_header(),
                self.shared.detection_queued.wait(),
                Timer::at(timers.next_deadline()),
            )
            .await;
            match event {
                Either3::First(header) => match mqtt.next_event(header?, payload).await? {
                    Incoming::Publish { topic, len } => {
                        let message = payload.get_mut(..len).unwrap_or_default();
                        if self
                            .on_publish(&mut mqtt, &topic, message, frame, ota, &mut timers)
                            .await?
                        {
                            mqtt.disconnect().await;
                            return Ok(Ended::Restart);
                        }
                    }
                    Incoming::Acknowledged(packet) if timers.ota_result_packet == Some(packet) => {
                        timers.ota_result_packet = None;
                        ota.result_delivered(&mut self.shared.trap.borrow_mut())?;
                    }
                    _ => {}
                },
                Either3::Second(()) => {}
                Either3::Third(()) => self.on_deadline(&mut mqtt, frame, ota, &mut timers).await?,
            }
        }
    }

    fn checkin_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.shared.trap.borrow().config().checkin_interval_s))
    }

    /// Under check-ins: everything acknowledged, no download under way, and
    /// the linger time over.
    fn check_in_done<B, O>(&self, timers: &Timers, ota: &Ota<'_, B, O>) -> bool
    where
        B: BootControl,
        O: OtaSlot,
    {
        let Some(linger_until) = timers.linger_until else {
            return false;
        };
        Instant::now() >= linger_until
            && self.shared.trap.borrow().queue_stats().len == 0
            && timers.ota_due.is_none()
            && timers.ota_result_packet.is_none()
            && ota.chunk_request().is_none()
    }

    /// Seals and publishes `message`; returns its packet identifier.
    async fn publish<N: Transport>(
        &self,
        mqtt: &mut Mqtt<'_, N>,
        message: &Uplink,
        frame: &mut [u8],
    ) -> Result<u16, SessionError> {
        let sealed = self.shared.trap.borrow_mut().seal(message, frame)?;
        let topic = topic::device_topic(&self.credentials.device_id, Direction::Up, sealed.suffix);
        Ok(mqtt
            .publish(&topic, frame.get(..sealed.len).unwrap_or_default())
            .await?)
    }

    /// Publishes what an OTA step says and arms the request timer; `true`
    /// when the trap must restart (the boot slot changed).
    async fn send_ota<N: Transport>(
        &self,
        mqtt: &mut Mqtt<'_, N>,
        step: OtaStep,
        frame: &mut [u8],
        timers: &mut Timers,
    ) -> Result<bool, SessionError> {
        if let Some(result) = step.result {
            let packet = self
                .publish(mqtt, &Uplink::OtaResult(result), frame)
                .await?;
            timers.ota_result_packet = Some(packet);
        }
        if let Some(progress) = step.progress {
            self.publish(mqtt, &Uplink::OtaProgress(progress), frame)
                .await?;
        }
        // Without a new request the timer stays: it lapses harmlessly once
        // nothing is wanted any more.
        if let Some(request) = step.request {
            self.publish(mqtt, &Uplink::OtaChunkRequest(request), frame)
                .await?;
            timers.ota_due = Some(Instant::now() + OTA_REQUEST_TIMEOUT);
        }
        if !step.is_empty() {
            timers.last_sent = Instant::now();
        }
        Ok(step.restart)
    }

    async fn publish_health<N: Transport>(
        &self,
        mqtt: &mut Mqtt<'_, N>,
        frame: &mut [u8],
    ) -> Result<(), SessionError> {
        let power = self.shared.gauge.borrow_mut().read();
        let taken_at = self.shared.clock.now_unix().unwrap_or(0);
        let health = self
            .shared
            .trap
            .borrow_mut()
            .health(power, taken_at, self.shared.uptime_s(), 0);
        self.publish(mqtt, &Uplink::Health(health), frame).await?;
        Ok(())
    }

    /// Sends queued detections while the queue's and MQTT's windows allow.
    async fn push_detections<N: Transport>(
        &self,
        mqtt: &mut Mqtt<'_, N>,
        frame: &mut [u8],
        timers: &mut Timers,
    ) -> Result<(), SessionError> {
        while mqtt.in_flight() + RESERVED_PUBLISH_SLOTS < mqtt::SEND_MAX {
            let Some(outgoing) = self.shared.trap.borrow_mut().next_detection(frame)? else {
                break;
            };
            let topic = topic::device_topic(&self.credentials.device_id, Direction::Up, "det");
            mqtt.publish(&topic, frame.get(..outgoing.len).unwrap_or_default())
                .await?;
            log::debug!("sent detection seq={}", outgoing.seq);
            timers.last_sent = Instant::now();
            timers.ack_due.get_or_insert(timers.last_sent + ACK_TIMEOUT);
        }
        Ok(())
    }

    /// Reacts to a downlink publish; `true` when the trap must restart.
    async fn on_publish<N: Transport, B: BootControl, O: OtaSlot>(
        &self,
        mqtt: &mut Mqtt<'_, N>,
        topic: &Topic,
        message: &mut [u8],
        frame: &mut [u8],
        ota: &mut Ota<'_, B, O>,
        timers: &mut Timers,
    ) -> Result<bool, SessionError> {
        let reaction = match self.shared.trap.borrow_mut().on_publish(topic, message) {
            Ok(reaction) => reaction,
            Err(error) => {
                log::warn!("refused a message on {topic}: {error}");
                return Ok(false);
            }
        };
        if reaction.released > 0 {
            let stats = self.shared.trap.borrow().queue_stats();
            log::info!("acked: released {} detections, {} still queued", reaction.released, stats.len);
            timers.ack_due = (stats.inflight > 0).then(|| Instant::now() + ACK_TIMEOUT);
        }
        if reaction.config_changed {
            let version = self.shared.trap.borrow().config_version();
            log::info!("applied configuration version {version}");
            self.shared.config_changed.signal(());
            timers.next_health = Instant::now() + self.checkin_interval();
        }
        if let Some(reply) = &reaction.reply {
            self.publish(mqtt, reply, frame).await?;
            timers.last_sent = Instant::now();
        }
        if reaction.capture_now {
            self.shared.capture_requested.signal(Trigger::Manual);
        }
        if let Some(message) = &reaction.ota {
            let battery_mv = self.shared.gauge.borrow_mut().read().battery_mv;
            let step = ota.on_downlink(&mut self.shared.trap.borrow_mut(), message, battery_mv)?;
            if step.request.is_some() {
                timers.ota_retries = 0;
            }
            if self.send_ota(mqtt, step, frame, timers).await? {
                return Ok(true);
            }
        }
        Ok(reaction.restart)
    }

    async fn on_deadline<N: Transport, B: BootControl, O: OtaSlot>(
        &self,
        mqtt: &mut Mqtt<'_, N>,
        frame: &mut [u8],
        ota: &mut Ota<'_, B, O>,
        timers: &mut Timers,
    ) -> Result<(), SessionError> {
        let now = Instant::now();
        if timers.ota_due.is_some_and(|due| now >= due) {
            timers.ota_due = None;
            if let Some(request) = ota.chunk_request() {
                if timers.ota_retries >= OTA_REQUEST_RETRIES {
                    return Err(SessionError::OtaStalled);
                }
                timers.ota_retries += 1;
                log::warn!("no OTA chunk at {} in time: asking again", request.offset);
                let step = OtaStep { request: Some(request), ..OtaStep::default() };
                self.send_ota(mqtt, step, frame, timers).await?;
            }
        }
        if timers.ack_due.is_some_and(|due| now >= due) {
            log::warn!("no ack in {} s: resending unacknowledged detections", ACK_TIMEOUT.as_secs());
            let hello = self.shared.trap.borrow_mut().rewind();
            timers.ack_due = None;
            if let Some(hello) = hello {
                log::info!("the server's ack is below the queue floor {}: hello again", hello.queue_floor);
                self.publish(mqtt, &Uplink::Hello(hello), frame).await?;
            }
        }
        if now >= timers.next_health {
            self.publish_health(mqtt, frame).await?;
            timers.next_health = now + self.checkin_interval();
            timers.last_sent = now;
        }
        if now >= timers.last_sent + Duration::from_secs(u64::from(mqtt::KEEP_ALIVE_S) / 2) {
            mqtt.ping().await?;
            timers.last_sent = now;
        }
        Ok(())
    }
}
