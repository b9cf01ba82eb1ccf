//! Round-trip and property tests for every protocol v1 message.

use proptest::collection::vec;
use proptest::prelude::*;
mod common;

use common::typical_detection;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::*;

fn device_id() -> impl Strategy<Value = DeviceId> {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,31}".prop_map(|s| DeviceId::new(&s).expect("valid by construction"))
}

fn heapless_string<const N: usize>() -> impl Strategy<Value = heapless::String<N>> {
    proptest::string::string_regex(&format!("[ -~é]{{0,{}}}", N / 2))
        .expect("regex")
        .prop_map(|s| heapless::String::try_from(s.as_str()).expect("short enough"))
}

fn heapless_vec<T: core::fmt::Debug, const N: usize>(
    item: impl Strategy<Value = T>,
) -> impl Strategy<Value = heapless::Vec<T, N>> {
    vec(item, 0..=N).prop_map(|v| v.into_iter().collect())
}

fn chip() -> impl Strategy<Value = Chip> {
    prop_oneof![Just(Chip::Esp32c3), Just(Chip::Esp32c6), Just(Chip::Host)]
}

fn firmware() -> impl Strategy<Value = FirmwareVersion> {
    (any::<u16>(), any::<u16>(), any::<u16>()).prop_map(|(major, minor, patch)| FirmwareVersion {
        major,
        minor,
        patch,
    })
}

fn reset_reason() -> impl Strategy<Value = ResetReason> {
    prop_oneof![
        Just(ResetReason::PowerOn),
        Just(ResetReason::Brownout),
        Just(ResetReason::Watchdog),
        Just(ResetReason::Panic),
        Just(ResetReason::Software),
        Just(ResetReason::DeepSleepWake),
        Just(ResetReason::External),
        Just(ResetReason::Unknown),
    ]
}

prop_compose! {
    fn hello()(device_id in device_id(), hardware_model in heapless_string(), chip in chip(),
               firmware in firmware(), secure_version in any::<u32>(), reset_reason in reset_reason(),
               capabilities in any::<u32>(), config_version in any::<u32>(), a in any::<u32>(), b in any::<u32>()) -> Hello {
        Hello { device_id, hardware_model, chip, firmware, secure_version, reset_reason,
                capabilities: Capabilities(capabilities), config_version,
                queue_floor: a.min(b), queue_next: a.max(b) }
    }
}

prop_compose! {
    fn bbox()(x in 0..=BBOX_SCALE, y in 0..=BBOX_SCALE)
             (x in Just(x), y in Just(y), width in 0..=BBOX_SCALE - x, height in 0..=BBOX_SCALE - y) -> BoundingBox {
        BoundingBox { x, y, width, height }
    }
}

prop_compose! {
    fn detection()(seq in 1..=u32::MAX, captured_at in any::<u32>(),
                   trigger in prop_oneof![Just(Trigger::Pir), Just(Trigger::TimeLapse), Just(Trigger::Manual)],
                   burst_len in 1..=u8::MAX)
                  (seq in Just(seq), captured_at in Just(captured_at), trigger in Just(trigger),
                   burst_len in Just(burst_len), burst_index in 0..burst_len,
                   classes in heapless_vec((any::<u16>(), 0..=100u8).prop_map(|(label, confidence_pct)| Classification { label, confidence_pct })),
                   bbox in proptest::option::of(bbox()), image_len in any::<u32>(), image_digest in any::<[u8; 8]>(), battery_mv in any::<u16>()) -> Detection {
        Detection { seq, captured_at, trigger, burst_index, burst_len, classes, bbox, image_len, image_digest, battery_mv }
    }
}

prop_compose! {
    fn health()(taken_at in any::<u32>(), battery_mv in any::<u16>(), battery_soc_pct in 0..=100u8,
                charge_state in prop_oneof![Just(ChargeState::Discharging), Just(ChargeState::Charging), Just(ChargeState::Full), Just(ChargeState::Unknown)],
                solar_mw in any::<u16>(), temperature_decicelsius in any::<i16>(), storage_free_kib in any::<u32>(), storage_errors in any::<u16>(),
                rssi_dbm in any::<i8>(), uptime_s in any::<u32>(), reset_reason in reset_reason(), triggers_since_last in any::<u16>(),
                queue_depth in any::<u32>(), queue_dropped_total in any::<u32>()) -> Health {
        Health { taken_at, battery_mv, battery_soc_pct, charge_state, solar_mw, temperature_decicelsius,
                 storage_free_kib, storage_errors, rssi_dbm, uptime_s, reset_reason, triggers_since_last,
                 queue_depth, queue_dropped_total }
    }
}

prop_compose! {
    fn trap_config()(pir_sensitivity_pct in 0..=100u8, burst_len in 1..=BURST_LEN_MAX,
                     capture_windows in heapless_vec((0..MINUTES_PER_DAY, 0..MINUTES_PER_DAY).prop_map(|(start_min, end_min)| CaptureWindow { start_min, end_min })),
                     timelapse_interval_s in any::<u32>(),
                     checkin_interval_s in CHECKIN_INTERVAL_MIN_S..=CHECKIN_INTERVAL_MAX_S,
                     upload_policy in prop_oneof![Just(UploadPolicy::MetadataOnly), Just(UploadPolicy::NonBlankImages), Just(UploadPolicy::AllImages)]) -> TrapConfig {
        TrapConfig { pir_sensitivity_pct, burst_len, capture_windows, timelapse_interval_s, checkin_interval_s, upload_policy }
    }
}

fn command_kind() -> impl Strategy<Value = CommandKind> {
    prop_oneof![
        Just(CommandKind::Reboot),
        Just(CommandKind::CaptureNow),
        Just(CommandKind::FormatStorage),
        any::<u32>().prop_map(|seq| CommandKind::SendFullImage { seq }),
    ]
}

fn config_status() -> impl Strategy<Value = ConfigStatus> {
    prop_oneof![
        Just(ConfigStatus::Applied),
        Just(ConfigStatus::RejectedUnsupported),
        Just(ConfigStatus::RejectedInvalid)
    ]
}

fn command_status() -> impl Strategy<Value = CommandStatus> {
    prop_oneof![
        Just(CommandStatus::Done),
        Just(CommandStatus::Expired),
        Just(CommandStatus::Unsupported),
        Just(CommandStatus::Failed),
        Just(CommandStatus::Duplicate),
    ]
}

/// Encodes, checks the size bound and the header, decodes, and compares.
fn round_trip<M: Message + PartialEq + core::fmt::Debug>(message: &M) -> usize {
    let mut buf = vec![0u8; M::ENCODED_LEN_MAX];
    let len = encode(message, &mut buf)
        .expect("fits in ENCODED_LEN_MAX")
        .len();
    assert!(len <= M::ENCODED_LEN_MAX);
    assert_eq!(buf[0], PROTOCOL_VERSION);
    assert_eq!(buf[1], M::KIND as u8);
    let decoded: M = decode(&buf[..len]).expect("decodes");
    assert_eq!(&decoded, message);
    // Any strict prefix is refused, never misread.
    for cut in 0..len {
        assert!(decode::<M>(&buf[..cut]).is_err(), "prefix of {cut} bytes accepted");
    }
    // A trailing byte is refused.
    buf.truncate(len);
    buf.push(0);
    assert_eq!(decode::<M>(&buf), Err(ProtocolError::DecodeTrailingBytes));
    len
}

proptest! {
    #[test]
    fn hello_round_trips(m in hello()) { round_trip(&m); }

    #[test]
    fn detection_round_trips(m in detection()) { round_trip(&m); }

    #[test]
    fn health_round_trips(m in health()) { round_trip(&m); }

    #[test]
    fn ack_round_trips(through: u32) { round_trip(&Ack { through }); }

    #[test]
    fn desired_config_round_trips(version: u32, config in trap_config()) {
        round_trip(&DesiredConfig { version, config });
    }

    #[test]
    fn reported_config_round_trips(version: u32, desired_version: u32, status in config_status(), config in trap_config()) {
        round_trip(&ReportedConfig { version, status, desired_version, config });
    }

    #[test]
    fn command_round_trips(id: u32, ttl_s in 1..=u32::MAX, kind in command_kind()) {
        round_trip(&Command { id, ttl_s, kind });
    }

    #[test]
    fn command_result_round_trips(id: u32, status in command_status()) {
        round_trip(&CommandResult { id, status });
    }

    #[test]
    fn wrong_kind_is_refused(m in detection()) {
        let mut buf = [0u8; Detection::ENCODED_LEN_MAX];
        let len = encode(&m, &mut buf).unwrap().len();
        prop_assert_eq!(decode::<Health>(&buf[..len]), Err(ProtocolError::KindUnexpected));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..200)) {
        let _ = decode::<Detection>(&bytes);
        let _ = decode::<Hello>(&bytes);
        let _ = decode::<DesiredConfig>(&bytes);
    }
}

#[test]
fn typical_detection_fits_in_48_bytes() {
    let len = round_trip(&typical_detection());
    assert!(len <= 48, "typical detection encodes to {len} bytes");
}

#[test]
fn version_and_unknown_kind_are_refused() {
    let mut buf = [0u8; Ack::ENCODED_LEN_MAX];
    let len = encode(&Ack { through: 7 }, &mut buf).unwrap().len();
    let mut wrong_version = buf;
    wrong_version[0] = 2;
    assert_eq!(decode::<Ack>(&wrong_version[..len]), Err(ProtocolError::VersionUnsupported));
    let mut unknown_kind = buf;
    unknown_kind[1] = 0x7f;
    assert_eq!(decode::<Ack>(&unknown_kind[..len]), Err(ProtocolError::KindUnknown));
    assert_eq!(decode::<Ack>(&[]), Err(ProtocolError::DecodeTruncated));
}

#[test]
fn out_of_range_values_are_refused() {
    let mut bad = typical_detection();
    bad.burst_index = 3;
    let mut buf = [0u8; Detection::ENCODED_LEN_MAX];
    let len = encode(&bad, &mut buf).unwrap().len();
    assert_eq!(decode::<Detection>(&buf[..len]), Err(ProtocolError::ValueOutOfRange));

    let mut bad = typical_detection();
    bad.bbox = Some(BoundingBox { x: 9_000, y: 0, width: 2_000, height: 10 });
    let len = encode(&bad, &mut buf).unwrap().len();
    assert_eq!(decode::<Detection>(&buf[..len]), Err(ProtocolError::ValueOutOfRange));

    let config = TrapConfig { checkin_interval_s: 10, ..TrapConfig::default() };
    let mut buf = [0u8; DesiredConfig::ENCODED_LEN_MAX];
    let len = encode(&DesiredConfig { version: 1, config }, &mut buf)
        .unwrap()
        .len();
    assert_eq!(decode::<DesiredConfig>(&buf[..len]), Err(ProtocolError::ValueOutOfRange));
}

#[test]
fn encode_refuses_small_buffers() {
    let mut buf = [0u8; 10];
    assert_eq!(encode(&typical_detection(), &mut buf).map(|b| b.len()), Err(ProtocolError::EncodeBufferFull));
    assert_eq!(
        encode(&Ack { through: 1 }, &mut [0u8; 1]).map(|b| b.len()),
        Err(ProtocolError::EncodeBufferFull)
    );
}

#[test]
fn every_kind_has_a_unique_byte_and_route() {
    for (i, a) in MessageKind::ALL.iter().enumerate() {
        assert_eq!(MessageKind::from_byte(*a as u8), Ok(*a));
        for b in &MessageKind::ALL[i + 1..] {
            assert_ne!(*a as u8, *b as u8);
        }
    }
}

#[test]
fn capture_windows_wrap_midnight() {
    let night = CaptureWindow { start_min: 18 * 60, end_min: 6 * 60 };
    assert!(night.contains(23 * 60));
    assert!(night.contains(0));
    assert!(!night.contains(12 * 60));
    let day = CaptureWindow { start_min: 6 * 60, end_min: 18 * 60 };
    assert!(day.contains(12 * 60));
    assert!(!day.contains(18 * 60));
}

mod ota_and_provisioning {
    use super::*;
    use proptest::sample::select;
    use wildcam_sdk::ota::{
        Manifest, ManifestSignature, OTA_CHUNK_LEN_MAX, OtaOutcome, OtaStateKind, SignedManifest,
    };
    use wildcam_sdk::provision::{ClaimRejectReason, Signature64};

    fn state_kind() -> impl Strategy<Value = OtaStateKind> {
        use OtaStateKind::*;
        select(vec![
            Idle,
            Downloading,
            Verifying,
            ReadyToReboot,
            PendingConfirmation,
            Confirmed,
            RolledBack,
            Failed,
        ])
    }

    fn outcome() -> impl Strategy<Value = OtaOutcome> {
        use OtaOutcome::*;
        select(vec![
            Confirmed,
            SignatureInvalid,
            WrongChip,
            Downgrade,
            NotNewer,
            ImageTooLarge,
            BatteryTooLow,
            DigestMismatch,
            SizeMismatch,
            WriteFailed,
            ReadFailed,
            SelfTestFailed,
            RolledBack,
            Aborted,
            Superseded,
            Busy,
        ])
    }

    fn reject_reason() -> impl Strategy<Value = ClaimRejectReason> {
        use ClaimRejectReason::*;
        select(vec![
            TokenUnknown,
            TokenExpired,
            TokenExhausted,
            IdentityNotAllowed,
            ProofInvalid,
            Replayed,
            RateLimited,
            Revoked,
            Internal,
        ])
    }

    fn bytes64() -> impl Strategy<Value = [u8; 64]> {
        vec(any::<u8>(), 64).prop_map(|v| v.try_into().expect("64 bytes"))
    }

    prop_compose! {
        fn signed_manifest()(version in firmware(), secure_version in any::<u32>(), chip in chip(),
                             image_size in any::<u32>(), image_sha256 in any::<[u8; 32]>(),
                             min_battery_mv in any::<u16>(), signature in bytes64()) -> SignedManifest {
            SignedManifest {
                manifest: Manifest { version, secure_version, chip, image_size, image_sha256, min_battery_mv },
                signature: ManifestSignature(signature),
            }
        }
    }

    /// Round-trips through the direction's message set as well as alone.
    fn uplink(message: Uplink) {
        let mut buf = vec![0u8; Uplink::ENCODED_LEN_MAX];
        let len = message.encode(&mut buf).unwrap().len();
        assert!(len <= message.kind().encoded_len_max());
        assert_eq!(Uplink::decode(&buf[..len]).unwrap(), message);
        assert_eq!(Downlink::decode(&buf[..len]), Err(ProtocolError::KindUnexpected));
    }

    fn downlink(message: Downlink) {
        let mut buf = vec![0u8; Downlink::ENCODED_LEN_MAX];
        let len = message.encode(&mut buf).unwrap().len();
        assert!(len <= message.kind().encoded_len_max());
        assert_eq!(Downlink::decode(&buf[..len]).unwrap(), message);
        assert_eq!(Uplink::decode(&buf[..len]), Err(ProtocolError::KindUnexpected));
    }

    proptest! {
        // Chunks are large: fewer cases keep the prefix checks quick.
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn ota_offer_round_trips(rollout_id: u32, manifest in signed_manifest(), chunk_len: u16) {
            let offer = OtaOffer { rollout_id, manifest, chunk_len };
            round_trip(&offer);
            downlink(Downlink::OtaOffer(offer));
        }

        #[test]
        fn ota_chunk_round_trips(rollout_id: u32, offset: u32, data in vec(any::<u8>(), 0..=OTA_CHUNK_LEN_MAX)) {
            let chunk = OtaChunk { rollout_id, offset, data: heapless::Vec::from_slice(&data).unwrap() };
            round_trip(&chunk);
            downlink(Downlink::OtaChunk(chunk));
        }

        #[test]
        fn ota_chunk_request_round_trips(rollout_id: u32, offset: u32, len in 0..=OTA_CHUNK_LEN_MAX as u16) {
            let request = OtaChunkRequest { rollout_id, offset, len };
            round_trip(&request);
            uplink(Uplink::OtaChunkRequest(request));
        }

        #[test]
        fn ota_progress_and_result_round_trip(rollout_id: u32, offset: u32, state in state_kind(),
                                              version in firmware(), outcome in outcome()) {
            let progress = OtaProgress { rollout_id, offset, state };
            round_trip(&progress);
            uplink(Uplink::OtaProgress(progress));
            let result = OtaResult { rollout_id, version, outcome };
            round_trip(&result);
            uplink(Uplink::OtaResult(result));
        }

        #[test]
        fn device_messages_round_trip_through_sets(h in hello(), d in detection(), health in health(), ack: u32,
                                                   id: u32, ttl_s in 1..=u32::MAX, kind in command_kind()) {
            uplink(Uplink::Hello(h));
            uplink(Uplink::Detection(d));
            uplink(Uplink::Health(health));
            downlink(Downlink::Ack(Ack { through: ack }));
            downlink(Downlink::Command(Command { id, ttl_s, kind }));
        }

        #[test]
        fn provisioning_messages_round_trip(claim_id in "[A-Za-z0-9_-]{0,24}", identity_key in any::<[u8; 32]>(),
                                            nonce in any::<[u8; 32]>(), agreement_key in any::<[u8; 32]>(),
                                            signature in bytes64(), reason in reject_reason(),
                                            frame in vec(any::<u8>(), 22..=wildcam_sdk::provision::CREDENTIALS_FRAME_LEN_MAX)) {
            let request = ClaimRequest { claim_id: heapless::String::try_from(claim_id.as_str()).unwrap(), identity_key };
            round_trip(&request);
            let proof = ClaimProof { agreement_key, signature: Signature64(signature) };
            round_trip(&proof);
            for message in [ProvisionUp::ClaimRequest(request), ProvisionUp::ClaimProof(proof)] {
                let mut buf = [0u8; ProvisionUp::ENCODED_LEN_MAX];
                let len = message.encode(&mut buf).unwrap().len();
                prop_assert_eq!(ProvisionUp::decode(&buf[..len]).unwrap(), message);
            }
            let challenge = ClaimChallenge { nonce, server_agreement_key: agreement_key, server_signature: Signature64(signature) };
            round_trip(&challenge);
            let rejected = ClaimRejected { reason };
            round_trip(&rejected);
            let sealed = SealedCredentials { frame: heapless::Vec::from_slice(&frame).unwrap() };
            round_trip(&sealed);
            for message in [ProvisionDown::ClaimChallenge(challenge), ProvisionDown::ClaimRejected(rejected), ProvisionDown::Credentials(sealed)] {
                let mut buf = [0u8; ProvisionDown::ENCODED_LEN_MAX];
                let len = message.encode(&mut buf).unwrap().len();
                prop_assert_eq!(ProvisionDown::decode(&buf[..len]).unwrap(), message);
            }
        }
    }

    #[test]
    fn oversized_chunk_request_is_refused() {
        let request = OtaChunkRequest { rollout_id: 1, offset: 0, len: OTA_CHUNK_LEN_MAX as u16 + 1 };
        let mut buf = [0u8; OtaChunkRequest::ENCODED_LEN_MAX];
        let len = encode(&request, &mut buf).unwrap().len();
        assert_eq!(decode::<OtaChunkRequest>(&buf[..len]), Err(ProtocolError::ValueOutOfRange));
    }

    #[test]
    fn message_kinds_fit_their_topics() {
        use wildcam_sdk::topic::Direction;
        assert!(MessageKind::Detection.fits_device_topic(Direction::Up, "det"));
        assert!(!MessageKind::Detection.fits_device_topic(Direction::Up, "health"));
        assert!(!MessageKind::Detection.fits_device_topic(Direction::Down, "det"));
        assert!(!MessageKind::ClaimRequest.fits_device_topic(Direction::Up, "det"));
    }
}

#[test]
fn non_canonical_encodings_are_refused() {
    // CommandResult { id: 1, status: Expired } with the status's varint index
    // written over-long (0x81 0x00 instead of 0x01).
    assert_eq!(
        decode::<CommandResult>(&[1, 0x05, 0x01, 0x01]),
        Ok(CommandResult { id: 1, status: CommandStatus::Expired })
    );
    assert_eq!(decode::<CommandResult>(&[1, 0x05, 0x01, 0x81, 0x00]), Err(ProtocolError::DecodeNonCanonical));
    assert_eq!(Uplink::decode(&[1, 0x05, 0x81, 0x00, 0x01]), Err(ProtocolError::DecodeNonCanonical));
}
