#![doc = include_str!("../README.md")]
#![no_std]

#[cfg(test)]
extern crate std;

pub mod app;
pub mod capture;
pub mod error;
pub mod hardware;
pub mod mqtt;
pub mod ota;
pub mod schedule;
pub mod session;
pub mod settings;
pub mod shared;
pub mod storage;
pub mod trap;

pub use app::{Board, run};
pub use capture::CaptureHardware;
pub use error::TrapError;
pub use hardware::{
    BatteryGauge, Camera, Classifier, ClassifierVerdict, Clock, Entropy, FrameSink, MotionSensor,
    NoClassifier, PowerReading, Restart,
};
pub use ota::{BootControl, NorFlashSlot, Ota};
pub use schedule::Connectivity;
pub use session::{NetworkHardware, NetworkSettings};
pub use shared::Shared;
pub use storage::{DeviceState, FlashLayout, FlashStateStore, SharedFlash, StateStore};
pub use trap::{Trap, TrapIdentity};
