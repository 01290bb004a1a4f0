// The console page: a thin user interface over lq-client.js.
import { LqClient, describeClose } from "/console/lq-client.js";

const $ = (id) => document.getElementById(id);
const LOG_LIMIT = 200;
const TRANSPORT_NAMES = { websocket: "WebSocket", sse: "SSE" };
let client = null;
let config = { demo: false, token: null, webhook: false };

function wsUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

function notice(text) {
  $("notice").textContent = text;
}

function show(state, detail) {
  $("state").textContent = state + (detail && detail.delayMs !== undefined ? ` (in ${detail.delayMs} ms)` : "");
  $("state").dataset.state = state;
  $("transport").textContent = detail && detail.transport ? `over ${TRANSPORT_NAMES[detail.transport]}` : "";
  if (detail && detail.code !== undefined) {
    $("close-code").textContent = detail.refused ? `HTTP ${detail.refused.status}` : detail.code === null ? "—" : String(detail.code);
    $("close-meaning").textContent = `${detail.meaning}${detail.reason ? ` — "${detail.reason}"` : ""}`;
  }
  if (state === "closed" && detail && detail.refused && [401, 403].includes(detail.refused.status)) {
    notice(`refused: ${detail.refused.message}. Paste another token (or get one), then Connect.`);
  } else if (state === "closed" && detail && detail.code === null) {
    notice("no token: paste one (or get one in demo mode), then Connect.");
  }
  if (state === "open") {
    $("recovered").textContent = detail && detail.recovered !== null ? String(detail.recovered) : "— (not resuming)";
  }
  const connected = state === "open" || state === "connecting" || state === "reconnecting";
  $("connect").disabled = connected;
  $("disconnect").disabled = !connected;
}

function log(frame) {
  const item = document.createElement("li");
  item.dataset.type = frame.type;
  const type = document.createElement("span");
  type.className = "type";
  type.textContent = frame.type;
  const parts = [
    frame.channel ? `channel=${frame.channel}` : null,
    frame.from_user ? `from_user=${frame.from_user}` : null,
    typeof frame.offset === "number" ? `offset=${frame.offset}` : null,
    `payload=${JSON.stringify(frame.payload)}`,
  ].filter(Boolean);
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString(undefined, { hour12: false }) + "." + String(now.getMilliseconds()).padStart(3, "0");
  item.append(time, " ", type, " ", parts.join(" "));
  $("log").prepend(item);
  while ($("log").children.length > LOG_LIMIT) $("log").lastElementChild.remove();
}

/** The token typed or minted; "" when there is none (the client then stops and says so). */
async function currentToken() {
  return $("token").value.trim();
}

/**
 * Demo mode: a fresh token for `identity` ("user@tenant"), by default the user and tenant of the
 * fields. From another machine, only the demo user's token of /console/config is handed out.
 */
async function mintToken(identity) {
  const [fieldUser, fieldTenant] = [$("demo-user").value.trim() || "demo", $("demo-tenant").value.trim() || "demo"];
  const [user, tenant] = identity ? identity.split("@") : [fieldUser, fieldTenant];
  if (config.remote) {
    const fresh = await (await fetch("/console/config", { cache: "no-store" })).json();
    $("token").value = $("token").dataset.demo = fresh.token;
    $("token").dataset.identity = "demo@demo";
    return { token: fresh.token, user: "demo", tenant: "demo" };
  }
  const response = await fetch(`/console/token?user=${encodeURIComponent(user)}&tenant=${encodeURIComponent(tenant)}`, { cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (response.status === 403 && body.code === "not_this_machine") {
    // Opened from another machine: the demo user only.
    config.remote = true;
    $("demo").hidden = true;
    return mintToken();
  }
  if (!response.ok) throw new Error(body.message || `HTTP ${response.status}`);
  $("token").value = $("token").dataset.demo = body.token;
  $("token").dataset.identity = `${body.user}@${body.tenant}`;
  return body;
}

function payload() {
  const text = $("message").value;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

$("connect").addEventListener("click", () => {
  if (client) {
    // The old client's own close is not news.
    client.options.onState = null;
    client.disconnect();
  }
  client = new LqClient({
    url: wsUrl(),
    transport: $("transport-choice").value,
    getToken: async () => {
      // In demo mode a fresh token of the same user is minted for every connection and refresh.
      if (config.demo && $("token").value && $("token").dataset.demo === $("token").value) {
        // The same user as the token in use, whatever the fields say now.
        await mintToken($("token").dataset.identity);
      }
      return currentToken();
    },
    onState: show,
    onWelcome: (welcome) => log(welcome),
    onEnvelope: log,
  });
  client.connect();
});

$("disconnect").addEventListener("click", () => client && client.disconnect());

/** What the console shows of each subscription: name -> {state, position}. */
const topics = new Map();

function renderTopics() {
  const list = $("subscriptions");
  list.replaceChildren();
  for (const [name, topic] of topics) {
    const item = document.createElement("li");
    item.dataset.topic = name;
    item.dataset.state = topic.state;
    const label = document.createElement("span");
    label.className = "topic";
    const at = topic.position ? ` at ${topic.position.epoch}:${topic.position.offset}` : "";
    label.textContent = `${name} — ${topic.state}${at}`;
    const button = (text, action, onClick) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = text;
      b.dataset.action = action;
      b.addEventListener("click", onClick);
      return b;
    };
    item.append(
      label,
      " ",
      button("Publish", "publish", () => notice(client && client.publish(name, payload()) ? `published to ${name}` : "not connected")),
      button("Who is here?", "presence", () => notice(client && client.presence(name) ? `presence of ${name} asked` : "not connected")),
      button("Unsubscribe", "unsubscribe", () => {
        const subscription = client && client.subscriptions.get(name);
        if (subscription) subscription.unsubscribe();
        topics.delete(name);
        renderTopics();
      }),
    );
    list.append(item);
  }
}

$("subscribe").addEventListener("click", () => {
  const name = $("topic-name").value.trim();
  if (!client) {
    notice("connect first");
    return;
  }
  if (!name) {
    notice("enter a topic name");
    return;
  }
  const topic = { state: "subscribing", position: null };
  topics.set(name, topic);
  const subscription = client.subscribe(name, {
    presence: $("topic-presence").checked,
    onSubscribed: (frame) => {
      topic.state = frame.payload.recovered === false ? "subscribed (not recovered)" : "subscribed";
      topic.position = subscription.position;
      renderTopics();
    },
    onMessage: () => {
      topic.position = subscription.position;
      renderTopics();
    },
    onUnsubscribed: (reason) => {
      topic.state = `ended: ${reason}`;
      renderTopics();
    },
  });
  renderTopics();
});
$("send-message").addEventListener("click", () => notice(client && client.message(payload()) ? "message sent" : "not connected"));
$("send-direct").addEventListener("click", () => {
  const to = $("direct-to").value.trim();
  if (!to) {
    notice("enter the user id to send to");
    return;
  }
  notice(client && client.direct(to, payload()) ? `direct message sent to ${to}` : "not connected");
});
$("send-presence").addEventListener("click", () => notice(client && client.presence() ? "presence asked" : "not connected"));
$("mint").addEventListener("click", async () => {
  try {
    const minted = await mintToken();
    notice(`token for user ${minted.user} of tenant ${minted.tenant}: Connect to use it`);
  } catch (error) {
    notice(`no token: ${error.message}`);
  }
});
$("send-webhook").addEventListener("click", async () => {
  const response = await fetch("/console/webhook", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(payload()),
  });
  const body = await response.json().catch(() => ({}));
  notice(response.ok ? `webhook accepted: ${body.message_id}` : `webhook refused: ${response.status} ${body.message || ""}`);
});

(async () => {
  try {
    config = await (await fetch("/console/config")).json();
  } catch {
    // Served without the configuration endpoint: nothing to prefill.
  }
  const params = new URLSearchParams(location.search);
  if (config.demo && config.token) {
    $("demo").hidden = false;
    $("demo-user").value = params.get("user") || "demo";
    $("demo-tenant").value = params.get("tenant") || "demo";
    await mintToken().catch((error) => notice(`no demo token: ${error.message}`));
    $("mode").textContent = "Demo mode: tokens of this process for any user and tenant; open another tab (?user=bob&tenant=demo) to try a second user. Set JWT_SECRET_KEY for anything but a trial.";
  } else {
    $("mode").textContent = "Paste a token for your tenant and user, then connect.";
  }
  $("send-webhook").hidden = !config.webhook;
  window.lqConsole = { describeClose, get client() { return client; } };
})();
