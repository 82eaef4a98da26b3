// The chat page: one conversation, sent whole to /v1/chat/completions each turn (streamed),
// as any OpenAI client does. The server's prompt cache makes a follow-up cost only its new
// tokens. A picture goes as an `image_url` part, a video (for a model that sees videos, as
// /health's `inputs` say) as a `video_url` part. No framework, no build step.

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), chat: $("chat"), empty: $("empty"), messages: $("messages"),
  form: $("composer"), prompt: $("prompt"), file: $("file"), send: $("send"), stop: $("stop"),
  attachment: $("attachment"), preview: $("preview"), removePicture: $("remove-picture"),
  previewVideo: $("preview-video"), note: $("attachment-note"), pick: $("pick"),
  newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), system: $("system"),
  jsonSchema: $("json-schema"), apiKey: $("api-key"), status: $("status"), drop: $("drop"),
};

const state = {
  model: null,
  history: [],     // OpenAI messages of this conversation
  inputs: ["text", "image"], // what the model's messages may hold (/health)
  maxBody: Infinity, // the server's limit on a request's bytes (--max-body-mb)
  attachment: null, // { kind: "image" or "video", url: data URL } sent with the next message
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

const seesVideos = () => state.inputs.includes("video");

const size = (bytes) =>
  bytes < 1 << 20 ? `${(bytes / 1024).toFixed(1)} KB` : `${(bytes / (1 << 20)).toFixed(1)} MB`;

// What the model sees (pictures, videos) and the body limit, from /health (no key needed).
async function loadLimits() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    if (Array.isArray(body.inputs)) state.inputs = body.inputs;
    if (body.max_body_bytes > 0) state.maxBody = body.max_body_bytes;
  } catch {
    // an older server: pictures only, and its 413 says when a request is too large
  }
  const media = seesVideos() ? "picture or video" : "picture";
  for (const span of document.querySelectorAll(".media")) span.textContent = media;
  ui.pick.title = `Choose a ${media}`;
  ui.file.accept = seesVideos() ? "image/*,video/*" : "image/*";
}

async function loadModel() {
  loadLimits();
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

// Pictures and videos -----------------------------------------------------------------------

const VIDEO_TYPES = { mp4: "video/mp4", m4v: "video/mp4", webm: "video/webm",
  mov: "video/quicktime", mkv: "video/x-matroska", avi: "video/x-msvideo", gif: "image/gif" };

// The file's media type: its own, or by its extension when the browser does not know it.
function mediaType(file) {
  if (file.type) return file.type;
  return VIDEO_TYPES[file.name.split(".").pop().toLowerCase()] ?? "";
}

// Bytes of a request that sends `extra` more bytes of a file as base64 in a data URL.
function requestBytes(extra = 0) {
  const base = new Blob([JSON.stringify(state.history)]).size + 4096; // + the question
  return base + Math.ceil(extra / 3) * 4;
}

function tooLarge(what, bytes) {
  return `${what} ${size(bytes)} as a data URL, over the server's limit of ` +
    `${size(state.maxBody)} a request (--max-body-mb). ` +
    "Choose a smaller file, or start a new chat (each turn resends the conversation).";
}

function readAttachment(file) {
  if (!file) return;
  const type = mediaType(file);
  const kind = type.startsWith("image/") ? "image" : type.startsWith("video/") ? "video" : null;
  if (kind === null) {
    setStatus(seesVideos() ? "That is neither a picture nor a video." : "That is not a picture.", true);
    return;
  }
  if (kind === "video" && !seesVideos()) {
    setStatus(`${state.model ?? "This model"} does not see videos: choose a picture.`, true);
    return;
  }
  const bytes = requestBytes(file.size);
  if (bytes > state.maxBody) {
    const what = `The ${kind === "video" ? "video" : "picture"} would make the request`;
    setStatus(tooLarge(what, bytes), true);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    // A type the browser did not name (e.g. .mkv) is named here, as the server wants it.
    const url = reader.result.replace(/^data:[^;,]*/, `data:${type}`);
    clearAttachment();
    state.attachment = { kind, url };
    if (kind === "image") {
      ui.preview.src = url;
      ui.preview.hidden = false;
    } else {
      showVideo(url, file.name);
    }
    ui.attachment.hidden = false;
    setStatus("");
    ui.prompt.focus();
  };
  reader.onerror = () => setStatus(`Cannot read ${file.name}.`, true);
  reader.readAsDataURL(file);
}

// The video's first frame (the element paused there) and its name; its name alone where the
// browser cannot play it (the server reads more formats than browsers do).
function showVideo(url, name) {
  const video = ui.previewVideo;
  video.hidden = false;
  ui.note.textContent = name;
  ui.note.hidden = false;
  video.onloadeddata = () => {
    video.dataset.ready = "true";
  };
  video.onerror = () => {
    video.hidden = true;
    ui.note.textContent = `${name} (no preview in this browser; the server reads it)`;
    ui.note.hidden = false;
  };
  video.src = url;
}

function clearAttachment() {
  state.attachment = null;
  ui.attachment.hidden = true;
  ui.preview.hidden = true;
  ui.preview.removeAttribute("src");
  const video = ui.previewVideo;
  video.hidden = true;
  video.onloadeddata = video.onerror = null;
  delete video.dataset.ready;
  video.removeAttribute("src");
  video.load();
  ui.note.hidden = true;
  ui.file.value = "";
}

ui.file.addEventListener("change", () => readAttachment(ui.file.files[0]));
ui.removePicture.addEventListener("click", clearAttachment);

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
  readAttachment(e.dataTransfer.files[0]);
});

// Messages -----------------------------------------------------------------------------------

function addBubble(role, text, attachment) {
  ui.empty.hidden = true;
  const item = document.createElement("li");
  item.className = `message ${role}`;
  if (attachment?.kind === "image") {
    const img = document.createElement("img");
    img.src = attachment.url;
    img.alt = "the picture sent";
    item.append(img);
  } else if (attachment?.kind === "video") {
    const video = document.createElement("video");
    video.src = attachment.url;
    video.controls = video.muted = true;
    video.preload = "metadata";
    video.setAttribute("aria-label", "the video sent");
    item.append(video);
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

function userContent(text, attachment) {
  if (!attachment) return text;
  const part = attachment.kind === "video"
    ? { type: "video_url", video_url: { url: attachment.url } }
    : { type: "image_url", image_url: { url: attachment.url } };
  return [part, { type: "text", text }];
}

async function ask(text) {
  const userMessage = { role: "user", content: userContent(text, state.attachment) };
  addBubble("user", text, state.attachment);
  clearAttachment();

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
    const body = JSON.stringify({
      model: state.model ?? undefined,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number(ui.temperature.value) || 0,
      max_tokens: Number(ui.maxTokens.value) || undefined,
      response_format: responseFormat(),
    });
    const bytes = new Blob([body]).size;
    if (bytes > state.maxBody) throw new Error(tooLarge("The conversation is", bytes));
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body,
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
  if (!text && !state.attachment) return;
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
  clearAttachment();
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
