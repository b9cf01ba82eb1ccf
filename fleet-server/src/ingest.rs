//! Ingest: from the broker link to committed rows and acks.
//!
//! One task reads the link. For each device uplink it parses the topic,
//! opens the frame under that device's key ([`Sessions`]), decodes it, checks
//! the kind belongs on the topic, and adds it to the current batch. A batch
//! is committed when it holds [`IngestConfig::batch_len_max`] messages or its
//! oldest message has waited [`IngestConfig::linger_ms`]. Only after the
//! commit returns are acks sealed and published: ack implies committed.
//!
//! While a batch commits, the link's bounded queue fills; when it is full
//! the link thread stops reading rumqttd, which is the backpressure. Anything
//! refused is counted by reason and logged with the device; it never stops
//! the loop. Provisioning messages go to their own task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Duration, timeout_at};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Ack, Uplink};
use wildcam_sdk::seal::{OpenError, ReplayWindow, SEAL_OVERHEAD};
use wildcam_sdk::topic::{self, Direction};

use crate::broker::{BrokerLink, Inbound};
use crate::config::IngestConfig;
use crate::downlink::Downlink;
use crate::metrics::{Metrics, Rejection};
use crate::sessions::{SessionError, Sessions};
use crate::store::{Clock, IngestBatch, Received, Store, UplinkWindow};

/// Most hello catch-ups (configuration and commands) running at once.
const CATCH_UPS_MAX: usize = 64;
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

/// Work done after the commit.
enum SideEffect {
    Hello { device: DeviceId, config_version: u32 },
    ReportedConfig { device: DeviceId, report: wildcam_sdk::protocol::ReportedConfig },
    CommandResult { device: DeviceId, result: wildcam_sdk::protocol::CommandResult },
}

impl Ingest {
    /// Runs until the link closes or `shutdown` turns true; the batch in hand
    /// is committed (and acked) before returning.
    pub async fn run(self, mut link: BrokerLink, mut shutdown: watch::Receiver<bool>) {
        let catch_ups = Arc::new(Semaphore::new(CATCH_UPS_MAX));
        let mut inbound = Vec::with_capacity(self.config.batch_len_max);
        loop {
            let first = tokio::select! {
                message = link.recv() => message,
                _ = shutdown.changed() => None,
            };
            let Some(first) = first else { break };
            let mut pending = Pending::default();
            self.handle(first, &mut pending).await;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.linger_ms);
            while pending.messages < self.config.batch_len_max {
                inbound.clear();
                let room = self.config.batch_len_max - pending.messages;
                if link.try_recv_many(&mut inbound, room) == 0 {
                    match timeout_at(deadline, link.recv()).await {
                        Ok(Some(message)) => inbound.push(message),
                        Ok(None) | Err(_) => break,
                    }
                }
                for message in inbound.drain(..) {
                    self.handle(message, &mut pending).await;
                }
            }
            let waiting = link
                .stats()
                .delivered
                .saturating_sub(self.metrics.messages_in_total());
            self.metrics.set_ingest_queue_depth(waiting as usize);
            self.commit(pending, &catch_ups).await;
        }
        tracing::info!("ingest stopped");
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
            Uplink::OtaChunkRequest(_) | Uplink::OtaProgress(_) | Uplink::OtaResult(_) => {
                return Err((Rejection::Unsupported, Some(device)));
            }
        }
        Ok(())
    }

    async fn commit(&self, mut pending: Pending, catch_ups: &Arc<Semaphore>) {
        pending.batch.windows = pending
            .windows
            .drain()
            .map(|(device_id, window)| UplinkWindow { device_id, window })
            .collect();
        if !pending.batch.is_empty() {
            let items = pending.batch.len();
            let detections = pending.batch.detections.len();
            let started = Instant::now();
            match self.store.commit_batch(pending.batch).await {
                Ok(acks) => {
                    self.metrics
                        .commit(items, detections, started.elapsed().as_secs_f64());
                    for ack in acks {
                        let message = Ack { through: ack.acked_through };
                        if let Err(error) = self.downlink.send(&ack.device_id, &message).await {
                            tracing::warn!(device = ack.device_id.as_str(), %error, "ack not sent (the trap resends)");
                        }
                    }
                }
                Err(error) => {
                    // Nothing was stored and nothing is acked: the traps resend.
                    tracing::error!(%error, items, "ingest commit failed");
                    return;
                }
            }
        }
        for effect in pending.side_effects {
            self.apply(effect, catch_ups).await;
        }
    }

    async fn apply(&self, effect: SideEffect, catch_ups: &Arc<Semaphore>) {
        match effect {
            SideEffect::Hello { device, config_version } => {
                let Ok(permit) = catch_ups.clone().try_acquire_owned() else {
                    tracing::warn!(
                        device = device.as_str(),
                        "too many catch-ups running; the next hello retries"
                    );
                    return;
                };
                let downlink = self.downlink.clone();
                tokio::spawn(async move {
                    if let Err(error) = downlink.catch_up(&device, config_version).await {
                        tracing::warn!(device = device.as_str(), %error, "catch-up failed");
                    }
                    drop(permit);
                });
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
