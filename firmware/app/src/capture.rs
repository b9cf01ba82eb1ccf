//! Capturing: one frame streamed from the camera through SHA-256 and the
//! classifier, and the loop that turns triggers (PIR, time-lapse, a
//! capture-now command) into bursts of queued detections.

use core::convert::Infallible;
use core::future::pending;

use embassy_futures::select::{Either4, select4};
use embassy_time::Timer;
use sha2::{Digest, Sha256};
use wildcam_sdk::protocol::{TrapConfig, Trigger};
use wildcam_sdk::queue::QueueStore;

use crate::hardware::{BatteryGauge, Camera, Classifier, ClassifierVerdict, Clock, FrameSink, MotionSensor};
use crate::schedule;
use crate::shared::Shared;
use crate::storage::StateStore;
use crate::trap::CaptureRecord;

/// One captured frame, summarised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Image size, bytes.
    pub image_len: u32,
    /// First 8 bytes of the image's SHA-256.
    pub image_digest: [u8; 8],
    /// The classifier's verdict.
    pub verdict: ClassifierVerdict,
}

/// Hashes, counts and classifies an image as it streams by.
struct FrameDigest<'a, C> {
    hasher: Sha256,
    len: u32,
    classifier: &'a mut C,
}

impl<C: Classifier> FrameSink for FrameDigest<'_, C> {
    fn write(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        let chunk_len = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        self.len = self.len.saturating_add(chunk_len);
        self.classifier.feed(chunk);
    }
}

/// Captures one frame with `camera`, classifying it with `classifier`.
pub async fn capture_frame<Cam: Camera, Cls: Classifier>(
    camera: &mut Cam,
    classifier: &mut Cls,
) -> Result<Frame, Cam::Error> {
    classifier.begin();
    let mut sink = FrameDigest { hasher: Sha256::new(), len: 0, classifier };
    camera.capture(&mut sink).await?;
    let FrameDigest { hasher, len, classifier } = sink;
    let digest = hasher.finalize();
    let mut image_digest = [0u8; 8];
    image_digest.copy_from_slice(&digest[..8]);
    Ok(Frame { image_len: len, image_digest, verdict: classifier.finish() })
}

/// The capture hardware, owned by the capture loop.
#[derive(Debug)]
pub struct CaptureHardware<Cam, Cls, Pir> {
    /// The camera.
    pub camera: Cam,
    /// The classifier (`NoClassifier` by default).
    pub classifier: Cls,
    /// The PIR sensor.
    pub motion: Pir,
}

/// Waits for triggers forever and queues a burst of detections for each.
pub async fn capture_loop<Q, S, G, C, Cam, Cls, Pir>(
    shared: &Shared<Q, S, G, C>,
    hardware: &mut CaptureHardware<Cam, Cls, Pir>,
    utc_offset_min: i16,
) -> Infallible
where
    Q: QueueStore,
    S: StateStore,
    G: BatteryGauge,
    C: Clock,
    Cam: Camera,
    Cls: Classifier,
    Pir: MotionSensor,
{
    loop {
        let config = shared.trap.borrow().config().clone();
        hardware.motion.set_sensitivity(config.pir_sensitivity_pct);
        let Some(trigger) = next_trigger(shared, &mut hardware.motion, &config).await else {
            continue; // The configuration changed: wait again under the new one.
        };
        let now = shared.clock.now_unix();
        if trigger == Trigger::Pir && !schedule::is_armed(&config, now, utc_offset_min) {
            log::info!("motion outside the capture windows: ignored");
            continue;
        }
        shared.trap.borrow_mut().count_trigger();
        capture_burst(shared, hardware, trigger, config.burst_len).await;
    }
}

/// The next trigger, or `None` when the configuration changed first.
async fn next_trigger<Q, S, G, C, Pir>(
    shared: &Shared<Q, S, G, C>,
    motion: &mut Pir,
    config: &TrapConfig,
) -> Option<Trigger>
where
    Q: QueueStore,
    S: StateStore,
    Pir: MotionSensor,
{
    let timelapse = async {
        match config.timelapse_interval_s {
            0 => pending().await,
            interval_s => Timer::after_secs(u64::from(interval_s)).await,
        }
    };
    match select4(
        motion.wait_for_motion(),
        timelapse,
        shared.capture_requested.wait(),
        shared.config_changed.wait(),
    )
    .await
    {
        Either4::First(()) => Some(Trigger::Pir),
        Either4::Second(()) => Some(Trigger::TimeLapse),
        Either4::Third(trigger) => Some(trigger),
        Either4::Fourth(()) => None,
    }
}

async fn capture_burst<Q, S, G, C, Cam, Cls, Pir>(
    shared: &Shared<Q, S, G, C>,
    hardware: &mut CaptureHardware<Cam, Cls, Pir>,
    trigger: Trigger,
    burst_len: u8,
) where
    Q: QueueStore,
    S: StateStore,
    G: BatteryGauge,
    C: Clock,
    Cam: Camera,
    Cls: Classifier,
{
    for burst_index in 0..burst_len.max(1) {
        let frame = match capture_frame(&mut hardware.camera, &mut hardware.classifier).await {
            Ok(frame) => frame,
            Err(error) => {
                log::error!("capture failed: {error:?}");
                shared.trap.borrow_mut().count_storage_error();
                continue;
            }
        };
        let record = CaptureRecord {
            captured_at: shared.clock.now_unix().unwrap_or(0),
            trigger,
            burst_index,
            burst_len: burst_len.max(1),
            verdict: frame.verdict,
            image_len: frame.image_len,
            image_digest: frame.image_digest,
            battery_mv: shared.gauge.borrow_mut().read().battery_mv,
        };
        match shared.trap.borrow_mut().record_detection(&record) {
            Ok(seq) => log::info!(
                "queued detection seq={seq} trigger={trigger:?} frame={}/{}",
                burst_index + 1,
                burst_len
            ),
            Err(error) => log::error!("could not queue a detection: {error}"),
        }
        shared.detection_queued.signal(());
    }
}

#[cfg(test)]
mod tests {
    use embassy_futures::block_on;
    use wildcam_sdk::protocol::Classification;

    use super::*;

    /// Streams `image` in chunks of 7 bytes.
    struct FixedCamera<'a> {
        image: &'a [u8],
    }

    impl Camera for FixedCamera<'_> {
        type Error = ();
        async fn capture<S: FrameSink>(&mut self, sink: &mut S) -> Result<(), ()> {
            self.image.chunks(7).for_each(|chunk| sink.write(chunk));
            Ok(())
        }
    }

    /// Labels a frame by its byte count.
    #[derive(Default)]
    struct CountingClassifier {
        seen: usize,
    }

    impl Classifier for CountingClassifier {
        fn begin(&mut self) {
            self.seen = 0;
        }
        fn feed(&mut self, chunk: &[u8]) {
            self.seen += chunk.len();
        }
        fn finish(&mut self) -> ClassifierVerdict {
            let label = u16::try_from(self.seen).unwrap_or(u16::MAX);
            let mut verdict = ClassifierVerdict::default();
            let _ = verdict
                .classes
                .push(Classification { label, confidence_pct: 90 });
            verdict
        }
    }

    #[test]
    fn a_frame_is_hashed_counted_and_classified_as_it_streams() {
        let image: std::vec::Vec<u8> = (0..100u8).collect();
        let mut camera = FixedCamera { image: &image };
        let mut classifier = CountingClassifier::default();
        let frame = block_on(capture_frame(&mut camera, &mut classifier)).unwrap();
        assert_eq!(frame.image_len, 100);
        assert_eq!(frame.image_digest[..], Sha256::digest(&image)[..8]);
        assert_eq!(frame.verdict.classes[0].label, 100, "the classifier saw every byte");
        let again = block_on(capture_frame(&mut camera, &mut classifier)).unwrap();
        assert_eq!(again, frame, "begin() resets the classifier");
    }
}
