//! Ingest: from the broker link to committed rows and acks.
//!
//! One task reads the link. For each device uplink it parses the topic,
//! opens the frame under that device's key ([`Sessions`]), decodes it, checks
//! the kind belongs on the topic, and adds it to the current batch. A second
//! task, the committer, commits batches one at a time, in order; a third
//! seals and publishes each batch's acks (in the same order) once its commit
//! has returned: ack implies committed.
//!
//! They overlap (group commit): while a batch commits, the next one keeps
//! filling, and the previous one's acks go out. A batch is handed over when it holds
//! [`IngestConfig::batch_len_max`] messages (or as many items as one store
//! batch takes), or once its oldest message has waited
//! [`IngestConfig::linger_ms`] *and* the committer is free. So a lone
//! message waits about `linger_ms`, and under load batches grow while the
//! writer is busy, which is what makes each commit (one sync) cheap per row.
//!
//! When the committer holds one batch and the next is full, reading stops and
//! the link's bounded queue fills; when it is full the link thread stops
//! reading rumqttd, which is the backpressure. Anything refused is counted by
//! reason and logged with the device; it never stops the loop. Provisioning
//! messages go to their own task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Duration, timeout_at};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Ack, Uplink};
use wildcam_sdk::seal::{OpenError, ReplayWindow, SEAL_OVERHEAD};
use wildcam_sdk::topic::{self, Direction};

use crate::broker::{BrokerLink, Inbound};
use crate::config::IngestConfig;
use crate::downlink::Downlink;
use crate::metrics::{Metrics, Rejection};
use crate::ota::Ota;
use crate::sessions::{SessionError, Sessions};
use crate::store::{AckUpdate, BATCH_ITEMS_MAX, Clock, IngestBatch, Received, Store, UplinkWindow};

/// Most hello catch-ups (configuration and commands) running at once.
const CATCH_UPS_MAX: usize = 64;
/// Hello catch-ups waiting for one of the [`CATCH_UPS_MAX`] slots. A whole fleet
/// reconnecting at once (a broker or server restart, 10,000 traps) says hello within
/// seconds: the catch-ups queue here and run in turn; only beyond this many waiting is
/// one dropped (logged; the trap's next hello asks again). ~60 bytes each.
const CATCH_UP_QUEUE_LEN: usize = 32_768;
/// Longest sealed uplink frame.
const FRAME_LEN_MAX: usize = Uplink::ENCODED_LEN_MAX + SEAL_OVERHEAD;

/// The ingest task's dependencies.
#[allow(missing_debug_implementations)] // Holds trait objects; nothing useful to print.
pub struct Ingest {
    /// Where batches go.
    pub store: Arc<dyn Store>,
    /// Keys and replay windows.
    pub sessions: Sessions,
    /// Acks and catch-ups.
    pub downlink: Downlink,
    /// Firmware updates: OTA uplinks go straight to its queue (never waiting).
    pub ota: Ota,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Timestamps.
    pub clock: Arc<dyn Clock>,
    /// Batching.
    pub config: IngestConfig,
    /// Where provisioning messages go (bounded; full means refused).
    pub provisioning: mpsc::Sender<Inbound>,
}

/// What one batch accumulates besides the store's own batch.
#[derive(Default)]
struct Pending {
    batch: IngestBatch,
    windows: HashMap<DeviceId, ReplayWindow>,
    messages: usize,
    side_effects: Vec<SideEffect>,
}

impl Pending {
    /// Messages that may still be added: below `batch_len_max`, and such that
    /// the store batch stays within [`BATCH_ITEMS_MAX`] (a message adds at most
    /// one item and one window).
    fn room(&self, batch_len_max: usize) -> usize {
        let items = self.batch.len() + self.windows.len();
        let by_items = BATCH_ITEMS_MAX.saturating_sub(items) / 2;
        batch_len_max.saturating_sub(self.messages).min(by_items)
    }
}

/// A batch handed to the committer, with the permit that says it was free.
struct Handover {
    pending: Pending,
    permit: Option<OwnedSemaphorePermit>,
}

/// What a commit leaves to do: its acks, then its side effects.
struct Committed {
    acks: Vec<AckUpdate>,
    side_effects: Vec<SideEffect>,
}

/// Committed batches waiting for their acks to go out.
const ACK_QUEUE_LEN: usize = 2;

/// The committer's dependencies: commits batches in order, then acks them.
struct Committer {
    store: Arc<dyn Store>,
    downlink: Downlink,
    ota: Ota,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

/// Work done after the commit.
enum SideEffect {
    Hello { device: DeviceId, config_version: u32 },
    ReportedConfig { device: DeviceId, report: wildcam_sdk::protocol::ReportedConfig },
    CommandResult { device: DeviceId, result: wildcam_sdk::protocol::CommandResult },
}

impl Ingest {
    /// Runs until the link closes or `shutdown` turns true; the batch in hand
    /// and the one committing are committed (and acked) before returning.
    pub async fn run(self, mut link: BrokerLink, mut shutdown: watch::Receiver<bool>) {
        let committer = Committer {
            store: self.store.clone(),
            downlink: self.downlink.clone(),
            ota: self.ota.clone(),
            metrics: self.metrics.clone(),
            clock: self.clock.clone(),
        };
        // Capacity 1 with one permit: the committer holds at most one batch.
        let (handover, batches) = mpsc::channel(1);
        let committing = tokio::spawn(committer.run(batches));
        let free = Arc::new(Semaphore::new(1));
        let mut inbound = Vec::with_capacity(self.config.batch_len_max.min(BATCH_ITEMS_MAX));
        loop {
            let first = tokio::select! {
                message = link.recv() => message,
                _ = shutdown.changed() => None,
            };
            let Some(first) = first else { break };
            let mut pending = Pending::default();
            self.handle(first, &mut pending).await;
            let (permit, link_open) = self
                .fill(&mut link, &mut pending, &free, &mut inbound)
                .await;
            let waiting = link
                .stats()
                .delivered
                .saturating_sub(self.metrics.messages_in_total());
            self.metrics.set_ingest_queue_depth(waiting as usize);
            if handover.send(Handover { pending, permit }).await.is_err() {
                tracing::error!("ingest committer stopped; nothing more is stored");
                break;
            }
            if !link_open {
                break;
            }
        }
        drop(handover);
        if committing.await.is_err() {
            tracing::error!("ingest committer panicked");
        }
        tracing::info!("ingest stopped");
    }

    /// Adds messages to `pending` until it is full, or its linger time has
    /// passed and the committer is free; while the committer is busy the
    /// batch keeps growing. Returns the committer's permit and whether the
    /// link is still open.
    async fn fill(
        &self,
        link: &mut BrokerLink,
        pending: &mut Pending,
        free: &Arc<Semaphore>,
        inbound: &mut Vec<Inbound>,
    ) -> (Option<OwnedSemaphorePermit>, bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.linger_ms);
        let mut link_open = true;
        while link_open && pending.room(self.config.batch_len_max) > 0 {
            inbound.clear();
            if link.try_recv_many(inbound, pending.room(self.config.batch_len_max)) == 0 {
                if tokio::time::Instant::now() < deadline {
                    match timeout_at(deadline, link.recv()).await {
                        Ok(Some(message)) => inbound.push(message),
                        Ok(None) => link_open = false,
                        Err(_) => {}
                    }
                } else {
                    tokio::select! {
                        biased;
                        permit = free.clone().acquire_owned() => return (permit.ok(), true),
                        message = link.recv() => match message {
                            Some(message) => inbound.push(message),
                            None => link_open = false,
                        },
                    }
                }
            }
            for message in inbound.drain(..) {
                self.handle(message, pending).await;
            }
        }
        (free.clone().acquire_owned().await.ok(), link_open)
    }

    async fn handle(&self, message: Inbound, pending: &mut Pending) {
        self.metrics.message_in();
        pending.messages += 1;
        if message.topic.starts_with("wc/v1/prov/") {
            if self.provisioning.try_send(message).is_err() {
                self.metrics.reject(Rejection::Provisioning);
                tracing::warn!("provisioning queue full; claim message dropped (the trap retries)");
            }
            return;
        }
        if let Err((reason, device)) = self.accept(message, pending).await {
            self.metrics.reject(reason);
            let device = device.as_ref().map_or("-", DeviceId::as_str);
            tracing::warn!(device, reason = reason.as_str(), "uplink message refused");
        }
    }

    async fn accept(
        &self,
        message: Inbound,
        pending: &mut Pending,
    ) -> Result<(), (Rejection, Option<DeviceId>)> {
        let parsed =
            topic::parse_device_topic(&message.topic).map_err(|_| (Rejection::TopicInvalid, None))?;
        let device = parsed.device;
        if parsed.direction != Direction::Up {
            return Err((Rejection::TopicInvalid, Some(device)));
        }
        if message.payload.len() > FRAME_LEN_MAX {
            return Err((Rejection::Oversized, Some(device)));
        }
        let mut frame = message.payload.to_vec();
        let (plain, window) = match self.sessions.open(&device, &mut frame).await {
            Ok(opened) => opened,
            Err(error) => return Err((rejection_for(&error, &device), Some(device))),
        };
        let uplink = Uplink::decode(plain).map_err(|_| (Rejection::Malformed, Some(device.clone())))?;
        if !uplink.kind().fits_device_topic(Direction::Up, parsed.kind) {
            return Err((Rejection::WrongTopic, Some(device)));
        }
        pending.windows.insert(device.clone(), window);
        self.route(device, uplink, pending)
    }

    fn route(
        &self,
        device: DeviceId,
        uplink: Uplink,
        pending: &mut Pending,
    ) -> Result<(), (Rejection, Option<DeviceId>)> {
        let received_at_ms = self.clock.now_ms();
        let device_id = device.clone();
        let received = |message| Received { device_id: device_id.clone(), received_at_ms, message };
        match uplink {
            Uplink::Detection(detection) => pending.batch.detections.push(received(detection)),
            Uplink::Health(health) => pending.batch.health.push(Received {
                device_id: device.clone(),
                received_at_ms,
                message: health,
            }),
            Uplink::Hello(hello) => {
                if hello.device_id != device {
                    return Err((Rejection::IdMismatch, Some(device)));
                }
                let config_version = hello.config_version;
                pending.batch.hellos.push(Received {
                    device_id: device.clone(),
                    received_at_ms,
                    message: hello,
                });
                pending
                    .side_effects
                    .push(SideEffect::Hello { device, config_version });
            }
            Uplink::ReportedConfig(report) => pending
                .side_effects
                .push(SideEffect::ReportedConfig { device, report }),
            Uplink::CommandResult(result) => pending
                .side_effects
                .push(SideEffect::CommandResult { device, result }),
            // Served at once, not after the batch commits: the OTA task
            // records progress and results itself.
            Uplink::OtaChunkRequest(request) => self.ota.submit_chunk_request(device, request),
            Uplink::OtaProgress(progress) => self.ota.submit_progress(device, progress),
            Uplink::OtaResult(result) => self.ota.submit_result(device, result),
        }
        Ok(())
    }
}

impl Committer {
    /// Commits each batch handed over, in order, until the channel closes;
    /// its acks and side effects go to a second task, so that the next
    /// commit starts while they are sent.
    async fn run(self, mut batches: mpsc::Receiver<Handover>) {
        let this = Arc::new(self);
        let (committed, to_acknowledge) = mpsc::channel(ACK_QUEUE_LEN);
        let acknowledging = tokio::spawn(this.clone().acknowledge(to_acknowledge));
        while let Some(handover) = batches.recv().await {
            if let Some(done) = this.commit(handover).await
                && committed.send(done).await.is_err()
            {
                tracing::error!("ingest ack task stopped; nothing more is acked");
                break;
            }
        }
        drop(committed);
        if acknowledging.await.is_err() {
            tracing::error!("ingest ack task panicked");
        }
    }

    /// Commits one batch; `None` if the commit failed (nothing stored, nothing
    /// to ack: the traps resend).
    async fn commit(&self, handover: Handover) -> Option<Committed> {
        let Handover { mut pending, permit } = handover;
        pending.batch.windows = pending
            .windows
            .drain()
            .map(|(device_id, window)| UplinkWindow { device_id, window })
            .collect();
        let mut acks = Vec::new();
        if !pending.batch.is_empty() {
            let items = pending.batch.len();
            let started = Instant::now();
            let committed = self.store.commit_batch(pending.batch).await;
            // Ingest may hand over the next batch now.
            drop(permit);
            match committed {
                Ok(committed) => {
                    self.metrics
                        .commit(items, committed.detections_stored, started.elapsed().as_secs_f64());
                    acks = committed.acks;
                }
                Err(error) => {
                    tracing::error!(%error, items, "ingest commit failed");
                    return None;
                }
            }
        }
        Some(Committed { acks, side_effects: pending.side_effects })
    }

    /// Sends each committed batch's acks, then applies its side effects.
    async fn acknowledge(self: Arc<Self>, mut committed: mpsc::Receiver<Committed>) {
        let (catch_ups, queued) = mpsc::channel(CATCH_UP_QUEUE_LEN);
        // Detached, as the catch-ups themselves: the queue ends with this task.
        tokio::spawn(run_catch_ups(self.downlink.clone(), self.ota.clone(), queued));
        while let Some(Committed { acks, side_effects }) = committed.recv().await {
            for ack in acks {
                let message = Ack { through: ack.acked_through };
                if let Err(error) = self.downlink.send(&ack.device_id, &message).await {
                    tracing::warn!(device = ack.device_id.as_str(), %error, "ack not sent (the trap resends)");
                }
            }
            for effect in side_effects {
                self.apply(effect, &catch_ups).await;
            }
        }
    }

    async fn apply(&self, effect: SideEffect, catch_ups: &mpsc::Sender<(DeviceId, u32)>) {
        match effect {
            SideEffect::Hello { device, config_version } => {
                if let Err(mpsc::error::TrySendError::Full((device, _))) =
                    catch_ups.try_send((device, config_version))
                {
                    tracing::warn!(
                        device = device.as_str(),
                        queued = CATCH_UP_QUEUE_LEN,
                        "catch-up queue full; the next hello retries"
                    );
                }
            }
            SideEffect::ReportedConfig { device, report } => {
                let at = self.clock.now_ms();
                if let Err(error) = self
                    .store
                    .record_reported_config(device.clone(), report, at)
                    .await
                {
                    tracing::warn!(device = device.as_str(), %error, "reported configuration not stored");
                }
            }
            SideEffect::CommandResult { device, result } => {
                if let Err(error) = self
                    .store
                    .record_command_result(device.clone(), result)
                    .await
                {
                    tracing::warn!(device = device.as_str(), %error, "command result not stored");
                }
            }
        }
    }
}

/// Runs the queued hello catch-ups (configuration, commands, then an OTA offer if
/// one is due), at most [`CATCH_UPS_MAX`] at once, in the order the hellos were
/// committed, until the queue closes.
async fn run_catch_ups(downlink: Downlink, ota: Ota, mut queued: mpsc::Receiver<(DeviceId, u32)>) {
    let slots = Arc::new(Semaphore::new(CATCH_UPS_MAX));
    while let Some((device, config_version)) = queued.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let downlink = downlink.clone();
        let ota = ota.clone();
        tokio::spawn(async move {
            if let Err(error) = downlink.catch_up(&device, config_version).await {
                tracing::warn!(device = device.as_str(), %error, "catch-up failed");
            }
            if let Err(error) = ota.offer(&device).await {
                tracing::warn!(device = device.as_str(), %error, "OTA offer not sent (the next hello retries)");
            }
            drop(permit);
        });
    }
}

fn rejection_for(error: &SessionError, device: &DeviceId) -> Rejection {
    match error {
        SessionError::Unknown => Rejection::DeviceUnknown,
        SessionError::Revoked => Rejection::DeviceRevoked,
        SessionError::Open(OpenError::Replayed | OpenError::TooOld) => Rejection::Replayed,
        SessionError::Open(_) => Rejection::Unauthentic,
        SessionError::Seal(_) | SessionError::Store(_) | SessionError::Poisoned => {
            tracing::error!(device = device.as_str(), %error, "device session failed");
            Rejection::Unauthentic
        }
    }
}

#[cfg(test)]
mod tests {
    use wildcam_sdk::protocol::{Classification, Detection, Trigger};

    use super::*;

    fn received(device: &DeviceId, seq: u32) -> Received<Detection> {
        let detection = Detection {
            seq,
            captured_at: 1_795_000_000,
            trigger: Trigger::Pir,
            burst_index: 0,
            burst_len: 1,
            classes: [Classification { label: 1, confidence_pct: 90 }]
                .into_iter()
                .collect(),
            bbox: None,
            image_len: 1,
            image_digest: [0; 8],
            battery_mv: 3_900,
        };
        Received { device_id: device.clone(), received_at_ms: 0, message: detection }
    }

    #[test]
    fn room_stops_at_batch_len_max() {
        let device = DeviceId::new("room-1").unwrap();
        let mut pending = Pending::default();
        assert_eq!(pending.room(100), 100);
        for seq in 1..=40 {
            pending.batch.detections.push(received(&device, seq));
            pending.messages += 1;
        }
        pending.windows.insert(device, ReplayWindow::new());
        assert_eq!(pending.room(100), 60);
        assert_eq!(pending.room(40), 0);
    }

    #[test]
    fn room_keeps_the_store_batch_within_its_item_limit() {
        let mut pending = Pending::default();
        assert_eq!(pending.room(usize::MAX), BATCH_ITEMS_MAX / 2);
        // Every message from a new device adds a detection and a window.
        for n in 0..BATCH_ITEMS_MAX / 2 {
            let device = DeviceId::new(&format!("room-{n}")).unwrap();
            pending.batch.detections.push(received(&device, 1));
            pending.windows.insert(device, ReplayWindow::new());
            pending.messages += 1;
        }
        assert_eq!(pending.room(usize::MAX), 0);
        assert_eq!(pending.batch.len() + pending.windows.len(), BATCH_ITEMS_MAX);
    }
}
