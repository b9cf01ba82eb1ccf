//! [`Ota`]: offers, chunks, progress and results.
//!
//! Ingest hands every opened OTA uplink to [`Ota::submit`], which never
//! waits: the queue is bounded and a full queue drops the request (counted;
//! the device asks again after its timeout), so serving images never slows
//! detections down. One task drains the queue: progress and results are
//! recorded in order, and chunk requests are served by at most
//! [`CHUNK_TASKS_MAX`] tasks at once, from the image cache.
//!
//! Offers go out on hello (the catch-up after committing the hello), when a
//! rollout is created or resumed, and when a target leaves the in-flight
//! states (a slot frees up): each time to pending targets of active rollouts
//! within `max_in_flight`, most recently seen devices first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use wildcam_sdk::DeviceId;
use wildcam_sdk::ota::{OtaOutcome, SignedManifest};
use wildcam_sdk::protocol::{OtaChunk, OtaChunkRequest, OtaOffer, OtaProgress, OtaResult};

use super::ImageFiles;
use super::cache::ImageCache;
use crate::config::OtaConfig;
use crate::downlink::Downlink;
use crate::metrics::{Metrics, OtaRefusal};
use crate::store::{
    ChunkGrant, FirmwareRecord, NewFirmware, ResultRecorded, RolloutState, Store, StoreError, TargetState,
};

/// The HTTP header carrying the signed manifest of an upload (standard base64
/// of the postcard file `cargo xtask sign` writes).
pub const MANIFEST_HEADER: &str = "X-WildCAM-Manifest";
/// OTA uplinks waiting for the OTA task.
const QUEUE_LEN: usize = 4_096;
/// Chunk requests served at once.
pub const CHUNK_TASKS_MAX: usize = 16;
/// A target's progress is stored when a chunk request crosses a multiple of
/// this many bytes (and at the first and last chunk), not at every chunk.
const PROGRESS_STEP: u32 = 64 * 1_024;
/// How long a looked-up chunk grant is reused: a pause, abort or supersede
/// reaches chunk serving within this.
const GRANT_TTL: Duration = Duration::from_secs(1);
/// Most grants remembered (cleared when full).
const GRANTS_MAX: usize = 16_384;
/// Targets that may still move on from a progress report.
const REPORTABLE: [TargetState; 5] = [
    TargetState::Offered,
    TargetState::Downloading,
    TargetState::Verifying,
    TargetState::Ready,
    TargetState::PendingConfirmation,
];

/// What the OTA service is configured with, resolved.
#[derive(Debug, Clone)]
pub struct OtaSettings {
    /// Accepted firmware signing public keys.
    pub signing_keys: Vec<[u8; 32]>,
    /// Largest image accepted.
    pub max_image_bytes: u32,
    /// Chunk length offered.
    pub chunk_len: u16,
    /// Default rollout `max_in_flight`.
    pub max_in_flight: u32,
    /// Default rollout `failure_threshold`.
    pub failure_threshold: u32,
    /// A target without progress for this long no longer holds a slot.
    pub stall_ms: i64,
}

impl OtaSettings {
    /// From the configuration (reads the key files).
    pub fn from_config(config: &OtaConfig) -> Result<Self, String> {
        Ok(Self {
            signing_keys: config.signing_public_keys()?,
            max_image_bytes: config.max_image_bytes,
            chunk_len: config.chunk_len,
            max_in_flight: config.max_in_flight,
            failure_threshold: config.failure_threshold,
            stall_ms: i64::from(config.stall_timeout_s) * 1_000,
        })
    }
}

/// An OTA uplink, as ingest hands it over.
#[derive(Debug)]
enum Uplink {
    ChunkRequest(OtaChunkRequest),
    Progress(OtaProgress),
    Result(OtaResult),
}

/// The OTA service handle (cheap to clone).
#[derive(Clone)]
pub struct Ota {
    core: Arc<Core>,
    queue: mpsc::Sender<(DeviceId, Uplink)>,
}

impl std::fmt::Debug for Ota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ota").finish_non_exhaustive()
    }
}

struct Core {
    store: Arc<dyn Store>,
    downlink: Downlink,
    metrics: Arc<Metrics>,
    settings: OtaSettings,
    files: ImageFiles,
    cache: ImageCache,
    grants: Mutex<HashMap<(u32, DeviceId), (ChunkGrant, Instant)>>,
}

impl Ota {
    /// Starts the OTA task; it ends when every handle is dropped.
    pub fn start(
        store: Arc<dyn Store>,
        downlink: Downlink,
        metrics: Arc<Metrics>,
        settings: OtaSettings,
        data_dir: &Path,
    ) -> Self {
        let files = ImageFiles::new(data_dir);
        let core = Arc::new(Core {
            store,
            downlink,
            metrics,
            settings,
            cache: ImageCache::new(files.clone()),
            files,
            grants: Mutex::default(),
        });
        let (queue, received) = mpsc::channel(QUEUE_LEN);
        tokio::spawn(core.clone().run(received));
        Self { core, queue }
    }

    /// The settings in force.
    pub fn settings(&self) -> &OtaSettings {
        &self.core.settings
    }

    /// Hands a chunk request over; never waits (a full queue drops it).
    pub fn submit_chunk_request(&self, device: DeviceId, request: OtaChunkRequest) {
        self.submit(device, Uplink::ChunkRequest(request));
    }

    /// Hands a progress report over; never waits.
    pub fn submit_progress(&self, device: DeviceId, progress: OtaProgress) {
        self.submit(device, Uplink::Progress(progress));
    }

    /// Hands a result over; never waits (the device repeats it on its next
    /// connection until it is delivered).
    pub fn submit_result(&self, device: DeviceId, result: OtaResult) {
        self.submit(device, Uplink::Result(result));
    }

    fn submit(&self, device: DeviceId, uplink: Uplink) {
        if let Err(mpsc::error::TrySendError::Full((device, _))) = self.queue.try_send((device, uplink)) {
            self.core.metrics.ota_refuse(OtaRefusal::QueueFull);
            tracing::warn!(device = device.as_str(), "OTA queue full; uplink dropped (the trap asks again)");
        }
    }

    /// Offers `device` its unfinished rollout if one is due (on hello).
    pub async fn offer(&self, device: &DeviceId) -> Result<bool, crate::downlink::DownlinkError> {
        self.core.offer(device).await
    }

    /// Offers a rollout to as many pending targets as its free slots allow
    /// (created, resumed, or a slot freed up); returns how many were offered.
    pub async fn kick(&self, rollout_id: u32) -> usize {
        self.core.kick(rollout_id).await
    }

    /// Forgets the chunk grants looked up so far: a rollout changed (created,
    /// paused, resumed, aborted), so chunk serving reads it again.
    pub fn forget_grants(&self) {
        if let Ok(mut grants) = self.core.grants.lock() {
            grants.clear();
        }
    }

    /// Stores a checked upload: the image file first (durable), then its row.
    /// Returns the record and whether it is new.
    pub async fn store_firmware(
        &self,
        manifest: SignedManifest,
        signing_key: [u8; 32],
        image: Bytes,
    ) -> Result<(FirmwareRecord, bool), StoreError> {
        let files = self.core.files.clone();
        let sha = manifest.manifest.image_sha256;
        tokio::task::spawn_blocking(move || files.write(&sha, &image))
            .await
            .map_err(|_| StoreError::WorkerFailed)?
            .map_err(StoreError::database)?;
        self.core
            .store
            .insert_firmware(NewFirmware { manifest, signing_key })
            .await
    }
}

impl Core {
    async fn run(self: Arc<Self>, mut received: mpsc::Receiver<(DeviceId, Uplink)>) {
        let chunk_tasks = Arc::new(Semaphore::new(CHUNK_TASKS_MAX));
        while let Some((device, uplink)) = received.recv().await {
            match uplink {
                Uplink::ChunkRequest(request) => {
                    let Ok(permit) = chunk_tasks.clone().acquire_owned().await else {
                        break;
                    };
                    let core = self.clone();
                    tokio::spawn(async move {
                        core.serve_chunk(&device, request).await;
                        drop(permit);
                    });
                }
                Uplink::Progress(progress) => self.progress(&device, progress).await,
                Uplink::Result(result) => self.result(&device, result).await,
            }
        }
    }

    async fn offer(&self, device: &DeviceId) -> Result<bool, crate::downlink::DownlinkError> {
        let Some(grant) = self
            .store
            .grant_offer(device.clone(), self.settings.stall_ms)
            .await?
        else {
            return Ok(false);
        };
        let offer = OtaOffer {
            rollout_id: grant.rollout_id,
            manifest: grant.manifest,
            chunk_len: self.settings.chunk_len,
        };
        self.downlink.send(device, &offer).await?;
        self.metrics.ota_offer_sent();
        tracing::info!(device = device.as_str(), rollout = grant.rollout_id, "OTA offer sent");
        Ok(true)
    }

    async fn kick(&self, rollout_id: u32) -> usize {
        let candidates = match self
            .store
            .offer_candidates(rollout_id, self.settings.stall_ms)
            .await
        {
            Ok(candidates) => candidates,
            Err(error) => {
                tracing::warn!(rollout = rollout_id, %error, "rollout candidates not read");
                return 0;
            }
        };
        let mut offered = 0;
        for device in candidates {
            match self.offer(&device).await {
                Ok(true) => offered += 1,
                Ok(false) => {}
                Err(error) => tracing::warn!(device = device.as_str(), %error, "OTA offer not sent"),
            }
        }
        offered
    }

    /// Kicks in the background (a slot freed up).
    fn kick_later(self: &Arc<Self>, rollout_id: u32) {
        let core = self.clone();
        tokio::spawn(async move {
            core.kick(rollout_id).await;
        });
    }

    async fn grant(&self, rollout_id: u32, device: &DeviceId) -> Result<Option<ChunkGrant>, StoreError> {
        let key = (rollout_id, device.clone());
        if let Some((grant, at)) = self.grants.lock().ok().and_then(|g| g.get(&key).cloned())
            && at.elapsed() < GRANT_TTL
        {
            return Ok(Some(grant));
        }
        let grant = self.store.chunk_grant(rollout_id, device.clone()).await?;
        if let (Some(grant), Ok(mut grants)) = (&grant, self.grants.lock()) {
            if grants.len() >= GRANTS_MAX {
                grants.clear();
            }
            grants.insert(key, (grant.clone(), Instant::now()));
        }
        Ok(grant)
    }

    fn refuse(&self, device: &DeviceId, rollout_id: u32, reason: OtaRefusal) {
        self.metrics.ota_refuse(reason);
        tracing::debug!(
            device = device.as_str(),
            rollout = rollout_id,
            reason = reason.as_str(),
            "OTA uplink refused"
        );
    }

    async fn serve_chunk(self: &Arc<Self>, device: &DeviceId, request: OtaChunkRequest) {
        let rollout_id = request.rollout_id;
        let grant = match self.grant(rollout_id, device).await {
            Ok(Some(grant)) => grant,
            Ok(None) => return self.refuse(device, rollout_id, OtaRefusal::NotTargeted),
            Err(error) => {
                tracing::warn!(device = device.as_str(), %error, "chunk grant not read");
                return;
            }
        };
        if grant.rollout == RolloutState::Aborted || grant.target.is_final() {
            // An empty chunk at the asked offset: the device stops this rollout.
            self.refuse(device, rollout_id, OtaRefusal::RolloutInactive);
            let empty = OtaChunk { rollout_id, offset: request.offset, data: heapless::Vec::new() };
            if let Err(error) = self.downlink.send(device, &empty).await {
                tracing::warn!(device = device.as_str(), %error, "empty chunk not sent");
            }
            return;
        }
        if grant.target == TargetState::Pending {
            return self.refuse(device, rollout_id, OtaRefusal::NotOffered);
        }
        if request.len == 0 || request.len > self.settings.chunk_len {
            return self.refuse(device, rollout_id, OtaRefusal::LengthInvalid);
        }
        let end = request.offset.checked_add(u32::from(request.len));
        let Some(end) = end.filter(|&end| end <= grant.size) else {
            return self.refuse(device, rollout_id, OtaRefusal::OffsetInvalid);
        };
        let image = match self.cache.get(&grant.sha256).await {
            Ok(image) => image,
            Err(error) => {
                tracing::error!(device = device.as_str(), rollout = rollout_id, %error, "firmware image unreadable");
                return self.refuse(device, rollout_id, OtaRefusal::ImageUnavailable);
            }
        };
        let range = request.offset as usize..end as usize;
        let Some(data) = image
            .get(range)
            .and_then(|bytes| heapless::Vec::from_slice(bytes).ok())
        else {
            return self.refuse(device, rollout_id, OtaRefusal::ImageUnavailable);
        };
        let chunk = OtaChunk { rollout_id, offset: request.offset, data };
        if let Err(error) = self.downlink.send(device, &chunk).await {
            tracing::warn!(device = device.as_str(), %error, "chunk not sent (the trap asks again)");
            return;
        }
        self.metrics.ota_chunk_served(usize::from(request.len));
        self.note_download(device, rollout_id, request.offset, end, grant.size)
            .await;
    }

    /// Stores download progress at the first chunk, every [`PROGRESS_STEP`]
    /// bytes and at the last chunk (then the target is verifying, which
    /// frees its slot).
    async fn note_download(
        self: &Arc<Self>,
        device: &DeviceId,
        rollout_id: u32,
        offset: u32,
        end: u32,
        size: u32,
    ) {
        let last = end == size;
        let crosses = offset == 0 || offset / PROGRESS_STEP != end / PROGRESS_STEP;
        if !last && !crosses {
            return;
        }
        let (state, at) =
            if last { (TargetState::Verifying, end) } else { (TargetState::Downloading, offset) };
        let from = vec![TargetState::Offered, TargetState::Downloading];
        match self
            .store
            .record_ota_progress(rollout_id, device.clone(), from, state, at)
            .await
        {
            Ok(true) if last => self.kick_later(rollout_id),
            Ok(_) => {}
            Err(error) => tracing::warn!(device = device.as_str(), %error, "download progress not stored"),
        }
    }

    async fn progress(self: &Arc<Self>, device: &DeviceId, progress: OtaProgress) {
        let Some(state) = TargetState::from_progress(progress.state) else {
            return;
        };
        let recorded = self
            .store
            .record_ota_progress(
                progress.rollout_id,
                device.clone(),
                REPORTABLE.to_vec(),
                state,
                progress.offset,
            )
            .await;
        match recorded {
            Ok(true) if matches!(state, TargetState::Ready | TargetState::PendingConfirmation) => {
                self.kick_later(progress.rollout_id);
            }
            Ok(true) => {}
            Ok(false) => self.refuse(device, progress.rollout_id, OtaRefusal::NotTargeted),
            Err(error) => tracing::warn!(device = device.as_str(), %error, "OTA progress not stored"),
        }
    }

    async fn result(self: &Arc<Self>, device: &DeviceId, result: OtaResult) {
        let effect = match self.store.record_ota_result(device.clone(), result).await {
            Ok(effect) => effect,
            Err(error) => {
                tracing::warn!(device = device.as_str(), %error, "OTA result not stored (the trap repeats it)");
                return;
            }
        };
        match effect.recorded {
            ResultRecorded::Unknown => self.refuse(device, result.rollout_id, OtaRefusal::NotTargeted),
            ResultRecorded::Repeat => {}
            ResultRecorded::New(state) => {
                self.metrics.ota_outcome(result.outcome);
                let level_warn = !result.outcome.is_success() && result.outcome != OtaOutcome::Busy;
                if level_warn {
                    tracing::warn!(device = device.as_str(), rollout = result.rollout_id, outcome = ?result.outcome, state = state.as_str(), "OTA update failed on the device");
                } else {
                    tracing::info!(device = device.as_str(), rollout = result.rollout_id, outcome = ?result.outcome, "OTA result");
                }
                if effect.paused {
                    tracing::warn!(rollout = result.rollout_id, "rollout paused: failure threshold reached");
                } else if state != TargetState::Pending {
                    self.kick_later(result.rollout_id);
                }
            }
        }
    }
}
