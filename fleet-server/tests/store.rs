//! The SQLite store against real database files in temporary directories.

use std::path::Path;
use std::sync::Arc;

use wildcam_fleet_server::store::{
    AckUpdate, ApiRole, ApiTokenStore, ClaimAuthorization, ClaimStore, CommandState, ControlStore, Cursor,
    Deployment, DetectionQuery, DeviceId, DeviceQuery, DeviceStatus, DeviceStore, HealthQuery, IngestBatch,
    IngestStore, ManualClock, NewClaimToken, NewDevice, OutboxStore, PageRequest, PasswordHash, Received,
    SCHEMA_VERSION, SecretDigest, SqliteConfig, SqliteStore, Store, StoreError, StoredDetection,
    TelemetryStore, TokenHash, UplinkWindow,
};
use wildcam_sdk::protocol::{
    Capabilities, ChargeState, Chip, Classification, CommandKind, CommandResult, CommandStatus, ConfigStatus,
    Detection, FirmwareVersion, Health, Hello, ReportedConfig, ResetReason, TrapConfig, Trigger,
};
use wildcam_sdk::seal::{ReplayWindow, SessionKey};

const T0: i64 = 1_700_000_000_000;
const HOUR_MS: i64 = 3_600_000;

struct Fixture {
    store: SqliteStore,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

async fn open_in(dir: &Path, clock: &ManualClock, destinations: &[&str]) -> Result<SqliteStore, StoreError> {
    let mut config = SqliteConfig::new(dir);
    config.clock = Arc::new(clock.clone());
    config.destinations = destinations.iter().map(|d| (*d).to_owned()).collect();
    SqliteStore::open(config).await
}

async fn fixture_with(destinations: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open_in(dir.path(), &clock, destinations).await.unwrap();
    Fixture { store, clock, _dir: dir }
}

async fn fixture() -> Fixture {
    fixture_with(&[]).await
}

fn id(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn new_device(name: &str, key: u8, authorization: ClaimAuthorization) -> NewDevice {
    NewDevice {
        id: id(name),
        identity_key: [key; 32],
        mqtt_password_hash: PasswordHash::of(&format!("password-{name}")),
        session_key: SessionKey::from_bytes([key ^ 0x5a; 32]),
        authorization,
    }
}

/// Registers a device through the allow-list.
async fn register(store: &SqliteStore, name: &str, key: u8) -> DeviceId {
    store
        .allow_identity([key; 32], format!("factory {key}"))
        .await
        .unwrap();
    store
        .create_device(new_device(name, key, ClaimAuthorization::AllowList))
        .await
        .unwrap()
        .id
}

fn token(name: &str, uses_max: u32, expires_at_ms: i64) -> NewClaimToken {
    NewClaimToken {
        id: name.to_owned(),
        secret_digest: SecretDigest::from_bytes([7; 32]),
        uses_max,
        expires_at_ms,
        label: "test".to_owned(),
    }
}

fn by_token(name: &str) -> ClaimAuthorization {
    ClaimAuthorization::Token { claim_id: name.to_owned() }
}

fn detection(seq: u32, captured_at: u32, classes: &[(u16, u8)]) -> Detection {
    let mut list = heapless::Vec::new();
    for &(label, confidence_pct) in classes {
        list.push(Classification { label, confidence_pct }).unwrap();
    }
    Detection {
        seq,
        captured_at,
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes: list,
        bbox: None,
        image_len: 40_000 + seq,
        image_digest: [seq as u8; 8],
        battery_mv: 3_900,
    }
}

fn received<M>(device: &DeviceId, message: M) -> Received<M> {
    Received { device_id: device.clone(), received_at_ms: T0 + 1_000, message }
}

fn detections(device: &DeviceId, seqs: &[u32]) -> IngestBatch {
    let detections = seqs
        .iter()
        .map(|&s| received(device, detection(s, 1_000 + s, &[])))
        .collect();
    IngestBatch { detections, ..IngestBatch::default() }
}

fn hello(device: &DeviceId, queue_floor: u32, queue_next: u32) -> Hello {
    Hello {
        device_id: device.clone(),
        hardware_model: heapless::String::try_from("wildcam-c3-rev2").unwrap(),
        chip: Chip::Esp32c3,
        firmware: FirmwareVersion { major: 1, minor: 4, patch: 2 },
        secure_version: 3,
        reset_reason: ResetReason::DeepSleepWake,
        capabilities: Capabilities::PIR.union(Capabilities::OTA),
        config_version: 0,
        queue_floor,
        queue_next,
    }
}

fn health(taken_at: u32) -> Health {
    Health {
        taken_at,
        battery_mv: 3_800,
        battery_soc_pct: 80,
        charge_state: ChargeState::Charging,
        solar_mw: 120,
        temperature_decicelsius: -35,
        storage_free_kib: 1_000_000,
        storage_errors: 0,
        rssi_dbm: -71,
        uptime_s: taken_at % 1_000,
        reset_reason: ResetReason::PowerOn,
        triggers_since_last: 2,
        queue_depth: 5,
        queue_dropped_total: 0,
    }
}

fn ack(device: &DeviceId, acked_through: u32) -> AckUpdate {
    AckUpdate { device_id: device.clone(), acked_through }
}

async fn all_detections(store: &SqliteStore, mut query: DetectionQuery) -> Vec<StoredDetection> {
    let mut out = Vec::new();
    loop {
        let page = store.query_detections(query.clone()).await.unwrap();
        out.extend(page.items);
        match page.next {
            Some(cursor) => query.page.cursor = Some(cursor),
            None => return out,
        }
    }
}

// ---------------------------------------------------------------- ingest

#[tokio::test]
async fn resends_are_stored_once_and_acked_again() {
    let f = fixture_with(&["aws"]).await;
    let cam = register(&f.store, "cam-1", 1).await;
    let commit = |seqs: &'static [u32]| f.store.commit_batch(detections(&cam, seqs));
    let first = commit(&[1, 2]).await.unwrap();
    assert_eq!(first.acks, [ack(&cam, 2)]);
    assert_eq!(first.detections_stored, 2);
    // 2 is resent alongside 3; then the whole batch is resent.
    let second = commit(&[2, 3]).await.unwrap();
    assert_eq!(second.acks, [ack(&cam, 3)]);
    assert_eq!(second.detections_stored, 1, "the resend is not counted");
    let resent = commit(&[2, 3]).await.unwrap();
    assert_eq!(resent.acks, [ack(&cam, 3)]);
    assert_eq!(resent.detections_stored, 0);
    let stored = all_detections(&f.store, DetectionQuery::default()).await;
    assert_eq!(stored.iter().map(|d| d.detection.seq).collect::<Vec<_>>(), [1, 2, 3]);
    // One outbox row per stored detection, none for resends.
    let outbox = f.store.outbox_pending("aws".into(), 100).await.unwrap();
    assert_eq!(outbox.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(outbox[0].message_id(), "cam-1/1");
    let payload: serde_json::Value = serde_json::from_str(&outbox[0].payload).unwrap();
    assert_eq!(payload["device_id"], "cam-1");
    assert_eq!(payload["detection"]["seq"], 1);
}

#[tokio::test]
async fn acked_through_is_the_highest_contiguous_sequence() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    assert_eq!(
        f.store
            .commit_batch(detections(&cam, &[4, 1, 2]))
            .await
            .unwrap()
            .acks,
        [ack(&cam, 2)]
    );
    assert_eq!(
        f.store
            .commit_batch(detections(&cam, &[3]))
            .await
            .unwrap()
            .acks,
        [ack(&cam, 4)]
    );
    assert_eq!(
        f.store
            .get_device(cam)
            .await
            .unwrap()
            .unwrap()
            .acked_through,
        4
    );
}

#[tokio::test]
async fn hello_queue_floor_moves_the_ack_past_dropped_sequences() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    assert_eq!(
        f.store
            .commit_batch(detections(&cam, &[1, 2, 6]))
            .await
            .unwrap()
            .acks,
        [ack(&cam, 2)]
    );
    // The trap dropped 3 and 4: its floor is 5.
    let batch = IngestBatch { hellos: vec![received(&cam, hello(&cam, 5, 7))], ..IngestBatch::default() };
    assert_eq!(f.store.commit_batch(batch).await.unwrap().acks, [ack(&cam, 4)]);
    assert_eq!(
        f.store
            .commit_batch(detections(&cam, &[5]))
            .await
            .unwrap()
            .acks,
        [ack(&cam, 6)]
    );
    let device = f.store.get_device(cam).await.unwrap().unwrap();
    assert_eq!((device.queue_floor, device.queue_next), (5, 7));
    let info = device.info.unwrap();
    assert_eq!(info.firmware, FirmwareVersion { major: 1, minor: 4, patch: 2 });
    assert_eq!((info.chip, info.reset_reason), (Chip::Esp32c3, ResetReason::DeepSleepWake));
    assert_eq!(info.hardware_model, "wildcam-c3-rev2");
}

#[tokio::test]
async fn a_failed_commit_stores_nothing_of_the_batch() {
    let f = fixture_with(&["aws"]).await;
    let cam = register(&f.store, "cam-1", 1).await;
    let mut batch = detections(&cam, &[1, 2, 3]);
    batch.hellos.push(received(&cam, hello(&cam, 1, 4)));
    batch.health.push(received(&cam, health(5_000)));
    batch
        .windows
        .push(UplinkWindow { device_id: cam.clone(), window: ReplayWindow::from_parts(9, 1) });
    // The last item names a device that does not exist: the whole batch fails
    // after the first items were written.
    batch
        .detections
        .push(received(&id("ghost"), detection(1, 1_001, &[])));
    let error = f.store.commit_batch(batch).await.unwrap_err();
    assert!(matches!(&error, StoreError::DeviceNotFound(ghost) if ghost.as_str() == "ghost"), "{error}");

    let device = f.store.get_device(cam.clone()).await.unwrap().unwrap();
    assert_eq!(device.acked_through, 0);
    assert_eq!((device.last_seen_at_ms, &device.info, &device.last_health), (None, &None, &None));
    assert!(
        all_detections(&f.store, DetectionQuery::default())
            .await
            .is_empty()
    );
    let query = HealthQuery {
        device_id: cam.clone(),
        taken_from_s: None,
        taken_until_s: None,
        newest_first: false,
        page: PageRequest::first(10),
    };
    assert!(
        f.store
            .health_history(query)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        f.store
            .outbox_pending("aws".into(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        f.store
            .device_keys(cam.clone())
            .await
            .unwrap()
            .unwrap()
            .uplink_window,
        ReplayWindow::new()
    );
    // The writer goes on.
    assert_eq!(
        f.store
            .commit_batch(detections(&cam, &[1]))
            .await
            .unwrap()
            .acks,
        [ack(&cam, 1)]
    );
}

#[tokio::test]
async fn batch_writes_health_windows_and_last_seen() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    let batch = IngestBatch {
        health: vec![received(&cam, health(5_000)), received(&cam, health(4_000))],
        windows: vec![UplinkWindow { device_id: cam.clone(), window: ReplayWindow::from_parts(10, 0b101) }],
        ..IngestBatch::default()
    };
    // Health and windows alone are stored but not acked.
    assert_eq!(f.store.commit_batch(batch).await.unwrap().acks, []);
    // A window committed late (older) is merged, never rolls back.
    let older = UplinkWindow { device_id: cam.clone(), window: ReplayWindow::from_parts(9, 1) };
    f.store
        .commit_batch(IngestBatch { windows: vec![older], ..IngestBatch::default() })
        .await
        .unwrap();
    let window = f
        .store
        .device_keys(cam.clone())
        .await
        .unwrap()
        .unwrap()
        .uplink_window;
    assert_eq!(window.highest(), 10);
    for seen in [10, 9, 8] {
        assert!(window.check(seen).is_err(), "counter {seen} must stay refused");
    }
    let device = f.store.get_device(cam).await.unwrap().unwrap();
    assert_eq!(device.last_seen_at_ms, Some(T0 + 1_000));
    assert_eq!(device.last_health.unwrap().taken_at, 5_000, "the most recent report by taken time");
}

#[tokio::test]
async fn oversized_and_invalid_batches_are_refused() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    let seqs: Vec<u32> = (1..=10_001).collect();
    let error = f
        .store
        .commit_batch(detections(&cam, &seqs))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::BatchTooLarge { items: 10_001, max: 10_000 }), "{error}");
    let error = f
        .store
        .commit_batch(detections(&cam, &[0]))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::InvalidInput(_)), "{error}");
    assert!(
        f.store
            .commit_batch(IngestBatch::default())
            .await
            .unwrap()
            .acks
            .is_empty()
    );
}

// ---------------------------------------------------------------- claims

#[tokio::test]
async fn single_use_token_creates_exactly_one_device() {
    let f = fixture().await;
    f.store
        .create_claim_token(token("tok1", 1, T0 + HOUR_MS))
        .await
        .unwrap();
    f.store
        .create_device(new_device("cam-1", 1, by_token("tok1")))
        .await
        .unwrap();
    let error = f
        .store
        .create_device(new_device("cam-2", 2, by_token("tok1")))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::ClaimTokenExhausted(_)), "{error}");
    assert!(f.store.get_device(id("cam-2")).await.unwrap().is_none());
    let info = f
        .store
        .get_claim_token("tok1".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info.uses, info.uses_max), (1, 1));
    assert!(info.secret_digest.matches(&[7; 32]));
}

#[tokio::test]
async fn concurrent_claims_on_a_single_use_token_one_wins() {
    let f = fixture().await;
    f.store
        .create_claim_token(token("tok1", 1, T0 + HOUR_MS))
        .await
        .unwrap();
    let store = Arc::new(f.store);
    let claims: Vec<_> = (0..2u8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .create_device(new_device(&format!("cam-{i}"), i + 1, by_token("tok1")))
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for claim in claims {
        results.push(claim.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(StoreError::ClaimTokenExhausted(_))))
    );
    let page = store.list_devices(DeviceQuery::default()).await.unwrap();
    assert_eq!(page.items.len(), 1);
}

#[tokio::test]
async fn multi_use_expired_revoked_and_unknown_tokens() {
    let f = fixture().await;
    f.store
        .create_claim_token(token("multi", 2, T0 + HOUR_MS))
        .await
        .unwrap();
    f.store
        .create_claim_token(token("short", 5, T0 + 1_000))
        .await
        .unwrap();
    f.store
        .create_claim_token(token("gone", 5, T0 + HOUR_MS))
        .await
        .unwrap();
    f.store.revoke_claim_token("gone".into()).await.unwrap();

    f.store
        .create_device(new_device("cam-1", 1, by_token("multi")))
        .await
        .unwrap();
    f.store
        .create_device(new_device("cam-2", 2, by_token("multi")))
        .await
        .unwrap();
    let exhausted = f
        .store
        .create_device(new_device("cam-3", 3, by_token("multi")))
        .await;
    assert!(matches!(exhausted, Err(StoreError::ClaimTokenExhausted(_))));
    let revoked = f
        .store
        .create_device(new_device("cam-3", 3, by_token("gone")))
        .await;
    assert!(matches!(revoked, Err(StoreError::ClaimTokenRevoked(_))));
    let unknown = f
        .store
        .create_device(new_device("cam-3", 3, by_token("nope")))
        .await;
    assert!(matches!(unknown, Err(StoreError::ClaimTokenNotFound(_))));
    f.clock.advance(1_000);
    let expired = f
        .store
        .create_device(new_device("cam-3", 3, by_token("short")))
        .await;
    assert!(matches!(expired, Err(StoreError::ClaimTokenExpired(_))));
    assert_eq!(
        f.store
            .list_claim_tokens(PageRequest::first(10))
            .await
            .unwrap()
            .items
            .len(),
        3
    );
    let duplicate = f
        .store
        .create_claim_token(token("multi", 1, T0 + HOUR_MS))
        .await;
    assert!(matches!(duplicate, Err(StoreError::ClaimTokenExists(_))));
}

#[tokio::test]
async fn a_refused_claim_consumes_no_token_use() {
    let f = fixture().await;
    f.store
        .create_claim_token(token("tok", 3, T0 + HOUR_MS))
        .await
        .unwrap();
    f.store
        .create_device(new_device("cam-1", 1, by_token("tok")))
        .await
        .unwrap();
    // Same identity again, then a taken device id.
    let again = f
        .store
        .create_device(new_device("cam-2", 1, by_token("tok")))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, StoreError::IdentityAlreadyClaimed { device_id } if device_id.as_str() == "cam-1")
    );
    let taken = f
        .store
        .create_device(new_device("cam-1", 2, by_token("tok")))
        .await
        .unwrap_err();
    assert!(matches!(taken, StoreError::DeviceIdTaken(_)), "{taken}");
    assert_eq!(
        f.store
            .get_claim_token("tok".into())
            .await
            .unwrap()
            .unwrap()
            .uses,
        1
    );
}

#[tokio::test]
async fn allow_list_authorizes_claims_without_token() {
    let f = fixture().await;
    let refused = f
        .store
        .create_device(new_device("cam-1", 1, ClaimAuthorization::AllowList))
        .await;
    assert!(matches!(refused, Err(StoreError::NotOnAllowList)));
    f.store
        .allow_identity([1; 32], "batch 7".into())
        .await
        .unwrap();
    f.store
        .allow_identity([2; 32], "batch 7".into())
        .await
        .unwrap();
    assert_eq!(
        f.store
            .allowed_identity([1; 32])
            .await
            .unwrap()
            .unwrap()
            .note,
        "batch 7"
    );
    let device = f
        .store
        .create_device(new_device("cam-1", 1, ClaimAuthorization::AllowList))
        .await
        .unwrap();
    assert_eq!((device.claim_id, device.status), (None, DeviceStatus::Active));
    let first = f
        .store
        .list_allowed_identities(PageRequest::first(1))
        .await
        .unwrap();
    assert_eq!(first.items[0].identity_key, [1; 32]);
    let second = f
        .store
        .list_allowed_identities(PageRequest::after(1, first.next.unwrap()))
        .await
        .unwrap();
    assert_eq!((second.items[0].identity_key, second.next), ([2; 32], None));
    assert!(f.store.disallow_identity([2; 32]).await.unwrap());
    assert!(!f.store.disallow_identity([2; 32]).await.unwrap());
}

// ---------------------------------------------------------------- devices

#[tokio::test]
async fn revoked_device_lookups_say_revoked() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    let credentials = f
        .store
        .device_credentials(cam.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(credentials.status, DeviceStatus::Active);
    assert!(credentials.mqtt_password_hash.verify("password-cam-1"));
    assert!(!credentials.mqtt_password_hash.verify("password-cam-2"));

    f.clock.advance(5);
    f.store.revoke_device(cam.clone()).await.unwrap();
    f.clock.advance(5);
    f.store.revoke_device(cam.clone()).await.unwrap();
    let credentials = f
        .store
        .device_credentials(cam.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(credentials.status, DeviceStatus::Revoked);
    let keys = f.store.device_keys(cam.clone()).await.unwrap().unwrap();
    assert_eq!(keys.status, DeviceStatus::Revoked);
    assert_eq!(keys.session_key.as_bytes(), &[1 ^ 0x5a; 32]);
    let device = f.store.get_device(cam.clone()).await.unwrap().unwrap();
    assert_eq!(device.revoked_at_ms, Some(T0 + 5), "revoking twice keeps the first time");
    // Its identity cannot claim again, and it gets no commands.
    let reclaim = f
        .store
        .create_device(new_device("cam-9", 1, ClaimAuthorization::AllowList))
        .await;
    assert!(matches!(reclaim, Err(StoreError::IdentityRevoked { .. })));
    let command = f.store.enqueue_command(cam, CommandKind::Reboot, 60).await;
    assert!(matches!(command, Err(StoreError::DeviceRevoked(_))));
    assert!(
        f.store
            .device_credentials(id("nobody"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(f.store.revoke_device(id("nobody")).await, Err(StoreError::DeviceNotFound(_))));
}

#[tokio::test]
async fn downlink_reservation_is_a_compare_and_set() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    assert_eq!(
        f.store
            .device_keys(cam.clone())
            .await
            .unwrap()
            .unwrap()
            .downlink_reservation,
        0
    );
    f.store
        .persist_downlink_reservation(cam.clone(), 0, 1_025)
        .await
        .unwrap();
    // A second sealer that also resumed from 0 must reload.
    let stale = f
        .store
        .persist_downlink_reservation(cam.clone(), 0, 1_025)
        .await
        .unwrap_err();
    assert!(matches!(stale, StoreError::ReservationConflict { current: 1_025, expected: 0, .. }), "{stale}");
    let backwards = f
        .store
        .persist_downlink_reservation(cam.clone(), 1_025, 10)
        .await;
    assert!(matches!(backwards, Err(StoreError::InvalidInput(_))));
    f.store
        .persist_downlink_reservation(cam.clone(), 1_025, 2_049)
        .await
        .unwrap();
    assert_eq!(
        f.store
            .device_keys(cam)
            .await
            .unwrap()
            .unwrap()
            .downlink_reservation,
        2_049
    );
}

#[tokio::test]
async fn registry_filters_and_pages() {
    let f = fixture().await;
    for (i, name) in ["a-1", "a-2", "b-1", "b-2", "c-1"].iter().enumerate() {
        register(&f.store, name, i as u8 + 1).await;
    }
    f.store
        .set_groups(id("a-1"), vec!["north".into(), "pilot".into()])
        .await
        .unwrap();
    f.store
        .set_groups(id("b-1"), vec!["north".into()])
        .await
        .unwrap();
    f.store
        .set_tags(id("a-2"), vec!["solar".into(), "solar".into()])
        .await
        .unwrap();
    f.store
        .set_tags(id("b-2"), vec!["solar".into()])
        .await
        .unwrap();
    let ridge = Deployment {
        site: "ridge".into(),
        latitude: Some(46.5),
        longitude: Some(7.9),
        camera_height_m: Some(1.5),
        start_ms: Some(T0),
        end_ms: None,
    };
    f.store
        .set_deployment(id("b-1"), Some(ridge.clone()))
        .await
        .unwrap();
    f.store
        .set_deployment(id("c-1"), Some(ridge.clone()))
        .await
        .unwrap();
    f.store.revoke_device(id("c-1")).await.unwrap();
    f.store
        .commit_batch(detections(&id("a-2"), &[1]))
        .await
        .unwrap();

    let names = |page: wildcam_fleet_server::store::Page<wildcam_fleet_server::store::Device>| {
        page.items
            .into_iter()
            .map(|d| d.id.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    let query = |f: fn(&mut DeviceQuery)| {
        let mut q = DeviceQuery { page: PageRequest::first(100), ..DeviceQuery::default() };
        f(&mut q);
        q
    };
    assert_eq!(
        names(
            f.store
                .list_devices(query(|q| q.group = Some("north".into())))
                .await
                .unwrap()
        ),
        ["a-1", "b-1"]
    );
    assert_eq!(
        names(
            f.store
                .list_devices(query(|q| q.tag = Some("solar".into())))
                .await
                .unwrap()
        ),
        ["a-2", "b-2"]
    );
    assert_eq!(
        names(
            f.store
                .list_devices(query(|q| q.site = Some("ridge".into())))
                .await
                .unwrap()
        ),
        ["b-1", "c-1"]
    );
    let revoked = query(|q| q.status = Some(DeviceStatus::Revoked));
    assert_eq!(names(f.store.list_devices(revoked).await.unwrap()), ["c-1"]);
    let seen = query(|q| q.seen_since_ms = Some(T0));
    assert_eq!(names(f.store.list_devices(seen).await.unwrap()), ["a-2"]);
    let both = query(|q| {
        q.site = Some("ridge".into());
        q.status = Some(DeviceStatus::Active);
    });
    assert_eq!(names(f.store.list_devices(both).await.unwrap()), ["b-1"]);

    let mut all = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let result = f
            .store
            .list_devices(DeviceQuery { page: page.clone(), ..DeviceQuery::default() })
            .await
            .unwrap();
        all.extend(result.items.into_iter().map(|d| d.id.as_str().to_owned()));
        match result.next {
            Some(next) => page = PageRequest::after(2, next),
            None => break,
        }
    }
    assert_eq!(all, ["a-1", "a-2", "b-1", "b-2", "c-1"]);

    let a1 = f.store.get_device(id("a-1")).await.unwrap().unwrap();
    assert_eq!((a1.groups, a1.tags), (vec!["north".to_owned(), "pilot".to_owned()], vec![]));
    assert_eq!(
        f.store
            .get_device(id("b-1"))
            .await
            .unwrap()
            .unwrap()
            .deployment,
        Some(ridge)
    );
    f.store.set_deployment(id("b-1"), None).await.unwrap();
    assert_eq!(
        f.store
            .get_device(id("b-1"))
            .await
            .unwrap()
            .unwrap()
            .deployment,
        None
    );
    let bad = Deployment {
        site: "x".into(),
        latitude: Some(100.0),
        longitude: Some(0.0),
        camera_height_m: None,
        start_ms: None,
        end_ms: None,
    };
    assert!(matches!(f.store.set_deployment(id("b-1"), Some(bad)).await, Err(StoreError::InvalidInput(_))));
    assert!(matches!(f.store.set_tags(id("zz"), vec![]).await, Err(StoreError::DeviceNotFound(_))));
}

// ---------------------------------------------------------------- durability

#[tokio::test]
async fn everything_committed_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    {
        let store = open_in(dir.path(), &clock, &["gcp"]).await.unwrap();
        let cam = register(&store, "cam-1", 1).await;
        store
            .commit_batch(detections(&cam, &[1, 2, 3]))
            .await
            .unwrap();
        store
            .set_tags(cam.clone(), vec!["solar".into()])
            .await
            .unwrap();
        store
            .enqueue_command(cam, CommandKind::CaptureNow, 600)
            .await
            .unwrap();
        // Dropped without close(): every acknowledged commit must be on disk.
    }
    let store = open_in(dir.path(), &clock, &["gcp"]).await.unwrap();
    let device = store.get_device(id("cam-1")).await.unwrap().unwrap();
    assert_eq!((device.acked_through, device.tags), (3, vec!["solar".to_owned()]));
    assert_eq!(
        all_detections(&store, DetectionQuery::default())
            .await
            .len(),
        3
    );
    assert_eq!(store.outbox_pending("gcp".into(), 10).await.unwrap().len(), 3);
    assert_eq!(store.commands_to_deliver(id("cam-1")).await.unwrap().len(), 1);
    store.close().await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(store.get_device(id("cam-1")).await, Err(StoreError::Closed)));

    let store = open_in(dir.path(), &clock, &[]).await.unwrap();
    assert_eq!(
        store
            .get_device(id("cam-1"))
            .await
            .unwrap()
            .unwrap()
            .acked_through,
        3
    );
    store.close().await.unwrap();
    assert!(store.path().ends_with("wildcam.db"));
}

#[tokio::test]
async fn a_database_from_newer_code_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    open_in(dir.path(), &clock, &[])
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("wildcam.db")).unwrap();
    conn.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION + 1])
        .unwrap();
    drop(conn);
    let error = open_in(dir.path(), &clock, &[]).await.unwrap_err();
    assert!(
        matches!(error, StoreError::SchemaTooNew { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION)
    );
    assert!(error.to_string().contains("upgrade the server"), "{error}");
}

#[tokio::test]
async fn data_dir_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    let store = open_in(&nested, &ManualClock::new(T0), &[]).await.unwrap();
    assert!(nested.join("wildcam.db").exists());
    store.close().await.unwrap();
}

// ---------------------------------------------------------------- queries

/// 3 devices × 30 detections with varied times, labels and confidences.
async fn query_fixture() -> (Fixture, Vec<StoredDetection>) {
    let f = fixture().await;
    let mut batch = IngestBatch::default();
    for (d, name) in ["cam-a", "cam-b", "cam-c"].iter().enumerate() {
        let cam = register(&f.store, name, d as u8 + 1).await;
        for seq in 1..=30u32 {
            // Times collide across devices so the tie-breakers matter.
            let captured = 10_000 + (seq / 2) * 60;
            let label = (seq % 4) as u16;
            let classes = match seq % 3 {
                0 => vec![],
                1 => vec![(label, (seq * 3 % 101) as u8)],
                _ => vec![(label, 90), ((label + 1) % 4, (seq * 7 % 101) as u8)],
            };
            batch
                .detections
                .push(received(&cam, detection(seq, captured, &classes)));
        }
    }
    f.store.commit_batch(batch.clone()).await.unwrap();
    let mut all: Vec<StoredDetection> = batch
        .detections
        .into_iter()
        .map(|r| StoredDetection {
            device_id: r.device_id,
            received_at_ms: r.received_at_ms,
            detection: r.message,
        })
        .collect();
    all.sort_by(|a, b| {
        (a.detection.captured_at, a.device_id.as_str(), a.detection.seq).cmp(&(
            b.detection.captured_at,
            b.device_id.as_str(),
            b.detection.seq,
        ))
    });
    (f, all)
}

/// What a query case must select, evaluated in Rust over every detection.
type Predicate = Box<dyn Fn(&StoredDetection) -> bool>;

#[tokio::test]
async fn detection_queries_return_exactly_the_matching_rows() {
    let (f, all) = query_fixture().await;
    let cases: Vec<(DetectionQuery, Predicate)> = vec![
        (DetectionQuery::default(), Box::new(|_| true)),
        (
            DetectionQuery { device_id: Some(id("cam-b")), ..DetectionQuery::default() },
            Box::new(|d| d.device_id.as_str() == "cam-b"),
        ),
        (
            DetectionQuery {
                captured_from_s: Some(10_120),
                captured_until_s: Some(10_600),
                ..DetectionQuery::default()
            },
            Box::new(|d| (10_120..10_600).contains(&d.detection.captured_at)),
        ),
        (
            DetectionQuery { label: Some(2), ..DetectionQuery::default() },
            Box::new(|d| d.detection.classes.iter().any(|c| c.label == 2)),
        ),
        (
            DetectionQuery { label: Some(1), min_confidence_pct: Some(50), ..DetectionQuery::default() },
            Box::new(|d| {
                d.detection
                    .classes
                    .iter()
                    .any(|c| c.label == 1 && c.confidence_pct >= 50)
            }),
        ),
        (
            DetectionQuery { min_confidence_pct: Some(85), ..DetectionQuery::default() },
            Box::new(|d| d.detection.classes.iter().any(|c| c.confidence_pct >= 85)),
        ),
        (
            DetectionQuery {
                device_id: Some(id("cam-c")),
                captured_from_s: Some(10_300),
                label: Some(3),
                min_confidence_pct: Some(10),
                ..DetectionQuery::default()
            },
            Box::new(|d| {
                d.device_id.as_str() == "cam-c"
                    && d.detection.captured_at >= 10_300
                    && d.detection
                        .classes
                        .iter()
                        .any(|c| c.label == 3 && c.confidence_pct >= 10)
            }),
        ),
    ];
    for (i, (query, matches)) in cases.into_iter().enumerate() {
        let expected: Vec<_> = all.iter().filter(|d| matches(d)).cloned().collect();
        assert!(!expected.is_empty(), "case {i} must select something");
        for newest_first in [false, true] {
            let paged = DetectionQuery { newest_first, page: PageRequest::first(7), ..query.clone() };
            let mut want = expected.clone();
            if newest_first {
                want.reverse();
            }
            assert_eq!(all_detections(&f.store, paged).await, want, "case {i}, newest_first {newest_first}");
        }
    }
}

#[tokio::test]
async fn pagination_limits_and_cursors_are_checked() {
    let (f, all) = query_fixture().await;
    for limit in [0, 1_001] {
        let query = DetectionQuery { page: PageRequest::first(limit), ..DetectionQuery::default() };
        assert!(matches!(f.store.query_detections(query).await, Err(StoreError::LimitOutOfRange { .. })));
    }
    let first = f
        .store
        .query_detections(DetectionQuery { page: PageRequest::first(1_000), ..DetectionQuery::default() })
        .await
        .unwrap();
    assert_eq!((first.items.len(), first.next), (all.len(), None));
    for bad in ["det:x:1:cam-a", "dev:cam-a", "det:1"] {
        let query =
            DetectionQuery { page: PageRequest::after(10, Cursor::new(bad)), ..DetectionQuery::default() };
        assert!(matches!(f.store.query_detections(query).await, Err(StoreError::InvalidCursor)), "{bad}");
    }
}

#[tokio::test]
async fn health_history_by_time_range_and_pages() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    let other = register(&f.store, "cam-2", 2).await;
    let mut batch = IngestBatch::default();
    for taken in [100, 200, 200, 300, 400, 500] {
        batch.health.push(received(&cam, health(taken)));
    }
    batch.health.push(received(&other, health(300)));
    f.store.commit_batch(batch).await.unwrap();
    let mut query = HealthQuery {
        device_id: cam.clone(),
        taken_from_s: Some(200),
        taken_until_s: Some(500),
        newest_first: false,
        page: PageRequest::first(2),
    };
    let mut taken = Vec::new();
    loop {
        let page = f.store.health_history(query.clone()).await.unwrap();
        assert!(page.items.iter().all(|h| h.device_id == cam));
        taken.extend(page.items.iter().map(|h| h.health.taken_at));
        match page.next {
            Some(next) => query.page = PageRequest::after(2, next),
            None => break,
        }
    }
    assert_eq!(taken, [200, 200, 300, 400]);
    let newest = HealthQuery {
        newest_first: true,
        taken_from_s: None,
        taken_until_s: None,
        page: PageRequest::first(1),
        ..query
    };
    let page = f.store.health_history(newest).await.unwrap();
    assert_eq!(page.items[0].health, health(500));
}

// ---------------------------------------------------------------- configuration and commands

fn config(checkin_interval_s: u32) -> TrapConfig {
    TrapConfig { checkin_interval_s, ..TrapConfig::default() }
}

#[tokio::test]
async fn desired_config_versions_climb_above_anything_reported() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    assert_eq!(
        f.store
            .set_desired_config(cam.clone(), config(600))
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        f.store
            .set_desired_config(cam.clone(), config(900))
            .await
            .unwrap()
            .version,
        2
    );
    let report =
        ReportedConfig { version: 5, status: ConfigStatus::Applied, desired_version: 2, config: config(900) };
    f.store
        .record_reported_config(cam.clone(), report.clone(), T0 + 7)
        .await
        .unwrap();
    let desired = f
        .store
        .set_desired_config(cam.clone(), config(1_200))
        .await
        .unwrap();
    assert_eq!(desired.version, 6);
    let device = f.store.get_device(cam.clone()).await.unwrap().unwrap();
    assert_eq!(device.desired_config.unwrap().desired, desired);
    let reported = device.reported_config.unwrap();
    assert_eq!((reported.report, reported.received_at_ms), (report, T0 + 7));
    let invalid = f.store.set_desired_config(cam, config(1)).await;
    assert!(matches!(invalid, Err(StoreError::InvalidInput(_))));
}

#[tokio::test]
async fn commands_are_delivered_answered_and_expire() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    let other = register(&f.store, "cam-2", 2).await;
    let reboot = f
        .store
        .enqueue_command(cam.clone(), CommandKind::Reboot, 60)
        .await
        .unwrap();
    let image = f
        .store
        .enqueue_command(cam.clone(), CommandKind::SendFullImage { seq: 9 }, 3_600)
        .await
        .unwrap();
    assert_eq!(reboot.state, CommandState::Pending);
    assert_eq!(reboot.to_message(T0).unwrap().ttl_s, 60);

    let due = f.store.commands_to_deliver(cam.clone()).await.unwrap();
    assert_eq!(due.iter().map(|c| c.id).collect::<Vec<_>>(), [reboot.id, image.id]);
    f.store
        .mark_command_delivered(cam.clone(), reboot.id)
        .await
        .unwrap();
    // Another device can neither see nor answer this device's commands.
    assert!(
        f.store
            .commands_to_deliver(other.clone())
            .await
            .unwrap()
            .is_empty()
    );
    let foreign = f
        .store
        .record_command_result(other, CommandResult { id: reboot.id, status: CommandStatus::Done })
        .await;
    assert!(matches!(foreign, Err(StoreError::CommandNotFound { .. })));

    let done = f
        .store
        .record_command_result(cam.clone(), CommandResult { id: reboot.id, status: CommandStatus::Done })
        .await
        .unwrap();
    assert_eq!(
        (done.state, done.result, done.deliveries),
        (CommandState::Done, Some(CommandStatus::Done), 1)
    );
    let repeat = CommandResult { id: reboot.id, status: CommandStatus::Duplicate };
    assert_eq!(
        f.store
            .record_command_result(cam.clone(), repeat)
            .await
            .unwrap()
            .result,
        Some(CommandStatus::Done)
    );

    // After an hour the image request has expired and is no longer due.
    f.clock.advance(HOUR_MS);
    assert!(
        f.store
            .commands_to_deliver(cam.clone())
            .await
            .unwrap()
            .is_empty()
    );
    let listed = f
        .store
        .list_commands(cam.clone(), PageRequest::first(1))
        .await
        .unwrap();
    assert_eq!((listed.items[0].id, listed.items[0].state), (image.id, CommandState::Expired));
    let rest = f
        .store
        .list_commands(cam.clone(), PageRequest::after(1, listed.next.unwrap()))
        .await
        .unwrap();
    assert_eq!((rest.items[0].id, rest.next), (reboot.id, None));
    let ttl = f.store.enqueue_command(cam, CommandKind::Reboot, 0).await;
    assert!(matches!(ttl, Err(StoreError::InvalidInput(_))));
}

#[tokio::test]
async fn open_commands_per_device_are_bounded() {
    let f = fixture().await;
    let cam = register(&f.store, "cam-1", 1).await;
    for _ in 0..wildcam_fleet_server::store::OPEN_COMMANDS_MAX {
        f.store
            .enqueue_command(cam.clone(), CommandKind::CaptureNow, 60)
            .await
            .unwrap();
    }
    let full = f
        .store
        .enqueue_command(cam.clone(), CommandKind::CaptureNow, 60)
        .await;
    assert!(matches!(full, Err(StoreError::TooManyOpenCommands { .. })));
    f.clock.advance(61_000);
    f.store
        .enqueue_command(cam, CommandKind::CaptureNow, 60)
        .await
        .unwrap();
}

// ---------------------------------------------------------------- outbox and API tokens

#[tokio::test]
async fn outbox_rows_per_destination_are_drained() {
    let f = fixture_with(&["aws", "azure"]).await;
    let cam = register(&f.store, "cam-1", 1).await;
    f.store
        .commit_batch(detections(&cam, &[1, 2]))
        .await
        .unwrap();
    let aws = f.store.outbox_pending("aws".into(), 10).await.unwrap();
    let azure = f.store.outbox_pending("azure".into(), 10).await.unwrap();
    assert_eq!((aws.len(), azure.len()), (2, 2));
    assert_eq!(aws[0].payload, azure[0].payload);
    let ids: Vec<i64> = aws.iter().map(|e| e.id).collect();
    assert_eq!(f.store.outbox_mark_delivered(ids.clone()).await.unwrap(), 2);
    assert_eq!(f.store.outbox_mark_delivered(ids).await.unwrap(), 0);
    assert!(
        f.store
            .outbox_pending("aws".into(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        f.store
            .outbox_pending("azure".into(), 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn api_tokens_carry_roles_and_can_be_revoked() {
    let f = fixture().await;
    let admin = f
        .store
        .create_api_token(ApiRole::Admin, "ops".into())
        .await
        .unwrap();
    let reader = f
        .store
        .create_api_token(ApiRole::ReadOnly, "dashboard".into())
        .await
        .unwrap();
    assert!(!format!("{admin:?}").contains(&admin.token), "Debug must not show the token");

    let found = f
        .store
        .api_token_by_hash(TokenHash::of(&reader.token))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, reader.info);
    assert!(found.grants(ApiRole::ReadOnly) && !found.grants(ApiRole::Admin));
    let found = f
        .store
        .api_token_by_hash(TokenHash::of(&admin.token))
        .await
        .unwrap()
        .unwrap();
    assert!(found.grants(ApiRole::Admin) && found.grants(ApiRole::ReadOnly));
    assert!(
        f.store
            .api_token_by_hash(TokenHash::of("wcat_guess"))
            .await
            .unwrap()
            .is_none()
    );

    f.store.revoke_api_token(admin.info.id).await.unwrap();
    let revoked = f
        .store
        .api_token_by_hash(TokenHash::of(&admin.token))
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at_ms.is_some() && !revoked.grants(ApiRole::ReadOnly));
    let listed = f
        .store
        .list_api_tokens(PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .map(|t| t.label.as_str())
            .collect::<Vec<_>>(),
        ["ops", "dashboard"]
    );
    assert!(matches!(f.store.revoke_api_token(999).await, Err(StoreError::ApiTokenNotFound(999))));
}

// ---------------------------------------------------------------- concurrency

#[tokio::test]
async fn many_concurrent_callers_through_a_small_writer_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SqliteConfig::new(dir.path());
    config.writer_queue_capacity = 1;
    config.readers = 1;
    config.reader_queue_capacity = 1;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(config).await.unwrap());
    let cam = {
        store.allow_identity([1; 32], String::new()).await.unwrap();
        store
            .create_device(new_device("cam-1", 1, ClaimAuthorization::AllowList))
            .await
            .unwrap()
            .id
    };
    let tasks: Vec<_> = (1..=20u32)
        .map(|seq| {
            let (store, cam) = (Arc::clone(&store), cam.clone());
            tokio::spawn(async move {
                store.commit_batch(detections(&cam, &[seq])).await?;
                store.get_device(cam).await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap().is_some());
    }
    assert_eq!(store.get_device(cam).await.unwrap().unwrap().acked_through, 20);
    store.close().await.unwrap();
}
