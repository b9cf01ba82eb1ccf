//! External-broker mode against real brokers on 127.0.0.1: the embedded rumqttd (which
//! implements `$share/` groups) for the shared group and the authentication hook, and
//! Mosquitto for both filters split between two links, a whole server, backpressure, a
//! broker restart, refused credentials and mutual TLS.
//!
//! The Mosquitto tests need `mosquitto` (and the TLS one `openssl`, both Debian packages of
//! that name): when a tool is missing they print why and pass, except under `CI`, where
//! they fail (`.ci/run` installs both).
//! Every wait is bounded; every Mosquitto is killed when its test ends.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};
use wildcam_fleet_server::Server;
use wildcam_fleet_server::broker::{
    BrokerConfig, BrokerError, BrokerLink, EmbeddedBroker, ExternalBroker, ExternalBrokerConfig, Inbound,
};
use wildcam_fleet_server::mqtt_auth::AUTH_HOOK_SECRET_HEADER;
use wildcam_fleet_server::store::generate_claim_token;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);
const FLEET_USER: &str = "fleet";
const FLEET_PASSWORD: &str = "fleet-password-1";
const DEVICE_PASSWORD: &str = "trap-password-1";
const HOOK_SECRET: &str = "hook-secret-0123456789";
const DAY_MS: i64 = 86_400_000;

async fn bounded(test: impl Future<Output = ()>) {
    timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

/// The embedded broker standing in for an external one: the fleet account, and devices
/// `trap-*` with client id = user name.
fn admit(client_id: &str, username: &str, password: &str) -> bool {
    if username == FLEET_USER {
        return client_id.starts_with("fleet-") && password == FLEET_PASSWORD;
    }
    client_id.starts_with("trap-") && client_id == username && password == DEVICE_PASSWORD
}

fn link_config(port: u16, client_id: &str) -> ExternalBrokerConfig {
    ExternalBrokerConfig {
        client_id: client_id.into(),
        username: Some(FLEET_USER.into()),
        password: Some(FLEET_PASSWORD.into()),
        connect_timeout_ms: 5_000,
        ..ExternalBrokerConfig::loopback(port)
    }
}

fn seq_of(message: &Inbound) -> u32 {
    u32::from_be_bytes(message.payload[..4].try_into().expect("sequence bytes"))
}

/// Receives from both links until nothing arrives for `idle`.
async fn drain_both(a: &mut BrokerLink, b: &mut BrokerLink, idle: Duration) -> (Vec<u32>, Vec<u32>) {
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    loop {
        tokio::select! {
            Some(message) = a.recv() => from_a.push(seq_of(&message)),
            Some(message) = b.recv() => from_b.push(seq_of(&message)),
            () = sleep(idle) => return (from_a, from_b),
        }
    }
}

/// Uplinks each split test publishes.
const SPLIT_COUNT: u32 = 200;

/// Publishes [`SPLIT_COUNT`] uplinks from `device`, cycling through `topics`, and checks
/// that each reached exactly one of the two links, and both links some.
async fn assert_uplinks_split(device: &Mqtt, a: &mut BrokerLink, b: &mut BrokerLink, topics: &[&str]) {
    for seq in 0..SPLIT_COUNT {
        device
            .publish(topics[seq as usize % topics.len()], seq.to_be_bytes().to_vec())
            .await;
    }
    let (from_a, from_b) = drain_both(a, b, Duration::from_millis(1_500)).await;
    let set_a: BTreeSet<u32> = from_a.iter().copied().collect();
    let set_b: BTreeSet<u32> = from_b.iter().copied().collect();
    assert_eq!(set_a.len(), from_a.len(), "link a got a message twice");
    assert_eq!(set_b.len(), from_b.len(), "link b got a message twice");
    let both: Vec<&u32> = set_a.intersection(&set_b).collect();
    assert!(both.is_empty(), "messages reached both links: {both:?}");
    let union: BTreeSet<u32> = set_a.union(&set_b).copied().collect();
    assert_eq!(union, (0..SPLIT_COUNT).collect(), "every uplink reaches one link");
    assert!(!set_a.is_empty() && !set_b.is_empty(), "both get a share: {} and {}", set_a.len(), set_b.len());
    assert_eq!(a.stats().delivered + b.stats().delivered, u64::from(SPLIT_COUNT));
}

/// rumqttd 0.20 keys a shared group's state (member list, read cursor) by the share name
/// alone, not by share name and filter as MQTT 5 says: once both link filters carry
/// traffic, one filter's cursor is applied to the other's log and messages are lost. So
/// here only device uplinks flow; the Mosquitto test below splits both kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_in_one_shared_group_split_the_uplinks_and_publish_downlinks() {
    bounded(async {
        let (broker, _embedded_link) = EmbeddedBroker::start(BrokerConfig::loopback_ephemeral(), admit)
            .await
            .expect("broker starts");
        let port = broker.listen_v5().port();
        let (first, mut link_a) = ExternalBroker::connect(link_config(port, "fleet-a"))
            .await
            .expect("a connects");
        let (second, mut link_b) = ExternalBroker::connect(link_config(port, "fleet-b"))
            .await
            .expect("b connects");

        let mut device = Mqtt::connect(broker.listen_v4(), "trap-1", "trap-1", DEVICE_PASSWORD)
            .await
            .expect("device connects");
        device.subscribe("wc/v1/dev/trap-1/down/#").await;
        assert_uplinks_split(&device, &mut link_a, &mut link_b, &["wc/v1/dev/trap-1/up/det"]).await;

        // Downlinks go out through the link's own connection, QoS 1.
        link_a
            .publish("wc/v1/dev/trap-1/down/ack", &b"ack"[..])
            .await
            .expect("queued");
        let (topic, payload) = device.next().await.expect("downlink arrives");
        assert_eq!((topic.as_str(), payload.as_slice()), ("wc/v1/dev/trap-1/down/ack", &b"ack"[..]));

        first.shutdown().await;
        assert_eq!(
            timeout(Duration::from_secs(2), link_a.recv())
                .await
                .expect("ends"),
            None
        );
        assert!(matches!(link_a.publish("wc/v1/x", &b"x"[..]).await, Err(BrokerError::Closed)));
        second.shutdown().await;
        broker.shutdown();
    })
    .await;
}

#[tokio::test]
async fn bad_configuration_and_unreachable_brokers_are_clear_errors() {
    bounded(async {
        let bad =
            ExternalBrokerConfig { shared_group: "fleet/+".into(), ..ExternalBrokerConfig::loopback(1) };
        let error = ExternalBroker::connect(bad)
            .await
            .expect_err("refused")
            .to_string();
        assert!(error.contains("shared_group"), "{error}");

        let closed_port = free_port();
        let config =
            ExternalBrokerConfig { connect_timeout_ms: 800, ..ExternalBrokerConfig::loopback(closed_port) };
        let started = Instant::now();
        let error = ExternalBroker::connect(config)
            .await
            .expect_err("nobody listens");
        assert!(started.elapsed() < Duration::from_secs(4), "bounded by connect_timeout_ms");
        let message = error.to_string();
        assert!(matches!(error, BrokerError::ConnectTimeout { .. }), "{message}");
        assert!(
            message.contains(&format!("127.0.0.1:{closed_port}")) && message.contains("last error"),
            "{message}"
        );
    })
    .await;
}

// ------------------------------------------------------------------ Mosquitto

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A tool's path, or `None` (after saying so) when the test should be skipped; under `CI`
/// a missing tool fails the test instead.
fn tool_or_skip(test: &str, tool: &str, package: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: {tool} is not installed, and CI must run this test: apt-get install {package}"
        );
        eprintln!("{test}: SKIPPED, {tool} is not installed (apt-get install {package})");
    }
    found
}

fn mosquitto_or_skip(test: &str) -> Option<PathBuf> {
    tool_or_skip(test, "mosquitto", "mosquitto")
}

/// How a test's Mosquitto admits clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Anyone.
    Anonymous,
    /// Only `FLEET_USER` with `FLEET_PASSWORD`.
    Password,
    /// Anyone on the plain listener; on a second, TLS, listener only clients with a
    /// certificate of the test CA (files made with `openssl` in the broker's directory).
    MutualTls,
}

/// A Mosquitto child process on 127.0.0.1; killed on drop.
struct Mosquitto {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    async fn start(binary: PathBuf, setup: Setup) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let access = match setup {
            Setup::Anonymous => "allow_anonymous true\n".to_owned(),
            Setup::Password => password_config(dir.path()),
            Setup::MutualTls => tls_config(dir.path()),
        };
        let text = format!(
            "per_listener_settings false\n{access}listener {port} 127.0.0.1\n{tls}persistence false\nuser root\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n",
            tls = if setup == Setup::MutualTls { tls_listener(dir.path()) } else { String::new() },
        );
        std::fs::write(dir.path().join("mosquitto.conf"), text).expect("config written");
        let mut mosquitto = Self { binary, dir, port, child: None };
        mosquitto.run().await;
        mosquitto
    }

    /// The TLS listener's port (written by `tls_listener`).
    fn tls_port(&self) -> u16 {
        let text = std::fs::read_to_string(self.dir.path().join("tls-port")).expect("a TLS listener");
        text.trim().parse().expect("port")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// (Re)starts the process on the same port and waits until it accepts connections.
    async fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            assert!(exited.is_none(), "mosquitto exited: {exited:?}\n{}", self.log());
            assert!(Instant::now() < deadline, "mosquitto not listening\n{}", self.log());
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn password_config(dir: &Path) -> String {
    let passwords = dir.join("passwords");
    let status = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&passwords)
        .args([FLEET_USER, FLEET_PASSWORD])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success(), "mosquitto_passwd failed");
    format!("allow_anonymous false\npassword_file {}\n", passwords.display())
}

fn tls_config(dir: &Path) -> String {
    make_certificates(dir);
    "allow_anonymous true\n".into()
}

/// A second listener with TLS, requiring a client certificate; its port goes to `tls-port`.
fn tls_listener(dir: &Path) -> String {
    let port = free_port();
    std::fs::write(dir.join("tls-port"), port.to_string()).expect("written");
    let path = |name: &str| dir.join(name).display().to_string();
    format!(
        "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        path("ca.pem"),
        path("server.pem"),
        path("server.key")
    )
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, with `openssl`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509", "-days", "2", "-subj", "/CN=wildcam-test-ca"][..],
            &key,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    for (name, usage) in [
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), usage).expect("written");
        let subject = format!("/CN=wildcam-test-{name}");
        let (key_file, csr, cert, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        openssl(&[&["req", "-subj", &subject][..], &key, &["-keyout", &key_file, "-out", &csr]].concat());
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
    }
}

async fn claim_token(server: &Server) -> String {
    let now = server.state().clock.now_ms();
    let generated = generate_claim_token(1, now + DAY_MS, "external test".into()).expect("token");
    server
        .state()
        .store
        .create_claim_token(generated.record)
        .await
        .expect("stored");
    generated.token
}

/// A server in external mode against the broker on `port`.
async fn start_external_server(port: u16, dir: &Path) -> Server {
    let mut config = test_config(dir);
    config.external_mqtt = ExternalBrokerConfig {
        client_id: "fleet-server-1".into(),
        username: Some(FLEET_USER.into()),
        password: Some(FLEET_PASSWORD.into()),
        auth_hook_secret: Some(HOOK_SECRET.into()),
        ..ExternalBrokerConfig::loopback(port)
    };
    Server::start(config)
        .await
        .expect("server starts in external mode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_split_device_and_provisioning_uplinks_on_mosquitto() {
    let Some(binary) = mosquitto_or_skip("links_split_device_and_provisioning_uplinks_on_mosquitto") else {
        return;
    };
    bounded(async {
        let mosquitto = Mosquitto::start(binary, Setup::Anonymous).await;
        let (first, mut link_a) = ExternalBroker::connect(link_config(mosquitto.port, "fleet-a"))
            .await
            .expect("a connects");
        let (second, mut link_b) = ExternalBroker::connect(link_config(mosquitto.port, "fleet-b"))
            .await
            .expect("b connects");
        let device = Mqtt::connect(mosquitto.addr(), "trap-1", "trap-1", DEVICE_PASSWORD)
            .await
            .expect("device connects");
        let topics = ["wc/v1/dev/trap-1/up/det", "wc/v1/prov/session-1/up"];
        assert_uplinks_split(&device, &mut link_a, &mut link_b, &topics).await;
        first.shutdown().await;
        second.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_mosquitto_acks_detections_after_commit_and_stores_them_once() {
    let Some(binary) =
        mosquitto_or_skip("a_server_on_mosquitto_acks_detections_after_commit_and_stores_them_once")
    else {
        return;
    };
    bounded(async {
        let mosquitto = Mosquitto::start(binary, Setup::Anonymous).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let server = start_external_server(mosquitto.port, dir.path()).await;
        assert_eq!(server.mqtt_v4(), None, "no embedded listener");
        let token = claim_token(&server).await;
        let provisioned = provision(mosquitto.addr(), Some(&token), [21; 32])
            .await
            .expect("provisioned");
        let mut trap = TestTrap::connect(mosquitto.addr(), &provisioned)
            .await
            .expect("device connects");
        trap.send(&trap.hello()).await;
        for seq in 1..=20 {
            trap.send(&detection(seq)).await;
        }
        assert_eq!(trap.wait_ack(20).await, Ok(20));
        let store = server.state().store.clone();
        assert_eq!(stored_seqs(store.as_ref(), &trap.id).await, (1..=20).collect::<Vec<_>>());

        // A resend is stored once and acked again; a gap holds the ack back until filled.
        trap.send(&detection(7)).await;
        assert_eq!(trap.wait_ack(20).await, Ok(20));
        assert_eq!(stored_seqs(store.as_ref(), &trap.id).await.len(), 20);
        trap.send(&detection(22)).await;
        assert_eq!(trap.wait_ack(20).await, Ok(20));
        trap.send(&detection(21)).await;
        assert_eq!(trap.wait_ack(22).await, Ok(22));
        assert_eq!(server.state().mqtt_v4, mosquitto.addr().to_string(), "the API shows the broker");
        server.shutdown().await.expect("clean shutdown");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_comes_back_after_mosquitto_restarts_and_bad_credentials_are_refused() {
    let Some(binary) =
        mosquitto_or_skip("the_link_comes_back_after_mosquitto_restarts_and_bad_credentials_are_refused")
    else {
        return;
    };
    bounded(async {
        let mut mosquitto = Mosquitto::start(binary, Setup::Password).await;
        let wrong = ExternalBrokerConfig {
            password: Some("wrong".into()),
            ..link_config(mosquitto.port, "fleet-refused")
        };
        let started = Instant::now();
        let error = ExternalBroker::connect(wrong)
            .await
            .expect_err("bad password refused");
        assert!(matches!(error, BrokerError::ConnectRefused { .. }), "{error}");
        assert!(error.to_string().contains("refused the connection"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3), "a refusal is not retried until the timeout");

        let config =
            ExternalBrokerConfig { reconnect_delay_max_ms: 500, ..link_config(mosquitto.port, "fleet-1") };
        let (broker, mut link) = ExternalBroker::connect(config).await.expect("connects");
        let device_up = "wc/v1/dev/trap-1/up/det";
        let device = Mqtt::connect(mosquitto.addr(), FLEET_USER, FLEET_USER, FLEET_PASSWORD)
            .await
            .expect("publisher connects");
        device.publish(device_up, 1u32.to_be_bytes().to_vec()).await;
        let first = timeout(WAIT, link.recv())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(seq_of(&first), 1);
        drop(device);

        mosquitto.kill();
        sleep(Duration::from_millis(300)).await;
        mosquitto.run().await;
        // The restarted broker has no session: the link subscribes again. Publish until
        // one arrives.
        let device = Mqtt::connect(mosquitto.addr(), FLEET_USER, FLEET_USER, FLEET_PASSWORD)
            .await
            .expect("publisher reconnects");
        let deadline = Instant::now() + Duration::from_secs(8);
        let again = loop {
            device.publish(device_up, 2u32.to_be_bytes().to_vec()).await;
            if let Ok(Some(message)) = timeout(Duration::from_millis(200), link.recv()).await {
                break message;
            }
            assert!(Instant::now() < deadline, "no uplink after the restart\n{}", mosquitto.log());
        };
        assert_eq!(seq_of(&again), 2);
        assert!(link.stats().reconnects >= 1, "{:?}", link.stats());
        broker.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_holds_uplinks_back_while_downlinks_flow() {
    let Some(binary) = mosquitto_or_skip("a_slow_consumer_holds_uplinks_back_while_downlinks_flow") else {
        return;
    };
    bounded(async {
        const COUNT: u32 = 100;
        const QUEUE: usize = 8;
        let mosquitto = Mosquitto::start(binary, Setup::Anonymous).await;
        let config = ExternalBrokerConfig {
            inbound_queue_len_max: QUEUE,
            receive_maximum: 4,
            ..link_config(mosquitto.port, "fleet-slow")
        };
        let (broker, mut link) = ExternalBroker::connect(config).await.expect("connects");
        let mut device = Mqtt::connect(mosquitto.addr(), "trap-1", "trap-1", DEVICE_PASSWORD)
            .await
            .expect("device connects");
        device.subscribe("wc/v1/dev/trap-1/down/#").await;
        for seq in 0..COUNT {
            device
                .publish("wc/v1/dev/trap-1/up/det", seq.to_be_bytes().to_vec())
                .await;
        }
        // Nobody reads: the link fills its queue, then stops reading from the broker.
        let deadline = Instant::now() + WAIT;
        while link.stats().delivered < QUEUE as u64 {
            assert!(Instant::now() < deadline, "the queue never filled: {:?}", link.stats());
            sleep(Duration::from_millis(20)).await;
        }
        sleep(Duration::from_millis(300)).await;
        assert_eq!(link.stats().delivered, QUEUE as u64, "the link reads no further than its queue");
        // Acks still go out meanwhile: downlinks have their own connection.
        link.publish("wc/v1/dev/trap-1/down/ack", &b"ack"[..])
            .await
            .expect("queued");
        let (topic, _) = device
            .next()
            .await
            .expect("a downlink while uplinks are held back");
        assert_eq!(topic, "wc/v1/dev/trap-1/down/ack");
        // Reading again, everything arrives, once and in order.
        let mut seqs = Vec::new();
        while seqs.len() < COUNT as usize {
            let message = timeout(WAIT, link.recv())
                .await
                .expect("in time")
                .expect("open");
            seqs.push(seq_of(&message));
        }
        assert_eq!(seqs, (0..COUNT).collect::<Vec<_>>());
        assert_eq!(timeout(Duration::from_millis(300), link.recv()).await.ok(), None, "nothing more");
        broker.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_reaches_mosquitto() {
    const TEST: &str = "tls_with_a_client_certificate_reaches_mosquitto";
    let (Some(binary), Some(_)) = (mosquitto_or_skip(TEST), tool_or_skip(TEST, "openssl", "openssl")) else {
        return;
    };
    bounded(async {
        let mosquitto = Mosquitto::start(binary, Setup::MutualTls).await;
        let tls = ExternalBrokerConfig {
            tls: true,
            ca_file: Some(mosquitto.file("ca.pem")),
            client_cert_file: Some(mosquitto.file("client.pem")),
            client_key_file: Some(mosquitto.file("client.key")),
            connect_timeout_ms: 3_000,
            ..link_config(mosquitto.tls_port(), "fleet-tls")
        };
        let (broker, mut link) = ExternalBroker::connect(tls.clone())
            .await
            .expect("connects over TLS");
        let device = Mqtt::connect(mosquitto.addr(), "trap-1", "trap-1", DEVICE_PASSWORD)
            .await
            .expect("device connects in plain text");
        device
            .publish("wc/v1/dev/trap-1/up/det", 5u32.to_be_bytes().to_vec())
            .await;
        let message = timeout(WAIT, link.recv())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(seq_of(&message), 5);
        broker.shutdown().await;

        // Without its certificate the broker refuses the handshake; with the wrong CA the
        // server refuses the broker's certificate. Both say why.
        let no_certificate = ExternalBrokerConfig {
            client_cert_file: None,
            client_key_file: None,
            connect_timeout_ms: 1_000,
            ..tls.clone()
        };
        let error = ExternalBroker::connect(no_certificate)
            .await
            .expect_err("refused")
            .to_string();
        assert!(error.contains("not ready within") && error.contains("fatal alert"), "{error}");
        let wrong_ca = ExternalBrokerConfig {
            ca_file: Some(mosquitto.file("client.pem")),
            connect_timeout_ms: 1_000,
            ..tls
        };
        let error = ExternalBroker::connect(wrong_ca)
            .await
            .expect_err("refused")
            .to_string();
        assert!(error.contains("UnknownIssuer"), "{error}");
    })
    .await;
}

// ------------------------------------------------------------------ auth hook

/// A plain HTTP/1.1 POST of `body`; the status and the body of the answer.
async fn post(addr: SocketAddr, path: &str, secret: Option<&str>, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let secret = secret
        .map(|s| format!("{AUTH_HOOK_SECRET_HEADER}: {s}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n\
         {secret}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response[9..12].parse().expect("status code");
    let (_, body) = response.split_once("\r\n\r\n").expect("head and body");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn decide(addr: SocketAddr, client_id: &str, username: &str, password: &str) -> String {
    let body =
        json!({ "clientid": client_id, "username": username, "password": password, "peerhost": "10.0.0.9" });
    let (status, answer) = post(addr, "/mqtt/auth", Some(HOOK_SECRET), &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    answer["result"].as_str().expect("result").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_hook_admits_what_the_embedded_broker_would() {
    bounded(async {
        // rumqttd stands in for the external broker; it admits anyone, the hook decides.
        let anyone = |_: &str, _: &str, _: &str| true;
        let (broker, _embedded_link) = EmbeddedBroker::start(BrokerConfig::loopback_ephemeral(), anyone)
            .await
            .expect("broker starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let server = start_external_server(broker.listen_v5().port(), dir.path()).await;
        let http = server.http();
        let token = claim_token(&server).await;
        let provisioned = provision(broker.listen_v4(), Some(&token), [31; 32])
            .await
            .expect("provisioned");
        let (id, password) = (provisioned.device_id.as_str(), provisioned.mqtt_password.as_str());

        assert_eq!(decide(http, id, id, password).await, "allow");
        assert_eq!(decide(http, id, id, "guess").await, "deny");
        assert_eq!(decide(http, "someone-else", id, password).await, "deny", "client id must be the user");
        assert_eq!(decide(http, "wc-unknown", "wc-unknown", password).await, "deny");
        assert_eq!(decide(http, "unclaimed-7", "provision", "wildcam-provisioning").await, "allow");
        assert_eq!(decide(http, "unclaimed-7", "provision", "guess").await, "deny");
        assert_eq!(decide(http, "fleet-server-1", FLEET_USER, FLEET_PASSWORD).await, "allow");
        assert_eq!(decide(http, "fleet-server-1-downlink", FLEET_USER, FLEET_PASSWORD).await, "allow");
        assert_eq!(decide(http, "fleet-server-1", id, password).await, "deny", "the server's id is its own");

        wildcam_fleet_server::server::revoke_device(server.state(), &provisioned.device_id)
            .await
            .expect("revoked");
        assert_eq!(decide(http, id, id, password).await, "deny", "revoked");

        let body = json!({ "clientid": id, "username": id, "password": password }).to_string();
        for secret in [None, Some("hook-secret-wrong-000000")] {
            let (status, answer) = post(http, "/mqtt/auth", secret, &body).await;
            assert_eq!((status, &answer["error"]["code"]), (403, &json!("forbidden")), "{answer}");
        }
        let (status, answer) = post(http, "/mqtt/auth", Some(HOOK_SECRET), "{\"clientid\": 7").await;
        assert_eq!((status, &answer["error"]["code"]), (400, &json!("invalid_body")), "{answer}");
        let (status, answer) = post(http, "/mqtt/auth", Some(HOOK_SECRET), "{\"clientid\": \"x\"}").await;
        assert_eq!(status, 400, "missing members: {answer}");
        server.shutdown().await.expect("clean shutdown");
        broker.shutdown();
    })
    .await;
}

#[tokio::test]
async fn the_auth_hook_is_not_served_in_embedded_mode() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start(test_config(dir.path()))
            .await
            .expect("server starts");
        let body = json!({ "clientid": "a", "username": "a", "password": "a" }).to_string();
        let (status, answer) = post(server.http(), "/mqtt/auth", None, &body).await;
        assert_eq!((status, &answer["error"]["code"]), (404, &json!("mqtt_auth_disabled")), "{answer}");
        server.shutdown().await.expect("clean shutdown");
    })
    .await;
}
