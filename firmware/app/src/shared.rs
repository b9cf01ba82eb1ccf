//! What the capture loop and the network loop share. Both run in one Embassy
//! task (joined), so plain `RefCell`s suffice: no borrow is ever held across
//! an `.await`.

use core::cell::RefCell;
use core::fmt;

use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use embassy_sync::signal::Signal;
use embassy_time::Instant;
use wildcam_sdk::protocol::Trigger;
use wildcam_sdk::queue::QueueStore;

use crate::storage::StateStore;
use crate::trap::Trap;

/// State and wake-ups shared by the two loops.
pub struct Shared<Q: QueueStore, S: StateStore, G, C> {
    /// The trap's core.
    pub trap: RefCell<Trap<Q, S>>,
    /// The battery gauge (captures stamp the voltage, health reports all of it).
    pub gauge: RefCell<G>,
    /// Wall-clock time.
    pub clock: C,
    /// A detection was queued: the network loop may want to send it.
    pub detection_queued: Signal<NoopRawMutex, ()>,
    /// A command asked for a capture.
    pub capture_requested: Signal<NoopRawMutex, Trigger>,
    /// A new configuration runs.
    pub config_changed: Signal<NoopRawMutex, ()>,
    /// The trap reached its fleet server as itself (hello and health sent).
    pub connected: Signal<NoopRawMutex, ()>,
    started: Instant,
}

impl<Q: QueueStore, S: StateStore, G, C> Shared<Q, S, G, C> {
    /// Wraps the trap and the sensors both loops use.
    pub fn new(trap: Trap<Q, S>, gauge: G, clock: C) -> Self {
        Self {
            trap: RefCell::new(trap),
            gauge: RefCell::new(gauge),
            clock,
            detection_queued: Signal::new(),
            capture_requested: Signal::new(),
            config_changed: Signal::new(),
            connected: Signal::new(),
            started: Instant::now(),
        }
    }

    /// Seconds since the app started.
    pub fn uptime_s(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

impl<Q: QueueStore, S: StateStore, G, C> fmt::Debug for Shared<Q, S, G, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}
