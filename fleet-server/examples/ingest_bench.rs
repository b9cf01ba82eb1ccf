//! Load generator of `cargo xtask bench-ingest`: many MQTT clients streaming
//! sealed detections, each with a bounded in-flight window, either
//!
//! - to the fleet server, the window released by its sealed acks (sent after
//!   commit), or
//! - to Mosquitto with one plain subscriber in this process and no storage, the
//!   window released when the subscriber receives the message: the same closed
//!   loop minus ingest, storage and the return trip, i.e. the reference cost of
//!   a broker.
//!
//! It measures released detections per second over a steady window after a
//! warm-up, publish→ack (or publish→delivery) latency, and the broker process's
//! CPU (per thread) and memory from `/proc`.
//!
//! Usually run by `cargo xtask bench-ingest`, which builds it in release mode,
//! starts the broker and cleans up. By hand:
//!
//! ```text
//! # Register the bench devices straight in the store (server not running):
//! cargo run --release -p wildcam-fleet-server --example ingest_bench -- \
//!     prepare --data-dir DIR --clients 1000
//! # Start `wildcam-fleet serve` on DIR, then:
//! cargo run --release -p wildcam-fleet-server --example ingest_bench -- \
//!     run --broker fleet --mqtt 127.0.0.1:18830 --http 127.0.0.1:18080 \
//!     --server-pid PID --clients 1000 --warmup 5 --seconds 20
//! ```
//!
//! Client `i` is device `bench-{i:05}`, whose password and session key are
//! derived from `i`, so `prepare` and `run` agree without sharing a file.
//! Every detection goes through the SDK: the offline queue assigns its
//! sequence and bounds the in-flight window, the sealer seals it, acks are
//! opened and released through the queue. Everything runs on 127.0.0.1.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wildcam_fleet_server::store::{
    ClaimAuthorization, ClaimStore as _, Clock as _, DeviceStore as _, NewClaimToken, NewDevice,
    PasswordHash, SecretDigest, SqliteConfig, SqliteStore, Store as _, SystemClock,
};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    Ack, BoundingBox, Classification, Detection, Downlink, MessageKind, Route, Trigger, Uplink,
};
use wildcam_sdk::queue::{FullPolicy, MemoryStore, OfflineQueue, QueueConfig};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer, SessionKey};
use wildcam_sdk::topic::{self, Direction};

/// Longest queue record: a detection envelope (at most 61 bytes).
const RECORD_LEN: usize = 64;
/// Entries a client's queue holds; the window never exceeds it.
const QUEUE_CAPACITY: usize = 256;
/// Without any ack for this long a client rewinds and resends (as the SDK does).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for every client to connect and subscribe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Keep-alive of every client; rumqttd drops a client silent for 1.5× this.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Most clients connecting at the same moment.
const CONNECTS_AT_ONCE: usize = 100;
/// Clock ticks per second of `/proc` CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

type Queue = OfflineQueue<MemoryStore<QUEUE_CAPACITY, RECORD_LEN>>;

#[derive(Debug, Parser)]
#[command(name = "ingest_bench", about = "Load generator for `cargo xtask bench-ingest`")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register the bench devices in the store of a data directory (the server must not run).
    Prepare {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// How many devices.
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
    },
    /// Connect the clients and measure.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Broker {
    /// The fleet server: sealed acks after commit release the window.
    Fleet,
    /// A plain broker: PUBACKs release the window, one subscriber counts deliveries.
    Mosquitto,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// What the clients talk to.
    #[arg(long, value_enum, default_value_t = Broker::Fleet)]
    broker: Broker,
    /// The broker's MQTT listener.
    #[arg(long)]
    mqtt: SocketAddr,
    /// The fleet server's HTTP listener (for `/metrics`).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The broker's process id (CPU and memory from `/proc`).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Connected clients.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Detections in flight per client (the SDK queue's window).
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Tokio worker threads of the generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Prepare { data_dir, clients } => runtime(1)?.block_on(prepare(data_dir, clients)),
        Command::Run(args) => {
            if args.inflight == 0 || args.inflight > QUEUE_CAPACITY / 2 {
                bail!("--inflight must be 1..={}", QUEUE_CAPACITY / 2);
            }
            if args.clients == 0 || args.seconds == 0 {
                bail!("--clients and --seconds must be at least 1");
            }
            runtime(args.threads)?.block_on(run(args))
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("tokio runtime")
}

// ---------------------------------------------------------------- devices

fn device_id(index: usize) -> Result<DeviceId> {
    DeviceId::new(&format!("bench-{index:05}")).map_err(|e| anyhow::anyhow!("device id: {e}"))
}

fn derived(purpose: &str, index: usize) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"wildcam-ingest-bench/");
    hasher.update(purpose.as_bytes());
    hasher.update((index as u64).to_le_bytes());
    hasher.finalize().into()
}

fn password(index: usize) -> String {
    derived("password", index)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn session_key(index: usize) -> SessionKey {
    SessionKey::from_bytes(derived("session-key", index))
}

/// Registers `count` bench devices under one multi-use claim token.
async fn prepare(data_dir: PathBuf, count: usize) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let store = SqliteStore::open(SqliteConfig::new(&data_dir)).await?;
    let token = NewClaimToken {
        id: "ingest-bench".into(),
        secret_digest: SecretDigest::from_bytes(derived("claim", 0)),
        uses_max: u32::try_from(count)?,
        expires_at_ms: SystemClock.now_ms() + 86_400_000,
        label: "ingest bench".into(),
    };
    store.create_claim_token(token).await?;
    for index in 0..count {
        let device = NewDevice {
            id: device_id(index)?,
            identity_key: derived("identity", index),
            mqtt_password_hash: PasswordHash::of(&password(index)),
            session_key: session_key(index),
            authorization: ClaimAuthorization::Token { claim_id: "ingest-bench".into() },
        };
        store.create_device(device).await?;
    }
    store.close().await?;
    println!("prepare: {count} devices registered in {:.1?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------- clients

/// Counters shared by every client task.
#[derive(Default)]
struct Shared {
    connected: AtomicUsize,
    failed: AtomicUsize,
    published: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    /// The Mosquitto subscriber is subscribed.
    subscriber_ready: AtomicBool,
    /// Latencies are recorded only while this is set.
    measuring: AtomicBool,
}

/// What a client hands back at the end.
#[derive(Default)]
struct ClientReport {
    /// Publish→ack latencies during the measured window, microseconds.
    latencies_us: Vec<u32>,
    error: Option<String>,
}

/// One bench trap: the SDK queue, sealer and opener, and send times.
struct Trap {
    id: DeviceId,
    uplink_topic: String,
    queue: Box<Queue>,
    sealer: Sealer,
    opener: Opener,
    /// Send time of each in-flight sequence, at `seq % QUEUE_CAPACITY`.
    sent_at: Vec<Option<Instant>>,
    /// Send times in order (Mosquitto mode: deliveries come in order).
    puback_order: VecDeque<Instant>,
    acked_through: u32,
    last_progress: Instant,
    window: usize,
}

impl Trap {
    fn new(index: usize, window: usize) -> Result<Self> {
        let id = device_id(index)?;
        let Route::Device(_, suffix) = MessageKind::Detection.route() else {
            bail!("detections are device messages");
        };
        let config = QueueConfig::new(FullPolicy::RejectNew).with_inflight_max(window);
        let key = session_key(index);
        Ok(Self {
            uplink_topic: topic::device_topic(&id, Direction::Up, suffix).to_string(),
            id,
            queue: Box::new(OfflineQueue::new(MemoryStore::new(), config)),
            sealer: Sealer::new(key.clone(), Direction::Up),
            opener: Opener::new(key, Direction::Down),
            sent_at: vec![None; QUEUE_CAPACITY],
            puback_order: VecDeque::with_capacity(window),
            acked_through: 0,
            last_progress: Instant::now(),
            window,
        })
    }

    /// Records new detections up to the window and publishes what the queue
    /// hands out.
    fn fill(&mut self, client: &AsyncClient, shared: &Shared) -> Result<()> {
        let now_s = u32::try_from(SystemClock.now_ms() / 1_000).unwrap_or(u32::MAX);
        while self.queue.len() < self.window {
            self.queue
                .append_with(|seq, buf| {
                    Uplink::Detection(detection(seq, now_s))
                        .encode(buf)
                        .ok()
                        .map(|e| e.len())
                })
                .map_err(|e| anyhow::anyhow!("queue append: {e}"))?;
        }
        let mut record = [0u8; RECORD_LEN];
        let now = Instant::now();
        while let Some(entry) = self
            .queue
            .next_to_send(&mut record)
            .map_err(|e| anyhow::anyhow!("queue: {e}"))?
        {
            let seq = entry.seq;
            let mut frame = vec![0u8; entry.record.len() + SEAL_OVERHEAD];
            let sealed = self
                .sealer
                .seal(self.id.as_bytes(), entry.record, &mut frame)
                .map_err(|e| anyhow::anyhow!("seal: {e}"))?;
            frame.truncate(sealed.len);
            client
                .try_publish(self.uplink_topic.as_str(), QoS::AtLeastOnce, false, frame)
                .context("publish queued")?;
            self.sent_at[seq as usize % QUEUE_CAPACITY] = Some(now);
            self.puback_order.push_back(now);
            shared.published.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A downlink frame: opens it and releases the queue through the ack.
    fn on_downlink(&mut self, mut frame: Vec<u8>, shared: &Shared, latencies: &mut Vec<u32>) -> Result<()> {
        let plain = self
            .opener
            .open(self.id.as_bytes(), &mut frame)
            .map_err(|e| anyhow::anyhow!("downlink frame refused: {e}"))?;
        let Ok(Downlink::Ack(Ack { through })) = Downlink::decode(plain) else {
            return Ok(());
        };
        let released = self
            .queue
            .ack(through)
            .map_err(|e| anyhow::anyhow!("ack {through}: {e}"))?
            .released;
        if released == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let measuring = shared.measuring.load(Ordering::Relaxed);
        for seq in self.acked_through + 1..=through {
            let sent = self.sent_at[seq as usize % QUEUE_CAPACITY].take();
            if let (true, Some(sent)) = (measuring, sent) {
                latencies.push(micros(now - sent));
            }
        }
        self.acked_through = through;
        self.last_progress = now;
        shared.acked.fetch_add(released as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Mosquitto mode: the subscriber received the oldest entry (a broker
    /// delivers one publisher's messages in order).
    fn on_delivered(&mut self, shared: &Shared, latencies: &mut Vec<u32>) -> Result<()> {
        let through = self.acked_through + 1;
        self.queue
            .ack(through)
            .map_err(|e| anyhow::anyhow!("delivery of {through}: {e}"))?;
        let now = Instant::now();
        if let Some(sent) = self.puback_order.pop_front()
            && shared.measuring.load(Ordering::Relaxed)
        {
            latencies.push(micros(now - sent));
        }
        self.acked_through = through;
        self.last_progress = now;
        shared.acked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// No ack for [`ACK_TIMEOUT`]: resend everything unacked (fleet mode; with
    /// Mosquitto nothing is lost on a live QoS 1 connection).
    fn rewind_if_stalled(&mut self, shared: &Shared) {
        if self.queue.inflight() > 0 && self.last_progress.elapsed() > ACK_TIMEOUT {
            shared
                .resent
                .fetch_add(self.queue.inflight() as u64, Ordering::Relaxed);
            self.queue.rewind();
            self.puback_order.clear();
            self.last_progress = Instant::now();
        }
    }
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// A typical detection: one to three classes, a bounding box on most.
fn detection(seq: u32, captured_at: u32) -> Detection {
    let mut classes = heapless::Vec::new();
    for rank in 0..=(seq % 3) {
        let _ = classes.push(Classification {
            label: ((seq + rank * 7) % 250) as u16,
            confidence_pct: (90 - rank * 30) as u8,
        });
    }
    let bbox =
        (!seq.is_multiple_of(4)).then_some(BoundingBox { x: 3_120, y: 4_410, width: 2_250, height: 1_870 });
    Detection {
        seq,
        captured_at,
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes,
        bbox,
        image_len: 150_000 + seq % 50_000,
        image_digest: seq.to_le_bytes().repeat(2).try_into().unwrap_or([0; 8]),
        battery_mv: 3_900,
    }
}

/// A client with `TCP_NODELAY`: without it, a small publish written right after
/// a PUBACK waits for the broker's delayed ACK (~40 ms on Linux), and with one
/// detection in flight that, not the server, would set the pace.
fn new_client(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

fn options(client_id: &str, addr: SocketAddr, credentials: Option<(&str, &str)>) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(KEEP_ALIVE);
    options.set_clean_session(true);
    if let Some((username, password)) = credentials {
        options.set_credentials(username, password);
    }
    options
}

/// Polls until `wanted` arrives (CONNACK, SUBACK), failing on error or timeout.
async fn expect(eventloop: &mut EventLoop, wanted: fn(&Packet) -> bool, what: &str) -> Result<()> {
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) if wanted(&packet) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(anyhow::anyhow!("{what}: {error}")),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, wait)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: timed out"))?
}

/// One client: connect (and subscribe to its downlink), wait for the start,
/// stream until stopped.
async fn client(
    index: usize,
    args: RunArgs,
    shared: Arc<Shared>,
    connect_slots: Arc<tokio::sync::Semaphore>,
    mut start: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> ClientReport {
    let mut report = ClientReport::default();
    if let Err(error) =
        client_inner(index, &args, &shared, &connect_slots, &mut start, &mut stop, &mut report).await
    {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        report.error = Some(format!("client {index}: {error:#}"));
    }
    report
}

async fn client_inner(
    index: usize,
    args: &RunArgs,
    shared: &Shared,
    connect_slots: &tokio::sync::Semaphore,
    start: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
    report: &mut ClientReport,
) -> Result<()> {
    let mut trap = Trap::new(index, args.inflight)?;
    let password = password(index);
    let (client, mut eventloop) = {
        let _slot = connect_slots.acquire().await.context("connect slots")?;
        let credentials = Some((trap.id.as_str(), password.as_str()));
        let (client, mut eventloop) =
            new_client(options(trap.id.as_str(), args.mqtt, credentials), 4 * QUEUE_CAPACITY);
        expect(&mut eventloop, |p| matches!(p, Packet::ConnAck(_)), "connect").await?;
        client.try_subscribe(topic::device_downlink_filter(&trap.id).as_str(), QoS::AtLeastOnce)?;
        expect(&mut eventloop, |p| matches!(p, Packet::SubAck(_)), "subscribe").await?;
        (client, eventloop)
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    start.wait_for(|s| *s).await.context("start signal")?;
    trap.last_progress = Instant::now();
    trap.fill(&client, shared)?;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            event = eventloop.poll() => event.context("connection")?,
        };
        if let Event::Incoming(Packet::Publish(publish)) = event {
            trap.on_downlink(publish.payload.to_vec(), shared, &mut report.latencies_us)?;
        }
        trap.rewind_if_stalled(shared);
        trap.fill(&client, shared)?;
    }
}

/// Mosquitto mode: a publisher whose window the subscriber releases.
struct Publisher {
    trap: Trap,
    client: AsyncClient,
}

/// Mosquitto mode: connects every publisher (each driven by its own task,
/// which only polls), returns them for the subscriber to drive.
async fn connect_publishers(
    args: &RunArgs,
    shared: &Arc<Shared>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Vec<std::sync::Mutex<Publisher>>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTS_AT_ONCE));
    let mut publishers = Vec::with_capacity(args.clients);
    for index in 0..args.clients {
        let trap = Trap::new(index, args.inflight)?;
        let (client, mut eventloop) =
            new_client(options(trap.id.as_str(), args.mqtt, None), 4 * QUEUE_CAPACITY);
        let (shared, slots) = (shared.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let connected = async {
                let _slot = slots.acquire().await.context("connect slots")?;
                expect(&mut eventloop, |p| matches!(p, Packet::ConnAck(_)), "connect").await
            };
            if let Err(error) = connected.await {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("publisher {index}: {error:#}");
                return;
            }
            shared.connected.fetch_add(1, Ordering::Relaxed);
            // Only drives the connection (PUBACKs); aborted at the end.
            loop {
                if let Err(error) = eventloop.poll().await {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("publisher {index}: {error}");
                    return;
                }
            }
        }));
        publishers.push(std::sync::Mutex::new(Publisher { trap, client }));
    }
    Ok(publishers)
}

/// Mosquitto mode: the subscriber to every uplink. Each delivery releases one
/// entry of its publisher's window, which then publishes the next.
async fn subscriber(
    args: RunArgs,
    shared: Arc<Shared>,
    publishers: Arc<Vec<std::sync::Mutex<Publisher>>>,
    mut start: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<u32>> {
    let (client, mut eventloop) = new_client(options("bench-subscriber", args.mqtt, None), 16);
    expect(&mut eventloop, |p| matches!(p, Packet::ConnAck(_)), "subscriber connect").await?;
    client.try_subscribe("wc/v1/dev/+/up/#", QoS::AtLeastOnce)?;
    expect(&mut eventloop, |p| matches!(p, Packet::SubAck(_)), "subscriber subscribe").await?;
    shared.subscriber_ready.store(true, Ordering::Relaxed);
    start.wait_for(|s| *s).await.context("start signal")?;
    for publisher in publishers.iter() {
        let mut publisher = publisher
            .lock()
            .map_err(|_| anyhow::anyhow!("publisher lock poisoned"))?;
        let Publisher { trap, client } = &mut *publisher;
        trap.last_progress = Instant::now();
        trap.fill(client, &shared)?;
    }
    let mut latencies = Vec::new();
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(latencies),
            event = eventloop.poll() => event.context("subscriber connection")?,
        };
        let Event::Incoming(Packet::Publish(publish)) = event else {
            continue;
        };
        let index = publisher_index(&publish.topic).context("delivery on an unexpected topic")?;
        let publisher = publishers
            .get(index)
            .context("delivery for an unknown publisher")?;
        let mut publisher = publisher
            .lock()
            .map_err(|_| anyhow::anyhow!("publisher lock poisoned"))?;
        let Publisher { trap, client } = &mut *publisher;
        trap.on_delivered(&shared, &mut latencies)?;
        trap.fill(client, &shared)?;
    }
}

/// `wc/v1/dev/bench-00042/up/det` → 42.
fn publisher_index(topic: &str) -> Option<usize> {
    topic
        .split('/')
        .nth(3)?
        .strip_prefix("bench-")?
        .parse()
        .ok()
}

// ---------------------------------------------------------------- measuring

/// CPU times and memory of a process, from `/proc`.
#[derive(Debug, Clone, Default)]
struct ProcSample {
    /// utime + stime of the whole process, clock ticks.
    ticks: u64,
    /// utime + stime per thread name (threads of one name summed).
    threads: BTreeMap<String, u64>,
    /// Nanoseconds waiting for a CPU while runnable, per thread name (`schedstat`).
    runqueue_ns: BTreeMap<String, u64>,
    rss_kib: u64,
    peak_rss_kib: u64,
}

/// utime + stime from a `stat` file (fields 14 and 15, after the `(comm)`).
fn stat_ticks(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn sample_process(pid: &str) -> Result<ProcSample> {
    let base = PathBuf::from("/proc").join(pid);
    let stat = std::fs::read_to_string(base.join("stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(base.join("status")).unwrap_or_default();
    let mut threads = BTreeMap::new();
    let mut runqueue_ns = BTreeMap::new();
    for task in std::fs::read_dir(base.join("task"))?.flatten() {
        let path = task.path();
        let (Ok(stat), Ok(name)) =
            (std::fs::read_to_string(path.join("stat")), std::fs::read_to_string(path.join("comm")))
        else {
            continue;
        };
        let name = name.trim().to_string();
        let waited = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        *runqueue_ns.entry(name.clone()).or_insert(0) += waited;
        *threads.entry(name).or_insert(0) += stat_ticks(&stat).unwrap_or(0);
    }
    Ok(ProcSample {
        ticks: stat_ticks(&stat).context("parsing stat")?,
        threads,
        runqueue_ns,
        rss_kib: status_kib(&status, "VmRSS:"),
        peak_rss_kib: status_kib(&status, "VmHWM:"),
    })
}

/// Busy and total ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle.min(total), total)
}

/// `/metrics` of the fleet server as sample name → value.
async fn scrape(http: SocketAddr) -> Result<BTreeMap<String, f64>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    let request = "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text))
        .await
        .context("metrics timed out")??;
    Ok(text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// Everything read at one edge of the measured window.
struct Snapshot {
    at: Instant,
    acked: u64,
    published: u64,
    server: Option<ProcSample>,
    generator: Option<ProcSample>,
    machine: (u64, u64),
    metrics: Option<BTreeMap<String, f64>>,
}

async fn snapshot(args: &RunArgs, shared: &Shared) -> Snapshot {
    let metrics = match args.http {
        Some(http) => scrape(http).await.ok(),
        None => None,
    };
    Snapshot {
        at: Instant::now(),
        acked: shared.acked.load(Ordering::Relaxed),
        published: shared.published.load(Ordering::Relaxed),
        server: args
            .server_pid
            .and_then(|pid| sample_process(&pid.to_string()).ok()),
        generator: sample_process("self").ok(),
        machine: machine_ticks(),
        metrics,
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1_000.0
}

fn cpu_pct(before: u64, after: u64, seconds: f64) -> f64 {
    after.saturating_sub(before) as f64 / TICKS_PER_SECOND / seconds * 100.0
}

async fn run(args: RunArgs) -> Result<()> {
    let shared = Arc::new(Shared::default());
    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_started = Instant::now();
    let mut io_tasks = Vec::new();
    let (clients, subscriber) = match args.broker {
        Broker::Fleet => {
            let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTS_AT_ONCE));
            let clients: Vec<_> = (0..args.clients)
                .map(|index| {
                    let (args, shared, slots) = (args.clone(), shared.clone(), slots.clone());
                    tokio::spawn(client(index, args, shared, slots, start_rx.clone(), stop_rx.clone()))
                })
                .collect();
            shared.subscriber_ready.store(true, Ordering::Relaxed);
            (clients, None)
        }
        Broker::Mosquitto => {
            let publishers = Arc::new(connect_publishers(&args, &shared, &mut io_tasks).await?);
            let (args, shared) = (args.clone(), shared.clone());
            let subscriber = tokio::spawn(subscriber(args, shared, publishers, start_rx, stop_rx));
            (Vec::new(), Some(subscriber))
        }
    };
    let result = measure(&args, &shared, connect_started, start_tx, stop_tx, clients, subscriber).await;
    for task in io_tasks {
        task.abort();
    }
    result
}

/// Waits for every client, starts them, measures, stops them, prints the report.
async fn measure(
    args: &RunArgs,
    shared: &Shared,
    connect_started: Instant,
    start: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    clients: Vec<tokio::task::JoinHandle<ClientReport>>,
    subscriber: Option<tokio::task::JoinHandle<Result<Vec<u32>>>>,
) -> Result<()> {
    while shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < args.clients
        || !shared.subscriber_ready.load(Ordering::Relaxed)
    {
        if connect_started.elapsed() > CONNECT_TIMEOUT {
            bail!("only {} of {} clients connected", shared.connected.load(Ordering::Relaxed), args.clients);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = connect_started.elapsed();
    let connected = shared.connected.load(Ordering::Relaxed);
    let idle_server = args
        .server_pid
        .and_then(|pid| sample_process(&pid.to_string()).ok());
    let _ = start.send(true);
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let before = snapshot(args, shared).await;
    shared.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let after = snapshot(args, shared).await;
    let _ = stop.send(true);

    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for task in clients {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(report)) => {
                latencies.extend(report.latencies_us);
                errors.extend(report.error);
            }
            Ok(Err(error)) => errors.push(format!("client task: {error}")),
            Err(_) => errors.push("client did not stop".into()),
        }
    }
    if let Some(task) = subscriber {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(delivered))) => latencies.extend(delivered),
            Ok(Ok(Err(error))) => errors.push(format!("subscriber: {error:#}")),
            _ => errors.push("subscriber failed".into()),
        }
        let failed = shared.failed.load(Ordering::Relaxed);
        if failed > 0 {
            errors.push(format!("{failed} publishers failed"));
        }
    }
    latencies.sort_unstable();
    print_report(args, connected, connect_time, idle_server.as_ref(), &before, &after, &latencies, &errors);
    if connected < args.clients {
        bail!("{} clients failed to connect", args.clients - connected);
    }
    if !errors.is_empty() {
        bail!("{} clients failed during the run (see above): the figures are not valid", errors.len());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // One report, printed in one place.
fn print_report(
    args: &RunArgs,
    connected: usize,
    connect_time: Duration,
    idle_server: Option<&ProcSample>,
    before: &Snapshot,
    after: &Snapshot,
    latencies: &[u32],
    errors: &[String],
) {
    let seconds = (after.at - before.at).as_secs_f64();
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    println!(
        "broker {:?}: {connected}/{} clients connected in {:.1?}; window {} per client; warm-up {} s, measured {seconds:.1} s",
        args.broker, args.clients, connect_time, args.inflight, args.warmup
    );
    let what = match args.broker {
        Broker::Fleet => "acked detections (sealed ack after commit)",
        Broker::Mosquitto => "detections delivered to the subscriber (window released on delivery)",
    };
    println!(
        "{what}: {:.0}/s ({} in the window); published {:.0}/s",
        rate(before.acked, after.acked),
        after.acked - before.acked,
        rate(before.published, after.published)
    );
    let latency = match args.broker {
        Broker::Fleet => "publish→ack",
        Broker::Mosquitto => "publish→delivery",
    };
    println!(
        "{latency} latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        percentile(latencies, 0.50),
        percentile(latencies, 0.90),
        percentile(latencies, 0.99),
        percentile(latencies, 1.0),
        latencies.len()
    );
    if let (Some(a), Some(b)) = (&before.server, &after.server) {
        println!(
            "server process: CPU {:.0}% of one core; RSS {} MiB (peak {} MiB, {} MiB idle with every client connected)",
            cpu_pct(a.ticks, b.ticks, seconds),
            b.rss_kib / 1024,
            b.peak_rss_kib / 1024,
            idle_server.map_or(0, |s| s.rss_kib / 1024)
        );
        let mut threads: Vec<(f64, &String)> = b
            .threads
            .iter()
            .map(|(name, ticks)| (cpu_pct(a.threads.get(name).copied().unwrap_or(0), *ticks, seconds), name))
            .filter(|(pct, _)| *pct >= 0.5)
            .collect();
        threads.sort_by(|x, y| y.0.total_cmp(&x.0));
        let list: Vec<String> = threads
            .iter()
            .map(|(pct, name)| {
                let waited = b.runqueue_ns.get(*name).copied().unwrap_or(0)
                    - a.runqueue_ns
                        .get(*name)
                        .copied()
                        .unwrap_or(0)
                        .min(b.runqueue_ns.get(*name).copied().unwrap_or(0));
                format!("{name} {pct:.0}% (+{:.0}% waiting for a CPU)", waited as f64 / 1e9 / seconds * 100.0)
            })
            .collect();
        println!("server threads (% of one core): {}", list.join(", "));
    }
    if let (Some(a), Some(b)) = (&before.generator, &after.generator) {
        println!("load generator: CPU {:.0}% of one core", cpu_pct(a.ticks, b.ticks, seconds));
    }
    let busy = after.machine.0.saturating_sub(before.machine.0) as f64;
    let total = after.machine.1.saturating_sub(before.machine.1).max(1) as f64;
    println!(
        "machine: {:.0}% busy over {} cores",
        busy / total * 100.0,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let (Some(a), Some(b)) = (&before.metrics, &after.metrics) {
        print_server_metrics(a, b, seconds);
    }
    for error in errors.iter().take(5) {
        println!("error: {error}");
    }
    if errors.len() > 5 {
        println!("... and {} more errors", errors.len() - 5);
    }
}

fn print_server_metrics(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, seconds: f64) {
    let delta = |name: &str| b.get(name).copied().unwrap_or(0.0) - a.get(name).copied().unwrap_or(0.0);
    let commits = delta("wildcam_ingest_batch_commit_seconds_count");
    let commit_time = delta("wildcam_ingest_batch_commit_seconds_sum");
    let stored = delta("wildcam_detections_stored_total");
    let mean = |x: f64| if commits > 0.0 { x / commits } else { f64::NAN };
    println!(
        "server /metrics: messages in {:.0}/s, stored {:.0}/s, acks sent {:.0}/s; {:.1} commits/s, \
         mean {:.0} detections and {:.1} ms per commit, writer busy {:.0}%; link lost {}, rejected {}",
        delta("wildcam_messages_in_total") / seconds,
        stored / seconds,
        delta("wildcam_acks_sent_total") / seconds,
        commits / seconds,
        mean(stored),
        mean(commit_time) * 1_000.0,
        commit_time / seconds * 100.0,
        delta("wildcam_broker_link_lost_total"),
        b.iter()
            .filter(|(name, _)| name.starts_with("wildcam_messages_rejected_total"))
            .map(|(_, v)| v)
            .sum::<f64>(),
    );
    let buckets: Vec<String> = ["0.05", "0.1", "0.2", "0.5", "1"]
        .iter()
        .map(|le| {
            let within = delta(&format!("wildcam_ingest_batch_commit_seconds_bucket{{le=\"{le}\"}}"));
            format!("≤{le} s {:.0}%", if commits > 0.0 { within / commits * 100.0 } else { f64::NAN })
        })
        .collect();
    println!("server commit times: {}", buckets.join(", "));
}
