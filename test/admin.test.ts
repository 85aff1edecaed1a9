// The admin plane with real processes: `serve` and `replay` with --admin on 127.0.0.1:0. After writes through
// NBD, /status and /metrics of both report the volume, journal, replica and throughput figures those writes
// imply; a SIGKILLed replayer shows as a disconnected replica whose lag grows; other paths are 404, other
// methods 405; `blockferry status` prints a table or the JSON and exits 0 / 2 / 1.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { converges, until } from './helpers/files.js';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { CLI, freePort, runStatus, startReplay, startServe } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
const JOURNAL_MAX = 256 * 2 ** 20;
const WRITE = 64 * 1024;
/** Stored size of a journal entry: its 40-byte header plus the data (src/journal/entry.ts VALUE_HEADER). */
const ENTRY_HEADER = 40;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

function adminUrl(stdout: string): string {
  const m = /admin on (http:\/\/127\.0\.0\.1:(\d+))/.exec(stdout);
  if (!m) throw new Error(`no "admin on" line in:\n${stdout}`);
  return m[1];
}

/** One raw HTTP request (no URL normalisation, any method). */
function request(url: string, method = 'GET'): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request({ host: u.hostname, port: u.port, path: url.slice(u.origin.length) || '/', method, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function getStatus(base: string): Promise<Json> {
  const r = await request(`${base}/status`);
  if (r.status !== 200) throw new Error(`/status answered ${r.status}: ${r.body}`);
  return JSON.parse(r.body);
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    await sleep(200);
  }
  throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
}

/** `blockferry ARGS`, resolving with its exit code and output whatever the code. */
const cli = (args: string[]) => runStatus(process.execPath, [CLI, ...args]);

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** A strict reader of the Prometheus text format (0.0.4): throws on any line it cannot account for. */
function parsePrometheus(text: string): Sample[] {
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*';
  for (const line of text.split('\n')) {
    if (line === '') continue;
    let m = new RegExp(`^# (HELP|TYPE) (${NAME}) (.*)$`).exec(line);
    if (m) {
      if (m[1] === 'TYPE') {
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3])) throw new Error(`bad TYPE line: ${line}`);
        types.set(m[2], m[3]);
      }
      continue;
    }
    m = new RegExp(`^(${NAME})(?:\\{(.*)\\})? (\\S+)(?: \\d+)?$`).exec(line);
    if (!m) throw new Error(`not a Prometheus sample line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    if (m[2]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/gy;
      let l: RegExpExecArray | null;
      let at = 0;
      while ((l = re.exec(m[2]))) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
        at = re.lastIndex;
      }
      if (at !== m[2].length) throw new Error(`bad labels in ${JSON.stringify(line)}`);
    }
    const value = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : Number(m[3]);
    if (Number.isNaN(value) && m[3] !== 'NaN') throw new Error(`bad value in ${JSON.stringify(line)}`);
    const family = [m[1], m[1].replace(/_(bucket|sum|count|total|created)$/, '')].find((n) => types.has(n));
    if (!family) throw new Error(`sample ${m[1]} has no # TYPE line before it`);
    samples.push({ name: m[1], labels, value });
  }
  return samples;
}

function metric(samples: Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  return samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
}

t.test('serve and replay admin: /status, /metrics, 404/405, and blockferry status', async (t) => {
  const dir = t.testdir();
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'replicas'), '--admin', '127.0.0.1:0'], t.teardown);
  const serve = await startServe(
    ['--image', `disk=${path.join(dir, 'disk.img')}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--journal-max', String(JOURNAL_MAX), '--replicate-to', replay.url, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const S = adminUrl(serve.stdout());
  const R = adminUrl(replay.stdout());

  // 40 writes of 64 KiB through NBD, then a FLUSH.
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: serve.port, exportName: 'disk' });
  t.teardown(() => c.destroy());
  await Promise.all(Array.from({ length: 40 }, (_, i) => c.write(i * WRITE, Buffer.alloc(WRITE, i + 1))));
  await c.flush();

  const s = await waitFor('the replica to catch up', async () => {
    const st = await getStatus(S);
    const r = st.volumes[0]?.replicas[0];
    return r?.state === 'continuous' && r.ackedSeq === st.volumes[0].journal.committedSeq && r.ackedSeq >= 41 ? st : undefined;
  });
  t.equal(s.role, 'serve');
  t.equal(s.pid, serve.child.pid, 'pid is the serve process');
  t.same(s.attention, [], 'nothing needs attention');
  t.equal(s.volumes.length, 1);
  const v = s.volumes[0];
  t.equal(v.volume, 'disk');
  t.equal(v.size, SIZE);
  t.equal(v.journal.headSeq, 41, '40 writes and one FLUSH marker journaled');
  t.equal(v.journal.maxBytes, JOURNAL_MAX, 'journal cap is --journal-max');
  t.type(v.journal.entries, 'number');
  t.type(v.journal.bytes, 'number');
  t.type(v.journal.ackedSeq, 'number');
  t.equal(v.writes.ops, 40, 'write throughput counts the 40 writes (FLUSH is not a change)');
  t.equal(v.writes.bytes, 40 * WRITE, 'and their bytes');
  t.ok(v.writes.bytesPerSecond > 0, 'a write rate is shown right after writing');
  t.equal(s.writes.bytes, 40 * WRITE, 'total throughput over all volumes');
  t.equal(v.replicas.length, 1);
  const r = v.replicas[0];
  t.equal(r.url, replay.url);
  t.equal(r.state, 'continuous');
  t.equal(r.ackedSeq, 41);
  t.equal(r.lagEntries, 0);
  t.equal(r.lagBytes, 0);
  t.equal(r.lagSeconds, 0);

  const rs = await getStatus(R);
  t.equal(rs.role, 'replay');
  t.equal(rs.pid, replay.child.pid);
  t.same(rs.attention, []);
  t.equal(rs.volumes.length, 1);
  t.match(rs.volumes[0], { volume: 'disk', size: SIZE, connected: true, primary: '127.0.0.1', consistent: true, volumeId: v.volumeId });
  t.equal(rs.volumes[0].appliedSeq, 41, 'the replayer applied what the primary journaled');
  // The primary counts a replica caught up on its durable acks: the replica's durable seq is there too.
  t.equal(rs.volumes[0].durableSeq, 41, 'and has it on stable storage');
  t.equal(rs.volumes[0].promoted, null, 'not promoted');
  t.ok(rs.volumes[0].lastApplyAt > Date.now() - 60_000 && rs.volumes[0].lastApplyAt <= Date.now(), 'lastApplyAt is recent');

  // /metrics: valid Prometheus text, gauges set from the same status.
  const m = await request(`${S}/metrics`);
  t.equal(m.status, 200);
  t.match(m.headers['content-type'], /^text\/plain; version=0\.0\.4/);
  const ms = parsePrometheus(m.body);
  const rl = { volume: 'disk', replica: replay.url };
  t.equal(metric(ms, 'blockferry_replica_lag_seconds', rl), 0);
  t.equal(metric(ms, 'blockferry_replica_lag_entries', rl), 0);
  t.equal(metric(ms, 'blockferry_replica_lag_bytes', rl), 0);
  t.equal(metric(ms, 'blockferry_replica_acked_seq', rl), 41);
  t.equal(metric(ms, 'blockferry_replica_state', { ...rl, state: 'continuous' }), 1);
  t.equal(metric(ms, 'blockferry_replica_state', { ...rl, state: 'disconnected' }), 0);
  t.equal(metric(ms, 'blockferry_journal_head_seq', { volume: 'disk' }), 41);
  t.equal(metric(ms, 'blockferry_journal_max_bytes', { volume: 'disk' }), JOURNAL_MAX);
  t.type(metric(ms, 'blockferry_journal_bytes', { volume: 'disk' }), 'number');
  t.type(metric(ms, 'blockferry_journal_entries', { volume: 'disk' }), 'number');
  t.equal(metric(ms, 'blockferry_write_bytes_total', { volume: 'disk' }), 40 * WRITE);
  t.equal(metric(ms, 'blockferry_write_ops_total', { volume: 'disk' }), 40);
  t.equal(metric(ms, 'blockferry_attention'), 0);
  t.ok(ms.some((x) => x.name === 'blockferry_process_resident_memory_bytes'), 'process metrics are there too');
  const rm = parsePrometheus((await request(`${R}/metrics`)).body);
  t.equal(metric(rm, 'blockferry_replay_applied_seq', { volume: 'disk' }), 41);
  t.equal(metric(rm, 'blockferry_replay_durable_seq', { volume: 'disk' }), 41);
  t.equal(metric(rm, 'blockferry_replay_connected', { volume: 'disk' }), 1);
  t.equal(metric(rm, 'blockferry_volume_size_bytes', { volume: 'disk' }), SIZE);

  // Only GET/HEAD, only known paths; nothing outside the fixed asset list.
  for (const p of ['/nope', '/status/x', '/assets/', '/assets/../package.json', '/assets/%2e%2e/package.json', '/admin/page/app.js']) {
    t.equal((await request(`${S}${p}`)).status, 404, `GET ${p} is 404`);
  }
  // A target starting '//' (or '/\\') is a path, not another host's URL: no status for '//x/status', no 500 for '//['.
  for (const p of ['//x/status', '/\\x/status', '//[', '/\\[', '//']) {
    const res = await request(`${S}${p}`);
    t.equal(res.status, 404, `GET ${p} is 404`);
  }
  t.equal((await request(`${S}/%zz`)).status, 404, 'GET /%zz is 404');
  // The absolute form (RFC 9112 3.2.2), as a proxy sends it: served.
  const absolute = await new Promise<number>((resolve, reject) => {
    const u = new URL(S);
    http.request({ host: u.hostname, port: u.port, path: `${S}/status`, agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    }).on('error', reject).end();
  });
  t.equal(absolute, 200, 'GET http://HOST:PORT/status (absolute form) is 200');
  for (const [method, p] of [['POST', '/status'], ['PUT', '/metrics'], ['DELETE', '/'], ['PATCH', '/status'], ['POST', '/nope']]) {
    const res = await request(`${S}${p}`, method);
    t.equal(res.status, 405, `${method} ${p} is 405`);
    t.equal(res.headers.allow, 'GET, HEAD');
  }
  const head = await request(`${S}/status`, 'HEAD');
  t.equal(head.status, 200, 'HEAD /status is allowed');
  t.equal(head.body, '', 'HEAD has no body');
  const page = await request(`${S}/`);
  t.equal(page.status, 200);
  t.match(page.headers['content-type'], /^text\/html/);
  t.match(page.body, /assets\/app\.js/);
  t.match(page.body, /assets\/uPlot\.iife\.min\.js/);
  t.notMatch(page.body, /https?:\/\/(?!127\.)/, 'the page loads nothing from elsewhere (no CDN)');
  const uplot = await request(`${S}/assets/uPlot.iife.min.js`);
  t.equal(uplot.status, 200, 'uPlot is served from the package');
  t.match(uplot.headers['content-type'], /javascript/);
  t.match(uplot.body, /uPlot/);
  for (const a of ['/assets/app.js', '/assets/style.css', '/assets/uPlot.min.css']) t.equal((await request(`${S}${a}`)).status, 200, `${a} is served`);
  t.equal((await request(`${R}/`)).status, 200, 'the replayer serves the page too');

  // blockferry status: a table, the JSON, exit 0 when all is continuous.
  const human = await cli(['status', '--admin', S.replace('http://', '')]);
  t.equal(human.code, 0, `status exits 0 when healthy (${human.stderr})`);
  t.match(human.stdout, /VOLUME\s+REPLICA\s+STATE\s+LAG ENTRIES\s+LAG BYTES\s+LAG SECONDS\s+JOURNAL USED \/ CAP/);
  t.match(human.stdout, new RegExp(`disk\\s+${replay.url.replace(/[.]/g, '\\.')}\\s+continuous\\s+0\\s+0 B\\s+0\\.0\\s+\\S+ \\S+ / 256\\.0 MiB`));
  t.match(human.stdout, /nothing needs attention/);
  const json = await cli(['status', '--admin', S, '--json']);
  // The URL of the JSON itself, as copied from a browser, works too.
  const direct = await cli(['status', '--admin', `${S}/status`, '--json']);
  t.equal(direct.code, 0, `status --admin http://HOST:PORT/status exits 0 (${direct.stderr})`);
  t.equal(JSON.parse(direct.stdout).pid, serve.child.pid, 'and reads that /status');
  t.equal(json.code, 0);
  t.equal(JSON.parse(json.stdout).volumes[0].replicas[0].state, 'continuous', '--json prints the /status JSON');
  const replayHuman = await cli(['status', '--admin', R]);
  t.equal(replayHuman.code, 0);
  t.match(replayHuman.stdout, /disk\s+connected\s+yes\s+41\s+41\s+127\.0\.0\.1/);

  // The replayer dies: the replica shows as disconnected and its lag grows with new writes.
  replay.child.kill('SIGKILL');
  await replay.exited;
  await Promise.all(Array.from({ length: 10 }, (_, i) => c.write(i * WRITE, Buffer.alloc(WRITE, 0xee))));
  await c.flush();
  const d = await waitFor('the replica to show as disconnected with 11 entries of lag', async () => {
    const st = await getStatus(S);
    const x = st.volumes[0].replicas[0];
    return x.state === 'disconnected' && x.lagEntries === 11 ? st : undefined;
  }, 10_000);
  const dr = d.volumes[0].replicas[0];
  t.equal(dr.ackedSeq, 41, 'acked seq stays where the replica stopped');
  t.equal(dr.lagBytes, 10 * (WRITE + ENTRY_HEADER) + ENTRY_HEADER, 'lag bytes: ten 64 KiB writes and a FLUSH marker, with entry headers');
  t.ok(dr.lagSeconds > 0, 'lag seconds grow from the oldest unshipped write');
  t.equal(d.attention.length, 1);
  t.match(d.attention[0], /volume disk: replica .* is disconnected/);
  await sleep(1200);
  t.ok((await getStatus(S)).volumes[0].replicas[0].lagSeconds >= dr.lagSeconds + 1, 'and keep growing while nothing is shipped');
  const dm = parsePrometheus((await request(`${S}/metrics`)).body);
  t.equal(metric(dm, 'blockferry_replica_state', { ...rl, state: 'disconnected' }), 1);
  t.equal(metric(dm, 'blockferry_replica_lag_entries', rl), 11);
  t.equal(metric(dm, 'blockferry_attention'), 1);

  const bad = await cli(['status', '--admin', S]);
  t.equal(bad.code, 2, 'status exits 2 when a replica needs attention');
  t.match(bad.stdout, /disk\s+\S+\s+disconnected\s+11\s+640\.\d+ KiB/);
  t.match(bad.stdout, /needs attention:\n\s+- volume disk: replica .* is disconnected/);
  const badJson = await cli(['status', '--admin', S, '--json']);
  t.equal(badJson.code, 2, '--json exits 2 as well');
  t.equal(JSON.parse(badJson.stdout).volumes[0].replicas[0].state, 'disconnected');

  const gone = await cli(['status', '--admin', R]);
  t.equal(gone.code, 1, 'status exits 1 when the admin port does not answer');
  t.match(gone.stderr, /cannot read http:\/\/127\.0\.0\.1:\d+\/status: ECONNREFUSED/);
  t.equal(gone.stdout, '');

  await c.close();
  t.equal(await serve.stop(), 0, 'serve with --admin stops cleanly on SIGTERM');
});

t.test('blockferry status --help documents the exit codes with examples; a bad --admin is a usage error', async (t) => {
  const help = await cli(['status', '--help']);
  t.equal(help.code, 0);
  t.match(help.stdout, /--admin/);
  t.match(help.stdout, /--json/);
  t.match(help.stdout, /Exit status: 0 .* 2 .* 1 error/s);
  t.match(help.stdout, /Examples:/);
  const usage = await cli(['status', '--admin', 'not an address']);
  t.equal(usage.code, 2);
  t.match(usage.stderr, /--admin: "not an address" is not HOST:PORT/);
  const serveHelp = await cli(['serve', '--help']);
  t.match(serveHelp.stdout, /--admin/, 'serve documents --admin');
  const replayHelp = await cli(['replay', '--help']);
  t.match(replayHelp.stdout, /--admin/, 'replay documents --admin');
});

t.test('a restarted replayer lists the replicas in its data directory before any primary returns', async (t) => {
  const dir = t.testdir();
  const data = path.join(dir, 'replicas');
  const image = path.join(dir, 'a.img');
  const port = await freePort();
  const first = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', data], t.teardown);
  const s = await startServe(['--image', `a=${image}`, '--size', '8M', '--listen', '127.0.0.1:0', '--replicate-to', first.url], t.teardown);
  const c = await NbdTestClient.connect({ host: '127.0.0.1', port: s.port, exportName: 'a' });
  await c.write(0, Buffer.alloc(WRITE, 7));
  await c.flush();
  await c.close();
  t.ok(await converges(image, path.join(data, 'a.img')), 'volume a is replicated');
  t.equal(await s.stop(), 0, 'its primary stops');
  first.child.kill('SIGTERM');
  t.equal(await first.exited, 0, 'the replayer stops');
  // Two more volumes there: one whose state file is garbage, one whose image is gone.
  fs.writeFileSync(path.join(data, 'bad.state.mdb'), Buffer.alloc(64 * 1024, 0x5a));
  fs.copyFileSync(path.join(data, 'a.state.mdb'), path.join(data, 'gone.state.mdb'));
  // And an empty one (a crash before a new volume's first state was written): nothing to list, and no crash
  // (LMDB's read-only open of an empty file ended the process with SIGSEGV).
  fs.writeFileSync(path.join(data, 'empty.state.mdb'), '');

  const again = await startReplay(['--listen', `127.0.0.1:${port}`, '--data-dir', data, '--admin', '127.0.0.1:0'], t.teardown);
  const admin = adminUrl(again.stdout());
  const st: Json = await (await fetch(`${admin}/status`)).json();
  const a = st.volumes.find((v: Json) => v.volume === 'a');
  t.same(st.volumes.map((v: Json) => v.volume), ['a', 'bad', 'gone'], '/status lists every replica in the directory');
  t.match(a, { connected: false, consistent: true, size: 8 * 2 ** 20, promoted: null }, 'a as its state recorded it, not connected');
  t.ok(a.appliedSeq > 0 && a.durableSeq === a.appliedSeq, `at the seq it had applied (${a.appliedSeq})`);
  t.match(st.volumes.find((v: Json) => v.volume === 'bad').problem, /its state file could not be read: .*bad\.state\.mdb is not an LMDB file/, 'the garbage state is reported, not hidden');
  t.match(st.volumes.find((v: Json) => v.volume === 'gone').problem, /its image .*gone\.img is missing/, 'so is a missing image');
  const table = await runStatus(process.execPath, [CLI, 'status', '--admin', admin]);
  t.equal(table.code, 2, 'blockferry status: needs attention (exit 2), not "all well"');
  t.match(table.stdout, /volume a: no primary is connected \(replica at seq \d+\)/, 'naming the replica without its primary');

  const back = await startServe(['--image', `a=${image}`, '--listen', '127.0.0.1:0', '--replicate-to', again.url], t.teardown);
  const connected = async () => ((await (await fetch(`${admin}/status`)).json()) as Json).volumes.find((v: Json) => v.volume === 'a').connected;
  t.ok(await until(connected, 10_000, 100), 'a shows connected once its primary is back');
  const after = await runStatus(process.execPath, [CLI, 'status', '--admin', admin]);
  t.notMatch(after.stdout, /volume a:/, `and nothing about a needs attention then\n${after.stdout}`);
  t.equal(await back.stop(), 0);
});

t.test("a first copy is initial-sync on the primary until the replayer has it consistent, never continuous or backlog before", async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'disk.img');
  // 24 MiB of data that is not in the journal (written before serve): the first copy must compare and send it.
  fs.writeFileSync(image, randomBytes(24 * 2 ** 20));
  const r = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'replicas'), '--admin', '127.0.0.1:0'], t.teardown);
  const s = await startServe(['--image', `disk=${image}`, '--listen', '127.0.0.1:0', '--replicate-to', r.url, '--max-rate', '4MB/s', '--admin', '127.0.0.1:0'], t.teardown);
  const primaryAdmin = adminUrl(s.stdout());
  const replayAdmin = adminUrl(r.stdout());
  const seen = new Set<string>();
  const wrong: string[] = [];
  const deadline = Date.now() + 60_000;
  let done = false;
  while (!done && Date.now() < deadline) {
    // The primary first: once the replayer says consistent it stays so, so a primary state read before it that
    // says the copy is done must find the replayer consistent.
    const p: Json = await (await fetch(`${primaryAdmin}/status`)).json();
    const rep: Json = await (await fetch(`${replayAdmin}/status`)).json();
    const state = p.volumes[0].replicas[0].state as string;
    const consistent = rep.volumes[0]?.consistent === true;
    seen.add(state);
    if ((state === 'continuous' || state === 'backlog') && !consistent) wrong.push(`${state} at ${p.volumes[0].replicas[0].ackedSeq} while the replayer says inconsistent`);
    done = state === 'continuous' && consistent;
    await sleep(100);
  }
  t.ok(done, 'the copy ends: continuous, and consistent at the replayer');
  t.ok(seen.has('initial-sync'), `initial-sync was seen (${[...seen].join(', ')})`);
  t.same(wrong, [], 'never continuous or backlog while the replica is inconsistent');
  t.equal(await s.stop(), 0);
});
