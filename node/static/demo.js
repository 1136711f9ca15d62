// The demo chat page: fanout.js from this node, nothing else. Sessions, messages,
// assistant replies streamed as their deltas arrive, typing, presence, connection state.
import { FanoutClient, tokenClaims } from "/client/fanout.js";

const DEVICE_KEY = "fanout.demo.device";
const TYPING_EVERY_MS = 2000; // "still typing" at most this often
const TYPING_IDLE_MS = 3000; // no key for this long: "stopped typing"
const TYPING_SHOWN_MS = 6000; // a peer's typing shown at most this long without news

const $ = (id) => document.getElementById(id);
const view = {
  client: null,
  userId: null,
  sessionId: null,
  sessions: new Map(), // id -> {status, agent, li}
  typists: new Map(), // "user/device" -> timer
  typingSentAt: 0,
  typingIdle: null,
};

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text; // never innerHTML: content is users'
  if (cls) node.className = cls;
  return node;
}

// One device per tab (kept across its reloads): two tabs with one id would replace each
// other's socket (1008 "replaced"). The client keeps each device's last_seq in localStorage.
function deviceId() {
  let id = sessionStorage.getItem(DEVICE_KEY);
  if (!id) {
    id = `web-${crypto.randomUUID().slice(0, 8)}`;
    sessionStorage.setItem(DEVICE_KEY, id);
  }
  return id;
}

// -- connection -------------------------------------------------------------------------

function start(token, nodes) {
  const claims = tokenClaims(token);
  if (!claims || typeof claims.sub !== "string") {
    $("signin-error").textContent = "That is not a JWT.";
    return;
  }
  view.userId = claims.sub;
  const client = new FanoutClient({ urls: nodes, deviceId: deviceId(), getToken: () => token });
  view.client = client;
  client.on("state", showState);
  client.on("welcome", () => {
    loadSessions();
    loadPresence();
  });
  client.on("message", ({ session_id, message }) => showMessage(session_id, message));
  client.on("message_delta", showDelta);
  client.on("session", ({ session_id, status, agent }) => updateSession(session_id, { status, agent }));
  client.on("typing", showTyping);
  client.on("presence", ({ device_id, status }) => showDevice(device_id, status === "online"));
  client.on("resumed", ({ complete }) => {
    $("incomplete").hidden = complete;
    if (!complete && view.sessionId) openSession(view.sessionId);
  });
  client.on("error", (error) => showError(`${error.code}: ${error.message}`));
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("who").textContent = `${view.userId} · ${deviceId()}`;
  client.connect();
}

function showState({ state, nodeId, delay }) {
  const pill = $("state");
  pill.dataset.state = state;
  const where = nodeId ? ` to ${nodeId}` : "";
  pill.textContent = state === "reconnecting" && delay !== undefined
    ? `reconnecting in ${delay.toFixed(1)} s`
    : `${state}${state === "open" ? where : ""}`;
  const usable = state === "open" && view.sessionId !== null;
  $("text").disabled = !usable;
  $("send").disabled = !usable;
}

function showError(text) {
  $("typing").textContent = text;
}

// -- sessions ---------------------------------------------------------------------------

async function loadSessions() {
  try {
    const page = await view.client.listSessions({ limit: 50 });
    for (const session of page.items.reverse()) addSession(session);
  } catch (error) {
    showError(`sessions: ${error.message}`);
  }
}

function addSession(session) {
  let known = view.sessions.get(session.id);
  if (!known) {
    const li = el("li");
    li.dataset.id = session.id;
    const button = el("button");
    button.type = "button";
    button.addEventListener("click", () => openSession(session.id));
    li.append(button);
    $("sessions").prepend(li);
    known = { li, status: session.status, agent: session.agent, participants: session.participants };
    view.sessions.set(session.id, known);
  }
  updateSession(session.id, session);
}

function updateSession(sessionId, { status, agent, participants }) {
  const known = view.sessions.get(sessionId);
  if (!known) {
    view.client.getSession(sessionId).then(addSession, () => {});
    return;
  }
  if (status) known.status = status;
  if (agent) known.agent = agent;
  if (participants) known.participants = participants;
  const others = (known.participants ?? []).filter((p) => p !== view.userId);
  const label = `${others.length ? others.join(", ") : "just you"}${known.agent === "ai" ? " + assistant" : ""}`;
  known.li.querySelector("button").textContent = `${label} · ${known.status}`;
  known.li.dataset.status = known.status;
}

async function openSession(sessionId) {
  view.sessionId = sessionId;
  for (const [id, known] of view.sessions) {
    known.li.setAttribute("aria-current", String(id === sessionId));
    if (id === sessionId) known.li.dataset.unread = "false";
  }
  $("session-title").textContent = `Session ${sessionId}`;
  $("messages").replaceChildren();
  $("typing").textContent = "";
  showState({ state: view.client.state, nodeId: view.client.nodeId });
  try {
    const page = await view.client.history(sessionId, { limit: 50 });
    if (view.sessionId !== sessionId) return;
    for (const message of page.items.reverse()) showMessage(sessionId, message);
  } catch (error) {
    showError(`history: ${error.message}`);
  }
}

$("new-session-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const participants = $("participants").value.split(",").map((p) => p.trim()).filter(Boolean);
  try {
    const session = await view.client.createSession({
      participants,
      agent: $("human").checked ? "human" : "ai",
    });
    addSession(session);
    $("participants").value = "";
    await openSession(session.id);
    $("text").focus();
  } catch (error) {
    showError(`new chat: ${error.message}`);
  }
});

// -- messages ---------------------------------------------------------------------------

function bubble(messageId) {
  return $("messages").querySelector(`li[data-id="${CSS.escape(String(messageId))}"]`);
}

function newBubble(messageId, role, author, mine) {
  const li = el("li", undefined, "message");
  li.dataset.id = String(messageId);
  li.dataset.role = role;
  li.dataset.mine = String(mine);
  li.dataset.deltas = "0";
  li.append(el("span", author, "author"), el("span", "", "body"));
  $("messages").append(li);
  return li;
}

function scrollDown() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function showMessage(sessionId, message) {
  if (sessionId !== view.sessionId) {
    view.sessions.get(sessionId)?.li.setAttribute("data-unread", "true");
    if (!view.sessions.has(sessionId)) updateSession(sessionId, {});
    return;
  }
  const mine = message.user_id === view.userId && message.role === "user";
  const author = message.role === "user" || message.role === "agent" ? message.user_id : message.role;
  const li = bubble(message.id) ?? newBubble(message.id, message.role, author, mine);
  li.classList.remove("streaming");
  li.dataset.final = "true";
  li.querySelector(".body").textContent = message.content;
  scrollDown();
}

function showDelta({ session_id, message_id, delta }) {
  if (session_id !== view.sessionId) return;
  const li = bubble(message_id) ?? newBubble(message_id, "assistant", "assistant", false);
  if (li.dataset.final === "true") return; // a late chunk of a reply already stored
  li.classList.add("streaming");
  li.dataset.deltas = String(Number(li.dataset.deltas) + 1);
  li.querySelector(".body").textContent += delta;
  scrollDown();
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !view.sessionId) return;
  $("text").value = "";
  stopTyping();
  try {
    await view.client.send(view.sessionId, text);
  } catch (error) {
    showError(`not sent (${error.code}): ${error.message}`);
    $("text").value = text;
  }
});

// -- typing and presence ----------------------------------------------------------------

$("text").addEventListener("input", () => {
  if (!view.sessionId) return;
  const now = Date.now();
  if (now - view.typingSentAt > TYPING_EVERY_MS) {
    view.typingSentAt = now;
    view.client.typing(view.sessionId, true);
  }
  clearTimeout(view.typingIdle);
  view.typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
});

function stopTyping() {
  clearTimeout(view.typingIdle);
  if (view.typingSentAt && view.sessionId) view.client.typing(view.sessionId, false);
  view.typingSentAt = 0;
}

function showTyping({ session_id, user_id, device_id, is_typing }) {
  if (session_id !== view.sessionId) return;
  const key = `${user_id}/${device_id}`;
  clearTimeout(view.typists.get(key));
  view.typists.delete(key);
  if (is_typing) view.typists.set(key, setTimeout(() => showTyping({ session_id, user_id, device_id, is_typing: false }), TYPING_SHOWN_MS));
  const names = [...new Set([...view.typists.keys()].map((k) => k.split("/")[0]))];
  $("typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

async function loadPresence() {
  try {
    const presence = await view.client.presence(view.userId);
    $("presence").replaceChildren();
    for (const device of presence.devices) {
      if (device.device_id !== deviceId()) showDevice(device.device_id, true);
    }
  } catch (error) {
    showError(`presence: ${error.message}`);
  }
}

function showDevice(id, online) {
  const list = $("presence");
  const existing = list.querySelector(`li[data-device="${CSS.escape(id)}"]`);
  if (!online) {
    existing?.remove();
    return;
  }
  if (existing) return;
  const li = el("li", `● ${id}`);
  li.dataset.device = id;
  list.append(li);
}

// -- start ------------------------------------------------------------------------------

$("nodes").value = location.origin;
$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const nodes = $("nodes").value.split(",").map((u) => u.trim()).filter(Boolean);
  start($("token").value.trim(), nodes.length ? nodes : [location.origin]);
});
// /demo#token=…[&nodes=url,url]: the fragment never reaches a server's logs.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  const nodes = (fragment.get("nodes") ?? location.origin).split(",").filter(Boolean);
  history.replaceState(null, "", location.pathname); // the token leaves the address bar
  start(fragment.get("token"), nodes);
}
