// ember's chat page: a client of the server's own OpenAI API (/v1/models,
// /v1/chat/completions with stream: true). Replies are rendered with textContent, never as
// HTML. The cost figures come from the x-ember-* response headers (a stream's cover its
// first token) and from the stream's closing `: x-ember-cost {...}` comment (the whole reply).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ember.apiKey";
const COST_COMMENT = ": x-ember-cost ";

const state = { history: [], modelName: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The server's message for a failed call: OpenAI's {"error": {"message"}} body.
async function errorText(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  return `HTTP ${response.status}: ${message}`;
}

async function loadModel() {
  const label = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      state.modelName = null;
      label.textContent = await errorText(r);
      return;
    }
    const models = (await r.json()).data || [];
    state.modelName = models.length ? models[0].id : null;
    label.textContent = state.modelName || "no model";
  } catch (e) {
    label.textContent = "server unreachable: " + e.message;
  }
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "message " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "error" ? "error" : role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;  // text, never HTML
  box.append(who, content);
  $("conversation").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function costFromHeaders(h) {
  if (!h.has("x-ember-energy-joules")) return null;
  return {
    cpu_seconds: Number(h.get("x-ember-cpu-seconds")),
    energy_joules: Number(h.get("x-ember-energy-joules")),
    energy_source: h.get("x-ember-energy-source"),
    cost_usd: Number(h.get("x-ember-cost-usd")),
    carbon_grams: Number(h.get("x-ember-carbon-grams")),
    scope: h.get("x-ember-cost-scope"),
  };
}

function showStats(box, s) {
  const parts = [];
  parts.push(`${s.tokens} tokens`);
  if (s.tokensPerSecond !== null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.ttft !== null) parts.push(`TTFT ${(s.ttft * 1000).toFixed(0)} ms`);
  const c = s.cost;
  if (c) {
    const upTo = c.scope === "first-token" ? " (to the first token)" : "";
    parts.push(`${c.energy_joules.toPrecision(3)} J (${c.energy_source})${upTo}`);
    parts.push(`CPU ${c.cpu_seconds.toFixed(3)} s`);
    parts.push(`$${c.cost_usd.toPrecision(2)}`);
    parts.push(`${c.carbon_grams.toPrecision(2)} gCO2e`);
  }
  if (s.stopped) parts.push("stopped");
  let line = box.querySelector(".stats");
  if (!line) {
    line = document.createElement("div");
    line.className = "stats";
    box.append(line);
  }
  line.textContent = parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  if (state.modelName) body.model = state.modelName;

  const userBox = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const content = reply.querySelector(".content");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const stats = { tokens: 0, tokensPerSecond: null, ttft: null, cost: null, stopped: false };
  const start = performance.now();
  let firstAt = null, lastAt = null, chunks = 0, failed = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) {
      failed = await errorText(r);
      return;
    }
    stats.cost = costFromHeaders(r.headers);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (line.startsWith(COST_COMMENT)) {
          stats.cost = { ...JSON.parse(line.slice(COST_COMMENT.length)), scope: "request" };
          continue;
        }
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) {
          failed = event.error.message;
          continue;
        }
        if (event.usage) stats.tokens = event.usage.completion_tokens;
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) {
          const now = performance.now();
          if (firstAt === null) firstAt = now;
          lastAt = now;
          chunks += 1;
          content.textContent += delta.content;  // text, never HTML
          reply.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stats.stopped = true;
    else failed = e.message;
  } finally {
    state.controller = null;
    setBusy(false);
    reply.classList.remove("streaming");
    if (failed !== null && !content.textContent) {
      // Nothing came back: the turn did not happen. Show why, give the text back to edit.
      reply.remove();
      userBox.remove();
      addMessage("error", failed);
      if (!$("prompt").value) $("prompt").value = text;
    } else {
      if (failed !== null) addMessage("error", failed);
      state.history.push({ role: "user", content: text },
                         { role: "assistant", content: content.textContent });
      if (!stats.tokens) stats.tokens = chunks;  // stopped before the usage chunk
      if (firstAt !== null) {
        stats.ttft = (firstAt - start) / 1000;
        const decoding = (lastAt - firstAt) / 1000;
        stats.tokensPerSecond = stats.tokens > 1 && decoding > 0
          ? (stats.tokens - 1) / decoding : null;
      }
      showStats(reply, stats);
    }
  }
}

function submit(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("conversation").replaceChildren();
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
  $("composer").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) submit(e);
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModel();
  $("prompt").focus();
});
