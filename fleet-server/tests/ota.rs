//! OTA rollouts end to end, against the real embedded broker and SQLite
//! store: uploads and their refusals, then traps driven by the SDK's own
//! `OtaMachine` over a `MemorySlot` downloading, verifying, rebooting and
//! confirming (or rolling back), with pacing, pause, abort and refused chunk
//! requests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ed25519_dalek::{Signer, SigningKey};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::timeout;
use tower::ServiceExt;
use wildcam_fleet_server::Server;
use wildcam_fleet_server::config::Config;
use wildcam_fleet_server::metrics::OtaRefusal;
use wildcam_fleet_server::ota::{MANIFEST_HEADER, base64_encode};
use wildcam_fleet_server::store::{ApiRole, generate_claim_token};
use wildcam_sdk::ota::{
    BootAction, BootedImage, MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature, MemorySlot, OtaActions,
    OtaConfig, OtaMachine, OtaOutcome, OtaRecord, OtaStateKind, Persist, SignedManifest,
};
use wildcam_sdk::protocol::{Ack, Chip, Downlink, FirmwareVersion, OtaChunkRequest, Uplink};
use wildcam_sdk::provision::Provisioned;

use common::{Mqtt, TestTrap, WAIT, detection, embedded_mqtt, provision, test_config};

const FIRMWARE_KEY: [u8; 32] = [0x42; 32];
const OLD: FirmwareVersion = FirmwareVersion { major: 0, minor: 1, patch: 0 };
const NEW: FirmwareVersion = FirmwareVersion { major: 0, minor: 2, patch: 0 };
const CHUNK_LEN: u16 = 256;
const SLOT_LEN: usize = 64 * 1024;
/// Longest any one scenario may take.
const SCENARIO: Duration = Duration::from_secs(60);

fn firmware_key() -> SigningKey {
    SigningKey::from_bytes(&FIRMWARE_KEY)
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The postcard manifest file `cargo xtask sign` would write for `image`.
fn manifest_file(image: &[u8], version: FirmwareVersion, key: &SigningKey) -> Vec<u8> {
    let manifest = Manifest {
        version,
        secure_version: 1,
        chip: Chip::Host,
        image_size: image.len() as u32,
        image_sha256: Sha256::digest(image).into(),
        min_battery_mv: 0,
    };
    let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let signature = key.sign(manifest.signing_bytes(&mut buf).unwrap());
    let signed = SignedManifest { manifest, signature: ManifestSignature(signature.to_bytes()) };
    postcard::to_allocvec(&signed).unwrap()
}

fn ota_config(dir: &std::path::Path) -> Config {
    let mut config = test_config(dir);
    config.ota.signing_keys =
        vec![wildcam_fleet_server::api::to_hex(&firmware_key().verifying_key().to_bytes())];
    config.ota.chunk_len = CHUNK_LEN;
    config.ota.max_image_bytes = SLOT_LEN as u32;
    config
}

struct Harness {
    server: Server,
    app: Router,
    admin: String,
    dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    body: Value,
}

impl Harness {
    async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Self {
        let server = Server::start(ota_config(dir.path()))
            .await
            .expect("server starts");
        let admin = server
            .state()
            .store
            .create_api_token(ApiRole::Admin, "ota test".into())
            .await
            .expect("token")
            .token;
        let app = wildcam_fleet_server::http::router(server.state().clone());
        Self { server, app, admin, dir }
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        Answer { status, body }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.admin));
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(&body).unwrap())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    async fn upload(&self, image: &[u8], manifest: Option<&str>) -> Answer {
        let mut request = Request::builder()
            .method("POST")
            .uri("/api/v1/firmware")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.admin))
            .header(header::CONTENT_TYPE, "application/octet-stream");
        if let Some(manifest) = manifest {
            request = request.header(MANIFEST_HEADER, manifest);
        }
        self.send(request.body(Body::from(image.to_vec())).unwrap())
            .await
    }

    /// Uploads a valid image of `len` bytes; returns the firmware id.
    async fn firmware(&self, len: usize) -> u64 {
        let image = image(len, 7);
        let manifest = base64_encode(&manifest_file(&image, NEW, &firmware_key()));
        let answer = self.upload(&image, Some(&manifest)).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body["firmware"]["id"].as_u64().unwrap()
    }

    async fn rollout(&self, body: Value) -> Value {
        let answer = self.call("POST", "/rollouts", Some(body)).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body
    }

    async fn rollout_state(&self, id: u64) -> Value {
        let answer = self.call("GET", &format!("/rollouts/{id}"), None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body
    }

    /// Waits (bounded) until the rollout satisfies `done`.
    async fn wait_rollout(&self, id: u64, done: impl Fn(&Value) -> bool) -> Value {
        timeout(WAIT, async {
            loop {
                let state = self.rollout_state(id).await;
                if done(&state) {
                    return state;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("rollout {id} never got there"))
    }

    async fn provisioned(&self, seed: u8) -> Provisioned {
        let now = self.server.state().clock.now_ms();
        let token = generate_claim_token(1, now + 86_400_000, "ota".into()).unwrap();
        self.server
            .state()
            .store
            .create_claim_token(token.record)
            .await
            .unwrap();
        provision(embedded_mqtt(&self.server), Some(&token.token), [seed; 32])
            .await
            .expect("provisioned")
    }

    async fn stop(self) -> tempfile::TempDir {
        self.server.shutdown().await.expect("clean shutdown");
        self.dir
    }
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    assert!(!answer.body["error"]["message"].as_str().unwrap().is_empty());
}

fn device_row<'a>(rollout: &'a Value, device: &str) -> &'a Value {
    rollout["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .unwrap_or_else(|| panic!("{device} is not a target: {rollout}"))
}

/// Polls `condition` (a counter) until it holds, bounded.
async fn eventually(condition: impl Fn() -> bool) {
    timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition reached in time");
}

// ---------------------------------------------------------------- uploads

#[tokio::test]
async fn uploads_are_checked_before_anything_is_stored() {
    let harness = Harness::start().await;
    let image = image(3_000, 1);
    let good = manifest_file(&image, NEW, &firmware_key());
    let good64 = base64_encode(&good);

    let answer = harness.upload(&image, None).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "manifest_missing");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(MANIFEST_HEADER)
    );
    assert_error(
        &harness.upload(&image, Some("not base64!")).await,
        StatusCode::BAD_REQUEST,
        "manifest_invalid",
    );
    let truncated = base64_encode(&good[..good.len() - 10]);
    assert_error(
        &harness.upload(&image, Some(&truncated)).await,
        StatusCode::BAD_REQUEST,
        "manifest_invalid",
    );
    let mut trailing = good.clone();
    trailing.push(0);
    let answer = harness
        .upload(&image, Some(&base64_encode(&trailing)))
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "manifest_invalid");

    // Signed by a key the server does not accept.
    let other = manifest_file(&image, NEW, &SigningKey::from_bytes(&[9; 32]));
    let answer = harness.upload(&image, Some(&base64_encode(&other))).await;
    assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "signature_invalid");
    // A manifest altered after signing.
    let mut forged: SignedManifest = postcard::from_bytes(&good).unwrap();
    forged.manifest.secure_version = 99;
    let forged = base64_encode(&postcard::to_allocvec(&forged).unwrap());
    assert_error(
        &harness.upload(&image, Some(&forged)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "signature_invalid",
    );

    // The image does not match its manifest.
    let mut tampered = image.clone();
    tampered[100] ^= 1;
    let answer = harness.upload(&tampered, Some(&good64)).await;
    assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "image_digest_mismatch");
    let answer = harness.upload(&image[..2_999], Some(&good64)).await;
    assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "image_size_mismatch");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3000"),
        "{}",
        answer.body
    );

    // Over the limit: announced by the manifest, or sent anyway.
    let huge = vec![0u8; SLOT_LEN + 1];
    let huge_manifest = base64_encode(&manifest_file(&huge, NEW, &firmware_key()));
    assert_error(
        &harness.upload(&huge, Some(&huge_manifest)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "image_too_large",
    );
    assert_error(
        &harness.upload(&huge, Some(&good64)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "image_too_large",
    );

    // Not an octet stream.
    let answer = harness
        .send(
            Request::builder()
                .method("POST")
                .uri("/api/v1/firmware")
                .header(header::AUTHORIZATION, format!("Bearer {}", harness.admin))
                .header(header::CONTENT_TYPE, "application/json")
                .header(MANIFEST_HEADER, &good64)
                .body(Body::from(image.clone()))
                .unwrap(),
        )
        .await;
    assert_error(&answer, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    let listed = harness.call("GET", "/firmware", None).await;
    assert_eq!(listed.body["items"], json!([]), "nothing was stored");
    let files = harness.dir.path().join("firmware");
    assert!(!files.exists() || std::fs::read_dir(&files).unwrap().next().is_none());

    // A good upload is stored; the same again is the same firmware.
    let first = harness.upload(&image, Some(&good64)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["created"], true);
    let sha = first.body["firmware"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sha, wildcam_fleet_server::api::to_hex(&Sha256::digest(&image)));
    assert_eq!(first.body["firmware"]["size"], 3_000);
    assert_eq!(first.body["firmware"]["version"], json!({ "major": 0, "minor": 2, "patch": 0 }));
    let again = harness.upload(&image, Some(&good64)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["created"], false);
    assert_eq!(again.body["firmware"], first.body["firmware"]);
    // The same bytes under another (validly signed) manifest conflict.
    let other_version =
        manifest_file(&image, FirmwareVersion { major: 0, minor: 3, patch: 0 }, &firmware_key());
    let answer = harness
        .upload(&image, Some(&base64_encode(&other_version)))
        .await;
    assert_error(&answer, StatusCode::CONFLICT, "firmware_conflict");

    // Survives a restart, image file included.
    let id = first.body["firmware"]["id"].as_u64().unwrap();
    let dir = harness.stop().await;
    let harness = Harness::start_in(dir).await;
    let shown = harness.call("GET", &format!("/firmware/{id}"), None).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(shown.body, first.body["firmware"]);
    let stored = std::fs::read(
        harness
            .dir
            .path()
            .join("firmware")
            .join(format!("{sha}.bin")),
    )
    .unwrap();
    assert_eq!(stored, image);
    assert_error(
        &harness.call("GET", "/firmware/77", None).await,
        StatusCode::NOT_FOUND,
        "firmware_not_found",
    );
    harness.stop().await;
}

#[tokio::test]
async fn without_a_configured_key_uploads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.ota.signing_keys.clear();
    let server = Server::start(config).await.unwrap();
    let admin = server
        .state()
        .store
        .create_api_token(ApiRole::Admin, String::new())
        .await
        .unwrap()
        .token;
    let image = image(100, 2);
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/firmware")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(MANIFEST_HEADER, base64_encode(&manifest_file(&image, NEW, &firmware_key())))
        .body(Body::from(image))
        .unwrap();
    let response = wildcam_fleet_server::http::router(server.state().clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "no_signing_key");
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------- the device

/// A trap running the SDK's OTA machine over a slot in RAM, as firmware would.
struct OtaTrap {
    trap: TestTrap,
    provisioned: Provisioned,
    addr: std::net::SocketAddr,
    machine: OtaMachine,
    slot: MemorySlot<Vec<u8>>,
    record: Option<OtaRecord>,
    running: FirmwareVersion,
    /// The image the bootloader falls back to.
    installed: FirmwareVersion,
    pending_version: Option<FirmwareVersion>,
    results: Vec<OtaOutcome>,
    chunks_received: usize,
    /// Devices between their first and last accepted chunk, and the most seen.
    downloads: Option<Arc<(AtomicUsize, AtomicUsize)>>,
    self_test_passes: bool,
    highest_ack: u32,
    next_seq: u32,
    acked_while_downloading: bool,
    refused_chunks: usize,
}

impl OtaTrap {
    async fn connect(harness: &Harness, seed: u8) -> Self {
        let provisioned = harness.provisioned(seed).await;
        let addr = embedded_mqtt(&harness.server);
        let trap = TestTrap::connect(addr, &provisioned)
            .await
            .expect("connects");
        let config = OtaConfig::new(firmware_key().verifying_key().to_bytes(), Chip::Host, OLD, 1);
        Self {
            trap,
            provisioned,
            addr,
            machine: OtaMachine::new(config),
            slot: MemorySlot::new(vec![0xff; SLOT_LEN]),
            record: None,
            running: OLD,
            installed: OLD,
            pending_version: None,
            results: Vec::new(),
            chunks_received: 0,
            downloads: None,
            self_test_passes: true,
            highest_ack: 0,
            next_seq: 1,
            acked_while_downloading: false,
            refused_chunks: 0,
        }
    }

    fn id(&self) -> &str {
        self.trap.id.as_str()
    }

    async fn hello(&mut self) {
        let Uplink::Hello(mut hello) = self.trap.hello() else {
            unreachable!()
        };
        hello.firmware = self.running;
        self.trap.send(&Uplink::Hello(hello)).await;
    }

    /// The connection comes up: hello, then what the machine wants to say.
    async fn on_connected(&mut self) {
        self.hello().await;
        let actions = self.machine.on_connected();
        self.execute(actions).await;
    }

    /// Carries out the machine's actions, in field order.
    async fn execute(&mut self, actions: OtaActions) {
        if actions.mark_valid {
            self.installed = self.running;
        }
        if let Some(persist) = actions.persist {
            self.record = match persist {
                Persist::Store(record) => Some(record),
                Persist::Clear => None,
            };
        }
        if let Some(result) = actions.send_result {
            self.results.push(result.outcome);
            self.trap.send(&Uplink::OtaResult(result)).await;
            // Published (QoS 1): the result is delivered.
            let cleared = self
                .machine
                .result_delivered()
                .expect("a result was pending");
            Box::pin(self.execute(cleared)).await;
        }
        if let Some(request) = actions.send_request {
            self.trap.send(&Uplink::OtaChunkRequest(request)).await;
        }
        if actions.verify {
            let mut buf = [0u8; 4096];
            let mut step = OtaActions { verify: true, ..OtaActions::default() };
            while step.verify {
                step = self.machine.verify_step(&mut self.slot, &mut buf).unwrap();
                if step.persist.is_some() || step.boot.is_some() || step.send_result.is_some() {
                    break;
                }
            }
            Box::pin(self.execute(step)).await;
        }
        match actions.boot {
            Some(BootAction::UpdateReady) => {
                self.report_progress().await;
                let reboot = self.machine.reboot_into_update().unwrap();
                Box::pin(self.execute(reboot)).await;
            }
            Some(BootAction::ActivateAndReboot) => {
                self.pending_version = self.record.as_ref().map(|r| r.manifest.manifest.version);
                self.reboot(BootedImage::Updated).await;
            }
            Some(BootAction::RollBackAndReboot) => {
                self.pending_version = None;
                self.reboot(BootedImage::Previous).await;
            }
            None => {}
        }
    }

    async fn report_progress(&mut self) {
        if let Some(progress) = self.machine.progress() {
            self.trap.send(&Uplink::OtaProgress(progress)).await;
        }
    }

    /// Sends the next detection; returns its sequence.
    async fn detect(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.trap.send(&detection(seq)).await;
        seq
    }

    /// Waits until the server has read everything published so far on this
    /// connection (a detection sent last is acked), as firmware waits for its
    /// publishes before it disconnects.
    async fn flush(&mut self) {
        let seq = self.detect().await;
        self.run_until(|t| t.highest_ack >= seq).await;
    }

    /// Power cycle: a new connection, the machine rebuilt from the record.
    async fn reboot(&mut self, booted: BootedImage) {
        Box::pin(self.flush()).await;
        self.running = match (booted, self.pending_version.take()) {
            (BootedImage::Updated, Some(version)) => version,
            _ => self.installed,
        };
        self.trap.mqtt =
            Mqtt::connect(self.addr, self.id(), self.id(), self.provisioned.mqtt_password.as_ref())
                .await
                .expect("reconnects");
        self.trap
            .mqtt
            .subscribe(&wildcam_sdk::topic::device_downlink_filter(&self.trap.id))
            .await;
        let mut config = self.machine.config().clone();
        config.running_version = self.running;
        let (machine, actions) = OtaMachine::resume(config, self.record.clone(), booted);
        self.machine = machine;
        Box::pin(self.execute(actions)).await;
        Box::pin(self.on_connected()).await;
        if self.machine.awaiting_self_test() {
            self.report_progress().await;
            let verdict =
                if self.self_test_passes { self.machine.confirm() } else { self.machine.self_test_failed() };
            Box::pin(self.execute(verdict.unwrap())).await;
        }
    }

    /// Handles one downlink; `false` on timeout.
    async fn step(&mut self) -> bool {
        let Some(message) = self.trap.next_downlink().await else {
            return false;
        };
        match message {
            Downlink::OtaOffer(offer) => {
                let actions = self.machine.on_offer(&offer, u16::MAX, &mut self.slot);
                self.execute(actions).await;
            }
            Downlink::OtaChunk(chunk) => {
                self.chunks_received += 1;
                match self.machine.on_chunk(&chunk, &mut self.slot) {
                    Ok(actions) => {
                        if let Some(downloads) = &self.downloads {
                            if chunk.offset == 0 {
                                let now = downloads.0.fetch_add(1, Ordering::SeqCst) + 1;
                                downloads.1.fetch_max(now, Ordering::SeqCst);
                            }
                            if self.machine.state() != OtaStateKind::Downloading {
                                downloads.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        self.execute(actions).await;
                    }
                    Err(_) => self.refused_chunks += 1,
                }
            }
            Downlink::Ack(Ack { through }) => {
                if self.machine.state() == OtaStateKind::Downloading && through > self.highest_ack {
                    self.acked_while_downloading = true;
                }
                self.highest_ack = self.highest_ack.max(through);
            }
            _ => {}
        }
        true
    }

    /// Handles downlinks until `done`, bounded.
    async fn run_until(&mut self, done: impl Fn(&Self) -> bool) {
        timeout(SCENARIO, async {
            while !done(self) {
                assert!(
                    self.step().await,
                    "{}: no downlink while waiting (state {:?})",
                    self.id(),
                    self.machine.state()
                );
            }
        })
        .await
        .expect("scenario within its time");
    }
}

// ---------------------------------------------------------------- rollouts

#[tokio::test]
async fn a_trap_downloads_verifies_reboots_and_confirms_while_detections_flow() {
    let harness = Harness::start().await;
    let firmware = harness.firmware(20_000).await;
    let mut trap = OtaTrap::connect(&harness, 11).await;
    trap.hello().await;
    let rollout = harness
        .rollout(json!({ "firmware_id": firmware, "devices": [trap.id()], "max_in_flight": 1 }))
        .await;
    let id = rollout["id"].as_u64().unwrap();
    assert_eq!(rollout["counts"]["offered"], 1, "a connected trap is offered at once: {rollout}");

    // Detections keep being acked while the image streams.
    let mut sent_while_downloading = 0;
    timeout(SCENARIO, async {
        while trap.machine.state() != OtaStateKind::Idle || trap.running != NEW {
            if trap.machine.state() == OtaStateKind::Downloading && sent_while_downloading < 20 {
                sent_while_downloading += 1;
                trap.detect().await;
            }
            assert!(trap.step().await, "stalled in {:?}", trap.machine.state());
        }
    })
    .await
    .expect("update within its time");
    assert!(trap.acked_while_downloading, "detections were acked during the download");
    trap.flush().await;
    let seq = trap.highest_ack;
    let stored = common::stored_seqs(harness.server.state().store.as_ref(), &trap.trap.id).await;
    assert_eq!(stored, (1..=seq).collect::<Vec<_>>(), "every detection stored once");
    assert_eq!(trap.slot.contents()[..20_000], image(20_000, 7)[..]);

    let done = harness
        .wait_rollout(id, |r| r["state"] == "completed")
        .await;
    let row = device_row(&done, trap.id());
    assert_eq!(row["state"], "confirmed", "{done}");
    assert_eq!(row["outcome"], "Confirmed");
    assert_eq!(done["counts"]["confirmed"], 1);
    let device = harness
        .call("GET", &format!("/devices/{}", trap.id()), None)
        .await;
    assert_eq!(device.body["info"]["firmware"], json!({ "major": 0, "minor": 2, "patch": 0 }));
    let metrics = &harness.server.state().metrics;
    let (chunks, bytes) = metrics.ota_served();
    // At least once each (a repeated offer makes the trap ask for a chunk again).
    assert!(bytes >= 20_000, "{bytes}");
    assert!(chunks >= 20_000_u64.div_ceil(u64::from(CHUNK_LEN)), "{chunks}");
    assert_eq!(metrics.ota_outcomes(OtaOutcome::Confirmed), 1);

    // A repeated result (the trap re-sends until delivered) changes nothing.
    let again = wildcam_sdk::protocol::OtaResult {
        rollout_id: id as u32,
        version: NEW,
        outcome: OtaOutcome::Confirmed,
    };
    trap.trap.send(&Uplink::OtaResult(again)).await;
    let wrong = wildcam_sdk::protocol::OtaResult { outcome: OtaOutcome::SelfTestFailed, ..again };
    trap.trap.send(&Uplink::OtaResult(wrong)).await;
    trap.flush().await;
    let after = harness.rollout_state(id).await;
    assert_eq!(device_row(&after, trap.id())["state"], "confirmed");
    assert_eq!(metrics.ota_outcomes(OtaOutcome::Confirmed), 1);
    assert_eq!(metrics.ota_outcomes(OtaOutcome::SelfTestFailed), 0);
    harness.stop().await;
}

#[tokio::test]
async fn a_failed_self_test_rolls_back_and_pauses_the_rollout_at_its_threshold() {
    let harness = Harness::start().await;
    let firmware = harness.firmware(3_000).await;
    let mut traps = Vec::new();
    for seed in 21..24 {
        let mut trap = OtaTrap::connect(&harness, seed).await;
        trap.self_test_passes = false;
        trap.hello().await;
        traps.push(trap);
    }
    let ids: Vec<String> = traps.iter().map(|t| t.id().to_owned()).collect();
    let rollout = harness
        .rollout(
            json!({ "firmware_id": firmware, "devices": ids, "max_in_flight": 1, "failure_threshold": 1 }),
        )
        .await;
    let id = rollout["id"].as_u64().unwrap();
    assert_eq!(rollout["counts"]["offered"], 1, "{rollout}");
    assert_eq!(rollout["counts"]["pending"], 2, "{rollout}");
    let in_state = |rollout: &Value, state: &str| -> Vec<String> {
        let devices = rollout["devices"].as_array().unwrap().iter();
        devices
            .filter(|d| d["state"] == state)
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let take = |traps: &mut Vec<OtaTrap>, id: &str| {
        let index = traps.iter().position(|t| t.id() == id).unwrap();
        traps.remove(index)
    };

    // The offered trap fails its self-test and rolls back.
    let mut first = take(&mut traps, &in_state(&rollout, "offered")[0]);
    first
        .run_until(|t| {
            t.results.contains(&OtaOutcome::SelfTestFailed) && t.machine.state() == OtaStateKind::Idle
        })
        .await;
    first.flush().await;
    assert_eq!(first.running, OLD, "rolled back to the previous image");
    let paused = harness.wait_rollout(id, |r| r["state"] == "paused").await;
    let row = device_row(&paused, first.id());
    assert_eq!(row["state"], "rolled_back", "{paused}");
    assert_eq!(row["outcome"], "SelfTestFailed");
    assert!(
        paused["pause_reason"]
            .as_str()
            .unwrap()
            .contains("failure threshold"),
        "{paused}"
    );
    assert_eq!(
        harness
            .server
            .state()
            .metrics
            .ota_outcomes(OtaOutcome::SelfTestFailed),
        1
    );
    // Its slot was passed on once its image was verified (before the reboot).
    let mut second = take(&mut traps, &in_state(&paused, "offered")[0]);
    let third = traps.pop().unwrap();

    // Paused: nothing new is offered, on hello or otherwise.
    let ota = harness.server.state().ota.clone();
    let third_id = wildcam_sdk::DeviceId::new(third.id()).unwrap();
    assert!(!ota.offer(&third_id).await.unwrap());
    assert_eq!(ota.kick(id as u32).await, 0);
    assert_eq!(device_row(&harness.rollout_state(id).await, third.id())["state"], "pending");

    // Resumed, the offered trap downloads; aborted, its download ends.
    let resumed = harness
        .call("POST", &format!("/rollouts/{id}/resume"), None)
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    assert_eq!(resumed.body["state"], "active");
    assert_eq!(resumed.body["pause_reason"], Value::Null);
    second
        .run_until(|t| t.machine.state() == OtaStateKind::Downloading)
        .await;
    let aborted = harness
        .call("POST", &format!("/rollouts/{id}/abort"), None)
        .await;
    assert_eq!(aborted.body["state"], "aborted", "{}", aborted.body);
    assert_eq!(aborted.body["counts"]["aborted"], 2, "{}", aborted.body);
    second
        .run_until(|t| t.machine.state() == OtaStateKind::Idle)
        .await;
    second.flush().await;
    let ended = harness
        .wait_rollout(id, |r| device_row(r, second.id())["outcome"] == "SizeMismatch")
        .await;
    assert_eq!(device_row(&ended, second.id())["state"], "aborted");
    assert!(
        harness
            .server
            .state()
            .metrics
            .ota_refused(OtaRefusal::RolloutInactive)
            >= 1
    );
    assert_eq!(second.results, vec![OtaOutcome::SizeMismatch], "an empty chunk ends the download");
    assert_eq!(second.running, OLD);
    assert!(!ota.offer(&third_id).await.unwrap());
    let again = harness
        .call("POST", &format!("/rollouts/{id}/resume"), None)
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.body["error"]["code"], "rollout_state");
    harness.stop().await;
}

#[tokio::test]
async fn max_in_flight_bounds_concurrent_downloads() {
    let harness = Arc::new(Harness::start().await);
    let firmware = harness.firmware(6_000).await;
    let mut traps = Vec::new();
    for seed in 31..36 {
        let mut trap = OtaTrap::connect(&harness, seed).await;
        trap.hello().await;
        traps.push(trap);
    }
    let ids: Vec<String> = traps.iter().map(|t| t.id().to_owned()).collect();
    let rollout = harness
        .rollout(json!({ "firmware_id": firmware, "devices": ids, "max_in_flight": 2 }))
        .await;
    let id = rollout["id"].as_u64().unwrap();
    assert_eq!(rollout["counts"]["offered"], 2, "{rollout}");
    let downloads = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for mut trap in traps {
        trap.downloads = Some(downloads.clone());
        tasks.push(tokio::spawn(async move {
            timeout(SCENARIO, async {
                while trap.running != NEW || trap.machine.state() != OtaStateKind::Idle {
                    // Waiting for its turn may take longer than one answer.
                    let waiting_turn = trap.machine.state() == OtaStateKind::Idle;
                    assert!(
                        trap.step().await || waiting_turn,
                        "{} stalled in {:?}",
                        trap.id(),
                        trap.machine.state()
                    );
                }
            })
            .await
            .expect("every trap updated in time");
            trap.flush().await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let most = &downloads.1;
    assert_eq!(most.load(Ordering::SeqCst), 2, "two at a time, never more");
    let done = harness
        .wait_rollout(id, |r| r["state"] == "completed")
        .await;
    assert_eq!(done["counts"]["confirmed"], 5, "{done}");
    assert!(
        done["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["offers"].as_u64() >= Some(1))
    );
    Arc::into_inner(harness).unwrap().stop().await;
}

#[tokio::test]
async fn chunk_requests_out_of_bounds_or_for_another_rollout_are_refused_and_counted() {
    let harness = Harness::start().await;
    let firmware = harness.firmware(1_000).await;
    let mut target = OtaTrap::connect(&harness, 41).await;
    target.hello().await;
    let mut outsider = OtaTrap::connect(&harness, 42).await;
    outsider.hello().await;
    let rollout = harness
        .rollout(json!({ "firmware_id": firmware, "devices": [target.id()] }))
        .await;
    let rollout_id = rollout["id"].as_u64().unwrap() as u32;
    let metrics = harness.server.state().metrics.clone();
    let refused = |reason| metrics.ota_refused(reason);

    // Another device asks for the target's rollout: nothing is sent.
    let ask = |offset, len| Uplink::OtaChunkRequest(OtaChunkRequest { rollout_id, offset, len });
    outsider.trap.send(&ask(0, CHUNK_LEN)).await;
    eventually(|| refused(OtaRefusal::NotTargeted) == 1).await;
    // The target asks past the image, too much, nothing, or another rollout.
    target.trap.send(&ask(1_000, 16)).await;
    target.trap.send(&ask(900, 200)).await;
    target.trap.send(&ask(0, CHUNK_LEN + 1)).await;
    target.trap.send(&ask(0, 0)).await;
    target
        .trap
        .send(&Uplink::OtaChunkRequest(OtaChunkRequest { rollout_id: rollout_id + 1, offset: 0, len: 16 }))
        .await;
    eventually(|| {
        refused(OtaRefusal::OffsetInvalid) == 2
            && refused(OtaRefusal::LengthInvalid) == 2
            && refused(OtaRefusal::NotTargeted) == 2
    })
    .await;
    assert_eq!(metrics.ota_served(), (0, 0), "no chunk went out");
    let text = metrics.render(None, 0, 0);
    assert!(text.contains("wildcam_ota_requests_refused_total{reason=\"offset_invalid\"} 2"), "{text}");

    // The outsider got nothing but acks; the target still completes.
    outsider.flush().await;
    assert_eq!(outsider.chunks_received, 0);
    let offer = harness
        .server
        .state()
        .ota
        .offer(&wildcam_sdk::DeviceId::new(target.id()).unwrap())
        .await;
    assert!(offer.unwrap(), "the target is (re-)offered its rollout");
    target
        .run_until(|t| t.running == NEW && t.machine.state() == OtaStateKind::Idle)
        .await;
    target.flush().await;
    let done = harness
        .wait_rollout(u64::from(rollout_id), |r| r["state"] == "completed")
        .await;
    assert_eq!(device_row(&done, target.id())["state"], "confirmed");
    assert_eq!(outsider.running, OLD);
    harness.stop().await;
}

#[tokio::test]
async fn the_cli_client_uploads_over_http() {
    let harness = Harness::start().await;
    let client = wildcam_fleet_server::cli::ApiClient::new(
        &format!("http://{}", harness.server.http()),
        Some(harness.admin.clone()),
    )
    .unwrap();
    let image = image(5_000, 3);
    let manifest = base64_encode(&manifest_file(&image, NEW, &firmware_key()));
    let uploaded = client
        .post_bytes("/firmware", image.clone(), (MANIFEST_HEADER, manifest.clone()))
        .await
        .unwrap();
    assert_eq!(uploaded["created"], true);
    assert_eq!(uploaded["firmware"]["size"], 5_000);
    let refused = client
        .post_bytes("/firmware", image[1..].to_vec(), (MANIFEST_HEADER, manifest))
        .await
        .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(refused.contains("image_size_mismatch"), "{refused}");
    harness.stop().await;
}
