// End-of-test summary shared by the k6 scripts: a plain-text report on stdout and, when HTML_REPORT is set, a self-contained HTML report.
//
//   import { summarize, TREND_STATS } from './lib/summary.js';
//   export const options = { summaryTrendStats: TREND_STATS, ... };
//   export function handleSummary(data) {
//     return summarize(data, { title: 'steady', description: '...', params: { RATE: 2000 } });
//   }
//
// `HTML_REPORT=report.html k6 run loadtest/steady.js` also writes report.html (path relative to where k6 runs).
// Needs nothing from the network: k6's remote jslib is not used.

// The trend statistics every script asks k6 for (`options.summaryTrendStats`), so that p(50) … p(99) exist here.
export const TREND_STATS = ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];

// A threshold with this expression only makes k6 keep a tagged sub-metric (see latencyByName); it is not reported.
const BREAKDOWN_ONLY = 'max>=0';

// Thresholds that make k6 report http_req_duration separately for each request name (the `name` tag), e.g.
//   thresholds: Object.assign({ checks: ['rate==1.0'] }, latencyByName(['location_single', 'location_batch100']))
export function latencyByName(names) {
  const out = {};
  for (const n of names) out[`http_req_duration{name:${n}}`] = [BREAKDOWN_ONLY];
  return out;
}

// Shown in the latency table, in this order; `med` is the median, p(50).
const LATENCY_COLUMNS = [
  ['avg', 'avg'],
  ['med', 'p50'],
  ['p(90)', 'p90'],
  ['p(95)', 'p95'],
  ['p(99)', 'p99'],
  ['max', 'max'],
];

// Metrics k6 itself reports; everything else in data.metrics was defined by the script.
const BUILTIN = new Set([
  'checks',
  'data_received',
  'data_sent',
  'dropped_iterations',
  'group_duration',
  'http_req_blocked',
  'http_req_connecting',
  'http_req_duration',
  'http_req_failed',
  'http_req_receiving',
  'http_req_sending',
  'http_req_tls_handshaking',
  'http_req_waiting',
  'http_reqs',
  'iteration_duration',
  'iterations',
  'vus',
  'vus_max',
]);

function num(v) {
  return typeof v === 'number' && isFinite(v);
}

function fmtMs(v) {
  if (!num(v)) return '-';
  if (v >= 1000) return `${(v / 1000).toFixed(2)} s`;
  if (v >= 100) return `${v.toFixed(0)} ms`;
  if (v >= 10) return `${v.toFixed(1)} ms`;
  return `${v.toFixed(2)} ms`;
}

function fmtCount(v) {
  if (!num(v)) return '-';
  return Number.isInteger(v) ? String(v) : v.toFixed(2);
}

function fmtRate(v) {
  if (!num(v)) return '-';
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)}/s`;
}

function fmtPct(v) {
  if (!num(v)) return '-';
  const p = v * 100;
  if (p > 0 && p < 0.01) return '<0.01 %';
  return `${p.toFixed(2)} %`;
}

function fmtBytes(v) {
  if (!num(v)) return '-';
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

// A value of `metric` formatted for its kind: `stat` is a key of metric.values.
function fmtStat(metric, stat) {
  const v = metric.values[stat];
  if (stat === 'rate' && metric.type === 'rate') return fmtPct(v);
  if (stat === 'rate' && metric.contains === 'data') return num(v) ? `${fmtBytes(v)}/s` : '-';
  if (stat === 'rate') return fmtRate(v);
  if (metric.contains === 'time' && stat !== 'count') return fmtMs(v);
  if (metric.contains === 'data') return fmtBytes(v);
  return fmtCount(v);
}

function values(data, name) {
  const m = data.metrics[name];
  return m ? m.values : {};
}

function durationText(ms) {
  if (!num(ms)) return '-';
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${(s - m * 60).toFixed(0)} s`;
}

// Every check in the root group and its sub-groups, as { name, passes, fails }.
function allChecks(group, prefix, out) {
  for (const c of group.checks || []) {
    out.push({ name: prefix + c.name, passes: c.passes, fails: c.fails });
  }
  for (const g of group.groups || []) {
    allChecks(g, `${prefix}${g.name} › `, out);
  }
  return out;
}

// One row per threshold: metric, expression, whether it held, and the value it was judged on.
function thresholdRows(data) {
  const rows = [];
  for (const name of Object.keys(data.metrics).sort()) {
    const metric = data.metrics[name];
    if (!metric.thresholds) continue;
    for (const expr of Object.keys(metric.thresholds)) {
      if (expr.replace(/\s+/g, '') === BREAKDOWN_ONLY) continue;
      const m = /^\s*([a-z]+(?:\(\s*[\d.]+\s*\))?)\s*(?:<=|>=|===|==|!=|<|>)/.exec(expr);
      const stat = m ? m[1].replace(/\s+/g, '') : null;
      const statKey = stat === 'p(50)' && !(stat in metric.values) ? 'med' : stat;
      const observed = statKey && statKey in metric.values ? fmtStat(metric, statKey) : '-';
      rows.push({ metric: name, expr: expr, ok: metric.thresholds[expr].ok, observed: observed });
    }
  }
  return rows;
}

// Metrics defined by the script (Counters, Rates, Trends, Gauges), formatted by type.
function customRows(data) {
  const rows = [];
  for (const name of Object.keys(data.metrics).sort()) {
    if (BUILTIN.has(name) || name.indexOf('{') >= 0) continue;
    const metric = data.metrics[name];
    const v = metric.values;
    let text;
    if (metric.type === 'counter') {
      text = `${fmtStat(metric, 'count')}  (${fmtRate(v.rate)})`;
    } else if (metric.type === 'rate') {
      text = `${fmtPct(v.rate)}  (${v.passes} of ${v.passes + v.fails})`;
    } else if (metric.type === 'gauge') {
      text = `${fmtStat(metric, 'value')}  (min ${fmtStat(metric, 'min')}, max ${fmtStat(metric, 'max')})`;
    } else {
      text = LATENCY_COLUMNS.filter(([k]) => k in v)
        .map(([k, label]) => `${label} ${fmtStat(metric, k)}`)
        .join(', ');
    }
    rows.push({ name: name, type: metric.type, text: text });
  }
  return rows;
}

// Latency rows: http_req_duration and any of its tagged sub-metrics (those exist when a threshold names them).
function latencyRows(data) {
  const names = Object.keys(data.metrics)
    .filter((n) => n === 'http_req_duration' || n.indexOf('http_req_duration{') === 0)
    .sort((a, b) => (a === 'http_req_duration' ? -1 : b === 'http_req_duration' ? 1 : a < b ? -1 : 1));
  const label = (n) => {
    if (n === 'http_req_duration') return 'all requests';
    if (n === 'http_req_duration{expected_response:true}') return 'expected statuses only';
    const m = /^http_req_duration\{name:(.*)\}$/.exec(n);
    return m ? m[1] : n.slice('http_req_duration'.length);
  };
  return names.map((n) => ({
    name: label(n),
    metric: data.metrics[n],
  }));
}

function overview(data) {
  const reqs = values(data, 'http_reqs');
  const failed = values(data, 'http_req_failed');
  const checks = values(data, 'checks');
  const iters = values(data, 'iterations');
  const dropped = values(data, 'dropped_iterations');
  const vusMax = values(data, 'vus_max');
  const vus = values(data, 'vus');
  const sent = values(data, 'data_sent');
  const recv = values(data, 'data_received');
  const rows = [
    ['run time', durationText(data.state && data.state.testRunDurationMs)],
    ['HTTP requests', `${fmtCount(reqs.count || 0)}  (${fmtRate(reqs.rate)})`],
    [
      'failed requests',
      failed.passes + failed.fails > 0 ? `${fmtPct(failed.rate)}  (${failed.passes} of ${failed.passes + failed.fails})` : '-',
    ],
    [
      'checks passed',
      checks.passes + checks.fails > 0
        ? `${fmtPct(checks.rate)}  (${checks.passes} passed, ${checks.fails} failed)`
        : 'none run',
    ],
    ['iterations', `${fmtCount(iters.count || 0)}  (${fmtRate(iters.rate)})`],
    ['dropped iterations', fmtCount(dropped.count || 0)],
    [
      'VUs',
      num(vusMax.max) ? `max ${fmtCount(num(vus.max) ? vus.max : vusMax.max)} in use, ${fmtCount(vusMax.max)} allocated` : '-',
    ],
    ['data', `sent ${fmtBytes(sent.count)}, received ${fmtBytes(recv.count)}`],
  ];
  return rows;
}

function pad(s, n) {
  s = String(s);
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

function padLeft(s, n) {
  s = String(s);
  return s.length >= n ? s : ' '.repeat(n - s.length) + s;
}

function paramText(params) {
  return Object.keys(params || {})
    .map((k) => `${k}=${params[k]}`)
    .join('  ');
}

function textReport(data, opts, htmlPath) {
  const lines = [];
  const thresholds = thresholdRows(data);
  const failedThresholds = thresholds.filter((t) => !t.ok).length;
  lines.push('');
  lines.push(`== ${opts.title} ==`);
  if (opts.description) lines.push(opts.description);
  if (opts.params) lines.push(paramText(opts.params));
  lines.push('');
  for (const [k, v] of overview(data)) lines.push(`  ${pad(k, 20)} ${v}`);

  lines.push('');
  const nameWidth = Math.max(16, ...latencyRows(data).map((r) => r.name.length)) + 2;
  lines.push(`  ${pad('http_req_duration', nameWidth)}${LATENCY_COLUMNS.map(([, l]) => padLeft(l, 10)).join('')}`);
  for (const row of latencyRows(data)) {
    lines.push(
      `  ${pad(row.name, nameWidth)}${LATENCY_COLUMNS.map(([k]) => padLeft(fmtStat(row.metric, k), 10)).join('')}`,
    );
  }

  const custom = customRows(data);
  if (custom.length) {
    lines.push('');
    lines.push('  script metrics');
    for (const c of custom) lines.push(`    ${pad(c.name, 24)} ${c.text}`);
  }

  const checks = allChecks(data.root_group || {}, '', []);
  if (checks.length) {
    lines.push('');
    lines.push('  checks');
    for (const c of checks) {
      lines.push(`    ${c.fails === 0 ? 'ok  ' : 'FAIL'} ${pad(c.name, 52)} ${c.passes} passed, ${c.fails} failed`);
    }
  }

  if (thresholds.length) {
    lines.push('');
    lines.push('  thresholds');
    for (const t of thresholds) {
      lines.push(`    ${t.ok ? 'ok  ' : 'FAIL'} ${pad(`${t.metric}: ${t.expr}`, 52)} observed ${t.observed}`);
    }
  }

  lines.push('');
  lines.push(
    failedThresholds === 0
      ? `  result: all ${thresholds.length} thresholds held`
      : `  result: ${failedThresholds} of ${thresholds.length} thresholds FAILED`,
  );
  if (htmlPath) lines.push(`  HTML report: ${htmlPath}`);
  lines.push('');
  return lines.join('\n');
}

function esc(s) {
  return String(s)
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;');
}

function htmlReport(data, opts) {
  const thresholds = thresholdRows(data);
  const failedThresholds = thresholds.filter((t) => !t.ok).length;
  const checks = allChecks(data.root_group || {}, '', []);
  const custom = customRows(data);
  const okCell = (ok) => (ok ? '<td class="ok">pass</td>' : '<td class="fail">FAIL</td>');
  const table = (head, rows) =>
    `<table>${head ? `<thead><tr>${head.map((h) => `<th>${esc(h)}</th>`).join('')}</tr></thead>` : ''}` +
    `<tbody>${rows.join('\n')}</tbody></table>`;

  const parts = [];
  parts.push(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>${esc(opts.title)}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 60em; color: #222; padding: 0 1em; }
  h1 { font-size: 1.5em; margin-bottom: 0.2em; }
  h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
  p.meta { color: #666; margin-top: 0; }
  table { border-collapse: collapse; margin: 0.5em 0; }
  th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
  th { background: #f4f4f4; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  td.ok { color: #176f2c; font-weight: 600; }
  td.fail { color: #b00020; font-weight: 700; }
  .banner { padding: 0.6em 1em; border-radius: 4px; font-weight: 600; }
  .banner.ok { background: #e6f4ea; color: #176f2c; }
  .banner.fail { background: #fdecea; color: #b00020; }
  code { background: #f4f4f4; padding: 0 0.2em; }
</style>
</head>
<body>
<h1>${esc(opts.title)}</h1>
<p class="meta">${opts.description ? esc(opts.description) + '<br>' : ''}${
    opts.params ? `<code>${esc(paramText(opts.params))}</code><br>` : ''
  }report written ${esc(new Date().toISOString())}</p>
<p class="banner ${failedThresholds === 0 ? 'ok' : 'fail'}">${
    failedThresholds === 0
      ? `All ${thresholds.length} thresholds held.`
      : `${failedThresholds} of ${thresholds.length} thresholds failed.`
  }</p>`);

  parts.push('<h2>Overview</h2>');
  parts.push(table(null, overview(data).map(([k, v]) => `<tr><th>${esc(k)}</th><td class="n">${esc(v)}</td></tr>`)));

  parts.push('<h2>Response time (http_req_duration)</h2>');
  parts.push(
    table(
      ['requests'].concat(LATENCY_COLUMNS.map(([, l]) => l)).concat(['count']),
      latencyRows(data).map(
        (r) =>
          `<tr><th>${esc(r.name)}</th>${LATENCY_COLUMNS.map(([k]) => `<td class="n">${esc(fmtStat(r.metric, k))}</td>`).join('')}` +
          `<td class="n">${esc(fmtCount(r.metric.values.count))}</td></tr>`,
      ),
    ),
  );

  if (custom.length) {
    parts.push('<h2>Script metrics</h2>');
    parts.push(
      table(
        ['metric', 'type', 'value'],
        custom.map((c) => `<tr><th>${esc(c.name)}</th><td>${esc(c.type)}</td><td class="n">${esc(c.text)}</td></tr>`),
      ),
    );
  }

  if (checks.length) {
    parts.push('<h2>Checks</h2>');
    parts.push(
      table(
        ['check', 'result', 'passed', 'failed'],
        checks.map(
          (c) =>
            `<tr><td>${esc(c.name)}</td>${okCell(c.fails === 0)}<td class="n">${c.passes}</td><td class="n">${c.fails}</td></tr>`,
        ),
      ),
    );
  }

  if (thresholds.length) {
    parts.push('<h2>Thresholds</h2>');
    parts.push(
      table(
        ['metric', 'threshold', 'result', 'observed'],
        thresholds.map(
          (t) =>
            `<tr><td>${esc(t.metric)}</td><td><code>${esc(t.expr)}</code></td>${okCell(t.ok)}<td class="n">${esc(t.observed)}</td></tr>`,
        ),
      ),
    );
  }

  parts.push('</body>\n</html>\n');
  return parts.join('\n');
}

// The handleSummary result: the text report on stdout, plus the HTML report at opts.htmlPath or $HTML_REPORT.
// opts: { title, description, params: { NAME: value, ... }, htmlPath }.
export function summarize(data, opts) {
  opts = opts || {};
  opts.title = opts.title || 'ingest-gateway load test';
  const htmlPath = opts.htmlPath || __ENV.HTML_REPORT || '';
  const out = { stdout: textReport(data, opts, htmlPath) };
  if (htmlPath) out[htmlPath] = htmlReport(data, opts);
  return out;
}
