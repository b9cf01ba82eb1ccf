//! The embedded broker against real rumqttc clients (MQTT 3.1.1 and 5) on 127.0.0.1,
//! ephemeral ports. Every test is bounded in time and owns its broker.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use rumqttc::v5;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::time::timeout;
use wildcam_fleet_server::broker::{
    BrokerConfig, BrokerError, BrokerLink, EmbeddedBroker, Inbound, LINK_CLIENT_ID,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "s3cret-pw";
/// A refusal must be seen well before rumqttc's own 5 s connection timeout.
const REFUSAL_WITHIN: Duration = Duration::from_secs(2);

type V4Events = UnboundedReceiver<Result<Event, ConnectionError>>;
type V5Events = UnboundedReceiver<Result<v5::Event, v5::ConnectionError>>;

/// Devices `trap-*` with client id = username and the shared test password.
fn registry(client_id: &str, username: &str, password: &str) -> bool {
    client_id.starts_with("trap-") && client_id == username && password == PASSWORD
}

async fn bounded(test: impl Future<Output = ()>) {
    timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

async fn start(config: BrokerConfig) -> (EmbeddedBroker, BrokerLink) {
    EmbeddedBroker::start(config, registry)
        .await
        .expect("broker starts")
}

fn v4_options(client_id: &str, port: u16, password: Option<&str>) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(password) = password {
        options.set_credentials(client_id, password);
    }
    options
}

fn v5_options(client_id: &str, port: u16, password: Option<&str>) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(password) = password {
        options.set_credentials(client_id, password);
    }
    options
}

/// Connects (asserting a successful CONNACK) and drives the event loop in a task.
async fn connect_v4(client_id: &str, port: u16) -> (AsyncClient, V4Events) {
    let (client, mut eventloop) = AsyncClient::new(v4_options(client_id, port, Some(PASSWORD)), 64);
    match eventloop.poll().await {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("{client_id}: expected CONNACK, got {other:?}"),
    }
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                break;
            }
        }
    });
    (client, rx)
}

async fn connect_v5(client_id: &str, port: u16) -> (v5::AsyncClient, V5Events) {
    let (client, mut eventloop) = v5::AsyncClient::new(v5_options(client_id, port, Some(PASSWORD)), 64);
    match eventloop.poll().await {
        Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(ack))) => {
            assert_eq!(ack.code, v5::mqttbytes::v5::ConnectReturnCode::Success)
        }
        other => panic!("{client_id}: expected CONNACK, got {other:?}"),
    }
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                break;
            }
        }
    });
    (client, rx)
}

/// The next event `pick` maps to `Some`; panics on a connection error.
async fn next_match<E: Debug, X: Debug, T>(
    events: &mut UnboundedReceiver<Result<E, X>>,
    mut pick: impl FnMut(E) -> Option<T>,
) -> T {
    loop {
        match events.recv().await {
            Some(Ok(event)) => {
                if let Some(found) = pick(event) {
                    return found;
                }
            }
            Some(Err(error)) => panic!("connection failed: {error:?}"),
            None => panic!("event loop ended"),
        }
    }
}

/// Waits for `count` events matching `pick`.
async fn count_matches<E: Debug, X: Debug>(
    events: &mut UnboundedReceiver<Result<E, X>>,
    count: usize,
    mut pick: impl FnMut(&E) -> bool,
) {
    for _ in 0..count {
        next_match(events, |event| pick(&event).then_some(())).await;
    }
}

fn is_v4_puback(event: &Event) -> bool {
    matches!(event, Event::Incoming(Packet::PubAck(_)))
}

fn is_v5_puback(event: &v5::Event) -> bool {
    matches!(event, v5::Event::Incoming(v5::mqttbytes::v5::Packet::PubAck(_)))
}

/// A payload carrying its sequence number, with bytes that would not survive a text
/// round trip.
fn payload(seq: u32) -> Vec<u8> {
    let mut bytes = seq.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0x00, 0xff, 0xfe, b'\n', 0x80]);
    bytes.extend(std::iter::repeat_n(0xa5, (seq % 61) as usize));
    bytes
}

fn seq_of(message: &Inbound) -> u32 {
    let head: [u8; 4] = message.payload[..4].try_into().expect("sequence bytes");
    u32::from_be_bytes(head)
}

async fn recv_n(link: &mut BrokerLink, count: usize) -> Vec<Inbound> {
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        received.push(link.recv().await.expect("link open"));
    }
    received
}

/// Receives until nothing arrives for `idle`.
async fn recv_until_idle(link: &mut BrokerLink, idle: Duration) -> Vec<Inbound> {
    let mut received = Vec::new();
    while let Ok(Some(message)) = timeout(idle, link.recv()).await {
        received.push(message);
    }
    received
}

/// Asserts `messages` are exactly `payload(0..count)` on `topic`, in order.
fn assert_exact_sequence(messages: &[&Inbound], topic: &str, count: u32) {
    assert_eq!(messages.len(), count as usize, "count on {topic}");
    for (seq, message) in (0..count).zip(messages) {
        assert_eq!(message.topic, topic);
        assert_eq!(message.payload.as_ref(), payload(seq).as_slice(), "payload {seq} on {topic}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplinks_from_v4_and_v5_arrive_exactly_and_in_order() {
    bounded(async {
        const COUNT: u32 = 1_500;
        let (broker, mut link) = start(BrokerConfig::loopback_ephemeral()).await;
        let (v4_client, mut v4_events) = connect_v4("trap-1", broker.listen_v4().port()).await;
        let (v5_client, mut v5_events) = connect_v5("trap-2", broker.listen_v5().port()).await;
        let v4_publisher = tokio::spawn(async move {
            for seq in 0..COUNT {
                let topic = "wc/v1/dev/trap-1/up/det";
                v4_client
                    .publish(topic, QoS::AtLeastOnce, false, payload(seq))
                    .await
                    .expect("queued");
            }
            count_matches(&mut v4_events, COUNT as usize, is_v4_puback).await;
        });
        let v5_publisher = tokio::spawn(async move {
            for seq in 0..COUNT {
                let topic = "wc/v1/dev/trap-2/up/det";
                let qos = v5::mqttbytes::QoS::AtLeastOnce;
                v5_client
                    .publish(topic, qos, false, payload(seq))
                    .await
                    .expect("queued");
            }
            count_matches(&mut v5_events, COUNT as usize, is_v5_puback).await;
        });

        let received = recv_n(&mut link, 2 * COUNT as usize).await;
        v4_publisher.await.expect("v4 publisher");
        v5_publisher.await.expect("v5 publisher");
        for (device, topic) in [("trap-1", "wc/v1/dev/trap-1/up/det"), ("trap-2", "wc/v1/dev/trap-2/up/det")]
        {
            let own: Vec<&Inbound> = received
                .iter()
                .filter(|m| m.topic.contains(device))
                .collect();
            assert_exact_sequence(&own, topic, COUNT);
        }
        assert!(
            recv_until_idle(&mut link, Duration::from_millis(100))
                .await
                .is_empty()
        );
        let stats = link.stats();
        assert_eq!((stats.delivered, stats.lost), (2 * u64::from(COUNT), 0));
    })
    .await;
}

/// rumqttd 0.20 answers a refused CONNECT by closing the connection, without a CONNACK
/// return code: the assertion is a prompt connection error and no CONNACK.
async fn assert_v4_refused(client_id: &str, port: u16, password: Option<&str>) {
    let (_client, mut eventloop) = AsyncClient::new(v4_options(client_id, port, password), 8);
    let started = Instant::now();
    let outcome = eventloop.poll().await;
    let elapsed = started.elapsed();
    match outcome {
        Err(ConnectionError::MqttState(_) | ConnectionError::Io(_)) => {}
        other => panic!("{client_id} {password:?}: expected the connection to be closed, got {other:?}"),
    }
    assert!(elapsed < REFUSAL_WITHIN, "{client_id}: refusal took {elapsed:?}");
}

async fn assert_v5_refused(client_id: &str, port: u16, password: Option<&str>) {
    let (_client, mut eventloop) = v5::AsyncClient::new(v5_options(client_id, port, password), 8);
    let started = Instant::now();
    let outcome = eventloop.poll().await;
    let elapsed = started.elapsed();
    match outcome {
        Err(v5::ConnectionError::MqttState(_) | v5::ConnectionError::Io(_)) => {}
        other => panic!("{client_id} {password:?}: expected the connection to be closed, got {other:?}"),
    }
    assert!(elapsed < REFUSAL_WITHIN, "{client_id}: refusal took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_at_connect() {
    bounded(async {
        let (broker, _link) = start(BrokerConfig::loopback_ephemeral()).await;
        let (v4, v5) = (broker.listen_v4().port(), broker.listen_v5().port());
        for (client_id, password) in [
            ("trap-1", Some("wrong")),
            ("intruder", Some(PASSWORD)),
            ("trap-1", None),
            ("trap-1", Some("")),
            (LINK_CLIENT_ID, Some(PASSWORD)),
        ] {
            assert_v4_refused(client_id, v4, password).await;
            assert_v5_refused(client_id, v5, password).await;
        }
        // The same listeners still admit a valid device.
        connect_v4("trap-1", v4).await;
        connect_v5("trap-1", v5).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlinks_reach_only_the_subscribed_device_with_qos1() {
    bounded(async {
        let (broker, link) = start(BrokerConfig::loopback_ephemeral()).await;
        let (trap1, mut events1) = connect_v4("trap-1", broker.listen_v4().port()).await;
        let (trap2, mut events2) = connect_v5("trap-2", broker.listen_v5().port()).await;
        trap1
            .subscribe("wc/v1/dev/trap-1/down/#", QoS::AtLeastOnce)
            .await
            .expect("queued");
        next_match(&mut events1, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await;
        trap2
            .subscribe("wc/v1/dev/trap-2/down/#", v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .expect("queued");
        next_match(&mut events2, |e| {
            matches!(e, v5::Event::Incoming(v5::mqttbytes::v5::Packet::SubAck(_))).then_some(())
        })
        .await;

        // One publish from the link, one from a clone of its publisher in another task.
        link.publish("wc/v1/dev/trap-1/down/ack", vec![1, 0, 0xff])
            .await
            .expect("queued");
        let publisher = link.publisher();
        tokio::spawn(async move {
            publisher
                .publish("wc/v1/dev/trap-2/down/cfg", vec![2, 0xfe])
                .await
        })
        .await
        .expect("task")
        .expect("queued");
        link.publish("wc/v1/dev/trap-1/down/cmd", vec![3])
            .await
            .expect("queued");

        let pick_v4 = |e: Event| match e {
            Event::Incoming(Packet::Publish(p)) => Some(p),
            _ => None,
        };
        let first = next_match(&mut events1, pick_v4).await;
        assert_eq!(
            (first.topic.as_str(), first.payload.as_ref()),
            ("wc/v1/dev/trap-1/down/ack", &[1, 0, 0xff][..])
        );
        assert_eq!(first.qos, QoS::AtLeastOnce);
        // trap-1's next message is its own second one: trap-2's downlink never reached it.
        let second = next_match(&mut events1, pick_v4).await;
        assert_eq!((second.topic.as_str(), second.payload.as_ref()), ("wc/v1/dev/trap-1/down/cmd", &[3][..]));

        let other = next_match(&mut events2, |e| match e {
            v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p)) => Some(p),
            _ => None,
        })
        .await;
        assert_eq!(
            (other.topic.as_ref(), other.payload.as_ref()),
            (&b"wc/v1/dev/trap-2/down/cfg"[..], &[2, 0xfe][..])
        );
        assert_eq!(other.qos, v5::mqttbytes::QoS::AtLeastOnce);

        // Refused locally, before reaching the broker.
        let wildcard = link.publish("wc/v1/dev/+/down/ack", vec![0]).await;
        assert!(matches!(wildcard, Err(BrokerError::InvalidTopic { .. })), "{wildcard:?}");
        let huge = link
            .publish("wc/v1/dev/trap-1/down/ota", vec![0; 64 * 1024])
            .await;
        assert!(matches!(huge, Err(BrokerError::PayloadTooLarge { .. })), "{huge:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_publish_disconnects_only_its_sender() {
    bounded(async {
        let config = BrokerConfig { max_payload_size: 4 * 1024, ..BrokerConfig::loopback_ephemeral() };
        let (broker, mut link) = start(config).await;
        let port = broker.listen_v4().port();
        let (offender, mut offender_events) = connect_v4("trap-big", port).await;
        let (good, mut good_events) = connect_v4("trap-good", port).await;

        offender
            .publish("wc/v1/dev/trap-big/up/det", QoS::AtLeastOnce, false, vec![7; 8 * 1024])
            .await
            .expect("queued");
        let outcome = loop {
            match offender_events.recv().await.expect("event loop reports") {
                Ok(Event::Incoming(Packet::PubAck(_))) => panic!("oversized publish was acknowledged"),
                Ok(_) => continue,
                Err(error) => break error,
            }
        };
        assert!(
            matches!(outcome, ConnectionError::MqttState(_) | ConnectionError::Io(_)),
            "offender: {outcome:?}"
        );

        good.publish("wc/v1/dev/trap-good/up/det", QoS::AtLeastOnce, false, payload(1))
            .await
            .expect("queued");
        count_matches(&mut good_events, 1, is_v4_puback).await;
        let received = link.recv().await.expect("link open");
        assert_eq!(
            (received.topic.as_str(), received.payload.as_ref()),
            ("wc/v1/dev/trap-good/up/det", payload(1).as_slice())
        );
        assert!(
            recv_until_idle(&mut link, Duration::from_millis(100))
                .await
                .is_empty()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_loses_nothing_within_retention() {
    bounded(async {
        const COUNT: u32 = 3_000;
        // A tiny consumer channel, so the link's worker waits on it almost at once.
        let config = BrokerConfig { link_capacity: 8, ..BrokerConfig::loopback_ephemeral() };
        let (broker, mut link) = start(config).await;
        let (client, mut events) = connect_v4("trap-1", broker.listen_v4().port()).await;

        // The consumer is paused: rumqttd still acknowledges every publish (it does not
        // push back on publishers), retaining what the link has not read.
        let publishing = tokio::spawn(async move {
            for seq in 0..COUNT {
                client
                    .publish("wc/v1/dev/trap-1/up/det", QoS::AtLeastOnce, false, payload(seq))
                    .await
                    .expect("queued");
            }
            count_matches(&mut events, COUNT as usize, is_v4_puback).await;
        });
        publishing
            .await
            .expect("all publishes acknowledged while the consumer was paused");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(link.stats().delivered < u64::from(COUNT), "the consumer channel must have filled up");

        // What the channel already holds can be taken without waiting (batch building).
        let mut received = Vec::new();
        assert!(link.try_recv_many(&mut received, 5) > 0, "messages were waiting");
        received.extend(recv_n(&mut link, COUNT as usize - received.len()).await);
        let all: Vec<&Inbound> = received.iter().collect();
        assert_exact_sequence(&all, "wc/v1/dev/trap-1/up/det", COUNT);
        assert_eq!(link.stats().lost, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_overflow_is_counted_not_silent() {
    bounded(async {
        const COUNT: u32 = 2_000;
        // Two 1 KiB segments: the link may lag by about 1 KiB (~15 messages here).
        let config = BrokerConfig {
            link_capacity: 4,
            uplink_segment_size: 1024,
            uplink_segment_count: 2,
            ..BrokerConfig::loopback_ephemeral()
        };
        let (broker, mut link) = start(config).await;
        let (client, mut events) = connect_v4("trap-1", broker.listen_v4().port()).await;
        for seq in 0..COUNT {
            client
                .publish("wc/v1/dev/trap-1/up/det", QoS::AtLeastOnce, false, payload(seq))
                .await
                .expect("queued");
        }
        count_matches(&mut events, COUNT as usize, is_v4_puback).await;

        let received = recv_until_idle(&mut link, Duration::from_millis(500)).await;
        let stats = link.stats();
        assert!(stats.lost > 0, "retention of ~1 KiB cannot hold {COUNT} messages");
        assert_eq!(
            received.len() as u64 + stats.lost,
            u64::from(COUNT),
            "every message delivered or counted"
        );
        assert_eq!(stats.delivered, received.len() as u64);
        let seqs: Vec<u32> = received.iter().map(seq_of).collect();
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "order kept across gaps");
        assert_eq!(seqs.last(), Some(&(COUNT - 1)), "the newest messages survive");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_can_subscribe_at_runtime() {
    bounded(async {
        let (broker, mut link) = start(BrokerConfig::loopback_ephemeral()).await;
        link.subscribe("wc/v1/test/+").await.expect("subscribed");
        let refused = link.subscribe("$SYS/#").await;
        assert!(matches!(refused, Err(BrokerError::InvalidFilter { .. })), "{refused:?}");
        let (client, mut events) = connect_v4("trap-1", broker.listen_v4().port()).await;
        client
            .publish("wc/v1/test/x", QoS::AtLeastOnce, false, vec![42])
            .await
            .expect("queued");
        count_matches(&mut events, 1, is_v4_puback).await;
        let message = link.recv().await.expect("link open");
        assert_eq!((message.topic.as_str(), message.payload.as_ref()), ("wc/v1/test/x", &[42][..]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    bounded(async {
        let config = BrokerConfig { max_connections: 1, ..BrokerConfig::loopback_ephemeral() };
        let (broker, _link) = start(config).await;
        let (first, mut events) = connect_v4("trap-1", broker.listen_v4().port()).await;
        assert_v5_refused("trap-2", broker.listen_v5().port(), Some(PASSWORD)).await;
        // The admitted client is unaffected.
        first
            .publish("wc/v1/dev/trap-1/up/det", QoS::AtLeastOnce, false, payload(0))
            .await
            .expect("queued");
        count_matches(&mut events, 1, is_v4_puback).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_reports_address_in_use_and_bad_config() {
    bounded(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("address");
        let config = BrokerConfig { listen_v4: addr, ..BrokerConfig::loopback_ephemeral() };
        match EmbeddedBroker::start(config, registry).await {
            Err(BrokerError::AddrInUse { addr: reported }) => assert_eq!(reported, addr),
            other => panic!("expected AddrInUse, got {other:?}"),
        }
        let config = BrokerConfig { segment_size: 10, ..BrokerConfig::loopback_ephemeral() };
        let invalid = EmbeddedBroker::start(config, registry).await;
        assert!(matches!(invalid, Err(BrokerError::InvalidConfig(_))), "{invalid:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_clients_and_ends_the_link() {
    bounded(async {
        let (broker, mut link) = start(BrokerConfig::loopback_ephemeral()).await;
        let (v4, v5) = (broker.listen_v4().port(), broker.listen_v5().port());
        connect_v4("trap-1", v4).await;
        assert!(broker.is_running());

        let started = Instant::now();
        broker.shutdown();
        assert!(started.elapsed() < Duration::from_secs(1), "shutdown took {:?}", started.elapsed());
        assert!(link.recv().await.is_none(), "inbound channel ends");
        let publish = link.publish("wc/v1/dev/trap-1/down/ack", vec![1]).await;
        assert!(matches!(publish, Err(BrokerError::Closed)), "{publish:?}");
        assert_v4_refused("trap-2", v4, Some(PASSWORD)).await;
        assert_v5_refused("trap-2", v5, Some(PASSWORD)).await;
    })
    .await;
}
