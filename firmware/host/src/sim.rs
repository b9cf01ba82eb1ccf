//! The host board's simulated hardware: a synthetic camera, a PIR driven by
//! standard input (and optionally a timer), a battery, the system clock, the
//! OS's randomness, and a restart that re-executes the binary.

use std::io::{BufRead, Read};
use std::os::unix::process::CommandExt;
use std::time::{SystemTime, UNIX_EPOCH};

use embassy_futures::select::{Either, select};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::signal::Signal;
use embassy_time::{Duration, Timer};
use wildcam_firmware_app::{
    BatteryGauge, Camera, Clock, Entropy, FrameSink, MotionSensor, PowerReading, Restart,
};
use wildcam_sdk::protocol::{ChargeState, ResetReason, UnixSeconds};

/// Environment variable carrying the reset reason into a restarted process.
pub const RESET_REASON_VARIABLE: &str = "WILDCAM_HOST_RESET_REASON";

/// A camera that "captures" a deterministic pseudo-random image: a JPEG
/// start marker, `image_len - 4` bytes derived from the frame number, and an
/// end marker, streamed in 512-byte chunks after a short exposure delay.
#[derive(Debug)]
pub struct SyntheticCamera {
    frame: u32,
    image_len: usize,
}

impl SyntheticCamera {
    /// A camera producing `image_len`-byte images (at least 4).
    pub fn new(image_len: usize) -> Self {
        Self { frame: 0, image_len: image_len.max(4) }
    }
}

impl Camera for SyntheticCamera {
    type Error = core::convert::Infallible;

    async fn capture<S: FrameSink>(&mut self, sink: &mut S) -> Result<(), Self::Error> {
        Timer::after(Duration::from_millis(20)).await;
        self.frame = self.frame.wrapping_add(1);
        let mut state = self.frame.wrapping_mul(0x9E37_79B9) | 1;
        sink.write(&[0xFF, 0xD8]);
        let mut remaining = self.image_len - 4;
        let mut chunk = [0u8; 512];
        while remaining > 0 {
            let len = remaining.min(chunk.len());
            for byte in &mut chunk[..len] {
                // xorshift32: cheap, deterministic, different per frame.
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *byte = state.to_le_bytes()[0];
            }
            sink.write(&chunk[..len]);
            remaining -= len;
        }
        sink.write(&[0xFF, 0xD9]);
        Ok(())
    }
}

/// Motion events from another thread (standard input).
pub static MOTION: Signal<CriticalSectionRawMutex, ()> = Signal::new();

/// Reads standard input on a thread: each line `pir` (or `motion`) is a
/// motion event. End of input stops the thread, not the trap.
pub fn spawn_stdin_reader() {
    std::thread::spawn(|| {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            match line.trim() {
                "pir" | "motion" => MOTION.signal(()),
                "" => {}
                other => log::warn!("stdin: unknown command {other:?} (expected `pir`)"),
            }
        }
    });
}

/// The PIR: motion from standard input, and every `period` if set.
#[derive(Debug)]
pub struct SimulatedPir {
    /// Simulated motion at this period, if any.
    pub period: Option<Duration>,
    sensitivity_pct: u8,
}

impl SimulatedPir {
    /// A PIR that fires on `pir` lines and every `period`.
    pub fn new(period: Option<Duration>) -> Self {
        Self { period, sensitivity_pct: 60 }
    }
}

impl MotionSensor for SimulatedPir {
    async fn wait_for_motion(&mut self) {
        match self.period {
            None => MOTION.wait().await,
            Some(period) => match select(MOTION.wait(), Timer::after(period)).await {
                Either::First(()) | Either::Second(()) => {}
            },
        }
        log::info!("pir: motion (sensitivity {} %)", self.sensitivity_pct);
    }

    fn set_sensitivity(&mut self, percent: u8) {
        self.sensitivity_pct = percent;
    }
}

/// A battery discharging slowly with each reading.
#[derive(Debug)]
pub struct SimulatedBattery {
    millivolts: u16,
}

impl Default for SimulatedBattery {
    fn default() -> Self {
        Self { millivolts: 4_100 }
    }
}

impl BatteryGauge for SimulatedBattery {
    fn read(&mut self) -> PowerReading {
        self.millivolts = self.millivolts.saturating_sub(1).max(3_300);
        let soc = (u32::from(self.millivolts) - 3_300) * 100 / 900;
        PowerReading {
            battery_mv: self.millivolts,
            battery_soc_pct: u8::try_from(soc).unwrap_or(100),
            charge_state: ChargeState::Discharging,
            solar_mw: 0,
            temperature_decicelsius: 215,
        }
    }
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> Option<UnixSeconds> {
        let seconds = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        u32::try_from(seconds).ok()
    }
}

/// The kernel's randomness.
#[derive(Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, bytes: &mut [u8]) {
        let read = std::fs::File::open("/dev/urandom").and_then(|mut random| random.read_exact(bytes));
        if let Err(error) = read {
            // No randomness means no safe keys: stop rather than go on.
            panic!("/dev/urandom unreadable: {error}");
        }
    }
}

/// Restarting re-executes this binary with the same arguments.
#[derive(Debug, Default)]
pub struct ExecRestart;

impl Restart for ExecRestart {
    fn reset_reason(&self) -> ResetReason {
        match std::env::var(RESET_REASON_VARIABLE).as_deref() {
            Ok("software") => ResetReason::Software,
            _ => ResetReason::PowerOn,
        }
    }

    fn restart(&mut self) -> ! {
        log::info!("restarting");
        let mut arguments = std::env::args_os();
        let program = std::env::current_exe()
            .ok()
            .or_else(|| arguments.next().map(Into::into));
        let Some(program) = program else {
            std::process::exit(0);
        };
        close_on_exec_all();
        let error = std::process::Command::new(program)
            .args(std::env::args_os().skip(1))
            .env(RESET_REASON_VARIABLE, "software")
            .exec();
        log::error!("restart failed: {error}");
        std::process::exit(1);
    }
}

/// Marks every descriptor above standard error close-on-exec before the
/// restart: the TAP device is opened without the flag (embassy-net-tuntap),
/// and a re-executed trap that inherited it could not attach to the device
/// again (`EBUSY`).
fn close_on_exec_all() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let descriptors: Vec<i32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in descriptors {
        // SAFETY: F_SETFD only sets the descriptor's close-on-exec flag: no
        // memory is read or written. A descriptor closed meanwhile (such as
        // the directory listing's own) fails with EBADF, which is ignored.
        #[allow(unsafe_code)]
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}
