//! A fixed-window counter, the one rate limit every part of the node uses: at most `limit`
//! events per window of `length` ms, a new window starting with the first event after the last
//! one ended. Time is passed in (ms).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_its_limit_then_starts_again() {
        let mut w = Window::default();
        assert_eq!((0..5).filter(|_| w.spend(1_000, 100, 3)).count(), 3);
        assert!(!w.has_room(1_099, 100, 3));
        assert!(w.has_room(1_100, 100, 3) && w.spend(1_100, 100, 3));
    }
}
