//! Process-level helpers shared by the binaries: logging, signals, `--check-config` output.

use std::fmt::Write as _;

use crate::config::Loaded;

/// Initialises `tracing` with the given filter (logs go to stderr).
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// The `--check-config` report: sources, state dir, then the effective TOML.
pub fn describe_config(loaded: &Loaded) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# effective arw-server configuration (secrets redacted)");
    let _ = writeln!(out, "# sources, later wins:");
    for source in &loaded.sources {
        let _ = writeln!(out, "#   {source}");
    }
    let _ = writeln!(out, "#   environment (ARW_*)");
    let _ = writeln!(out, "# state dir: {}", loaded.state_dir.display());
    for warning in &loaded.warnings {
        let _ = writeln!(out, "# warning: {warning}");
    }
    out.push('\n');
    out.push_str(&loaded.config.redacted_toml());
    out
}
