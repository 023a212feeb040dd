//! `arw-connector`: sample task worker and completion relay on NATS. See `arw-connector --help`.

use std::{process::ExitCode, time::Duration};

use clap::Parser;

use arw_daemon::connector::{self, ConnectorConfig};
use arw_p2p::{nats::NatsConfig, node_id::NodeId};

/// Bridges an ARW installation to a NATS broker, in two roles at once:
///
/// Worker: takes tasks from `arw.tasks` in queue group ARW_GROUP (one member of the group gets each
/// task), runs the sample tools `math.add {a,b}` → `{sum}` and `time.now` → `{now_ms}` (anything
/// else completes with ok:false), and publishes `task.completed` with its node_id on
/// `arw.events.node.<node_id>.task.completed` and `arw.events.task.completed`.
///
/// Relay: mirrors the completions arw-server nodes publish on `arw.events.node.<id>.task.completed`
/// onto the cluster-wide `arw.events.task.completed` (once per completion, whatever the number of
/// connectors).
///
/// Example: ARW_NODE_ID=connector-01 ARW_NATS_URL=nats://broker:4222 ARW_GROUP=workers arw-connector
#[derive(Debug, Parser)]
#[command(name = "arw-connector", version, about, long_about)]
struct Args {
    /// Node id used in completions and subjects.
    #[arg(long, env = "ARW_NODE_ID", default_value = "connector")]
    node_id: String,
    /// Broker URL.
    #[arg(long, env = "ARW_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Queue group on arw.tasks.
    #[arg(long, env = "ARW_GROUP", default_value = "workers")]
    group: String,
    /// Use TLS (rewrites nats:// to tls://).
    #[arg(long, env = "ARW_NATS_TLS", value_parser = clap::builder::FalseyValueParser::new())]
    tls: bool,
    /// User name, when the URL carries none.
    #[arg(long, env = "ARW_NATS_USER")]
    user: Option<String>,
    /// Password, when the URL carries none.
    #[arg(long, env = "ARW_NATS_PASS", hide_env_values = true)]
    pass: Option<String>,
    /// Connection attempts at start before connecting in the background.
    #[arg(long, env = "ARW_NATS_CONNECT_RETRIES", default_value_t = 3)]
    connect_retries: u32,
    /// Delay between them, in milliseconds.
    #[arg(long, env = "ARW_NATS_CONNECT_BACKOFF_MS", default_value_t = 500)]
    connect_backoff_ms: u64,
    /// Log filter.
    #[arg(long, env = "ARW_LOG", default_value = "info,async_nats=warn")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    arw_daemon::process::init_tracing(&args.log);
    let node_id = match NodeId::parse(&args.node_id) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("arw-connector: ARW_NODE_ID: {e}");
            return ExitCode::from(64);
        }
    };
    let config = ConnectorConfig {
        node_id,
        group: args.group,
        nats: NatsConfig {
            url: args.nats_url,
            tls: args.tls,
            user: args.user,
            pass: args.pass,
            connect_retries: args.connect_retries,
            connect_backoff: Duration::from_millis(args.connect_backoff_ms),
            name: "arw-connector".into(),
        },
    };
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("arw-connector: cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            arw_daemon::process::shutdown_signal().await;
            stop.cancel();
        });
        match connector::run(config, cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("arw-connector: {e}");
                ExitCode::from(64)
            }
        }
    })
}
