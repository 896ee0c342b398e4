//! Times written for people and logs.

use std::time::SystemTime;

/// RFC 3339 UTC time with milliseconds (truncated). A time before 1970 is written as it
/// is (a clock set back must show in the log, not read as 1970); a year past 9999, which
/// RFC 3339 cannot write, in ISO 8601's expanded form (`+10000-01-01T00:00:00.000Z`).
pub fn rfc3339(time: SystemTime) -> String {
    // Milliseconds since 1970, rounded down (towards the past, before 1970 too).
    let millis: i128 = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_millis() as i128,
        Err(before) => (-(before.duration().as_nanos() as i128)).div_euclid(1_000_000),
    };
    let secs = millis.div_euclid(1000);
    let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let year = if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else {
        format!("{year:+05}")
    };
    format!(
        "{year}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        millis.rem_euclid(1000)
    )
}

/// Milliseconds since 1970 of a time [`rfc3339`] wrote for a year 0000-9999
/// (`2026-12-01T14:49:47.283Z`), None for any other text: what `audit verify` reads of
/// a record's `time`, which meshca writes only that way.
pub fn rfc3339_millis(text: &str) -> Option<i128> {
    let bytes = text.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:dd.dddZ";
    if bytes.len() != shape.len()
        || !bytes.iter().zip(shape).all(|(b, s)| match s {
            b'd' => b.is_ascii_digit(),
            other => b == other,
        })
    {
        return None;
    }
    let number = |from: usize, to: usize| text[from..to].parse::<i128>().ok();
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    let millis = number(20, 23)?;
    let days = days_from_civil(year, month, day);
    // A date that does not exist (02-30) or a time out of range reads as no time, not as
    // another day.
    if !(1..=12).contains(&month)
        || civil_from_days(days) != (year, month, day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + millis)
}

/// Days from 1970-01-01 to the proleptic Gregorian `year`-`month`-`day` (negative before):
/// Howard Hinnant's `days_from_civil`, the inverse of [`civil_from_days`].
fn days_from_civil(year: i128, month: i128, day: i128) -> i128 {
    let year = year - i128::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian (year, month, day) `days` after 1970-01-01 (before it if
/// negative): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i128) -> (i128, i128, i128) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i128::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::{rfc3339, rfc3339_millis};
    use std::time::SystemTime;

    #[test]
    fn rfc3339_millis_reads_what_rfc3339_writes_and_nothing_else() {
        use std::time::Duration;
        let epoch = SystemTime::UNIX_EPOCH;
        // Every day boundary for 400 years either side of 2000 (a whole Gregorian cycle),
        // and a time within a day.
        for day in -146_097..146_097i64 {
            let millis = i128::from(day) * 86_400_000 + 45_296_789;
            let time = if millis >= 0 {
                epoch + Duration::from_millis(millis as u64)
            } else {
                epoch - Duration::from_millis((-millis) as u64)
            };
            let text = rfc3339(time);
            if text.starts_with(|c: char| c.is_ascii_digit()) {
                assert_eq!(rfc3339_millis(&text), Some(millis), "{text}");
            }
        }
        for not_one in [
            "",
            "2026-12-01T14:49:47Z",
            "2026-12-01T14:49:47.283+00:00",
            "2026-02-29T00:00:00.000Z",
            "2026-13-01T00:00:00.000Z",
            "2026-12-01T24:00:00.000Z",
            "2026-12-01T14:60:00.000Z",
            "+10000-01-01T00:00:00.000Z",
            "2026-12-01T14:49:47.2830Z",
        ] {
            assert_eq!(rfc3339_millis(not_one), None, "{not_one:?}");
        }
        assert_eq!(
            rfc3339_millis("2024-02-29T12:34:56.250Z"),
            Some(1_709_210_096_250)
        );
    }

    #[test]
    fn rfc3339_writes_times_before_1970_and_after_9999_as_they_are() {
        use std::time::Duration;
        let epoch = SystemTime::UNIX_EPOCH;
        let at = |secs: u64| epoch + Duration::from_secs(secs);
        let before = |secs: u64| epoch - Duration::from_secs(secs);
        assert_eq!(rfc3339(epoch), "1970-01-01T00:00:00.000Z");
        assert_ne!(rfc3339(before(1)), rfc3339(epoch));
        assert_eq!(rfc3339(before(1)), "1969-12-31T23:59:59.000Z");
        for just_before in [Duration::from_millis(1), Duration::from_micros(1)] {
            assert_eq!(rfc3339(epoch - just_before), "1969-12-31T23:59:59.999Z");
        }
        // 1960-01-01, as `faketime '1960-01-01'` sets the clock.
        assert_eq!(rfc3339(before(315_619_200)), "1960-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(at(1_709_210_096) + Duration::from_millis(250)),
            "2024-02-29T12:34:56.250Z"
        );
        assert_eq!(rfc3339(at(253_402_300_799)), "9999-12-31T23:59:59.000Z");
        assert_eq!(rfc3339(at(253_402_300_800)), "+10000-01-01T00:00:00.000Z");
        // Year 0 and before: the year of the proleptic Gregorian calendar, signed.
        assert_eq!(rfc3339(before(62_167_219_200)), "0000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(before(62_167_219_201)), "-0001-12-31T23:59:59.000Z");
    }
}
