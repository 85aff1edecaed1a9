#!/usr/bin/env node
// The `blockferry` command line: one yargs root, one module per command in ./commands.
// The libuv pool (large image I/O, LMDB) is Node's default of 4 threads unless UV_THREADPOOL_SIZE is set in the
// environment: setting it here came too late (imports run first, and the ESM loader has started the pool by
// then: a serve had 11 threads with or without it, 15 with UV_THREADPOOL_SIZE=8 in its environment), so every
// figure in docs/performance.md was measured with 4.

import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { keepFreedMemory } from '../device/native.js';
import { BlockferryError, UsageError } from '../util/errors.js';
import { commands } from './commands/index.js';

// serve and replay move large buffers through malloc at a high rate: keep freed ones for reuse (see there).
keepFreedMemory();

const cli = yargs(hideBin(process.argv))
  .scriptName('blockferry')
  .usage('$0 <command> [options]\n\nAn NBD server that mirrors every write to a journal and to backup sites.')
  .demandCommand(1, 'Name a command: `blockferry --help` lists them.')
  // Keys mirror the flags, e.g. {"image": ["disk=/srv/disk.img"], "replicate-to": ["ws://backup:7070"]}.
  .config('config', 'A JSON file of options whose keys are the flag names; flags given on the command line win')
  .strict()
  .recommendCommands()
  .help()
  .alias('h', 'help')
  .version()
  .wrap(Math.min(110, process.stdout.columns || 110))
  .fail((msg, err, y) => {
    if (err) {
      const code = err instanceof BlockferryError && err.code === 'ERR_USAGE' ? 2 : 1;
      // blockferry's own code (ERR_IMAGE_SHRUNK, ...) after the sentence, for logs and scripts to match on; a
      // system error's message starts with its code already (EACCES: ...).
      const tag = err instanceof BlockferryError && err.code !== 'ERR_USAGE' && !err.message.includes(err.code) ? ` (${err.code})` : '';
      process.stderr.write(`blockferry: ${err.message}${tag}\n`);
      process.exit(code);
    }
    process.stderr.write(`${y.help()}\n\nblockferry: ${msg}\n`);
    process.exit(2);
  });

// The options a command takes more than once (declared as arrays there). Any other option given twice would
// reach its command as an array of both values: refused instead, by name.
const REPEATABLE: Record<string, string[]> = { serve: ['image', 'replicate-to', 'replicateTo'] };
cli.check((argv) => {
  const repeatable = new Set(['_', ...(REPEATABLE[String(argv._[0])] ?? [])]);
  for (const [key, value] of Object.entries(argv)) {
    if (Array.isArray(value) && !repeatable.has(key)) {
      const flag = key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
      throw new UsageError(`--${flag} is given ${value.length} times; give it once`);
    }
  }
  return true;
}, true);
for (const c of commands) cli.command(c);

await cli.parseAsync();
