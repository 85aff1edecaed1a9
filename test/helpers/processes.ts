// Child processes for tests: start `blockferry serve` and wait for its `listening on` line, run a command
// and collect its output. Everything started here is stopped by PID in teardown, even when a test fails.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = path.join(ROOT, 'dist/cli/index.js');

export interface Served {
  child: ChildProcess;
  port: number;
  uri: string;
  exited: Promise<number | null>;
  stderr(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export function startServe(args: string[], teardown?: (fn: () => unknown) => void): Promise<Served> {
  const child = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  teardown?.(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    return exited;
  });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`serve did not start in 20 s:\n${err}`)), 20_000);
    child.stdout!.on('data', (d) => {
      out += d;
      const m = /listening on (nbd:\/\/[^:]+:(\d+)\/\S*)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({
          child,
          port: Number(m[2]),
          uri: m[1],
          exited,
          stderr: () => err,
          stop: (signal = 'SIGTERM') => {
            if (child.exitCode === null && child.signalCode === null) child.kill(signal);
            return exited;
          },
        });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`serve exited (${code}) before listening:\n${err}`));
    });
  });
}

export function run(cmd: string, args: string[], opts: { input?: Buffer } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('exit', (code) =>
      code === 0 ? resolve({ stdout, stderr }) : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${stderr}${stdout}`)),
    );
    p.stdin.end(opts.input);
  });
}

export interface Replaying {
  child: ChildProcess;
  url: string;
  port: number;
  exited: Promise<number | null>;
}

/** Starts `blockferry replay` and waits for its `listening on ws://...` line. */
export function startReplay(args: string[], teardown?: (fn: () => unknown) => void): Promise<Replaying> {
  const child = spawn(process.execPath, [CLI, 'replay', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  teardown?.(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    return exited;
  });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`replay did not start in 20 s:\n${err}`)), 20_000);
    child.stdout!.on('data', (d) => {
      out += d;
      const m = /listening on (ws:\/\/[^:]+:(\d+))/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ child, url: m[1], port: Number(m[2]), exited });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`replay exited (${code}) before listening:\n${err}`));
    });
  });
}
