//! GET /events on a real listener: handshake, prefixes on replay and live, resume, replay=N,
//! keep-alive, durability across kill -9, slow clients and fan-out.

mod common;

use std::time::Duration;

use common::sse::{Frame, Reader};
use serde_json::{Value, json};

const STEP: Duration = Duration::from_secs(10);

async fn publish(client: &reqwest::Client, base: &str, token: &str, body: Value) -> i64 {
    let reply: Value = client
        .post(format!("{base}/admin/events/test"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("publish")
        .error_for_status()
        .expect("publish status")
        .json()
        .await
        .expect("publish body");
    reply["id"].as_i64().expect("journal id")
}

async fn set_role(client: &reqwest::Client, base: &str, token: &str, role: &str) {
    client
        .post(format!("{base}/admin/hierarchy/role"))
        .bearer_auth(token)
        .json(&json!({ "role": role }))
        .send()
        .await
        .expect("role")
        .error_for_status()
        .expect("role status");
}

/// Events up to and including the one with `id` (exclusive of comments).
async fn read_until(reader: &mut Reader, id: i64) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        let frame = reader.next_event(STEP).await.expect("stream ended early");
        let done = frame.id() == Some(id);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_prefixes_resume_replay_and_keepalive() {
    let server = common::Launch::new().config("[events]\nsse_keepalive_secs = 1\n").start();
    let (base, token) = (server.base(), server.token.clone());
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(publish(&client, &base, &token, json!({ "n": n })).await);
    }
    set_role(&client, &base, &token, "home").await;

    // Resume from 0 with a prefix: only service.* rows are replayed, oldest first.
    let mut reader =
        Reader::open(&client, &base, "/events?prefix=service.&after=0", &token, None).await;
    let hello = reader.next(STEP).await.expect("handshake");
    assert_eq!((hello.kind(), hello.id()), ("service.connected", Some(0)));
    let payload = &hello.data()["payload"];
    assert_eq!(payload["replay"], json!({ "mode": "after", "count": 3 }));
    assert_eq!(payload["resume_from"], "0");
    assert_eq!(payload["prefixes"], json!(["service."]));
    let replayed: Vec<i64> =
        read_until(&mut reader, ids[2]).await.iter().filter_map(Frame::id).collect();
    assert_eq!(replayed, ids);

    // Live: the prefix applies too; a role change (hierarchy.*, cluster.*) is not delivered.
    set_role(&client, &base, &token, "edge").await;
    let live_id = publish(&client, &base, &token, json!({ "live": true })).await;
    let frame = reader.next_event(STEP).await.expect("live event");
    assert_eq!((frame.kind(), frame.id()), ("service.test", Some(live_id)));
    assert_eq!(frame.data()["payload"]["live"], true);
    assert_eq!(frame.data()["origin"], server.endpoints["node_id"]);
    assert!(frame.data()["ce"]["id"].as_str().is_some_and(|id| id.len() == 36));

    // Keep-alive comment after a second without events.
    let mut saw_keepalive = false;
    for _ in 0..3 {
        if let Some(Frame::Comment(text)) = reader.next(STEP).await {
            assert_eq!(text, " keep-alive");
            saw_keepalive = true;
            break;
        }
    }
    assert!(saw_keepalive, "no keep-alive comment");

    // Last-Event-ID resumes after the given id.
    let mut resumed =
        Reader::open(&client, &base, "/events?prefix=service.", &token, Some(ids[0])).await;
    let hello = resumed.next(STEP).await.expect("handshake");
    assert_eq!(hello.data()["payload"]["replay"], json!({ "mode": "after", "count": 3 }));
    let got: Vec<i64> =
        read_until(&mut resumed, live_id).await.iter().filter_map(Frame::id).collect();
    assert_eq!(got, vec![ids[1], ids[2], live_id]);

    // after= wins over Last-Event-ID.
    let path = format!("/events?prefix=service.&after={}", ids[1]);
    let mut both = Reader::open(&client, &base, &path, &token, Some(0)).await;
    both.next(STEP).await.expect("handshake");
    assert_eq!(both.next_event(STEP).await.and_then(|f| f.id()), Some(ids[2]));

    // replay=N: the last N matching rows, oldest first.
    let mut recent =
        Reader::open(&client, &base, "/events?prefix=service.&replay=2", &token, None).await;
    let hello = recent.next(STEP).await.expect("handshake");
    assert_eq!(hello.data()["payload"]["replay"], json!({ "mode": "recent", "count": 2 }));
    let got: Vec<i64> =
        read_until(&mut recent, live_id).await.iter().filter_map(Frame::id).collect();
    assert_eq!(got, vec![ids[2], live_id]);

    // Shutdown ends open streams promptly and the server exits cleanly.
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || server.stop()).await.expect("stop");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for streams: {:?}",
        started.elapsed()
    );
    // The stream reaches its end (None) within the step limit instead of hanging.
    while let Some(frame) = reader.next(STEP).await {
        assert!(matches!(frame, Frame::Comment(_)), "unexpected frame after shutdown: {frame:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_kill_9_gets_exactly_the_missed_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let server = common::Launch::new().state_dir(&state).start();
    let (base, token) = (server.base(), server.token.clone());
    let port = server.endpoints["http"]
        .as_str()
        .and_then(|h| h.rsplit(':').next())
        .expect("port")
        .to_owned();
    let client = reqwest::Client::new();

    let mut reader = Reader::open(&client, &base, "/events?prefix=service.", &token, None).await;
    reader.next(STEP).await.expect("handshake");
    let seen = publish(&client, &base, &token, json!({ "n": 1 })).await;
    assert_eq!(reader.next_event(STEP).await.and_then(|f| f.id()), Some(seen));
    drop(reader);

    // Published while the client is away, then the server dies without any cleanup.
    let mut missed = vec![
        publish(&client, &base, &token, json!({ "n": 2 })).await,
        publish(&client, &base, &token, json!({ "n": 3 })).await,
    ];
    server.kill();

    let server = common::Launch::new().state_dir(&state).env("ARW_PORT", &port).start();
    for n in 4..6 {
        missed.push(publish(&client, &base, &token, json!({ "n": n })).await);
    }
    assert!(
        missed.windows(2).all(|w| w[0] < w[1]),
        "ids must keep rising across the restart: {missed:?}"
    );

    let mut resumed =
        Reader::open(&client, &base, "/events?prefix=service.", &token, Some(seen)).await;
    resumed.next(STEP).await.expect("handshake");
    let frames = read_until(&mut resumed, *missed.last().expect("ids")).await;
    let got: Vec<i64> = frames.iter().filter_map(Frame::id).collect();
    assert_eq!(got, missed, "exactly the missed events, once each, in order");
    let ns: Vec<i64> =
        frames.iter().map(|f| f.data()["payload"]["n"].as_i64().unwrap_or(-1)).collect();
    assert_eq!(ns, vec![2, 3, 4, 5]);
    drop(server);
}

/// Opens an SSE request on a socket with a tiny receive buffer and never reads from it.
async fn stalled_client(addr: &str, token: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(addr.parse().expect("addr")).await.expect("connect");
    let request = format!(
        "GET /events?prefix=service. HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    );
    stream.writable().await.expect("writable");
    let written = stream.try_write(request.as_bytes()).expect("write request");
    assert_eq!(written, request.len());
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_told_it_lagged_and_closed_while_others_keep_up() {
    let server = common::Launch::new().config("[events]\nsse_buffer = 16\n").start();
    let (base, token) = (server.base(), server.token.clone());
    let addr = server.endpoints["http"].as_str().expect("http").to_owned();
    let client = reqwest::Client::new();

    let mut healthy = Reader::open(&client, &base, "/events?prefix=service.", &token, None).await;
    healthy.next(STEP).await.expect("handshake");
    let slow = stalled_client(&addr, &token).await;

    // Enough data to fill the stalled socket's buffers and then its 16-event queue.
    let pad = "x".repeat(PAD);
    let total = 400;
    let publisher = {
        let (client, base, token) = (client.clone(), base.clone(), token.clone());
        tokio::spawn(async move {
            let mut last = 0;
            for n in 0..total {
                last = publish(&client, &base, &token, json!({ "n": n, "pad": pad })).await;
            }
            last
        })
    };
    let mut received = 0;
    let mut previous = 0;
    loop {
        let frame = healthy.next_event(Duration::from_secs(30)).await.expect("healthy stream open");
        assert_eq!(frame.kind(), "service.test", "the healthy client lagged: {frame:?}");
        let id = frame.id().expect("id");
        assert!(id > previous, "out of order");
        previous = id;
        received += 1;
        if received == total {
            break;
        }
    }
    let last_id = publisher.await.expect("publisher");
    assert_eq!(previous, last_id);

    // Now drain the stalled client: after what was buffered comes service.lagged, then EOF.
    let std_stream = slow.into_std().expect("std");
    std_stream.set_nonblocking(false).expect("blocking");
    std_stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let text = tokio::task::spawn_blocking(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut &std_stream, &mut text)
            .expect("read until the server closes");
        String::from_utf8_lossy(&text).into_owned()
    })
    .await
    .expect("reader");
    let tail = &text[text.len().saturating_sub(600)..];
    assert!(tail.contains("event: service.lagged"), "no lag notice at the end: {tail}");
    let data = tail
        .split("event: service.lagged")
        .nth(1)
        .and_then(|t| t.split("data: ").nth(1))
        .expect("data");
    let notice: Value = serde_json::from_str(data.lines().next().expect("line")).expect("json");
    assert!(notice["payload"]["skipped"].as_u64().unwrap_or(0) > 0, "{notice}");
    assert!(notice["payload"]["last_id"].as_i64().unwrap_or(0) > 0, "{notice}");
    assert!(text.len() < total * PAD, "the stalled client received everything: it never lagged");
}

const PAD: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_subscribers_all_receive_a_published_event() {
    let server = common::Launch::new().start();
    let (base, token) = (server.base(), server.token.clone());
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let subscribers = 1000;
    let mut readers = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut reader =
            Reader::open(&client, &base, "/events?prefix=service.", &token, None).await;
        reader.next(STEP).await.expect("handshake");
        readers.push(reader);
    }
    let id = publish(&client, &base, &token, json!({ "fanout": true })).await;
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                reader.next_event(Duration::from_secs(60)).await.and_then(|f| f.id())
            })
        })
        .collect();
    let mut delivered = 0;
    for task in tasks {
        if task.await.expect("reader task") == Some(id) {
            delivered += 1;
        }
    }
    assert_eq!(delivered, subscribers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_older_than_retention_is_reported_in_the_handshake() {
    let server = common::Launch::new().config("[events]\nretention_rows = 5\n").start();
    let (base, token) = (server.base(), server.token.clone());
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(publish(&client, &base, &token, json!({ "n": n })).await);
    }
    let mut reader = Reader::open(&client, &base, "/events?after=1", &token, None).await;
    let hello = reader.next(STEP).await.expect("handshake");
    let payload = &hello.data()["payload"];
    assert_eq!(payload["truncated"], true, "{payload}");
    let oldest = payload["oldest_id"].as_i64().expect("oldest_id");
    assert_eq!(payload["last_id"], ids[9]);
    assert!(oldest > 2 && oldest > ids[9] - 6, "retention kept too much: {payload}");
    // Pruning runs beside the read: the replay may still include a row pruned a moment later,
    // but it never starts after what the handshake calls the oldest retained row.
    let first = reader.next_event(STEP).await.and_then(|f| f.id()).expect("replay");
    assert!(first > 2 && first <= oldest, "replay starts at {first}, oldest retained {oldest}");

    let mut current =
        Reader::open(&client, &base, &format!("/events?after={}", ids[8]), &token, None).await;
    let hello = current.next(STEP).await.expect("handshake");
    assert_eq!(hello.data()["payload"]["truncated"], false);
}
