//! `arw-server`: one federation node. See `arw-server --help`.

use std::process::ExitCode;

use clap::Parser;

use arw_daemon::{config, server};

/// Runs an ARW federation node: the HTTP admin API on 127.0.0.1:8091 by default.
///
/// Configuration: built-in defaults, then ARW_CONFIG or configs/default.toml (under ARW_CONFIG_DIR,
/// the executable's directory, its parent, or the working directory), then
/// ${ARW_STATE_DIR}/config.toml, then ARW_* environment variables (ARW_PORT, ARW_BIND,
/// ARW_NODE_ID, ARW_STATE_DIR, ARW_ADMIN_TOKEN, ARW_ADMIN_TOKEN_SHA256, ARW_LOG, ARW_NATS_URL).
///
/// With no admin token configured and a loopback bind, a token is generated into
/// ${ARW_STATE_DIR}/admin-token. Once listening, the node writes ${ARW_STATE_DIR}/endpoints.json.
///
/// Example: ARW_PORT=0 ARW_STATE_DIR=/tmp/arw-a arw-server
#[derive(Debug, Parser)]
#[command(name = "arw-server", version, about, long_about)]
struct Args {
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
    /// Start under a new node key although the state directory holds state of another one
    /// (node.key was lost). Other nodes see a new member; a Home must admit it again.
    #[arg(long)]
    new_identity: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut loaded = match config::load(&config::Environment::from_process()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("arw-server: {e}");
            return ExitCode::from(config::EXIT_CONFIG as u8);
        }
    };
    loaded.new_identity = args.new_identity;
    arw_daemon::process::init_tracing(&loaded.config.log.filter);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    if args.check_config {
        print!("{}", arw_daemon::process::describe_config(&loaded));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arw-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(loaded, arw_daemon::process::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("arw-server: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
