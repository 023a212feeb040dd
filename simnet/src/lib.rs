//! arw-simnet: runs many federation nodes at once to measure convergence, failure detection and
//! cost, on three tiers (see [`scenario::Tier`]).

mod jobs;
pub mod lan;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sim;
pub mod stack;
