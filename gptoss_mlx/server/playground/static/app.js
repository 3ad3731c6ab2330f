// The playground: one conversation at a time, streamed from this server's Responses API and
// saved after every reply in the store the TUI and `gptoss-mlx chat --resume` use (Chat
// Completions JSON: a leading system message for the instructions, assistant messages with
// `reasoning` and `tool_calls`, tool results). Model text only ever reaches the page as text
// nodes (markdown.js); nothing here parses HTML.
import { codeBlock, el, renderMarkdown } from "./markdown.js";

const $ = (selector) => document.querySelector(selector);

const state = {
  info: null,
  key: sessionStorage.getItem("gptoss-mlx-key"),
  chat: null, // {id, title, messages (no instructions), reasoning_effort, tools, response_format}
  controller: null, // the reply being streamed
  pending: [], // the client's function calls waiting for a result typed in the page
  saves: new Map(), // chat id -> its save under way: opened or deleted after it lands
};

// ---- the server --------------------------------------------------------------------------
class APIError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const UNREACHABLE = "cannot reach the server: is gptoss-mlx serve still running? (start it again and retry)";
// the stream ended mid-reply without the server's last event (the browser says "network error")
const CUT_OFF = "the server stopped answering mid-reply: is gptoss-mlx serve still running? (start it again and retry)";

async function request(path, { method = "GET", body, signal } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let response;
  try {
    response = await fetch(path, { method, headers, signal, body: body && JSON.stringify(body) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new APIError(0, UNREACHABLE); // the browser's own words ("Failed to fetch") say nothing
  }
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    ({ message, code } = (await response.json()).error);
  } catch { /* not our error shape: keep the status line */ }
  if (response.status === 401) askForKey(state.key ? "The server refused this key." : "");
  throw new APIError(response.status, message, code);
}

const api = async (path, options) => (await request(path, options)).json();

function askForKey(why = "") {
  $("#key-form").hidden = false;
  $("#key-error").textContent = why;
  $("#key").focus();
}

// A message about the page itself (a chat that cannot be opened, the server gone), apart from
// the conversation on screen.
// A copy's title: the chat's, as the server takes titles (one line, no control characters,
// 200 characters at most, counted as characters: a cut through an emoji's pair was refused).
function copyTitle(title) {
  const clean = [...(title || "Chat")].filter((c) => !/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/.test(c)).join("").trim();
  return `${[...(clean || "Chat")].slice(0, 193).join("")} (copy)`;
}

function alertUser(message) {
  $("#alert").textContent = message;
  $("#alert").hidden = !message;
}

// ---- conversations -----------------------------------------------------------------------
function newChat() { // untitled until saved: the server names it after its first message
  return { id: null, title: null, updated: null, instructions: "", messages: [], tools: [], response_format: null,
           reasoning_effort: state.info?.reasoning_effort ?? "medium" };
}

function savedForm(chat) { // the instructions the replies were made with, not what the box holds now
  const instructions = chat.instructions;
  const data = { ...(chat.title && { title: chat.title }), reasoning_effort: chat.reasoning_effort,
                 messages: [...(instructions.trim() ? [{ role: "system", content: instructions }] : []), ...chat.messages] };
  if (chat.tools.length) data.tools = chat.tools.map((t) => ({ type: "function", function: t }));
  if (chat.response_format) data.response_format = chat.response_format;
  return data;
}

// Saves the chat; over its file only if nobody changed it since (another tab, the TUI, the
// terminal chat): else the conversation becomes a new chat, and the returned note says so. The
// chat is the one the reply was made in, whichever is open when the server answers (New chat, or
// another chat opened meanwhile, must not take its id), and its saves go one at a time (each
// needs the id and version the one before it got).
async function save() {
  const chat = state.chat;
  const data = savedForm(chat);
  const before = chat.saving;
  let done;
  const saving = chat.saving = new Promise((resolve) => { done = resolve; });
  if (chat.id) state.saves.set(chat.id, saving);
  try {
    await before;
    let saved;
    let note = "";
    try {
      saved = chat.id
        ? await api(`/v1/playground/chats/${encodeURIComponent(chat.id)}`,
                    { method: "PUT", body: { ...data, title: undefined, base: chat.updated } }) // keeps a rename made elsewhere
        : await api("/v1/playground/chats", { method: "POST", body: data });
    } catch (e) {
      if (!["chat_changed", "chat_deleted"].includes(e.code)) throw e;
      saved = await api("/v1/playground/chats", { method: "POST", body: { ...data, title: copyTitle(data.title) } });
      note = `${e.message}: this conversation is saved as a new chat, "${saved.title}"`;
    }
    chat.id = saved.id;
    chat.title = saved.title;
    chat.updated = saved.updated;
    if (state.chat === chat) location.hash = `chat=${encodeURIComponent(saved.id)}`;
    await listChats();
    return note;
  } finally {
    done();
    for (const [id, other] of state.saves) if (other === saving) state.saves.delete(id);
  }
}

async function listChats() {
  const list = $("#chats");
  let entries;
  try {
    entries = (await api("/v1/playground/chats")).data;
  } catch (e) {
    list.replaceChildren(el("li", "error", e.message));
    return;
  }
  list.replaceChildren(...entries.map(chatRow));
}

function chatRow(entry) {
  const li = el("li");
  li.dataset.id = entry.id;
  li.classList.toggle("current", entry.id === state.chat.id);
  const open = el("button", "open", entry.title);
  open.type = "button";
  open.title = entry.problem || entry.title;
  if (entry.messages < 0) open.classList.add("unreadable");
  open.addEventListener("click", () => openChat(entry.id));
  const rename = el("button", "rename", "✎");
  rename.type = "button";
  rename.setAttribute("aria-label", `Rename ${entry.title}`);
  rename.addEventListener("click", () => renameRow(li, entry));
  const remove = el("button", "delete", "×");
  remove.type = "button";
  remove.setAttribute("aria-label", `Delete ${entry.title}`);
  remove.addEventListener("click", () => deleteRow(remove, entry));
  li.append(open, rename, remove);
  return li;
}

function renameRow(li, entry) {
  const input = el("input", "title-edit");
  input.value = entry.title;
  const open = li.querySelector(".open");
  open.replaceWith(input);
  input.focus();
  input.select();
  input.addEventListener("keydown", async (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      input.replaceWith(open);
    } else if (event.key === "Enter") {
      event.preventDefault();
      if (!input.value.trim()) {
        input.setCustomValidity("A title cannot be empty (Esc keeps the old one)");
        input.reportValidity();
        return;
      }
      try {
        await api(`/v1/playground/chats/${encodeURIComponent(entry.id)}`, { method: "PATCH", body: { title: input.value } });
        if (entry.id === state.chat.id) state.chat.title = input.value.trim();
        alertUser("");
      } catch (e) {
        alertUser(e.message);
      }
      await listChats();
    } else {
      input.setCustomValidity("");
    }
  });
}

async function deleteRow(button, entry) {
  if (entry.id === state.chat.id && state.controller) { // (its reply's save brought it back as a copy)
    alertUser("A reply is being written: stop it to delete this chat");
    return;
  }
  if (button.textContent !== "Delete?") { // the first click asks, the second deletes
    button.textContent = "Delete?";
    return;
  }
  try {
    await state.saves.get(entry.id); // this page's own save first: deleted after it, not copied
    await api(`/v1/playground/chats/${encodeURIComponent(entry.id)}`, { method: "DELETE" });
  } catch (e) {
    alertUser(e.message);
  }
  if (entry.id === state.chat.id) startChat();
  await listChats();
}

async function openChat(id) {
  if (state.controller) return;
  let data;
  try {
    await state.saves.get(id); // opened as this page's save under way leaves it
    data = await api(`/v1/playground/chats/${encodeURIComponent(id)}`);
  } catch (e) {
    alertUser(e.message);
    return;
  }
  const messages = [...data.messages];
  const first = messages[0];
  $("#instructions").value = first && ["system", "developer"].includes(first.role) ? textOf(messages.shift().content) : "";
  const tools = (data.tools || []).map((t) => t.function || t);
  $("#tools").value = tools.length ? JSON.stringify(tools.map((t) => ({ type: "function", ...t })), null, 2) : "";
  const format = data.response_format?.json_schema;
  $("#schema").value = format?.schema ? JSON.stringify(format.schema, null, 2) : "";
  state.chat = { id: data.id, title: data.title || data.id, updated: data.updated ?? null,
                 instructions: $("#instructions").value, messages, tools, response_format: data.response_format || null,
                 reasoning_effort: data.reasoning_effort || "medium" }; // the server checked it
  location.hash = `chat=${encodeURIComponent(data.id)}`;
  alertUser("");
  state.pending = [];
  showEffort();
  renderChat();
  document.body.classList.remove("sidebar-open");
  await listChats();
}

// The address names the chat shown: Back, Forward or an edited address open the chat it names.
// While a reply is written, or when that chat cannot be opened, the address goes back to the
// chat on screen (a reload must not open another one than the page shows).
async function followAddress() {
  const wanted = new URLSearchParams(location.hash.slice(1)).get("chat");
  if (wanted === state.chat.id || (!wanted && !state.chat.id)) return;
  if (state.controller) alertUser("A reply is being written: stop it to open another chat");
  else if (wanted) await openChat(wanted);
  else {
    startChat();
    alertUser(""); // (an earlier address's error stayed)
  }
  if (wanted !== state.chat.id) {
    history.replaceState(null, "", state.chat.id ? `#chat=${encodeURIComponent(state.chat.id)}` : location.pathname);
  }
}

function startChat() {
  if (state.controller) return;
  state.chat = newChat();
  history.replaceState(null, "", location.pathname);
  state.pending = [];
  for (const id of ["#instructions", "#tools", "#schema"]) $(id).value = "";
  showEffort();
  renderChat();
  listChats();
}

const textOf = (content) => (Array.isArray(content) ? content.map((p) => (typeof p === "string" ? p : p.text || "")).join("") : content || "");

// ---- showing a conversation ----------------------------------------------------------------
function renderChat() {
  const box = $("#messages");
  box.replaceChildren();
  let turn = null;
  const rows = new Map(); // a call's id (pairing's) -> its row
  const pairs = pairing(state.chat.messages);
  let unanswered = []; // the last calls of the page's functions still without a result
  state.chat.messages.forEach((m, i) => {
    if (m.role === "user") {
      turn = null;
      unanswered = [];
      box.append(userTurn(textOf(m.content)));
      return;
    }
    if (!turn) {
      turn = new AssistantTurn();
      box.append(turn.node);
    }
    if (m.role === "assistant") {
      unanswered = [];
      if (reasoningOf(m)) turn.reasoning(reasoningOf(m), false);
      if (m.content) turn.answer(textOf(m.content));
      (m.tool_calls || []).forEach((call, k) => {
        const name = toolName(call), id = pairs.callId(i, k);
        const row = turn.toolRow(name, argumentsText(call.function?.arguments), serverRuns(name));
        rows.set(id, row);
        if (!serverRuns(name)) unanswered.push({ type: "function_call", call_id: id, name, view: row });
      });
    } else if (m.role === "tool") {
      const answered = pairs.answers.get(i);
      unanswered = unanswered.filter((call) => call.call_id !== answered);
      (rows.get(answered) || turn.toolRow(m.name || "tool", "", false)).result(textOf(m.content));
    }
  });
  // A reply that ended in calls of the page's functions, reopened: their results are asked for again.
  state.pending = unanswered;
  if (unanswered.length) askForResults(turn);
  scrollDown();
}

// A saved chat as the store keeps it may come from elsewhere (the TUI, a file written by hand):
// calls without an id, name or arguments, one id on several calls, results without their call's
// id. Each call gets an id of its own (its given one, unless an earlier call has it), and each
// result answers the first call of its turn still open with its id, else with its function's
// name: the pairs the page shows, asks results for, and sends.
function pairing(messages) {
  const given = new Set(messages.flatMap((m) => (m.tool_calls || []).map((call) => call.id)));
  const ids = new Map(); // "message:index" -> the call's id
  const taken = new Set(); // ids given out so far
  const answers = new Map(); // index of a tool message -> the id of the call it answers
  const open = []; // {id, name} of the calls not yet answered
  messages.forEach((m, i) => {
    if (m.role === "user") open.length = 0; // a call left open is not answered in a later turn (nor by the server)
    (m.tool_calls || []).forEach((call, k) => {
      let id = typeof call.id === "string" && call.id && !taken.has(call.id) ? call.id : null;
      for (let n = 0; id === null; n++) {
        const made = `call_${i}_${k}${n ? `_${n}` : ""}`;
        if (!given.has(made) && !taken.has(made)) id = made;
      }
      ids.set(`${i}:${k}`, id);
      taken.add(id);
      open.push({ id, name: toolName(call) });
    });
    if (m.role === "tool") {
      let j = open.findIndex((call) => call.id === m.tool_call_id);
      if (j < 0) j = open.findIndex((call) => call.name === m.name);
      if (j >= 0) answers.set(i, open.splice(j, 1)[0].id);
    }
  });
  return { callId: (i, k) => ids.get(`${i}:${k}`), answers };
}

const argumentsText = (args) => (typeof args === "string" ? args : args == null ? "" : JSON.stringify(args));
const toolName = (call) => (typeof call.function?.name === "string" ? call.function.name : "tool");
const reasoningOf = (m) => m.reasoning ?? m.reasoning_content ?? m.thinking;

function serverRuns(name) {
  const info = state.info || {};
  return (name === "python" && info.python) || (name.startsWith("browser.") && info.browser) ||
    (info.functions || []).includes(name);
}

function userTurn(text) {
  const turn = el("div", "turn user");
  turn.append(el("div", "bubble", text));
  return turn;
}

function scrollDown() {
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

class AssistantTurn {
  constructor() {
    this.node = el("div", "turn assistant");
    this.answerNode = null;
  }

  // A reasoning section: open while it streams, folded once the answer starts.
  reasoning(text, open) {
    const details = el("details", "reasoning");
    details.open = open;
    const summary = el("summary", null, "Reasoning");
    const body = el("div");
    details.append(summary, body);
    this.node.append(details);
    const section = {
      text: "",
      set: (value) => {
        section.text = value;
        body.replaceChildren(renderMarkdown(value));
        const count = value.split(/\s+/).filter(Boolean).length;
        const words = `${count} word${count === 1 ? "" : "s"}`;
        summary.textContent = details.open && open ? `Reasoning · thinking… (${words})` : `Reasoning · ${words}`;
      },
      fold: () => {
        open = false;
        details.open = false;
        section.set(section.text);
      },
    };
    section.set(text);
    return section;
  }

  answer(text) {
    const node = el("div", "answer");
    this.node.append(node);
    const part = { text: "", set: (value) => { part.text = value; node.replaceChildren(renderMarkdown(value)); } };
    part.set(text);
    return part;
  }

  // A tool call as an expandable row: the code or arguments, then the result.
  toolRow(name, args, onServer) {
    const details = el("details", "tool");
    details.dataset.name = name;
    const title = `tool call · ${name}${onServer ? " · run by the server" : ""}`;
    const summary = el("summary", null, title);
    const label = el("div", "label", name === "python" ? "code that ran (without asking: --tools python)" : "arguments");
    const body = el("div");
    details.append(summary, label, body);
    this.node.append(details);
    const row = {
      node: details,
      args,
      set: (value) => {
        row.args = value;
        body.replaceChildren(name === "python" ? codeBlock(value, "python") : codeBlock(prettyJSON(value), "json"));
      },
      result: (text) => {
        details.querySelector(".result-block")?.remove();
        const block = el("div", "result-block");
        block.append(el("div", "label", "result"), el("div", "result", text));
        details.append(block);
        summary.textContent = `${title} · done`;
      },
    };
    row.set(args);
    return row;
  }

  stats(text) {
    this.node.append(el("div", "stats", text));
  }

  error(text) {
    this.node.append(el("p", "error", text));
  }
}

function prettyJSON(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

// ---- settings ----------------------------------------------------------------------------
function showEffort() {
  for (const button of document.querySelectorAll("#effort button")) {
    button.setAttribute("aria-checked", String(button.dataset.effort === state.chat.reasoning_effort));
  }
}

// The pasted function tools, as the Responses API takes them; throws naming what is wrong.
function readTools() {
  const text = $("#tools").value.trim();
  if (!text) return [];
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new Error(`Function tools: not JSON (${e.message})`);
  }
  return (Array.isArray(value) ? value : [value]).map((tool, i) => {
    const fn = tool && typeof tool === "object" ? tool.function || tool : null;
    if (!fn || typeof fn.name !== "string" || !fn.name) throw new Error(`Function tools: tool ${i + 1} has no "name"`);
    const spec = { name: fn.name, description: fn.description || "" };
    if (fn.parameters) spec.parameters = fn.parameters;
    return spec;
  });
}

function readSchema() {
  const text = $("#schema").value.trim();
  if (!text) return null;
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (e) {
    throw new Error(`Structured output: not JSON (${e.message})`);
  }
  if (!schema || typeof schema !== "object" || Array.isArray(schema)) {
    throw new Error("Structured output: a JSON Schema is a JSON object, such as {\"type\": \"object\"}");
  }
  return { type: "json_schema", json_schema: { name: "output", schema } };
}

function readSettings() {
  try {
    state.chat.tools = readTools();
    state.chat.response_format = readSchema();
    $("#settings-error").textContent = "";
    return true;
  } catch (e) {
    $("#settings").hidden = false;
    $("#settings-error").textContent = e.message;
    return false;
  }
}

// ---- a reply -----------------------------------------------------------------------------
// The conversation as Responses input items.
function inputItems(messages) {
  const items = [];
  const pairs = pairing(messages);
  messages.forEach((m, i) => {
    if (m.role === "user") items.push({ type: "message", role: "user", content: textOf(m.content) });
    else if (m.role === "tool") {
      // (name: for a result that answers no call, which the server then takes by the function's name)
      const answered = pairs.answers.get(i) ?? (typeof m.tool_call_id === "string" ? m.tool_call_id : "");
      items.push({ type: "function_call_output", call_id: answered,
                   ...(typeof m.name === "string" && { name: m.name }), output: textOf(m.content) });
    } else if (m.role === "assistant") {
      const reasoning = reasoningOf(m);
      if (reasoning) items.push({ type: "reasoning", summary: [], content: [{ type: "reasoning_text", text: reasoning }] });
      if (m.content) items.push({ type: "message", role: "assistant", content: textOf(m.content) });
      (m.tool_calls || []).forEach((call, k) => {
        items.push({ type: "function_call", call_id: pairs.callId(i, k), name: toolName(call),
                     arguments: argumentsText(call.function?.arguments) });
      });
    }
  });
  return items;
}

// Output items -> the saved form's messages (an assistant message gathers reasoning, text and
// calls in harmony's order; a call the server ran is followed by its result).
function replyMessages(items) {
  const out = [];
  let current = null;
  const flush = () => { if (current) out.push(current); current = null; };
  for (const item of items) {
    if ((item.type === "reasoning" || item.type === "message") && current && (current.content != null || current.tool_calls)) flush();
    current ??= { role: "assistant", content: null };
    if (item.type === "reasoning") current.reasoning = (current.reasoning || "") + item.text;
    else if (item.type === "message") current.content = item.text;
    else {
      (current.tool_calls ??= []).push({ id: item.call_id, type: "function", function: { name: item.name, arguments: item.arguments } });
      if (item.output != null) {
        flush();
        out.push({ role: "tool", tool_call_id: item.call_id, name: item.name, content: item.output });
      }
    }
  }
  flush();
  return out;
}

function requestBody() {
  const chat = state.chat;
  const body = { input: inputItems(chat.messages), reasoning: { effort: chat.reasoning_effort },
                 stream: true, store: false, truncation: "auto" };  // a long chat goes on, as in the TUI
  if (chat.instructions.trim()) body.instructions = chat.instructions;
  if (chat.tools.length) body.tools = chat.tools.map((t) => ({ type: "function", ...t }));
  if (chat.response_format) body.text = { format: { type: "json_schema", ...chat.response_format.json_schema } };
  return body;
}

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
}

// Streams one reply into the page and the chat; false when nothing came (an error, or a stop
// before the first token).
async function reply() {
  const turn = new AssistantTurn();
  $("#messages").append(turn.node);
  const items = new Map(); // item id -> {type, text, ..., view}
  const order = [];
  const times = { start: performance.now(), first: null, end: null, deltas: 0 };
  let usage = null;
  let status = "stopped";
  let answered = false;
  state.chat.instructions = $("#instructions").value; // what this reply is made with, and saved with
  state.controller = new AbortController();
  setBusy(true);
  const streamed = (item, key, delta) => {
    times.first ??= performance.now();
    times.deltas += 1;
    item[key] += delta;
    item.view.set(item[key]);
    scrollDown();
  };
  try {
    const response = await request("/v1/responses", { method: "POST", body: requestBody(), signal: state.controller.signal });
    for await (const event of serverEvents(response)) {
      const item = items.get(event.item_id ?? event.item?.id);
      switch (event.type) {
        case "response.output_item.added": {
          const given = event.item;
          const entry = { type: given.type, text: "", arguments: given.arguments || "", name: given.name,
                          call_id: given.call_id || given.id, output: null };
          if (given.type === "reasoning") entry.view = turn.reasoning("", true);
          else if (given.type === "message") {
            entry.view = turn.answer("");
            for (const other of order) if (other.type === "reasoning") other.view.fold();
          } else entry.view = turn.toolRow(given.name, "", given.type === "mcp_call");
          items.set(given.id, entry);
          order.push(entry);
          break;
        }
        case "response.reasoning_text.delta":
        case "response.output_text.delta":
          if (event.type === "response.output_text.delta" && !answered) {
            answered = true; // the answer starts: fold the thinking away
            for (const other of order) if (other.type === "reasoning") other.view.fold();
          }
          streamed(item, "text", event.delta);
          break;
        case "response.function_call_arguments.delta":
        case "response.mcp_call_arguments.delta":
          streamed(item, "arguments", event.delta);
          break;
        case "response.output_item.done":
          item.done = true;
          if (event.item.type === "mcp_call" && event.item.output != null) {
            item.output = event.item.output;
            item.view.result(item.output);
          }
          break;
        case "response.completed":
        case "response.incomplete":
        case "response.failed":
          usage = event.response.usage;
          status = event.type.slice("response.".length);
          if (event.response.error) turn.error(event.response.error.message);
          break;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      turn.error(e instanceof TypeError ? CUT_OFF : e.message); // (a read of the stream that failed)
      status = "failed";
    }
  } finally {
    times.end = performance.now();
    state.controller = null;
    setBusy(false);
  }
  for (const item of order) if (item.type === "reasoning") item.view.fold();
  for (const item of order) if (item.type === "reasoning" && !item.text) item.view.node.remove();
  // A stopped reply keeps what it said; a call cut off mid-arguments is dropped, and empty reasoning.
  const kept = order.filter((i) => (i.type === "function_call" || i.type === "mcp_call" ? i.done
                                    : i.type !== "reasoning" || i.text));
  const messages = replyMessages(kept);
  turn.stats(statsLine(usage, times, status));
  if (!messages.length) { // no turn to show: stopped before anything came, or the error (until the next send)
    if (status === "failed") turn.node.classList.add("unsent");
    else turn.node.remove();
    return false;
  }
  state.chat.messages.push(...messages);
  state.pending = status === "completed" ? kept.filter((i) => i.type === "function_call") : [];
  if (state.pending.length) askForResults(turn);
  try {
    alertUser(await save());
  } catch (e) {
    turn.error(`not saved: ${e.message}`);
  }
  return true;
}

// Tokens, tok/s and TTFT, from the server's usage (a stopped reply has none: only its TTFT).
// The rate is timed over the streamed deltas, so only where they came about one a token (text
// the server holds back until it knows it is no harmony header comes in one piece).
function statsLine(usage, times, status) {
  const parts = [];
  const tokens = usage?.output_tokens ?? 0;
  if (tokens) {
    const seconds = times.first === null ? 0 : (times.end - times.first) / 1000;
    parts.push(`${tokens} tokens`);
    if (seconds > 0 && times.deltas > 1 && 2 * times.deltas >= tokens) parts.push(`${(tokens / seconds).toFixed(1)} tok/s`);
  }
  if (times.first !== null) parts.push(`TTFT ${((times.first - times.start) / 1000).toFixed(2)}s`);
  if (usage) parts.push(`prompt ${usage.input_tokens} (${usage.input_tokens_details?.cached_tokens ?? 0} cached)`);
  const end = { stopped: "stopped", incomplete: "cut off: token limit", failed: "failed" }[status];
  if (end) parts.push(end);
  return parts.join(" · ");
}

// The client's function calls: the page asks for each result, then the model goes on.
function askForResults(turn) {
  const form = el("form", "results");
  for (const call of state.pending) {
    const field = el("textarea");
    field.rows = 2;
    field.dataset.callId = call.call_id;
    field.setAttribute("aria-label", `Result of ${call.name}`);
    field.placeholder = `Result of ${call.name} (what the function returned)`;
    call.view.node.open = true;
    call.view.node.append(field);
  }
  const button = el("button", "send-results", "Send result");
  button.type = "submit";
  form.append(button);
  turn.node.append(form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (state.controller) return;
    for (const call of state.pending) {
      const content = turn.node.querySelector(`textarea[data-call-id="${CSS.escape(call.call_id)}"]`).value;
      state.chat.messages.push({ role: "tool", tool_call_id: call.call_id, name: call.name, content });
      call.view.result(content);
    }
    turn.node.querySelectorAll("textarea").forEach((t) => t.remove());
    form.remove();
    state.pending = [];
    await reply();
  });
}

async function send() {
  const prompt = $("#prompt");
  const text = prompt.value.trim();
  if (!text || state.controller || !readSettings()) return;
  document.querySelectorAll(".turn.unsent").forEach((node) => node.remove()); // an earlier failed send's error
  prompt.value = "";
  state.pending = [];
  state.chat.messages.push({ role: "user", content: text });
  const bubble = userTurn(text);
  $("#messages").append(bubble);
  scrollDown();
  if (!(await reply())) { // nothing to keep: the prompt comes back, to edit or resend
    state.chat.messages.pop();
    bubble.remove();
    if (!prompt.value) prompt.value = text;
  }
}

function stop() {
  state.controller?.abort();
}

// ---- start -------------------------------------------------------------------------------
function wire() {
  $("#composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") stop();
  });
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", startChat);
  $("#settings-toggle").addEventListener("click", () => {
    const settings = $("#settings");
    settings.hidden = !settings.hidden;
    $("#settings-toggle").setAttribute("aria-expanded", String(!settings.hidden));
  });
  $("#menu").addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    $("#menu").setAttribute("aria-expanded", String(open));
  });
  window.addEventListener("hashchange", followAddress);
  window.addEventListener("beforeunload", (event) => {
    if (state.controller) event.preventDefault(); // a reply under way is lost: the browser asks first
  });
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("#key").value;
    sessionStorage.setItem("gptoss-mlx-key", state.key);
    $("#key-form").hidden = true;
    start();
  });
}

// The effort switch, one button per effort the server knows.
function effortButtons(efforts) {
  const buttons = efforts.map((effort) => {
    const button = el("button", null, effort);
    button.type = "button";
    button.setAttribute("role", "radio");
    button.dataset.effort = effort;
    button.addEventListener("click", () => {
      state.chat.reasoning_effort = effort; // applies from the next reply
      showEffort();
    });
    return button;
  });
  $("#effort").replaceChildren($("#effort .label"), ...buttons);
}

function showInfo(info) {
  $("#model").textContent = info.model;
  effortButtons(info.efforts);
  const notes = [];
  if (info.python) notes.push("python runs on this server without asking: it was started with --tools python (that flag is the approval); each call's code is shown in its row");
  if (info.browser) notes.push("the browser tool fetches public web pages from this server");
  if (info.functions.length) notes.push(`the server runs its own functions: ${info.functions.join(", ")}`);
  $("#notice").textContent = notes.join(" · ");
  $("#notice").hidden = !notes.length;
}

async function start() {
  try {
    state.info = await api("/v1/playground/info");
  } catch (e) {
    if (e.status !== 401) alertUser(e.message);
    return;
  }
  alertUser("");
  showInfo(state.info);
  if (!state.chat.messages.length) state.chat.reasoning_effort = state.info.reasoning_effort;
  showEffort();
  const opened = new URLSearchParams(location.hash.slice(1)).get("chat"); // the chat open before a reload
  if (opened && !state.chat.id && !state.chat.messages.length) await openChat(opened);
  await listChats();
  document.body.dataset.ready = "true";
}

state.chat = newChat();
wire();
showEffort();
start();
