//! Rate limits, with the time passed in (ms). [`Window`], a fixed-window counter, is the one most
//! of the node uses: at most `limit` events per window of `length` ms, a new window starting
//! with the first event after the last one ended. [`Pace`], a token bucket, is for budgets of
//! work that should be spread over time rather than spent in the first moments of each window.

/// Events counted in the current window, and when it began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    from: u64,
    used: u32,
}

impl Window {
    /// Whether the window that began last has ended by `now`.
    pub fn ended(&self, now: u64, length: u64) -> bool {
        now.saturating_sub(self.from) >= length
    }

    /// Whether one more event at `now` would stay within `limit`.
    pub fn has_room(&self, now: u64, length: u64, limit: u32) -> bool {
        self.ended(now, length) || self.used < limit
    }

    /// Counts an event at `now`; whether it stayed within `limit`.
    pub fn spend(&mut self, now: u64, length: u64, limit: u32) -> bool {
        if self.ended(now, length) {
            *self = Self { from: now, used: 0 };
        }
        self.used = self.used.saturating_add(1);
        self.used <= limit
    }
}

/// A token bucket: on average `rate` events a second, at most `burst` at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    /// Thousandths of an event in hand (a bucket refills by `rate` of them each ms).
    milli: u64,
    at: u64,
    started: bool,
}

impl Pace {
    /// Takes one event's worth at `now`; whether there was one.
    pub fn spend(&mut self, now: u64, rate: u32, burst: u32) -> bool {
        let full = u64::from(burst) * 1_000;
        if !self.started {
            *self = Self { milli: full, at: now, started: true };
        }
        let refill = now.saturating_sub(self.at).saturating_mul(u64::from(rate));
        self.milli = self.milli.saturating_add(refill).min(full);
        self.at = self.at.max(now);
        if self.milli < 1_000 {
            return false;
        }
        self.milli -= 1_000;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_allows_its_burst_then_its_rate() {
        let mut p = Pace::default();
        assert_eq!((0..50).filter(|_| p.spend(1_000, 200, 20)).count(), 20, "the burst");
        // 200 a second is one per 5 ms.
        let spread = (1_001..=2_000).filter(|&t| p.spend(t, 200, 20)).count();
        assert_eq!(spread, 200);
        assert!(!p.spend(2_000, 200, 20), "none in hand");
        assert_eq!(
            (0..50).filter(|_| p.spend(60_000, 200, 20)).count(),
            20,
            "never above the burst"
        );
    }

    #[test]
    fn a_window_holds_its_limit_then_starts_again() {
        let mut w = Window::default();
        assert_eq!((0..5).filter(|_| w.spend(1_000, 100, 3)).count(), 3);
        assert!(!w.has_room(1_099, 100, 3));
        assert!(w.has_room(1_100, 100, 3) && w.spend(1_100, 100, 3));
    }
}
