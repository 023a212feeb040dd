//! `arw-simnet`: run a scenario and report what it measured. See `arw-simnet --help`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use arw_simnet::{report::Report, run, scenario::Scenario};

/// Runs many federation nodes at once and measures convergence, failure detection and cost.
///
/// Tiers: `virtual` (the protocol core on a simulated network in virtual time, deterministic,
/// 20 to 1,000+ nodes), `stack` (real node actors over loopback libp2p in this process, up to
/// ~100), `lan` (arw-server processes in network namespaces with mDNS; needs root).
///
/// Example: arw-simnet run simnet/scenarios/crash-detection-100-virtual.toml --json out.json
#[derive(Debug, Parser)]
#[command(name = "arw-simnet", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario file; print a table, optionally write JSON and an SVG CDF.
    ///
    /// Example: arw-simnet run simnet/scenarios/convergence-1000-virtual.toml --seed 7 --json r.json --svg cdf.svg
    Run {
        /// The scenario (TOML).
        scenario: PathBuf,
        /// Base seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the convergence CDF as SVG here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Check scenario files without running them.
    ///
    /// Example: arw-simnet check simnet/scenarios/*.toml
    Check {
        /// Scenario files.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("ARW_LOG").unwrap_or_else(|_| "warn,libp2p_kad=error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    match cli.command {
        Command::Check { scenarios } => {
            let mut ok = true;
            for path in scenarios {
                match Scenario::load(&path) {
                    Ok(s) => println!(
                        "{}: ok ({} tier, {} nodes)",
                        path.display(),
                        s.tier.as_str(),
                        s.nodes
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::from(64) }
        }
        Command::Run { scenario, seed, json, svg } => {
            let s = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("arw-simnet: {e}");
                    return ExitCode::from(64);
                }
            };
            let report = match run::run(&s, seed.unwrap_or(s.seed)) {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("arw-simnet: {e}");
                    return ExitCode::FAILURE;
                }
            };
            print!("{}", report.table());
            write_outputs(&report, json, svg)
        }
    }
}

fn write_outputs(report: &Report, json: Option<PathBuf>, svg: Option<PathBuf>) -> ExitCode {
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("arw-simnet: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = svg {
        match report.convergence_svg() {
            Some(text) => {
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("arw-simnet: {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            None => eprintln!("arw-simnet: no convergence samples; no SVG written"),
        }
    }
    ExitCode::SUCCESS
}
