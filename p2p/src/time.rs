//! Wall-clock helpers. The core never reads the clock itself: callers pass `now_ms` in.

use chrono::{DateTime, SecondsFormat, Utc};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds and `Z`, e.g. `2025-10-16T12:00:00.123Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_with_millis_and_z() {
        assert_eq!(super::rfc3339_ms(1_760_616_000_123), "2025-10-16T12:00:00.123Z");
    }
}
