// The chat page: talks to this server's public API only (/v1/models, /v1/chat/completions streamed
// as server-sent events, /health). Conversations live in localStorage. Model and server text is
// only ever put into the page as text nodes (see markdown.js), never as HTML. "Answer as JSON" sends
// OpenAI's response_format: json_schema with the schema box's schema (checked as JSON here first),
// or json_object when the box is empty.

import { renderMarkdown } from "./markdown.js";

const KEY = "elm-mlx-chat/v1";
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), status: $("server-status"), list: $("conversations"), messages: $("messages"), notice: $("notice"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"), exportButton: $("export"),
  system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"), topP: $("top-p"),
  topPValue: $("top-p-value"), maxTokens: $("max-tokens"), jsonOn: $("json-on"), jsonFields: $("json-fields"), schema: $("schema"),
  schemaError: $("schema-error"),
};

let model = null; // the id /v1/models lists
let running = null; // {controller, message, element} while an answer streams

// ---- storage ------------------------------------------------------------------------------

const DEFAULT_SETTINGS = { system: "", temperature: 0.7, top_p: 0.95, max_tokens: 256, json: false, schema: "" };

function loadStore() {
  try {
    const data = JSON.parse(localStorage.getItem(KEY) || "null");
    if (data && Array.isArray(data.conversations)) {
      data.settings = { ...DEFAULT_SETTINGS, ...(data.settings || {}) };
      data.settings.json = data.settings.json === true;
      if (typeof data.settings.schema !== "string") data.settings.schema = "";
      data.conversations = data.conversations.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
      return data;
    }
  } catch (e) {
    console.warn("stored conversations unreadable; starting afresh", e);
  }
  return { conversations: [], current: null, settings: { ...DEFAULT_SETTINGS } };
}

const store = loadStore();

function save() {
  try {
    localStorage.setItem(KEY, JSON.stringify(store));
  } catch (e) {
    showNotice("Could not save the conversation in this browser's storage", String(e));
  }
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function current() {
  let conversation = store.conversations.find((c) => c.id === store.current);
  if (!conversation) {
    conversation = { id: newId(), title: "New chat", created: new Date().toISOString(), messages: [] };
    store.conversations.unshift(conversation);
    store.current = conversation.id;
  }
  return conversation;
}

// ---- rendering ----------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.completion_tokens !== undefined) parts.push(`${stats.completion_tokens} tokens`);
  if (stats.tokens_per_s) parts.push(`${stats.tokens_per_s.toFixed(1)} tok/s`);
  if (stats.ttft_ms !== undefined) parts.push(`first token ${(stats.ttft_ms / 1000).toFixed(2)} s`);
  if (stats.prompt_tokens !== undefined) parts.push(`prompt ${stats.prompt_tokens} tokens, ${stats.cached_tokens || 0} cached`);
  if (stats.stopped) parts.push(`stopped after ${(stats.elapsed_ms / 1000).toFixed(1)} s`);
  else if (stats.finish_reason) parts.push(`finish: ${stats.finish_reason}`);
  return parts.join(" · ");
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function jsonBlock(text) {
  // an answer asked for as JSON: its text as written, in a code block (a text node, like everything else)
  const pre = el("pre", "json");
  pre.append(el("code", "", text));
  return pre;
}

function fillAnswer(element, message) {
  element.querySelector(".body").replaceChildren(message.format === "json" ? jsonBlock(message.content) : renderMarkdown(message.content));
  element.querySelector(".stats").textContent = statsText(message.stats);
}

function messageElement(message) {
  const element = el("div", `message ${message.role}`);
  element.append(el("div", "role", message.role === "user" ? "You" : model || "Model"));
  if (message.role === "user") {
    element.append(el("div", "body", message.content));
    return element;
  }
  element.append(el("div", "body"));
  const meta = el("div", "meta");
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.title = "copy this answer";
  copy.addEventListener("click", () => copyText(message.content, copy));
  meta.append(el("span", "stats"), copy);
  element.append(meta);
  fillAnswer(element, message);
  return element;
}

function renderMessages() {
  const conversation = current();
  ui.messages.replaceChildren();
  for (const message of conversation.messages) {
    const element = messageElement(message);
    if (running && running.message === message) {
      running.element = element;
      element.classList.add("streaming");
    }
    ui.messages.append(element);
  }
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderList() {
  ui.list.replaceChildren();
  for (const conversation of store.conversations) {
    const item = el("li", conversation.id === store.current ? "active" : "");
    const open = el("button", "open", conversation.title || "New chat");
    open.type = "button";
    open.addEventListener("click", () => {
      store.current = conversation.id;
      save();
      render();
    });
    const remove = el("button", "delete", "×");
    remove.type = "button";
    remove.title = "delete this conversation";
    remove.addEventListener("click", () => {
      if (running && conversation.messages.includes(running.message)) running.controller.abort();
      store.conversations = store.conversations.filter((c) => c !== conversation);
      if (store.current === conversation.id) store.current = store.conversations[0]?.id ?? null;
      save();
      render();
    });
    item.append(open, remove);
    ui.list.append(item);
  }
}

function render() {
  renderMessages();
  renderList();
}

function showNotice(title, detail) {
  ui.notice.replaceChildren(el("strong", "", title));
  if (detail) ui.notice.append(el("div", "detail", detail));
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.notice.replaceChildren();
}

// ---- settings -------------------------------------------------------------------------------

function bindSettings() {
  const s = store.settings;
  ui.system.value = s.system;
  ui.temperature.value = s.temperature;
  ui.topP.value = s.top_p;
  ui.maxTokens.value = s.max_tokens;
  const update = () => {
    s.system = ui.system.value;
    s.temperature = Number(ui.temperature.value);
    s.top_p = Number(ui.topP.value);
    s.max_tokens = ui.maxTokens.value === "" ? null : Number(ui.maxTokens.value);
    ui.temperatureValue.textContent = s.temperature.toFixed(2);
    ui.topPValue.textContent = s.top_p.toFixed(2);
    save();
  };
  for (const input of [ui.system, ui.temperature, ui.topP, ui.maxTokens]) input.addEventListener("input", update);
  ui.temperatureValue.textContent = Number(s.temperature).toFixed(2);
  ui.topPValue.textContent = Number(s.top_p).toFixed(2);

  ui.jsonOn.checked = s.json;
  ui.schema.value = s.schema;
  ui.jsonFields.hidden = !s.json;
  ui.jsonOn.addEventListener("change", () => {
    s.json = ui.jsonOn.checked;
    ui.jsonFields.hidden = !s.json;
    showSchemaProblem(null);
    save();
  });
  ui.schema.addEventListener("input", () => {
    s.schema = ui.schema.value;
    if (!ui.schemaError.hidden) showSchemaProblem(schemaProblem(s.schema)); // a shown error goes once fixed
    save();
  });
  ui.schema.addEventListener("change", () => showSchemaProblem(schemaProblem(s.schema)));
}

// ---- structured output ------------------------------------------------------------------------

// What is wrong with the schema box's text, or null (empty is fine: any JSON object). Whether it is a
// schema the server can follow is the server's to say (a 400 with its compiler's message).
function schemaProblem(text) {
  if (!text.trim()) return null;
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (e) {
    return `The schema is not valid JSON: ${e.message}`;
  }
  if (typeof schema !== "boolean" && (schema === null || typeof schema !== "object" || Array.isArray(schema))) {
    return 'The schema must be a JSON object, e.g. {"type": "object"}.';
  }
  return null;
}

function showSchemaProblem(problem) {
  ui.schemaError.textContent = problem || "";
  ui.schemaError.hidden = !problem;
  ui.schema.classList.toggle("invalid", Boolean(problem));
}

// The request's response_format: undefined for free text (check schemaProblem first).
function responseFormat() {
  const s = store.settings;
  if (!s.json) return undefined;
  if (!s.schema.trim()) return { type: "json_object" };
  return { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(s.schema), strict: true } };
}

// ---- talking to the server ----------------------------------------------------------------------

class ServerError extends Error {
  constructor(title, detail) {
    super(detail);
    this.title = title;
  }
}

async function refusal(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      code = body.error.code;
      param = body.error.param;
    }
  } catch {
    // not JSON: keep the status line
  }
  if (code === "context_length_exceeded") {
    return new ServerError("The conversation no longer fits the model's context. Start a new chat or lower Max tokens.", message);
  }
  if (response.status === 429 || response.status === 503) return new ServerError(`The server is busy (${response.status}).`, message);
  if (response.status >= 500) return new ServerError(`The server failed (${response.status}).`, message);
  if (param === "response_format") return new ServerError(`The server refused the JSON schema (${response.status}).`, message);
  return new ServerError(`The server refused the request (${response.status}).`, message);
}

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody(conversation) {
  const s = store.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conversation.messages) if (m.content) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true }, temperature: s.temperature, top_p: s.top_p };
  if (model) body.model = model;
  if (s.max_tokens !== null && s.max_tokens !== undefined) body.max_tokens = s.max_tokens;
  const format = responseFormat();
  if (format) body.response_format = format;
  return body;
}

async function watchQueue(started) {
  // while no token has arrived: say so when the server is busy with other requests
  await new Promise((r) => setTimeout(r, 800));
  while (running && running.started === started && running.firstTokenAt === undefined) {
    try {
      const health = await (await fetch("/health")).json();
      if (running && running.started === started && running.firstTokenAt === undefined && (health.queued > 0 || health.active >= health.max_batch)) {
        showNotice("The server is busy with other requests; yours starts when a slot frees.",
          `${health.active} answering, ${health.queued} waiting (up to ${health.max_batch} at once)`);
      }
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 1500));
  }
}

async function send() {
  const text = ui.prompt.value;
  if (!text.trim() || running) return;
  const problem = store.settings.json ? schemaProblem(store.settings.schema) : null;
  showSchemaProblem(problem);
  if (problem) {
    ui.schema.focus(); // nothing sent; the message stays in its box
    return;
  }
  const conversation = current();
  clearNotice();
  const user = { role: "user", content: text };
  conversation.messages.push(user);
  const body = requestBody(conversation);
  if (conversation.title === "New chat") conversation.title = text.trim().slice(0, 48);
  conversation.system = store.settings.system;
  const answer = { role: "assistant", content: "", stats: null };
  if (body.response_format) answer.format = "json";
  conversation.messages.push(answer);
  ui.prompt.value = "";
  save();
  render();
  const started = performance.now();
  running = { controller: new AbortController(), message: answer, element: ui.messages.lastElementChild, started };
  running.element.classList.add("streaming");
  ui.send.disabled = true;
  ui.stop.disabled = false;
  watchQueue(started);
  let usage = null;
  let finish = null;
  let failure = null;
  let stopped = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: running.controller.signal,
    });
    if (!response.ok) throw await refusal(response);
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError("The server failed while answering.", String(chunk.error.message));
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (running.firstTokenAt === undefined) {
          running.firstTokenAt = performance.now();
          clearNotice();
        }
        answer.content += choice.delta.content;
        const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
        if (running.element.isConnected) fillAnswer(running.element, answer);
        if (atBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else if (e instanceof ServerError) failure = e;
    else failure = new ServerError("Cannot reach the server.", String(e.message || e));
  }
  const ended = performance.now();
  const first = running.firstTokenAt;
  const element = running.element;
  running = null;
  ui.send.disabled = false;
  ui.stop.disabled = true;
  if (element) element.classList.remove("streaming");
  if (stopped) clearNotice();
  const at = conversation.messages.indexOf(answer);
  if ((failure || stopped) && !answer.content && at > 0) {
    // nothing was generated: take the question back so that it can be edited and sent again
    conversation.messages.splice(at - 1, 2);
    if (!ui.prompt.value) ui.prompt.value = text;
    if (conversation.messages.length === 0) conversation.title = "New chat";
  } else {
    answer.stats = { elapsed_ms: ended - started, finish_reason: finish, stopped };
    if (first !== undefined) answer.stats.ttft_ms = first - started;
    if (usage) {
      answer.stats.completion_tokens = usage.completion_tokens;
      answer.stats.prompt_tokens = usage.prompt_tokens;
      answer.stats.cached_tokens = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
      if (usage.completion_tokens > 1 && first !== undefined && ended > first) {
        answer.stats.tokens_per_s = (usage.completion_tokens - 1) / ((ended - first) / 1000);
      }
    }
  }
  save();
  render();
  if (failure) showNotice(failure.title, failure.message);
  refreshHealth();
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw await refusal(response);
    const data = await response.json();
    model = data.data && data.data[0] ? data.data[0].id : null;
    ui.model.textContent = model || "(no model)";
    document.title = `${model} · elm-mlx chat`;
    for (const role of ui.messages.querySelectorAll(".message.assistant .role")) role.textContent = model;
  } catch (e) {
    ui.model.textContent = "(unknown model)";
    showNotice(e.title || "Cannot reach the server.", String(e.message || e));
  }
}

async function refreshHealth() {
  try {
    const health = await (await fetch("/health")).json();
    const busy = health.active > 0 || health.queued > 0;
    ui.status.textContent = busy ? `busy: ${health.active} answering, ${health.queued} waiting` : "ready";
    ui.status.className = "pill " + (health.queued > 0 || health.active >= health.max_batch ? "busy" : "ready");
  } catch {
    ui.status.textContent = "unreachable";
    ui.status.className = "pill down";
  }
}

function pollHealth() {
  if (document.visibilityState === "visible") refreshHealth();
  setTimeout(pollHealth, 3000);
}

function exportConversation() {
  const conversation = current();
  const data = { format: "elm-mlx-chat", version: 1, exported: new Date().toISOString(), model, settings: store.settings, conversation };
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = `elm-mlx-chat-${conversation.created.slice(0, 19).replace(/[:T]/g, "-")}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ---- wiring ---------------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => running && running.controller.abort());
ui.newChat.addEventListener("click", () => {
  const conversation = current();
  if (conversation.messages.length) {
    store.current = null;
    current();
  }
  clearNotice();
  save();
  render();
  ui.prompt.focus();
});
ui.exportButton.addEventListener("click", exportConversation);

bindSettings();
render();
loadModel();
pollHealth();
ui.prompt.focus();
