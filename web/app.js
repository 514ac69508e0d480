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

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
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

function button(label, onClick, attrs = {}) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  for (const [k, v] of Object.entries(attrs)) b.setAttribute(k, v);
  b.addEventListener('click', async () => {
    b.disabled = true;
    try { showError(''); await onClick(); } catch (e) { showError(e.message); } finally { b.disabled = false; }
  });
  return b;
}

async function loadPackages() {
  const list = $('packages');
  list.replaceChildren();
  for (const p of await api('GET', '/v1/packages')) {
    if (p.graphical) graphical.add(p.name);
    const li = document.createElement('li');
    const name = document.createElement('span');
    name.innerHTML = `<strong></strong><span class="desc"></span>`;
    name.querySelector('strong').textContent = p.name;
    name.querySelector('.desc').textContent = p.description;
    li.append(name, button('Launch', () => launch(p.name).catch((e) => { $('term-status').textContent = ''; throw e; }), { 'data-launch': p.name }));
    list.append(li);
  }
}

async function loadSessions() {
  const rows = $('sessions');
  const sessions = await api('GET', '/v1/sessions');
  rows.replaceChildren();
  for (const s of sessions) {
    const tr = document.createElement('tr');
    tr.dataset.session = s.id;
    // A session that ended unseen (exited, lost) shows why; hovering shows
    // the last lines of its logs.
    const ended = s.state === 'exited' || s.state === 'lost';
    const why = ended && s.reason ? `: ${s.reason.split('\n')[0]}` : '';
    for (const text of [s.id, s.package, s.state + (s.attached ? ', attached' : '') + why]) {
      const td = document.createElement('td');
      td.textContent = text;
      if (ended && s.reason) td.title = s.reason;
      tr.append(td);
    }
    const actions = document.createElement('td');
    if (!ended && attachTokens[s.id] && s.id !== attachedId) actions.append(button('Attach', () => attach(s.id, s.package)));
    if (s.state === 'running') actions.append(button('Pause', () => api('POST', `/v1/sessions/${s.id}/pause`).then(loadSessions), { 'data-pause': s.id }));
    else if (s.state === 'paused') actions.append(button('Resume', () => api('POST', `/v1/sessions/${s.id}/resume`).then(loadSessions), { 'data-resume': s.id }));
    actions.append(button(ended ? 'Remove' : 'Kill', () => api('DELETE', `/v1/sessions/${s.id}`).then(loadSessions), { 'data-kill': s.id }));
    tr.append(actions);
    rows.append(tr);
  }
}

// Follows a build's server-sent events until it ends; its last state.
async function followBuild(build, onStatus) {
  const res = await fetch(`/v1/builds/${build.id}/events`, { headers: { Authorization: `Bearer ${token}` } });
  if (!res.ok) throw new Error(`could not follow the build (HTTP ${res.status})`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let pending = '';
  let last = build;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return last;
    pending += decoder.decode(value, { stream: true });
    let end;
    while ((end = pending.indexOf('\n\n')) >= 0) {
      const event = pending.slice(0, end);
      pending = pending.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('');
      if (data) { last = JSON.parse(data); onStatus(last); }
    }
  }
}

// Builds what is missing of a package's images, showing the build's
// progress; the build goes on on the server if the page is closed.
async function ensureBuilt(name) {
  const build = await api('POST', '/v1/builds', { package: name });
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
    else if (msg.type === 'error') showError(msg.message);
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
$('clip-send').addEventListener('click', () => {
  clipboard('PUT', $('clip').value)
    .then(() => { $('term-status').textContent = 'Clipboard sent to the VM.'; })
    .catch((e) => showError(e.message));
});
$('clip-get').addEventListener('click', () => {
  clipboard('GET')
    .then((t) => {
      $('clip').value = t;
      $('term-status').textContent = 'Clipboard copied from the VM.';
      navigator.clipboard?.writeText(t).catch(() => {});
    })
    .catch((e) => showError(e.message));
});

term.onData((d) => { if (socket && socket.readyState === WebSocket.OPEN) socket.send(new TextEncoder().encode(d)); });
term.onResize(({ rows, cols }) => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: 'resize', rows, cols }));
});
window.addEventListener('resize', () => fit.fit());

function signOut() {
  localStorage.removeItem('strata-token');
  token = null;
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
  setInterval(() => loadSessions().catch(() => {}), 3000);
}

$('login').addEventListener('submit', (ev) => { ev.preventDefault(); showError(''); signIn($('token').value.trim()); });
$('logout').addEventListener('click', signOut);
$('any').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('any-name').value.trim();
  if (name) launch(name).catch((e) => { showError(e.message); $('term-status').textContent = ''; });
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
  // The clipboard needs the terminal's API token, which a viewer lacks.
  $('clipboard').hidden = true;
} else {
  const saved = fromHash || localStorage.getItem('strata-token');
  if (saved) signIn(saved); else $('login').hidden = false;
}
