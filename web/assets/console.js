// Ferry's web console. A client of the public API and nothing else: every
// datum comes from /api (see /api/openapi.json), the server decides what a
// role may see and do, and the page is built with DOM calls and textContent
// only, so nothing a runbook or a user wrote can run as code here.
'use strict';

const EVENT_TYPES = ['step_started', 'step_succeeded', 'step_failed', 'step_skipped',
  'approval_requested', 'approved', 'cancel_requested', 'rollback_requested',
  'undo_started', 'undo_succeeded', 'undo_failed', 'run_finished'];
const RANK = { viewer: 0, operator: 1, admin: 2 };
const SVGNS = 'http://www.w3.org/2000/svg';

const session = { me: null };
let disposers = [];

// ---- DOM -------------------------------------------------------------------

function build(ns, tag, attrs, kids) {
  const n = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') n.addEventListener(k.slice(2), v);
    else if (k === 'text') n.textContent = String(v);
    // Through the CSSOM: the policy forbids inline style attributes.
    else if (k === 'style') n.style.cssText = String(v);
    else n.setAttribute(k, v === true ? '' : String(v));
  }
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    n.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  // Whatever a click opens, the keyboard opens too: a clickable row or
  // chart mark takes the focus (Tab) and acts on Enter or Space.
  // A table may scroll sideways on a narrow screen: the keyboard can too.
  if (tag === 'table' && !('tabindex' in (attrs || {}))) n.setAttribute('tabindex', '0');
  // (Marks that a table beside them repeats say `tabindex: -1`.)
  if (typeof (attrs || {}).onclick === 'function' && !['a', 'button', 'input', 'select'].includes(tag) && !('tabindex' in attrs)) {
    n.setAttribute('tabindex', '0');
    n.addEventListener('keydown', (e) => {
      if (e.target === n && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); n.dispatchEvent(new MouseEvent('click', { bubbles: true })); }
    });
  }
  return n;
}
const h = (tag, attrs, ...kids) => build(null, tag, attrs, kids);
const s = (tag, attrs, ...kids) => build(SVGNS, tag, attrs, kids);

// Replace an element's children; null, undefined and false are left out.
function put(el, ...kids) {
  el.replaceChildren(...kids.flat(Infinity).filter((k) => k !== null && k !== undefined && k !== false));
}
const mount = (...kids) => put(document.getElementById('main'), ...kids);

// ---- Formatting ------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)) + ' ' + u[i];
}
function secs(x) {
  if (x === null || x === undefined) return '–';
  if (x < 1) return Math.round(x * 1000) + ' ms';
  if (x < 120) return x.toFixed(x < 10 ? 1 : 0) + ' s';
  if (x < 7200) return (x / 60).toFixed(1) + ' min';
  if (x < 172800) return (x / 3600).toFixed(1) + ' h';
  return (x / 86400).toFixed(1) + ' d';
}
// Times read in the browser's zone; UTC is on hover (and in `datetime`).
const pad2 = (n) => String(n).padStart(2, '0');
function whenText(t) {
  if (t === null || t === undefined) return '–';
  const d = new Date(t);
  return isNaN(d) ? String(t) : `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}
function when(t) {
  const d = new Date(t);
  if (t === null || t === undefined || isNaN(d)) return whenText(t);
  const utc = d.toISOString();
  return h('time', { datetime: utc, title: utc.replace('T', ' ').slice(0, 19) + ' UTC' }, whenText(t));
}
const money = (x) => (x === null || x === undefined) ? '–' : '$' + x.toFixed(x < 1 ? 4 : 2);
const badge = (text, kind) => h('span', { class: 'badge b-' + (kind || text) }, text);
const short = (id) => String(id || '').slice(0, 10);
const can = (role) => session.me && RANK[session.me.role] >= RANK[role];

// ---- API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || ('HTTP ' + status));
    this.status = status;
    this.diagnostics = (body && body.diagnostics) || [];
  }
}

async function api(path, opts = {}) {
  const init = { method: opts.method || 'GET', credentials: 'same-origin', headers: {} };
  if (init.method !== 'GET' && session.me && session.me.csrf_token) {
    init.headers['X-CSRF-Token'] = session.me.csrf_token;
  }
  if (opts.body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { error: text }; }
  if (r.status === 401 && path !== '/api/login') {
    session.me = null;
    showLogin('Your session has ended; sign in again.');
    throw new ApiError(401, body);
  }
  if (!r.ok) {
    const e = new ApiError(r.status, body);
    e.retryAfter = r.headers.get('Retry-After');
    throw e;
  }
  return body;
}

function errorBox(e) {
  const kids = [e.message];
  for (const d of e.diagnostics || []) {
    kids.push('\n' + d.file + ':' + d.line + ':' + d.column + ': ' + d.message + (d.hint ? ' (' + d.hint + ')' : ''));
  }
  return h('div', { class: 'error', role: 'alert' }, kids);
}

async function load(render) {
  try {
    await render();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return;
    mount(errorBox(e));
  }
}

// Call `f` every `ms` while the view stays.
function every(ms, f) {
  const id = setInterval(f, ms);
  disposers.push(() => clearInterval(id));
}

// ---- Shell -----------------------------------------------------------------

const NAV = [
  ['#/', 'Protection', 'viewer'], ['#/runbooks', 'Runbooks', 'viewer'], ['#/runs', 'Runs', 'viewer'],
  ['#/drills', 'Drill history', 'viewer'], ['#/schedules', 'Schedules', 'viewer'], ['#/agents', 'Agents', 'viewer'], ['#/repository', 'Repository', 'viewer'],
  ['#/audit', 'Audit log', 'operator'], ['#/users', 'Users', 'admin'],
];

function shell() {
  document.getElementById('top').hidden = false;
  const here = location.hash || '#/';
  put(document.getElementById('nav'), ...NAV.filter(([, , r]) => can(r)).map(([href, name]) => {
    const on = href === '#/' ? (here === '#/' || here.startsWith('#/sources')) : here.startsWith(href);
    return h('a', { href, class: on ? 'on' : null }, name);
  }));
  put(document.getElementById('who'),
    h('span', { id: 'whoami' }, session.me.name + ' · ' + session.me.role),
    h('button', { onclick: logout }, 'Sign out'));
}

function showLogin(message) {
  for (const d of disposers) d();
  disposers = [];
  document.getElementById('top').hidden = true;
  const name = h('input', { id: 'login-name', autocomplete: 'username', required: true });
  const pw = h('input', { id: 'login-password', type: 'password', autocomplete: 'current-password', required: true });
  const out = h('div');
  const form = h('form', { class: 'panel login', onsubmit: async (ev) => {
    ev.preventDefault();
    put(out);
    try {
      session.me = await api('/api/login', { method: 'POST', body: { name: name.value, password: pw.value } });
      route();
    } catch (e) {
      const wait = e.retryAfter ? ' Try again in ' + e.retryAfter + ' s.' : '';
      put(out, h('div', { class: 'error', role: 'alert' }, e.message + wait));
    }
  } },
  h('h1', {}, 'Sign in to Ferry'),
  message ? h('div', { class: 'note' }, message) : null,
  h('label', {}, 'User', name), h('label', {}, 'Password', pw),
  h('button', { class: 'primary', type: 'submit', id: 'login-submit' }, 'Sign in'), out);
  mount(form);
  name.focus();
}

async function logout() {
  try { await api('/api/logout', { method: 'POST' }); } catch (_) { /* gone already */ }
  session.me = null;
  showLogin('Signed out.');
}

// ---- Protection dashboard --------------------------------------------------

// A half-circle gauge of age against objective: green to 3/4, amber to the
// objective, red beyond; the needle stops at 4/3 of the objective.
function gauge(age, objective, status) {
  const W = 84, R = 34, cx = 42, cy = 40;
  const pt = (f) => {
    const a = Math.PI * (1 - f);
    return [cx + R * Math.cos(a), cy - R * Math.sin(a)];
  };
  const arc = (f0, f1, color) => {
    const [x0, y0] = pt(f0), [x1, y1] = pt(f1);
    return s('path', { d: `M${x0} ${y0} A${R} ${R} 0 0 1 ${x1} ${y1}`, stroke: color, 'stroke-width': 8, fill: 'none' });
  };
  const max = 4 / 3, kids = [];
  if (objective) {
    kids.push(arc(0, 0.75 / max, '#1e8e3e'), arc(0.75 / max, 1 / max, '#d68a00'), arc(1 / max, 1, '#c5221f'));
    if (age !== null && age !== undefined) {
      const [x, y] = pt(Math.min(age / objective, max) / max);
      kids.push(s('line', { x1: cx, y1: cy, x2: x, y2: y, stroke: '#1d232b', 'stroke-width': 2 }),
        s('circle', { cx, cy, r: 3, fill: '#1d232b' }));
    }
  } else {
    kids.push(arc(0, 1, '#dde2e8'));
  }
  return s('svg', { width: W, height: 46, viewBox: `0 0 ${W} 46`, class: 'gauge', 'data-status': status, role: 'img',
    'aria-label': objective ? `RPO ${secs(age)} of ${secs(objective)}: ${status}` : 'no RPO objective' }, kids);
}

async function dashboard() {
  await dashboardOnce();
  every(10000, () => load(dashboardOnce));
}

async function dashboardOnce() {
  const sources = await api('/api/sources');
  const breach = sources.filter((x) => x.rpo_status === 'breach').length;
  const warn = sources.filter((x) => x.rpo_status === 'warning').length;
  const verified = sources.filter((x) => x.last_verified).length;
  const total = sources.reduce((a, x) => a + x.bytes_protected, 0);
  const rows = sources.map((x) => {
    const p = x.protection;
    return h('tr', { class: 'click source-row', 'data-source': x.source, onclick: () => { location.hash = '#/sources/' + encodeURIComponent(x.source); } },
      h('td', {}, h('strong', {}, x.source), x.alerts.map((a) => h('div', { class: 'alert' }, a))),
      h('td', {}, gauge(x.last_point_age_secs, x.rpo_objective_secs, x.rpo_status)),
      h('td', {}, badge(x.rpo_status), h('div', { class: 'small muted' },
        x.rpo_objective_secs ? 'objective ' + secs(x.rpo_objective_secs) + ' (' + x.rpo_objective_runbook + ')' : 'no objective')),
      h('td', {}, x.last_point_time ? when(x.last_point_time) : '–', h('div', { class: 'small muted' }, x.last_point ? short(x.last_point) + ' · ' + secs(x.last_point_age_secs) + ' old' : '')),
      h('td', { class: 'num' }, x.points),
      h('td', { class: 'num' }, bytes(x.bytes_protected)),
      h('td', {}, p ? [secs(p.lag_secs) + ' lag', h('div', { class: 'small muted' },
        bytes(p.backlog_bytes) + ' backlog · ' + bytes(p.throughput_bytes_per_sec) + '/s · ' + p.cycles_ok + ' ok, ' + p.cycles_failed + ' failed' + (p.stale ? ' · stale' : ''))] : h('span', { class: 'muted' }, 'not reported')),
      h('td', {}, x.last_verified ? h('a', { href: '#/runs/' + x.last_verified.run_id, onclick: (e) => e.stopPropagation() }, when(x.last_verified.at_ms)) : h('span', { class: 'muted' }, 'never')));
  });
  mount(h('h1', {}, 'Protection'),
    h('div', { class: 'tiles' },
      tile(sources.length, 'sources'), tile(breach, 'past their RPO', breach ? 'bad' : null),
      tile(warn, 'near their RPO', warn ? 'warning' : null), tile(verified, 'verified by a drill'), tile(bytes(total), 'protected (newest points)')),
    sources.length === 0 ? h('div', { class: 'note' }, 'No recovery point yet. Back up a disk with `ferry backup` or protect a VM with `ferry protect`.') :
      h('div', { class: 'scroll', tabindex: 0 }, h('table', { id: 'sources' },
        h('thead', {}, h('tr', {}, ['Source', 'RPO', 'Status', 'Newest point', 'Points', 'Size', 'Protection', 'Last verified'].map((t) => h('th', { class: t === 'Points' || t === 'Size' ? 'num' : null }, t)))),
        h('tbody', {}, rows))));
}

function tile(v, k, kind) {
  return h('div', { class: 'tile' + (kind ? ' b-' + kind : '') }, h('div', { class: 'v' }, v), h('div', { class: 'k' }, k));
}

// ---- A source's recovery points ---------------------------------------------

async function sourceView(name) {
  const points = await api('/api/sources/' + encodeURIComponent(name) + '/points');
  const detail = h('div', { id: 'point-detail' });
  const show = (p) => put(detail, h('div', { class: 'panel' },
    h('h2', {}, 'Point ' + p.id),
    h('p', {}, when(p.time), ' · ', badge(p.consistency, 'unknown'), ' · ', bytes(p.size), ' (', bytes(p.data_bytes), ' of data) · from ', p.host,
      p.parent ? [' · parent ', short(p.parent)] : ''),
    p.verified_by.length ? h('p', {}, 'Verified by ', p.verified_by.map((v, i) => [i ? ', ' : '', h('a', { href: '#/runs/' + v.run_id }, 'drill ' + v.run_id)])) :
      h('p', { class: 'muted' }, 'No drill has verified this point.'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Disk', 'Size', 'Data', 'Digest', 'Changes from'].map((t) => h('th', {}, t)))),
      h('tbody', {}, p.disks.map((d) => h('tr', {}, h('td', {}, d.name), h('td', { class: 'num' }, bytes(d.size)), h('td', { class: 'num' }, bytes(d.data_bytes)),
        h('td', { class: 'mono' }, d.digest), h('td', { class: 'small' }, d.changes || 'whole disk read')))))));
  mount(h('h1', {}, h('a', { href: '#/' }, 'Protection'), ' / ', name),
    h('div', { class: 'panel' }, h('h2', {}, 'Timeline'), timeline(points, show),
      h('div', { class: 'small muted' }, points.length + ' point(s); filled green: verified by a drill. Click a point for its disks.')),
    detail,
    h('table', { id: 'points' }, h('thead', {}, h('tr', {}, ['Time', 'Point', 'Consistency', 'Size', 'Verified'].map((t) => h('th', {}, t)))),
      h('tbody', {}, points.slice(0, 500).map((p) => h('tr', { class: 'click', onclick: () => show(p) },
        h('td', {}, when(p.time)), h('td', { class: 'mono' }, short(p.id)), h('td', {}, p.consistency), h('td', { class: 'num' }, bytes(p.size)),
        h('td', {}, p.verified_by.length ? badge('verified', 'ok') : ''))))),
    points.length > 500 ? h('p', { class: 'muted' }, 'The newest 500 of ' + points.length + ' points are listed; the timeline shows all.') : null);
  if (points.length) show(points[0]);
}

function timeline(points, onpick) {
  const W = 1000, H = 70, pad = 20;
  if (!points.length) return h('p', { class: 'muted' }, 'No points.');
  const ts = points.map((p) => Date.parse(p.time));
  const t0 = Math.min(...ts), t1 = Math.max(...ts), span = Math.max(t1 - t0, 1);
  const x = (t) => pad + (W - 2 * pad) * (points.length === 1 ? 0.5 : (t - t0) / span);
  const kids = [s('line', { x1: pad, y1: 35, x2: W - pad, y2: 35, stroke: '#dde2e8', 'stroke-width': 2 }),
    s('text', { x: pad, y: 62, 'font-size': 11, fill: '#5f6b7a' }, whenText(t0)),
    s('text', { x: W - pad, y: 62, 'font-size': 11, fill: '#5f6b7a', 'text-anchor': 'end' }, whenText(t1))];
  points.forEach((p, i) => {
    const v = p.verified_by.length > 0;
    kids.push(s('circle', { cx: x(ts[i]), cy: 35, r: v ? 6 : 4, fill: v ? '#1e8e3e' : '#fff', stroke: v ? '#0d5c26' : '#1f4e79', 'stroke-width': 1.5,
      class: 'point' + (v ? ' verified' : ''), style: 'cursor:pointer', tabindex: -1, onclick: () => onpick(p) },
    s('title', {}, whenText(p.time) + ' · ' + short(p.id) + (v ? ' · verified' : ''))));
  });
  return h('div', { class: 'scroll', tabindex: 0 }, s('svg', { viewBox: `0 0 ${W} ${H}`, width: '100%', height: H, id: 'timeline' }, kids));
}

// ---- Runbooks ---------------------------------------------------------------

async function runbooksView() {
  const l = await api('/api/runbooks');
  mount(h('h1', {}, 'Runbooks'),
    h('p', { class: 'muted' }, l.directory, l.commit ? ' at commit ' + l.commit.slice(0, 12) : ' (not a git checkout)'),
    l.skipped.map((x) => h('div', { class: 'note' }, 'Skipped: ' + x)),
    h('table', { id: 'runbooks' }, h('thead', {}, h('tr', {}, ['File', 'Name', 'State', 'Objectives', 'Targets', 'Restores', 'Steps'].map((t) => h('th', {}, t)))),
      h('tbody', {}, l.runbooks.map((r) => h('tr', { class: 'click', onclick: () => { location.hash = '#/runbooks/' + encodeURIComponent(r.file); } },
        h('td', { class: 'mono' }, r.file), h('td', {}, r.name || '–', h('div', { class: 'small muted' }, r.description || '')),
        h('td', {}, r.valid ? badge('valid', 'ok') : badge(r.problems + ' problem(s)', 'bad'), r.commit && r.commit.endsWith('-dirty') ? [' ', badge('uncommitted', 'warning')] : ''),
        h('td', {}, 'RTO ' + secs(r.rto_objective_secs) + ' · RPO ' + secs(r.rpo_objective_secs)),
        h('td', {}, r.targets.join(', ')), h('td', {}, r.sources.join(', ')), h('td', { class: 'num' }, r.steps))))));
}

// The DAG, left to right by waves.
function dag(graph) {
  const NW = 170, NH = 40, GX = 60, GY = 16, pad = 10;
  const cols = [];
  for (const st of graph) (cols[st.wave] = cols[st.wave] || []).push(st);
  const pos = {};
  cols.forEach((col, c) => col.forEach((st, r) => { pos[st.id] = { x: pad + c * (NW + GX), y: pad + r * (NH + GY) }; }));
  const W = pad * 2 + cols.length * (NW + GX) - GX;
  const H = pad * 2 + Math.max(...cols.map((c) => c.length)) * (NH + GY) - GY;
  const edges = [], nodes = [];
  for (const st of graph) {
    for (const n of st.needs) {
      const a = pos[n], b = pos[st.id];
      if (!a) continue;
      const x0 = a.x + NW, y0 = a.y + NH / 2, x1 = b.x, y1 = b.y + NH / 2, m = (x0 + x1) / 2;
      edges.push(s('path', { d: `M${x0} ${y0} C${m} ${y0} ${m} ${y1} ${x1} ${y1}`, fill: 'none', stroke: '#9aa5b1', 'stroke-width': 1.5, 'marker-end': 'url(#arrow)' }));
    }
    const p = pos[st.id];
    const fill = st.approval ? '#fef3e0' : st.check ? '#e8f0fe' : '#fff';
    const stroke = st.approval ? '#d68a00' : st.check ? '#1a73e8' : '#1f4e79';
    nodes.push(s('g', { class: 'node', 'data-step': st.id, transform: `translate(${p.x},${p.y})` },
      s('rect', { width: NW, height: NH, rx: 5, fill, stroke, 'stroke-width': 1.2 }),
      s('text', { x: 8, y: 16, 'font-size': 12, 'font-weight': 600, fill: '#1d232b' }, clip(st.id + (st.for_each ? ' [each]' : ''), 24)),
      s('text', { x: 8, y: 31, 'font-size': 11, fill: '#5f6b7a' }, clip(st.uses + ' @ ' + st.target, 28)),
      s('title', {}, `${st.id}: ${st.uses} on ${st.target} (line ${st.line})`)));
  }
  const defs = s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto' },
    s('path', { d: 'M0 0 L10 5 L0 10 z', fill: '#9aa5b1' })));
  return h('div', { class: 'scroll', tabindex: 0, role: 'region', 'aria-label': 'Steps and their dependencies' }, s('svg', { id: 'dag', width: W, height: H, viewBox: `0 0 ${W} ${H}` }, defs, edges, nodes));
}
const clip = (t, n) => (t.length > n ? t.slice(0, n - 1) + '…' : t);

async function runbookView(file) {
  const r = await api('/api/runbooks/' + encodeURIComponent(file));
  const sum = r.summary;
  const bad = new Set(r.diagnostics.map((d) => d.line));
  const code = h('div', { class: 'code mono', id: 'runbook-text', tabindex: 0, role: 'region', 'aria-label': 'The runbook' }, r.text.split('\n').map((line, i) =>
    h('div', { id: 'L' + (i + 1), class: bad.has(i + 1) ? 'bad' : null }, line || ' ')));
  const planOut = h('div', { id: 'plan' });
  const target = h('select', { id: 'target' }, sum.targets.map((t) => h('option', { value: t }, t)));
  const params = r.params.map((p) => ({ p, input: h('input', { 'data-param': p.name, placeholder: p.default === null || p.default === undefined ? '(required)' : String(p.default) }) }));
  const given = () => Object.fromEntries(params.filter((x) => x.input.value !== '').map((x) => [x.p.name, x.input.value]));
  const out = h('div');
  const preview = async () => {
    put(planOut, h('p', { class: 'muted' }, 'Planning…'));
    try {
      const pl = await api('/api/plan', { method: 'POST', body: { runbook: r.text, file: sum.file, params: given(), target: target.value || null } });
      put(planOut, planView(pl));
    } catch (e) { put(planOut, errorBox(e)); }
  };
  const start = async (mode) => {
    if (mode === 'run' && !confirm(`Start a ${mode} of ${sum.name}? A run keeps what it builds (a failover).`)) return;
    try {
      const run = await api('/api/runs', { method: 'POST', body: { path: sum.file, mode, params: given(), target: target.value || null } });
      location.hash = '#/runs/' + run.id;
    } catch (e) { put(out, errorBox(e)); }
  };
  mount(h('h1', {}, h('a', { href: '#/runbooks' }, 'Runbooks'), ' / ', sum.name || sum.file),
    h('p', {}, h('span', { class: 'mono' }, sum.file), sum.commit ? ' · commit ' + sum.commit.slice(0, 12) + (sum.commit.endsWith('-dirty') ? ' (uncommitted changes)' : '') : '',
      ' · RTO objective ', secs(sum.rto_objective_secs), ' · RPO objective ', secs(sum.rpo_objective_secs)),
    sum.description ? h('p', { class: 'muted' }, sum.description) : null,
    r.diagnostics.length ? h('div', { class: 'panel', id: 'diagnostics' }, h('h2', {}, r.diagnostics.length + ' problem(s)'),
      r.diagnostics.map((d) => h('div', { class: 'error' }, h('a', { href: '#/runbooks/' + encodeURIComponent(file), onclick: (e) => { e.preventDefault(); document.getElementById('L' + d.line)?.scrollIntoView({ block: 'center' }); } },
        'line ' + d.line + ':' + d.column), ' ', d.message, d.hint ? h('div', { class: 'small' }, 'hint: ' + d.hint) : null))) : null,
    r.graph.length ? h('div', { class: 'panel' }, h('h2', {}, 'Steps'), dag(r.graph),
      h('div', { class: 'small muted' }, 'Columns are waves: a step starts when the steps to its left that it needs are done. Amber: approval gates; blue: checks.')) : null,
    sum.valid ? h('div', { class: 'panel' }, h('h2', {}, 'Plan and start'),
      h('div', { class: 'row' }, h('label', {}, 'Target', target), params.map((x) => h('label', {}, x.p.name + ' (' + x.p.type + ')', x.input))),
      h('div', { class: 'row', style: 'margin-top:10px' },
        h('button', { onclick: preview, id: 'preview' }, 'Preview plan'),
        can('operator') ? [h('button', { class: 'primary', id: 'start-drill', onclick: () => start('drill') }, 'Start drill'),
          h('button', { class: 'danger', id: 'start-run', onclick: () => start('run') }, 'Start run (failover)')] :
          h('span', { class: 'muted small' }, 'Operators start drills and runs.')),
      out, planOut) : null,
    h('h2', {}, 'Text'), code);
}

function planView(pl) {
  const f = pl.forecast;
  return h('div', {},
    h('div', { class: 'tiles' }, tile(secs(f.predicted_rto_secs), 'predicted RTO' + (f.rto_objective_secs ? ' (objective ' + secs(f.rto_objective_secs) + ')' : '')),
      tile(money(f.drill_cost), 'drill cost'), tile(money(f.standby_month_cost), 'standby per month'), tile(money(f.running_hourly_cost), 'per hour when running'),
      tile(pl.waves.length, 'waves')),
    h('table', {}, h('thead', {}, h('tr', {}, ['Step', 'Action', 'Target', 'Predicted', 'From', 'Basis'].map((t) => h('th', {}, t)))),
      h('tbody', {}, f.steps.map((st) => h('tr', {}, h('td', {}, st.id), h('td', {}, st.uses), h('td', {}, st.target + ' (' + st.target_type + ')'),
        h('td', { class: 'num' }, secs(st.predicted_secs)), h('td', { class: 'num' }, secs(st.start_secs)), h('td', { class: 'small muted' }, typeof st.basis === 'string' ? st.basis : JSON.stringify(st.basis)))))),
    f.notes.map((n) => h('div', { class: 'small muted' }, n)));
}

// ---- Runs -------------------------------------------------------------------

async function runsView() {
  const render = async () => {
    const runs = await api('/api/runs');
    mount(h('h1', {}, 'Runs'),
      runs.length === 0 ? h('div', { class: 'note' }, 'No runs yet. Start a drill from a runbook.') :
        h('table', { id: 'runs' }, h('thead', {}, h('tr', {}, ['Run', 'Runbook', 'Mode', 'Status', 'Target', 'Started', 'Took'].map((t) => h('th', {}, t)))),
          h('tbody', {}, runs.map((r) => h('tr', { class: 'click', onclick: () => { location.hash = '#/runs/' + r.id; } },
            h('td', { class: 'mono' }, r.id), h('td', {}, r.runbook), h('td', {}, r.mode), h('td', {}, badge(r.status)), h('td', {}, r.target || 'default'),
            h('td', {}, when(r.created_ms)), h('td', { class: 'num' }, r.finished_ms ? secs((r.finished_ms - r.created_ms) / 1000) : '…'))))));
  };
  await render();
  every(5000, () => load(render));
}

const STEP_COLORS = { succeeded: '#1e8e3e', failed: '#c5221f', running: '#1a73e8', waiting: '#d68a00', skipped: '#9aa5b1', cancelled: '#9aa5b1', pending: '#dde2e8' };

// The run's timeline: one row per step, bars from start to end (to now while running).
function gantt(report, elapsed) {
  const rows = report.steps, RH = 22, L = 190, W = 1000, pad = 6;
  const end = Math.max(elapsed, ...rows.map((r) => r.end_secs || r.start_secs || 0), 1);
  const x = (t) => L + (W - L - 10) * (t / end);
  const kids = [];
  for (let k = 0; k <= 4; k++) {
    const t = end * k / 4;
    kids.push(s('line', { x1: x(t), y1: 0, x2: x(t), y2: rows.length * RH + pad, stroke: '#eef1f4' }),
      s('text', { x: x(t), y: rows.length * RH + pad + 12, 'font-size': 10, fill: '#5f6b7a', 'text-anchor': k === 4 ? 'end' : 'middle' }, secs(t)));
  }
  rows.forEach((r, i) => {
    const y = pad + i * RH;
    kids.push(s('text', { x: 4, y: y + 14, 'font-size': 12, fill: r.critical ? '#1d232b' : '#5f6b7a', 'font-weight': r.critical ? 600 : 400 }, clip(r.id, 26)));
    if (r.start_secs !== null && r.start_secs !== undefined) {
      const stop = r.end_secs ?? (r.status === 'running' || r.status === 'waiting' ? elapsed : r.start_secs);
      kids.push(s('rect', { x: x(r.start_secs), y: y + 3, width: Math.max(x(stop) - x(r.start_secs), 2), height: RH - 7, rx: 3,
        fill: STEP_COLORS[r.status] || '#9aa5b1', class: 'bar', 'data-step': r.id, 'data-status': r.status },
      s('title', {}, `${r.id}: ${r.status}, ${secs(r.start_secs)} to ${r.end_secs !== null && r.end_secs !== undefined ? secs(r.end_secs) : 'now'}${r.error ? ' — ' + r.error : ''}`)));
    }
  });
  return s('svg', { id: 'gantt', viewBox: `0 0 ${W} ${rows.length * RH + pad + 18}`, width: '100%' }, kids);
}

// One event of the run's log applied to the report on the page, as the
// server's report reads it, so the page moves the moment the event arrives;
// a fetch of the report shortly after settles whatever this cannot know
// (the critical path, RTO, retries that are still pending).
function applyEvent(r, entry, t0) {
  const e = entry.event, at = (entry.at_ms - t0) / 1000;
  const st = e.step ? r.steps.find((x) => x.id === e.step) : null;
  if (e.type === 'run_finished') { r.status = e.status; return; }
  if (!st) return;
  switch (e.type) {
    case 'step_started':
      Object.assign(st, { status: 'running', start_secs: at + (e.delay_ms || 0) / 1000, end_secs: null, attempts: e.attempt, error: null }); break;
    case 'approval_requested': Object.assign(st, { status: 'waiting', start_secs: at, end_secs: null }); break;
    case 'step_succeeded': case 'approved': Object.assign(st, { status: 'succeeded', end_secs: at }); break;
    case 'step_failed': Object.assign(st, { status: 'failed', end_secs: at, error: e.error }); break;
    case 'step_skipped': Object.assign(st, { status: 'skipped' }); break;
    case 'undo_succeeded': st.undo = 'undone'; break;
    case 'undo_failed': st.undo = 'undo_failed'; break;
    default:
  }
}

async function runView(id) {
  const box = h('div');
  const log = h('div', { class: 'log mono small', id: 'events' });
  // `ahead`: events received that the report on hand may not hold yet; they
  // are applied again to each report fetched without them.
  let report = null, started = Date.now(), timer = null, source = null, frame = 0, ahead = [];
  const act = async (path, body) => {
    try { await api('/api/runs/' + id + '/' + path, { method: 'POST', body }); refresh(); } catch (e) { box.prepend(errorBox(e)); }
  };
  const render = () => {
    const r = report, running = r.status === 'running';
    const elapsed = running ? (Date.now() - started) / 1000 : Math.max(...r.steps.map((x) => x.end_secs || 0), 0);
    const waiting = r.steps.filter((x) => x.status === 'waiting');
    put(box,
      h('h1', {}, h('a', { href: '#/runs' }, 'Runs'), ' / ', r.run),
      h('p', {}, h('strong', {}, r.runbook), ' · ', r.mode, ' · ', badge(r.status), ' · started ', when(r.started),
        r.finished ? [' · finished ', when(r.finished)] : '', r.git_commit ? ' · commit ' + r.git_commit.slice(0, 12) : ''),
      can('operator') ? h('div', { class: 'row', id: 'actions' },
        waiting.map((w) => h('button', { class: 'primary', 'data-approve': w.id, onclick: () => act('approve', { step: w.id }) }, 'Approve ' + w.id)),
        running ? h('button', { id: 'cancel', onclick: () => confirm('Cancel this run? Running steps stop; a drill still tears down.') && act('cancel') }, 'Cancel') : null,
        r.mode === 'run' && r.status !== 'rolled_back' && !running ? h('button', { class: 'danger', id: 'rollback', onclick: () => confirm('Roll back: remove everything this run built?') && act('rollback') }, 'Roll back') : null) : null,
      h('div', { class: 'tiles' },
        tile(r.rto_secs !== null && r.rto_secs !== undefined ? secs(r.rto_secs) : (running ? secs(elapsed) + '…' : '–'), 'RTO' + (r.rto_objective_secs ? ' (objective ' + secs(r.rto_objective_secs) + ')' : ''), r.rto_met === false ? 'bad' : r.rto_met ? 'ok' : null),
        tile(r.points.length ? secs(Math.max(...r.points.map((p) => p.rpo_secs))) : '–', 'RPO (oldest point restored)', r.points.some((p) => p.met === false) ? 'bad' : null),
        tile(r.checks_passed + ' / ' + (r.checks_passed + r.checks_failed), 'checks passed', r.checks_failed ? 'bad' : null),
        r.forecast ? tile(secs(r.forecast.predicted_rto_secs), 'predicted RTO') : null,
        r.teardown_secs !== null && r.teardown_secs !== undefined ? tile(secs(r.teardown_secs), 'teardown') : null),
      h('div', { class: 'panel' }, h('h2', {}, 'Timeline'), gantt(r, elapsed),
        h('div', { class: 'small muted' }, 'Bold: the critical path that set the RTO.')),
      r.left_behind.length ? h('div', { class: 'error' }, 'Left behind: ' + r.left_behind.join(', ')) : null,
      r.points.length ? h('div', { class: 'panel' }, h('h2', {}, 'Recovery points'), h('table', {},
        h('thead', {}, h('tr', {}, ['Step', 'Source', 'Point', 'Taken', 'RPO', 'Objective'].map((t) => h('th', {}, t)))),
        h('tbody', {}, r.points.map((p) => h('tr', {}, h('td', {}, p.step), h('td', {}, p.source), h('td', { class: 'mono' }, short(p.point)), h('td', {}, when(p.point_time)),
          h('td', { class: 'num' }, secs(p.rpo_secs)), h('td', {}, p.objective_secs ? [secs(p.objective_secs), ' ', badge(p.met ? 'met' : 'missed', p.met ? 'ok' : 'bad')] : '–')))))) : null,
      h('div', { class: 'panel' }, h('h2', {}, 'Steps'), h('table', { id: 'steps' },
        h('thead', {}, h('tr', {}, ['Step', 'Action', 'Status', 'Tries', 'Took', 'Error'].map((t) => h('th', {}, t)))),
        h('tbody', {}, r.steps.map((x) => h('tr', { 'data-step': x.id }, h('td', {}, x.id), h('td', {}, x.uses), h('td', {}, badge(x.status), x.undo ? [' ', badge(x.undo, 'unknown')] : ''),
          h('td', { class: 'num' }, x.attempts), h('td', { class: 'num' }, secs(x.duration_secs)), h('td', { class: 'small' }, x.error || '')))))),
      running ? null : h('p', {}, 'Export the report: ', h('a', { href: '/api/runs/' + id + '/report?format=html', target: '_blank', rel: 'noopener' }, 'HTML'), ' · ',
        h('a', { href: '/api/runs/' + id + '/report?format=junit', target: '_blank', rel: 'noopener' }, 'JUnit XML'), ' · ',
        h('a', { href: '/api/runs/' + id + '/report', target: '_blank', rel: 'noopener' }, 'JSON')),
      h('h2', {}, 'Events'), log);
  };
  const refresh = async () => {
    timer = null;
    try {
      const r = await api('/api/runs/' + encodeURIComponent(id));
      started = Date.parse(r.started) || started;
      ahead = ahead.filter((entry) => entry.seq > r.last_seq);
      for (const entry of ahead) applyEvent(r, entry, started);
      report = r;
      render();
    } catch (e) { if (!(e instanceof ApiError && e.status === 401)) put(box, errorBox(e)); }
  };
  const soon = () => { if (!timer) timer = setTimeout(refresh, 250); };
  await refresh();
  mount(box);
  if (!report) return;
  // Live: every event of the run, as it is written, moves the page at once;
  // the server's report follows a moment later (a burst costs one fetch).
  source = new EventSource('/api/runs/' + encodeURIComponent(id) + '/stream');
  const onEvent = (ev) => {
    let entry;
    try { entry = JSON.parse(ev.data); } catch (_) { return; }
    const e = entry.event, who = e.by ? ' by ' + e.by : '';
    log.prepend(h('div', {}, whenText(entry.at_ms).slice(11) + '.' + String(entry.at_ms % 1000).padStart(3, '0') + '  ' + e.type + (e.step ? ' ' + e.step : '') + who + (e.error ? ': ' + e.error : '') + (e.status ? ' ' + e.status : '')));
    while (log.childNodes.length > 500) log.lastChild.remove();
    if (report && entry.seq > (ahead.length ? ahead[ahead.length - 1].seq : report.last_seq)) {
      ahead.push(entry);
      applyEvent(report, entry, started);
      // One redraw per frame, however many events a burst brings.
      if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
    }
    soon();
    if (e.type === 'run_finished') setTimeout(refresh, 400);
  };
  for (const t of EVENT_TYPES) source.addEventListener(t, onEvent);
  source.onerror = () => { if (report && report.status !== 'running') source.close(); };
  every(1000, () => { if (report && report.status === 'running') render(); });
  disposers.push(() => { source.close(); if (timer) clearTimeout(timer); if (frame) cancelAnimationFrame(frame); });
}

// ---- Drill history ----------------------------------------------------------

function chart(id, title, pts, objective) {
  const W = 1000, H = 220, L = 60, B = 30, T = 14;
  if (!pts.length) return h('p', { class: 'muted' }, 'No drill measured yet.');
  const t0 = Math.min(...pts.map((p) => p.t)), t1 = Math.max(...pts.map((p) => p.t)), span = Math.max(t1 - t0, 1);
  const ymax = Math.max(objective || 0, ...pts.map((p) => p.v)) * 1.15 || 1;
  const x = (t) => L + (W - L - 20) * (pts.length === 1 ? 0.5 : (t - t0) / span);
  const y = (v) => T + (H - T - B) * (1 - v / ymax);
  const kids = [s('line', { x1: L, y1: y(0), x2: W - 10, y2: y(0), stroke: '#dde2e8' })];
  for (let k = 0; k <= 4; k++) {
    const v = ymax * k / 4;
    kids.push(s('text', { x: L - 6, y: y(v) + 4, 'font-size': 10, fill: '#5f6b7a', 'text-anchor': 'end' }, secs(v)));
  }
  if (objective) {
    kids.push(s('line', { x1: L, y1: y(objective), x2: W - 10, y2: y(objective), stroke: '#c5221f', 'stroke-dasharray': '5 4' }),
      s('text', { x: W - 12, y: y(objective) - 4, 'font-size': 10, fill: '#c5221f', 'text-anchor': 'end' }, 'objective ' + secs(objective)));
  }
  const sorted = [...pts].sort((a, b) => a.t - b.t);
  kids.push(s('polyline', { points: sorted.map((p) => x(p.t) + ',' + y(p.v)).join(' '), fill: 'none', stroke: '#1f4e79', 'stroke-width': 1.5 }));
  for (const p of sorted) {
    kids.push(s('circle', { cx: x(p.t), cy: y(p.v), r: 4, fill: p.ok ? '#1e8e3e' : '#c5221f', class: 'drill-point', style: 'cursor:pointer', tabindex: -1, onclick: () => { location.hash = '#/runs/' + p.run; } },
      s('title', {}, `${p.run}: ${secs(p.v)}`)));
  }
  kids.push(s('text', { x: L, y: H - 8, 'font-size': 10, fill: '#5f6b7a' }, whenText(t0)), s('text', { x: W - 10, y: H - 8, 'font-size': 10, fill: '#5f6b7a', 'text-anchor': 'end' }, whenText(t1)));
  return h('div', { class: 'panel' }, h('h2', {}, title), s('svg', { id, viewBox: `0 0 ${W} ${H}`, width: '100%' }, kids));
}

async function drillsView() {
  const drills = await api('/api/drills');
  const books = [...new Set(drills.map((d) => d.runbook))].sort();
  const pick = h('select', { id: 'drill-runbook' }, books.map((b) => h('option', { value: b }, b)));
  const body = h('div');
  const render = () => {
    const ds = drills.filter((d) => d.runbook === pick.value);
    const rto = ds.filter((d) => d.rto_secs !== null && d.rto_secs !== undefined).map((d) => ({ t: d.created_ms, v: d.rto_secs, ok: d.status === 'succeeded' && d.rto_met !== false, run: d.run }));
    const rpo = ds.filter((d) => d.rpo_secs !== null && d.rpo_secs !== undefined).map((d) => ({ t: d.created_ms, v: d.rpo_secs, ok: d.rpo_met !== false, run: d.run }));
    const objRto = ds.map((d) => d.rto_objective_secs).find((v) => v);
    const objRpo = ds.map((d) => d.rpo_objective_secs).find((v) => v);
    put(body, chart('rto-chart', 'RTO per drill', rto, objRto), chart('rpo-chart', 'RPO per drill (oldest point restored)', rpo, objRpo),
      h('table', { id: 'drills' }, h('thead', {}, h('tr', {}, ['Drill', 'Started', 'Status', 'RTO', 'RPO', 'Checks', 'Report'].map((t) => h('th', {}, t)))),
        h('tbody', {}, ds.map((d) => h('tr', {}, h('td', { class: 'mono' }, h('a', { href: '#/runs/' + d.run }, d.run)), h('td', {}, when(d.created_ms)), h('td', {}, badge(d.status)),
          h('td', { class: 'num' }, secs(d.rto_secs), d.rto_met === false ? [' ', badge('missed', 'bad')] : ''),
          h('td', { class: 'num' }, secs(d.rpo_secs), d.rpo_met === false ? [' ', badge('missed', 'bad')] : ''),
          h('td', { class: 'num' }, d.checks_passed + ' / ' + (d.checks_passed + d.checks_failed)),
          h('td', {}, h('a', { href: '/api/runs/' + d.run + '/report?format=html', target: '_blank', rel: 'noopener' }, 'HTML'), ' · ',
            h('a', { href: '/api/runs/' + d.run + '/report?format=junit', target: '_blank', rel: 'noopener' }, 'JUnit')))))));
  };
  pick.addEventListener('change', render);
  mount(h('h1', {}, 'Drill history'), books.length ? h('div', { class: 'row' }, h('label', {}, 'Runbook', pick)) : h('div', { class: 'note' }, 'No finished drill yet.'), body);
  if (books.length) render();
}

// ---- Repository -------------------------------------------------------------

async function repositoryView() {
  const r = await api('/api/repository');
  const c = r.coverage;
  const pct = (a, b) => (b ? (100 * a / b).toFixed(1) + '%' : '–');
  const last = r.checks[0];
  mount(h('h1', {}, 'Repository'), h('p', { class: 'muted mono' }, r.location),
    h('div', { class: 'tiles' }, tile(bytes(r.stored_bytes), 'stored'), tile(bytes(r.logical_bytes), 'logical (all points)'),
      tile(r.reduction ? r.reduction.toFixed(1) + '×' : '–', 'reduction (dedup and compression)'), tile(bytes(r.unique_bytes), 'unique data'),
      tile(money(r.monthly_storage_cost), 'per month (' + r.storage_class + ')'), tile(r.points + ' / ' + r.sources, 'points / sources')),
    h('div', { class: 'panel', id: 'coverage' }, h('h2', {}, 'Verification coverage'),
      h('p', {}, c.points_verified + ' of ' + c.points_total + ' points (' + pct(c.points_verified, c.points_total) + '), ' + bytes(c.bytes_verified) + ' of ' + bytes(c.bytes_total) +
        ' (' + pct(c.bytes_verified, c.bytes_total) + ') proved restorable by drills; the newest point of ' + c.sources_latest_verified + ' of ' + r.sources + ' sources.'),
      h('div', { style: 'height:10px;background:#eceff1;border-radius:5px;overflow:hidden' },
        h('div', { style: `height:10px;width:${c.bytes_total ? 100 * c.bytes_verified / c.bytes_total : 0}%;background:#1e8e3e` })),
      h('p', { class: 'small muted' }, c.newest_verification_ms ? ['Newest verification ', when(c.newest_verification_ms)] : 'No drill has verified a point yet.')),
    h('div', { class: 'panel', id: 'checks' }, h('h2', {}, 'Checks'),
      last ? h('p', {}, 'Last check ', when(last.at_ms), ': ', badge(last.ok ? 'no damage' : 'damage found', last.ok ? 'ok' : 'bad'), last.read_data ? ' (every byte read)' : ' (structure only; `ferry check --read-data` reads every byte)') :
        h('p', { class: 'muted' }, 'No check recorded. Run `ferry check` (and `--read-data` now and then).'),
      r.checks.length ? h('table', {}, h('thead', {}, h('tr', {}, ['When', 'Result', 'Data read', 'Points', 'Packs', 'Problems', 'Damaged points'].map((t) => h('th', {}, t)))),
        h('tbody', {}, r.checks.map((k) => h('tr', {}, h('td', {}, when(k.at_ms)), h('td', {}, badge(k.ok ? 'ok' : 'damage', k.ok ? 'ok' : 'bad')),
          h('td', {}, k.read_data ? bytes(k.bytes_read) : 'structure only'), h('td', { class: 'num' }, k.points), h('td', { class: 'num' }, k.packs),
          h('td', { class: 'num' }, k.problems), h('td', { class: 'num' }, k.damaged_points))))) : null),
    r.unreadable.length ? h('div', { class: 'error' }, 'Unreadable points:\n' + r.unreadable.join('\n')) : null,
    h('p', { class: 'small muted' }, 'Statistics read ', when(r.stats_time), ' (kept a minute).'));
}

// ---- Users and audit ---------------------------------------------------------

// ---- Schedules ----------------------------------------------------------------

const jobText = (j) => j.drill ? 'drill ' + j.drill.path + (j.drill.target ? ' on ' + j.drill.target : '') : 'check' + (j.check && j.check.read_data ? ' (every byte)' : '');

// What a firing started: a run links to it.
function outcome(o) {
  if (!o) return '–';
  const m = /^run (\S+)$/.exec(o);
  return m ? h('a', { href: '#/runs/' + encodeURIComponent(m[1]) }, 'run ' + m[1]) : o;
}

async function schedulesView() {
  const [list, books] = await Promise.all([api('/api/schedules'), can('operator') ? api('/api/runbooks').catch(() => null) : null]);
  const out = h('div');
  const run = async (f) => { try { await f(); await load(schedulesView); } catch (e) { put(out, errorBox(e)); } };
  const form = () => {
    const name = h('input', { id: 'new-schedule', placeholder: 'weekly-drill' });
    const cron = h('input', { id: 'new-cron', placeholder: '0 3 * * 0', class: 'mono' });
    // Only runbooks that validate can drill.
    const files = books && books.runbooks ? books.runbooks.filter((b) => b.valid).map((b) => b.file) : [];
    const what = h('select', { id: 'new-job' }, files.map((f) => h('option', { value: 'drill:' + f }, 'drill ' + f)),
      h('option', { value: 'check' }, 'check the repository'), h('option', { value: 'check-data' }, 'check, reading every byte'));
    const job = () => what.value.startsWith('drill:') ? { drill: { path: what.value.slice(6) } } : { check: { read_data: what.value === 'check-data' } };
    return h('div', { class: 'panel' }, h('h2', {}, 'Add a schedule'),
      h('div', { class: 'row' }, h('label', {}, 'Name', name), h('label', {}, 'When (cron, UTC)', cron), h('label', {}, 'What', what),
        h('button', { class: 'primary', id: 'add-schedule', onclick: () => run(() => api('/api/schedules', { method: 'POST', body: { name: name.value, cron: cron.value, job: job() } })) }, 'Add')),
      h('p', { class: 'small muted' }, 'Five fields in UTC: minute hour day-of-month month day-of-week. "0 3 * * 0" is 03:00 every Sunday. The server starts each firing once, with nobody watching; drills tear down after themselves.'));
  };
  mount(h('h1', {}, 'Schedules'), out,
    list.length ? h('table', { id: 'schedules' }, h('thead', {}, h('tr', {}, ['Schedule', 'When (UTC)', 'What', 'Next', 'Last fired', 'Last outcome', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, list.map((x) => h('tr', { 'data-schedule': x.name }, h('td', {}, x.name), h('td', { class: 'mono' }, x.cron), h('td', {}, jobText(x.job)),
        h('td', {}, when(x.next_ms)), h('td', {}, x.last_fired_ms ? when(x.last_fired_ms) : 'never'), h('td', { class: 'small' }, outcome(x.last_outcome)),
        h('td', {}, can('operator') ? h('button', { 'aria-label': 'Remove ' + x.name, onclick: () => confirm('Remove the schedule ' + x.name + '?') && run(() => api('/api/schedules/' + encodeURIComponent(x.name), { method: 'DELETE' })) }, 'Remove') : ''))))) :
      h('p', { class: 'muted' }, 'No schedules. Drills and checks can run on a schedule, with nobody watching.'),
    can('operator') ? form() : null);
}

// ---- Agents -------------------------------------------------------------------

// An agent's health in a word: revoked, silent (three intervals unheard), failing or ok.
function agentHealth(a) {
  if (a.revoked_ms) return badge('revoked', 'unknown');
  if (a.silent) return badge('silent', 'bad');
  if (!a.last_seen_ms) return badge('not heard from yet', 'unknown');
  if (a.status && a.status.last_error) return badge('failing', 'bad');
  return badge('ok', 'ok');
}

async function agentsView() {
  const list = await api('/api/agents');
  const out = h('div');
  const run = async (f) => { try { await f(); } catch (e) { put(out, errorBox(e)); } };
  const form = () => {
    const source = h('input', { id: 'enroll-source', placeholder: 'host name' });
    const device = h('input', { id: 'enroll-device', class: 'mono', placeholder: '/dev/vdb (every disk)' });
    const interval = h('input', { id: 'enroll-interval', type: 'number', min: '1', placeholder: '60' });
    const expires = h('select', { id: 'enroll-expires' }, ['1h', '1d', '7d'].map((e) => h('option', { value: e }, e)));
    const create = () => run(async () => {
      const policy = {};
      if (source.value) policy.source = source.value;
      if (device.value) policy.devices = [device.value];
      if (interval.value) policy.interval_secs = Number(interval.value);
      const t = await api('/api/agent-tokens', { method: 'POST', body: { expires: expires.value, policy } });
      put(out, h('div', { class: 'note', id: 'enroll-token' }, 'Shown once; it enrolls one machine until ', when(t.expires_ms), ':',
        h('pre', { class: 'mono' }, 'ferry-agent enroll --server ' + location.origin + ' --token ' + t.token)));
    });
    return h('div', { class: 'panel' }, h('h2', {}, 'Enroll a machine'),
      h('div', { class: 'row' }, h('label', {}, 'Source', source), h('label', {}, 'Device', device), h('label', {}, 'Every (s)', interval),
        h('label', {}, 'Token valid for', expires), h('button', { class: 'primary', id: 'create-enroll-token', onclick: create }, 'Make a token')),
      h('p', { class: 'small muted' }, 'The agent keeps the repository password on its machine; the server never sends it a secret.'));
  };
  const devices = (a) => (a.status && a.status.devices.length ? a.status.devices : a.policy.devices.map((p) => ({ path: p })))
    .map((d) => h('div', { class: 'small' }, h('span', { class: 'mono' }, d.path), d.mode ? [' ', badge(d.mode), ' ', h('span', { class: 'muted' }, d.mode_reason)] : ''));
  const group = (a) => {
    if (!a.policy.group) return '–';
    const c = a.status && a.status.group_cut;
    const last = c ? (c.arrived.length === c.members.length ? 'cut with all ' + c.members.length + ', skew ' + Math.round(c.skew_ms) + ' ms'
      : 'last cut INCOMPLETE: ' + c.arrived.length + ' of ' + c.members.length) : (a.status && a.status.group_error) || 'no cut yet';
    return h('div', {}, h('span', { class: 'mono' }, a.policy.group), h('div', { class: 'small muted' }, last));
  };
  mount(h('h1', {}, 'Agents'), out,
    list.length ? h('div', { class: 'scroll', tabindex: '0', role: 'region', 'aria-label': 'Agents' }, h('table', { id: 'agents' },
      h('thead', {}, h('tr', {}, ['Agent', 'Host', 'Source', 'Devices', 'Group', 'Every', 'Last seen', 'Lag', 'Health', 'Last error', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, list.map((a) => h('tr', { 'data-agent': a.id }, h('td', { class: 'mono' }, a.id), h('td', {}, a.hostname),
        h('td', {}, h('a', { href: '#/sources/' + encodeURIComponent(a.policy.source) }, a.policy.source)), h('td', {}, devices(a)), h('td', {}, group(a)),
        h('td', { class: 'num' }, a.policy.interval_secs + ' s'), h('td', {}, a.last_seen_ms ? when(a.last_seen_ms) : 'never'),
        h('td', { class: 'num' }, a.status && a.status.lag_secs != null ? secs(a.status.lag_secs) : '–'), h('td', {}, agentHealth(a)),
        h('td', { class: 'small' }, (a.status && (a.status.last_error || a.status.hook_error)) || ''),
        h('td', {}, can('operator') && !a.revoked_ms ? h('button', { 'aria-label': 'Revoke ' + a.id, onclick: () => confirm('Revoke agent ' + a.id + ' on ' + a.hostname + '? It stops at its next poll.') && run(async () => { await api('/api/agents/' + encodeURIComponent(a.id), { method: 'DELETE' }); await load(agentsView); }) }, 'Revoke') : '')))))) :
      h('p', { class: 'muted' }, 'No agents. Machines no hypervisor can read from outside run ferry-agent, enrolled with a one-time token.'),
    can('operator') ? form() : null);
}

async function usersView() {
  const [users, tokens] = await Promise.all([api('/api/users'), api('/api/tokens')]);
  const out = h('div');
  const run = async (f) => { try { await f(); await load(usersView); } catch (e) { put(out, errorBox(e)); } };
  const name = h('input', { id: 'new-user', placeholder: 'name' });
  const role = h('select', { id: 'new-role' }, ['viewer', 'operator', 'admin'].map((r) => h('option', { value: r }, r)));
  const pw = h('input', { id: 'new-password', type: 'password', autocomplete: 'new-password', placeholder: 'at least 12 characters' });
  mount(h('h1', {}, 'Users'), out,
    h('table', { id: 'users' }, h('thead', {}, h('tr', {}, ['User', 'Role', 'Created', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, users.map((u) => {
        const sel = h('select', { 'data-user': u.name, 'aria-label': 'Role of ' + u.name, onchange: () => run(() => api('/api/users/' + encodeURIComponent(u.name) + '/role', { method: 'PUT', body: { role: sel.value } })) },
          ['viewer', 'operator', 'admin'].map((r) => h('option', { value: r, selected: r === u.role }, r)));
        return h('tr', {}, h('td', {}, u.name), h('td', {}, sel), h('td', {}, when(u.created_ms)),
          h('td', {}, h('button', { onclick: () => confirm('Remove ' + u.name + '? Their sessions and tokens end now.') && run(() => api('/api/users/' + encodeURIComponent(u.name), { method: 'DELETE' })) }, 'Remove')));
      }))),
    h('div', { class: 'panel' }, h('h2', {}, 'Add a user'), h('div', { class: 'row' }, h('label', {}, 'Name', name), h('label', {}, 'Role', role), h('label', {}, 'Password', pw),
      h('button', { class: 'primary', id: 'add-user', onclick: () => run(() => api('/api/users', { method: 'POST', body: { name: name.value, role: role.value, password: pw.value } })) }, 'Add'))),
    h('h2', {}, 'API tokens'),
    tokens.length ? h('table', { id: 'tokens' }, h('thead', {}, h('tr', {}, ['Token', 'User', 'Label', 'Expires', 'Last used', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, tokens.map((t) => h('tr', {}, h('td', { class: 'mono' }, t.id), h('td', {}, t.user), h('td', {}, t.label), h('td', {}, t.expires_ms ? when(t.expires_ms) : 'never'),
        h('td', {}, t.last_used_ms ? when(t.last_used_ms) : 'never'),
        h('td', {}, h('button', { onclick: () => run(() => api('/api/tokens/' + encodeURIComponent(t.id), { method: 'DELETE' })) }, 'Revoke')))))) :
      h('p', { class: 'muted' }, 'No API tokens. `ferry token create --user NAME` makes one.'));
}

async function auditView() {
  const entries = await api('/api/audit?limit=500');
  mount(h('h1', {}, 'Audit log'),
    h('table', { id: 'audit' }, h('thead', {}, h('tr', {}, ['When', 'Who', 'What', 'On', 'Detail'].map((t) => h('th', {}, t)))),
      h('tbody', {}, entries.map((a) => h('tr', {}, h('td', {}, when(a.at_ms)), h('td', {}, a.actor), h('td', { class: 'mono' }, a.action), h('td', {}, a.subject), h('td', { class: 'small' }, a.detail))))));
}

// ---- Routing ------------------------------------------------------------------

const ROUTES = [
  [/^#?\/?$/, dashboard],
  [/^#\/sources\/(.+)$/, sourceView],
  [/^#\/runbooks$/, runbooksView],
  [/^#\/runbooks\/(.+)$/, runbookView],
  [/^#\/runs$/, runsView],
  [/^#\/runs\/(.+)$/, runView],
  [/^#\/drills$/, drillsView],
  [/^#\/schedules$/, schedulesView],
  [/^#\/agents$/, agentsView],
  [/^#\/repository$/, repositoryView],
  [/^#\/users$/, usersView],
  [/^#\/audit$/, auditView],
];

async function route() {
  for (const d of disposers) d();
  disposers = [];
  if (!session.me) {
    try {
      session.me = await api('/api/me');
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) mount(errorBox(e));
      return;
    }
  }
  shell();
  const hash = location.hash || '#/';
  for (const [re, view] of ROUTES) {
    const m = hash.match(re);
    if (m) {
      mount(h('p', { class: 'muted' }, 'Loading…'));
      await load(() => view(...m.slice(1).map(decodeURIComponent)));
      document.body.dataset.view = view.name;
      return;
    }
  }
  mount(h('div', { class: 'error' }, 'No such page: ' + hash));
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', route);
