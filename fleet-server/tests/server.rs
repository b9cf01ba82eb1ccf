//! The fleet server end to end, against its real embedded broker and SQLite
//! store on ephemeral loopback ports: provisioning, ingest with acks after
//! commit, dedupe, cross-device forgery, malformed input, revocation.

mod common;

use common::*;
use wildcam_fleet_server::Server;
use wildcam_fleet_server::metrics::Rejection;
use wildcam_fleet_server::store::{DeviceQuery, SqliteConfig, SqliteStore, Store, generate_claim_token};
use wildcam_sdk::protocol::{Ack, Message, ProvisionDown, Uplink, encode};
use wildcam_sdk::provision::ClaimRejectReason;
use wildcam_sdk::seal::{SEAL_OVERHEAD, Sealer};
use wildcam_sdk::topic::SessionId;
use wildcam_sdk::topic::{self, Direction};

const DAY_MS: i64 = 86_400_000;

async fn start() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(test_config(dir.path()))
        .await
        .expect("server starts");
    (server, dir)
}

async fn claim_token(server: &Server, uses: u32) -> String {
    let now = server.state().clock.now_ms();
    let generated = generate_claim_token(uses, now + DAY_MS, "test batch".into()).expect("token");
    server
        .state()
        .store
        .create_claim_token(generated.record)
        .await
        .expect("stored");
    generated.token
}

async fn provisioned_trap(server: &Server, seed: u8) -> TestTrap {
    let token = claim_token(server, 1).await;
    let provisioned = provision(embedded_mqtt(server), Some(&token), [seed; 32])
        .await
        .expect("provisioned");
    TestTrap::connect(embedded_mqtt(server), &provisioned)
        .await
        .expect("device connects")
}

#[tokio::test]
async fn detections_are_acked_after_commit_and_stored_once() {
    let (server, _dir) = start().await;
    let mut trap = provisioned_trap(&server, 1).await;
    trap.send(&trap.hello()).await;
    for seq in 1..=20 {
        trap.send(&detection(seq)).await;
    }
    assert_eq!(trap.wait_ack(20).await, Ok(20));
    let store = server.state().store.clone();
    assert_eq!(stored_seqs(store.as_ref(), &trap.id).await, (1..=20).collect::<Vec<_>>());

    // A resend (new counter, same sequence) is stored once and acked again.
    trap.send(&detection(7)).await;
    assert_eq!(trap.wait_ack(20).await, Ok(20));
    assert_eq!(stored_seqs(store.as_ref(), &trap.id).await.len(), 20);

    // A gap holds the contiguous ack back until it is filled.
    trap.send(&detection(22)).await;
    assert_eq!(trap.wait_ack(20).await, Ok(20));
    trap.send(&detection(21)).await;
    assert_eq!(trap.wait_ack(22).await, Ok(22));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn replays_forgeries_and_malformed_payloads_are_refused_while_others_flow() {
    let (server, _dir) = start().await;
    let mut victim = provisioned_trap(&server, 2).await;
    let mut attacker = provisioned_trap(&server, 3).await;
    let metrics = server.state().metrics.clone();

    let frame = victim.send(&detection(1)).await;
    assert_eq!(victim.wait_ack(1).await, Ok(1));

    // Replaying the victim's exact frame is refused.
    victim.publish_raw("det", frame.clone()).await;
    // The attacker publishes on the victim's topic under its own key.
    let envelope = {
        let mut buf = vec![0u8; wildcam_sdk::protocol::Detection::ENCODED_LEN_MAX];
        let Uplink::Detection(d) = detection(2) else {
            unreachable!()
        };
        let len = encode(&d, &mut buf).unwrap().len();
        buf.truncate(len);
        buf
    };
    let forged = attacker.seal(&envelope);
    attacker
        .mqtt
        .publish(&topic::device_topic(&victim.id, Direction::Up, "det"), forged)
        .await;
    // And forges an ack on the victim's downlink topic.
    let mut ack_sealer = Sealer::new(attacker.key.clone(), Direction::Down);
    let mut ack = [0u8; 16];
    let ack_len = encode(&Ack { through: 1_000 }, &mut ack).unwrap().len();
    let mut forged_ack = vec![0u8; ack_len + SEAL_OVERHEAD];
    let sealed = ack_sealer
        .seal(victim.id.as_bytes(), &ack[..ack_len], &mut forged_ack)
        .unwrap();
    forged_ack.truncate(sealed.len);
    attacker
        .mqtt
        .publish(&topic::device_topic(&victim.id, Direction::Down, "ack"), forged_ack)
        .await;
    // Garbage and an oversized payload.
    attacker.publish_raw("det", vec![0xff; 40]).await;
    attacker.publish_raw("det", vec![0x01; 2_000]).await;

    // Everyone else keeps flowing: the attacker's own detections are stored.
    attacker.send(&detection(1)).await;
    assert_eq!(attacker.wait_ack(1).await, Ok(1));
    // The victim ignores the forged ack (it does not open) and gets real ones.
    victim.send(&detection(2)).await;
    assert_eq!(victim.wait_ack(2).await, Ok(2));
    assert_eq!(victim.refused, 1, "the forged ack did not open");
    let store = server.state().store.clone();
    assert_eq!(stored_seqs(store.as_ref(), &victim.id).await, vec![1, 2]);

    // The replay, the forgery (its counter is refused by the victim's window
    // before any decryption, or by the tag) and the garbage.
    let refused = metrics.rejected(Rejection::Replayed) + metrics.rejected(Rejection::Unauthentic);
    assert!(metrics.rejected(Rejection::Replayed) >= 1, "replay counted");
    assert!(metrics.rejected(Rejection::Unauthentic) >= 1, "garbage counted");
    assert_eq!(refused, 3, "replay, forgery and garbage counted once each");
    assert!(metrics.rejected(Rejection::Oversized) >= 1, "oversized counted");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn provisioning_refuses_bad_claims() {
    let (server, _dir) = start().await;
    let addr = embedded_mqtt(&server);
    let token = claim_token(&server, 1).await;
    let (id, _) = token.split_once('.').unwrap();
    // Right id, wrong secret: the proof does not verify.
    let wrong = format!("{id}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let error = provision(addr, Some(&wrong), [4; 32]).await.unwrap_err();
    assert!(error.contains("ProofInvalid"), "{error}");
    // Unknown token.
    let error = provision(addr, Some("nosuchid.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), [5; 32])
        .await
        .unwrap_err();
    assert!(error.contains("TokenUnknown"), "{error}");
    // Not on the allow-list.
    let error = provision(addr, None, [6; 32]).await.unwrap_err();
    assert!(error.contains("IdentityNotAllowed"), "{error}");
    // The single-use token still works once, then is used up.
    provision(addr, Some(&token), [7; 32])
        .await
        .expect("first claim");
    let error = provision(addr, Some(&token), [8; 32]).await.unwrap_err();
    assert!(error.contains("TokenExhausted"), "{error}");
    // Bad credentials are refused at connect.
    assert!(
        Mqtt::connect(addr, "wc-0000", "wc-0000", "guess")
            .await
            .is_err()
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn graceful_shutdown_acks_every_committed_detection() {
    let (server, dir) = start().await;
    let mut trap = provisioned_trap(&server, 41).await;
    for seq in 1..=100 {
        trap.send(&detection(seq)).await;
    }
    assert_eq!(trap.wait_ack(100).await, Ok(100));
    for seq in 101..=2_000 {
        trap.send(&detection(seq)).await;
    }
    // Stop while detections are streaming in.
    assert!(
        trap.wait_ack(150)
            .await
            .is_ok_and(|through| through < 2_000)
    );
    server.shutdown().await.expect("clean shutdown");
    // Whatever the last batch held was committed and acknowledged before the
    // broker link closed: the trap's last ack covers every stored detection.
    let mut acked = 100;
    while let Ok(through) = trap
        .wait_ack_within(acked + 1, std::time::Duration::from_millis(1_000))
        .await
    {
        acked = through;
    }
    let store = SqliteStore::open(SqliteConfig::new(dir.path().to_path_buf()))
        .await
        .expect("store reopens");
    let stored = stored_seqs(&store, &trap.id).await;
    assert_eq!(stored, (1..=acked).collect::<Vec<_>>(), "acked through {acked}");
    store.close().await.expect("closes");
}

#[tokio::test]
async fn replayed_proofs_are_refused_and_consume_nothing() {
    let (server, _dir) = start().await;
    let addr = embedded_mqtt(&server);
    let token = claim_token(&server, 5).await;
    let claim_id = token.split_once('.').unwrap().0.to_owned();
    let (_, mut captured) = provision_capturing(addr, Some(&token), [21; 32])
        .await
        .expect("claimed");
    // The same proof again on its own session: the pending claim is gone.
    captured
        .mqtt
        .publish(&captured.up_topic, captured.proof.clone())
        .await;
    let answer = next_provision_answer(&mut captured.mqtt).await;
    assert!(
        matches!(&answer, Ok(ProvisionDown::ClaimRejected(r)) if r.reason == ClaimRejectReason::Replayed),
        "{answer:?}"
    );
    // An eavesdropper replays request and proof on a session of its own: the
    // server's new challenge has a fresh nonce and key, so the old proof fails.
    let session = SessionId::from_random([0x77; 8]);
    let mut attacker = connect_unclaimed(addr, &session).await.expect("connects");
    let up = topic::provision_topic(&session, Direction::Up);
    attacker
        .publish(up.as_str(), captured.request.clone())
        .await;
    let answer = next_provision_answer(&mut attacker).await;
    assert!(matches!(answer, Ok(ProvisionDown::ClaimChallenge(_))), "{answer:?}");
    attacker.publish(up.as_str(), captured.proof.clone()).await;
    let answer = next_provision_answer(&mut attacker).await;
    assert!(
        matches!(&answer, Ok(ProvisionDown::ClaimRejected(r)) if r.reason == ClaimRejectReason::ProofInvalid),
        "{answer:?}"
    );
    // Neither replay used the token or created a device.
    let store = server.state().store.clone();
    let info = store
        .get_claim_token(claim_id)
        .await
        .expect("query")
        .expect("token");
    assert_eq!(info.uses, 1, "only the genuine claim used the token");
    let devices = store
        .list_devices(DeviceQuery::default())
        .await
        .expect("query");
    assert_eq!(devices.items.len(), 1);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn connected_devices_follow_the_broker() {
    let (server, _dir) = start().await;
    let first = provisioned_trap(&server, 31).await;
    let second = provisioned_trap(&server, 32).await;
    wait_for_gauge(&server, "wildcam_connected_devices", 2).await;
    drop(second);
    wait_for_gauge(&server, "wildcam_connected_devices", 1).await;
    drop(first);
    wait_for_gauge(&server, "wildcam_connected_devices", 0).await;
    server.shutdown().await.expect("clean shutdown");
}

/// Polls `/metrics` until the gauge `name` reads `value` (rumqttd reports every second).
async fn wait_for_gauge(server: &Server, name: &str, value: u64) {
    let line = format!("\n{name} {value}\n");
    let mut last = String::new();
    for _ in 0..50 {
        last = http_get(server.http(), "/metrics").await;
        if last.contains(&line) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("{name} never reached {value}:\n{last}");
}

#[tokio::test]
async fn revocation_refuses_messages_and_reconnects() {
    let (server, _dir) = start().await;
    let mut trap = provisioned_trap(&server, 9).await;
    trap.send(&detection(1)).await;
    assert_eq!(trap.wait_ack(1).await, Ok(1));
    wildcam_fleet_server::server::revoke_device(server.state(), &trap.id)
        .await
        .expect("revoked");
    trap.send(&detection(2)).await;
    let no_ack = trap
        .wait_ack_within(2, std::time::Duration::from_millis(1_500))
        .await;
    assert!(no_ack.is_err(), "a revoked device gets no ack");
    let store = server.state().store.clone();
    assert_eq!(stored_seqs(store.as_ref(), &trap.id).await, vec![1]);
    assert!(server.state().metrics.rejected(Rejection::DeviceRevoked) >= 1);
    assert!(
        Mqtt::connect(embedded_mqtt(&server), trap.id.as_str(), trap.id.as_str(), &trap.password)
            .await
            .is_err()
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn health_endpoints_and_metrics() {
    let (server, _dir) = start().await;
    let addr = server.http();
    assert!(http_get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = http_get(addr, "/metrics").await;
    assert!(metrics.contains("wildcam_messages_in_total"), "{metrics}");
    server.shutdown().await.expect("clean shutdown");
}

/// A plain HTTP/1.1 GET over a socket; the whole response as text.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}
