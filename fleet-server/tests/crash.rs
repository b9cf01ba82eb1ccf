//! Crash safety of durable ingest, against the real `wildcam-fleet serve`
//! binary in a child process.
//!
//! Three traps, provisioned over MQTT with a claim token, stream 2,000
//! detections each from the SDK's own [`OfflineQueue`] (in-flight window of
//! 64, released only by sealed acks). Once a quarter of them are acked the
//! server gets SIGKILL in the middle of ingest. It is restarted on the same
//! data directory and ports; the traps reconnect with the same sealers (their
//! counters go on), replay two old frames each, which must be refused, and
//! resend everything unacked, which must be accepted. Then the database must
//! hold every detection exactly once, everything acked before the kill among
//! them, with `acked_through` at the last sequence.
//!
//! Runs in CI: every wait is bounded, and the server is killed when the test
//! ends, whatever happened.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Mqtt, stored_seqs};
use rumqttc::QoS;
use tokio::time::{Instant, sleep, timeout};
use wildcam_fleet_server::store::Clock as _;
use wildcam_fleet_server::store::{
    ClaimStore as _, DeviceStore as _, SqliteConfig, SqliteStore, Store as _, SystemClock,
    generate_claim_token,
};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    Ack, Capabilities, Chip, Classification, Detection, Downlink, FirmwareVersion, Hello, MessageKind,
    ResetReason, Route, Trigger, Uplink,
};
use wildcam_sdk::provision::Provisioned;
use wildcam_sdk::queue::{FullPolicy, MemoryStore, OfflineQueue, QueueConfig};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer};
use wildcam_sdk::topic::{self, Direction};

/// Traps streaming at once.
const TRAPS: usize = 3;
/// Detections each trap records.
const DETECTIONS: u32 = 2_000;
/// Queue capacity: everything a trap records fits.
const QUEUE_CAPACITY: usize = 2_048;
/// Longest queue record: a detection envelope (at most 61 bytes).
const RECORD_LEN: usize = 64;
/// The SDK queue's in-flight window.
const INFLIGHT_MAX: usize = 64;
/// Acked detections (all traps) after which the server is killed.
const KILL_AFTER_ACKED: u32 = DETECTIONS * TRAPS as u32 / 4;
/// Upper bound of the random delay between reaching [`KILL_AFTER_ACKED`] and the kill.
const KILL_JITTER_MS: u64 = 100;
/// Without an ack for this long a trap rewinds and resends, as the SDK does.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the server to listen after a (re)start.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a streaming phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(20);
/// Old frames each trap replays after the restart.
const REPLAYS_PER_TRAP: u64 = 2;

type Queue = OfflineQueue<MemoryStore<QUEUE_CAPACITY, RECORD_LEN>>;

/// Loopback ports chosen once and reused across the restart.
#[derive(Debug, Clone, Copy)]
struct Ports {
    mqtt_v4: u16,
    mqtt_v5: u16,
    http: u16,
}

impl Ports {
    /// Three free ports: bound on port 0, read, released.
    fn free() -> Self {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
            .collect();
        let port = |i: usize| listeners[i].local_addr().expect("local addr").port();
        Self { mqtt_v4: port(0), mqtt_v5: port(1), http: port(2) }
    }

    fn mqtt(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_v4))
    }

    fn http(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http))
    }
}

/// The server binary running as a child process; killed (SIGKILL) on drop.
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `wildcam-fleet serve` on `data_dir` and `ports`, logging to
    /// `log` (appended), and waits until its MQTT listener accepts.
    async fn start(data_dir: &Path, ports: Ports, log: &Path) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_wildcam-fleet"))
            .arg("serve")
            .env("WILDCAM__DATA_DIR", data_dir)
            .env("WILDCAM__MQTT__LISTEN_V4", format!("127.0.0.1:{}", ports.mqtt_v4))
            .env("WILDCAM__MQTT__LISTEN_V5", format!("127.0.0.1:{}", ports.mqtt_v5))
            .env("WILDCAM__HTTP__LISTEN", format!("127.0.0.1:{}", ports.http))
            .env("WILDCAM__INGEST__LINGER_MS", "2")
            .env("WILDCAM__LOG__FILTER", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("server binary starts");
        let mut server = Self { child, log: log.to_path_buf() };
        server.wait_listening(ports.mqtt()).await;
        server
    }

    async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("server exited with {status} before listening; log:\n{}", self.log_text());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "server not listening on {addr}; log:\n{}", self.log_text());
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a trap's connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// Every recorded detection is acked.
    AllAcked,
    /// The broker went away.
    ConnectionLost,
    /// The phase deadline passed.
    TimedOut,
}

/// A trap: its credentials, its SDK queue and its sealing state, which all
/// survive the server's crash.
struct Trap {
    credentials: Provisioned,
    queue: Box<Queue>,
    sealer: Sealer,
    opener: Opener,
    /// Highest `through` of any ack received.
    acked_through: Arc<AtomicU32>,
    /// Every frame published before the crash, with the sequence it carried
    /// (0 for the hello).
    frames: Vec<(u32, Vec<u8>)>,
    /// Whether to keep published frames in `frames`.
    record_frames: bool,
}

impl Trap {
    fn new(credentials: Provisioned) -> Self {
        let config = QueueConfig::new(FullPolicy::RejectNew).with_inflight_max(INFLIGHT_MAX);
        let mut queue = Box::new(OfflineQueue::new(MemoryStore::new(), config));
        for _ in 0..DETECTIONS {
            queue
                .append_with(|seq, buf| {
                    Uplink::Detection(detection(seq))
                        .encode(buf)
                        .ok()
                        .map(|e| e.len())
                })
                .expect("the queue holds every detection");
        }
        let key = credentials.session_key.clone();
        Self {
            credentials,
            queue,
            sealer: Sealer::new(key.clone(), Direction::Up),
            opener: Opener::new(key, Direction::Down),
            acked_through: Arc::default(),
            frames: Vec::new(),
            record_frames: true,
        }
    }

    fn id(&self) -> &DeviceId {
        &self.credentials.device_id
    }

    /// One connection: publishes `replays` as they are, then a hello, then
    /// streams the queue until everything is acked, the connection is lost,
    /// or `deadline`.
    async fn session(&mut self, addr: SocketAddr, replays: Vec<Vec<u8>>, deadline: Instant) -> SessionEnd {
        let id = self.id().clone();
        let password = self.credentials.mqtt_password.to_string();
        let Ok(mut mqtt) = Mqtt::connect(addr, id.as_str(), id.as_str(), &password).await else {
            return SessionEnd::ConnectionLost;
        };
        mqtt.subscribe(&topic::device_downlink_filter(&id)).await;
        for frame in replays {
            if !publish(&mqtt, &id, MessageKind::Detection, frame).await {
                return SessionEnd::ConnectionLost;
            }
        }
        self.queue.rewind();
        if !self.send_hello(&mqtt).await {
            return SessionEnd::ConnectionLost;
        }
        self.stream(&mut mqtt, deadline).await
    }

    async fn stream(&mut self, mqtt: &mut Mqtt, deadline: Instant) -> SessionEnd {
        let mut record = [0u8; RECORD_LEN];
        loop {
            while let Some(entry) = self.queue.next_to_send(&mut record).expect("queue in RAM") {
                let seq = entry.seq;
                let frame = self.seal(entry.record);
                if self.record_frames {
                    self.frames.push((seq, frame.clone()));
                }
                if !publish(mqtt, self.id(), MessageKind::Detection, frame).await {
                    return SessionEnd::ConnectionLost;
                }
            }
            if self.queue.is_empty() {
                return SessionEnd::AllAcked;
            }
            let wait = ACK_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match timeout(wait, mqtt.incoming.recv()).await {
                Ok(Some((_, frame))) => self.on_downlink(frame),
                Ok(None) => return SessionEnd::ConnectionLost,
                Err(_) if Instant::now() >= deadline => return SessionEnd::TimedOut,
                // No ack in time: resend everything unacked, as the SDK does.
                Err(_) => self.queue.rewind(),
            }
        }
    }

    fn on_downlink(&mut self, mut frame: Vec<u8>) {
        let Ok(plain) = self
            .opener
            .open(self.credentials.device_id.as_bytes(), &mut frame)
        else {
            panic!("trap {} got a downlink frame that does not open", self.id());
        };
        if let Ok(Downlink::Ack(Ack { through })) = Downlink::decode(plain) {
            self.queue
                .ack(through)
                .expect("the server never acks beyond what was sent");
            self.acked_through.fetch_max(through, Ordering::Relaxed);
        }
    }

    async fn send_hello(&mut self, mqtt: &Mqtt) -> bool {
        let stats = self.queue.stats();
        let hello = Uplink::Hello(Hello {
            device_id: self.id().clone(),
            hardware_model: heapless::String::try_from("crash-test-trap").expect("short"),
            chip: Chip::Host,
            firmware: FirmwareVersion { major: 0, minor: 1, patch: 0 },
            secure_version: 1,
            reset_reason: ResetReason::PowerOn,
            capabilities: Capabilities::PIR,
            config_version: 0,
            queue_floor: stats.floor,
            queue_next: stats.next_seq,
        });
        let mut envelope = [0u8; 128];
        let len = hello.encode(&mut envelope).expect("hello encodes").len();
        let frame = self.seal(&envelope[..len]);
        if self.record_frames {
            self.frames.push((0, frame.clone()));
        }
        publish(mqtt, self.id(), MessageKind::Hello, frame).await
    }

    fn seal(&mut self, envelope: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; envelope.len() + SEAL_OVERHEAD];
        let sealed = self
            .sealer
            .seal(self.credentials.device_id.as_bytes(), envelope, &mut frame)
            .expect("seals");
        frame.truncate(sealed.len);
        frame
    }
}

/// Publishes a frame on the trap's uplink topic for `kind`; `false` once the
/// client's event loop is gone (the server died).
async fn publish(mqtt: &Mqtt, id: &DeviceId, kind: MessageKind, frame: Vec<u8>) -> bool {
    let Route::Device(_, suffix) = kind.route() else {
        unreachable!("detections and hellos are device messages")
    };
    let topic = topic::device_topic(id, Direction::Up, suffix);
    mqtt.client
        .publish(topic.as_str(), QoS::AtLeastOnce, false, frame)
        .await
        .is_ok()
}

/// Detection `seq`, as a trap records it.
fn detection(seq: u32) -> Detection {
    Detection {
        seq,
        captured_at: 1_795_000_000 + seq,
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes: [Classification { label: (seq % 50) as u16, confidence_pct: 80 }]
            .into_iter()
            .collect(),
        bbox: None,
        image_len: 60_000 + seq,
        image_digest: [seq as u8; 8],
        battery_mv: 3_800,
    }
}

/// Runs every trap's session concurrently; returns them with how each ended.
fn run_phase(
    traps: Vec<Trap>,
    addr: SocketAddr,
    mut replays: Vec<Vec<Vec<u8>>>,
    deadline: Instant,
) -> Vec<tokio::task::JoinHandle<(Trap, SessionEnd)>> {
    replays.resize(traps.len(), Vec::new());
    traps
        .into_iter()
        .zip(replays)
        .map(|(mut trap, replays)| {
            tokio::spawn(async move {
                let end = trap.session(addr, replays, deadline).await;
                (trap, end)
            })
        })
        .collect()
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<(Trap, SessionEnd)>>) -> Vec<(Trap, SessionEnd)> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("trap task"));
    }
    out
}

/// A claim token for `uses` traps, stored before the server first starts.
async fn create_claim_token(data_dir: &Path, uses: u32) -> String {
    let store = SqliteStore::open(SqliteConfig::new(data_dir))
        .await
        .expect("store opens");
    let generated =
        generate_claim_token(uses, SystemClock.now_ms() + 3_600_000, "crash test".into()).expect("token");
    store
        .create_claim_token(generated.record)
        .await
        .expect("token stored");
    store.close().await.expect("store closes");
    generated.token
}

/// The value of one sample line of the Prometheus text at `/metrics`.
async fn metric(http: SocketAddr, sample: &str) -> u64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(http)
        .await
        .expect("http connects");
    let request = "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut response = String::new();
    timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("metrics answered in time")
        .expect("metrics read");
    response
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{response}"))
}

/// Every stored sequence of `device`, in order, read page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_ingest_loses_nothing_acked_and_stores_everything_once() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("server.log");
    let ports = Ports::free();
    let token = create_claim_token(&data_dir, TRAPS as u32).await;

    // Start, provision, stream until a quarter is acked, then SIGKILL.
    let mut server = ServerProcess::start(&data_dir, ports, &log).await;
    let mut traps = Vec::with_capacity(TRAPS);
    for seed in 1..=TRAPS as u8 {
        let credentials = common::provision(ports.mqtt(), Some(&token), [seed; 32])
            .await
            .expect("trap provisioned");
        traps.push(Trap::new(credentials));
    }
    let progress: Vec<Arc<AtomicU32>> = traps.iter().map(|t| t.acked_through.clone()).collect();
    let acked = || {
        progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum::<u32>()
    };
    let tasks = run_phase(traps, ports.mqtt(), Vec::new(), Instant::now() + PHASE_TIMEOUT);
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while acked() < KILL_AFTER_ACKED {
        assert!(Instant::now() < deadline, "only {} acked before the deadline", acked());
        sleep(Duration::from_millis(1)).await;
    }
    // Acks come in rounds (a window's worth per trap); a random delay lands the
    // kill anywhere in a round: while frames arrive, during a commit, between
    // a commit and its acks.
    let jitter = Duration::from_millis(rand::random::<u64>() % KILL_JITTER_MS);
    sleep(jitter).await;
    server.kill();
    let acked_at_kill = acked();
    let phase_one = timeout(Duration::from_secs(10), join_all(tasks))
        .await
        .expect("traps notice the crash");
    assert!(acked_at_kill < DETECTIONS * TRAPS as u32, "the kill came after everything was acked");
    let mut traps = Vec::with_capacity(TRAPS);
    let mut acked_before_kill = Vec::with_capacity(TRAPS);
    let mut replays = Vec::with_capacity(TRAPS);
    for (mut trap, end) in phase_one {
        assert_eq!(end, SessionEnd::ConnectionLost, "trap {} saw the crash", trap.id());
        let acked = trap.acked_through.load(Ordering::Relaxed);
        assert_eq!(trap.queue.floor(), acked + 1, "the queue released exactly what was acked");
        // A frame the server committed long ago and the frame of the last
        // acked detection: both opened, and their counters persisted, before the kill.
        let first = trap
            .frames
            .first()
            .map(|(_, f)| f.clone())
            .expect("frames sent");
        let last_acked = trap
            .frames
            .iter()
            .rev()
            .find(|(seq, _)| *seq == acked && acked > 0)
            .map_or_else(|| first.clone(), |(_, f)| f.clone());
        replays.push(vec![first, last_acked]);
        trap.record_frames = false;
        acked_before_kill.push(acked);
        traps.push(trap);
    }

    // Before anything is resent: everything acked survived the kill.
    let store = SqliteStore::open(SqliteConfig::new(&data_dir))
        .await
        .expect("store opens after the kill");
    let mut stored_at_kill = 0;
    for (trap, acked) in traps.iter().zip(&acked_before_kill) {
        let seqs = stored_seqs(&store, trap.id()).await;
        let missing: Vec<u32> = (1..=*acked)
            .filter(|s| seqs.binary_search(s).is_err())
            .collect();
        assert!(missing.is_empty(), "trap {}: acked before the kill but lost: {missing:?}", trap.id());
        stored_at_kill += seqs.len();
    }
    store.close().await.expect("store closes");

    // Restart on the same data directory and ports; the traps reconnect with
    // their sealers (counters go on), replay two old frames, resend the rest.
    let server = ServerProcess::start(&data_dir, ports, &log).await;
    let tasks = run_phase(traps, ports.mqtt(), replays, Instant::now() + PHASE_TIMEOUT);
    let phase_two = join_all(tasks).await;
    let mut traps = Vec::with_capacity(TRAPS);
    for (trap, end) in phase_two {
        assert_eq!(end, SessionEnd::AllAcked, "trap {}; server log:\n{}", trap.id(), server.log_text());
        assert_eq!(trap.acked_through.load(Ordering::Relaxed), DETECTIONS);
        traps.push(trap);
    }
    let replays_sent = REPLAYS_PER_TRAP * TRAPS as u64;
    let replayed = "wildcam_messages_rejected_total{reason=\"replayed\"}";
    assert_eq!(metric(ports.http(), replayed).await, replays_sent, "every replay refused");
    let unauthentic = "wildcam_messages_rejected_total{reason=\"unauthentic\"}";
    assert_eq!(metric(ports.http(), unauthentic).await, 0, "every new frame opened");
    drop(server); // SIGKILL again: what was acked must be durable as well.

    let store = SqliteStore::open(SqliteConfig::new(&data_dir))
        .await
        .expect("store reopens");
    for trap in &traps {
        let seqs = stored_seqs(&store, trap.id()).await;
        assert_eq!(seqs.len(), DETECTIONS as usize, "trap {}: stored once each", trap.id());
        assert_eq!(seqs, (1..=DETECTIONS).collect::<Vec<_>>(), "trap {}: every sequence", trap.id());
        let device = store
            .get_device(trap.id().clone())
            .await
            .expect("read")
            .expect("registered");
        assert_eq!(device.acked_through, DETECTIONS, "trap {}", trap.id());
    }
    store.close().await.expect("store closes");
    eprintln!(
        "crash test: killed {jitter:?} after the threshold, {acked_at_kill} of {} acked and \
         {stored_at_kill} stored at the kill; took {:.1?}",
        DETECTIONS * TRAPS as u32,
        started.elapsed()
    );
}
