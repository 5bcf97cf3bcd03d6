// Eyewall dashboard: live flow table (WS api/live), filters, flow detail and charts.
import { Charts } from './charts.js';
import { hideDetail, showDetail } from './detail.js';
import { el, fmtBytes, fmtClock, fmtMs, shortUrl, statusClass } from './format.js';

const MAX_FLOWS = 2000;
const FILTERS = ['host', 'status', 'method', 'user', 'text'];

const tbody = document.getElementById('flows');
const charts = new Charts();

let flows = []; // summaries, newest first
const rows = new Map(); // flow id -> <tr> currently in the table
let filter = readFilters();
let selectedId = null;

// --- filtering ------------------------------------------------------------------------

function readFilters() {
  const f = {};
  for (const name of FILTERS) f[name] = document.getElementById(`filter-${name}`).value.trim().toLowerCase();
  f.status = f.status === 'none' ? '0' : f.status.replace(/x+$/, ''); // "5xx" -> prefix "5"
  return f;
}

const has = (value, needle) => String(value ?? '').toLowerCase().includes(needle);

function matches(flow) {
  return (!filter.host || has(flow.host, filter.host))
    && (!filter.status || String(flow.status ?? 0).startsWith(filter.status))
    && (!filter.method || String(flow.method ?? '').toLowerCase().startsWith(filter.method))
    && (!filter.user || has(flow.user, filter.user))
    && (!filter.text || [flow.id, flow.url, flow.host, flow.error, flow.error_detail].some((v) => has(v, filter.text)));
}

// --- the table ------------------------------------------------------------------------

function badge(flow) {
  if (flow.kind === 'tunnel') return el('span', { class: 'badge tunnel', title: 'CONNECT tunnel' }, 'tunnel');
  if (flow.kind === 'websocket') return el('span', { class: 'badge websocket', title: 'WebSocket' }, 'ws');
  return null;
}

function flowRow(flow) {
  const error = flow.error ? `${flow.error}${flow.error_detail ? `: ${flow.error_detail}` : ''}` : '';
  return el('tr', {
    class: `flow kind-${flow.kind}${flow.id === selectedId ? ' selected' : ''}`,
    'data-id': flow.id, tabindex: 0,
  },
  el('td', { class: 'time', title: new Date(flow.started * 1000).toString() }, fmtClock(flow.started)),
  el('td', { class: 'method' }, flow.method || ''),
  el('td', { class: 'url', title: flow.url },
    flow.node ? el('span', { class: 'badge node', title: 'the fleet node that served it' }, flow.node) : null,
    badge(flow),
    flow.intercepted ? el('span', { class: 'badge tls', title: 'TLS intercepted' }, 'tls') : null,
    shortUrl(flow)),
  el('td', { class: `status ${statusClass(flow.status)}` }, flow.status ? String(flow.status) : '–'),
  el('td', { class: 'user' }, flow.user ?? ''),
  el('td', { class: 'num' }, fmtBytes(flow.bytes_in)),
  el('td', { class: 'num' }, fmtBytes(flow.bytes_out)),
  el('td', { class: 'num' }, fmtMs(flow.duration_ms)),
  el('td', { class: 'rule' }, flow.rule ?? ''),
  el('td', { class: 'error', title: error }, error));
}

function updateCount() {
  document.getElementById('shown').textContent = `${rows.size} of ${flows.length} flows`;
  document.getElementById('empty').hidden = rows.size > 0;
}

// Rebuild the whole table (after a filter change or a `hello`).
function renderAll() {
  rows.clear();
  const fragment = document.createDocumentFragment();
  for (const flow of flows) {
    if (!matches(flow)) continue;
    const tr = flowRow(flow);
    rows.set(flow.id, tr);
    fragment.append(tr);
  }
  tbody.replaceChildren(fragment);
  updateCount();
}

// New flows (newest first) go on top; the oldest beyond MAX_FLOWS are forgotten.
function addFlows(incoming) {
  const fragment = document.createDocumentFragment();
  for (const flow of incoming) {
    rows.get(flow.id)?.remove();
    rows.delete(flow.id);
    if (!matches(flow)) continue;
    const tr = flowRow(flow);
    rows.set(flow.id, tr);
    fragment.append(tr);
  }
  tbody.prepend(fragment);
  const ids = new Set(incoming.map((f) => f.id));
  flows = incoming.concat(flows.filter((f) => !ids.has(f.id)));
  for (const old of flows.splice(MAX_FLOWS)) {
    rows.get(old.id)?.remove();
    rows.delete(old.id);
  }
  updateCount();
}

// Flow messages can come in bursts: add them to the table once per animation frame.
let pending = [];
function queueFlow(flow) {
  if (pending.length === 0) requestAnimationFrame(() => {
    const batch = pending.reverse(); // newest first
    pending = [];
    addFlows(batch);
  });
  pending.push(flow);
  if (pending.length > MAX_FLOWS) pending.shift();
}

// --- counters -------------------------------------------------------------------------

function setCounters(stats) {
  for (const name of ['connections', 'tunnels', 'pool_idle']) {
    if (stats[name] != null) document.getElementById(`count-${name}`).textContent = String(stats[name]);
  }
}

// --- the live feed --------------------------------------------------------------------

let attempt = 0;
let dropped = 0;

function setLive(state, text) {
  const live = document.getElementById('live');
  live.dataset.state = state;
  live.textContent = text;
  live.title = dropped ? `${dropped} live messages dropped (this page fell behind)` : '';
}

const handlers = {
  hello(msg) {
    attempt = 0;
    setLive('live', dropped ? `live (${dropped} dropped)` : 'live');
    // After a reconnect, keep what we had and merge in what the server remembers.
    const byId = new Map(flows.map((f) => [f.id, f]));
    for (const f of msg.flows ?? []) byId.set(f.id, f);
    flows = [...byId.values()].sort((a, b) => b.started - a.started).slice(0, MAX_FLOWS);
    renderAll();
  },
  flow(msg) { queueFlow(msg.flow); },
  stats(msg) { setCounters(msg); charts.push(msg); },
  dropped(msg) {
    dropped += msg.count ?? 0;
    setLive('live', `live (${dropped} dropped)`);
  },
};

function connect() {
  const url = new URL('api/live', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  setLive('connecting', 'connecting…');
  const ws = new WebSocket(url);
  ws.onmessage = (event) => {
    let msg;
    try { msg = JSON.parse(event.data); } catch { return; }
    handlers[msg?.type]?.(msg);
  };
  ws.onclose = () => {
    const delay = Math.min(15000, 500 * 2 ** attempt++) * (0.8 + Math.random() * 0.4);
    setLive('disconnected', `disconnected, retrying in ${Math.ceil(delay / 1000)} s`);
    setTimeout(connect, delay);
  };
}

// Prefill the charts with the server's recent history, when it has one.
async function loadStats() {
  try {
    const resp = await fetch('api/stats', { headers: { Accept: 'application/json' } });
    if (!resp.ok) return;
    const stats = await resp.json();
    setCounters(stats);
    if (Array.isArray(stats.series)) charts.push(...stats.series);
  } catch { /* the live feed will bring stats anyway */ }
}

// --- wiring ---------------------------------------------------------------------------

function select(tr) {
  tbody.querySelector('tr.selected')?.classList.remove('selected');
  tr.classList.add('selected');
  selectedId = tr.dataset.id;
  showDetail(selectedId, flows.find((f) => f.id === selectedId));
}

function closeDetail() {
  tbody.querySelector('tr.selected')?.classList.remove('selected');
  selectedId = null;
  hideDetail();
}

tbody.addEventListener('click', (event) => {
  const tr = event.target.closest('tr.flow');
  if (tr) select(tr);
});
tbody.addEventListener('keydown', (event) => {
  const tr = event.target.closest('tr.flow');
  if (!tr) return;
  if (event.key === 'Enter') select(tr);
  else if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
    const next = event.key === 'ArrowDown' ? tr.nextElementSibling : tr.previousElementSibling;
    if (next) { event.preventDefault(); next.focus(); select(next); }
  }
});
document.getElementById('detail-close').addEventListener('click', closeDetail);
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && selectedId) closeDetail();
});

for (const name of FILTERS) {
  document.getElementById(`filter-${name}`).addEventListener('input', () => {
    filter = readFilters();
    const status = document.getElementById('filter-status');
    status.classList.toggle('invalid', !/^(\d{0,3}x{0,2}|none)$/i.test(status.value.trim()));
    renderAll();
  });
}
document.getElementById('filter-clear').addEventListener('click', () => {
  for (const name of FILTERS) document.getElementById(`filter-${name}`).value = '';
  document.getElementById('filter-status').classList.remove('invalid');
  filter = readFilters();
  renderAll();
});

updateCount();
charts.draw();
loadStats();
connect();
