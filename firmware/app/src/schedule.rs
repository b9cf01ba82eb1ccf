//! When the trap captures and when it talks: capture windows, and the
//! check-in schedule that keeps the radio off between check-ins. Pure
//! functions of the configuration and the time, unit-tested on the host.

use wildcam_sdk::protocol::{MINUTES_PER_DAY, TrapConfig, UnixSeconds};

/// How the trap uses its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connectivity {
    /// Stay connected; reconnect at once (with backoff) when the link drops.
    /// For mains-powered traps and the host board.
    AlwaysOn,
    /// Connect at every check-in (the configuration's `checkin_interval_s`)
    /// and when detections wait, stay `linger_s` for the server's catch-up,
    /// then disconnect and sleep.
    CheckIn {
        /// Seconds to stay connected once everything is acknowledged.
        linger_s: u32,
        /// Seconds a new detection may wait for company before the trap
        /// connects to send it (batches a burst into one connection).
        upload_delay_s: u32,
    },
}

/// Minutes since local midnight at `now`, `utc_offset_min` east of UTC.
pub fn local_minute(now: UnixSeconds, utc_offset_min: i16) -> u16 {
    let day_s = i64::from(MINUTES_PER_DAY) * 60;
    let local_s = (i64::from(now) + i64::from(utc_offset_min) * 60).rem_euclid(day_s);
    // Below 1,440 by construction.
    u16::try_from(local_s / 60).unwrap_or(0)
}

/// Whether PIR captures are armed: always without windows, and also while
/// the clock is unset (a trap that cannot tell the time captures rather than
/// miss everything).
pub fn is_armed(config: &TrapConfig, now: Option<UnixSeconds>, utc_offset_min: i16) -> bool {
    let Some(now) = now else {
        return true;
    };
    if config.capture_windows.is_empty() {
        return true;
    }
    let minute = local_minute(now, utc_offset_min);
    config
        .capture_windows
        .iter()
        .any(|window| window.contains(minute))
}

/// What to do while disconnected under [`Connectivity::CheckIn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepPlan {
    /// Seconds until the next check-in.
    pub checkin_in_s: u32,
    /// Whether queued detections are due before that: connect
    /// `upload_delay_s` after the first one.
    pub upload_in_s: Option<u32>,
}

impl SleepPlan {
    /// Seconds to sleep before connecting.
    pub fn sleep_s(&self) -> u32 {
        self.upload_in_s
            .map_or(self.checkin_in_s, |upload| upload.min(self.checkin_in_s))
    }
}

/// The plan after a check-in that ended `since_checkin_s` ago; `waiting_s`
/// is how long the oldest queued detection has waited since then (`None`:
/// nothing queued). The upload delay counts from that first detection, so a
/// stream of triggers cannot postpone the upload forever.
pub fn sleep_plan(
    config: &TrapConfig,
    upload_delay_s: u32,
    since_checkin_s: u32,
    waiting_s: Option<u32>,
) -> SleepPlan {
    SleepPlan {
        checkin_in_s: config.checkin_interval_s.saturating_sub(since_checkin_s),
        upload_in_s: waiting_s.map(|waited| upload_delay_s.saturating_sub(waited)),
    }
}

#[cfg(test)]
mod tests {
    use wildcam_sdk::protocol::CaptureWindow;

    use super::*;

    fn with_window(start_min: u16, end_min: u16) -> TrapConfig {
        let mut config = TrapConfig::default();
        config
            .capture_windows
            .push(CaptureWindow { start_min, end_min })
            .unwrap();
        config
    }

    #[test]
    fn local_minute_applies_the_offset_and_wraps() {
        let midnight_utc = 1_795_046_400; // 2026-11-18T00:00:00Z
        assert_eq!(local_minute(midnight_utc, 0), 0);
        assert_eq!(local_minute(midnight_utc + 90 * 60, 0), 90);
        assert_eq!(local_minute(midnight_utc, 60), 60);
        assert_eq!(local_minute(midnight_utc, -60), 1_380);
    }

    #[test]
    fn windows_arm_the_pir_and_wrap_past_midnight() {
        let midnight_utc = 1_795_046_400;
        let night = with_window(18 * 60, 6 * 60);
        assert!(is_armed(&night, Some(midnight_utc + 3 * 3600), 0));
        assert!(!is_armed(&night, Some(midnight_utc + 12 * 3600), 0));
        assert!(is_armed(&night, Some(midnight_utc + 12 * 3600), 7 * 60), "19:00 local");
        assert!(is_armed(&night, None, 0), "an unset clock captures");
        assert!(is_armed(&TrapConfig::default(), Some(midnight_utc), 0));
    }

    #[test]
    fn sleep_until_the_checkin_or_the_upload() {
        let config = TrapConfig { checkin_interval_s: 3_600, ..TrapConfig::default() };
        let idle = sleep_plan(&config, 30, 600, None);
        assert_eq!(idle, SleepPlan { checkin_in_s: 3_000, upload_in_s: None });
        assert_eq!(idle.sleep_s(), 3_000);
        assert_eq!(sleep_plan(&config, 30, 600, Some(0)).sleep_s(), 30);
        assert_eq!(sleep_plan(&config, 30, 600, Some(25)).sleep_s(), 5, "later detections do not postpone");
        assert_eq!(sleep_plan(&config, 30, 600, Some(90)).sleep_s(), 0);
        assert_eq!(sleep_plan(&config, 30, 4_000, None).sleep_s(), 0, "overdue: connect now");
    }
}
