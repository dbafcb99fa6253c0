// The Changeover web console. Every action is one admin protocol message sent to
// /console/api/call, the same call `changeover-agent admin` makes over its WebSocket.
// Live progress comes from /console/api/events; the status is read again every second,
// and through the server's restart the page keeps trying until the new release answers.
"use strict";

const POLL_MS = 1000;
const CANCELLABLE = ["scheduled", "preparing", "counting_down"];
// Phases after which the server goes away for its restart into the new release.
const BEFORE_RESTART = ["logging_out", "stopping", "carrying_over", "swapping", "restarting"];
const OUTCOME_WORDS = {
  committed: "committed",
  rolled_back: "rolled back",
  failed: "failed",
  cancelled: "cancelled",
};

const $ = (id) => document.getElementById(id);

const state = {
  csrf: null,
  events: null,
  pollTimer: null,
  status: null,
  following: null, // the changeover id this page shows the progress of
  phases: [],
  deadline: null,
  phase: "idle",
  outcomeShown: null,
};

class NetworkError extends Error {}

async function request(path, { method = "GET", body } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new NetworkError(String(err));
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  return { status: response.status, data };
}

// One admin protocol message; the server's answer, or null when logged out.
async function call(message) {
  const { status, data } = await request("api/call", { method: "POST", body: message });
  if (status === 401) {
    showLogin("Your session ended; log in again.");
    return null;
  }
  if (status !== 200) {
    throw new Error((data && data.error) || `the server answered ${status}`);
  }
  return data;
}

function text(id, value) {
  $(id).textContent = value;
}

function fmtTime(rfc3339) {
  if (!rfc3339) return "";
  const date = new Date(rfc3339);
  return isNaN(date) ? rfc3339 : date.toLocaleString();
}

function fillTable(id, rows, rowClass, cells) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.className = rowClass;
    for (const [cls, value] of cells(row)) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = value == null ? "" : String(value);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function showLogin(message) {
  stopLive();
  state.csrf = null;
  $("dashboard").hidden = true;
  $("logout-button").hidden = true;
  $("login-view").hidden = false;
  text("login-error", message || "");
  $("password").value = "";
  $("password").focus();
}

function showDashboard() {
  $("login-view").hidden = true;
  $("dashboard").hidden = false;
  $("logout-button").hidden = false;
  startLive();
}

function stopLive() {
  if (state.events) state.events.close();
  state.events = null;
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

function startLive() {
  stopLive();
  openEvents();
  poll();
}

function openEvents() {
  const source = new EventSource("api/events");
  state.events = source;
  source.onmessage = (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    onEvent(message);
  };
  source.onopen = () => {
    if (!$("restarting").hidden) poll();
  };
  source.onerror = () => {
    // The stream drops when the server restarts into the new release; the page says so
    // until the new release answers.
    if (state.csrf) setUnreachable(true);
    // EventSource retries by itself, except after an answer such as 401: then reopen
    // later, while the page is still logged in.
    if (source.readyState === EventSource.CLOSED && state.events === source && state.csrf) {
      state.events = null;
      setTimeout(() => {
        if (state.csrf && !state.events) openEvents();
      }, 2000);
    }
  };
}

function onEvent(message) {
  switch (message.type) {
    case "changeover_progress":
      if (!state.following) state.following = message.changeover_id;
      if (message.changeover_id === state.following) notePhase(message.phase);
      break;
    case "changeover_finished":
      showOutcome(message);
      break;
    default:
      break;
  }
}

async function poll() {
  clearTimeout(state.pollTimer);
  try {
    const answer = await call({ type: "status_request" });
    if (answer === null) return;
    setUnreachable(false);
    if (answer.type === "status") render(answer);
  } catch (err) {
    if (err instanceof NetworkError) {
      setUnreachable(true);
    } else {
      text("call-error", err.message);
    }
  }
  if (state.csrf) state.pollTimer = setTimeout(poll, POLL_MS);
}

function setUnreachable(unreachable) {
  const following = state.following && !state.outcomeShown;
  // Outside a changeover a lost connection is just that; during one, past the logout,
  // it is the restart.
  $("restarting").hidden = !(unreachable && following && BEFORE_RESTART.includes(state.phase));
  $("offline").hidden = !(unreachable && $("restarting").hidden);
  if (unreachable && following && BEFORE_RESTART.includes(state.phase)) notePhase("restarting");
}

function render(status) {
  state.status = status;
  text("server-version", status.server_version);
  text("available-version", status.available_version || "none newer");
  const feed = status.feed || {};
  text("release-notes", status.available_version ? feed.newest_notes || "" : "");
  text(
    "feed-state",
    feed.error ? `feed: ${feed.error}` : feed.checked_at ? `feed read ${fmtTime(feed.checked_at)}` : ""
  );
  text("agent-release", status.agent_release ? `agent release ${status.agent_release}` : "no agent release");
  text("sessions-count", status.sessions_total ?? status.sessions.length);
  text("agents-behind", status.agents_behind || 0);
  const outbox = status.outbox || [];
  text(
    "mail-state",
    status.mail_problem || (outbox.length ? `${outbox.length} mail(s) waiting in the outbox` : "outbox empty")
  );

  fillTable("sessions", status.sessions, "session", (s) => [
    ["user", s.user],
    ["host", s.host],
    ["agent-version", s.agent_version],
    ["update-state", s.update ? `${s.update.state} ${s.update.version}` : ""],
    ["connected-since", fmtTime(s.connected_since)],
  ]);
  const total = status.sessions_total ?? status.sessions.length;
  text("sessions-more", total > status.sessions.length ? `and ${total - status.sessions.length} more` : "");
  fillTable("apps", status.apps || [], "app", (a) => [
    ["name", a.name],
    ["state", a.state],
    ["pid", a.pid ?? ""],
    ["restarts", a.restarts],
  ]);
  fillTable("history", status.history || [], "changeover", (c) => [
    ["ended", fmtTime(c.ended_at)],
    ["from", c.from_version],
    ["to", c.target_version],
    ["outcome", OUTCOME_WORDS[c.outcome] || c.outcome],
    ["downtime", c.downtime_ms == null ? "" : `${c.downtime_ms} ms`],
    ["reason", c.reason || ""],
  ]);
  fillTable("outbox", outbox, "mail", (m) => [
    ["queued", fmtTime(m.queued_at)],
    ["to", m.to || "(default)"],
    ["subject", m.subject],
    ["attempts", m.attempts],
    ["last-error", m.last_error || ""],
  ]);
  fillTable("audit", status.audit || [], "audit", (e) => [
    ["at", fmtTime(e.at)],
    ["address", e.address],
    ["via", e.via],
    ["action", e.action],
    ["detail", e.detail || ""],
    ["outcome", e.reason ? `${e.outcome}: ${e.reason}` : e.outcome],
  ]);

  const view = status.changeover;
  if (view) {
    if (state.following !== view.changeover_id) follow(view.changeover_id);
    notePhase(view.phase);
    state.deadline = view.deadline ? new Date(view.deadline) : null;
  } else {
    state.deadline = null;
    const last = status.last_changeover;
    if (state.following && last && last.changeover_id === state.following) {
      showOutcome(last);
    }
    if (!state.following || state.outcomeShown) {
      state.phase = "idle";
      text("phase", "idle");
    }
  }
  const busy = Boolean(view);
  $("update-button").disabled = busy;
  $("cancel-button").hidden = !(view && CANCELLABLE.includes(view.phase));
  tick();
}

function follow(changeoverId) {
  state.following = changeoverId;
  state.phases = [];
  state.outcomeShown = null;
  $("phases").replaceChildren();
  text("outcome", "");
  $("outcome").className = "";
}

function notePhase(phase) {
  state.phase = phase;
  text("phase", phase);
  if (state.phases[state.phases.length - 1] === phase) return;
  state.phases.push(phase);
  const li = document.createElement("li");
  li.textContent = phase;
  $("phases").appendChild(li);
}

function showOutcome(summary) {
  if (state.following && summary.changeover_id !== state.following) return;
  if (state.outcomeShown === summary.changeover_id) return;
  state.following = summary.changeover_id;
  state.outcomeShown = summary.changeover_id;
  const words = OUTCOME_WORDS[summary.outcome] || summary.outcome;
  let line = `${words}: ${summary.from_version} → ${summary.target_version}`;
  if (summary.downtime_ms != null) line += `, downtime ${summary.downtime_ms} ms`;
  line += `, ${summary.sessions_warned} warned, ${summary.sessions_logged_out} logged out`;
  if (summary.reason) line += ` (${summary.reason})`;
  text("outcome", line);
  $("outcome").className = summary.outcome === "committed" ? "committed" : "bad";
  state.deadline = null;
  state.phase = "idle";
  text("phase", "idle");
  tick();
  poll();
}

function tick() {
  const counting = state.deadline && state.phase === "counting_down";
  $("countdown-box").hidden = !counting;
  if (counting) {
    const left = Math.max(0, Math.ceil((state.deadline.getTime() - Date.now()) / 1000));
    text("countdown", left);
  }
}

function readUpdateForm() {
  const grace = Number($("grace").value);
  if (!Number.isInteger(grace) || grace < 0 || grace > 3600) {
    throw new Error("the grace is a whole number of seconds from 0 to 3600");
  }
  const message = { type: "update_request", grace_secs: grace };
  const notify = $("notify").value.trim();
  if (notify) message.notify = notify;
  const words = $("message").value.trim();
  if (words) message.message = words;
  const at = $("at").value;
  if (at) {
    const when = new Date(at);
    if (isNaN(when)) throw new Error("the start time is not a time");
    message.at = when.toISOString().replace(/\.\d{3}Z$/, "Z");
  }
  return message;
}

function confirmText(message) {
  const users = state.status ? state.status.sessions_total ?? state.status.sessions.length : 0;
  const who = `${users} ${users === 1 ? "user" : "users"}`;
  const version = (state.status && state.status.available_version) || "the newest release";
  if (message.at) {
    return `At ${new Date(message.at).toLocaleString()} the server updates to ${version}: ` +
      `the users then connected (now ${who}) are warned and logged out ${message.grace_secs} s later.`;
  }
  return `The server updates to ${version} now: ${who} will be warned and logged out ` +
    `in ${message.grace_secs} s. Start it?`;
}

let pending = null;

function onUpdateSubmit(event) {
  event.preventDefault();
  text("call-error", "");
  try {
    pending = readUpdateForm();
  } catch (err) {
    text("call-error", err.message);
    return;
  }
  text("confirm-text", confirmText(pending));
  $("confirm").hidden = false;
  $("confirm-yes").focus();
}

async function onConfirm() {
  $("confirm").hidden = true;
  const message = pending;
  pending = null;
  if (!message) return;
  try {
    const answer = await call(message);
    if (answer === null) return;
    if (answer.type === "update_accepted") {
      follow(answer.changeover_id);
      notePhase(answer.scheduled_at ? "scheduled" : "preparing");
    } else if (answer.type === "error") {
      text("call-error", `refused: ${answer.message}`);
    }
  } catch (err) {
    text("call-error", err.message);
  }
  poll();
}

async function onCancel() {
  text("call-error", "");
  try {
    const answer = await call({ type: "cancel_request" });
    if (answer && answer.type === "error") text("call-error", `refused: ${answer.message}`);
  } catch (err) {
    text("call-error", err.message);
  }
  poll();
}

async function onLogin(event) {
  event.preventDefault();
  text("login-error", "");
  $("login-button").disabled = true;
  try {
    const { status, data } = await request("api/login", {
      method: "POST",
      body: { password: $("password").value },
    });
    if (status === 200 && data && data.csrf) {
      state.csrf = data.csrf;
      $("password").value = "";
      showDashboard();
    } else {
      text("login-error", (data && data.error) || `login failed (${status})`);
    }
  } catch (err) {
    text("login-error", `the server cannot be reached: ${err.message}`);
  } finally {
    $("login-button").disabled = false;
  }
}

async function onLogout() {
  try {
    await request("api/logout", { method: "POST", body: {} });
  } catch (_) {
    // Logged out here either way.
  }
  showLogin("Logged out.");
}

async function start() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout-button").addEventListener("click", onLogout);
  $("update-form").addEventListener("submit", onUpdateSubmit);
  $("confirm-yes").addEventListener("click", onConfirm);
  $("confirm-no").addEventListener("click", () => {
    pending = null;
    $("confirm").hidden = true;
  });
  $("cancel-button").addEventListener("click", onCancel);
  setInterval(tick, 250);
  try {
    const { status, data } = await request("api/session");
    if (status === 200 && data && data.csrf) {
      state.csrf = data.csrf;
      showDashboard();
      return;
    }
  } catch (_) {
    // Not reachable now: the login form says so when used.
  }
  showLogin("");
}

document.addEventListener("DOMContentLoaded", start);
