// Hand-drawn canvas charts of the last five minutes of `stats` messages.
import { fmtBytes, fmtMs, fmtNum } from './format.js';

const WINDOW_S = 300;
const STATUS_KEYS = ['1xx', '2xx', '3xx', '4xx', '5xx', 'none'];

// Each chart: canvas id, title, value formatter, series (label, CSS colour variable,
// accessor); `stacked` draws areas on top of one another.
const CHARTS = [
  {
    id: 'chart-requests', title: 'requests/s', format: fmtNum,
    series: [{ label: 'req/s', color: '--c-req', get: (s) => s.requests_per_s }],
  },
  {
    id: 'chart-bytes', title: 'bytes/s', format: (v) => `${fmtBytes(v)}/s`,
    series: [
      { label: 'in', color: '--c-in', get: (s) => s.bytes_in_per_s },
      { label: 'out', color: '--c-out', get: (s) => s.bytes_out_per_s },
    ],
  },
  {
    id: 'chart-status', title: 'status/s', format: fmtNum, stacked: true, values: false,
    series: STATUS_KEYS.map((k) => ({ label: k, color: `--c-${k}`, get: (s) => s.status?.[k] ?? 0 })),
  },
  {
    id: 'chart-latency', title: 'latency', format: fmtMs,
    series: ['p50', 'p90', 'p99'].map((k) => ({
      label: k, color: `--c-${k}`, get: (s) => s.latency_ms?.[k],
    })),
  },
];

// 1, 2, 5 × 10^k at or above x.
function niceCeil(x) {
  if (!(x > 0)) return 1;
  const base = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 5, 10]) if (m * base >= x) return m * base;
  return 10 * base;
}

const value = (v) => (v == null || Number.isNaN(Number(v)) ? null : Number(v));

function drawChart(canvas, spec, samples, colors) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = '11px system-ui, sans-serif';
  ctx.textBaseline = 'middle';

  const box = { left: 58, right: w - 8, top: 22, bottom: h - 18 };
  const now = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  const rows = samples.map((s) => spec.series.map((se) => value(se.get(s))));
  const max = Math.max(0, ...rows.map((r) =>
    spec.stacked ? r.reduce((a, v) => a + (v || 0), 0) : Math.max(0, ...r.map((v) => v || 0))));
  const top = niceCeil(max);
  const x = (t) => box.left + (1 - (now - t) / WINDOW_S) * (box.right - box.left);
  const y = (v) => box.bottom - (v / top) * (box.bottom - box.top);

  // Grid, y labels (0, half, top) and x labels (one per minute).
  ctx.strokeStyle = colors['--grid'];
  ctx.fillStyle = colors['--muted'];
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  for (const v of [0, top / 2, top]) {
    const py = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(box.left, py); ctx.lineTo(box.right, py); ctx.stroke();
    ctx.fillText(spec.format(v), box.left - 4, py);
  }
  ctx.textAlign = 'center';
  for (let m = 5; m >= 0; m--) {
    const px = x(now - m * 60);
    ctx.fillText(m ? `-${m}m` : 'now', Math.min(px, box.right - 10), h - 8);
  }

  // Series, clipped to the plot box.
  ctx.save();
  ctx.beginPath(); ctx.rect(box.left, box.top - 1, box.right - box.left, box.bottom - box.top + 2);
  ctx.clip();
  const base = samples.map(() => 0);
  spec.series.forEach((se, i) => {
    const color = colors[se.color];
    if (spec.stacked) {
      const upper = rows.map((r, j) => base[j] + (r[i] || 0));
      ctx.beginPath();
      samples.forEach((s, j) => ctx.lineTo(x(s.time), y(upper[j])));
      for (let j = samples.length - 1; j >= 0; j--) ctx.lineTo(x(samples[j].time), y(base[j]));
      ctx.closePath();
      ctx.fillStyle = color;
      ctx.fill();
      upper.forEach((v, j) => { base[j] = v; });
      return;
    }
    ctx.beginPath();
    let drawing = false;
    samples.forEach((s, j) => {
      const v = rows[j][i];
      if (v == null) { drawing = false; return; }
      if (drawing) ctx.lineTo(x(s.time), y(v)); else ctx.moveTo(x(s.time), y(v));
      drawing = true;
    });
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.stroke();
  });
  ctx.restore();

  // Title and legend with the latest values.
  ctx.textAlign = 'left';
  ctx.fillStyle = colors['--fg'];
  ctx.font = '600 11px system-ui, sans-serif';
  ctx.fillText(spec.title, 4, 10);
  ctx.font = '11px system-ui, sans-serif';
  let lx = ctx.measureText(spec.title).width + 16;
  const last = rows[rows.length - 1] || [];
  spec.series.forEach((se, i) => {
    const latest = last[i] == null ? '–' : spec.format(last[i]);
    const text = spec.values === false ? se.label : `${se.label} ${latest}`;
    ctx.fillStyle = colors[se.color];
    ctx.fillRect(lx, 6, 8, 8);
    ctx.fillStyle = colors['--muted'];
    ctx.fillText(text, lx + 11, 10);
    lx += ctx.measureText(text).width + 18;
  });
}

export class Charts {
  constructor() {
    this.samples = [];
    window.addEventListener('resize', () => this.draw());
  }

  // Add one `stats` message (or several, oldest first) and redraw.
  push(...samples) {
    for (const s of samples) if (typeof s?.time === 'number') this.samples.push(s);
    this.samples.sort((a, b) => a.time - b.time);
    this.samples = this.samples.filter((s, i, all) => i === 0 || s.time !== all[i - 1].time);
    const newest = this.samples.length ? this.samples[this.samples.length - 1].time : 0;
    const first = this.samples.findIndex((s) => s.time > newest - WINDOW_S);
    if (first > 0) this.samples.splice(0, first);
    this.draw();
  }

  draw() {
    const style = getComputedStyle(document.documentElement);
    const colors = new Proxy({}, { get: (_, name) => style.getPropertyValue(name).trim() || '#888' });
    for (const spec of CHARTS) {
      const canvas = document.getElementById(spec.id);
      if (canvas) drawChart(canvas, spec, this.samples, colors);
    }
  }
}
