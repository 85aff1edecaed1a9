// serve's log lines are on stderr when they are logged: an error logged while the thread pool is busy (a
// resync's image reads) and followed by a SIGKILL is still there. Checked in a child process whose four
// thread-pool threads are all blocked opening a FIFO nobody writes to, which logs one line and kills itself.
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const LOGGER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../dist/util/logger.js');

const CHILD = `
import fs from 'node:fs';
const { createLogger } = await import(${JSON.stringify(LOGGER)});
const log = createLogger({ pretty: false });
// Opening a FIFO for reading waits for a writer: each open holds one thread-pool thread for good.
for (let i = 0; i < 4; i++) fs.open(process.argv[1], 'r', () => {});
setTimeout(() => {
  log.error('the line logged just before the kill');
  process.kill(process.pid, 'SIGKILL');
}, 200);
`;

t.test('a line logged while the thread pool is busy is on stderr even if the process is then SIGKILLed', async (t) => {
  const fifo = path.join(t.testdir(), 'fifo');
  execFileSync('mkfifo', [fifo]);
  const child = spawn(process.execPath, ['--input-type=module', '-e', CHILD, fifo], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, UV_THREADPOOL_SIZE: '4' },
  });
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  const signal = await new Promise((resolve) => child.once('close', (_code, sig) => resolve(sig)));
  t.equal(signal, 'SIGKILL', 'the child killed itself');
  t.match(err, /"level":50.*the line logged just before the kill/, 'the error line reached stderr');
});
