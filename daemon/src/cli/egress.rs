//! `arw-cli state egress`: per-node totals (who contributed what), then the newest rows.

use std::fmt::Write as _;

use arw_api::egress::EgressView;

use super::cluster::truncate;

/// Totals per node, then one line per row, newest first.
pub fn render(view: &EgressView) -> String {
    let mut out = String::new();
    if view.totals.is_empty() {
        return "no egress recorded\n".into();
    }
    let _ = writeln!(
        out,
        "{:<20} {:>8} {:>9} {:>10} {:>12} {:>12} {:>8} {:>6}",
        "Node", "Offloads", "Completed", "Run (s)", "Job out", "Job in", "Requests", "Denied"
    );
    for t in &view.totals {
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>9} {:>10.1} {:>12} {:>12} {:>8} {:>6}",
            truncate(&t.node_id, 20),
            t.offloads,
            t.completed,
            t.run_ms as f64 / 1000.0,
            t.job_bytes_out,
            t.job_bytes_in,
            t.requests,
            t.denied
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:<20} {:<38} {:>10} {:>10}  Outcome / reason",
        "Time", "Decision", "Node", "Job / destination", "Bytes out", "Bytes in"
    );
    for i in &view.items {
        let what = match (&i.dest_host, i.dest_port, &i.job_id) {
            (Some(host), Some(port), _) => format!("{host}:{port}"),
            (_, _, Some(job)) => format!("{} {job}", i.kind.as_deref().unwrap_or("")),
            _ => "—".to_owned(),
        };
        let note = i.outcome.iter().chain(&i.reason).cloned().collect::<Vec<_>>().join(": ");
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<20} {:<38} {:>10} {:>10}  {}",
            i.time,
            i.decision,
            truncate(&i.node_id, 20),
            truncate(what.trim(), 38),
            i.bytes_out,
            i.bytes_in,
            if note.is_empty() { "—" } else { &note }
        );
    }
    out
}
