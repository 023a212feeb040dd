//! Runs a scenario on its tier, with a progress bar on long runs.

use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    report::Report,
    scenario::{Scenario, Tier},
};

/// Runs every trial of `s` with base seed `seed`.
pub fn run(s: &Scenario, seed: u64) -> Result<Report, String> {
    let bar = ProgressBar::new(s.trials as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} trials, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{} ({})", s.name, s.tier.as_str()));
    let mut progress = |done: usize| bar.set_position(done as u64);
    let report = match s.tier {
        Tier::Virtual => Ok(crate::sim::run(s, seed, &mut progress)),
        Tier::Stack => crate::stack::run(s, seed, &mut progress),
        Tier::Lan => crate::lan::run(s, seed, &mut progress),
    };
    bar.finish_and_clear();
    report
}
