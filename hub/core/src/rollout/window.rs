//! Weekly maintenance windows in local wall-clock time: a fixed UTC offset, an IANA time zone from the bundled
//! database (daylight saving time included), or each device's own zone.

use serde::{Deserialize, Serialize};

/// Whose clock a maintenance window reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Clock {
    /// A fixed offset from UTC, in minutes (no daylight saving time).
    Offset(i32),
    /// An IANA time zone (`Europe/Berlin`), daylight saving time included, from the bundled time-zone database.
    Zone(String),
}

/// A weekly maintenance window in local wall-clock time.
///
/// Daylight saving time follows the wall clock: on the night clocks go forward, a window inside the skipped hour
/// does not open at all and one spanning it is an hour shorter; on the night they go back, a window inside the
/// repeated hour is open through both passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub clock: Clock,
    /// Bit 0 = Monday ... bit 6 = Sunday.
    pub days: u8,
    /// Minutes since local midnight; `end < start` spans midnight.
    pub start_min: u32,
    pub end_min: u32,
    /// Read each device's own time zone (its `tz` label) instead, where it names a valid zone; `clock` is the
    /// fallback. A wave spanning time zones then updates every device in its own night.
    pub device_zone: bool,
}

/// (weekday with Monday = 0, minute of the day) of `now` on a clock.
fn wall_clock(clock: &Clock, now: u64) -> Option<(u32, u32)> {
    match clock {
        Clock::Offset(min) => {
            let local = i64::try_from(now).ok()? + i64::from(*min) * 60;
            // 1970-01-01 was a Thursday (weekday index 3 with Monday = 0).
            let weekday = u32::try_from((local.div_euclid(86_400) + 3).rem_euclid(7)).ok()?;
            let minute = u32::try_from(local.rem_euclid(86_400) / 60).ok()?;
            Some((weekday, minute))
        }
        Clock::Zone(name) => {
            let tz = jiff::tz::TimeZone::get(name).ok()?;
            let t = jiff::Timestamp::from_second(i64::try_from(now).ok()?).ok()?;
            let local = tz.to_datetime(t);
            let weekday = u32::from(local.weekday().to_monday_zero_offset().unsigned_abs());
            let minute = u32::from(local.hour().unsigned_abs()) * 60
                + u32::from(local.minute().unsigned_abs());
            Some((weekday, minute))
        }
    }
}

/// Whether `name` is a time zone the bundled database knows.
pub fn is_time_zone(name: &str) -> bool {
    jiff::tz::TimeZone::get(name).is_ok()
}

impl Window {
    /// Whether `now` (unix seconds) falls inside the window, for a device whose own time zone is `device_tz`.
    pub fn contains(&self, now: u64, device_tz: Option<&str>) -> bool {
        let own = device_tz
            .filter(|_| self.device_zone)
            .filter(|z| is_time_zone(z))
            .map(|z| Clock::Zone(z.to_owned()));
        let Some((weekday, minute)) = wall_clock(own.as_ref().unwrap_or(&self.clock), now) else {
            return false;
        };
        let open_on = |wd: u32| self.days & (1 << wd) != 0;
        if self.start_min <= self.end_min {
            open_on(weekday) && minute >= self.start_min && minute < self.end_min
        } else {
            (open_on(weekday) && minute >= self.start_min)
                || (open_on((weekday + 6) % 7) && minute < self.end_min)
        }
    }
}
