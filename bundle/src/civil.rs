//! Calendar arithmetic for the formats that store dates (FAT, SPDX, bundle
//! manifests and channel metadata): proleptic Gregorian, UTC, no time zones
//! beyond the fixed offsets TOML datetimes carry.

use toml::value::{Date, Datetime, Offset, Time};

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number from [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The RFC 3339 UTC time of a Unix timestamp, e.g. `2023-11-14T22:13:20Z`.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// First second [`unix_to_datetime`] can express: 0000-01-01T00:00:00Z.
const MIN_DATETIME_SECS: i64 = -62_167_219_200;
/// Last second [`unix_to_datetime`] can express: 9999-12-31T23:59:59Z.
const MAX_DATETIME_SECS: i64 = 253_402_300_799;

/// The Unix time (seconds since 1970-01-01T00:00:00Z) of a TOML offset
/// datetime such as `2026-11-25T13:00:00Z` or `2026-11-25T14:00:00+01:00`.
///
/// The datetime needs a date, a time and an offset: a local date or time
/// names no instant, so it gives `None`, as do out-of-range fields (a
/// hand-built `Datetime` with month 13, or a leap second). Fractions of a
/// second are dropped.
pub fn datetime_to_unix(dt: &Datetime) -> Option<i64> {
    let date = dt.date?;
    let time = dt.time?;
    let offset_minutes = match dt.offset? {
        Offset::Z => 0,
        Offset::Custom { minutes } if minutes.unsigned_abs() < 24 * 60 => i64::from(minutes),
        Offset::Custom { .. } => return None,
    };
    let (year, month, day) = (i64::from(date.year), u32::from(date.month), u32::from(date.day));
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let second = time.second.unwrap_or(0);
    if time.hour > 23 || time.minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let local = days * 86_400
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(second);
    // 14:00+01:00 is 13:00Z.
    Some(local - offset_minutes * 60)
}

/// The TOML datetime of a Unix time, in UTC (`Z`), whole seconds, e.g.
/// `2026-11-25T13:00:00Z`.
///
/// A TOML year has four digits, so times before year 0 or after year 9999
/// are clamped to those bounds.
pub fn unix_to_datetime(secs: i64) -> Datetime {
    let secs = secs.clamp(MIN_DATETIME_SECS, MAX_DATETIME_SECS);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    // The clamp keeps the year in 0..=9999 and the rest are in range by
    // construction, so the narrowing casts cannot truncate.
    Datetime {
        date: Some(Date { year: y as u16, month: m as u8, day: d as u8 }),
        time: Some(Time {
            hour: (rem / 3600) as u8,
            minute: ((rem % 3600) / 60) as u8,
            second: Some((rem % 60) as u8),
            nanosecond: None,
        }),
        offset: Some(Offset::Z),
    }
}

/// Number of days of a month (1..=12) of the proleptic Gregorian calendar.
fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(text: &str) -> Datetime {
        text.parse().unwrap()
    }

    #[test]
    fn known_dates_convert_both_ways() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        for days in [0, 10_957, 11_016, 19_675, 50_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn toml_datetimes_to_unix() {
        assert_eq!(datetime_to_unix(&dt("1970-01-01T00:00:00Z")), Some(0));
        assert_eq!(datetime_to_unix(&dt("2023-11-14T22:13:20Z")), Some(1_700_000_000));
        // The same instant written with offsets.
        assert_eq!(datetime_to_unix(&dt("2023-11-14T23:13:20+01:00")), Some(1_700_000_000));
        assert_eq!(datetime_to_unix(&dt("2023-11-14T16:43:20-05:30")), Some(1_700_000_000));
        assert_eq!(datetime_to_unix(&dt("1969-12-31T23:59:59Z")), Some(-1));
        // Fractions are dropped.
        assert_eq!(datetime_to_unix(&dt("1970-01-01T00:00:01.9Z")), Some(1));
        assert_eq!(datetime_to_unix(&dt("2000-02-29T00:00:00Z")), Some(951_782_400));
    }

    #[test]
    fn datetimes_without_an_instant_are_refused() {
        for text in ["2026-11-25T13:00:00", "2026-11-25", "13:00:00"] {
            assert_eq!(datetime_to_unix(&dt(text)), None, "{text}");
        }
        let mut bad = dt("2026-11-25T13:00:00Z");
        bad.date = Some(Date { year: 2026, month: 2, day: 30 });
        assert_eq!(datetime_to_unix(&bad), None);
        bad.date = Some(Date { year: 2026, month: 13, day: 1 });
        assert_eq!(datetime_to_unix(&bad), None);
        let mut bad = dt("2026-11-25T13:00:00Z");
        bad.offset = Some(Offset::Custom { minutes: 24 * 60 });
        assert_eq!(datetime_to_unix(&bad), None);
        let mut bad = dt("2026-11-25T13:00:00Z");
        bad.time = Some(Time { hour: 24, minute: 0, second: Some(0), nanosecond: None });
        assert_eq!(datetime_to_unix(&bad), None);
    }

    #[test]
    fn unix_to_datetime_round_trips() {
        assert_eq!(unix_to_datetime(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_datetime(1_700_000_000).to_string(), "2023-11-14T22:13:20Z");
        assert_eq!(unix_to_datetime(-1).to_string(), "1969-12-31T23:59:59Z");
        for secs in [
            0,
            1,
            -1,
            86_399,
            86_400,
            951_782_400,
            1_700_000_000,
            1_795_611_600,
            4_102_444_800,
            MIN_DATETIME_SECS,
            MAX_DATETIME_SECS,
        ] {
            let back = unix_to_datetime(secs);
            assert_eq!(datetime_to_unix(&back), Some(secs), "{back}");
            // And through TOML text.
            assert_eq!(datetime_to_unix(&dt(&back.to_string())), Some(secs), "{back}");
        }
        // Every day over four centuries, at an odd second.
        for day in (-146_097..146_097).step_by(7) {
            let secs = day * 86_400 + 45_296;
            assert_eq!(datetime_to_unix(&unix_to_datetime(secs)), Some(secs));
        }
        assert_eq!(unix_to_datetime(i64::MAX).to_string(), "9999-12-31T23:59:59Z");
        assert_eq!(unix_to_datetime(i64::MIN).to_string(), "0000-01-01T00:00:00Z");
    }
}
