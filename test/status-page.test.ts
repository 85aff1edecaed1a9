// The status page in a real browser: Debian's chromium, driven by playwright-core, opens the admin page of a
// running serve + replay pair, finds the volume, its replica's state and lag figures, and after the replayer
// is SIGKILLed sees the replica shown as disconnected (and the page asking for attention) within seconds.
// It saves a screenshot to tmp/status-page.png; with BLOCKFERRY_UPDATE_SCREENSHOT=1 also to
// docs/status-page.png, the picture in the README (kept out of ordinary runs so tests leave the tree clean).
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type Browser } from 'playwright-core';
import { NbdTestClient } from './helpers/nbd-test-client.js';
import { ROOT, startReplay, startServe } from './helpers/processes.js';

const SIZE = 64 * 2 ** 20;
const WRITE = 64 * 1024;
/** The page polls every second; a disconnect must show within this. */
const SHOWS_WITHIN_MS = 5_000;
const CHROMIUM = '/usr/bin/chromium';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function adminUrl(stdout: string): string {
  const m = /admin on (http:\/\/127\.0\.0\.1:\d+)/.exec(stdout);
  if (!m) throw new Error(`no "admin on" line in:\n${stdout}`);
  return m[1];
}

t.test('the status page shows volume, state and lag, and a killed replayer as disconnected', async (t) => {
  t.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is installed (scripts/install-test-deps.sh installs it)`);
  // A short path of its own, so the volume's image path reads well in the screenshot.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockferry-page-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'replicas'), '--admin', '127.0.0.1:0'], t.teardown);
  const serve = await startServe(
    ['--image', `disk=${path.join(dir, 'disk.img')}`, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--replicate-to', replay.url, '--admin', '127.0.0.1:0'],
    t.teardown,
  );
  const S = adminUrl(serve.stdout());
  const client = await NbdTestClient.connect({ host: '127.0.0.1', port: serve.port, exportName: 'disk' });
  t.teardown(() => client.destroy());
  const writeSome = async (n: number, fill: number) => {
    await Promise.all(Array.from({ length: n }, (_, i) => client.write(i * WRITE, Buffer.alloc(WRITE, fill))));
    await client.flush();
  };
  await writeSome(20, 1);

  const browser: Browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-background-networking'],
  });
  t.teardown(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') pageErrors.push(m.text());
  });
  // Only the admin server may be asked for anything: no CDN, no outside fonts.
  const foreign: string[] = [];
  page.on('request', (r) => {
    if (!r.url().startsWith(S) && !r.url().startsWith('data:')) foreign.push(r.url());
  });
  await page.goto(`${S}/`);

  const volume = page.locator('[data-volume="disk"]');
  const row = volume.locator(`tr[data-replica="${replay.url}"]`);
  await row.locator('[data-state="continuous"]').waitFor({ timeout: 10_000 });
  t.match(await volume.locator('h2').innerText(), /^disk/, 'the volume is named');
  t.equal(await row.locator('[data-state]').innerText(), '✓ continuous', 'the state is shown in words, with a mark');
  t.match(await row.locator('[data-field="lagSeconds"]').innerText(), /^\d+\.\d s$/, 'a lag figure in seconds is shown');
  t.equal(await row.locator('[data-field="lagEntries"]').innerText(), '0', 'lag in entries');
  t.equal(await row.locator('[data-field="lagBytes"]').innerText(), '0 B', 'lag in bytes');
  t.match(await volume.locator('[data-field="journal"]').innerText(), /of 8\.00 GiB/, 'journal size against its cap');
  t.match(await volume.locator('[data-field="writes"]').innerText(), /\/s · \d+ ops\/s$/, 'write throughput');
  t.match(await page.locator('#health').innerText(), /All replicas continuous/);
  t.ok((await page.locator('#chart canvas').count()) > 0, 'the uPlot lag chart is drawn');

  // The replayer dies; writes go on. The page must say so within a few seconds, in words.
  const killedAt = Date.now();
  replay.child.kill('SIGKILL');
  await replay.exited;
  await row.locator('[data-state="disconnected"]').waitFor({ timeout: SHOWS_WITHIN_MS });
  const shownAfter = Date.now() - killedAt;
  t.ok(shownAfter < SHOWS_WITHIN_MS, `the replica shows as disconnected ${shownAfter} ms after the SIGKILL`);
  t.equal(await row.locator('[data-state]').innerText(), '✕ disconnected');
  t.match(await row.getAttribute('class'), /attention/, 'the row stands out');
  t.match(await page.locator('#health').innerText(), /Needs attention \(1\)[\s\S]*replica .* is disconnected/, 'and the page says what needs attention');

  for (let i = 0; i < 4; i++) {
    await writeSome(5, 0x10 + i);
    await sleep(1000);
  }
  await page.waitForFunction(() => document.querySelector('[data-field="lagEntries"]')?.textContent === '24', undefined, { timeout: SHOWS_WITHIN_MS });
  t.pass('lag entries grow with the writes the replica misses (4 × (5 writes + FLUSH))');
  t.not(await row.locator('[data-field="lagBytes"]').innerText(), '0 B', 'lag bytes too');
  t.not(await row.locator('[data-field="lagSeconds"]').innerText(), '0.0 s', 'and lag seconds');

  const shot = path.join(ROOT, 'tmp', 'status-page.png');
  fs.mkdirSync(path.dirname(shot), { recursive: true });
  await page.screenshot({ path: shot, fullPage: true });
  const png = fs.readFileSync(shot);
  t.ok(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) && png.length > 20_000, `screenshot saved to ${shot}`);
  if (process.env.BLOCKFERRY_UPDATE_SCREENSHOT === '1') {
    fs.mkdirSync(path.join(ROOT, 'docs'), { recursive: true });
    fs.copyFileSync(shot, path.join(ROOT, 'docs', 'status-page.png'));
  }
  t.same(pageErrors, [], 'no script or loading errors on the page');
  t.same(foreign, [], 'the page asked nothing of any other origin');

  await client.close();
  t.equal(await serve.stop(), 0, 'serve stops cleanly');
});

t.test("the replayer's page lists a replica found at start with its problem, standing out", async (t) => {
  const dir = t.testdir();
  const data = path.join(dir, 'replicas');
  fs.mkdirSync(data);
  fs.writeFileSync(path.join(data, 'bad.state.mdb'), Buffer.alloc(64 * 1024, 0x5a));
  const replay = await startReplay(['--listen', '127.0.0.1:0', '--data-dir', data, '--admin', '127.0.0.1:0'], t.teardown);
  const browser: Browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-background-networking'] });
  t.teardown(() => browser.close());
  const page = await browser.newPage();
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(`${adminUrl(replay.stdout())}/`);
  const volume = page.locator('[data-volume="bad"]');
  await volume.waitFor({ timeout: SHOWS_WITHIN_MS });
  t.match(await volume.locator('[data-field="problem"]').innerText(), /its state file could not be read: .*bad\.state\.mdb is not an LMDB file/, 'the problem is shown in words');
  t.match(await volume.getAttribute('class'), /attention/, 'the volume stands out');
  t.same(pageErrors, [], 'no script errors');
});
