//! `arw-cli capsule`: hold, inspect, sign and verify gating capsules.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use clap::Subcommand;
use serde_json::{Value, json};

use arw_api::dto::{Adopted, CapsulesView, TornDown};
use arw_p2p::{
    capsule::{self, Capsule, TrustStore},
    time::now_ms,
};

use super::{CliError, Client, cluster::truncate, json_text};

#[derive(Debug, Subcommand)]
pub enum CapsuleCommand {
    /// Capsules the node holds, with lease status.
    ///
    /// Example: arw-cli capsule status --base http://127.0.0.1:8091
    Status {
        /// Print the /state/policy/capsules body as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create an ed25519 signing key for capsules and print its trust-store entry.
    ///
    /// The secret (base64) is written to FILE with mode 0600; an existing file is never
    /// overwritten. Add the printed entry to the trust store's "issuers" on every node.
    ///
    /// Example: arw-cli capsule keygen ~/.config/arw/capsule.key --issuer local-admin
    Keygen {
        /// Where to write the secret key.
        file: PathBuf,
        /// Issuer id for the trust-store entry.
        #[arg(long, default_value = "local-admin")]
        issuer: String,
    },
    /// Sign a capsule (a JSON file, or - for stdin) and print it, signature included.
    ///
    /// Sets "issuer" and signs the canonical form: the JSON without "signature", keys sorted at
    /// every depth, written compactly.
    ///
    /// Example: arw-cli capsule sign-ed25519 capsule.json --key-file capsule.key > signed.json
    #[command(name = "sign-ed25519")]
    SignEd25519 {
        /// The capsule JSON file, or - for stdin.
        file: PathBuf,
        /// The secret key file written by `capsule keygen` (base64 of 32 bytes).
        #[arg(long)]
        key_file: PathBuf,
        /// Issuer id, as listed in the trust store.
        #[arg(long, default_value = "local-admin")]
        issuer: String,
    },
    /// Check a capsule against a trust store file, offline, as a node would.
    ///
    /// Example: arw-cli capsule verify signed.json --trust configs/trust_capsules.json
    Verify {
        /// The capsule JSON file, or - for stdin.
        file: PathBuf,
        /// The trust store.
        #[arg(long)]
        trust: PathBuf,
    },
    /// Present a capsule (file or preset) to the node: adopted, or its lease renewed.
    ///
    /// Example: arw-cli capsule adopt signed.json --reason "lock egress"
    Adopt {
        /// The capsule JSON file, or - for stdin.
        #[arg(required_unless_present = "preset", conflicts_with = "preset")]
        file: Option<PathBuf>,
        /// A preset id from /admin/policy/capsules/presets instead of a file.
        #[arg(long)]
        preset: Option<String>,
        /// Why (recorded in the events).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove capsules by id, or all of them.
    ///
    /// Example: arw-cli capsule teardown capsule.strict-egress --dry-run
    Teardown {
        /// Capsule ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Remove every capsule.
        #[arg(long)]
        all: bool,
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Why (recorded in the events).
        #[arg(long)]
        reason: Option<String>,
    },
}

impl CapsuleCommand {
    /// Whether the command talks to a server.
    pub fn needs_server(&self) -> bool {
        !matches!(self, Self::Keygen { .. } | Self::SignEd25519 { .. } | Self::Verify { .. })
    }
}

/// Runs a capsule command; `client` is `None` for the offline ones.
pub async fn run(command: CapsuleCommand, client: Option<Client>) -> Result<String, CliError> {
    let server = || client.clone().ok_or_else(|| CliError("no server connection".into()));
    match command {
        CapsuleCommand::Status { json } => {
            if json {
                let body: Value = server()?.get("/state/policy/capsules").await?;
                return Ok(json_text(&body, false));
            }
            Ok(status_table(&server()?.get("/state/policy/capsules").await?))
        }
        CapsuleCommand::Keygen { file, issuer } => keygen(&file, &issuer),
        CapsuleCommand::SignEd25519 { file, key_file, issuer } => {
            let mut value = read_json(&file)?;
            let key = read_key(&key_file)?;
            capsule::sign_ed25519(&mut value, &issuer, &key)
                .map_err(|e| CliError(e.to_string()))?;
            Ok(json_text(&value, true))
        }
        CapsuleCommand::Verify { file, trust } => {
            let capsule =
                Capsule::from_json(read_json(&file)?).map_err(|e| CliError(e.to_string()))?;
            let store = TrustStore::load(&trust).map_err(CliError)?;
            if store.is_empty() {
                return Err(CliError(format!(
                    "{}: no issuers (missing or empty)",
                    trust.display()
                )));
            }
            store.verify(&capsule, now_ms()).map_err(|e| CliError(e.to_string()))?;
            Ok(format!(
                "valid: {} signed by {}\n",
                capsule.fields.id,
                capsule.fields.issuer.as_deref().unwrap_or("?")
            ))
        }
        CapsuleCommand::Adopt { file, preset, reason } => {
            let body = match (file, preset) {
                (Some(file), _) => json!({ "capsule": read_json(&file)?, "reason": reason }),
                (None, preset) => json!({ "preset_id": preset, "reason": reason }),
            };
            let answer: Adopted = server()?.post("/admin/policy/capsules/adopt", &body).await?;
            let item = &answer.snapshot;
            Ok(format!(
                "{} adopted ({}{})\n",
                answer.capsule_id,
                item.status,
                item.lease_until.as_ref().map(|t| format!(", lease until {t}")).unwrap_or_default()
            ))
        }
        CapsuleCommand::Teardown { ids, all, dry_run, reason } => {
            let body = json!({ "ids": ids, "all": all, "dry_run": dry_run, "reason": reason });
            let answer: TornDown = server()?.post("/admin/policy/capsules/teardown", &body).await?;
            let mut out = String::new();
            let verb = if dry_run { "would remove" } else { "removed" };
            for item in &answer.removed {
                let _ = writeln!(out, "{verb} {}", item.id);
            }
            for id in &answer.not_found {
                let _ = writeln!(out, "not held: {id}");
            }
            let _ = writeln!(out, "{} capsule(s) held", answer.remaining);
            Ok(out)
        }
    }
}

fn status_table(body: &CapsulesView) -> String {
    let items = &body.items;
    if items.is_empty() {
        return "no capsules held\n".to_owned();
    }
    let mut out = format!(
        "{:<28} {:<13} {:<6} {:<24} {:<6} {}\n",
        "ID", "Status", "Source", "Lease Until", "Denies", "Issuer"
    );
    for item in items {
        let _ = writeln!(
            out,
            "{:<28} {:<13} {:<6} {:<24} {:<6} {}",
            truncate(&item.id, 28),
            item.status,
            item.source,
            item.lease_until.as_deref().unwrap_or("—"),
            item.denies,
            item.issuer.as_deref().unwrap_or("—"),
        );
    }
    out
}

fn read_json(file: &Path) -> Result<Value, CliError> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| CliError(format!("stdin: {e}")))?
    } else {
        std::fs::read_to_string(file).map_err(|e| CliError(format!("{}: {e}", file.display())))?
    };
    serde_json::from_str(&text).map_err(|e| CliError(format!("{}: not JSON: {e}", file.display())))
}

fn read_key(file: &Path) -> Result<ed25519_dalek::SigningKey, CliError> {
    let text =
        std::fs::read_to_string(file).map_err(|e| CliError(format!("{}: {e}", file.display())))?;
    let secret =
        B64.decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(
            || CliError(format!("{}: expected base64 of a 32-byte ed25519 secret", file.display())),
        )?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&secret))
}

fn keygen(file: &Path, issuer: &str) -> Result<String, CliError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| CliError(format!("no randomness: {e}")))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let mut options = std::fs::OpenOptions::new();
    // Never overwrite: an existing key may be the one every trust store lists.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(file).and_then(|mut f| {
        use std::io::Write;
        writeln!(f, "{}", B64.encode(secret))?;
        f.sync_all()
    });
    written.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            CliError(format!("{} exists; not overwritten", file.display()))
        }
        _ => CliError(format!("{}: {e}", file.display())),
    })?;
    let entry = json!({ "id": issuer, "alg": "ed25519", "key_b64": B64.encode(key.verifying_key().to_bytes()) });
    Ok(format!(
        "secret key written to {}\ntrust-store entry (add it under \"issuers\"):\n{}",
        file.display(),
        json_text(&entry, false)
    ))
}
