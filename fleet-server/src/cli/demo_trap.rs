//! `wildcam-fleet demo-trap`: a throwaway trap for demos and smoke tests.
//! It claims itself with a claim token through the SDK's provisioning over
//! MQTT, connects with the credentials it got, says hello, sends a health
//! report and `count` detections, and waits until the server acks them all.
//! With `--listen-s` it then stays connected and answers configurations and
//! commands the way a trap would.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use rand::RngCore;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    Capabilities, ChargeState, Chip, Classification, CommandResult, CommandStatus, ConfigStatus, Detection,
    Downlink, FirmwareVersion, Health, Hello, ProvisionDown, ProvisionUp, ReportedConfig, ResetReason, Route,
    Trigger, Uplink,
};
use wildcam_sdk::provision::{ClaimToken, DeviceIdentity, Provisioned, Provisioner};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer};
use wildcam_sdk::topic::{self, Direction, SessionId};

use crate::credentials::PROVISION_USERNAME;

/// Longest wait for any one answer from the server.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest envelope the demo encodes.
const ENVELOPE_LEN_MAX: usize = 256;
/// Most detections one run sends (they all sit in one in-memory queue).
const COUNT_MAX: u32 = 1_000;

/// Flags of `demo-trap`.
#[derive(Debug, Clone, Args)]
pub struct DemoTrapArgs {
    /// A claim token (`{id}.{secret}`) from `claim-tokens create`.
    #[arg(long = "token", value_name = "CLAIM_TOKEN")]
    pub claim_token: String,
    /// How many detections to send.
    #[arg(long, default_value_t = 3)]
    pub count: u32,
    /// The broker's MQTT 3.1.1 listener.
    #[arg(long, default_value = "127.0.0.1:18830")]
    pub mqtt: SocketAddr,
    /// Password of the shared `provision` MQTT account.
    #[arg(
        long,
        env = "WILDCAM_PROVISION_PASSWORD",
        default_value = "wildcam-provisioning",
        hide_env_values = true
    )]
    pub provision_password: String,
    /// The server's identity public key (hex, from `GET /api/v1/server`) to pin.
    #[arg(long)]
    pub server_key: Option<String>,
    /// Afterwards stay connected this long, applying configurations and
    /// answering commands.
    #[arg(long, default_value_t = 0)]
    pub listen_s: u64,
}

/// Runs the demo trap; prints what happens on standard output.
pub async fn run(args: DemoTrapArgs) -> Result<()> {
    if !(1..=COUNT_MAX).contains(&args.count) {
        bail!("--count must be within 1..={COUNT_MAX}");
    }
    let pinned = args
        .server_key
        .as_deref()
        .map(|hex| {
            crate::api::parse_key_hex(hex).ok_or_else(|| anyhow!("--server-key must be 64 hex digits"))
        })
        .transpose()?;
    let provisioned = provision(&args, pinned).await?;
    println!("claimed: device id {}", provisioned.device_id);
    let mut trap = Trap::connect(args.mqtt, &provisioned).await?;
    trap.send(&Uplink::Hello(hello(&trap.id, args.count)?))
        .await?;
    trap.send(&Uplink::Health(health())).await?;
    let now_s = unix_now_s();
    for seq in 1..=args.count {
        let detection = detection(seq, args.count, now_s);
        println!("sent detection seq {seq}: {}", describe(&detection));
        trap.send(&Uplink::Detection(detection)).await?;
    }
    let through = trap.wait_ack(args.count).await?;
    println!("acked through seq {through}: every detection is stored");
    if args.listen_s > 0 {
        trap.serve(Duration::from_secs(args.listen_s)).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- MQTT

/// What the MQTT event loop reports.
enum Incoming {
    SubAck,
    Publish(Vec<u8>),
}

/// A connected MQTT client whose events land in a channel.
struct Mqtt {
    client: AsyncClient,
    incoming: mpsc::Receiver<Incoming>,
    driver: JoinHandle<()>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Mqtt {
    /// Connects and waits for the broker to accept.
    async fn connect(addr: SocketAddr, client_id: &str, username: &str, password: &str) -> Result<Self> {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(username, password);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        timeout(ANSWER_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => continue,
                    Err(error) => return Err(anyhow!("MQTT connection to {addr} failed: {error}")),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no answer from the broker at {addr}"))??;
        let (sender, incoming) = mpsc::channel(256);
        let driver = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                let forwarded = match event {
                    Event::Incoming(Packet::SubAck(_)) => Incoming::SubAck,
                    Event::Incoming(Packet::Publish(publish)) => Incoming::Publish(publish.payload.to_vec()),
                    _ => continue,
                };
                if sender.send(forwarded).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { client, incoming, driver })
    }

    /// Subscribes and waits for the broker's SUBACK.
    async fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            match self.next().await? {
                Incoming::SubAck => return Ok(()),
                Incoming::Publish(_) => continue,
            }
        }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<()> {
        Ok(self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?)
    }

    /// The next event within [`ANSWER_TIMEOUT`].
    async fn next(&mut self) -> Result<Incoming> {
        self.next_until(Instant::now() + ANSWER_TIMEOUT)
            .await?
            .ok_or_else(|| anyhow!("no answer from the server within {} s", ANSWER_TIMEOUT.as_secs()))
    }

    /// The next event before `deadline`, `None` if none came.
    async fn next_until(&mut self, deadline: Instant) -> Result<Option<Incoming>> {
        match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(incoming)) => Ok(Some(incoming)),
            Ok(None) => bail!("the broker closed the connection"),
        }
    }

    /// The next publish within [`ANSWER_TIMEOUT`].
    async fn next_payload(&mut self) -> Result<Vec<u8>> {
        self.next_payload_until(Instant::now() + ANSWER_TIMEOUT)
            .await?
            .ok_or_else(|| anyhow!("no answer from the server within {} s", ANSWER_TIMEOUT.as_secs()))
    }

    /// The next publish before `deadline`, `None` if none came.
    async fn next_payload_until(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        loop {
            match self.next_until(deadline).await? {
                Some(Incoming::Publish(payload)) => return Ok(Some(payload)),
                Some(Incoming::SubAck) => continue,
                None => return Ok(None),
            }
        }
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

fn encode_with(
    encode: impl FnOnce(&mut [u8]) -> Result<usize, wildcam_sdk::protocol::ProtocolError>,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; ENVELOPE_LEN_MAX];
    let len = encode(&mut buf).map_err(|error| anyhow!("encoding failed: {error}"))?;
    buf.truncate(len);
    Ok(buf)
}

// ---------------------------------------------------------------- claiming

/// Claims a fresh random identity with the claim token.
async fn provision(args: &DemoTrapArgs, pinned: Option<[u8; 32]>) -> Result<Provisioned> {
    let claim =
        ClaimToken::parse(&args.claim_token).map_err(|error| anyhow!("invalid claim token: {error}"))?;
    let session = SessionId::from_random(random());
    let mut device =
        Provisioner::new(DeviceIdentity::from_seed(random()), Some(claim), session, random(), pinned);
    let client_id = format!("unclaimed-{}", session.as_str());
    let mut mqtt = Mqtt::connect(args.mqtt, &client_id, PROVISION_USERNAME, &args.provision_password).await?;
    mqtt.subscribe(&topic::provision_topic(&session, Direction::Down))
        .await?;
    let up = topic::provision_topic(&session, Direction::Up);
    let request = ProvisionUp::ClaimRequest(device.request());
    mqtt.publish(&up, encode_with(|b| request.encode(b).map(|e| e.len()))?)
        .await?;
    let ProvisionDown::ClaimChallenge(challenge) = provision_answer(&mut mqtt).await? else {
        bail!("the server answered the claim request out of order");
    };
    let proof = device
        .on_challenge(&challenge)
        .map_err(|error| anyhow!("server challenge refused: {error}"))?;
    let proof = ProvisionUp::ClaimProof(proof);
    mqtt.publish(&up, encode_with(|b| proof.encode(b).map(|e| e.len()))?)
        .await?;
    let ProvisionDown::Credentials(mut sealed) = provision_answer(&mut mqtt).await? else {
        bail!("the server answered the claim proof out of order");
    };
    device
        .on_credentials(&mut sealed.frame)
        .map_err(|error| anyhow!("credentials did not open: {error}"))
}

/// The server's next provisioning message; a rejection is an error.
async fn provision_answer(mqtt: &mut Mqtt) -> Result<ProvisionDown> {
    let payload = mqtt.next_payload().await?;
    match ProvisionDown::decode(&payload).map_err(|error| anyhow!("undecodable answer: {error}"))? {
        ProvisionDown::ClaimRejected(rejected) => bail!("claim rejected: {}", rejected.reason),
        other => Ok(other),
    }
}

// ---------------------------------------------------------------- the trap

/// A provisioned trap connected with its own credentials.
struct Trap {
    id: DeviceId,
    mqtt: Mqtt,
    sealer: Sealer,
    opener: Opener,
}

impl Trap {
    async fn connect(addr: SocketAddr, provisioned: &Provisioned) -> Result<Self> {
        let id = provisioned.device_id.clone();
        let mut mqtt = Mqtt::connect(addr, id.as_str(), id.as_str(), provisioned.mqtt_password.as_str())
            .await
            .context("connecting with the new credentials")?;
        mqtt.subscribe(&topic::device_downlink_filter(&id)).await?;
        let key = provisioned.session_key.clone();
        Ok(Self {
            id,
            mqtt,
            sealer: Sealer::new(key.clone(), Direction::Up),
            opener: Opener::new(key, Direction::Down),
        })
    }

    /// Seals `message` under the trap's key and publishes it on its topic.
    async fn send(&mut self, message: &Uplink) -> Result<()> {
        let envelope = encode_with(|b| message.encode(b).map(|e| e.len()))?;
        let mut frame = vec![0u8; envelope.len() + SEAL_OVERHEAD];
        let sealed = self
            .sealer
            .seal(self.id.as_bytes(), &envelope, &mut frame)
            .map_err(|error| anyhow!("sealing failed: {error}"))?;
        frame.truncate(sealed.len);
        let Route::Device(_, suffix) = message.kind().route() else {
            bail!("{:?} is not a device message", message.kind());
        };
        self.mqtt
            .publish(&topic::device_topic(&self.id, Direction::Up, suffix), frame)
            .await
    }

    /// The next downlink message that opens and decodes within `limit`,
    /// `None` if none came.
    async fn next_downlink(&mut self, limit: Duration) -> Result<Option<Downlink>> {
        let deadline = Instant::now() + limit;
        loop {
            let Some(mut frame) = self.mqtt.next_payload_until(deadline).await? else {
                return Ok(None);
            };
            match self
                .opener
                .open(self.id.as_bytes(), &mut frame)
                .map(Downlink::decode)
            {
                Ok(Ok(message)) => return Ok(Some(message)),
                _ => println!("ignored a downlink frame that did not open"),
            }
        }
    }

    /// Waits for an ack through `seq`, answering whatever else arrives.
    async fn wait_ack(&mut self, seq: u32) -> Result<u32> {
        loop {
            let message = self
                .next_downlink(ANSWER_TIMEOUT)
                .await?
                .ok_or_else(|| anyhow!("no ack through seq {seq} within {} s", ANSWER_TIMEOUT.as_secs()))?;
            match message {
                Downlink::Ack(ack) if ack.through >= seq => return Ok(ack.through),
                other => self.answer(other).await?,
            }
        }
    }

    /// Stays connected for `duration`, answering configurations and commands.
    async fn serve(&mut self, duration: Duration) -> Result<()> {
        println!("listening for {} s for configurations and commands", duration.as_secs());
        let deadline = Instant::now() + duration;
        while let Some(message) = self
            .next_downlink(deadline.saturating_duration_since(Instant::now()))
            .await?
        {
            self.answer(message).await?;
        }
        Ok(())
    }

    /// Applies a configuration or runs a command as a trap would.
    async fn answer(&mut self, message: Downlink) -> Result<()> {
        match message {
            Downlink::DesiredConfig(desired) => {
                println!("received desired config version {}: applying", desired.version);
                let report = ReportedConfig {
                    version: desired.version,
                    status: ConfigStatus::Applied,
                    desired_version: desired.version,
                    config: desired.config,
                };
                self.send(&Uplink::ReportedConfig(report)).await
            }
            Downlink::Command(command) => {
                println!("received command {} ({:?}): done", command.id, command.kind);
                let result = CommandResult { id: command.id, status: CommandStatus::Done };
                self.send(&Uplink::CommandResult(result)).await
            }
            Downlink::Ack(ack) => {
                println!("acked through seq {}", ack.through);
                Ok(())
            }
            other => {
                println!("ignored {:?}", other.kind());
                Ok(())
            }
        }
    }
}

fn unix_now_s() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    u32::try_from(now).unwrap_or(u32::MAX)
}

fn hello(id: &DeviceId, count: u32) -> Result<Hello> {
    Ok(Hello {
        device_id: id.clone(),
        hardware_model: heapless::String::try_from("wildcam-demo-trap")
            .map_err(|_| anyhow!("model name too long"))?,
        chip: Chip::Host,
        firmware: FirmwareVersion { major: 0, minor: 1, patch: 0 },
        secure_version: 1,
        reset_reason: ResetReason::PowerOn,
        capabilities: Capabilities::PIR.union(Capabilities::CLASSIFIER),
        config_version: 0,
        queue_floor: 1,
        queue_next: count + 1,
    })
}

fn health() -> Health {
    Health {
        taken_at: unix_now_s(),
        battery_mv: 3_950,
        battery_soc_pct: 87,
        charge_state: ChargeState::Charging,
        solar_mw: 420,
        temperature_decicelsius: 143,
        storage_free_kib: 28_000_000,
        storage_errors: 0,
        rssi_dbm: -67,
        uptime_s: 42,
        reset_reason: ResetReason::PowerOn,
        triggers_since_last: 3,
        queue_depth: 0,
        queue_dropped_total: 0,
    }
}

/// Demo classifier labels (ids into the deployed label table) cycled through.
const DEMO_LABELS: [u16; 3] = [17, 4, 17];

/// Detection `seq` of `count`: one a minute up to `now_s`, with varying
/// labels and confidences so the API's filters have something to select.
fn detection(seq: u32, count: u32, now_s: u32) -> Detection {
    let index = usize::try_from(seq).unwrap_or_default() % DEMO_LABELS.len();
    let confidence_pct = u8::try_from(55 + (seq * 17) % 45).unwrap_or(99);
    Detection {
        seq,
        captured_at: now_s.saturating_sub(60 * count.saturating_sub(seq)),
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes: [Classification { label: DEMO_LABELS[index], confidence_pct }]
            .into_iter()
            .collect(),
        bbox: None,
        image_len: 180_000 + seq * 1_000,
        image_digest: [u8::try_from(seq % 256).unwrap_or_default(); 8],
        battery_mv: 3_950,
    }
}

fn describe(detection: &Detection) -> String {
    detection
        .classes
        .iter()
        .map(|c| format!("label {} at {}%", c.label, c.confidence_pct))
        .collect::<Vec<_>>()
        .join(", ")
}
