//! The small traits a board implements. The application is generic over them,
//! so the same code runs on every chip and on the host.
//!
//! Every method is cheap to call from a single Embassy task; none needs an
//! allocator. Errors are the board's own small types, only logged by the app.

// `async fn` in these traits: the app runs in one Embassy task and never
// needs the futures to be `Send`, which is what the lint guards against.
#![allow(async_fn_in_trait)]

use core::fmt::Debug;

use heapless::Vec;
use wildcam_sdk::protocol::{
    BoundingBox, CLASSES_MAX, ChargeState, Classification, ResetReason, UnixSeconds,
};

/// Receives an image as the camera produces it, chunk by chunk: the app
/// hashes it, counts it and feeds the classifier without ever holding a frame.
pub trait FrameSink {
    /// The next bytes of the image.
    fn write(&mut self, chunk: &[u8]);
}

/// A camera that captures one still image (a JPEG on real modules).
pub trait Camera {
    /// What went wrong; logged and counted as a storage/capture error.
    type Error: Debug;

    /// Captures one frame and streams it into `sink`.
    async fn capture<S: FrameSink>(&mut self, sink: &mut S) -> Result<(), Self::Error>;
}

/// What a classifier made of a frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassifierVerdict {
    /// Results, best first (empty: blank frame or no classifier).
    pub classes: Vec<Classification, CLASSES_MAX>,
    /// Where the best result sits in the frame.
    pub bbox: Option<BoundingBox>,
}

/// An on-device classifier, fed the image as it streams from the camera.
pub trait Classifier {
    /// A new frame starts.
    fn begin(&mut self);
    /// The next bytes of the frame.
    fn feed(&mut self, chunk: &[u8]);
    /// The frame is complete: the verdict.
    fn finish(&mut self) -> ClassifierVerdict;
}

/// The default classifier: every frame is reported without classes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoClassifier;

impl Classifier for NoClassifier {
    fn begin(&mut self) {}
    fn feed(&mut self, _chunk: &[u8]) {}
    fn finish(&mut self) -> ClassifierVerdict {
        ClassifierVerdict::default()
    }
}

/// A passive-infrared motion sensor.
pub trait MotionSensor {
    /// Waits for the next motion event (a rising edge on real hardware).
    async fn wait_for_motion(&mut self);
    /// Sets the sensitivity, percent 0..=100 (boards without an adjustable
    /// sensor ignore it).
    fn set_sensitivity(&mut self, percent: u8);
}

/// One reading of the power system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerReading {
    /// Battery voltage, millivolts.
    pub battery_mv: u16,
    /// State of charge, percent 0..=100.
    pub battery_soc_pct: u8,
    /// Charger state.
    pub charge_state: ChargeState,
    /// Solar input, milliwatts.
    pub solar_mw: u16,
    /// Board temperature, tenths of a degree Celsius.
    pub temperature_decicelsius: i16,
}

/// The battery gauge (and whatever else the board knows about power).
pub trait BatteryGauge {
    /// A fresh reading.
    fn read(&mut self) -> PowerReading;
}

/// Wall-clock time.
pub trait Clock {
    /// Seconds since the Unix epoch, or `None` while the clock is not set.
    fn now_unix(&self) -> Option<UnixSeconds>;
}

/// Hardware randomness (the ESP32's RNG with the radio on, the OS on a host).
pub trait Entropy {
    /// Fills `bytes` with cryptographically strong random bytes.
    fn fill(&mut self, bytes: &mut [u8]);

    /// A random `u32` (backoff jitter).
    fn next_u32(&mut self) -> u32 {
        let mut bytes = [0; 4];
        self.fill(&mut bytes);
        u32::from_le_bytes(bytes)
    }
}

/// Restarting the chip.
pub trait Restart {
    /// Why the chip last reset.
    fn reset_reason(&self) -> ResetReason;
    /// Restarts now (after the caller flushed what it had to say).
    fn restart(&mut self) -> !;
}
