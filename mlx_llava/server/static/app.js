// The chat page: one conversation, sent whole to /v1/chat/completions each turn (streamed),
// as any OpenAI client does. The server's prompt cache makes a follow-up cost only its new
// tokens. No framework, no build step.

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), chat: $("chat"), empty: $("empty"), messages: $("messages"),
  form: $("composer"), prompt: $("prompt"), file: $("file"), send: $("send"), stop: $("stop"),
  attachment: $("attachment"), preview: $("preview"), removePicture: $("remove-picture"),
  newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), system: $("system"),
  jsonSchema: $("json-schema"), apiKey: $("api-key"), status: $("status"), drop: $("drop"),
};

const state = {
  model: null,
  history: [],     // OpenAI messages of this conversation
  picture: null,   // data URL of the picture to send with the next message
  controller: null // AbortController of the answer being streamed
};

// Settings persist in this browser.
for (const id of ["temperature", "max-tokens", "system", "json-schema", "api-key"]) {
  const input = $(id);
  const saved = localStorage.getItem(`mlx-llava:${id}`);
  if (saved !== null) input.value = saved;
  input.addEventListener("change", () => localStorage.setItem(`mlx-llava:${id}`, input.value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.apiKey.value) h.Authorization = `Bearer ${ui.apiKey.value}`;
  return h;
}

// The JSON schema setting as a response_format: none when empty, any JSON object for {}.
function responseFormat() {
  const text = ui.jsonSchema.value.trim();
  if (!text) return undefined;
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (e) {
    throw new Error(`The JSON schema setting is not JSON: ${e.message}`);
  }
  if (typeof schema === "object" && schema !== null && Object.keys(schema).length === 0) {
    return { type: "json_object" };
  }
  return { type: "json_schema", json_schema: { name: "answer", schema, strict: true } };
}

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? body.error ?? response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    state.model = body.data[0].id;
    ui.model.textContent = state.model;
    setStatus("");
  } catch (e) {
    ui.model.textContent = "no model";
    setStatus(`Cannot reach the model: ${e.message}`, true);
  }
}

// Pictures -----------------------------------------------------------------------------------

function readPicture(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not a picture.", true);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.picture = reader.result;
    ui.preview.src = state.picture;
    ui.attachment.hidden = false;
    setStatus("");
    ui.prompt.focus();
  };
  reader.readAsDataURL(file);
}

function clearPicture() {
  state.picture = null;
  ui.attachment.hidden = true;
  ui.preview.removeAttribute("src");
  ui.file.value = "";
}

ui.file.addEventListener("change", () => readPicture(ui.file.files[0]));
ui.removePicture.addEventListener("click", clearPicture);

let dragDepth = 0;
window.addEventListener("dragenter", (e) => {
  if (![...e.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  ui.drop.hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) ui.drop.hidden = true;
});
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  ui.drop.hidden = true;
  readPicture(e.dataTransfer.files[0]);
});

// Messages -----------------------------------------------------------------------------------

function addBubble(role, text, picture) {
  ui.empty.hidden = true;
  const item = document.createElement("li");
  item.className = `message ${role}`;
  if (picture) {
    const img = document.createElement("img");
    img.src = picture;
    img.alt = "the picture sent";
    item.append(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  ui.messages.append(item);
  ui.chat.scrollTop = ui.chat.scrollHeight;
  return item;
}

function addMeta(item, text) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = text;
  item.append(meta);
}

function busy(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.prompt.disabled = false;
}

// Server-Sent Events: "data: {json}" lines, ending with "data: [DONE]".
async function* events(response) {
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
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask(text) {
  const content = state.picture
    ? [{ type: "image_url", image_url: { url: state.picture } }, { type: "text", text }]
    : text;
  const userMessage = { role: "user", content };
  addBubble("user", text, state.picture);
  clearPicture();

  const answer = addBubble("assistant", "");
  answer.dataset.state = "waiting";
  const textBox = answer.querySelector(".text");
  const messages = [...state.history, userMessage];
  if (ui.system.value.trim()) messages.unshift({ role: "system", content: ui.system.value.trim() });

  state.controller = new AbortController();
  busy(true);
  const started = performance.now();
  let firstToken = null;
  let chunks = 0;
  let usage = null;
  let outcome = "done";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model ?? undefined,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number(ui.temperature.value) || 0,
        max_tokens: Number(ui.maxTokens.value) || undefined,
        response_format: responseFormat(),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    answer.dataset.state = "streaming";
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        firstToken ??= performance.now();
        chunks += 1;
        textBox.textContent += delta;
        answer.dataset.chunks = String(chunks);
        ui.chat.scrollTop = ui.chat.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "error";
      textBox.textContent = e.message;
    }
  } finally {
    state.controller = null;
    busy(false);
  }

  answer.dataset.state = outcome;
  if (outcome === "error") {
    answer.classList.add("error");
    setStatus("The answer failed.", true);
    return; // the question stays out of the conversation: ask again
  }
  state.history.push(userMessage, { role: "assistant", content: textBox.textContent });
  const ended = performance.now();
  const tokens = usage?.completion_tokens ?? chunks;
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (firstToken !== null && tokens > 1 && ended > firstToken) {
    parts.push(`${((tokens - 1) / ((ended - firstToken) / 1000)).toFixed(1)} tokens/s`);
  }
  if (firstToken !== null) parts.push(`first token ${((firstToken - started) / 1000).toFixed(2)} s`);
  if (usage?.prompt_tokens_details?.cached_tokens) {
    parts.push(`${usage.prompt_tokens_details.cached_tokens} of ${usage.prompt_tokens} prompt tokens cached`);
  }
  if (outcome === "stopped") parts.unshift("stopped");
  addMeta(answer, parts.join(" · "));
  setStatus("");
}

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (state.controller) return;
  const text = ui.prompt.value.trim();
  if (!text && !state.picture) return;
  ui.prompt.value = "";
  autosize();
  ask(text);
});

ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.form.requestSubmit();
  }
});

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}
ui.prompt.addEventListener("input", autosize);

ui.stop.addEventListener("click", () => state.controller?.abort());

ui.newChat.addEventListener("click", () => {
  state.controller?.abort();
  state.history = [];
  ui.messages.replaceChildren();
  ui.empty.hidden = false;
  clearPicture();
  setStatus("");
  ui.prompt.focus();
});

ui.settingsToggle.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
});
ui.apiKey.addEventListener("change", loadModel);

loadModel();
ui.prompt.focus();
