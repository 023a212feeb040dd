// The live cluster page: the admin token is kept in sessionStorage (never in a URL), the node
// list comes from /state/cluster and /admin/hierarchy/state, jobs from /state/actions, runtimes
// from /state/runtime_matrix, and /events (read with fetch, so the token travels in a header)
// triggers a refresh on every change and resumes with Last-Event-ID after a drop.
"use strict";

const $ = (selector) => document.querySelector(selector);
const KEY = "arw-admin-token";
let token = sessionStorage.getItem(KEY);
let lastId = null;
let stream = null;
let refreshing = null;
let again = false;
let ticker = null;

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  if (response.status === 401) throw new Unauthorized("the token was refused");
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function ago(ms) {
  if (!ms) return "—";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

function capabilities(node) {
  const caps = node.capabilities || {};
  const parts = [caps.os, caps.arch].filter(Boolean);
  const gpus = Array.isArray(caps.gpus) ? caps.gpus.length : 0;
  if (gpus) parts.push(`${gpus} GPU`);
  for (const d of caps.declared || []) parts.push(d);
  return parts.join(", ") || "—";
}

function renderNodes(view) {
  const body = $("#nodes");
  body.replaceChildren();
  for (const node of view.nodes || []) {
    const row = document.createElement("tr");
    row.dataset.id = node.id;
    const health = node.health || "unknown";
    row.dataset.health = health;
    cell(row, node.id + (node.local ? " (this node)" : ""));
    cell(row, health, `health health-${health}`);
    cell(row, node.role || "—");
    cell(row, node.admission || "—");
    cell(row, capabilities(node));
    cell(row, node.local ? "—" : ago(node.last_seen_ms));
    cell(row, `${node.bus || "—"} / ${node.queue || "—"}`);
    body.appendChild(row);
  }
  $("#node-count").textContent = String((view.nodes || []).length);
}

function renderHierarchy(state) {
  const self = state.self_node || {};
  $("#self-id").textContent = self.id || "—";
  const home = state.home || {};
  $("#home").textContent = home.home_id || home.id || (self.role === "root" ? "this node" : "—");
  $("#epoch").textContent = home.policy_epoch ?? "—";
}

function renderJobs(list) {
  const body = $("#jobs");
  body.replaceChildren();
  for (const job of (list.items || []).slice(0, 50)) {
    const row = document.createElement("tr");
    row.dataset.id = job.id;
    cell(row, job.id);
    cell(row, job.kind);
    cell(row, job.state);
    cell(row, job.node_id || "—");
    cell(row, String(job.attempt ?? "—"));
    cell(row, job.updated ? new Date(job.updated).toLocaleTimeString() : "—");
    body.appendChild(row);
  }
}

function renderRuntimes(matrix) {
  const body = $("#runtimes");
  body.replaceChildren();
  for (const [node, entry] of Object.entries(matrix.items || {})) {
    for (const runtime of entry.runtimes || []) {
      const row = document.createElement("tr");
      row.dataset.node = node;
      row.dataset.runtime = runtime.id;
      row.dataset.health = runtime.health;
      cell(row, node);
      cell(row, runtime.id);
      cell(row, runtime.health, `health health-${runtime.health}`);
      cell(row, `${runtime.failures}/${runtime.budget}`);
      cell(row, runtime.status || "—");
      body.appendChild(row);
    }
  }
}

// One refresh at a time; a change during one asks for another right after.
async function refresh() {
  if (refreshing) {
    again = true;
    return refreshing;
  }
  refreshing = (async () => {
    do {
      again = false;
      const [cluster, hierarchy, jobs, runtimes] = await Promise.all([
        api("/state/cluster"),
        api("/admin/hierarchy/state"),
        api("/state/actions?limit=50"),
        api("/state/runtime_matrix"),
      ]);
      renderNodes(cluster);
      renderHierarchy(hierarchy);
      renderJobs(jobs);
      renderRuntimes(runtimes);
    } while (again);
  })().finally(() => { refreshing = null; });
  return refreshing;
}

// A line per event: the node and its health for node changes, else the payload, cut short.
function summary(kind, data) {
  let payload;
  try {
    const envelope = JSON.parse(data);
    payload = envelope.payload ?? envelope;
  } catch (_) {
    return data.slice(0, 160);
  }
  if (kind === "cluster.node.changed" && payload.id) {
    const was = payload.previous_health ? ` (was ${payload.previous_health})` : "";
    return `${payload.id} ${payload.health || ""}${was}`;
  }
  const text = JSON.stringify(payload);
  return text.length > 160 ? `${text.slice(0, 159)}…` : text;
}

function logEvent(kind, data) {
  const log = $("#events");
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()}  ${kind}  ${summary(kind, data)}`;
  log.prepend(line);
  while (log.childElementCount > 200) log.lastElementChild.remove();
}

// Server-sent events over fetch: frames of "field: value" lines, ended by a blank line.
async function follow() {
  const controller = new AbortController();
  stream = controller;
  while (stream === controller) {
    try {
      const headers = { Authorization: `Bearer ${token}` };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await fetch("/events?prefix=cluster.,hierarchy.,policy.,actions.,job.", {
        headers, signal: controller.signal,
      });
      if (response.status === 401) throw new Unauthorized("the token was refused");
      if (!response.ok) throw new Error(`events: ${response.status}`);
      $("#stream-state").textContent = "live";
      await refresh();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let kind = "message", data = "", id = null;
          for (const line of frame.split("\n")) {
            const colon = line.indexOf(":");
            if (colon <= 0) continue;
            const field = line.slice(0, colon), text = line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") kind = text;
            else if (field === "data") data += text;
            else if (field === "id") id = text;
          }
          if (id !== null && id !== "" && id !== "0") lastId = id;
          if (kind.startsWith("service.")) continue;
          logEvent(kind, data);
          refresh().catch(fail);
        }
      }
    } catch (e) {
      if (e instanceof Unauthorized) return fail(e);
      if (controller.signal.aborted) return;
    }
    $("#stream-state").textContent = "reconnecting…";
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function fail(e) {
  if (e instanceof Unauthorized) {
    signOut(e.message);
  } else {
    $("#stream-state").textContent = `error: ${e.message}`;
  }
}

function signOut(why) {
  if (stream) stream.abort();
  stream = null;
  token = null;
  sessionStorage.removeItem(KEY);
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = why || "";
}

async function start() {
  try {
    await refresh();
  } catch (e) {
    return fail(e instanceof Unauthorized ? e : new Error(`cannot load the cluster: ${e.message}`));
  }
  $("#login").hidden = true;
  $("#app").hidden = false;
  follow();
  // Last-seen times age between events.
  ticker ??= setInterval(() => { if (token) refresh().catch(fail); }, 5000);
}

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("#token").value.trim();
  sessionStorage.setItem(KEY, token);
  start();
});
$("#logout").addEventListener("click", () => signOut(""));
if (token) start();
