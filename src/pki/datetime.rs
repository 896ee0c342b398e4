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
    use super::rfc3339;
    use std::time::SystemTime;

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
