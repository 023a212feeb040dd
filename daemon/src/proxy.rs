//! The egress proxy (`[egress] proxy`): a local HTTP proxy on loopback that the job programs
//! are pointed at (`http_proxy`, `https_proxy`, with the job's id and fence as credentials).
//! `CONNECT host:port` tunnels (HTTPS and anything else over TCP) and absolute-form `http://`
//! requests are allowed or denied by the node's policy, as any route is: a held capsule (or the
//! role) denying `net:<host>:<port>` or `net:<host>` refuses it with 403. Each request is
//! written to the egress ledger, when one is kept, with this node's id, the job, the
//! destination and the bytes each way.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_util::sync::CancellationToken;

use arw_p2p::{node::NodeHandle, time::now_ms};

use crate::egress::{Entry, Request};

/// Longest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Time to send a request head, and to reach the destination.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Connections proxied at once; more are answered 503.
const MAX_CONNECTIONS: usize = 256;
/// The longest a proxied connection lasts (a job's program is killed with its job; this bounds
/// what any other local client can hold).
const MAX_TUNNEL: Duration = Duration::from_secs(3_600);

/// Serves proxy connections on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    node: NodeHandle,
    ledger: Option<mpsc::UnboundedSender<Entry>>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (client, _) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "egress proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (node, ledger) = (node.clone(), ledger.clone());
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(client, "503 Service Unavailable", "too many connections"));
            continue;
        };
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = connection(client, &node, ledger.as_ref()) => {}
            }
            drop(slot);
        });
    }
}

/// A request head: where to, how, for which job, and the bytes to forward.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    host: String,
    port: u16,
    connect: bool,
    job_id: Option<String>,
    /// For `http`: the request to send on (origin-form, proxy headers removed).
    forward: Vec<u8>,
}

async fn connection(
    mut client: TcpStream,
    node: &NodeHandle,
    ledger: Option<&mpsc::UnboundedSender<Entry>>,
) {
    let started = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let head = match tokio::time::timeout(TIMEOUT, read_head(&mut client, &mut buf)).await {
        Ok(Ok(end)) => end,
        Ok(Err(why)) => return refuse(client, "400 Bad Request", why).await,
        Err(_) => return refuse(client, "408 Request Timeout", "no request head").await,
    };
    let rest = buf.split_off(head);
    let head = match parse(&buf) {
        Ok(head) => head,
        Err(why) => return refuse(client, "400 Bad Request", why).await,
    };
    let snapshot = node.snapshot();
    let node_id = snapshot.id.to_string();
    let record = |allowed: bool, reason: Option<String>, bytes: (u64, u64)| {
        if let Some(ledger) = ledger {
            let _ = ledger.send(Entry::Request(Request {
                time_ms: now_ms(),
                allowed,
                reason,
                node_id: node_id.clone(),
                host: head.host.clone(),
                port: head.port,
                protocol: if head.connect { "connect" } else { "http" },
                bytes_in: bytes.0,
                bytes_out: bytes.1,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                job_id: head.job_id.clone(),
            }));
        }
    };
    let keys = [format!("net:{}:{}", head.host, head.port), format!("net:{}", head.host)];
    if let Some(denied) = keys.iter().find_map(|k| arw_api::capsules::gate(&snapshot, k).err()) {
        let why = denied.detail.unwrap_or_else(|| "denied by policy".to_owned());
        tracing::info!(host = %head.host, port = head.port, job = ?head.job_id, "egress denied: {why}");
        record(false, Some(why.clone()), (0, 0));
        return refuse(client, "403 Forbidden", &why).await;
    }
    let target = (head.host.as_str(), head.port);
    let mut upstream = match tokio::time::timeout(TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            record(true, Some(format!("unreachable: {e}")), (0, 0));
            return refuse(client, "502 Bad Gateway", "destination unreachable").await;
        }
        Err(_) => {
            record(true, Some("unreachable: timed out".into()), (0, 0));
            return refuse(client, "504 Gateway Timeout", "destination did not answer").await;
        }
    };
    let mut sent = 0u64;
    let opened = if head.connect {
        client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await
    } else {
        sent += head.forward.len() as u64;
        upstream.write_all(&head.forward).await
    };
    if opened.is_err() {
        return record(true, Some("connection dropped".into()), (0, 0));
    }
    if !rest.is_empty() {
        sent += rest.len() as u64;
        if upstream.write_all(&rest).await.is_err() {
            return record(true, Some("connection dropped".into()), (0, sent));
        }
    }
    let relay = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let (reason, (out, back)) = match tokio::time::timeout(MAX_TUNNEL, relay).await {
        Ok(copied) => (None, copied.unwrap_or((0, 0))),
        Err(_) => (Some("cut after an hour".to_owned()), (0, 0)),
    };
    record(true, reason, (back, sent + out));
}

/// Reads until the end of the request head; returns where it ends in `buf`.
async fn read_head(client: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, &'static str> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(end + 4);
        }
        if buf.len() >= MAX_HEAD {
            return Err("request head too large");
        }
        let n = client.read(&mut chunk).await.map_err(|_| "connection failed")?;
        if n == 0 {
            return Err("connection closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a request head: `CONNECT host:port` or an absolute-form `http://` request.
fn parse(bytes: &[u8]) -> Result<Head, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("not an HTTP request"),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err("not an HTTP request");
    };
    let job_id = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|creds| creds.split_once(':').map(|(user, _)| user.to_owned()))
        .filter(|job| !job.is_empty() && job.len() <= 128);
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(target).ok_or("CONNECT needs host:port")?;
        return Ok(Head { host, port, connect: true, job_id, forward: Vec::new() });
    }
    let rest = target.strip_prefix("http://").ok_or("only http:// requests and CONNECT")?;
    let (authority_part, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority(authority_part) {
        Some(hp) => hp,
        None if !authority_part.is_empty() && !authority_part.contains(':') => {
            (authority_part.to_owned(), 80)
        }
        None => return Err("bad host in the request target"),
    };
    let version = if request.version == Some(0) { "HTTP/1.0" } else { "HTTP/1.1" };
    let mut forward = format!("{method} {path} {version}\r\n").into_bytes();
    for h in request.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        forward.extend_from_slice(h.name.as_bytes());
        forward.extend_from_slice(b": ");
        forward.extend_from_slice(h.value);
        forward.extend_from_slice(b"\r\n");
    }
    forward.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Head { host, port, connect: false, job_id, forward })
}

/// `host:port` (IPv6 in brackets) with a port that is a number.
fn authority(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c));
    ok.then(|| (host.to_ascii_lowercase(), port))
}

async fn refuse(mut client: TcpStream, status: &str, why: &str) {
    let body = format!("{why}\n");
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(reply.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// The proxy URL a job's program is given: its id and fence as the credentials.
pub fn url_for(addr: SocketAddr, job_id: &str, fence: u64) -> String {
    format!("http://{job_id}:{fence}@{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_absolute_form_requests_are_read() {
        let creds = base64::engine::general_purpose::STANDARD.encode("job-1:3");
        let head = format!(
            "CONNECT Example.COM:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic {creds}\r\n\r\n"
        );
        let connect = parse(head.as_bytes()).expect("connect");
        assert_eq!(
            (connect.host.as_str(), connect.port, connect.connect),
            ("example.com", 443, true)
        );
        assert_eq!(connect.job_id.as_deref(), Some("job-1"));

        let head = "GET http://127.0.0.1:8080/a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n";
        let get = parse(head.as_bytes()).expect("get");
        assert_eq!(
            (get.host.as_str(), get.port, get.connect, get.job_id),
            ("127.0.0.1", 8080, false, None)
        );
        let forward = String::from_utf8(get.forward).expect("utf8");
        assert_eq!(
            forward,
            "GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let plain = parse(b"GET http://example.org HTTP/1.1\r\nHost: example.org\r\n\r\n")
            .expect("port 80");
        assert_eq!((plain.host.as_str(), plain.port), ("example.org", 80));
    }

    #[test]
    fn what_is_not_a_proxy_request_is_refused() {
        for head in [
            "GET /local HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET https://example.org/ HTTP/1.1\r\n\r\n",
            "CONNECT example.org HTTP/1.1\r\n\r\n",
            "CONNECT exa mple.org:443 HTTP/1.1\r\n\r\n",
            "CONNECT example.org:0 HTTP/1.1\r\n\r\n",
            "nonsense\r\n\r\n",
        ] {
            assert!(parse(head.as_bytes()).is_err(), "{head:?}");
        }
    }
}
