//! A minimal SSE reader for tests: frames as the server wrote them, comments included.

use std::time::Duration;

use serde_json::Value;

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `event:` / `id:` / `data:`.
    Event { event: String, id: Option<i64>, data: Value },
    /// A `:` comment line (keep-alive).
    Comment(String),
}

impl Frame {
    pub fn kind(&self) -> &str {
        match self {
            Frame::Event { event, .. } => event,
            Frame::Comment(_) => ":",
        }
    }

    pub fn id(&self) -> Option<i64> {
        match self {
            Frame::Event { id, .. } => *id,
            Frame::Comment(_) => None,
        }
    }

    pub fn data(&self) -> &Value {
        match self {
            Frame::Event { data, .. } => data,
            Frame::Comment(_) => &Value::Null,
        }
    }
}

pub struct Reader {
    response: reqwest::Response,
    buf: String,
}

impl Reader {
    /// Opens `GET {base}{path}` with the token and an optional `Last-Event-ID`.
    pub async fn open(
        client: &reqwest::Client,
        base: &str,
        path: &str,
        token: &str,
        last_id: Option<i64>,
    ) -> Self {
        let mut request = client.get(format!("{base}{path}")).bearer_auth(token);
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = tokio::time::timeout(Duration::from_secs(10), request.send())
            .await
            .expect("connect within 10 s")
            .expect("connect");
        assert_eq!(response.status(), 200, "GET {path}");
        Self { response, buf: String::new() }
    }

    /// The next frame; `None` at the end of the stream. Panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<Frame> {
        tokio::time::timeout(limit, self.next_inner()).await.expect("SSE frame within the limit")
    }

    /// The next event frame, skipping comments.
    pub async fn next_event(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Frame::Comment(_) => continue,
                frame => return Some(frame),
            }
        }
    }

    async fn next_inner(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(frame) = parse(&block) {
                    return Some(frame);
                }
                continue;
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

fn parse(block: &str) -> Option<Frame> {
    let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
    let mut comment = None;
    for line in block.lines() {
        if let Some(rest) = line.strip_prefix(':') {
            comment = Some(rest.to_owned());
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if data.is_empty() {
        return comment.map(Frame::Comment);
    }
    Some(Frame::Event {
        event,
        id,
        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
    })
}
