//! The application's entry point: the capture loop and the network loop,
//! joined in the caller's task.

use core::convert::Infallible;

use embassy_futures::select::{Either, select};
use embassy_net::Stack;
use wildcam_sdk::ota::OtaSlot;
use wildcam_sdk::queue::QueueStore;

use crate::capture::{CaptureHardware, capture_loop};
use crate::hardware::{BatteryGauge, Camera, Classifier, Clock, Entropy, MotionSensor};
use crate::ota::BootControl;
use crate::session::{NetworkHardware, NetworkSettings, network_loop};
use crate::shared::Shared;
use crate::storage::StateStore;

/// Everything a board hands the app besides the network stack.
#[derive(Debug)]
pub struct Board<Cam, Cls, Pir, E, B, O> {
    /// Camera, classifier and PIR.
    pub capture: CaptureHardware<Cam, Cls, Pir>,
    /// Randomness, boot control and the inactive firmware slot.
    pub network: NetworkHardware<E, B, O>,
    /// Local time zone, minutes east of UTC (capture windows are local).
    pub utc_offset_min: i16,
}

/// Runs the trap forever: captures into the queue, and talks to the fleet
/// server over `stack`. Call it from the board's main task.
pub async fn run<Q, S, G, C, Cam, Cls, Pir, E, B, O>(
    shared: &Shared<Q, S, G, C>,
    stack: Stack<'_>,
    settings: &NetworkSettings<'_>,
    board: &mut Board<Cam, Cls, Pir, E, B, O>,
) -> Infallible
where
    Q: QueueStore,
    S: StateStore,
    G: BatteryGauge,
    C: Clock,
    Cam: Camera,
    Cls: Classifier,
    Pir: MotionSensor,
    E: Entropy,
    B: BootControl,
    O: OtaSlot,
{
    let capture = capture_loop(shared, &mut board.capture, board.utc_offset_min);
    let network = network_loop(shared, stack, settings, &mut board.network);
    match select(capture, network).await {
        Either::First(never) | Either::Second(never) => never,
    }
}
