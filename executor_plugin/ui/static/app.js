// The Edge agents page: fetches the REST API next to it (api/v1/...) and renders it.
// Agent names, queues and reasons come from agents and admins: they are only ever set as text
// (textContent), never parsed as HTML.
"use strict";

const REFRESH_MS = 5000;
// Revoke asks for a second click on the same button within this time. Not window.confirm():
// Airflow's UI shows this page in a sandboxed iframe without "allow-modals", where confirm()
// returns false at once.
const CONFIRM_MS = 8000;
const state = { canManage: false, timer: null, busy: false, armed: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(`api/v1/${path}`, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
    ...options,
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    let detail = body && body.detail;
    if (typeof detail !== "string") detail = detail ? JSON.stringify(detail) : response.statusText;
    throw new ApiError(response.status, detail);
  }
  return body;
}

function showMessage(text, isError = false) {
  const box = document.getElementById("message");
  box.hidden = !text;
  box.className = isError ? "error" : "";
  box.replaceChildren();
  if (!text) return;
  box.append(text);
  if (isError && /^(401|403)\b/.test(text)) {
    box.append(" ", el("a", { href: "../", target: "_top", text: "Log in to Airflow" }));
  }
}

function describeError(error) {
  return error instanceof ApiError ? `${error.status} ${error.message}` : `request failed: ${error.message}`;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.round(seconds);
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.abs(seconds);
  if (s < 120) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function certCell(agent) {
  if (!agent.cert_not_after) return el("td", { class: "muted", text: "unknown" });
  const left = agent.cert_expires_in_seconds;
  const text = left <= 0 ? `expired ${duration(left)} ago` : `in ${duration(left)}`;
  return el("td", { title: agent.cert_not_after, class: left <= 0 ? "no" : left < 3600 ? "status-draining" : "" }, text);
}

function actionButtons(agent) {
  const cell = el("td", { class: "actions" });
  if (!state.canManage || agent.state === "revoked") return cell;
  const button = (action, label, extraClass) =>
    el("button", {
      type: "button",
      class: `action-${action}${extraClass ? " " + extraClass : ""}`,
      text: label,
      "data-action": action,
      "data-agent-id": agent.id,
      "data-agent-name": agent.name,
    });
  if (agent.state === "active") cell.append(button("drain", "Drain"), " ");
  if (agent.state === "draining") cell.append(button("resume", "Resume"), " ");
  const armed = state.armed && state.armed.id === agent.id && state.armed.until > Date.now();
  const revoke = button("revoke", armed ? "Confirm revoke" : "Revoke", armed ? "danger armed" : "danger");
  revoke.title = armed
    ? "Click again to revoke: the agent can never connect again"
    : "Revoke: the agent can never connect again (asks for a second click)";
  cell.append(revoke);
  return cell;
}

function renderAgents(agents) {
  const body = document.querySelector("#agents tbody");
  body.replaceChildren(
    ...agents.map((a) =>
      el(
        "tr",
        { "data-agent-id": a.id, class: `agent status-${a.status}` },
        el("td", { class: "agent-name" }, el("strong", { text: a.name }), el("span", { class: "id", text: a.id })),
        el("td", { class: "agent-queues", text: a.queues.join(", ") }),
        el("td", { class: "agent-region", text: a.region }),
        el(
          "td",
          { class: "agent-status" },
          el("span", { class: `badge status-${a.status}`, text: a.status }),
          a.state === "draining" && !a.online ? el("span", { class: "id", text: "and offline" }) : null
        ),
        el("td", { class: "num agent-slots", text: `${a.slots_free} / ${a.slots_total}` }),
        el("td", { class: "num agent-running", text: a.running_jobs }),
        el("td", { class: "agent-heartbeat", title: a.last_heartbeat || "", text: ago(a.heartbeat_age_seconds) }),
        el("td", { class: "agent-version", text: a.version || "–" }),
        certCell(a),
        actionButtons(a)
      )
    )
  );
  document.getElementById("agents-empty").hidden = agents.length > 0;
}

function renderQueues(queues) {
  const body = document.querySelector("#queues tbody");
  body.replaceChildren(
    ...queues.map((q) =>
      el(
        "tr",
        { "data-queue": q.queue },
        el("td", { text: q.queue }),
        el("td", { class: "num", text: q.queued }),
        el("td", { class: "num", text: q.leased }),
        el("td", { class: "num", text: q.running }),
        el("td", { class: `num ${q.agents_online ? "" : "no"}`, text: `${q.agents_online} / ${q.agents_serving}` }),
        el("td", { class: "num", text: q.free_slots }),
        el("td", { class: "num", text: q.oldest_queued_seconds === null ? "–" : duration(q.oldest_queued_seconds) }),
        el("td", {
          class: "num",
          text: q.leased_recently ? `${duration(q.lease_latency_seconds)} / ${duration(q.lease_latency_max_seconds)}` : "–",
        }),
        el("td", { text: q.regions === null ? "any" : q.regions.join(", ") }),
        el("td", { text: q.logs })
      )
    )
  );
}

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    const data = await api("agents");
    state.canManage = Boolean(data.can_manage);
    renderAgents(data.agents);
    renderQueues(data.queues);
    const updated = document.getElementById("updated");
    updated.textContent = `updated ${new Date(data.generated_at).toLocaleTimeString()}`;
    updated.title = `offline after ${data.dead_after_seconds} s without a heartbeat`;
    const box = document.getElementById("message");
    if (box.classList.contains("error") && box.dataset.source === "refresh") showMessage("");
  } catch (error) {
    showMessage(describeError(error), true);
    document.getElementById("message").dataset.source = "refresh";
  } finally {
    state.busy = false;
  }
}

function schedule() {
  clearTimeout(state.timer);
  if (document.getElementById("auto-refresh").checked && !document.body.classList.contains("embedded")) {
    state.timer = setTimeout(async () => {
      await refresh();
      schedule();
    }, REFRESH_MS);
  }
}

async function act(button) {
  const { action, agentId, agentName } = button.dataset;
  if (action === "revoke") {
    const armed = state.armed && state.armed.id === agentId && state.armed.until > Date.now();
    if (!armed) {
      state.armed = { id: agentId, until: Date.now() + CONFIRM_MS };
      button.textContent = "Confirm revoke";
      button.classList.add("armed");
      showMessage(`Click "Confirm revoke" to revoke agent ${agentName}: it can never connect again (register a new agent instead).`);
      document.getElementById("message").dataset.source = "action";
      setTimeout(() => {
        if (state.armed && state.armed.id === agentId && state.armed.until <= Date.now()) {
          state.armed = null;
          refresh();
        }
      }, CONFIRM_MS + 50);
      return;
    }
    state.armed = null;
  }
  button.disabled = true;
  try {
    const result = await api(`agents/${encodeURIComponent(agentId)}/${action}`, { method: "POST" });
    showMessage(result.message);
    document.getElementById("message").dataset.source = "action";
  } catch (error) {
    showMessage(describeError(error), true);
    document.getElementById("message").dataset.source = "action";
  }
  await refresh();
}

function renderExplanation(result) {
  const box = document.getElementById("explain-result");
  const task = result.task;
  const where = `${task.dag_id} / ${task.run_id} / ${task.task_id}${task.map_index >= 0 ? ` [${task.map_index}]` : ""}`;
  const rows = result.agents.map((v) =>
    el(
      "tr",
      { "data-agent-id": v.agent_id, class: v.can_take ? "can-take" : "cannot-take" },
      el("td", {}, el("strong", { text: v.name }), el("span", { class: "id", text: v.agent_id })),
      el("td", { class: v.can_take ? "yes" : "no", text: v.holds_job ? "holds this job" : v.can_take ? "yes" : "no" }),
      el(
        "td",
        { class: "reasons" },
        v.reasons.length
          ? el("ul", {}, ...v.reasons.map((r) => el("li", { class: `reason reason-${r.code}`, "data-code": r.code, text: r.message })))
          : el("span", { class: "muted", text: v.holds_job ? "it has this try's job" : "nothing stops it" })
      )
    )
  );
  box.replaceChildren(
    el("p", { class: "muted", text: `${where} — try ${task.try_number ?? "none"}, task instance ${result.ti_state ?? "unknown"}` }),
    el("p", { class: "summary", text: result.summary }),
    el(
      "p",
      { class: "job-status" },
      "Job: ",
      result.job_status
    ),
    el(
      "p",
      { class: "muted" },
      `Queue ${result.queue}: regions ${result.regions === null ? "any" : result.regions.join(", ")}; logs ${result.logs}` +
        (result.logs === "local" ? " (kept in the agent's log folder, not shipped)" : "")
    ),
    rows.length
      ? el(
          "table",
          { id: "explain-agents" },
          el("thead", {}, el("tr", {}, el("th", { text: "Agent" }), el("th", { text: "Can take it" }), el("th", { text: "Why not" }))),
          el("tbody", {}, ...rows)
        )
      : el("p", { class: "muted", text: "No agent is registered." })
  );
}

async function explain(form) {
  const params = new URLSearchParams();
  for (const name of ["dag_id", "task_id", "run_id", "map_index"]) {
    const value = form.elements[name].value.trim();
    if (value !== "") params.set(name, value);
  }
  const box = document.getElementById("explain-result");
  box.replaceChildren(el("p", { class: "muted", text: "Explaining…" }));
  try {
    renderExplanation(await api(`explain?${params}`));
  } catch (error) {
    box.replaceChildren(el("p", { class: "no explain-error", text: describeError(error) }));
  }
}

async function start() {
  const query = new URLSearchParams(window.location.search);
  const form = document.getElementById("explain-form");
  if (query.get("view") === "explain") document.body.classList.add("embedded");
  for (const name of ["dag_id", "task_id", "run_id", "map_index"]) {
    if (query.has(name)) form.elements[name].value = query.get(name);
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    explain(form);
  });
  document.getElementById("agents").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) act(button);
  });
  document.getElementById("refresh").addEventListener("click", refresh);
  document.getElementById("auto-refresh").addEventListener("change", schedule);
  try {
    const me = await api("me");
    state.canManage = Boolean(me.can_manage);
    document.getElementById("user").textContent = `signed in as ${me.user}${me.can_manage ? " (may drain, resume, revoke)" : ""}`;
  } catch (error) {
    showMessage(describeError(error), true);
  }
  if (document.body.classList.contains("embedded")) {
    if (form.elements.dag_id.value && form.elements.task_id.value && form.elements.run_id.value) await explain(form);
    return;
  }
  await refresh();
  schedule();
}

document.addEventListener("DOMContentLoaded", start);
