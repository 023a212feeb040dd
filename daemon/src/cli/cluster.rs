//! `arw-cli state cluster`: the table of reference §3.2.

use std::fmt::{Display, Write as _};

use arw_api::dto::{ClusterNode, ClusterView};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;

const WIDTHS: [usize; 6] = [20, 10, 10, 32, 6, 8];
const CAPS_WIDTH: usize = 40;
const DASH: &str = "—";

/// Renders a `/state/cluster` body as text at `now_ms`, with times in `tz`, in the reference
/// layout (fixed widths, long cells cut).
pub fn render<Tz: TimeZone>(view: &ClusterView, now_ms: i64, tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    render_as(view, now_ms, tz, false)
}

/// [`render`], or with `wide` every column as wide as its longest cell and nothing cut.
pub fn render_as<Tz: TimeZone>(view: &ClusterView, now_ms: i64, tz: &Tz, wide: bool) -> String
where
    Tz::Offset: Display,
{
    let mut out = String::from("Cluster snapshot\n");
    let generated = view
        .generated_ms
        .and_then(|ms| local_time(i64::try_from(ms).ok()?, tz))
        .or_else(|| view.generated.clone())
        .unwrap_or_else(|| DASH.to_owned());
    let ttl = view.ttl_seconds.unwrap_or(0);
    let nodes = &view.nodes;
    let _ = writeln!(out, "  Generated : {generated}");
    let _ = writeln!(
        out,
        "  TTL       : {}",
        if ttl == 0 { DASH.to_owned() } else { format!("{ttl}s") }
    );
    let _ = writeln!(out, "  Nodes     : {}", nodes.len());
    out.push('\n');
    if nodes.is_empty() {
        out.push_str("  (no nodes advertised)\n");
        return out;
    }
    let header = ["ID", "Role", "Health", "Last Seen", "Stale", "Models"].map(String::from);
    let rows: Vec<([String; 6], String)> = nodes
        .iter()
        .map(|node| {
            let cells = [
                id_cell(node),
                node.role.to_lowercase(),
                node.health.clone().unwrap_or_else(|| DASH.to_owned()),
                last_seen(node, now_ms, tz),
                stale(node, ttl, now_ms).to_owned(),
                models(node.models.as_ref()),
            ];
            (cells, capabilities_as(node.capabilities.as_ref(), wide))
        })
        .collect();
    let widths = if wide {
        std::array::from_fn(|i| {
            let longest = rows.iter().map(|(c, _)| c[i].chars().count()).max().unwrap_or(0);
            longest.max(header[i].chars().count())
        })
    } else {
        WIDTHS
    };
    row(&mut out, &header, "Capabilities", widths, wide);
    for (cells, caps) in &rows {
        row(&mut out, cells, caps, widths, wide);
    }
    out
}

fn row(out: &mut String, cells: &[String; 6], last: &str, widths: [usize; 6], wide: bool) {
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        // The Stale column is never truncated.
        let cell = if i == 4 || wide { cell.clone() } else { truncate(cell, width) };
        let _ = write!(out, "{cell:<width$} ");
    }
    let last = if wide { last.to_owned() } else { truncate(last, CAPS_WIDTH) };
    let _ = writeln!(out, "{last}");
}

/// Cuts `s` to `width` characters, the last one `…`.
pub fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn local_time<Tz: TimeZone>(ms: i64, tz: &Tz) -> Option<String>
where
    Tz::Offset: Display,
{
    let utc: DateTime<Utc> = DateTime::from_timestamp_millis(ms)?;
    Some(utc.with_timezone(tz).format("%Y-%m-%d %H:%M:%S %Z").to_string())
}

fn id_cell(node: &ClusterNode) -> String {
    match node.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => format!("{} ({name})", node.id),
        None => node.id.clone(),
    }
}

/// `last_seen_ms` as a signed time (0 when absent).
fn seen_ms(node: &ClusterNode) -> i64 {
    node.last_seen_ms.and_then(|ms| i64::try_from(ms).ok()).unwrap_or(0)
}

fn last_seen<Tz: TimeZone>(node: &ClusterNode, now_ms: i64, tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let ms = seen_ms(node);
    let base = (ms > 0)
        .then(|| local_time(ms, tz))
        .flatten()
        .or_else(|| node.last_seen.clone())
        .unwrap_or_else(|| DASH.to_owned());
    if ms <= 0 {
        return base;
    }
    let delta = now_ms - ms;
    let span = human_span(delta.unsigned_abs() / 1000);
    if delta >= 0 { format!("{base} ({span} ago)") } else { format!("{base} (in {span})") }
}

/// The largest non-zero unit of d, h, m, s.
fn human_span(secs: u64) -> String {
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= size {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// `yes` past the TTL, as the reference computes it client-side, and also when the node itself
/// judged the row `stale` (the reference ignored that, so a row could read `stale` and `no`).
fn stale(node: &ClusterNode, ttl: u64, now_ms: i64) -> &'static str {
    if node.health.as_deref() == Some("stale") {
        return "yes";
    }
    let ms = seen_ms(node);
    if ttl == 0 || ms == 0 {
        return "no";
    }
    let ttl_ms = i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX);
    if now_ms - ms > ttl_ms { "yes" } else { "no" }
}

fn models(models: Option<&Value>) -> String {
    let Some(models) = models else { return DASH.to_owned() };
    match models {
        Value::Number(n) => n.to_string(),
        Value::Object(m) => {
            let count = m.get("count").map_or_else(|| DASH.to_owned(), Value::to_string);
            let preview: Vec<&str> = m
                .get("preview")
                .and_then(Value::as_array)
                .map(|p| p.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if preview.is_empty() {
                return count;
            }
            let mut shown: Vec<String> =
                preview.iter().take(2).map(|h| h.chars().take(8).collect()).collect();
            if preview.len() > 2 {
                shown.push("…".into());
            }
            format!("{count} ({})", shown.join(","))
        }
        _ => DASH.to_owned(),
    }
}

/// The Capabilities cell: at most three keys or items, or with `all` every one.
fn capabilities_as(caps: Option<&Value>, all: bool) -> String {
    let Some(caps) = caps else { return DASH.to_owned() };
    let (mut items, total): (Vec<String>, usize) = match caps {
        Value::Object(m) => {
            let mut keys: Vec<String> = m.keys().cloned().collect();
            keys.sort();
            let total = keys.len();
            (keys, total)
        }
        Value::Array(a) => {
            let items: Vec<String> =
                a.iter().filter_map(Value::as_str).map(str::to_owned).collect();
            let total = items.len();
            (items, total)
        }
        Value::String(s) if !s.is_empty() => return s.clone(),
        _ => return DASH.to_owned(),
    };
    if total == 0 {
        return DASH.to_owned();
    }
    if !all {
        items.truncate(3);
        if total > 3 {
            items.push("…".into());
        }
    }
    items.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;
    use serde_json::json;

    const NOW: i64 = 1_760_623_205_000; // 2025-10-16 14:00:05 UTC

    #[test]
    fn matches_the_reference_layout() {
        let view = json!({
            "nodes": [{
                "id": "worker-gpu-01", "role": "Edge", "health": "ok",
                "capabilities": {"os": "linux", "arch": "x86_64", "arw_version": "0.2.0-dev", "declared": []},
                "models": {"count": 3, "preview": ["abcdef0123", "bcdef01234", "cdef012345"]},
                "last_seen_ms": NOW - 124_000,
            }],
            "generated_ms": NOW, "ttl_seconds": 360,
        });
        let utc = FixedOffset::east_opt(0).expect("utc");
        let text = render(&serde_json::from_value(view).expect("a cluster view"), NOW, &utc);
        let want = "Cluster snapshot\n  Generated : 2025-10-16 14:00:05 +00:00\n  TTL       : 360s\n  Nodes     : 1\n\n\
ID                   Role       Health     Last Seen                        Stale  Models   Capabilities\n\
worker-gpu-01        edge       ok         2025-10-16 13:58:01 +00:00 (2m … no     3 (abcd… arch,arw_version,declared,…\n";
        assert_eq!(text, want);
    }

    #[test]
    fn stale_markers_and_future_times() {
        let view = json!({
            "nodes": [
                {"id": "old", "role": "edge", "last_seen_ms": NOW - 361_000},
                {"id": "ahead", "role": "edge", "last_seen_ms": NOW + 7_200_000},
                {"id": "never", "role": "edge"},
                {"id": "judged", "role": "edge", "health": "stale", "last_seen_ms": NOW - 1_000},
            ],
            "ttl_seconds": 360,
        });
        let utc = FixedOffset::east_opt(0).expect("utc");
        let text = render(&serde_json::from_value(view).expect("a cluster view"), NOW, &utc);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with(DASH), "{text}");
        assert!(lines[6].contains("13:54:04 +00:00 (6m …") && lines[6].contains(" yes "), "{text}");
        assert!(lines[7].contains("16:00:05 +00:00 (in …") && lines[7].contains(" no "), "{text}");
        assert!(lines[8].contains(" —  ") && lines[8].contains(" no "), "{text}");
        // The node's own verdict counts: never `stale` and `no` in one row.
        assert!(lines[9].contains(" stale ") && lines[9].contains(" yes "), "{text}");
    }

    #[test]
    fn relative_times_use_the_largest_unit() {
        assert_eq!(human_span(0), "0s");
        assert_eq!(human_span(59), "59s");
        assert_eq!(human_span(3_599), "59m");
        assert_eq!(human_span(7_200), "2h");
        assert_eq!(human_span(200_000), "2d");
    }

    #[test]
    fn empty_cluster() {
        let utc = FixedOffset::east_opt(0).expect("utc");
        let view = serde_json::from_value(json!({"nodes": [], "ttl_seconds": 0})).expect("view");
        let text = render(&view, NOW, &utc);
        assert!(
            text.ends_with("  TTL       : —\n  Nodes     : 0\n\n  (no nodes advertised)\n"),
            "{text}"
        );
    }

    #[test]
    fn truncation_counts_characters() {
        let long = "ñ".repeat(30);
        let cut = truncate(&long, 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", 20), "short");
    }

    #[test]
    fn wide_shows_every_cell_whole() {
        let utc = chrono::Utc;
        let view = serde_json::json!({"nodes":[{"id":"worker-gpu-01-with-a-long-name","role":"edge",
            "health":"ok","last_seen_ms": NOW - 47_000,
            "capabilities":{"arch":"x","arw_version":"y","cpu":{},"declared":[],"gpus":[]}}],
            "generated_ms": NOW, "ttl_seconds": 360});
        let view: ClusterView = serde_json::from_value(view).expect("a cluster view");
        let narrow = render(&view, NOW, &utc);
        assert!(
            !narrow.contains("(47s ago)") && narrow.contains("worker-gpu-01-with-…"),
            "{narrow}"
        );
        let wide = render_as(&view, NOW, &utc, true);
        assert!(wide.contains("(47s ago)"), "{wide}");
        assert!(wide.contains("worker-gpu-01-with-a-long-name "), "{wide}");
        assert!(wide.trim_end().ends_with("arch,arw_version,cpu,declared,gpus"), "{wide}");
    }
}
