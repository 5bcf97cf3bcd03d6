// Small formatting and DOM helpers shared by the dashboard modules.

// Build an element. Strings among `children` become text nodes, and attributes are set
// with setAttribute, so data inserted this way is never parsed as HTML.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child != null && child !== false) node.append(child);
  }
  return node;
}

const pad = (n, width = 2) => String(n).padStart(width, '0');

// "14:03:22.123" in local time, from epoch seconds.
export function fmtClock(epoch) {
  const d = new Date(epoch * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function fmtDate(epoch) {
  const d = new Date(epoch * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(epoch)}`;
}

export function fmtBytes(n) {
  if (n == null || Number.isNaN(n)) return '';
  const units = ['B', 'kB', 'MB', 'GB', 'TB']; // decimal, as browsers' developer tools
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtMs(ms) {
  if (ms == null || Number.isNaN(ms)) return '';
  if (ms === 0) return '0';
  if (ms >= 1000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

export function fmtNum(x) {
  if (x == null || Number.isNaN(x)) return '';
  if (Math.abs(x) >= 1e6) return `${(x / 1e6).toFixed(1)}M`;
  if (Math.abs(x) >= 1e4) return `${(x / 1e3).toFixed(0)}k`;
  return Number.isInteger(x) ? String(x) : x.toFixed(x < 10 ? 1 : 0);
}

// CSS class for a status code: status-2xx …, or status-none when no status was sent.
export function statusClass(status) {
  return status >= 100 && status < 600 ? `status-${Math.floor(status / 100)}xx` : 'status-none';
}

// "host/path?query" for absolute URLs; tunnels have an authority ("host:443") as URL.
export function shortUrl(flow) {
  const url = flow.url || '';
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url)) {
    try {
      const u = new URL(url);
      return u.host + u.pathname + u.search;
    } catch { /* fall through */ }
  }
  return url || (flow.host ? `${flow.host}:${flow.port}` : '');
}
