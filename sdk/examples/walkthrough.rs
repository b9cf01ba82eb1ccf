//! A trap's life in one process: provisioning, sealed detections through the
//! offline queue, acks, a reboot with unacknowledged entries, and a forged
//! frame refused. Both ends are the SDK's own sans-IO code; the "broker" is a
//! function call, so every byte printed is what would travel over MQTT.
//!
//! Run: `cargo run -p wildcam-sdk --example walkthrough`

use std::collections::BTreeMap;

use wildcam_sdk::protocol::{
    self, Ack, Capabilities, Chip, Classification, Detection, Downlink, FirmwareVersion, Hello,
    ProvisionDown, ProvisionUp, ResetReason, SealedCredentials, Trigger, Uplink,
};
use wildcam_sdk::provision::{
    ClaimToken, Credentials, DeviceIdentity, MqttPassword, Provisioner, ServerChallenge, ServerIdentity,
    seal_credentials,
};
use wildcam_sdk::queue::{FullPolicy, MemoryStore, OfflineQueue};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer, SessionKey};
use wildcam_sdk::topic::{self, Direction, SessionId};

type Store = MemoryStore<64>;
const FRAME_LEN_MAX: usize = Uplink::ENCODED_LEN_MAX + SEAL_OVERHEAD;

fn main() {
    let server_identity = ServerIdentity::from_seed([0x51; 32]);
    let token = "field-2026.Jx3v9QmZt0aKc7LpWn2Rb5YsUe8HdFgk";

    let (device_id, key) = provision(&server_identity, token);
    println!("provisioned as {device_id}; the session key never left either side");

    let mut trap = Trap::new(device_id.clone(), key.clone());
    let mut server = Server::new(device_id.clone(), key);

    server.receive(&trap.hello());
    for frame in 0..5 {
        trap.capture(frame);
    }
    // The trap sends; the server stores and acks only what it stored.
    for frame in trap.send_pending() {
        if let Some(ack) = server.receive(&frame) {
            trap.on_ack(ack);
        }
    }
    println!("after first flush: queue holds {} entries", trap.queue.len());
    assert!(trap.queue.is_empty());

    // Three more detections; the link drops after the first send, then the
    // trap reboots: its queue (here in RAM standing in for flash) survives.
    for frame in 5..8 {
        trap.capture(frame);
    }
    let first = trap.send_pending().into_iter().next().expect("one frame");
    let ack_lost = server.receive(&first);
    println!("link dropped; the {}-byte ack for it never arrived", ack_lost.map_or(0, |ack| ack.len()));
    trap = trap.reboot();
    println!("rebooted: {} unacked entries, next sequence {}", trap.queue.len(), trap.queue.stats().next_seq);
    for frame in trap.send_pending() {
        if let Some(ack) = server.receive(&frame) {
            trap.on_ack(ack);
        }
    }
    assert!(trap.queue.is_empty());
    assert_eq!(server.stored.len(), 8, "every detection stored exactly once");
    println!("server stored sequences {:?}, no duplicates", server.stored.keys().collect::<Vec<_>>());

    // A replay of an old frame, and a copy with one bit flipped, are refused.
    let mut replay = first.clone();
    assert!(server.receive_checked(&mut replay).is_err());
    let mut flipped = first;
    flipped[10] ^= 0x04;
    assert!(server.receive_checked(&mut flipped).is_err());
    println!("replayed and tampered frames refused");
}

/// Provisioning over encoded messages, as they travel on the provisioning topics.
fn provision(server_identity: &ServerIdentity, token: &str) -> (topic::DeviceId, SessionKey) {
    let session = SessionId::from_random([0x3c, 0x91, 0x07, 0x5e, 0xaa, 0x10, 0x42, 0xf3]);
    let up = topic::provision_topic(&session, Direction::Up);
    let claim = ClaimToken::parse(token).expect("well-formed token");
    let mut device = Provisioner::new(
        DeviceIdentity::from_seed([0x11; 32]),
        Some(claim.clone()),
        session,
        [0x22; 32],
        Some(server_identity.public_key()),
    );
    let mut buf = [0u8; 256];

    let request = ProvisionUp::ClaimRequest(device.request())
        .encode(&mut buf)
        .expect("fits")
        .to_vec();
    println!("{up}: ClaimRequest, {} bytes (token id only, no secret)", request.len());
    let ProvisionUp::ClaimRequest(request) = ProvisionUp::decode(&request).expect("valid") else {
        unreachable!("a claim request was sent")
    };
    assert_eq!(request.claim_id.as_str(), claim.id());
    let (challenge, pending) =
        ServerChallenge::new(server_identity, [0x33; 32], [0x44; 32], request.identity_key).into_parts();

    let proof = device
        .on_challenge(&challenge)
        .expect("server signature verifies");
    let key = pending
        .verify(Some(&claim), &proof)
        .expect("proof verifies");

    let credentials = Credentials {
        device_id: "trap-0042".parse().expect("valid id"),
        mqtt_password: MqttPassword::try_from("9hQ2-generated-password").expect("short"),
    };
    let mut frame = [0u8; wildcam_sdk::provision::CREDENTIALS_FRAME_LEN_MAX];
    let len = seal_credentials(&key, &session, &credentials, &mut frame).expect("fits");
    let sealed = SealedCredentials { frame: heapless::Vec::from_slice(&frame[..len]).expect("fits") };
    let message = ProvisionDown::Credentials(sealed)
        .encode(&mut buf)
        .expect("fits")
        .to_vec();
    println!(
        "{}: SealedCredentials, {} bytes",
        topic::provision_topic(&session, Direction::Down),
        message.len()
    );
    let ProvisionDown::Credentials(mut sealed) = ProvisionDown::decode(&message).expect("valid") else {
        unreachable!("credentials were sent")
    };
    let provisioned = device
        .on_credentials(&mut sealed.frame)
        .expect("credentials open");
    (provisioned.device_id, provisioned.session_key)
}

struct Trap {
    id: topic::DeviceId,
    key: SessionKey,
    queue: OfflineQueue<Store>,
    sealer: Sealer,
    /// The counter reservation last persisted (flash on a real trap).
    reservation: u32,
    opener: Opener,
}

impl Trap {
    fn new(id: topic::DeviceId, key: SessionKey) -> Self {
        let queue = OfflineQueue::open(Store::new(), FullPolicy::DropOldest).expect("RAM store opens");
        Self::with_queue(id, key, queue, None)
    }

    fn with_queue(
        id: topic::DeviceId,
        key: SessionKey,
        queue: OfflineQueue<Store>,
        reserved: Option<u32>,
    ) -> Self {
        let sealer = match reserved {
            Some(reservation) => Sealer::resume(key.clone(), Direction::Up, reservation),
            None => Sealer::new(key.clone(), Direction::Up),
        };
        let opener = Opener::new(key.clone(), Direction::Down);
        Self { id, key, queue, sealer, reservation: reserved.unwrap_or(0), opener }
    }

    fn hello(&mut self) -> Vec<u8> {
        let stats = self.queue.stats();
        self.seal(&Uplink::Hello(Hello {
            device_id: self.id.clone(),
            hardware_model: heapless::String::try_from("wildcam-c3-rev2").expect("short"),
            chip: Chip::Esp32c3,
            firmware: FirmwareVersion { major: 1, minor: 0, patch: 0 },
            secure_version: 1,
            reset_reason: ResetReason::PowerOn,
            capabilities: Capabilities::PIR.union(Capabilities::OTA),
            config_version: 0,
            queue_floor: stats.floor,
            queue_next: stats.next_seq,
        }))
    }

    fn capture(&mut self, frame: u8) {
        let appended = self
            .queue
            .append_with(|seq, buf| {
                let detection = Detection {
                    seq,
                    captured_at: 1_795_000_000 + u32::from(frame) * 7,
                    trigger: Trigger::Pir,
                    burst_index: frame % 3,
                    burst_len: 3,
                    classes: [Classification { label: 17, confidence_pct: 80 + frame }]
                        .into_iter()
                        .collect(),
                    bbox: None,
                    image_len: 150_000 + u32::from(frame),
                    image_digest: [frame; 8],
                    battery_mv: 3_900,
                };
                protocol::encode(&detection, buf).ok().map(|b| b.len())
            })
            .expect("queue has room");
        println!("captured detection {}", appended.seq);
    }

    /// Everything the in-flight window allows, sealed and ready to publish.
    fn send_pending(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = [0u8; 128];
        while let Some(entry) = self.queue.next_to_send(&mut buf).expect("RAM store reads") {
            let record = entry.record.to_vec();
            frames.push(self.seal_bytes(&record));
        }
        frames
    }

    fn on_ack(&mut self, mut frame: Vec<u8>) {
        let plain = self
            .opener
            .open(self.id.as_bytes(), &mut frame)
            .expect("ack from the server");
        let Downlink::Ack(Ack { through }) = Downlink::decode(plain).expect("valid") else {
            unreachable!("only acks are sent here")
        };
        let released = self
            .queue
            .ack(through)
            .expect("ack within what was sent")
            .released;
        println!("ack through {through}: released {released}");
    }

    fn reboot(self) -> Self {
        // Counters resume at the persisted reservation: none is ever reused,
        // the server's replay window accepts what follows.
        let queue = OfflineQueue::open(self.queue.into_store(), FullPolicy::DropOldest).expect("reopens");
        Self::with_queue(self.id, self.key, queue, Some(self.reservation))
    }

    fn seal(&mut self, message: &Uplink) -> Vec<u8> {
        let mut buf = [0u8; Uplink::ENCODED_LEN_MAX];
        let len = message.encode(&mut buf).expect("fits").len();
        self.seal_bytes(&buf[..len])
    }

    fn seal_bytes(&mut self, plain: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; FRAME_LEN_MAX];
        let sealed = self
            .sealer
            .seal(self.id.as_bytes(), plain, &mut frame)
            .expect("fits");
        if let Some(reservation) = sealed.persist_reservation {
            // Stored before the frame is published.
            self.reservation = reservation;
        }
        frame.truncate(sealed.len);
        frame
    }
}

struct Server {
    id: topic::DeviceId,
    opener: Opener,
    sealer: Sealer,
    stored: BTreeMap<u32, Detection>,
    contiguous: u32,
}

impl Server {
    fn new(id: topic::DeviceId, key: SessionKey) -> Self {
        Self {
            opener: Opener::new(key.clone(), Direction::Up),
            sealer: Sealer::new(key, Direction::Down),
            id,
            stored: BTreeMap::new(),
            contiguous: 0,
        }
    }

    fn receive(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        self.receive_checked(&mut frame.to_vec())
            .expect("a genuine frame")
    }

    fn receive_checked(&mut self, frame: &mut [u8]) -> Result<Option<Vec<u8>>, String> {
        let plain = self
            .opener
            .open(self.id.as_bytes(), frame)
            .map_err(|e| e.to_string())?;
        match Uplink::decode(plain).map_err(|e| e.to_string())? {
            Uplink::Hello(hello) => {
                println!("server: hello from {} (queue floor {})", hello.device_id, hello.queue_floor);
                self.contiguous = self.contiguous.max(hello.queue_floor.saturating_sub(1));
                Ok(None)
            }
            Uplink::Detection(detection) => {
                let seq = detection.seq;
                let fresh = self.stored.insert(seq, detection).is_none();
                while self.stored.contains_key(&(self.contiguous + 1)) {
                    self.contiguous += 1;
                }
                println!("server: detection {seq} {}", if fresh { "stored" } else { "already stored" });
                Ok(Some(self.ack()))
            }
            other => Err(format!("unexpected {:?}", other.kind())),
        }
    }

    fn ack(&mut self) -> Vec<u8> {
        let mut buf = [0u8; Downlink::ENCODED_LEN_MAX];
        let len = protocol::encode(&Ack { through: self.contiguous }, &mut buf)
            .expect("fits")
            .len();
        let mut frame = vec![0u8; len + SEAL_OVERHEAD];
        let sealed = self
            .sealer
            .seal(self.id.as_bytes(), &buf[..len], &mut frame)
            .expect("fits");
        frame.truncate(sealed.len);
        frame
    }
}
