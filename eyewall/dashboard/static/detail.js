// The flow detail side panel: fetches GET api/flows/<id> and renders it with textContent.
import { el, fmtBytes, fmtDate, fmtMs, statusClass } from './format.js';

let request = 0; // guards against a slow answer overwriting a newer one

function facts(pairs) {
  const dl = el('dl', { class: 'facts' });
  for (const [name, value] of pairs) {
    if (value == null || value === '') continue;
    dl.append(el('dt', {}, name), el('dd', {}, value));
  }
  return dl;
}

function headersTable(headers, cls) {
  if (!headers?.length) return el('p', { class: 'muted' }, 'no headers');
  const table = el('table', { class: `headers ${cls}` });
  for (const [name, value] of headers) {
    table.append(el('tr', {}, el('th', {}, String(name)), el('td', {}, String(value))));
  }
  return table;
}

function bodyView(body) {
  if (!body) return el('p', { class: 'muted body' }, 'not recorded');
  if (body.size === 0) return el('p', { class: 'muted body' }, 'empty');
  const note = body.truncated ? ` (first ${fmtBytes(body.captured)} of ${fmtBytes(body.size)})` : '';
  if (body.text != null) {
    return el('div', { class: 'body' },
      note && el('p', { class: 'muted' }, `truncated${note}`),
      el('pre', {}, body.text));
  }
  if (body.base64 != null) return el('p', { class: 'body' }, `binary, ${body.size} bytes${note}`);
  return el('p', { class: 'muted body' }, `not recorded (${fmtBytes(body.size)})`);
}

function section(title, ...content) {
  return el('section', {}, el('h3', {}, title), ...content);
}

function render(flow) {
  const req = flow.request;
  const resp = flow.response;
  const error = flow.error ? `${flow.error}${flow.error_detail ? `: ${flow.error_detail}` : ''}` : null;
  const status = el('span', { class: statusClass(flow.status) },
    flow.status ? `${flow.status}${resp?.reason ? ` ${resp.reason}` : ''}` : 'none');
  return [
    facts([
      ['Status', status],
      ['Request id', flow.id],
      ['Kind', flow.kind + (flow.intercepted ? ' (TLS intercepted)' : '')],
      ['Started', fmtDate(flow.started)],
      ['Client', flow.client],
      ['Node', flow.node],
      ['User', flow.user],
      ['Upstream', flow.upstream && `${flow.upstream}${flow.reused ? ' (reused)' : ''}`],
      ['Rule', flow.rule],
      ['Error', error],
    ]),
    section('Timings', facts([
      ['Connect', flow.connect_ms == null ? (flow.reused ? 'reused' : '–') : fmtMs(flow.connect_ms)],
      ['First byte', flow.ttfb_ms == null ? '–' : fmtMs(flow.ttfb_ms)],
      ['Total', fmtMs(flow.duration_ms)],
    ])),
    section('Sizes', facts([
      ['From client', fmtBytes(flow.bytes_in)],
      ['To client', fmtBytes(flow.bytes_out)],
      ['Request body', req?.body ? fmtBytes(req.body.size) : null],
      ['Response body', resp?.body ? fmtBytes(resp.body.size) : null],
    ])),
    section('Request',
      req ? el('p', { class: 'line' }, `${req.method} ${req.target} ${req.version}`) : null,
      headersTable(req?.headers, 'request-headers'),
      el('h4', {}, 'Body'), bodyView(req?.body)),
    section('Response', ...(resp
      ? [el('p', { class: 'line' }, `${resp.version} ${resp.status} ${resp.reason ?? ''}`),
        headersTable(resp.headers, 'response-headers'),
        el('h4', {}, 'Body'), bodyView(resp.body)]
      : [el('p', { class: 'muted' }, 'no response')])),
  ];
}

// Open the panel for flow `id` (the summary gives an immediate title while loading).
export async function showDetail(id, summary) {
  const panel = document.getElementById('detail');
  const title = document.getElementById('detail-title');
  const body = document.getElementById('detail-body');
  const mine = ++request;
  panel.hidden = false;
  panel.dataset.id = id;
  title.textContent = summary ? `${summary.method} ${summary.url}` : id;
  body.replaceChildren(el('p', { class: 'muted' }, 'loading…'));
  let content;
  let heading = title.textContent;
  try {
    const resp = await fetch(`api/flows/${encodeURIComponent(id)}`, { headers: { Accept: 'application/json' } });
    if (resp.status === 404) throw new Error('this flow is no longer recorded');
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const flow = await resp.json();
    heading = `${flow.method} ${flow.url}`;
    content = render(flow);
  } catch (err) {
    content = [el('p', { class: 'error' }, `Could not load flow ${id}: ${err.message}`)];
  }
  if (mine !== request) return;
  title.textContent = heading;
  body.replaceChildren(...content);
}

export function hideDetail() {
  request++;
  const panel = document.getElementById('detail');
  panel.hidden = true;
  delete panel.dataset.id;
}
