"""The chat page served at ``/``: one dependency-free HTML/JS document (streamed replies, the thinking
folded in a <details>, a stop button, an optional API key kept in sessionStorage).

Kept as a Python string so it ships inside the package with no package-data configuration."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gemma4 chat</title>
<style>
  :root { --fg: #1d1d1f; --muted: #6e6e73; --line: #d2d2d7; --me: #e8f0fe; --bg: #fff; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg);
         display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: .75rem; align-items: center; padding: .6rem 1rem; border-bottom: 1px solid var(--line); flex-wrap: wrap; }
  header h1 { font-size: 1rem; margin: 0; }
  header .model { color: var(--muted); }
  header label { color: var(--muted); font-size: .9rem; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; }
  .msg { max-width: 52rem; margin: 0 auto .9rem; white-space: pre-wrap; word-wrap: break-word; }
  .msg.user { background: var(--me); border-radius: .6rem; padding: .5rem .8rem; }
  .msg.assistant .answer:empty::before { content: "\2026"; color: var(--muted); }
  .msg.error { color: #b00020; }
  details.thinking { color: var(--muted); border-left: 3px solid var(--line); padding-left: .6rem; margin-bottom: .4rem; }
  details.thinking summary { cursor: pointer; font-size: .9rem; }
  .meta { color: var(--muted); font-size: .8rem; }
  form { display: flex; gap: .5rem; padding: .75rem 1rem; border-top: 1px solid var(--line); }
  textarea { flex: 1; resize: none; font: inherit; padding: .5rem; border: 1px solid var(--line); border-radius: .4rem; }
  button { font: inherit; padding: .4rem 1rem; border-radius: .4rem; border: 1px solid var(--line); background: #f5f5f7; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
</style>
</head>
<body>
<header>
  <h1>gemma4</h1><span class="model" id="model">&hellip;</span>
  <label><input type="checkbox" id="think"> thinking</label>
  <label>API key <input type="password" id="key" size="14" autocomplete="off"></label>
  <button type="button" id="clear">New chat</button>
</header>
<main id="log" aria-live="polite"></main>
<form id="form">
  <textarea id="input" rows="2" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
  <button type="submit" id="send">Send</button>
  <button type="button" id="stop" disabled>Stop</button>
</form>
<script>
"use strict";
// A dependency-free client of this server's /v1/chat/completions (streamed). Text is only ever set with
// textContent, never parsed as HTML.
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop");
let history = [], modelName = null, controller = null;
$("key").value = sessionStorage.getItem("gemma4-key") || "";
$("key").addEventListener("change", () => { sessionStorage.setItem("gemma4-key", $("key").value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    modelName = r.ok ? j.data[0].id : null;
    $("model").textContent = r.ok ? modelName : (j.error ? j.error.message : "unavailable");
  } catch (e) { $("model").textContent = "server unreachable"; }
}
function add(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (text !== undefined) div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}
function busy(on) { send.disabled = on; stop.disabled = !on; input.disabled = on; }

async function ask(text) {
  history.push({ role: "user", content: text });
  add("user", text);
  const box = add("assistant");
  const details = document.createElement("details");
  details.className = "thinking"; details.hidden = true;
  const summary = document.createElement("summary"); summary.textContent = "thinking";
  const thought = document.createElement("div");
  details.append(summary, thought);
  const answer = document.createElement("div"); answer.className = "answer";
  const meta = document.createElement("div"); meta.className = "meta";
  box.append(details, answer, meta);
  let content = "", reasoning = "", finish = null;
  controller = new AbortController();
  busy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: modelName, messages: history, stream: true,
                             stream_options: { include_usage: true },
                             chat_template_kwargs: { enable_thinking: $("think").checked } }),
    });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error(j.error ? j.error.message : "HTTP " + r.status);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.usage) meta.textContent = j.usage.completion_tokens + " tokens";
        for (const c of j.choices || []) {
          const d = c.delta || {};
          if (d.reasoning_content) { reasoning += d.reasoning_content; thought.textContent = reasoning; details.hidden = false; }
          if (d.content) { content += d.content; answer.textContent = content; }
          if (c.finish_reason) finish = c.finish_reason;
        }
        log.scrollTop = log.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { add("error", e.message); }
  } finally {
    busy(false); controller = null; input.focus();
  }
  if (finish && finish !== "stop") meta.textContent += (meta.textContent ? " \u00b7 " : "") + finish;
  const msg = { role: "assistant", content: content };
  if (reasoning) msg.reasoning_content = reasoning;
  history.push(msg);
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  ask(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
stop.addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history = []; log.textContent = ""; });
// A link may open the page with a first message: /#ask=Hello&think=1 (handy for sharing and for tests).
const start = new URLSearchParams(location.hash.slice(1));
if (start.get("think") === "1") $("think").checked = true;
loadModel().then(() => { if (start.get("ask")) ask(start.get("ask")); });
</script>
</body>
</html>
"""
