// The web page: one image at a time, its masks from POST /upload_rle?format=coco (under the
// Filters box's thresholds) drawn over it, and a click tool on POST /embed + POST /segment. No
// framework, no build step.
//
// Masks stay run-length encoded (column-major runs, background first, as COCO writes them).
// They are drawn through a label map, the index of the mask on top at each pixel, filled run
// by run with TypedArray.fill: the cost is the masks' total area plus one pass over the
// pixels, so hundreds of masks on a large photo draw without freezing the tab.
"use strict";

const $ = (id) => document.getElementById(id);
const MASK_ALPHA = 150; // of 255: the photo shows through
const LARGE_MASK_ALPHA = 60; // masks over half the image (the background, mostly): lighter
const CLICK_HELP = "Click: a point on the object; right click, shift-click or long press: a point off it; " +
  "drag: a box; Ctrl+Z: undo."; // three lines at most on a phone (style.css holds three)
const EDGE_ALPHA = 255;
const DEFAULT_CATEGORY = "object"; // a mask given no category: COCO's category 1
// sam2's filters, which a request may set for itself (the Filters box; the server's otherwise).
const FILTERS = ["pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh"];
// Fields typed in: their keys are theirs (Delete, Backspace), and a press on the image lets go of them.
const TYPING_FIELDS = "#filters-form input, #category";
const DRAG_PIXELS = 5; // a press that moves farther than this (on screen) draws a box
const LONG_PRESS_MS = 500; // a finger held this long, not moving: a point off the object (touch has no right click)
// The keyboard's cursor moves by this share of the image's longer side (at least a pixel): as many
// presses cross any image; Shift+arrow moves ten times as far.
const CURSOR_STEP = 1 / 100;
// The viewer's canvases, bottom to top, all the image's size: the image, every mask (the
// every-mask tool's), the masks added by clicks (the click tool's), the selected mask (painted
// when the selection changes, not on every hover: a large one takes a while), and the hovered
// mask or the click tool's mask and prompts.
const LAYERS = ["image-canvas", "mask-canvas", "added-canvas", "selection-canvas", "highlight-canvas"];
// The layers of masks that "Masks shown" fades, to see the picture under them; the selected and
// hovered masks stay as they are.
const FADED_LAYERS = ["mask-canvas", "added-canvas"];

const state = {
  info: null, // GET /health
  file: null, // the image, as chosen, dropped or pasted
  fileOpening: null, // a file chosen whose picture the browser is still decoding: the image once shown
  name: "image",
  width: 0,
  height: 0,
  generation: 0, // counts images; answers for an earlier one are dropped
  opening: 0, // counts files chosen: one decoded after a later one is dropped
  annotations: [], // the COCO annotations of every mask, in the server's order
  counts: [], // each mask's run lengths
  labels: null, // column-major: 1 + the index of the mask drawn on top, 0 for none
  colours: [],
  coloursGiven: 0, // colour(i) for i below this is taken: a mask added after a removal gets a new one
  hovered: -1,
  selected: -1,
  renderMs: 0, // decoding and drawing the last answer, for people who measure
  painted: [], // {counts, rgb, picture}: the masks paintMask drew last, the latest at the end
  // The masks of this image the labeller removed, the last at the end (Ctrl+Z puts it back):
  // {index, annotation, counts, colour}.
  removedMasks: [],
  categoryBefore: new Map(), // annotation -> its category ("": none) before the labeller changed it
  // Each category a mask has carried in this tab (or a file opened listed) -> its COCO id: the
  // same for every image labelled here.
  categoryIds: new Map([[DEFAULT_CATEGORY, 1]]),
  supercategories: new Map(), // category -> its supercategory, where a file opened gave one
  addCategory: "", // the click tool's category for the masks it adds ("": the default)
  opened: new Set(), // the records of a masks file opened: saved work, not edits
  openedFile: null, // that file's name
  imageId: null, // from /embed
  embedding: null, // the /embed request in flight
  clicks: [], // {x, y, label}
  box: null, // [x0, y0, x1, y1]
  boxAfter: 0, // how many of the clicks came before the box (undo takes back the later ones first)
  dragBox: null, // the box being drawn, while the button is down
  cursor: null, // {x, y}: the keyboard's cursor on the image (its centre until moved), in image pixels
  cursorShown: false, // while the keyboard, not a pointer, is in use on the image
  clickPrompt: null, // the prompt set of the last /segment answer
  clickAnswer: null, // that answer
  candidate: 0, // which of its masks is shown (one point alone: three candidates, best first)
  clickMs: 0, // how long it took to come
  segmentSequence: 0, // counts changes of the clicks: only the answer for the latest is drawn
  // Requests nobody waits for any more are cancelled: the server stops work whose client has gone.
  imageRequests: null, // AbortController of the open image's /upload_rle and /embed
  segmentRequest: null, // AbortController of the /segment in flight
  segmentInFlight: 0, // the sequence number of the /segment in flight, 0 for none
  // The status line: what runs while a request is in flight (the same in both tools), else the
  // tool's own line, kept for the return to it.
  busyText: null,
  everythingStatus: "No image yet.",
  clickStatus: "Open an image first.",
};

// --- Talking to the server ------------------------------------------------------------------

class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function explain(status, message, retryAfter) {
  if (status === 400) return `The server refused the request: ${message}`;
  if (status === 413) { // a JPEG is smaller in bytes; its pixels are as many
    const bytes = message.startsWith("upload larger than");
    const smaller = bytes ? "Scale the image down, or save it as a JPEG" : "Scale the image down";
    return `Too large: ${message}. ${smaller}, and open it again.`;
  }
  if (status === 503) { // the server says why: busy, loading or stopping
    const retry = retryAfter && !/try again/i.test(message) ? `; try again in ${retryAfter} s` : "";
    return `${message.charAt(0).toUpperCase()}${message.slice(1)}${retry}.`;
  }
  if (status === 504) return `The server took too long: ${message}`;
  return `The server answered ${status}: ${message}`;
}

// The answer's text, or a ServerError whose message a person can read.
async function request(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error; // cancelled: its caller has moved on
    throw new ServerError(0, "Cannot reach the server: is it still running?");
  }
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error || text;
    } catch (_) {
      // not JSON: show the text
    }
    throw new ServerError(response.status, explain(response.status, message, response.headers.get("Retry-After")));
  }
  return text;
}

function fileName() {
  return state.file.name || `${state.name}.png`; // a pasted image has none
}

// Segment-everything's query: COCO records, under the filters set apart from the server's.
function everythingQuery() {
  const query = new URLSearchParams({ format: "coco" });
  for (const name of FILTERS) {
    const value = $(name).value;
    if (value !== "" && Number(value) !== state.info?.amg?.[name]) query.set(name, value);
  }
  return query;
}

function imageForm() {
  const form = new FormData();
  form.append("image", state.file, fileName());
  return form;
}

// --- Status, errors, progress ------------------------------------------------------------

let ticker = null;
const underWay = []; // what busy() shows, oldest first: the latest is on screen

function setStatus(text) {
  $("status-text").textContent = text;
}

// The error line sits above the viewer: the image is fitted again when it shows or goes.
function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  fitToWindow();
}

function clearError() {
  if ($("error").hidden) return;
  $("error").hidden = true;
  $("error").textContent = "";
  fitToWindow();
}

// Shows the text, a spinner and the seconds elapsed; returns a function that ends them (once;
// again does nothing) and answers the milliseconds taken. Work started before and still under
// way shows again when the latest ends: an earlier request that ends while a later one runs (an
// image's masks while the next file is read) leaves the later one's spinner and text. Another
// image ends all work of the one before (onlyUnderWay), whether or not its requests end theirs.
// The text is set once, in the live region (a screen reader says it); the seconds tick outside
// it, on screen only.
function busy(text, { keepError = false } = {}) {
  const work = { text, started: performance.now() };
  if (!keepError) clearError();
  underWay.push(work);
  showUnderWay();
  const end = () => {
    if (underWay.includes(work)) {
      underWay.splice(underWay.indexOf(work), 1);
      showUnderWay();
    }
    return performance.now() - work.started;
  };
  end.work = work;
  return end;
}

// Another image: the work of the one before is no longer shown, whether or not its cancelled
// requests ever settle.
function onlyUnderWay(end) {
  underWay.splice(0, underWay.length, end.work);
  showUnderWay();
}

function showUnderWay() {
  const latest = underWay.at(-1);
  clearInterval(ticker);
  state.busyText = latest ? latest.text : null;
  $("spinner").hidden = !latest;
  $("elapsed").textContent = "";
  if (latest) {
    const tick = () => { $("elapsed").textContent = ` ${((performance.now() - latest.started) / 1000).toFixed(1)} s`; };
    tick();
    ticker = setInterval(tick, 100);
  }
  showToolStatus();
}

function showToolStatus() {
  setStatus(state.busyText || (tool() === "click" ? state.clickStatus : state.everythingStatus));
}

function showEverythingStatus(text) {
  state.everythingStatus = text;
  showToolStatus();
}

function showClickStatus(text) {
  state.clickStatus = text;
  showToolStatus();
}

// --- The server's model ------------------------------------------------------------------

const WEIGHTS_NOTES = {
  random:
    "These weights are RANDOM: the masks mean nothing (none pass sam2's default thresholds). " +
    "Start the server with an official SAM2.1 checkpoint for real masks.",
  demo:
    "This is the project's small demo model, trained on generated shapes: it finds simple objects, " +
    "not everything in a photo. Start the server with an official SAM2.1 checkpoint for real photos.",
};

async function loadHealth() {
  let info;
  try {
    info = await (await fetch("health")).json();
  } catch (error) {
    $("server-info").textContent = "Cannot reach the server; trying again…";
    setTimeout(loadHealth, 5000);
    return;
  }
  if (info.status !== "ok") { // 503: loading, or told to stop (it may be restarted: keep asking)
    $("server-info").textContent = info.status === "stopping"
      ? "The server is stopping; trying again…"
      : "The server is loading the model…";
    setTimeout(loadHealth, 2000);
    return;
  }
  applyHealth(info);
}

// The server's model, mode and settings (GET /health), or null where it does not say them now
// (out of reach, loading, stopping): read again before each image.
async function currentHealth() {
  try {
    const info = await (await fetch("health")).json();
    return info.status === "ok" ? info : null;
  } catch (_) {
    return null;
  }
}

// Shows what the server runs. Read at the start and again before each image: a server restarted
// meanwhile with other settings or in another mode is the one the page then describes and asks
// (a Filters value still the server's from before becomes the new server's).
function applyHealth(info) {
  const before = state.info?.amg;
  state.info = info;
  $("server-info").textContent = `${info.model} · mode ${info.mode} · ${info.device}`;
  for (const name of FILTERS) {
    const field = $(name);
    const serversOwn = before === undefined
      ? field.value === "" && !field.validity.badInput // nothing typed yet
      : field.value !== "" && Number(field.value) === before[name];
    if (serversOwn && info.amg) field.value = info.amg[name];
  }
  const note = WEIGHTS_NOTES[info.weights];
  $("weights-note").hidden = !note;
  $("weights-note").textContent = note || "";
  const radio = document.querySelector("input[name=tool][value=click]");
  const noPrompts = info.prompts === false;
  if (noPrompts && radio.checked) { // chosen while the model loaded: back to the tool this server has
    document.querySelector("input[name=tool][value=everything]").checked = true;
    setTool();
  }
  radio.disabled = noPrompts;
  let why = $("click-unavailable");
  if (!why) {
    why = document.createElement("span");
    why.id = "click-unavailable";
    why.className = "hint";
    radio.parentElement.append(why);
  }
  why.textContent = noPrompts ? ` (not in mode ${info.mode}: half precision runs no prompts)` : "";
}

// --- Run-length masks ----------------------------------------------------------------------

// pycocotools' compressed RLE string -> run lengths (its rleFrString, in doubles rather than
// 32-bit integers so that large images cannot overflow a shift).
function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && c & 0x10) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Run lengths -> pycocotools' compressed RLE string (its rleToString): decodeCounts' inverse.
function encodeCounts(counts) {
  let text = "";
  counts.forEach((count, i) => {
    let x = i > 2 ? count - counts[i - 2] : count;
    let more = true;
    while (more) {
      let c = ((x % 32) + 32) % 32; // x & 0x1f, for doubles
      x = Math.floor(x / 32); // x >> 5
      more = c & 0x10 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      text += String.fromCharCode(c + 48);
    }
  });
  return text;
}

// A mask's bounding box, {x, y, width, height} (COCO's bbox), or null for an empty mask.
function runBox(counts) {
  const h = state.height;
  let first = -1;
  let last = -1;
  let top = h;
  let bottom = -1;
  let p = 0;
  for (let r = 0; r < counts.length; r++) {
    if (r & 1 && counts[r] > 0) {
      const end = p + counts[r] - 1;
      if (first < 0) first = p;
      last = end;
      if (Math.floor(p / h) !== Math.floor(end / h)) {
        top = 0;
        bottom = h - 1;
      } else {
        top = Math.min(top, p % h);
        bottom = Math.max(bottom, end % h);
      }
    }
    p += counts[r];
  }
  if (first < 0) return null;
  const x = Math.floor(first / h);
  return { x, y: top, width: Math.floor(last / h) - x + 1, height: bottom - top + 1 };
}

// A mask's COCO figures: its area, and its bbox ([x, y, width, height]; [0, 0, 0, 0] for an
// empty mask, as the server writes it).
function cocoFigures(counts) {
  const box = runBox(counts);
  return { area: counts.reduce((sum, run, r) => (r & 1 ? sum + run : sum), 0),
           bbox: box ? [box.x, box.y, box.width, box.height] : [0, 0, 0, 0] };
}

// The /upload_rle answer (the study's format) of the masks on the page, byte for byte:
// {"mask_0":{"size":[h,w],"counts":[...]},...}.
function studyJson() {
  const answer = {};
  state.counts.forEach((counts, i) => {
    answer[`mask_${i}`] = { size: [state.height, state.width], counts };
  });
  return JSON.stringify(answer);
}

// The masks on the page as a COCO dataset file, the one image and its annotations, which
// pycocotools' COCO(path) reads: the server's records (?format=coco) with every field it gave,
// and the ids that a COCO file has; every category of the page, each mask's by its id (the
// default's, 1, where it was given none). ASCII alone (others as \u escapes): pycocotools reads
// the file in the locale's encoding, not always UTF-8.
function cocoDataset() {
  const annotations = state.annotations.map(({ category, ...a }, i) => ({
    ...a, id: i + 1, image_id: 1, category_id: categoryId(category || DEFAULT_CATEGORY), iscrowd: 0 }));
  for (const name of state.categoryIds.keys()) categoriesInFiles.add(name); // (the file lists them all)
  return JSON.stringify({
    images: [{ id: 1, file_name: fileName(), width: state.width, height: state.height }],
    annotations,
    categories: [...state.categoryIds].sort((a, b) => a[1] - b[1]).map(([name, id]) => (
      { id, name, ...(state.supercategories.has(name) ? { supercategory: state.supercategories.get(name) } : {}) })),
  }).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

// A category's COCO id, given the first time a mask carries it (or a file opened lists it) and
// kept for the tab's life: the file's own id where the page has not given it to another name,
// else the next one free. A name only typed on the way to another gets none, and one mended
// before any file had it gives its id up (forgetReplacedCategory).
function categoryId(name, wanted) {
  const ids = state.categoryIds;
  if (!ids.has(name)) {
    const taken = new Set(ids.values());
    ids.set(name, isCategoryId(wanted) && !taken.has(wanted) ? wanted : freeCategoryId(taken));
    storeCategories();
  }
  return ids.get(name);
}

// COCO ids are 32-bit integers in most tools (and above 2^53 no number is exact here, so that the
// next id would be the same one).
const MAX_CATEGORY_ID = 2 ** 31 - 1;

function isCategoryId(id) {
  return Number.isInteger(id) && id > 0 && id <= MAX_CATEGORY_ID;
}

function freeCategoryId(taken) {
  let id = Math.max(...taken) + 1;
  if (id > MAX_CATEGORY_ID) for (id = 1; taken.has(id); id++);
  return id;
}

// The ids (and supercategories) are kept in the tab's session storage: after a reload (or a crash)
// the tab gives each name the id it had. So are the names suggested, those without an id too (given
// to a mask and not downloaded yet: an id would put a typo in every file). A new tab starts
// again, as does a tab whose browser refuses storage.
const CATEGORY_IDS_KEY = "sam2serve.categoryIds";
const CATEGORY_NAMES_KEY = "sam2serve.categoryNames";

// Stored once the task that changed them ends: a file opened may give a thousand ids, one write.
let categoriesToStore = false;
function storeCategories() {
  if (categoriesToStore) return;
  categoriesToStore = true;
  queueMicrotask(() => {
    categoriesToStore = false;
    const entry = ([name, id]) => (state.supercategories.has(name) ? [name, id, state.supercategories.get(name)]
      : [name, id]);
    try { // the ids first, with the room the names took (the names repeat them): they matter more
      sessionStorage.removeItem(CATEGORY_NAMES_KEY);
      sessionStorage.setItem(CATEGORY_IDS_KEY, JSON.stringify([...state.categoryIds].map(entry)));
      sessionStorage.setItem(CATEGORY_NAMES_KEY, JSON.stringify([...suggestedCategories]));
    } catch {
      // (refused: what was not stored holds for this page's life; the ids' names are suggested after a reload)
    }
  });
}

// The stored names suggested, in their order, then the stored [name, id] or [name, id,
// supercategory] entries that the page can read, each a suggestion; those garbled, or whose name
// or id an entry before them took, are left out.
function restoreCategories() {
  const stored = (key) => {
    try {
      const value = JSON.parse(sessionStorage.getItem(key) || "[]");
      return Array.isArray(value) ? value : [];
    } catch {
      return [];
    }
  };
  for (const name of stored(CATEGORY_NAMES_KEY)) if (typeof name === "string") suggestCategory(name.trim());
  const entries = stored(CATEGORY_IDS_KEY);
  const ids = state.categoryIds;
  const taken = new Set(ids.values());
  for (const entry of entries) {
    if (!Array.isArray(entry) || typeof entry[0] !== "string") continue;
    const [name, id, supercategory] = [entry[0].trim(), entry[1], entry[2]];
    if (name && !ids.has(name) && isCategoryId(id) && !taken.has(id)) {
      ids.set(name, id);
      taken.add(id);
      categoriesInFiles.add(name); // (it may have been in one)
      suggestCategory(name);
    }
    if (ids.get(name) === id) keepSupercategory(name, supercategory);
  }
}

// A category's supercategory, as another tool's COCO file gives it: a name, kept in the COCO
// download. The first one given holds.
function keepSupercategory(name, supercategory) {
  if (typeof supercategory === "string" && supercategory && !state.supercategories.has(name)) {
    state.supercategories.set(name, supercategory);
  }
}

// A name given (or opened): one of the field's suggestions from now on.
const suggestedCategories = new Set(); // (a COCO file may list a thousand)
function suggestCategory(name) {
  if (!name || suggestedCategories.has(name)) return;
  suggestedCategories.add(name);
  const option = document.createElement("option");
  option.value = name;
  $("category-names").append(option);
}

// The names of the files downloaded or opened in this tab (and those read back with their ids
// from its storage, which may have been in one): kept, with their ids, for the next files.
const categoriesInFiles = new Set();

// A name given in place of another (a typo mended) takes its place among the suggestions where
// nothing else holds that one: no file has it, no mask of the image carries it (a removed mask
// put back suggests its name again), and the click tool adds none with it. Its id goes too (a
// mask added in the click tool gave it one), so that no file lists it.
function forgetReplacedCategory(before, given) {
  before = (before ?? "").trim();
  if (!before || before === DEFAULT_CATEGORY || before === (given || "") || !suggestedCategories.has(before)
      || categoriesInFiles.has(before) || state.addCategory === before
      || state.annotations.some((a) => a.category === before)) return;
  suggestedCategories.delete(before);
  state.categoryIds.delete(before);
  for (const option of [...$("category-names").options]) if (option.value === before) option.remove();
}

// Distinct colours: hues a golden angle apart.
function colour(i) {
  const hue = (i * 137.508) % 360;
  const f = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (0.55 - 0.4 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

// Column-major label map of the masks `shown` takes (every mask by default): masks painted
// largest first, so that small ones stay on top.
function buildLabels(shown = () => true) {
  const n = state.annotations.length;
  const labels = n < 65535 ? new Uint16Array(state.width * state.height) : new Uint32Array(state.width * state.height);
  const order = [...Array(n).keys()].filter((i) => shown(state.annotations[i]))
    .sort((a, b) => state.annotations[b].area - state.annotations[a].area);
  for (const i of order) {
    const counts = state.counts[i];
    let p = 0;
    for (let r = 0; r < counts.length; r++) {
      if (r & 1) labels.fill(i + 1, p, p + counts[r]);
      p += counts[r];
    }
  }
  return labels;
}

function packed([r, g, b], alpha) {
  return ((alpha << 24) | (b << 16) | (g << 8) | r) >>> 0; // RGBA bytes, little-endian
}

// The masks of a label map (null: none) in their colours on a layer, and a darker line where two
// masks (or a mask and nothing) meet.
function drawMasks(layer, labels) {
  const { width: w, height: h } = state;
  const canvas = $(layer);
  canvas.width = w;
  canvas.height = h;
  if (!labels) return;
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  const pixels = new Uint32Array(image.data.buffer);
  const fill = state.colours.map((c, i) =>
    packed(c, state.annotations[i].area > (w * h) / 2 ? LARGE_MASK_ALPHA : MASK_ALPHA));
  const edge = state.colours.map((c) => packed(c.map((v) => v >> 1), EDGE_ALPHA));
  for (let x = 0; x < w; x++) {
    const column = x * h;
    for (let y = 0; y < h; y++) {
      const label = labels[column + y];
      if (!label) continue;
      const border =
        (y + 1 < h && labels[column + y + 1] !== label) ||
        (y > 0 && labels[column + y - 1] !== label) ||
        (x + 1 < w && labels[column + h + y] !== label) ||
        (x > 0 && labels[column - h + y] !== label);
      pixels[y * w + x] = border ? edge[label - 1] : fill[label - 1];
    }
  }
  context.putImageData(image, 0, 0);
}

// The layers of masks: every mask, shown in the every-mask tool, and the masks added by clicks
// alone, shown in the click tool (what is labelled so far, the server's masks resting meanwhile).
// Each tool shows its own (style.css), so a change of tool draws nothing.
function drawMaskLayers() {
  drawMasks("mask-canvas", state.labels);
  drawMasks("added-canvas", state.annotations.some((a) => a.prompt) ? buildLabels((a) => a.prompt) : null);
}

// One mask (run lengths) in `rgb`, its outline opaque. The pictures of the masks painted last
// are kept, up to twice the image's pixels in all: hovering back to a large mask (the background)
// copies its picture instead of making it again.
function paintMask(context, counts, rgb) {
  const key = String(rgb);
  const at = state.painted.findIndex((p) => p.counts === counts && p.rgb === key);
  const { picture } = at >= 0 ? state.painted.splice(at, 1)[0] : { picture: maskPicture(counts, rgb) };
  state.painted.push({ counts, rgb: key, picture });
  const size = (p) => (p.picture ? p.picture.canvas.width * p.picture.canvas.height : 0);
  let kept = state.painted.reduce((sum, p) => sum + size(p), 0);
  while (state.painted.length > 1 && kept > 2 * state.width * state.height) kept -= size(state.painted.shift());
  if (picture) context.drawImage(picture.canvas, picture.x, picture.y);
}

// The picture of one mask over its bounding box: {canvas, x, y}, or null for an empty mask.
function maskPicture(counts, rgb) {
  const box = runBox(counts);
  if (!box) return null;
  const { x: x0, y: top, width: bw, height: bh } = box;
  const h = state.height;
  // Which pixels of the box are the mask's, column by column as the runs go: one fill per run
  // (a run that crosses columns made the box as tall as the image, so it crosses the box's
  // columns as it does the image's). Filled pixel by pixel, a 4000x3000 background took 0.3 s.
  const inside = new Uint8Array(bw * bh);
  let p = 0;
  for (let r = 0; r < counts.length; r++) {
    if (r & 1) {
      const x = Math.floor(p / h);
      const at = (x - x0) * bh + p - x * h - top;
      inside.fill(1, at, at + counts[r]);
    }
    p += counts[r];
  }
  const image = new ImageData(bw, bh);
  const pixels = new Uint32Array(image.data.buffer);
  const fill = packed(rgb, 170);
  const line = packed([255, 255, 255], 255);
  for (let x = 0; x < bw; x++) {
    for (let y = 0, i = x * bh; y < bh; y++, i++) {
      if (!inside[i]) continue;
      const border = x === 0 || y === 0 || x === bw - 1 || y === bh - 1 ||
        !inside[i - 1] || !inside[i + 1] || !inside[i - bh] || !inside[i + bh];
      pixels[y * bw + x] = border ? line : fill;
    }
  }
  // Drawn from a canvas of its own, as putImageData would replace what is under it.
  const canvas = document.createElement("canvas");
  canvas.width = bw;
  canvas.height = bh;
  canvas.getContext("2d").putImageData(image, 0, 0);
  return { canvas, x: x0, y: top };
}

// --- Turning the picture as the server does ------------------------------------------------
//
// The server turns every image by its orientation (Pillow's exif_transpose): EXIF's, or where
// EXIF has none, XMP's tiff:Orientation. Browsers do that for some formats only (Chromium: EXIF
// in JPEG and PNG, not in WebP, and XMP in none), so the page reads the orientation from the
// file and turns the picture itself where this browser has not.

// TIFF's types as Pillow reads an orientation of each: its size, and its value (the first of
// several); null for text and bytes (ASCII, BYTE, UNDEFINED: kept as such, no orientation equals
// them). Pillow skips an entry of a type not here.
const EXIF_TYPES = {
  1: { size: 1, value: () => null },
  2: { size: 1, value: () => null },
  3: { size: 2, value: (view, at, little) => view.getUint16(at, little) },
  4: { size: 4, value: (view, at, little) => view.getUint32(at, little) },
  5: { size: 8, value: (view, at, little) => view.getUint32(at, little) / view.getUint32(at + 4, little) },
  6: { size: 1, value: (view, at) => view.getInt8(at) },
  7: { size: 1, value: () => null },
  8: { size: 2, value: (view, at, little) => view.getInt16(at, little) },
  9: { size: 4, value: (view, at, little) => view.getInt32(at, little) },
  10: { size: 8, value: (view, at, little) => view.getInt32(at, little) / view.getInt32(at + 4, little) },
  11: { size: 4, value: (view, at, little) => view.getFloat32(at, little) },
  12: { size: 8, value: (view, at, little) => view.getFloat64(at, little) },
  13: { size: 4, value: (view, at, little) => view.getUint32(at, little) },
  16: { size: 8, value: (view, at, little) => Number(view.getBigUint64(at, little)) },
};

const ascii = (view, at, length) => String.fromCharCode(...new Uint8Array(view.buffer, view.byteOffset + at, length));

// The orientation in the EXIF from `start` to `end` of `view` (a TIFF header and its first
// directory of 12-byte entries: tag 0x0112), after at most `headers` "Exif\0\0" headers, as
// Pillow reads it: of any type, the first of several values, from the first entry of the tag it
// stores (one of a type it does not know or of no value is skipped, as is one whose values, with
// those before, would be more than the EXIF holds; one whose values lie past its end ends the
// reading, with what was read). Browsers read only one SHORT, after no such header (but JPEG's
// own). Answers { value (null: none that turns), usual: in that form }; null where Pillow finds
// no orientation (it then reads XMP's); undefined for no EXIF at all (nothing after the headers).
function exifOrientation(view, start, end, headers) {
  let usual = true;
  end = Math.min(end, view.byteLength); // a segment or chunk cut short: what there is of it
  for (; headers > 0 && end - start >= 6 && ascii(view, start, 6) === "Exif\0\0"; headers--) {
    [start, usual] = [start + 6, false];
  }
  if (start >= end) return undefined;
  const exif = new DataView(view.buffer, view.byteOffset + start, end - start);
  const prefix = exif.byteLength >= 8 ? ascii(exif, 0, 4) : "";
  if (!["MM\0*", "II*\0", "MM*\0", "II\0*"].includes(prefix)) return { value: null, usual: false }; // Pillow fails
  const little = prefix.startsWith("II");
  let found = null;
  try {
    const directory = exif.getUint32(4, little);
    let outOfLine = 0;
    for (let i = 0; i < exif.getUint16(directory, little); i++) {
      const entry = directory + 2 + 12 * i;
      const [tag, type, count] = [exif.getUint16(entry, little), exif.getUint16(entry + 2, little),
        exif.getUint32(entry + 4, little)];
      const size = (EXIF_TYPES[type]?.size ?? 0) * count;
      if ((tag === 0x0112 && found) || size === 0) continue;
      let at = entry + 8;
      if (size > 4) {
        at = exif.getUint32(entry + 8, little);
        outOfLine += size;
        if (outOfLine > exif.byteLength) continue;
        if (at + size > exif.byteLength) break;
      }
      if (tag === 0x0112) {
        found = { value: EXIF_TYPES[type].value(exif, at, little), usual: usual && type === 3 && count === 1 };
      }
    }
  } catch (error) {
    if (!(error instanceof RangeError)) throw error; // the directory cut short: what was read before it
  }
  return found;
}

// A PNG text chunk's text, from after its keyword: tEXt's as it is; zTXt's after a method byte,
// deflated; iTXt's after whether it is deflated, a method byte, a language and a translated
// keyword. "" where it does not inflate (Pillow then finds nothing in it either).
async function pngText(type, bytes) {
  let start = type === "zTXt" ? 1 : 0;
  if (type === "iTXt") {
    start = 2;
    for (let nulls = 0; nulls < 2 && start < bytes.length; start++) if (bytes[start] === 0) nulls++;
  }
  const deflated = type === "zTXt" || (type === "iTXt" && bytes[0] === 1);
  try {
    const stream = new Blob([bytes.subarray(start)]).stream();
    return await new Response(deflated ? stream.pipeThrough(new DecompressionStream("deflate")) : stream).text();
  } catch (error) {
    return "";
  }
}

// The orientation (1-8) a JPEG, PNG or WebP file gives, as Pillow reads it, its format, and
// where it was found ("exif"; "exif-late": a PNG's after its image data; "exif-odd": in a form
// browsers do not read, see exifOrientation and the PNG's below; "xmp").
async function fileOrientation(buffer) {
  const view = new DataView(buffer);
  const text = (at, length) => ascii(view, at, length);
  const orientationIn = (packet) => {
    const match = /tiff:Orientation(="|>)([0-9])/.exec(packet); // Pillow's pattern
    return match ? Number(match[2]) : null;
  };
  const xmp = (at, length) => orientationIn(new TextDecoder().decode(new Uint8Array(buffer, at, length))); // UTF-8
  const XMP_JPEG = "http://ns.adobe.com/xap/1.0/\0";
  let format = "";
  let exif; // undefined: no EXIF; null: EXIF without an orientation Pillow reads
  let exifSeen = false; // a JPEG's or WebP's first EXIF is Pillow's; a PNG's raw profile where it has none
  let exifSource = "exif";
  let fromXmp = null;
  const pngTexts = {}; // a PNG's text chunks by keyword, the last of each (as Pillow keeps them): [type, bytes]
  try {
    if (view.getUint16(0) === 0xffd8) { // JPEG: segments up to the image data (0xda); EXIF and XMP in APP1 (0xe1)
      format = "jpeg";
      for (let p = 2; view.getUint8(p) === 0xff && view.getUint8(p + 1) !== 0xda; p += 2 + view.getUint16(p + 2)) {
        if (view.getUint8(p + 1) !== 0xe1) continue;
        if (text(p + 4, 6) === "Exif\0\0") { // Pillow reads the first (and adds later ones' bytes to it)
          if (!exifSeen) exif = exifOrientation(view, p + 10, p + 2 + view.getUint16(p + 2), 1);
          exifSeen = true;
        } else if (text(p + 4, XMP_JPEG.length) === XMP_JPEG) {
          fromXmp = xmp(p + 4 + XMP_JPEG.length, view.getUint16(p + 2) - 2 - XMP_JPEG.length);
        }
      }
    } else if (text(0, 8) === "\x89PNG\r\n\x1a\n") { // PNG: chunks of length, type, data, CRC
      format = "png";
      // Pillow keeps the last EXIF, of an eXIf chunk or a tEXt chunk named "exif", wherever it
      // is; browsers read one eXIf chunk before the image data.
      let afterData = false;
      let last = null; // [type, start, end, after the image data]
      let eXIfs = 0;
      for (let p = 8; p + 8 <= view.byteLength; p += 12 + view.getUint32(p)) {
        const type = text(p + 4, 4);
        const [start, end] = [p + 8, p + 8 + view.getUint32(p)];
        if (type === "IDAT") afterData = true;
        if (type === "eXIf") {
          last = [type, start, end, afterData];
          eXIfs++;
        } else if (["iTXt", "tEXt", "zTXt"].includes(type)) {
          const bytes = new Uint8Array(buffer, start, end - start);
          const keywordEnd = bytes.indexOf(0);
          if (keywordEnd <= 0) continue;
          const keyword = text(start, keywordEnd);
          if (keyword === "exif") last = [type, start + keywordEnd + 1, end, afterData];
          else pngTexts[keyword] = [type, bytes.subarray(keywordEnd + 1)];
        }
      }
      exifSeen = last !== null;
      if (last) {
        const [type, start, end, late] = last;
        // A compressed "exif" text is one Pillow fails on: the server then turns nothing.
        exif = type === "eXIf" || type === "tEXt" ? exifOrientation(view, start, end, type === "eXIf" ? 1 : 2)
          : { value: null, usual: false };
        if (exif && (type !== "eXIf" || eXIfs > 1)) exif.usual = false;
        if (late) exifSource = "exif-late";
      }
    } else if (text(0, 4) === "RIFF" && text(8, 4) === "WEBP") { // WebP: chunks of type, length (little-endian), data
      format = "webp";
      for (let p = 12; p + 8 <= view.byteLength;) {
        const length = view.getUint32(p + 4, true);
        const type = text(p, 4);
        if (type === "EXIF" && !exifSeen) [exif, exifSeen] = [exifOrientation(view, p + 8, p + 8 + length, 2), true];
        else if (type === "XMP ") fromXmp = xmp(p + 8, length);
        p += 8 + length + (length & 1); // padded to an even length
      }
    }
  } catch (error) {
    if (!(error instanceof RangeError)) throw error; // a file cut short: what was read before it
  }
  if (format === "png" && !exifSeen && pngTexts["Raw profile type exif"]) {
    // A PNG's EXIF as ImageMagick writes it, where it has no other: hexadecimal after three lines
    // (a blank one, "exif", the length). Pillow reads it; browsers do not.
    const lines = (await pngText(...pngTexts["Raw profile type exif"])).split("\n");
    const hex = lines.slice(3).join("").replace(/[ \t\r\v\f]/g, "");
    exif = hex ? { value: null, usual: false } : undefined; // not hexadecimal: Pillow fails, the server turns nothing
    if (hex && /^([0-9a-fA-F]{2})+$/.test(hex)) {
      const bytes = Uint8Array.from(hex.match(/../g), (pair) => parseInt(pair, 16));
      exif = exifOrientation(new DataView(bytes.buffer), 0, bytes.length, 2);
      if (exif) exif.usual = false;
    }
  }
  if (exif) return { format, orientation: exif.value, source: exif.usual ? exifSource : "exif-odd" };
  if (pngTexts["XML:com.adobe.xmp"]) fromXmp = orientationIn(await pngText(...pngTexts["XML:com.adobe.xmp"]));
  return { format, orientation: fromXmp ?? 1, source: "xmp" };
}

// Canvas transforms that draw a picture stored w x h upright, by EXIF orientation (5-8 swap its
// width and height): what exif_transpose does.
const TURNS = {
  2: (w, h) => [-1, 0, 0, 1, w, 0], // mirrored
  3: (w, h) => [-1, 0, 0, -1, w, h], // upside down
  4: (w, h) => [1, 0, 0, -1, 0, h], // mirrored upside down
  5: (w, h) => [0, 1, 1, 0, 0, 0], // mirrored along the diagonal
  6: (w, h) => [0, 1, -1, 0, h, 0], // a quarter turn clockwise
  7: (w, h) => [0, -1, -1, 0, h, w], // mirrored along the other diagonal
  8: (w, h) => [0, -1, 1, 0, 0, w], // a quarter turn anticlockwise
};

// 2x1 pixels with orientation 6 in each format, in EXIF or in XMP alone: a browser that turns
// that format by that orientation decodes it 1x2.
const TURN_PROBES = {
  "jpeg-exif": "/9j/4AAQSkZJRgABAQAAAQABAAD/4QAiRXhpZgAATU0AKgAAAAgAAQESAAMAAAABAAYAAAAAAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hnPk1xeXBkeFxlZ2P/wAALCAABAAIBAREA/8QAFAABAAAAAAAAAAAAAAAAAAAAAP/EABQQAQAAAAAAAAAAAAAAAAAAAAD/2gAIAQEAAD8AP//Z",
  "png-exif": "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAAAAADRSSBWAAAAGmVYSWZNTQAqAAAACAABARIAAwAAAAEABgAAAAAAANZnS2kAAAALSURBVHjaY2xgAAABBgCCtmAv3wAAAABJRU5ErkJggg==",
  "png-exif-late": "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAAAAADRSSBWAAAAC0lEQVR42mNsYAAAAQYAgrZgL98AAAAaZVhJZk1NACoAAAAIAAEBEgADAAAAAQAGAAAAAAAA1mdLaQAAAABJRU5ErkJggg==",
  "webp-exif": "UklGRlIAAABXRUJQVlA4WAoAAAAIAAAAAQAAAAAAVlA4TBEAAAAvAQAAAAdQwAIWsP+BiOh/AABFWElGGgAAAE1NACoAAAAIAAEBEgADAAAAAQAGAAAAAAAA",
  "jpeg-xmp": "/9j/4AAQSkZJRgABAQAAAQABAAD/4QDsaHR0cDovL25zLmFkb2JlLmNvbS94YXAvMS4wLwA8eDp4bXBtZXRhIHhtbG5zOng9ImFkb2JlOm5zOm1ldGEvIj48cmRmOlJERiB4bWxuczpyZGY9Imh0dHA6Ly93d3cudzMub3JnLzE5OTkvMDIvMjItcmRmLXN5bnRheC1ucyMiPjxyZGY6RGVzY3JpcHRpb24geG1sbnM6dGlmZj0iaHR0cDovL25zLmFkb2JlLmNvbS90aWZmLzEuMC8iIHRpZmY6T3JpZW50YXRpb249IjYiLz48L3JkZjpSREY+PC94OnhtcG1ldGE+/9sAQwAIBgYHBgUIBwcHCQkICgwUDQwLCwwZEhMPFB0aHx4dGhwcICQuJyAiLCMcHCg3KSwwMTQ0NB8nOT04MjwuMzQy/8AACwgAAQACAQERAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//EALUQAAIBAwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAAgBAQAAPwAr/9k=",
  "png-xmp": "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAAAAADRSSBWAAAA42lUWHRYTUw6Y29tLmFkb2JlLnhtcAAAAAAAPHg6eG1wbWV0YSB4bWxuczp4PSJhZG9iZTpuczptZXRhLyI+PHJkZjpSREYgeG1sbnM6cmRmPSJodHRwOi8vd3d3LnczLm9yZy8xOTk5LzAyLzIyLXJkZi1zeW50YXgtbnMjIj48cmRmOkRlc2NyaXB0aW9uIHhtbG5zOnRpZmY9Imh0dHA6Ly9ucy5hZG9iZS5jb20vdGlmZi8xLjAvIiB0aWZmOk9yaWVudGF0aW9uPSI2Ii8+PC9yZGY6UkRGPjwveDp4bXBtZXRhPo4XMBcAAAALSURBVHicY2xgAAABBgCCJcRYOAAAAABJRU5ErkJggg==",
  "webp-xmp": "UklGRgYBAABXRUJQVlA4WAoAAAAEAAAAAQAAAAAAVlA4TBEAAAAvAQAAAAdQwAIWsP+BiOh/AABYTVAgzQAAADx4OnhtcG1ldGEgeG1sbnM6eD0iYWRvYmU6bnM6bWV0YS8iPjxyZGY6UkRGIHhtbG5zOnJkZj0iaHR0cDovL3d3dy53My5vcmcvMTk5OS8wMi8yMi1yZGYtc3ludGF4LW5zIyI+PHJkZjpEZXNjcmlwdGlvbiB4bWxuczp0aWZmPSJodHRwOi8vbnMuYWRvYmUuY29tL3RpZmYvMS4wLyIgdGlmZjpPcmllbnRhdGlvbj0iNiIvPjwvcmRmOlJERj48L3g6eG1wbWV0YT4A",
};
const browserTurns = {}; // "format-source" -> promise of whether this browser applies that orientation

function turnsItself(format, source) {
  const kind = `${format}-${source}`;
  if (!TURN_PROBES[kind]) return Promise.resolve(false);
  const probe = () => new Blob([Uint8Array.from(atob(TURN_PROBES[kind]), (c) => c.charCodeAt(0))]);
  browserTurns[kind] ??= createImageBitmap(probe()).then((bitmap) => bitmap.width === 1, () => false);
  return browserTurns[kind];
}

// The file's picture as the server sees it: decoded by the browser, turned where it has not.
async function decodeImage(file) {
  const bitmap = await createImageBitmap(file);
  const { format, orientation, source } = await fileOrientation(await file.arrayBuffer());
  if (!TURNS[orientation] || (await turnsItself(format, source))) return bitmap;
  const [w, h] = [bitmap.width, bitmap.height];
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = orientation >= 5 ? [h, w] : [w, h];
  const context = canvas.getContext("2d");
  context.setTransform(...TURNS[orientation](w, h));
  context.drawImage(bitmap, 0, 0);
  bitmap.close(); // a large photo's pixels, not kept until garbage collection
  return createImageBitmap(canvas);
}

// --- One image ---------------------------------------------------------------------------

function resetImage() {
  Object.assign(state, {
    annotations: [], counts: [], labels: null, colours: [], coloursGiven: 0, hovered: -1, selected: -1, painted: [],
    removedMasks: [], categoryBefore: new Map(), opened: new Set(), openedFile: null, imageId: null, embedding: null,
    clicks: [], box: null, boxAfter: 0, dragBox: null, cursor: null, cursorShown: false,
    clickPrompt: null, clickAnswer: null, candidate: 0, segmentInFlight: 0, clickStatus: "Open an image first.",
  });
  press = null; // a press on the previous image is not a click on this one
  sayCursor(""); // the previous image's place
  $("mask-list").tBodies[0].replaceChildren();
  $("hover-info").textContent = "\u00a0";
  for (const id of ["download-rle", "download-coco", "download-png", "open-masks", "clear-clicks", "keep-click",
    "next-candidate", "remove-mask", "put-back-mask"]) {
    $(id).disabled = true;
  }
  showCategory();
}

// The previous image and its masks leave the viewer as soon as another is opened: a refused
// upload must not leave them looking like its answer.
function clearViewer() {
  state.width = 0;
  state.height = 0;
  for (const id of LAYERS) {
    $(id).width = 0;
    $(id).height = 0;
    $(id).style.width = $(id).style.height = "";
  }
  $("viewer").classList.remove("has-image");
  imageStop();
}

async function openFile(file) {
  if (!file) return;
  checkOffset($("stability_score_offset")); // also a value typed before a reload, which the browser kept
  if (!$("filters-form").checkValidity()) { // typed in the Filters box, not submitted, not a value it takes
    $("filters").open = true;
    $("filters-form").reportValidity();
    showError("A value in the Filters box is not one the server takes: correct it, then open the image again.");
    return;
  }
  const opening = ++state.opening;
  state.fileOpening = file; // Segment again meanwhile segments this one, not the image it replaces
  const what = file.name || "the pasted image";
  const done = busy(`Segmenting ${what}…`);
  // The picture first: a file this browser cannot show is not sent, as no mask could be drawn on
  // it, and the image open until then stays, with its masks and clicks.
  const bitmap = await decodeImage(file).catch(() => null);
  if (opening !== state.opening) { // another file was chosen meanwhile
    bitmap?.close();
    done();
    return;
  }
  if (!bitmap) {
    state.fileOpening = null; // the image before stays
    done();
    showError(`This browser cannot show ${what} as pixels: a damaged or cut-short file, or a format it does not ` +
      "decode to pixels here (such as TIFF, or SVG, which is drawn); " +
      `a PNG or JPEG of it will do (it was not sent to the server${state.width ? "; the image before stays" : ""}).`);
    return;
  }
  const info = await currentHealth();
  if (opening !== state.opening) {
    bitmap.close();
    done();
    return;
  }
  if (info) applyHealth(info);
  const generation = ++state.generation;
  for (const previous of [state.imageRequests, state.segmentRequest]) if (previous) previous.abort();
  onlyUnderWay(done);
  const requests = (state.imageRequests = new AbortController());
  // Its rows go: the keyboard comes back to the list, unless the pointer went elsewhere meanwhile.
  const listFocused = $("mask-list").contains(document.activeElement);
  let pressedElsewhere = false;
  const pressed = () => { pressedElsewhere = true; };
  document.addEventListener("pointerdown", pressed, { capture: true, once: true });
  resetImage();
  clearViewer();
  state.file = file;
  state.fileOpening = null;
  state.name = (file.name || "pasted").replace(/\.[^.]*$/, "") || "image";
  showImage(bitmap);
  const query = everythingQuery();
  try {
    const text = await request(`upload_rle?${query}`, { method: "POST", body: imageForm(), signal: requests.signal });
    const serverMs = done();
    if (generation !== state.generation) return;
    showMasks(text);
    const count = state.annotations.length;
    showEverythingStatus(`${count} ${count === 1 ? "mask" : "masks"} in ${(serverMs / 1000).toFixed(2)} s ` +
      `(drawn in ${Math.round(state.renderMs)} ms)${FILTERS.some((name) => query.has(name)) ? "; this page's filters" : ""}`);
    if (tool() === "click") await embed();
  } catch (error) {
    done();
    if (generation !== state.generation) return;
    state.labels = null; // no masks: the click tool stays off for this image
    imageStop();
    const filterRefused = error.status === 400 && FILTERS.some((name) => query.has(name) && error.message.includes(name));
    const forNow = [0, 503, 504].includes(error.status); // busy, stopping, timed out, out of reach: not the image
    state.everythingStatus = state.clickStatus = filterRefused
      ? "No masks: the server refused this page's filters; correct them, then Segment again."
      : forNow ? "No masks yet: open the image again, or Segment again (under Filters), to try again."
        : "No masks for this image: open another.";
    showToolStatus();
    showError(error.message);
  }
  document.removeEventListener("pointerdown", pressed, { capture: true });
  if (listFocused && !pressedElsewhere && document.activeElement === document.body) focusList();
}

function showImage(bitmap) {
  state.width = bitmap.width;
  state.height = bitmap.height;
  for (const id of LAYERS) {
    $(id).width = bitmap.width;
    $(id).height = bitmap.height;
  }
  if (bitmap instanceof ImageBitmap) {
    const context = $("image-canvas").getContext("2d");
    context.fillStyle = "#fff"; // transparent pixels over white, as the server segments them
    context.fillRect(0, 0, bitmap.width, bitmap.height);
    context.drawImage(bitmap, 0, 0);
    bitmap.close(); // drawn: the canvas holds its pixels now
  }
  $("viewer").classList.add("has-image");
  imageStop();
  fitToWindow();
}

// Shows the image as large as the window allows beside the list (small images up to 4x), its
// short side at least MIN_SHOWN_SIDE pixels (up to 4x): a panorama strip's masks stay in reach
// of a pointer, its long side a scroll of the viewer away (a tall strip's too: the viewer ends
// where the window does, beside the list).
const MIN_SHOWN_SIDE = 32;

function fitToWindow() {
  const main = document.querySelector("main");
  const stacked = getComputedStyle(main).flexDirection === "column"; // narrow screens: the list below
  // Beside the image, the list ends where the window does: its last rows a scroll of the list away.
  const aside = document.querySelector("aside");
  aside.style.maxHeight = stacked ? "" : `${Math.max(200, window.innerHeight - aside.getBoundingClientRect().top - 16)}px`;
  if (!state.width) return;
  const width = main.clientWidth - (stacked ? 4 : aside.offsetWidth + 24);
  const height = Math.max(240, window.innerHeight - $("viewer").offsetTop - 16);
  $("viewer").style.maxHeight = stacked ? "" : `${height}px`;
  const least = Math.min(MIN_SHOWN_SIDE / Math.min(state.width, state.height), 4);
  const scale = Math.max(Math.min(width / state.width, height / state.height, 4), least);
  for (const id of LAYERS) {
    $(id).style.width = `${Math.floor(state.width * scale)}px`;
    $(id).style.height = `${Math.floor(state.height * scale)}px`;
  }
}

function showMasks(cocoText) {
  const annotations = JSON.parse(cocoText);
  const [h, w] = annotations.length ? annotations[0].segmentation.size : [state.height, state.width];
  if (h !== state.height || w !== state.width) {
    throw new Error(`The server's masks are ${w}x${h} but the browser shows the image as ` +
      `${state.width}x${state.height}; masks cannot be drawn over it.`);
  }
  showRecords(annotations, annotations.map((a) => decodeCounts(a.segmentation.counts)));
}

// Masks as the image's own: their records (COCO annotations) and run lengths, drawn and listed.
function showRecords(annotations, counts) {
  const started = performance.now();
  state.annotations = annotations;
  state.counts = counts;
  state.removedMasks = []; // the masks they replace are not put back among them
  state.colours = state.annotations.map((_, i) => colour(i));
  state.coloursGiven = state.colours.length;
  state.labels = buildLabels();
  imageStop();
  drawMaskLayers();
  drawHighlight();
  listMasks();
  state.renderMs = performance.now() - started;
  for (const id of ["download-rle", "download-coco", "download-png", "open-masks"]) $(id).disabled = false;
  showCategory();
}

// --- Saved masks opened again ----------------------------------------------------------------

// The masks of a file saved from this page (COCO annotations or Masks JSON), or a COCO file of
// this image from elsewhere (RLE, compressed or not), replace those shown: a labeller goes on
// where they stopped. The file is checked whole first: one that cannot be read changes nothing.
async function openMasks(file) {
  if (!file) return;
  const generation = state.generation;
  let records;
  let savedFor;
  let categories;
  try {
    const text = await file.text();
    if (generation !== state.generation) return; // another image opened meanwhile
    ({ records, savedFor, categories } = recordsOfFile(JSON.parse(text)));
  } catch (error) {
    showError(`${file.name} cannot be opened as this image's masks: ${error instanceof SyntaxError ? "it is not JSON"
      : error.message}.`);
    return;
  }
  // Frames of a video, or a dataset's images, are often of one size: another image's masks would
  // open without a word (a pasted image has no name of its own to tell them by).
  const name = state.file ? fileName() : null;
  if (savedFor && name && savedFor !== name && !confirm(`${file.name} holds the masks of ${savedFor}. Open them ` +
                                                        `over ${name}?`)) return;
  const lost = [masksEdited() ? `the ${EDITS} here` : "",
    state.clicks.length || state.box ? "the clicks" : ""].filter(Boolean);
  const said = lost.join(", and ");
  if (lost.length && !confirm(`Open the masks of ${file.name}? ${said[0].toUpperCase()}${said.slice(1)} are lost ` +
                              "(download the COCO annotations first).")) return;
  clearError();
  state.clicks = [];
  state.box = null;
  segment(); // no clicks: their mask goes
  state.categoryBefore = new Map();
  // The file's own ids where the tab has not given them to other names; then the others the next
  // ids free, above every id of the file: first those whose ids were taken, then those no id can
  // be (a Roboflow file's 0), each in the file's order. The status line says which of its masks'
  // ids changed.
  const taken = new Set(state.categoryIds.values());
  for (const [name, id] of categories) {
    if (isCategoryId(id) && !state.categoryIds.has(name) && !taken.has(id)) taken.add(categoryId(name, id));
  }
  const usable = ([, id]) => isCategoryId(id);
  const carried = new Set(records.map((r) => String(r.annotation.category_id)));
  const moved = [];
  for (const [name, id, supercategory] of [...categories.filter(usable), ...categories.filter((c) => !usable(c))]) {
    if (categoryId(name, id) !== id && carried.has(String(id))) moved.push(`${name}: ${id} to ${categoryId(name)}`);
    keepSupercategory(name, supercategory);
    categoriesInFiles.add(name);
    suggestCategory(name);
  }
  storeCategories(); // (with the supercategories it gave)
  state.selected = state.hovered = -1;
  $("hover-info").textContent = "\u00a0";
  state.opened = new Set(records.map((r) => r.annotation));
  state.openedFile = file.name;
  showRecords(records.map((r) => r.annotation), records.map((r) => r.counts));
  toolButtons();
  const count = records.length;
  state.everythingStatus = `${count} ${count === 1 ? "mask" : "masks"} opened from ${file.name}.` +
    (moved.length ? ` Category ids changed here: ${moved.slice(0, 5).join("; ")}` +
     `${moved.length > 5 ? `; and ${moved.length - 5} more` : ""}.` : "");
  if (tool() === "click") showClickStatus(`${state.everythingStatus} ${CLICK_HELP}`);
  else showToolStatus();
}

// A masks file's records, each {annotation, counts}, in the file's order, the file name of the
// image a COCO dataset file says they are of, and its categories ([name, id, supercategory], by
// id); an Error saying what is wrong with the file otherwise. The page's own figures (area, box)
// are worked out again from the mask, not taken from the file; a mask's category is its
// category_id's name ("category N" for an id the file names not).
function recordsOfFile(data) {
  let annotations;
  let savedFor = null;
  const categoryName = new Map(); // String(id) -> name
  const supercategory = new Map(); // name -> its supercategory, where the file gives one
  if (Array.isArray(data)) annotations = data; // /upload_rle?format=coco's answer
  else if (data && Array.isArray(data.annotations)) { // a COCO dataset file: this image's annotations
    const images = Array.isArray(data.images) ? data.images.filter((i) => i && typeof i === "object") : [];
    const name = state.file ? fileName() : null;
    const image = images.length === 1 ? images[0] : images.find((i) => i.file_name === name);
    if (!image) throw new Error(`it has ${images.length} images, none named ${name}`);
    savedFor = typeof image.file_name === "string" ? image.file_name : null;
    annotations = data.annotations.filter((a) => a && String(a.image_id) === String(image.id)); // "7" or 7
    if (data.annotations.length && !annotations.length) {
      throw new Error(`none of its ${data.annotations.length} annotations is of its image (id ${image.id})`);
    }
    const listed = Array.isArray(data.categories) ? data.categories : [];
    for (const c of listed.filter((c) => c && typeof c.name === "string" && c.name.trim()
                                  && (typeof c.id === "number" || (typeof c.id === "string" && c.id)))
      .sort((a, b) => Number(a.id) - Number(b.id))) {
      if (categoryName.has(String(c.id))) continue;
      categoryName.set(String(c.id), c.name.trim());
      if (typeof c.supercategory === "string" && c.supercategory.trim() && !supercategory.has(c.name.trim())) {
        supercategory.set(c.name.trim(), c.supercategory.trim());
      }
    }
  } else if (data && typeof data === "object" && Object.keys(data).every((key) => /^mask_\d+$/.test(key))) {
    annotations = Object.keys(data).sort((a, b) => a.slice(5) - b.slice(5)).map((key) => ({ segmentation: data[key] }));
  } else throw new Error("it is neither COCO annotations nor a Masks JSON");
  const records = annotations.map((annotation, i) => {
    const segmentation = annotation && annotation.segmentation;
    if (!segmentation || typeof segmentation !== "object" || Array.isArray(segmentation)) {
      throw new Error(`mask ${i} has ${Array.isArray(segmentation) ? "a polygon" : "no segmentation"}: RLE masks only`);
    }
    const size = segmentation.size;
    if (!Array.isArray(size) || size.length !== 2 || !size.every(Number.isInteger)) {
      throw new Error(`mask ${i}'s size is not [height, width] in pixels`);
    }
    const [h, w] = size;
    if (h !== state.height || w !== state.width) {
      throw new Error(`mask ${i} is ${w}x${h}, and the image open is ${state.width}x${state.height}`);
    }
    const counts = typeof segmentation.counts === "string" ? decodeCounts(segmentation.counts) : segmentation.counts;
    if (!Array.isArray(counts) || !counts.every((c) => Number.isInteger(c) && c >= 0)
        || counts.reduce((sum, c) => sum + c, 0) !== h * w) {
      throw new Error(`mask ${i}'s run lengths do not cover the image's ${w}x${h} pixels`);
    }
    const { category: _, ...fields } = annotation; // the page's own field: from category_id alone
    const id = annotation.category_id;
    if ((typeof id === "number" || typeof id === "string") && String(id) && !categoryName.has(String(id))) {
      categoryName.set(String(id), `category ${id}`);
    }
    const category = categoryName.get(String(id));
    return {
      annotation: {
        ...fields,
        segmentation: { size: [h, w], counts: encodeCounts(counts) },
        ...cocoFigures(counts),
        predicted_iou: typeof annotation.predicted_iou === "number" ? annotation.predicted_iou : null,
        ...(category && category !== DEFAULT_CATEGORY ? { category } : {}),
      },
      counts,
    };
  });
  const categories = [...categoryName].map(([id, name]) => [name, Number(id), supercategory.get(name)])
    .sort((a, b) => a[1] - b[1]);
  return { records, savedFor, categories };
}

// --- Every mask: hover, select, list -------------------------------------------------------

function listMasks() {
  const by = $("sort-by").value;
  const key = by === "score" ? (a) => a.predicted_iou ?? -1 : (a) => a.area;
  const category = (i) => state.annotations[i].category || ""; // the default's first: what is left to name
  const order = [...state.annotations.keys()].sort((a, b) =>
    (by === "category" ? category(a).localeCompare(category(b)) : 0)
      || key(state.annotations[b]) - key(state.annotations[a]));
  // Built node by node: the page's Content-Security-Policy refuses inline style in HTML text.
  const cell = (content) => {
    const td = document.createElement("td");
    td.append(content);
    return td;
  };
  const rows = order.map((i) => {
    const row = document.createElement("tr");
    row.dataset.index = i;
    row.tabIndex = -1; // one row at a time is a Tab stop (below); arrows move between rows
    row.classList.toggle("selected", i === state.selected);
    row.setAttribute("aria-selected", String(i === state.selected));
    row.classList.toggle("hovered", i === state.hovered);
    row.classList.toggle("added", Boolean(state.annotations[i].prompt)); // the click tool's masks
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${state.colours[i].join(", ")})`;
    const a = state.annotations[i];
    row.append(cell(swatch), cell(String(i)), cell(a.area.toLocaleString()), cell(iouText(a)), categoryCell(a));
    return row;
  });
  if (!rows.length) {
    const row = document.createElement("tr");
    row.className = "empty";
    row.append(cell(state.removedMasks.length ? "Every mask was removed."
      : "No mask passed the filters (predicted IoU and stability)."));
    row.cells[0].colSpan = 5;
    rows.push(row);
  }
  $("mask-list").tBodies[0].replaceChildren(...rows);
  restList();
}

// In the click tool the list rests: no row is a Tab stop (Enter, Delete and the arrows do nothing
// there), and each says it is off. In the every-mask tool the selected row, else the first, is.
function restList() {
  const rows = [...$("mask-list").tBodies[0].rows].filter((row) => row.dataset.index !== undefined);
  const rests = tool() === "click";
  for (const row of rows) {
    if (rests) {
      row.setAttribute("aria-disabled", "true");
      row.tabIndex = -1;
    } else row.removeAttribute("aria-disabled");
  }
  if (!rests && rows.length) rowStop(rows.find((row) => Number(row.dataset.index) === state.selected) || rows[0]);
}

// The keyboard back in the list (its row that is a Tab stop; the table where no mask is left),
// after the rows it was on were built again: else it was left on <body>, nowhere.
function focusList() {
  ($("mask-list").querySelector("tbody tr[tabindex='0']") || $("mask-list")).focus();
}

// Scrolls the list, not the page, to a row out of its sight (a mask selected on the image).
function showInList(row) {
  const aside = document.querySelector("aside");
  const list = aside.getBoundingClientRect();
  const shown = row.getBoundingClientRect();
  if (shown.top < list.top) aside.scrollTop -= Math.ceil(list.top - shown.top);
  else if (shown.bottom > list.bottom) aside.scrollTop += Math.ceil(shown.bottom - list.bottom);
}

// The list is one Tab stop (hundreds of masks would be hundreds of stops): the row last focused,
// else the selected one, else the first, has tabIndex 0; the others are reached by the arrows.
function rowStop(row) {
  for (const other of row.parentElement.rows) other.tabIndex = other === row ? 0 : -1;
}

// A list row's category: none shown for the default (the field's placeholder says it); a long
// name cut, whole on hover.
function categoryCell(a, td = document.createElement("td")) {
  td.className = "category";
  td.textContent = td.title = a.category || "";
  return td;
}

// A mask opened from a file may come without scores (a Masks JSON, another tool's COCO file).
function iouText(a) {
  return typeof a.predicted_iou === "number" ? a.predicted_iou.toFixed(3) : "none";
}

function describe(i) {
  const a = state.annotations[i];
  return `mask ${i}: predicted IoU ${iouText(a)}, area ${a.area.toLocaleString()} px, ` +
    (a.prompt ? "made by clicks" : typeof a.stability_score === "number" ? `stability ${a.stability_score.toFixed(3)}`
      : a.stability_score === null ? "no stability (empty at both levels)" : "no stability given") +
    (a.category ? `, category ${a.category}` : "");
}

function setHovered(i) {
  if (i === state.hovered) return;
  state.hovered = i;
  for (const row of $("mask-list").tBodies[0].rows) row.classList.toggle("hovered", Number(row.dataset.index) === i);
  const shown = i >= 0 ? i : state.selected;
  $("hover-info").textContent = shown >= 0 ? describe(shown) : "\u00a0";
  drawHighlight();
}

function select(i) {
  state.selected = i === state.selected ? -1 : i;
  for (const row of $("mask-list").tBodies[0].rows) {
    const selected = Number(row.dataset.index) === state.selected;
    row.classList.toggle("selected", selected);
    if (row.dataset.index !== undefined) row.setAttribute("aria-selected", String(selected));
    if (selected) showInList(row);
  }
  $("hover-info").textContent = state.selected >= 0 ? describe(state.selected) : "\u00a0";
  toolButtons();
  const canvas = $("selection-canvas");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (state.selected >= 0) paintMask(context, state.counts[state.selected], [40, 90, 255]);
  drawHighlight();
}

// The top layer: the hovered mask (unless it is the selected one, shown below it already), or
// the click tool's mask and prompts.
function drawHighlight() {
  const canvas = $("highlight-canvas");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (tool() === "click") {
    drawClickLayer(context);
    return;
  }
  if (state.hovered >= 0 && state.hovered !== state.selected) paintMask(context, state.counts[state.hovered], [255, 255, 255]);
}

// --- Click to segment --------------------------------------------------------------------

function tool() {
  return document.querySelector("input[name=tool]:checked").value;
}

// The image id of the current image, encoding it once on the server.
function embed() {
  if (state.imageId) return Promise.resolve(state.imageId);
  if (!state.labels) return Promise.resolve(null); // no image, or one the server refused
  if (state.embedding) return state.embedding;
  const generation = state.generation;
  const done = busy("Encoding the image for clicks…");
  state.embedding = request("embed", { method: "POST", body: imageForm(), signal: state.imageRequests?.signal })
    .then((text) => {
      if (generation !== state.generation) return null;
      state.imageId = JSON.parse(text).image_id;
      const ms = done();
      showClickStatus(`Image encoded in ${Math.round(ms)} ms. ${CLICK_HELP}`);
      return state.imageId;
    })
    .catch((error) => {
      if (generation !== state.generation) return null; // its spinner already belongs to a newer image
      state.clickStatus = "The image could not be encoded for clicks.";
      done();
      showError(error.message);
      return null;
    })
    .finally(() => {
      if (generation === state.generation) state.embedding = null;
    });
  return state.embedding;
}

function clickPrompt() {
  const prompt = {};
  if (state.clicks.length) {
    prompt.points = state.clicks.map((c) => [c.x, c.y]);
    prompt.labels = state.clicks.map((c) => c.label);
  }
  if (state.box) prompt.box = state.box;
  return prompt;
}

// Takes back the last click, or the box if it came after them; false when there is none.
function takeBack() {
  if (state.box && state.clicks.length <= state.boxAfter) state.box = null;
  else if (state.clicks.length) state.clicks.pop();
  else return false;
  return true;
}

// The mask of the clicks and box on the page. Only the answer to the latest prompt on the image
// still open is drawn: an answer (or error) for an earlier image is dropped when it arrives, and
// one for clicks since changed too, the latest clicks then asked for. retried: after a 404,
// once; keepError: after a refusal, whose message stays until the user's next change.
async function segment({ retried = false, keepError = false } = {}) {
  const generation = state.generation;
  const sequence = ++state.segmentSequence;
  const current = () => generation === state.generation && sequence === state.segmentSequence;
  if (!state.clicks.length && !state.box) {
    state.clickAnswer = state.clickPrompt = null;
    toolButtons();
    if (!keepError) clearError(); // a refusal's message goes with the clicks it was about
    if (state.imageId) showClickStatus(CLICK_HELP);
    drawHighlight();
    return;
  }
  toolButtons();
  // One /segment at a time: clicks made while one runs are asked for together when it ends (a
  // request for each would keep the server busy with masks nobody looks at).
  if (state.segmentInFlight) return;
  const imageId = await embed();
  if (!imageId || !current()) return;
  const prompt = clickPrompt();
  const started = performance.now();
  state.segmentInFlight = sequence;
  state.segmentRequest = new AbortController(); // another image cancels it
  const done = busy("Asking the server for the mask…", { keepError });
  let text = null;
  let failure = null;
  try {
    text = await request("segment", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image_id: imageId, prompts: [prompt] }),
      signal: state.segmentRequest.signal,
    });
  } catch (error) {
    failure = error;
  }
  if (generation !== state.generation) return; // another image, with its own requests and spinner
  state.segmentInFlight = 0;
  done();
  if (!current()) { // the clicks changed while it ran: the latest ones are asked for
    segment();
    return;
  }
  if (failure) {
    if (failure.status === 404 && !retried) { // the server's cache dropped the image: encode it again
      state.imageId = null;
      segment({ retried: true });
      return;
    }
    showError(failure.message);
    // A refused prompt (the 65th point): its last click or box is taken back, so the next clicks
    // work; asked again without it, unless the mask shown is that prompt's already.
    if (failure.status === 400 && takeBack()) {
      drawHighlight();
      toolButtons();
      const shown = state.clickPrompt && JSON.stringify(clickPrompt()) === JSON.stringify(state.clickPrompt);
      if (!shown) segment({ keepError: true });
      return;
    }
    // Any other failure (a busy or unreachable server): the mask shown was another prompt's,
    // so it goes; the next click or undo asks again.
    state.clickAnswer = state.clickPrompt = null;
    toolButtons();
    drawHighlight();
    showClickStatus("No mask for these clicks: the request failed (see above). Click again, or undo with Ctrl+Z, " +
      "to ask again.");
    return;
  }
  const answer = JSON.parse(text);
  // The prompt shown asked again (undone to while another ran): its candidates, the one chosen kept.
  if (JSON.stringify(prompt) !== JSON.stringify(state.clickPrompt)
      || state.candidate >= answer.results[0].masks.length) state.candidate = 0;
  state.clickPrompt = prompt;
  state.clickAnswer = answer;
  state.clickMs = Math.round(performance.now() - started);
  if (!keepError) clearError();
  showCandidate();
}

// The click tool's mask shown: the answer's candidate chosen ("Other candidate"), and its figures.
function shownCandidate() {
  const result = state.clickAnswer.results[0];
  return { counts: result.masks[state.candidate].counts, iou: result.iou_predictions[state.candidate],
           of: result.masks.length };
}

// Which candidate is shown leads the line (the time is the same for all of them); an empty one
// says why "Add to masks" is off.
function showCandidate() {
  const { counts, iou, of } = shownCandidate();
  const figures = `predicted IoU ${iou.toFixed(3)}`;
  const empty = runBox(counts) ? "" : of > 1 ? " It is empty, so there is nothing to add." :
    " It is empty, so there is nothing to add: click elsewhere.";
  showClickStatus(of > 1
    ? `Candidate ${state.candidate + 1} of ${of}${state.candidate ? "" : " (the best)"}: ${figures}, mask in ` +
      `${state.clickMs} ms.${empty} "Other candidate" shows the next.`
    : `Mask in ${state.clickMs} ms, ${figures}.${empty}`);
  toolButtons();
  drawHighlight();
}

// One point alone gives three candidates (the object, or parts of it), by predicted IoU: the next
// one is shown, and "Add to masks" takes the one shown.
function nextCandidate() {
  state.candidate = (state.candidate + 1) % shownCandidate().of;
  showCandidate();
}

// Clear clicks: while there are clicks or a box; Add to masks: while the mask shown is theirs
// (not while the mask of clicks since changed is asked for) and not empty; Remove the selected
// mask: while one is, in the every-mask tool; Put back the removed mask: after a removal, there.
function toolButtons() {
  const click = tool() === "click";
  $("remove-mask").disabled = click || state.selected < 0;
  $("put-back-mask").disabled = click || !state.removedMasks.length;
  $("clear-clicks").disabled = !click || (!state.clicks.length && !state.box);
  const current = click && state.clickAnswer && JSON.stringify(clickPrompt()) === JSON.stringify(state.clickPrompt);
  $("keep-click").disabled = !current || !runBox(shownCandidate().counts);
  $("next-candidate").disabled = !current || shownCandidate().of < 2;
  showCategory();
}

// The category field: the selected mask's in the every-mask tool (off while none is), the masks'
// added next in the click tool (once the image's masks have come).
function showCategory() {
  const click = tool() === "click";
  const field = $("category");
  $("category-label").textContent = click ? "Category of the masks added" : "Category of the selected mask";
  field.disabled = click ? !state.labels : state.selected < 0;
  const value = click ? state.addCategory : state.selected >= 0 ? state.annotations[state.selected].category || "" : "";
  // While it is typed in, what it says stays as typed where it is that category ("red " on the way
  // to "red car"): a click's answer that comes meanwhile leaves it be.
  if (document.activeElement !== field || typedCategory() !== value) field.value = value;
}

// The field's category: trimmed, the default's name none.
function typedCategory() {
  const typed = $("category").value.trim();
  return typed === DEFAULT_CATEGORY ? "" : typed;
}

// A category typed: the selected mask's as each key is typed (nothing typed is lost to a click
// elsewhere), or the click tool's for the masks it adds. Its figures (heard by screen readers)
// wait for the name given.
function typeCategory() {
  const name = typedCategory();
  if (tool() === "click") {
    state.addCategory = name;
    return;
  }
  const i = state.selected;
  const a = state.annotations[i];
  if (!a || (a.category || "") === name) return;
  if (!state.categoryBefore.has(a)) state.categoryBefore.set(a, a.category || "");
  if (name) a.category = name;
  else delete a.category;
  const row = [...$("mask-list").tBodies[0].rows].find((r) => Number(r.dataset.index) === i);
  if (row) categoryCell(a, row.cells[4]);
}

// The category given (Enter, or the field left): a suggestion from now on, said, and the list
// sorted by category again (after the click that left the field, if one did: rows rebuilt under
// a press would lose its click).
function categoryGiven() {
  typeCategory();
  const click = tool() === "click";
  const name = click ? state.addCategory : state.annotations[state.selected]?.category;
  suggestCategory(name);
  forgetReplacedCategory($("category").dataset.before, name);
  storeCategories(); // (the names suggested: kept across a reload, with or without an id)
  if (click) {
    showClickStatus(`The masks added from now on: category ${name || DEFAULT_CATEGORY}.`);
    return;
  }
  if (state.selected < 0) return;
  if (state.hovered < 0 || state.hovered === state.selected) $("hover-info").textContent = describe(state.selected);
  showEverythingStatus(`Mask ${state.selected}: category ${name || DEFAULT_CATEGORY}.`);
  if (pointerHeld) window.addEventListener("pointerup", () => setTimeout(sortByCategoryAgain), { once: true });
  else setTimeout(sortByCategoryAgain); // (a tap's click comes after its pointerup, in the same task)
}

function sortByCategoryAgain() {
  if ($("sort-by").value !== "category" || tool() !== "everything" || !state.labels) return;
  const inList = $("mask-list").contains(document.activeElement);
  listMasks();
  if (inList) focusList(); // (the rows it was on are gone)
}

// Keys of the field: Enter gives the category and, in the every-mask tool, goes back to the
// list; Escape puts back what it said when the keyboard came.
function onCategoryKeyDown(event) {
  const field = event.currentTarget;
  if (event.isComposing) return; // (an input method's Enter ends a word, not the name)
  if (event.key === "Escape") {
    field.value = field.dataset.before ?? "";
    typeCategory();
    if (tool() === "click") categoryGiven(); // said again
  } else if (event.key === "Enter") {
    event.preventDefault();
    if (tool() === "everything" && state.selected >= 0) {
      field.blur(); // its change: the category given
      restList(); // the selected mask's row the list's Tab stop (a mask selected on the image too)
      focusList();
    } else {
      categoryGiven();
      field.dataset.before = field.value; // given: Escape goes back to it
    }
  }
}

// The click tool's mask joins the masks of the image: drawn, listed and downloaded with them,
// as a record like the server's (its COCO segmentation, area, bbox and predicted IoU), with the
// prompt it was made from instead of sam2's point and stability score.
function keepClickMask() {
  const { counts, iou } = shownCandidate();
  const index = state.annotations.length;
  const category = state.addCategory;
  state.annotations.push({
    segmentation: { size: [state.height, state.width], counts: encodeCounts(counts) },
    ...cocoFigures(counts),
    predicted_iou: iou,
    prompt: state.clickPrompt,
    ...(category ? { category } : {}),
  });
  if (category) categoryId(category);
  state.counts.push(counts);
  state.colours.push(colour(state.coloursGiven++));
  masksChanged();
  state.everythingStatus = maskCounts();
  state.clicks = [];
  state.box = null;
  segment(); // no clicks: their mask goes
  showClickStatus(`Added as mask ${index}${category ? ` (${category})` : ""}; click the next object.`);
}

// A click tool's button its own action turns off, pressed from the keyboard, would leave it
// nowhere (<body>): it goes to the tool's choice, the next Tab stop before it (not after a
// mouse's click or a tap, which focus the button too: an arrow key would then change the tool;
// :focus-visible tells no such click from a key once the keyboard focused the button).
function keepingFocus(button, action) {
  return (event) => {
    const focused = event.detail === 0; // a click of no pointer: Enter or Space
    action();
    if (focused && button.disabled) document.querySelector("input[name=tool]:checked").focus();
  };
}

// A mask the labeller finds wrong (the server's or one added by clicks), selected in the
// every-mask tool, leaves the image's masks: the drawing, the list and the downloads. The
// others keep their colours; the masks after it move up one number.
function removeSelectedMask({ fromKeyboard = false } = {}) {
  const index = state.selected;
  if (index < 0 || tool() !== "everything") return;
  const rows = $("mask-list").tBodies[0].rows; // live: the list's rows after it is built again too
  // (The button pressed from the keyboard: a mouse's click or a tap focuses it too, and takes no focus along.)
  const focused = $("mask-list").contains(document.activeElement) || fromKeyboard;
  const at = [...rows].findIndex((row) => Number(row.dataset.index) === index);
  state.removedMasks.push({ index, annotation: state.annotations[index], counts: state.counts[index],
    colour: state.colours[index] });
  for (const list of [state.annotations, state.counts, state.colours]) list.splice(index, 1);
  state.hovered = -1;
  select(index); // unselects it: its outline goes, and the figures
  masksChanged();
  // The keyboard stays in the list (or goes there from the button, which the removal turns off),
  // on the row now where the removed one was; on the list where none is left (else Delete left
  // the focus nowhere, and the arrows did nothing).
  const next = rows[Math.min(at, rows.length - 1)];
  if (focused) (next && next.dataset.index !== undefined ? next : $("mask-list")).focus();
  // The masks after it, numbered up to the last one's number before: one less now.
  showEverythingStatus(`Mask ${index} removed${renumbered(index + 1, state.annotations.length, -1)}. ` +
                       maskCounts());
}

// The status line's word on masks from..to (their numbers before) moved by `by` numbers: "; mask
// 3 is now 2", "; masks 3 to 5 are now 2 to 4"; "" where none moved (from after to).
function renumbered(from, to, by) {
  if (from > to) return "";
  return from === to ? `; mask ${from} is now ${from + by}`
    : `; masks ${from} to ${to} are now ${from + by} to ${to + by}`;
}

// Ctrl+Z in the every-mask tool, or its button: the mask removed last comes back at its number
// (the masks after it move down one again), with its record, colour and category, selected.
// The keyboard, in the list or on the button, goes to its row. False where none was removed.
function putBackRemovedMask({ fromKeyboard = false } = {}) {
  if (tool() !== "everything" || !state.removedMasks.length) return false;
  const removed = state.removedMasks.pop();
  const focused = $("mask-list").contains(document.activeElement) || fromKeyboard;
  const index = Math.min(removed.index, state.annotations.length);
  state.annotations.splice(index, 0, removed.annotation);
  state.counts.splice(index, 0, removed.counts);
  state.colours.splice(index, 0, removed.colour);
  suggestCategory(removed.annotation.category); // (forgotten if it was replaced meanwhile)
  storeCategories();
  state.hovered = state.selected = -1;
  masksChanged();
  select(index);
  if (focused) $("mask-list").querySelector(`tbody tr[data-index='${index}']`)?.focus();
  // The masks after it, numbered up to the last one's number before: one more now.
  showEverythingStatus(`Mask ${index} put back${renumbered(index, state.annotations.length - 2, 1)}. ` +
                       maskCounts());
  return true;
}

// Whether masks were added to the open image's, removed, or given categories: work its downloads
// hold, which another image or Segment again would lose.
function masksEdited() {
  return Boolean(state.removedMasks.length || state.annotations.some((a) => a.prompt && !state.opened.has(a))
    || [...state.categoryBefore].some(([a, before]) => (a.category || "") !== before));
}
const EDITS = "masks added, removed and given categories";

// Another image, chosen, dropped or pasted: asked first where this one's masks were edited.
function openAnother(file) {
  if (!file) return;
  if (masksEdited() && !confirm(`Open another image? The ${EDITS} here are lost (download the COCO annotations ` +
                                "first).")) return;
  openFile(file);
}

// The open image's masks again, under the Filters box's values (the masks edited are lost: asked
// first).
function segmentAgain(event) {
  event.preventDefault();
  if (!state.file && !state.fileOpening) {
    showEverythingStatus("Open an image: its masks come under these filters.");
    return;
  }
  const edited = masksEdited() || state.clicks.length || state.box;
  if (edited && !confirm(`Segment the image again? The ${EDITS} here, and the clicks, are lost.`)) return;
  if (tool() === "click") { // to see what the filters give
    document.querySelector("input[name=tool][value=everything]").checked = true;
    setTool();
  }
  openFile(state.fileOpening ?? state.file);
}

function masksChanged() {
  state.labels = buildLabels();
  drawMaskLayers();
  listMasks();
}

function maskCounts() {
  const added = state.annotations.filter((a) => a.prompt).length;
  const found = state.annotations.length - added;
  const from = state.openedFile ? `opened from ${state.openedFile}` : "from the server";
  return `${found} ${found === 1 ? "mask" : "masks"} ${from} and ${added} added by clicks.`;
}

function drawClickLayer(context) {
  if (state.clickAnswer) paintMask(context, shownCandidate().counts, [30, 144, 255]);
  const radius = Math.max(4, Math.round(Math.max(state.width, state.height) / 150));
  context.lineWidth = Math.max(2, radius / 3);
  for (const c of state.clicks) {
    context.beginPath();
    context.arc(c.x, c.y, radius, 0, 2 * Math.PI);
    context.fillStyle = c.label ? "#19c37d" : "#e5484d";
    context.fill();
    context.strokeStyle = "#fff";
    context.stroke();
  }
  const box = state.dragBox || state.box;
  if (box) {
    context.strokeStyle = "#ffd400";
    context.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
  if (state.cursorShown) drawCursor(context, radius);
}

// The keyboard's cursor: a crosshair, open at its centre (the point it adds stays in sight),
// dark under light to show on any picture.
function drawCursor(context, radius) {
  const { x, y } = cursor();
  const [near, far] = [radius, radius * 3];
  context.beginPath();
  for (const [dx, dy] of [[-1, 0], [1, 0], [0, -1], [0, 1]]) {
    context.moveTo(x + dx * near, y + dy * near);
    context.lineTo(x + dx * far, y + dy * far);
  }
  const width = context.lineWidth;
  context.strokeStyle = "#000";
  context.lineWidth = width * 2;
  context.stroke();
  context.strokeStyle = "#fff";
  context.lineWidth = width;
  context.stroke();
}

function setTool() {
  const click = tool() === "click";
  document.body.classList.toggle("click-tool", click); // the list of every mask rests meanwhile
  $("viewer").classList.toggle("click-tool", click);
  imageStop();
  toolButtons();
  $("tool-help").textContent = click
    ? "Click a point on an object; right click, shift-click or a long press: a point off it; drag a box; " +
      "Ctrl+Z or Backspace: undo. Clicks and a box describe one object: add its mask, or clear the clicks, " +
      "before the next. From the keyboard, Tab to the image: the arrow keys move a cursor (Shift: ten " +
      "times as far), Enter or Space adds a point at it, Shift+Enter a point off the object."
    : "Hover a mask to see it; click to select it.";
  state.hovered = -1;
  restList();
  // Mask figures belong to the every-mask tool: none in the click tool, the selected mask's again on return.
  $("hover-info").textContent = !click && state.selected >= 0 ? describe(state.selected) : "\u00a0";
  drawHighlight();
  showToolStatus();
  if (click && !state.imageId && state.labels) embed();
}

// --- Pointer -------------------------------------------------------------------------------

// Where the pointer is on the image: x, y on a pixel (the last column and row at most: a click,
// a mask under the pointer), corner on the image's edges included (a box reaches its far edges).
// A pointer outside what the viewer and the window show of the image (a scrolled strip, a
// scrolled page) is taken at the shown part's edge: a box dragged past it ends there, where its
// outline was drawn.
function imagePoint(event) {
  const rect = $("highlight-canvas").getBoundingClientRect();
  const viewer = $("viewer"), frame = viewer.getBoundingClientRect(), page = document.documentElement;
  const left = Math.max(frame.left + viewer.clientLeft, 0), top = Math.max(frame.top + viewer.clientTop, 0);
  const right = Math.min(frame.left + viewer.clientLeft + viewer.clientWidth, page.clientWidth);
  const bottom = Math.min(frame.top + viewer.clientTop + viewer.clientHeight, page.clientHeight);
  // Held within [low, high] on a side where the view cuts the image (start, end: the image's).
  const shown = (value, low, high, start, end) =>
    Math.min(Math.max(value, start < low - 1 ? low : -Infinity), end > high + 1 ? high : Infinity);
  const clientX = shown(event.clientX, left, right, rect.left, rect.right);
  const clientY = shown(event.clientY, top, bottom, rect.top, rect.bottom);
  const x = ((clientX - rect.left) * state.width) / rect.width;
  const y = ((clientY - rect.top) * state.height) / rect.height;
  const clamp = (v, top) => Math.round(Math.min(Math.max(v, 0), top) * 10) / 10;
  return { x: clamp(x, state.width - 1), y: clamp(y, state.height - 1), corner: [clamp(x, state.width), clamp(y, state.height)],
           screenX: event.clientX, screenY: event.clientY };
}

// The mask on top at a point of the image (imagePoint's), or -1.
function maskAt(point) {
  return state.labels[Math.floor(point.x) * state.height + Math.floor(point.y)] - 1;
}

// The box two corners span, [x0, y0, x1, y1].
function boxOf(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

let press = null;
let pointerHeld = false; // a pointer's button (or finger) down anywhere on the page

function onPointerDown(event) {
  if (!state.labels) return; // no image yet, or the server refused it
  if (!event.isPrimary) return; // a second finger: the first one's press goes on
  // A mouse's middle, back or forward button: no click (back added a point, then left the page).
  if (event.pointerType !== "touch" && event.button !== 0 && event.button !== 2) return;
  press = { ...imagePoint(event), button: event.button, background: event.button === 2 || event.shiftKey || event.altKey,
            touch: event.pointerType === "touch", at: performance.now(), pointerId: event.pointerId };
  state.cursorShown = false; // the pointer in use: the keyboard's cursor goes until a key brings it back
  event.preventDefault(); // (which keeps the focus where it was: a field lets go of it, its keys the page's again)
  if (tool() === "click") { // the box's outline follows the pointer past the shown part of the image
    try {
      event.currentTarget.setPointerCapture(event.pointerId);
    } catch { /* a pointer no longer down */ }
  }
  if (document.activeElement?.matches(TYPING_FIELDS)) document.activeElement.blur();
}

// A press that will have no click or box: Escape, or the browser took the pointer back (a touch
// that became a scroll, a finger gone off the screen's edge).
function dropPress() {
  press = null;
  state.dragBox = null;
  drawHighlight();
}

// Ctrl+Z (or Cmd+Z) and Backspace, in the click tool: the last click or box is taken back.
// Escape while the button is down: the press (a click or a box being drawn) is dropped. Delete,
// in the every-mask tool: the selected mask is removed; Ctrl+Z there puts the last removed back
// (not Backspace: a Mac's delete key sends it).
function onKeyDown(event) {
  if (event.target.matches?.(TYPING_FIELDS)) return; // typing: the field's keys
  if (event.key === "Delete" && tool() === "everything") {
    // In the list, the mask of the row the keyboard is on (moved there with the arrows after a
    // selection, say); elsewhere, the selected one.
    const row = event.target.closest?.("#mask-list tbody tr");
    const index = row && row.dataset.index !== undefined ? Number(row.dataset.index) : state.selected;
    if (index >= 0) {
      event.preventDefault();
      if (index !== state.selected) select(index);
      removeSelectedMask();
      return;
    }
  }
  if (event.key === "Escape" && press) {
    dropPress();
    return;
  }
  // The key marked Z: event.key on a Latin layout (a German keyboard's Z is where a US one has
  // Y), the key where a US keyboard has Z on others (a Russian one gives "я" there).
  const z = /^[a-z]$/i.test(event.key) ? event.key.toLowerCase() === "z" : event.code === "KeyZ";
  const undo = event.key === "Backspace" || (z && (event.ctrlKey || event.metaKey) && !event.shiftKey);
  if (undo && event.key !== "Backspace" && tool() === "everything") {
    if (putBackRemovedMask()) event.preventDefault();
    return;
  }
  if (!undo || tool() !== "click" || press || !takeBack()) return;
  event.preventDefault();
  if (event.target.id === "highlight-canvas") {
    const left = state.clicks.length;
    sayCursor(`Taken back: ${left} ${left === 1 ? "point" : "points"}${state.box ? " and a box" : ""} left.`);
  }
  const from = document.activeElement; // a button the undo turns off leaves the keyboard on the tool
  drawHighlight();
  segment();
  if (from?.disabled) document.querySelector("input[name=tool]:checked").focus();
}

function onPointerMove(event) {
  if (!state.width) return;
  const point = imagePoint(event);
  if (tool() === "click") {
    if (press?.pointerId === event.pointerId
        && Math.hypot(point.screenX - press.screenX, point.screenY - press.screenY) > DRAG_PIXELS) {
      state.dragBox = boxOf(press.corner, point.corner);
      drawHighlight();
    }
    return;
  }
  if (!state.labels) return;
  setHovered(maskAt(point));
}

function onPointerUp(event) {
  if (!press || event.pointerId !== press.pointerId) return;
  const start = press;
  press = null;
  if (tool() !== "click") {
    // The mask under the pointer, not the one hovered last: a tap has no hover before it, and
    // a mask removed since the pointer last moved leaves another under it.
    const mask = event.target === $("highlight-canvas") ? maskAt(imagePoint(event)) : -1;
    if (mask >= 0) select(mask);
    return;
  }
  state.dragBox = null;
  const end = imagePoint(event);
  if (Math.hypot(end.screenX - start.screenX, end.screenY - start.screenY) > DRAG_PIXELS) {
    const box = boxOf(start.corner, end.corner);
    if (box[2] - box[0] < 1 || box[3] - box[1] < 1) { // a drag along an edge, outside the image: no box
      drawHighlight();
      return;
    }
    state.box = box;
    state.boxAfter = state.clicks.length;
  } else {
    const held = start.touch && performance.now() - start.at >= LONG_PRESS_MS;
    state.clicks.push({ x: start.x, y: start.y, label: start.background || held ? 0 : 1 });
  }
  drawHighlight();
  segment();
}

// --- Keyboard cursor -----------------------------------------------------------------------
//
// The keyboard's way to click: in the click tool the image is a Tab stop, where a crosshair shows
// (for the keyboard alone: a pointer's press hides it) that the arrow keys move; Enter or Space
// adds a point at it, Shift+Enter a point off the object (as shift-click does). Ctrl+Z and
// Backspace take points back as they do clicks (onKeyDown). A screen reader hears the cursor's
// place in image pixels and each point added or taken back (#cursor-info).

const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

// The image as a Tab stop, in the click tool once it has its masks (the tool is off without):
// role application, as screen readers otherwise keep the arrow keys for reading.
function imageStop() {
  const canvas = $("highlight-canvas");
  if (tool() === "click" && state.labels) {
    canvas.tabIndex = 0;
    canvas.setAttribute("role", "application");
  } else if (document.activeElement === canvas) {
    canvas.tabIndex = -1; // the keyboard stays here (another image pasted, say), its keys off until the masks come
  } else {
    canvas.removeAttribute("tabindex");
    canvas.removeAttribute("role");
  }
}

function cursor() {
  state.cursor ??= { x: Math.floor(state.width / 2), y: Math.floor(state.height / 2) };
  return state.cursor;
}

function sayCursor(text) {
  $("cursor-info").textContent = text;
}

// Focus from the keyboard shows the cursor (a mouse's focus, :focus-visible not set, does not).
function onImageFocus(event) {
  if (tool() !== "click" || !state.labels || !event.target.matches(":focus-visible")) return;
  showCursor();
}

function onImageBlur() {
  state.cursorShown = false;
  drawHighlight();
}

function showCursor() {
  state.cursorShown = true;
  const { x, y } = cursor();
  sayCursor(`${x}, ${y}`);
  keepInView();
  drawHighlight();
}

function onImageKeyDown(event) {
  if (tool() !== "click" || !state.labels || press || event.ctrlKey || event.altKey || event.metaKey) return;
  const arrow = ARROWS[event.key];
  const add = event.key === "Enter" || event.key === " ";
  if (!arrow && !add) return;
  event.preventDefault(); // the arrows and Space would scroll the page
  if (arrow) {
    const step = Math.max(1, Math.round(Math.max(state.width, state.height) * CURSOR_STEP));
    const by = event.shiftKey ? 10 * step : step;
    const c = cursor();
    c.x = Math.min(Math.max(c.x + arrow[0] * by, 0), state.width - 1); // held on the image
    c.y = Math.min(Math.max(c.y + arrow[1] * by, 0), state.height - 1);
    showCursor();
  } else if (!state.cursorShown) {
    showCursor(); // hidden by a pointer's press: first seen, then added (not a point where none is shown)
  } else if (!event.repeat) { // a key held down adds one point
    const { x, y } = cursor();
    state.clicks.push({ x, y, label: event.shiftKey ? 0 : 1 });
    sayCursor(`Point ${state.clicks.length} ${event.shiftKey ? "off" : "on"} the object at ${x}, ${y}.`);
    drawHighlight();
    segment();
  }
}

// A strip longer than the viewer scrolls to keep the cursor in sight.
function keepInView() {
  const viewer = $("viewer"), canvas = $("highlight-canvas"), { x, y } = cursor();
  const left = ((x + 0.5) * canvas.clientWidth) / state.width;
  const top = ((y + 0.5) * canvas.clientHeight) / state.height;
  if (left < viewer.scrollLeft || left > viewer.scrollLeft + viewer.clientWidth) {
    viewer.scrollLeft = left - viewer.clientWidth / 2;
  }
  if (top < viewer.scrollTop || top > viewer.scrollTop + viewer.clientHeight) {
    viewer.scrollTop = top - viewer.clientHeight / 2;
  }
}

// --- Downloads -----------------------------------------------------------------------------

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

// What the page shows, as one picture: the layers the tool in use shows.
function overlayCanvas() {
  const canvas = document.createElement("canvas");
  canvas.width = state.width;
  canvas.height = state.height;
  const context = canvas.getContext("2d");
  for (const id of LAYERS) {
    const style = getComputedStyle($(id));
    if (style.visibility === "hidden") continue;
    context.globalAlpha = Number(style.opacity); // "Masks shown"
    context.drawImage($(id), 0, 0);
  }
  return canvas;
}

// "Masks shown": the masks' layers faded, on the page and in the overlay PNG (overlayCanvas).
function setMaskOpacity() {
  const percent = $("mask-opacity").value;
  for (const id of FADED_LAYERS) $(id).style.opacity = percent / 100;
  $("mask-opacity-value").value = `${percent}%`;
  $("mask-opacity").setAttribute("aria-valuetext", `${percent}%`);
}

function downloadOverlay() {
  overlayCanvas().toBlob((blob) => download(blob, `${state.name}_overlay.png`), "image/png");
}

// --- Wiring --------------------------------------------------------------------------------

function firstImage(files) {
  return [...(files || [])].find((file) => file.type.startsWith("image/") || file.type === "") || (files || [])[0];
}

function init() {
  $("file").addEventListener("change", (event) => {
    openAnother(event.target.files[0]);
    event.target.value = ""; // choosing the same file again opens it again
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    $("viewer").classList.add("dragging");
  });
  document.addEventListener("dragleave", () => $("viewer").classList.remove("dragging"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    $("viewer").classList.remove("dragging");
    const file = firstImage(event.dataTransfer.files);
    if (file) openAnother(file);
    else if (!event.target.closest?.("input")) { // (text dropped on a field of the Filters box: nothing)
      showError("What was dropped holds no file (an image dragged from another web page comes as its link): " +
        "save the image, then drop or choose the file.");
    }
  });
  document.addEventListener("paste", (event) => {
    openAnother(firstImage(event.clipboardData && event.clipboardData.files));
  });
  const top = $("highlight-canvas");
  // Pointer events: a mouse, a pen or a finger (style.css keeps a finger's drag from scrolling).
  top.addEventListener("pointerdown", onPointerDown);
  top.addEventListener("pointermove", onPointerMove);
  top.addEventListener("pointerleave", () => tool() === "everything" && setHovered(-1));
  top.addEventListener("contextmenu", (event) => event.preventDefault());
  top.addEventListener("keydown", onImageKeyDown);
  top.addEventListener("focus", onImageFocus);
  top.addEventListener("blur", onImageBlur);
  window.addEventListener("pointerup", onPointerUp);
  window.addEventListener("pointercancel", (event) => press && event.pointerId === press.pointerId && dropPress());
  document.addEventListener("keydown", onKeyDown);
  // Leaving (or reloading) loses the masks edited too: asked first.
  window.addEventListener("beforeunload", (event) => masksEdited() && event.preventDefault());
  for (const radio of document.querySelectorAll("input[name=tool]")) radio.addEventListener("change", setTool);
  $("sort-by").addEventListener("change", () => state.labels && listMasks()); // no answer, no list
  $("mask-opacity").addEventListener("input", setMaskOpacity);
  setMaskOpacity(); // a value the browser kept across a reload
  const rows = $("mask-list").tBodies[0];
  // The mask of the list's row an event is on, or -1 (the "no mask" row; the list rests in the click tool).
  const rowMask = (event) => {
    const row = event.target.closest("tr");
    return row && row.dataset.index !== undefined && tool() === "everything" ? Number(row.dataset.index) : -1;
  };
  rows.addEventListener("click", (event) => rowMask(event) >= 0 && select(rowMask(event)));
  rows.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && rowMask(event) >= 0) {
      event.preventDefault(); // Space would scroll the list
      select(rowMask(event));
    }
    if (event.key === "F2" && rowMask(event) >= 0) { // the row's category, to type (Enter: back here)
      event.preventDefault();
      if (rowMask(event) !== state.selected) select(rowMask(event));
      $("category").focus();
      $("category").select();
    }
    const row = event.target.closest("tr");
    const at = row ? row.sectionRowIndex : -1;
    const to = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: rows.rows.length - 1 }[event.key];
    if (rowMask(event) >= 0 && to !== undefined && rows.rows[to]) {
      event.preventDefault(); // the arrows would scroll the page
      rows.rows[to].focus();
    }
  });
  // A row hovered or focused shows its mask and figures.
  rows.addEventListener("mouseover", (event) => rowMask(event) >= 0 && setHovered(rowMask(event)));
  rows.addEventListener("focusin", (event) => {
    if (rowMask(event) < 0) return;
    rowStop(event.target.closest("tr"));
    setHovered(rowMask(event));
  });
  rows.addEventListener("mouseleave", () => tool() === "everything" && setHovered(-1));
  rows.addEventListener("focusout", () => tool() === "everything" && setHovered(-1));
  $("clear-clicks").addEventListener("click", keepingFocus($("clear-clicks"), () => {
    state.clicks = [];
    state.box = null;
    segment();
  }));
  $("keep-click").addEventListener("click", keepingFocus($("keep-click"), keepClickMask));
  $("next-candidate").addEventListener("click", nextCandidate);
  $("remove-mask").addEventListener("click", (event) => removeSelectedMask({ fromKeyboard: event.detail === 0 }));
  $("put-back-mask").addEventListener("click", (event) => putBackRemovedMask({ fromKeyboard: event.detail === 0 }));
  $("category").addEventListener("input", typeCategory);
  $("category").addEventListener("change", categoryGiven);
  $("category").addEventListener("keydown", onCategoryKeyDown);
  $("category").addEventListener("focus", (event) => { event.target.dataset.before = event.target.value; });
  // (A field left by a press: what its leaving changes waits for the press's click.)
  document.addEventListener("pointerdown", () => { pointerHeld = true; }, true);
  for (const type of ["pointerup", "pointercancel"]) {
    document.addEventListener(type, () => { pointerHeld = false; }, true);
  }
  $("download-rle").addEventListener("click", () =>
    download(new Blob([studyJson()], { type: "application/json" }), `${state.name}_masks.json`));
  $("download-coco").addEventListener("click", () =>
    download(new Blob([cocoDataset()], { type: "application/json" }), `${state.name}_coco.json`));
  $("download-png").addEventListener("click", downloadOverlay);
  $("open-masks").addEventListener("change", (event) => {
    openMasks(event.target.files[0]);
    event.target.value = ""; // the same file again opens it again
  });
  $("filters-form").addEventListener("submit", segmentAgain);
  $("stability_score_offset").addEventListener("input", (event) => checkOffset(event.target));
  window.addEventListener("resize", fitToWindow);
  restoreCategories();
  setTool();
  loadHealth();
}

// The server takes any offset above 0; it reads a number below the smallest normal double
// (such as 1e-310) as 0.
function checkOffset(field) {
  const value = Number(field.value);
  field.setCustomValidity(field.value === "" || value >= 2.2250738585072014e-308 ? "" : "Above 0, please.");
}

// Masks of a given size over a blank image, without the server: what the browser tests use to
// check decoding and drawing at sizes the demo model does not reach.
function showAnswer(cocoText, width, height) {
  resetImage();
  showImage({ width, height });
  showMasks(cocoText);
  return state.renderMs;
}

window.sam2page = { state, studyJson, openFile, showAnswer };
init();
