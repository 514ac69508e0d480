// strata's web page: the package catalog, a terminal (xterm.js) attached to
// a session over WebSocket, and the list of my sessions.
import { Terminal } from '/vendor/xterm.mjs';
import { FitAddon } from '/vendor/addon-fit.mjs';
import RFB from '/vendor/novnc/core/rfb.js';

const $ = (id) => document.getElementById(id);
const attachTokens = JSON.parse(sessionStorage.getItem('strata-attach') || '{}');
let token = null;
let socket = null;
let attachedId = null;
let viewer = null;
const graphical = new Set();

const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false });
const fit = new FitAddon();
term.loadAddon(fit);

// An error is shown where the action was: in the section's own line.
function showError(message, at = 'error') {
  $(at).textContent = message;
  $(at).hidden = !message;
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (res.status === 204) return null;
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    if (res.status === 401) signOut();
    throw new Error(data.error ? data.error.message : `HTTP ${res.status}`);
  }
  return data;
}

function button(label, onClick, attrs = {}, errorAt = 'error') {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  for (const [k, v] of Object.entries(attrs)) b.setAttribute(k, v);
  b.addEventListener('click', async () => {
    b.disabled = true;
    try { showError('', errorAt); await onClick(); } catch (e) { showError(e.message, errorAt); } finally { b.disabled = false; }
  });
  return b;
}

// Reads server-sent events from `path` until the stream ends (or `stop`
// is aborted), calling onEvent(name, data) for each.
async function events(path, onEvent, stop) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, signal: stop });
  if (!res.ok) throw new Error(`HTTP ${res.status} from ${path}`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let pending = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += decoder.decode(value, { stream: true });
    let end;
    while ((end = pending.indexOf('\n\n')) >= 0) {
      const lines = pending.slice(0, end).split('\n');
      pending = pending.slice(end + 2);
      const name = (lines.find((l) => l.startsWith('event:')) || 'event: message').slice(6).trim();
      const data = lines.filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('');
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

async function loadPackages() {
  const list = $('packages');
  list.replaceChildren();
  const packages = await api('GET', '/v1/packages');
  const chooser = $('os');
  const known = [...new Set(packages.flatMap((p) => p.os || []))].sort();
  for (const os of known) {
    if (![...chooser.options].some((o) => o.value === os)) chooser.append(new Option(os, os));
  }
  for (const p of packages) {
    if (p.graphical) graphical.add(p.name);
    const li = document.createElement('li');
    const name = document.createElement('span');
    name.innerHTML = `<strong></strong><span class="desc"></span>`;
    name.querySelector('strong').textContent = p.name;
    name.querySelector('.desc').textContent = `${p.description} (${(p.os || []).join(', ')})`;
    li.append(name, launchButton(p.name, { 'data-launch': p.name }));
    list.append(li);
  }
}

function launchButton(name, attrs) {
  return button('Launch', () => launch(name).catch((e) => { $('term-status').textContent = ''; throw e; }), attrs, 'catalog-error');
}

// Any Debian package, found by a word of its name or description.
async function search(q) {
  const list = $('found');
  list.replaceChildren();
  const os = chosenOs();
  const found = await api('GET', `/v1/packages/search?q=${encodeURIComponent(q)}${os ? `&os=${os}` : ''}`);
  if (!found.length) {
    const li = document.createElement('li');
    li.textContent = `No Debian package matches "${q}".`;
    list.append(li);
  }
  for (const p of found) {
    const li = document.createElement('li');
    const name = document.createElement('span');
    name.innerHTML = '<strong></strong><span class="desc"></span>';
    name.querySelector('strong').textContent = p.name;
    name.querySelector('.desc').textContent = p.description;
    li.dataset.found = p.name;
    li.append(name, launchButton(p.name, { 'data-launch-found': p.name }));
    list.append(li);
  }
}

function age(created) {
  const s = Math.max(0, Math.floor(Date.now() / 1000 - created));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

function renderSessions(sessions) {
  const rows = $('sessions');
  rows.replaceChildren();
  for (const s of sessions) {
    const tr = document.createElement('tr');
    tr.dataset.session = s.id;
    // A session that ended unseen (exited, lost) shows why; hovering shows
    // the last lines of its logs.
    const ended = s.state === 'exited' || s.state === 'lost';
    const why = ended && s.reason ? `: ${s.reason.split('\n')[0]}` : '';
    const cpu = s.cpu_percent == null ? '' : `${s.cpu_percent.toFixed(0)}%`;
    const mem = s.memory_mib == null ? '' : `${s.memory_mib.toFixed(0)} MiB`;
    const cells = [[s.id], [s.package], [s.state + (s.attached ? ', attached' : '') + why], [s.os || ''],
      [cpu, 'num'], [mem, 'num'], [age(s.created), 'num']];
    for (const [text, cls] of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      if (cls) td.className = cls;
      if (ended && s.reason) td.title = s.reason;
      tr.append(td);
    }
    const actions = document.createElement('td');
    const act = (label, f, attrs) => button(label, f, attrs, 'sessions-error');
    if (!ended && attachTokens[s.id] && s.id !== attachedId) actions.append(act('Attach', () => attach(s.id, s.package), {}));
    if (s.state === 'running') actions.append(act('Pause', () => api('POST', `/v1/sessions/${s.id}/pause`).then(loadSessions), { 'data-pause': s.id }));
    else if (s.state === 'paused') actions.append(act('Resume', () => api('POST', `/v1/sessions/${s.id}/resume`).then(loadSessions), { 'data-resume': s.id }));
    actions.append(act(ended ? 'Remove' : 'Kill', () => api('DELETE', `/v1/sessions/${s.id}`).then(loadSessions), { 'data-kill': s.id }));
    tr.append(actions);
    rows.append(tr);
  }
}

async function loadSessions() {
  renderSessions(await api('GET', '/v1/sessions'));
}

// The session list follows the server's events; a dropped stream is
// taken up again after a pause.
let sessionEvents = null;
function followSessions() {
  if (sessionEvents) sessionEvents.abort();
  const stop = new AbortController();
  sessionEvents = stop;
  events('/v1/sessions/events', (name, data) => { if (name === 'sessions') renderSessions(data); }, stop.signal)
    .catch(() => {})
    .finally(() => { if (sessionEvents === stop && token) setTimeout(followSessions, 2000); });
}

// Follows a build until it ends; its last state.
async function followBuild(build, onStatus) {
  let last = build;
  await events(`/v1/builds/${build.id}/events`, (name, b) => { if (name === 'status') { last = b; onStatus(b); } });
  return last;
}

// The OS chosen for new sessions (undefined: the server's default).
function chosenOs() {
  return $('os').value || undefined;
}

// Builds what is missing of a package's images, showing the build's
// progress; the build goes on on the server if the page is closed.
async function ensureBuilt(name) {
  const build = await api('POST', '/v1/builds', { package: name, os: chosenOs() });
  if (build.state === 'done') return;
  const bar = $('build-progress');
  const show = (b) => {
    bar.hidden = false;
    bar.value = b.progress;
    bar.textContent = `${Math.round(b.progress * 100)}%`;
    $('term-status').textContent = `Building ${name}'s images (${Math.round(b.progress * 100)}%): ${b.step}`;
  };
  show(build);
  try {
    const end = await followBuild(build, show);
    if (end.state !== 'done') {
      const tail = (end.log || []).slice(-3).join('\n');
      throw new Error(`Building ${name}'s images failed: ${end.error || end.state}${tail ? `\n${tail}` : ''}`);
    }
  } finally {
    bar.hidden = true;
  }
}

async function launch(name) {
  $('term-status').textContent = `Launching ${name}…`;
  await ensureBuilt(name);
  $('term-status').textContent = `Launching ${name}…`;
  const created = await api('POST', '/v1/sessions', {
    package: name,
    os: chosenOs(),
    context: {
      rows: term.rows, cols: term.cols, term: 'xterm-256color',
      timezone: Intl.DateTimeFormat().resolvedOptions().timeZone || undefined,
    },
  });
  attachTokens[created.session.id] = created.attach_token;
  sessionStorage.setItem('strata-attach', JSON.stringify(attachTokens));
  attach(created.session.id, name);
  loadSessions();
}

// A graphical session's display, through noVNC over the display WebSocket.
function showDisplay(id, name) {
  if (socket) socket.close();
  if (viewer) { viewer.disconnect(); viewer = null; }
  attachedId = id;
  $('terminal').hidden = true;
  $('display').hidden = false;
  $('clipboard').hidden = false;
  $('files').hidden = false;
  $('fit-screen').hidden = false;
  $('display').replaceChildren();
  $('term-title').textContent = `${name} — session ${id}`;
  $('term-status').textContent = 'Connecting to the display…';
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const q = new URLSearchParams({ token: attachTokens[id] });
  const rfb = new RFB($('display'), `${proto}://${location.host}/v1/sessions/${id}/display?${q}`);
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => { $('term-status').textContent = 'Display connected.'; rfb.focus(); });
  rfb.addEventListener('disconnect', () => {
    if (viewer === rfb) { viewer = null; attachedId = null; $('term-status').textContent = 'Display closed.'; }
  });
  viewer = rfb;
}

function attach(id, name) {
  if (graphical.has(name)) { showDisplay(id, name); return; }
  if (viewer) { viewer.disconnect(); viewer = null; }
  $('display').hidden = true;
  $('clipboard').hidden = true;
  $('fit-screen').hidden = true;
  $('files').hidden = false;
  $('terminal').hidden = false;
  if (socket) socket.close();
  attachedId = id;
  term.reset();
  $('term-title').textContent = `${name} — session ${id}`;
  $('term-status').textContent = 'Attaching…';
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const q = new URLSearchParams({ token: attachTokens[id], rows: term.rows, cols: term.cols, term: 'xterm-256color' });
  const ws = new WebSocket(`${proto}://${location.host}/v1/sessions/${id}/attach?${q}`);
  ws.binaryType = 'arraybuffer';
  socket = ws;
  ws.onopen = () => { $('term-status').textContent = 'Attached.'; term.focus(); };
  ws.onmessage = (ev) => {
    if (ev.data instanceof ArrayBuffer) { term.write(new Uint8Array(ev.data)); return; }
    const msg = JSON.parse(ev.data);
    if (msg.type === 'exit') $('term-status').textContent = `The program exited with status ${msg.status}.`;
    else if (msg.type === 'lost') $('term-status').textContent = `Session lost: ${msg.reason}`;
    else if (msg.type === 'error') showError(msg.message, 'work-error');
    else if (msg.type === 'moved') $('term-status').textContent = `The session moved to server ${msg.server}; attach to it through the cluster's control plane.`;
  };
  ws.onclose = () => { if (socket === ws) { socket = null; attachedId = null; loadSessions().catch(() => {}); } };
}

// The VM's clipboard, through the agent (the VNC protocol's own clipboard
// needs an agent QEMU does not have here).
async function clipboard(method, text) {
  const res = await fetch(`/v1/sessions/${attachedId}/clipboard`, {
    method, headers: { Authorization: `Bearer ${token}`, 'content-type': 'text/plain; charset=utf-8' }, body: text,
  });
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new Error(data.error ? data.error.message : `HTTP ${res.status}`);
  }
  return res.status === 204 ? null : res.text();
}
// Files: uploaded into the attached session, downloaded out of it.
function guestPath(forName) {
  const path = $('file-path').value.trim();
  if (!path.startsWith('/')) throw new Error('Write the file\'s place in the VM as an absolute path, e.g. /root/notes.txt');
  return path.endsWith('/') && forName ? path + forName : path;
}
async function upload() {
  const file = $('file-pick').files[0];
  if (!file) throw new Error('Choose a file to upload first.');
  const path = guestPath(file.name);
  const res = await fetch(`/v1/sessions/${attachedId}/files?path=${encodeURIComponent(path)}`, {
    method: 'PUT', headers: { Authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' }, body: file,
  });
  if (!res.ok) throw new Error(((await res.json().catch(() => ({}))).error || {}).message || `HTTP ${res.status}`);
  $('file-path').value = path;
  $('term-status').textContent = `Uploaded ${file.name} to ${path} (${file.size} bytes).`;
}
async function download() {
  const path = guestPath(null);
  if (path.endsWith('/')) throw new Error('Name a file to download, not a folder.');
  const res = await fetch(`/v1/sessions/${attachedId}/files?path=${encodeURIComponent(path)}`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!res.ok) throw new Error(((await res.json().catch(() => ({}))).error || {}).message || `HTTP ${res.status}`);
  const blob = await res.blob();
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = path.split('/').pop();
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  $('term-status').textContent = `Downloaded ${path} (${blob.size} bytes).`;
}
const workAction = (f) => () => { showError('', 'work-error'); f().catch((e) => showError(e.message, 'work-error')); };
$('file-upload').addEventListener('click', workAction(upload));
$('file-download').addEventListener('click', workAction(download));

// The guest's screen takes the size of the space it is shown in.
$('fit-screen').addEventListener('click', workAction(async () => {
  const r = $('display').getBoundingClientRect();
  // A multiple of 16 pixels: the guest's display rows then need no padding
  // (a padded row drew the picture sheared in a viewer resized live).
  const width = Math.min(2560, Math.max(640, Math.floor(r.width / 16) * 16));
  const height = Math.min(1600, Math.max(480, Math.round(r.height)));
  await api('PUT', `/v1/sessions/${attachedId}/screen`, { width, height });
  $('term-status').textContent = `The screen is ${width}x${height} now.`;
}));

$('clip-send').addEventListener('click', () => {
  clipboard('PUT', $('clip').value)
    .then(() => { $('term-status').textContent = 'Clipboard sent to the VM.'; })
    .catch((e) => showError(e.message, 'work-error'));
});
$('clip-get').addEventListener('click', () => {
  clipboard('GET')
    .then((t) => {
      $('clip').value = t;
      $('term-status').textContent = 'Clipboard copied from the VM.';
      navigator.clipboard?.writeText(t).catch(() => {});
    })
    .catch((e) => showError(e.message, 'work-error'));
});

term.onData((d) => { if (socket && socket.readyState === WebSocket.OPEN) socket.send(new TextEncoder().encode(d)); });
term.onResize(({ rows, cols }) => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: 'resize', rows, cols }));
});
window.addEventListener('resize', () => fit.fit());

function signOut() {
  localStorage.removeItem('strata-token');
  token = null;
  if (sessionEvents) { sessionEvents.abort(); sessionEvents = null; }
  $('app').hidden = true; $('who').hidden = true; $('login').hidden = false;
}

async function signIn(t) {
  token = t;
  try {
    await loadPackages();
  } catch (e) {
    showError(e.message);
    signOut();
    return;
  }
  localStorage.setItem('strata-token', t);
  $('login').hidden = true; $('who').hidden = false; $('app').hidden = false;
  term.open($('terminal'));
  fit.fit();
  await loadSessions();
  followSessions();
}

$('login').addEventListener('submit', (ev) => { ev.preventDefault(); showError(''); signIn($('token').value.trim()); });
$('logout').addEventListener('click', signOut);
$('search').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const q = $('search-q').value.trim();
  showError('', 'catalog-error');
  if (q) search(q).catch((e) => showError(e.message, 'catalog-error'));
});

// A token can come in the address (#token=...), e.g. from `strata serve`'s output.
const hash = new URLSearchParams(location.hash.slice(1));
const fromHash = hash.get('token');
if (fromHash || hash.get('attach')) history.replaceState(null, '', location.pathname);
if (hash.get('session') && hash.get('attach')) {
  // A viewer for one session (the address `strata run` prints for a
  // graphical package): its attach token opens its display, nothing else.
  const id = hash.get('session');
  attachTokens[id] = hash.get('attach');
  sessionStorage.setItem('strata-attach', JSON.stringify(attachTokens));
  $('app').hidden = false;
  $('catalog').hidden = true;
  $('sessions-box').hidden = true;
  // The display takes the whole window.
  document.body.classList.add('viewer');
  showDisplay(id, hash.get('package') || 'session');
  // The clipboard, files and screen size need the terminal's API token,
  // which a viewer lacks.
  $('clipboard').hidden = true;
  $('files').hidden = true;
  $('fit-screen').hidden = true;
} else {
  const saved = fromHash || localStorage.getItem('strata-token');
  if (saved) signIn(saved); else $('login').hidden = false;
}
