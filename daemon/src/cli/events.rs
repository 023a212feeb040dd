//! `arw-cli events tail`: follow `/events`, resuming with `Last-Event-ID` after any drop.

use std::{io::Write, time::Duration};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use arw_api::dto::{Envelope, Handshake};

use super::{CliError, Client, cluster::truncate};

/// What to follow and how to print it.
#[derive(Debug, Clone)]
pub struct Tail {
    /// `prefix=` CSV.
    pub prefix: Option<String>,
    /// Start after this id (default: live only).
    pub after: Option<i64>,
    /// Print each event as one JSON object (with its `id`).
    pub json: bool,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the stream until interrupted. Returns only on an error that retrying cannot fix.
pub async fn tail(client: &Client, tail: Tail) -> Result<String, CliError> {
    let path = match &tail.prefix {
        Some(p) => format!("/events?prefix={}", urlencode(p)),
        None => "/events".to_owned(),
    };
    let url = client.url(&path);
    let mut last_id = tail.after;
    let mut backoff = Duration::from_millis(250);
    loop {
        let mut request = client.request(Method::GET, &path);
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                backoff = Duration::from_millis(250);
                let mut events = response.bytes_stream().eventsource();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { break };
                    let row = row_id(&event.id);
                    let control = if row.is_some() { "" } else { event.event.as_str() };
                    match control {
                        "service.connected" => match handshake(&event.data) {
                            Some(h) => {
                                eprintln!(
                                    "connected to {url} (replay {} {})",
                                    h.replay.mode, h.replay.count
                                );
                                if h.truncated {
                                    eprintln!(
                                        "note: events older than id {} were pruned; some were missed",
                                        h.oldest_id
                                    );
                                }
                            }
                            None => eprintln!("connected to {url}"),
                        },
                        "service.lagged" => {
                            eprintln!("fell behind the live stream; resuming from the journal");
                            break;
                        }
                        _ => {
                            last_id = row.or(last_id);
                            let line = render(&event.data, last_id, tail.json);
                            if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
                                // The reader went away (`| head`): done, quietly.
                                if e.kind() == std::io::ErrorKind::BrokenPipe {
                                    return Ok(String::new());
                                }
                                return Err(CliError(format!("cannot write: {e}")));
                            }
                        }
                    }
                }
                eprintln!("stream ended; reconnecting");
            }
            Ok(response)
                if response.status() == StatusCode::UNAUTHORIZED
                    || response.status().is_client_error() =>
            {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                super::client::check_status(&url, status, &body)?;
            }
            Ok(response) => eprintln!("request to {url} failed ({}); retrying", response.status()),
            Err(e) => {
                eprintln!("{}; retrying in {backoff:?}", super::client::unreachable(&url, &e).0)
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The journal row of an SSE frame. Journaled events carry their row id; the stream's own
/// frames (`service.connected`, `service.lagged`) carry none, or 0: only those may steer the
/// stream, whatever kind a journaled event claims to be.
fn row_id(id: &str) -> Option<i64> {
    id.parse::<i64>().ok().filter(|id| *id > 0)
}

/// The handshake's payload, when the server sent one this CLI understands.
fn handshake(data: &str) -> Option<Handshake> {
    let envelope: Envelope = serde_json::from_str(data).ok()?;
    serde_json::from_value(envelope.payload).ok()
}

/// One event as a line (or, with `json`, as its envelope with its `id`); data that is not an
/// envelope is printed as it came.
fn render(data: &str, id: Option<i64>, json: bool) -> String {
    let Ok(envelope) = serde_json::from_str::<Envelope>(data) else {
        return data.to_owned();
    };
    if json {
        let mut value = serde_json::to_value(&envelope).unwrap_or_default();
        if let (Value::Object(map), Some(id)) = (&mut value, id) {
            map.insert("id".into(), id.into());
        }
        return value.to_string();
    }
    format!(
        "{}  {:<28}  {:<16}  {}",
        envelope.time,
        envelope.kind,
        envelope.origin.as_deref().unwrap_or("-"),
        truncate(&envelope.payload.to_string(), 120)
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_json() {
        let data = r#"{"time":"2025-10-16T12:00:00.123Z","kind":"service.test","origin":"n1","payload":{"a":1}}"#;
        let line = render(data, Some(7), false);
        assert!(line.starts_with("2025-10-16T12:00:00.123Z  service.test"), "{line}");
        assert!(line.ends_with(r#"n1                {"a":1}"#), "{line}");
        let json: Value = serde_json::from_str(&render(data, Some(7), true)).expect("json");
        assert_eq!(json["id"], 7);
        assert_eq!(urlencode("cluster.,a b"), "cluster.,a%20b");
    }

    #[test]
    fn only_the_stream_s_own_frames_steer_it() {
        assert_eq!(row_id(""), None, "service.lagged closes the stream with no id");
        assert_eq!(row_id("0"), None, "the handshake");
        assert_eq!(row_id("41"), Some(41), "a journaled event, whatever its kind");
        assert_eq!(row_id("x"), None);
    }
}
