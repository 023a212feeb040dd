//! The live cluster page in a real headless Chromium, driven over the DevTools protocol: it
//! loads, signs in through its form, shows the three nodes of a three-node cluster, and shows a
//! killed node leave `ok` without a reload. A screenshot is written beside the test binaries.
//! Without Chromium this says why and passes, except where `ARW_REQUIRE_CHROMIUM=1` (CI).

mod common;

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

const CLUSTER: &str =
    "[cluster]\nenabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n";

fn node(id: &str, state: &std::path::Path, bootstrap: Option<&str>) -> common::Server {
    let mut config = CLUSTER.to_owned();
    if let Some(addr) = bootstrap {
        config.push_str(&format!("bootstrap = [\"{addr}\"]\n"));
    }
    common::Launch::new().state_dir(state).env("ARW_NODE_ID", id).config(&config).start()
}

/// Headless Chromium with its DevTools endpoint on a free port; killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start() -> Option<Self> {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let mut browser = Browser { child, _profile: profile, port: 0 };
        // "DevTools listening on ws://127.0.0.1:<port>/devtools/browser/<id>"
        let stderr = browser.child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().and_then(|p| p.parse::<u16>().ok()));
                }
            }
        });
        browser.port = rx.recv_timeout(Duration::from_secs(30)).ok().flatten()?;
        Some(browser)
    }

    /// The first page's DevTools connection.
    fn page(&self) -> Page {
        let url = format!("http://127.0.0.1:{}/json/list", self.port);
        let targets = common::eventually(Duration::from_secs(10), "a page target", || {
            let (status, list) = common::request("GET", &url, None, None);
            let ws = list.as_array().and_then(|l| {
                l.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"].as_str()
            });
            match (status, ws) {
                (200, Some(ws)) => Ok(ws.to_owned()),
                _ => Err(format!("{status} {list}")),
            }
        });
        let (socket, _) = tungstenite::connect(targets.as_str()).expect("DevTools websocket");
        if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        }
        Page { socket, next: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Page {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Page {
    /// One DevTools command; its result (events that arrive meanwhile are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket.send(Message::text(request.to_string())).expect("send");
        loop {
            let message = self.socket.read().expect("a DevTools message within 10 s");
            let Ok(text) = message.to_text() else { continue };
            let reply: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        result["result"]["value"].clone()
    }

    /// `(id, health)` of each row of the nodes table, as the page shows them.
    fn rows(&mut self) -> Vec<(String, String)> {
        let rows = self.eval(
            "JSON.stringify([...document.querySelectorAll('#nodes tr')].map(r => [r.dataset.id, r.dataset.health]))",
        );
        serde_json::from_str(rows.as_str().unwrap_or("[]")).unwrap_or_default()
    }
}

#[test]
fn the_cluster_page_signs_in_shows_three_nodes_and_a_killed_one_leaving_ok() {
    let Some(browser) = Browser::start() else {
        assert!(
            std::env::var("ARW_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "Chromium is required here but did not start"
        );
        eprintln!("skipped: no chromium (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node("node-a", &dir.path().join("a"), None);
    let boot = a.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    let b = node("node-b", &dir.path().join("b"), Some(&boot));
    let c = node("node-c", &dir.path().join("c"), Some(&boot));
    common::eventually(Duration::from_secs(20), "node-a sees all three ok", || {
        let rows = common::node_rows(&a.get("/state/cluster").1);
        let ok = rows.iter().filter(|(_, h, _)| h == "ok").count();
        (ok == 3).then_some(()).ok_or(format!("{rows:?}"))
    });

    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call("Page.navigate", json!({"url": format!("{}/ui", a.base())}));
    common::eventually(Duration::from_secs(10), "the sign-in form", || {
        let ready = page.eval("document.readyState === 'complete' && !!document.querySelector('#login-form') && !document.querySelector('#login').hidden");
        (ready == true).then_some(()).ok_or(ready.to_string())
    });

    // A wrong token is refused on the form, and nothing is shown.
    let sign_in = |page: &mut Page, token: &str| {
        let script = format!(
            "document.querySelector('#token').value = {}; document.querySelector('#login-form').requestSubmit(); true",
            json!(token)
        );
        page.eval(&script);
    };
    sign_in(&mut page, "not-the-token");
    common::eventually(Duration::from_secs(10), "the refusal", || {
        let error = page.eval("document.querySelector('#login-error').textContent");
        (error.as_str().is_some_and(|e| e.contains("refused")))
            .then_some(())
            .ok_or(error.to_string())
    });
    assert_eq!(page.eval("document.querySelector('#app').hidden"), true);

    sign_in(&mut page, &a.token);
    let rows = common::eventually(Duration::from_secs(10), "three nodes ok on the page", || {
        let rows = page.rows();
        let ok = rows.iter().filter(|(_, h)| h == "ok").count();
        (ok == 3).then_some(rows.clone()).ok_or(format!("{rows:?}"))
    });
    let mut ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["node-a", "node-b", "node-c"]);
    // Every node's runtimes, from its adverts: the built-in kinds, ready.
    let runtimes = page.eval(
        "JSON.stringify([...document.querySelectorAll('#runtimes tr')].map(r => [r.dataset.node, r.dataset.runtime, r.dataset.health]))",
    );
    let runtimes: Vec<(String, String, String)> =
        serde_json::from_str(runtimes.as_str().unwrap_or("[]")).unwrap_or_default();
    let builtin = |n: &str| (n.to_owned(), "builtin".to_owned(), "ready".to_owned());
    assert_eq!(runtimes, [builtin("node-a"), builtin("node-b"), builtin("node-c")]);
    // The token is kept for the tab, never put in the address.
    assert_eq!(page.eval("sessionStorage.getItem('arw-admin-token')"), json!(a.token));
    let href = page.eval("location.href");
    assert!(!href.as_str().unwrap_or_default().contains(&a.token), "{href}");
    // The live stream is up.
    common::eventually(Duration::from_secs(10), "the event stream", || {
        let state = page.eval("document.querySelector('#stream-state').textContent");
        (state == "live").then_some(()).ok_or(state.to_string())
    });

    // kill -9 node-c: the page follows without a reload.
    let killed = Instant::now();
    c.kill();
    let (health, api_lag) = common::eventually(Duration::from_secs(20), "node-c leave ok", || {
        let on_page = page.rows().into_iter().find(|(id, _)| id == "node-c").map(|(_, h)| h);
        match on_page {
            Some(h) if h != "ok" => Ok((h, killed.elapsed())),
            other => Err(format!("{other:?}")),
        }
    });
    eprintln!("node-c shown {health} {api_lag:?} after the kill");
    assert!(["suspect", "down"].contains(&health.as_str()), "{health}");

    let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-cluster.png");
    std::fs::write(&path, png).expect("screenshot");
    eprintln!("screenshot: {}", path.display());
    drop(b);
}
