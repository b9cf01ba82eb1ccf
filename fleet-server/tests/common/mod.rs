//! A test trap: the SDK's own provisioning, sealing and messages over a real
//! MQTT client (rumqttc) against a running fleet server.

#![allow(dead_code)] // Each test file uses a different part.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use wildcam_fleet_server::config::Config;
use wildcam_fleet_server::credentials::PROVISION_USERNAME;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::*;
use wildcam_sdk::provision::{ClaimToken, DeviceIdentity, Provisioned, Provisioner};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer, SessionKey};
use wildcam_sdk::topic::{self, Direction, SessionId};

/// How long a test waits for any one answer.
pub const WAIT: Duration = Duration::from_secs(10);

/// A configuration on ephemeral loopback ports under `data_dir`.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config { data_dir: data_dir.to_path_buf(), ..Config::default() };
    config.mqtt.listen_v4 = SocketAddr::from(([127, 0, 0, 1], 0));
    config.mqtt.listen_v5 = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.ingest.linger_ms = 2;
    config
}

/// The MQTT 3.1.1 listener of a server running the embedded broker.
pub fn embedded_mqtt(server: &wildcam_fleet_server::Server) -> SocketAddr {
    server
        .mqtt_v4()
        .expect("the server runs the embedded broker")
}

/// A connected MQTT client whose incoming publishes land in a channel.
pub struct Mqtt {
    pub client: AsyncClient,
    pub incoming: mpsc::Receiver<(String, Vec<u8>)>,
    task: JoinHandle<()>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mqtt {
    /// Connects and waits for the CONNACK; `Err` if the broker refuses.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Self, String> {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(username, password);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let connected = timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => continue,
                    Err(error) => return Err(error.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no CONNACK".to_string())?;
        connected?;
        let (sender, incoming) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if sender
                            .send((publish.topic, publish.payload.to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Self { client, incoming, task })
    }

    pub async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        // Let the broker register it before anything is published to it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
    }

    pub async fn next(&mut self) -> Option<(String, Vec<u8>)> {
        timeout(WAIT, self.incoming.recv()).await.ok().flatten()
    }
}

/// Claims a device with `token` (None: the identity is on the allow-list).
pub async fn provision(
    addr: SocketAddr,
    token: Option<&str>,
    identity_seed: [u8; 32],
) -> Result<Provisioned, String> {
    provision_capturing(addr, token, identity_seed)
        .await
        .map(|(provisioned, _)| provisioned)
}

/// What an eavesdropper on the provisioning topic saw of a successful claim.
pub struct CapturedClaim {
    /// The encoded `ClaimRequest`.
    pub request: Vec<u8>,
    /// The encoded `ClaimProof`.
    pub proof: Vec<u8>,
    /// The claim's session topic (up direction).
    pub up_topic: String,
    /// The unclaimed trap's connection, still subscribed to its session's answers.
    pub mqtt: Mqtt,
}

/// [`provision`], also returning the messages the trap published.
pub async fn provision_capturing(
    addr: SocketAddr,
    token: Option<&str>,
    identity_seed: [u8; 32],
) -> Result<(Provisioned, CapturedClaim), String> {
    let session = SessionId::from_random(identity_seed[..8].try_into().expect("8 bytes"));
    let mut mqtt = connect_unclaimed(addr, &session).await?;
    let claim = token.map(|t| ClaimToken::parse(t).expect("well-formed token"));
    let mut device =
        Provisioner::new(DeviceIdentity::from_seed(identity_seed), claim, session, [0x5a; 32], None);
    let up = topic::provision_topic(&session, Direction::Up);
    let request = encode_set(|b| {
        ProvisionUp::ClaimRequest(device.request())
            .encode(b)
            .map(|e| e.len())
    });
    mqtt.publish(&up, request.clone()).await;
    let challenge = match next_provision_down(&mut mqtt).await? {
        ProvisionDown::ClaimChallenge(challenge) => challenge,
        other => return Err(format!("expected a challenge, got {other:?}")),
    };
    let proof = device.on_challenge(&challenge).map_err(|e| e.to_string())?;
    let proof = encode_set(|b| ProvisionUp::ClaimProof(proof).encode(b).map(|e| e.len()));
    mqtt.publish(&up, proof.clone()).await;
    let provisioned = match next_provision_down(&mut mqtt).await? {
        ProvisionDown::Credentials(mut sealed) => device
            .on_credentials(&mut sealed.frame)
            .map_err(|e| e.to_string())?,
        other => return Err(format!("expected credentials, got {other:?}")),
    };
    Ok((provisioned, CapturedClaim { request, proof, up_topic: up.as_str().to_owned(), mqtt }))
}

/// Connects with the shared provisioning account and subscribes to `session`'s answers.
pub async fn connect_unclaimed(addr: SocketAddr, session: &SessionId) -> Result<Mqtt, String> {
    let mqtt = Mqtt::connect(
        addr,
        &format!("unclaimed-{}", session.as_str()),
        PROVISION_USERNAME,
        "wildcam-provisioning",
    )
    .await?;
    mqtt.subscribe(&topic::provision_topic(session, Direction::Down))
        .await;
    Ok(mqtt)
}

/// The next answer on a provisioning session, rejections included.
pub async fn next_provision_answer(mqtt: &mut Mqtt) -> Result<ProvisionDown, String> {
    let (_, payload) = mqtt.next().await.ok_or("no provisioning answer")?;
    ProvisionDown::decode(&payload).map_err(|e| e.to_string())
}

async fn next_provision_down(mqtt: &mut Mqtt) -> Result<ProvisionDown, String> {
    match next_provision_answer(mqtt).await? {
        ProvisionDown::ClaimRejected(rejected) => Err(format!("rejected: {:?}", rejected.reason)),
        other => Ok(other),
    }
}

fn encode_set(encode: impl FnOnce(&mut [u8]) -> Result<usize, ProtocolError>) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let len = encode(&mut buf).expect("encodes");
    buf.truncate(len);
    buf
}

/// A provisioned trap connected to the server.
pub struct TestTrap {
    pub id: DeviceId,
    pub password: String,
    pub key: SessionKey,
    pub mqtt: Mqtt,
    pub sealer: Sealer,
    pub opener: Opener,
    /// Downlink frames that did not open.
    pub refused: usize,
}

impl TestTrap {
    pub async fn connect(addr: SocketAddr, provisioned: &Provisioned) -> Result<Self, String> {
        let id = provisioned.device_id.clone();
        let password = provisioned.mqtt_password.to_string();
        let mqtt = Mqtt::connect(addr, id.as_str(), id.as_str(), &password).await?;
        mqtt.subscribe(&topic::device_downlink_filter(&id)).await;
        let key = provisioned.session_key.clone();
        Ok(Self {
            sealer: Sealer::new(key.clone(), Direction::Up),
            opener: Opener::new(key.clone(), Direction::Down),
            id,
            password,
            key,
            mqtt,
            refused: 0,
        })
    }

    /// Seals and publishes `message` on its topic; returns the frame sent.
    pub async fn send(&mut self, message: &Uplink) -> Vec<u8> {
        let envelope = encode_set(|b| message.encode(b).map(|e| e.len()));
        let frame = self.seal(&envelope);
        let Route::Device(_, suffix) = message.kind().route() else {
            unreachable!("uplinks are device messages")
        };
        self.publish_raw(suffix, frame.clone()).await;
        frame
    }

    pub fn seal(&mut self, envelope: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; envelope.len() + SEAL_OVERHEAD];
        let sealed = self
            .sealer
            .seal(self.id.as_bytes(), envelope, &mut frame)
            .expect("seals");
        frame.truncate(sealed.len);
        frame
    }

    pub async fn publish_raw(&self, suffix: &str, payload: Vec<u8>) {
        self.mqtt
            .publish(&topic::device_topic(&self.id, Direction::Up, suffix), payload)
            .await;
    }

    pub fn hello(&self) -> Uplink {
        Uplink::Hello(Hello {
            device_id: self.id.clone(),
            hardware_model: heapless::String::try_from("test-trap").expect("short"),
            chip: Chip::Host,
            firmware: FirmwareVersion { major: 0, minor: 1, patch: 0 },
            secure_version: 1,
            reset_reason: ResetReason::PowerOn,
            capabilities: Capabilities::PIR,
            config_version: 0,
            queue_floor: 1,
            queue_next: 1,
        })
    }

    /// The next downlink message that opens and decodes; frames that do not
    /// (forged, replayed) are counted in `refused` and skipped. `None` on timeout.
    pub async fn next_downlink(&mut self) -> Option<Downlink> {
        loop {
            let (_, mut frame) = self.mqtt.next().await?;
            match self
                .opener
                .open(self.id.as_bytes(), &mut frame)
                .map(Downlink::decode)
            {
                Ok(Ok(message)) => return Some(message),
                _ => self.refused += 1,
            }
        }
    }

    /// Waits for an ack through at least `seq`.
    pub async fn wait_ack(&mut self, seq: u32) -> Result<u32, String> {
        self.wait_ack_within(seq, WAIT).await
    }

    /// Waits at most `limit` for an ack through at least `seq`.
    pub async fn wait_ack_within(&mut self, seq: u32, limit: Duration) -> Result<u32, String> {
        timeout(limit, self.wait_ack_forever(seq))
            .await
            .unwrap_or_else(|_| Err(format!("no ack through {seq}")))
    }

    async fn wait_ack_forever(&mut self, seq: u32) -> Result<u32, String> {
        loop {
            match self.next_downlink().await {
                Some(Downlink::Ack(Ack { through })) if through >= seq => return Ok(through),
                Some(_) => continue,
                None => return Err(format!("no ack through {seq}")),
            }
        }
    }
}

/// A detection with sequence `seq`.
pub fn detection(seq: u32) -> Uplink {
    Uplink::Detection(Detection {
        seq,
        captured_at: 1_795_000_000 + seq,
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes: [Classification { label: 17, confidence_pct: 90 }]
            .into_iter()
            .collect(),
        bbox: None,
        image_len: 100_000 + seq,
        image_digest: [seq as u8; 8],
        battery_mv: 3_900,
    })
}

/// Every sequence stored for `device`, sorted, read page by page.
pub async fn stored_seqs(store: &dyn wildcam_fleet_server::store::Store, device: &DeviceId) -> Vec<u32> {
    use wildcam_fleet_server::store::{DetectionQuery, PAGE_LIMIT_MAX, PageRequest};
    let mut query = DetectionQuery {
        device_id: Some(device.clone()),
        page: PageRequest::first(PAGE_LIMIT_MAX),
        ..Default::default()
    };
    let mut seqs = Vec::new();
    loop {
        let page = store.query_detections(query.clone()).await.expect("query");
        seqs.extend(page.items.iter().map(|d| d.detection.seq));
        let Some(next) = page.next else { break };
        query.page = PageRequest::after(PAGE_LIMIT_MAX, next);
    }
    seqs.sort_unstable();
    seqs
}
