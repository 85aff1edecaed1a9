// The status page's script: polls `status` (the same JSON as GET /status) once a second and draws it. Builds
// every element with textContent (volume names, URLs and errors are never parsed as HTML). Plain browser JS,
// served as is: no build step, no framework; the chart is uPlot, served from this package.
'use strict';

const POLL_MS = 1000;
/** A poll that takes longer than this counts as failed (the process may be stuck or gone). */
const POLL_TIMEOUT_MS = 3000;
/** How much history the chart keeps: "the last minutes". */
const HISTORY_SECONDS = 600;
const PALETTE = ['#0969da', '#bf3989', '#1a7f37', '#8250df', '#bc4c00', '#0a7ea4', '#6e7781'];

/** Replica link states (DESIGN.md): continuous needs nothing; these are on their way back; the rest are not. */
const STATE_LOOK = {
  continuous: { tone: 'ok', mark: '✓', hint: 'shipping as fast as writes arrive' },
  backlog: { tone: 'warn', mark: '⚠', hint: 'connected, lag is growing' },
  resync: { tone: 'warn', mark: '⚠', hint: 'comparing chunks; replica not yet consistent' },
  'initial-sync': { tone: 'warn', mark: '⚠', hint: 'first copy under way' },
  connecting: { tone: 'warn', mark: '⚠', hint: 'link not established yet' },
  disconnected: { tone: 'bad', mark: '✕', hint: 'not receiving: lag grows with every write' },
  'needs-resync': { tone: 'bad', mark: '✕', hint: 'the journal no longer has what it needs; shipping stopped' },
  'split-brain': { tone: 'bad', mark: '✕', hint: 'the replica was promoted to a primary: both sides may have writes; demote one (README: failover)' },
  bitmap: { tone: 'bad', mark: '✕', hint: 'away too long: tracking dirty regions' },
};

const $ = (id) => document.getElementById(id);

/** el('td', {class: 'num'}, 'text', child, ...): attributes set as attributes, children as text or nodes. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : String(v));
  for (const c of children.flat()) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '?';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${Math.round(v)} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

function fmtInt(n) {
  return Math.round(n).toLocaleString('en-US');
}

function fmtSeconds(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function fmtClock(ms) {
  return new Date(ms).toLocaleTimeString('en-GB', { hour12: false });
}

function badge(tone, mark, word, hint) {
  return el('span', { class: `badge ${tone}`, 'data-state': word, title: hint }, `${mark} ${word}`);
}

function stateBadge(state) {
  const look = STATE_LOOK[state] || { tone: 'bad', mark: '✕', hint: 'unknown state' };
  return [badge(look.tone, look.mark, state, look.hint), el('span', { class: 'hint' }, look.hint)];
}

function fact(label, ...value) {
  return el('div', {}, el('dt', {}, label), el('dd', {}, ...value));
}

function journalFact(j) {
  if (!j) return fact('Journal', 'none (served without a journal)');
  const pct = j.maxBytes > 0 ? (100 * j.bytes) / j.maxBytes : 0;
  const tone = pct >= 90 ? 'bad' : pct >= 75 ? 'warn' : '';
  const bar = el('div', { class: `bar ${tone}`, role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': pct.toFixed(0), 'aria-label': 'journal used' });
  bar.append(el('span', { style: `width:${Math.min(100, pct).toFixed(2)}%` }));
  return fact(
    'Journal used / cap',
    el('span', { 'data-field': 'journal' }, `${fmtBytes(j.bytes)} of ${fmtBytes(j.maxBytes)} (${pct.toFixed(pct < 10 ? 1 : 0)}%)`),
    bar,
    el('span', { class: 'hint' }, `${fmtInt(j.entries)} entries · head seq ${fmtInt(j.headSeq)} · retained after seq ${fmtInt(j.ackedSeq)}`),
  );
}

function throughputText(w) {
  return w ? `${fmtBytes(w.bytesPerSecond)}/s · ${fmtInt(w.opsPerSecond)} ops/s` : 'not measured';
}

function renderServeVolume(v) {
  const rows = v.replicas.map((r) => {
    const attention = r.state !== 'continuous';
    const state = stateBadge(r.state);
    if (r.resync) state.push(el('span', { class: 'hint' }, `${r.resync.percent}% compared, ${fmtBytes(r.resync.sentBytes)} sent`));
    return el(
      'tr',
      { 'data-replica': r.url, class: attention ? 'attention' : undefined },
      el('td', { class: 'url' }, r.url),
      el('td', { 'data-field': 'state' }, ...state, attention ? el('span', { class: 'hint' }, 'needs attention') : null),
      el('td', { class: 'num', 'data-field': 'lagEntries' }, fmtInt(r.lagEntries)),
      el('td', { class: 'num', 'data-field': 'lagBytes' }, fmtBytes(r.lagBytes)),
      el('td', { class: 'num', 'data-field': 'lagSeconds' }, fmtSeconds(r.lagSeconds)),
      el('td', { class: 'num' }, fmtInt(r.ackedSeq)),
      el('td', { class: 'error' }, r.lastError || ''),
    );
  });
  const anyAttention = v.replicas.some((r) => r.state !== 'continuous');
  const replicas =
    rows.length === 0
      ? el('p', { class: 'note' }, 'No replica: this volume is not replicated (serve without --replicate-to).')
      : el(
          'table',
          { class: 'replicas' },
          el('thead', {}, el('tr', {}, el('th', {}, 'Replica'), el('th', {}, 'State'), el('th', { class: 'num' }, 'Lag entries'), el('th', { class: 'num' }, 'Lag bytes'), el('th', { class: 'num' }, 'Lag seconds (RPO)'), el('th', { class: 'num' }, 'Acked seq'), el('th', {}, 'Last error'))),
          el('tbody', {}, rows),
        );
  return el(
    'article',
    { class: `volume${anyAttention ? ' attention' : ''}`, 'data-volume': v.volume },
    el('h2', {}, v.volume, el('small', {}, `${fmtBytes(v.size)} · ${v.image}`)),
    el('dl', { class: 'facts' }, fact('Write throughput', el('span', { 'data-field': 'writes' }, throughputText(v.writes))), journalFact(v.journal)),
    replicas,
  );
}

function renderReplayVolume(v, now, rate) {
  const attention = !!v.problem || (!v.promoted && (!v.connected || !v.consistent));
  const state = v.promoted
    ? badge('ok', '✓', 'promoted', `made a primary at ${v.promoted}: it takes no more replication`)
    : v.connected
      ? badge('ok', '✓', 'connected', 'a primary is shipping to this replica')
      : badge('bad', '✕', 'disconnected', 'no primary connected: the replica is not receiving');
  const consistency = v.consistent ? badge('ok', '✓', 'consistent', 'a consistent earlier state of the primary') : badge('warn', '⚠', 'inconsistent', 'resync under way');
  return el(
    'article',
    { class: `volume${attention ? ' attention' : ''}`, 'data-volume': v.volume },
    el('h2', {}, v.volume, el('small', {}, fmtBytes(v.size))),
    el(
      'dl',
      { class: 'facts' },
      fact('Link', el('span', { 'data-field': 'state' }, state), attention ? el('span', { class: 'hint' }, 'needs attention') : null),
      fact('Replica', consistency),
      fact('Applied seq', el('span', { 'data-field': 'appliedSeq' }, fmtInt(v.appliedSeq)), el('span', { class: 'hint' }, rate === null ? '' : `${fmtInt(rate)} entries/s`)),
      fact('Durable seq', el('span', { 'data-field': 'durableSeq' }, fmtInt(v.durableSeq)), el('span', { class: 'hint' }, 'where a crash would leave it')),
      fact('Primary', el('span', { class: 'url' }, v.primary || '—')),
      fact('Last apply', v.lastApplyAt ? `${fmtSeconds(Math.max(0, (now - v.lastApplyAt) / 1000))} ago` : 'not since start'),
      v.problem ? fact('Problem', el('span', { 'data-field': 'problem' }, v.problem)) : null,
    ),
  );
}

// ---- chart: one series per replica (serve: lag seconds) or per volume (replay: entries applied per second)

const history = { t: [], series: new Map() };
let plot = null;
let plotKeys = '';

function record(t, values) {
  history.t.push(t);
  for (const [key, arr] of history.series) arr.push(values.has(key) ? values.get(key) : null);
  for (const [key, v] of values) {
    if (!history.series.has(key)) history.series.set(key, [...new Array(history.t.length - 1).fill(null), v]);
  }
  while (history.t.length > 0 && history.t[0] < t - HISTORY_SECONDS) {
    history.t.shift();
    for (const arr of history.series.values()) arr.shift();
  }
}

function drawChart(unit) {
  const section = $('chart-section');
  if (history.series.size === 0 || typeof uPlot === 'undefined') {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  const keys = [...history.series.keys()];
  const data = [history.t, ...keys.map((k) => history.series.get(k))];
  const width = Math.max(300, $('chart').clientWidth || section.clientWidth - 32);
  if (!plot || plotKeys !== keys.join('\n')) {
    plot?.destroy();
    plotKeys = keys.join('\n');
    plot = new uPlot(
      {
        width,
        height: 260,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
        legend: { live: false },
        // Whole seconds and up on the time axis (uPlot would otherwise tick every 200 ms in the first seconds).
        axes: [{ incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600], values: (u, splits) => splits.map((s) => fmtClock(s * 1000)), space: 70 }, { label: unit, size: 60 }],
        series: [{}, ...keys.map((k, i) => ({ label: k, stroke: PALETTE[i % PALETTE.length], width: 2, value: (u, v) => (v === null ? '—' : v.toFixed(2)) }))],
      },
      data,
      $('chart'),
    );
  } else {
    if (plot.width !== width) plot.setSize({ width, height: 260 });
    plot.setData(data);
  }
}

// ---- polling

let lastOk = 0;
let previous = null;

function renderHealth(s) {
  const box = $('health');
  box.replaceChildren();
  const noReplicas = s.role === 'serve' && s.volumes.every((v) => v.replicas.length === 0);
  if (s.attention.length === 0) {
    box.className = noReplicas ? 'banner' : 'banner ok';
    box.append(noReplicas ? 'No replicas configured: nothing is protected off-site.' : s.role === 'serve' ? '✓ All replicas continuous' : '✓ Every replica volume is receiving from its primary');
    return;
  }
  box.className = 'banner bad';
  box.append(el('strong', {}, `⚠ Needs attention (${s.attention.length})`), el('ul', {}, s.attention.map((a) => el('li', {}, a))));
}

function render(s) {
  document.body.classList.remove('stale');
  $('unreachable').hidden = true;
  $('role').textContent = s.role === 'serve' ? 'serve (primary)' : 'replay (backup site)';
  const up = fmtSeconds((s.now - s.startedAt) / 1000);
  const writes = s.role === 'serve' ? ` · writes ${throughputText(s.writes)}` : '';
  $('meta').textContent = `pid ${s.pid} · ${s.version} · up ${up}${writes} · updated ${fmtClock(s.now)}`;
  document.title = `${s.attention.length ? '⚠ ' : ''}blockferry ${s.role}`;
  renderHealth(s);
  const t = s.now / 1000;
  const values = new Map();
  let nodes;
  if (s.role === 'serve') {
    nodes = s.volumes.map(renderServeVolume);
    for (const v of s.volumes) for (const r of v.replicas) values.set(`${v.volume} → ${r.url}`, r.lagSeconds);
    $('chart-title').textContent = 'Replication lag (RPO), seconds';
    $('chart-note').textContent = `Age of the oldest write each replica lacks, over the last ${HISTORY_SECONDS / 60} minutes (recorded by this page while open).`;
  } else {
    nodes = s.volumes.map((v) => {
      const before = previous?.volumes.find((p) => p.volume === v.volume);
      const dt = previous ? (s.now - previous.now) / 1000 : 0;
      const rate = before && dt > 0 ? Math.max(0, (v.appliedSeq - before.appliedSeq) / dt) : null;
      if (rate !== null) values.set(v.volume, rate);
      return renderReplayVolume(v, s.now, rate);
    });
    if (nodes.length === 0) nodes = [el('p', { class: 'note' }, 'No replica in the data directory yet: no primary has connected to this replayer.')];
    $('chart-title').textContent = 'Entries applied per second';
    $('chart-note').textContent = `Per replica volume, over the last ${HISTORY_SECONDS / 60} minutes (recorded by this page while open).`;
  }
  $('volumes').replaceChildren(...nodes);
  record(t, values);
  drawChart(s.role === 'serve' ? 'seconds' : 'entries/s');
  previous = s;
}

function unreachable(err) {
  document.body.classList.add('stale');
  const box = $('unreachable');
  box.hidden = false;
  const since = lastOk ? `since ${fmtClock(lastOk)}` : 'yet';
  box.textContent = `✕ Cannot reach this process's admin server ${since} (${err.message || err}). What is shown below is the last status received.`;
}

async function poll() {
  try {
    const res = await fetch('status', { cache: 'no-store', signal: AbortSignal.timeout(POLL_TIMEOUT_MS) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const s = await res.json();
    lastOk = Date.now();
    render(s);
  } catch (err) {
    unreachable(err);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

window.addEventListener('resize', () => plot && plot.setSize({ width: Math.max(300, $('chart').clientWidth), height: 260 }));
poll();
