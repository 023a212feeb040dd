//! Runtime health: each executor a node has (its built-in kinds, each configured program) with
//! a failure budget. A runtime whose faults use up the budget within the window is quarantined
//! for a cool-down: its kinds run nowhere on the node, and its advert says so
//! ([`crate::runtimes`]), so the Home places them elsewhere. After the cool-down it is on probation (`degraded`): one good run makes it `ready`,
//! one more fault quarantines it again for twice as long (up to 16 times the cool-down).
//!
//! A fault is the runtime failing, not the job: the executor says which (a program that could
//! not start, crashed, timed out or wrote too much is a fault; bad input is not).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::runtimes::{MAX_RUNTIMES, RuntimeHealth, RuntimeStatus, truncate};

/// The longest quarantine, in cool-downs.
const MAX_BACKOFF: u32 = 16;

/// An executor and the kinds it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeDecl {
    /// `builtin`, or `exec:<kind>` for a configured program.
    pub id: String,
    /// The kinds it runs.
    pub kinds: Vec<String>,
}

/// `[jobs.runtime]`: the failure budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeBudget {
    /// Faults within `window_ms` that quarantine a runtime.
    pub failures: u32,
    /// The window faults are counted over (ms).
    pub window_ms: u64,
    /// How long the first quarantine lasts (ms); each one after a failed probation doubles it.
    pub cooldown_ms: u64,
}

impl Default for RuntimeBudget {
    fn default() -> Self {
        Self { failures: 5, window_ms: 60_000, cooldown_ms: 30_000 }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    decl: RuntimeDecl,
    health: RuntimeHealth,
    /// Fault times within the window, oldest first.
    faults: VecDeque<u64>,
    until: Option<u64>,
    /// Quarantines in a row without a good run between them.
    streak: u32,
    quarantines: u32,
    last_error: Option<String>,
}

impl Entry {
    fn status(&self, budget: &RuntimeBudget) -> RuntimeStatus {
        RuntimeStatus {
            id: self.decl.id.clone(),
            kinds: self.decl.kinds.clone(),
            health: self.health,
            failures: u32::try_from(self.faults.len()).unwrap_or(u32::MAX),
            budget: budget.failures,
            quarantines: self.quarantines,
            quarantined_until_ms: self.until,
            last_error: self.last_error.clone(),
        }
    }
}

/// A node's runtimes and their health. IO-less: fed run outcomes and the time.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    budget: RuntimeBudget,
    entries: Vec<Entry>,
}

impl Runtimes {
    /// `decls` all `ready`.
    pub fn new(decls: Vec<RuntimeDecl>, budget: RuntimeBudget) -> Self {
        let entries = decls
            .into_iter()
            .map(|decl| Entry {
                decl,
                health: RuntimeHealth::Ready,
                faults: VecDeque::new(),
                until: None,
                streak: 0,
                quarantines: 0,
                last_error: None,
            })
            .collect();
        Self { budget, entries }
    }

    /// A run of `kind` ended at `now`, with `fault` when the runtime itself failed. Returns the
    /// runtime's status when its health changed.
    pub fn finished(&mut self, kind: &str, fault: Option<&str>, now: u64) -> Option<RuntimeStatus> {
        let budget = self.budget;
        let entry = self.entries.iter_mut().find(|e| e.decl.kinds.iter().any(|k| k == kind))?;
        let before = entry.health;
        prune(entry, &budget, now);
        match fault {
            None => {
                // A good run (on probation, or a run that began before a quarantine).
                if entry.health == RuntimeHealth::Degraded && entry.faults.is_empty() {
                    entry.health = RuntimeHealth::Ready;
                }
                if entry.health != RuntimeHealth::Down {
                    entry.streak = 0;
                }
            }
            Some(error) => {
                let mut error = error.to_owned();
                truncate(&mut error, 256);
                entry.last_error = Some(error);
                let on_probation = entry.health == RuntimeHealth::Degraded && entry.streak > 0;
                if entry.health != RuntimeHealth::Down {
                    entry.faults.push_back(now);
                    if on_probation || entry.faults.len() >= budget.failures.max(1) as usize {
                        entry.streak = (entry.streak + 1).min(MAX_BACKOFF.ilog2() + 1);
                        let factor = 1u64 << (entry.streak - 1);
                        entry.until = Some(now + budget.cooldown_ms.saturating_mul(factor));
                        entry.health = RuntimeHealth::Down;
                        entry.quarantines += 1;
                        entry.faults.clear();
                    } else {
                        entry.health = RuntimeHealth::Degraded;
                    }
                }
            }
        }
        (entry.health != before).then(|| entry.status(&budget))
    }

    /// Ends cool-downs and forgets faults older than the window; returns the runtimes whose
    /// health changed.
    pub fn tick(&mut self, now: u64) -> Vec<RuntimeStatus> {
        let budget = self.budget;
        let mut changed = Vec::new();
        for entry in &mut self.entries {
            let before = entry.health;
            prune(entry, &budget, now);
            if entry.health == RuntimeHealth::Down && entry.until.is_some_and(|t| t <= now) {
                entry.until = None;
                entry.health = RuntimeHealth::Degraded;
            } else if entry.health == RuntimeHealth::Degraded
                && entry.streak == 0
                && entry.faults.is_empty()
            {
                entry.health = RuntimeHealth::Ready;
            }
            if entry.health != before {
                changed.push(entry.status(&budget));
            }
        }
        changed
    }

    /// When [`Runtimes::tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter_map(|e| match e.health {
                RuntimeHealth::Down => e.until,
                RuntimeHealth::Degraded if e.streak == 0 => {
                    e.faults.front().map(|t| t + self.budget.window_ms)
                }
                _ => None,
            })
            .min()
    }

    /// Kinds whose runtime is quarantined now.
    pub fn quarantined(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.health == RuntimeHealth::Down)
            .flat_map(|e| e.decl.kinds.iter().cloned())
            .collect()
    }

    /// Every runtime's status.
    pub fn statuses(&self) -> Vec<RuntimeStatus> {
        self.entries.iter().map(|e| e.status(&self.budget)).collect()
    }

    /// What the node advertises.
    pub fn digests(&self) -> Vec<RuntimeStatus> {
        self.entries.iter().take(MAX_RUNTIMES).map(|e| e.status(&self.budget).digest()).collect()
    }
}

fn prune(entry: &mut Entry, budget: &RuntimeBudget, now: u64) {
    while entry.faults.front().is_some_and(|t| t + budget.window_ms <= now) {
        entry.faults.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtimes::{MAX_ERROR, MAX_LISTED_KINDS, fits_an_advert};

    fn runtimes() -> Runtimes {
        let decls = vec![
            RuntimeDecl { id: "builtin".into(), kinds: vec!["echo".into()] },
            RuntimeDecl { id: "exec:ocr".into(), kinds: vec!["ocr".into()] },
        ];
        Runtimes::new(decls, RuntimeBudget { failures: 3, window_ms: 10_000, cooldown_ms: 5_000 })
    }

    fn health(r: &Runtimes, id: &str) -> RuntimeHealth {
        r.statuses().into_iter().find(|s| s.id == id).map(|s| s.health).expect("runtime")
    }

    #[test]
    fn faults_past_the_budget_quarantine_and_the_cool_down_ends_it() {
        let mut r = runtimes();
        assert_eq!(
            r.finished("ocr", Some("spawn_failed"), 1_000).map(|s| s.health),
            Some(RuntimeHealth::Degraded)
        );
        assert_eq!(r.finished("ocr", Some("spawn_failed"), 2_000), None);
        let down = r.finished("ocr", Some("spawn_failed"), 3_000).expect("changed");
        assert_eq!(down.health, RuntimeHealth::Down);
        assert_eq!(down.quarantined_until_ms, Some(8_000));
        assert_eq!(down.status(4_000), "quarantined, 4 s left (last: spawn_failed)");
        assert_eq!(r.quarantined(), vec!["ocr".to_owned()]);
        assert_eq!(health(&r, "builtin"), RuntimeHealth::Ready, "the others are untouched");
        assert_eq!(r.next_deadline(), Some(8_000));
        assert!(r.tick(7_999).is_empty());
        let back = r.tick(8_000);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].health, RuntimeHealth::Degraded);
        assert!(r.quarantined().is_empty());
        assert_eq!(r.finished("ocr", None, 8_500).map(|s| s.health), Some(RuntimeHealth::Ready));
    }

    #[test]
    fn a_fault_on_probation_quarantines_again_for_twice_as_long() {
        let mut r = runtimes();
        for t in [1, 2, 3] {
            r.finished("ocr", Some("exit 1"), t);
        }
        r.tick(5_003);
        let again = r.finished("ocr", Some("exit 1"), 5_100).expect("changed");
        assert_eq!(again.health, RuntimeHealth::Down);
        assert_eq!(again.quarantined_until_ms, Some(15_100));
        assert_eq!(again.quarantines, 2);
        r.tick(15_100);
        r.finished("ocr", None, 15_200);
        for t in [16_000, 16_001, 16_002] {
            r.finished("ocr", Some("exit 1"), t);
        }
        let s = r.statuses().into_iter().find(|s| s.id == "exec:ocr").expect("ocr");
        assert_eq!(s.quarantined_until_ms, Some(21_002), "a good run resets the back-off");
    }

    #[test]
    fn old_faults_leave_the_window_and_the_runtime_is_ready_again() {
        let mut r = runtimes();
        r.finished("ocr", Some("timeout"), 1_000);
        assert_eq!(r.next_deadline(), Some(11_000));
        r.finished("ocr", Some("timeout"), 9_000);
        assert_eq!(r.tick(11_000), vec![]);
        let ready = r.tick(19_000);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].health, RuntimeHealth::Ready);
        assert_eq!(r.finished("ocr", Some("timeout"), 20_000).map(|s| s.failures), Some(1));
    }

    #[test]
    fn runs_of_unknown_kinds_and_faults_while_quarantined_change_nothing() {
        let mut r = runtimes();
        assert_eq!(r.finished("nope", Some("x"), 1), None);
        for t in [1, 2, 3] {
            r.finished("ocr", Some("x"), t);
        }
        assert_eq!(r.finished("ocr", Some("late"), 4), None, "a run begun before the quarantine");
        assert_eq!(r.statuses()[1].quarantined_until_ms, Some(5_003));
    }

    #[test]
    fn digests_fit_an_advert() {
        let decl =
            RuntimeDecl { id: "builtin".into(), kinds: (0..9).map(|i| format!("k{i}")).collect() };
        let mut r = Runtimes::new(vec![decl; 9], RuntimeBudget::default());
        r.finished("k0", Some(&"é".repeat(200)), 1);
        let digests = r.digests();
        assert_eq!(digests.len(), MAX_RUNTIMES);
        assert!(digests.iter().all(|d| d.kinds.len() == MAX_LISTED_KINDS));
        assert!(digests[0].last_error.as_ref().is_some_and(|e| e.len() <= MAX_ERROR));
        assert!(fits_an_advert(&digests));
        assert!(!fits_an_advert(&r.statuses()), "nine runtimes of nine kinds do not fit");
        let mut long = digests.clone();
        long[0].last_error = Some("x".repeat(MAX_ERROR + 1));
        assert!(!fits_an_advert(&long));
    }
}
