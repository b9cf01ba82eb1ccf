//! Ingest throughput of the SQLite store: commits detections from many
//! devices in batches and prints rows per second.
//!
//! ```text
//! cargo run --release -p wildcam-fleet-server --example store_bench -- \
//!     [--devices 1000] [--total 1000000] [--batch 1000] [--per-device 1] \
//!     [--destinations aws,gcp] [--dir PATH]
//! ```
//!
//! Detections are dealt to the devices round-robin in runs of `per-device`
//! consecutive sequences. With the defaults (1,000 devices, batches of
//! 1,000, runs of 1) every batch holds one new sequence of every device: the
//! worst case, one page per device in every device-ordered index per commit.
//! `--per-device 10` is closer to traps flushing their queues at check-in.
//! Without `--dir` the database lives in a temporary directory removed at
//! the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wildcam_fleet_server::store::Clock as _;
use wildcam_fleet_server::store::{
    ClaimAuthorization, ClaimStore, DeviceId, DeviceStore, IngestBatch, IngestStore, NewClaimToken,
    NewDevice, PasswordHash, Received, SecretDigest, SqliteConfig, SqliteStore, Store, SystemClock,
};
use wildcam_sdk::protocol::{BoundingBox, Classification, Detection, Trigger};
use wildcam_sdk::seal::SessionKey;

#[derive(Debug)]
struct Options {
    devices: u32,
    total: u32,
    batch: u32,
    per_device: u32,
    destinations: Vec<String>,
    dir: Option<PathBuf>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        devices: 1_000,
        total: 1_000_000,
        batch: 1_000,
        per_device: 1,
        destinations: Vec::new(),
        dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u32>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--devices" => options.devices = number()?,
            "--total" => options.total = number()?,
            "--batch" => options.batch = number()?,
            "--per-device" => options.per_device = number()?,
            "--destinations" => options.destinations = value.split(',').map(str::to_owned).collect(),
            "--dir" => options.dir = Some(PathBuf::from(value)),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.devices == 0 || options.batch == 0 || options.per_device == 0 {
        return Err("--devices, --batch and --per-device must be at least 1".into());
    }
    Ok(options)
}

fn device_id(n: u32) -> Result<DeviceId, String> {
    DeviceId::new(&format!("bench-{n:05}")).map_err(|e| e.to_string())
}

/// Registers `count` devices with one multi-use claim token.
async fn register(store: &SqliteStore, count: u32) -> Result<Vec<DeviceId>, Box<dyn std::error::Error>> {
    let token = NewClaimToken {
        id: "bench".into(),
        secret_digest: SecretDigest::from_bytes([1; 32]),
        uses_max: count,
        expires_at_ms: SystemClock.now_ms() + 3_600_000,
        label: "store_bench".into(),
    };
    store.create_claim_token(token).await?;
    let mut ids = Vec::with_capacity(count as usize);
    for n in 0..count {
        let mut identity_key = [0u8; 32];
        identity_key[..4].copy_from_slice(&n.to_le_bytes());
        let device = NewDevice {
            id: device_id(n)?,
            identity_key,
            mqtt_password_hash: PasswordHash::of("bench"),
            session_key: SessionKey::from_bytes([2; 32]),
            authorization: ClaimAuthorization::Token { claim_id: "bench".into() },
        };
        ids.push(store.create_device(device).await?.id);
    }
    Ok(ids)
}

/// A realistic detection: one or two classes, a bounding box on most.
fn detection(seq: u32, captured_at: u32) -> Detection {
    let mut classes = heapless::Vec::new();
    let _ = classes.push(Classification { label: (seq % 40) as u16, confidence_pct: (seq % 101) as u8 });
    if seq.is_multiple_of(2) {
        let _ = classes.push(Classification { label: (seq % 7) as u16, confidence_pct: 12 });
    }
    let bbox =
        (!seq.is_multiple_of(3)).then_some(BoundingBox { x: 1_000, y: 2_000, width: 3_000, height: 2_500 });
    Detection {
        seq,
        captured_at,
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes,
        bbox,
        image_len: 48_000 + seq % 1_000,
        image_digest: seq.to_le_bytes().repeat(2).try_into().unwrap_or([0; 8]),
        battery_mv: 3_900,
    }
}

/// Batch `index`: detections `index * batch ..`, dealt to the devices in
/// runs of `per_device` consecutive sequences.
fn batch(index: u32, options: &Options, devices: &[DeviceId], now_ms: i64) -> IngestBatch {
    let start = index * options.batch;
    let end = (start + options.batch).min(options.total);
    let detections = (start..end)
        .map(|n| {
            let run = n / options.per_device;
            let device = &devices[(run % options.devices) as usize];
            let seq = run / options.devices * options.per_device + n % options.per_device + 1;
            // Capture times follow arrival fleet-wide (100 detections a second).
            let captured_at = 1_700_000_000 + n / 100;
            Received {
                device_id: device.clone(),
                received_at_ms: now_ms,
                message: detection(seq, captured_at),
            }
        })
        .collect();
    IngestBatch { detections, ..IngestBatch::default() }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse_options()?;
    let temp = tempfile::tempdir()?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let mut config = SqliteConfig::new(&dir);
    config.destinations = options.destinations.clone();
    let store = SqliteStore::open(config).await?;

    let started = Instant::now();
    let devices = register(&store, options.devices).await?;
    println!("registered {} devices in {:.2?}", devices.len(), started.elapsed());

    let batches = options.total.div_ceil(options.batch);
    let (mut busy, mut slowest) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    for index in 0..batches {
        let batch = batch(index, &options, &devices, SystemClock.now_ms());
        let commit = Instant::now();
        let acks = store.commit_batch(batch).await?.acks;
        let took = commit.elapsed();
        busy += took;
        slowest = slowest.max(took);
        if acks.is_empty() {
            return Err("a batch was committed without acks".into());
        }
    }
    let wall = started.elapsed();
    store.close().await?;

    let rows = f64::from(options.total);
    let size_mib = std::fs::metadata(store.path())
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / (1024.0 * 1024.0);
    println!(
        "{} detections from {} devices in {} batches of {}, runs of {} per device (destinations: {:?})",
        options.total, options.devices, batches, options.batch, options.per_device, options.destinations
    );
    println!(
        "wall {:.2?}: {:.0} rows/s; in commit_batch {:.2?}: {:.0} rows/s; mean batch {:.2?}, slowest {:.2?}",
        wall,
        rows / wall.as_secs_f64(),
        busy,
        rows / busy.as_secs_f64(),
        busy / batches.max(1),
        slowest
    );
    println!("database {size_mib:.0} MiB at {}", store.path().display());
    Ok(())
}
