//! A minimal `log` backend: one line per record on standard error, with the
//! seconds since start, so the end-to-end test can follow the trap.

use std::io::Write;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    started: Instant,
    level: Level,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{elapsed:9.3} {:<5} {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

/// Installs the logger; `WILDCAM_LOG` (`error` .. `trace`) sets the level,
/// `info` by default.
pub fn init() {
    let level = std::env::var("WILDCAM_LOG")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(Level::Info);
    let logger = Box::new(StderrLogger { started: Instant::now(), level });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level.to_level_filter().max(LevelFilter::Error));
    }
}
