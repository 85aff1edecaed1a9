// Child processes for tests: start `blockferry serve` and wait for its `listening on` line, run a command
// and collect its output. Everything started here is stopped by PID in teardown, even when a test fails.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
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
  /** Everything printed on stdout so far (e.g. the `admin on http://...` line). */
  stdout(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts `blockferry <command>` and resolves once stdout prints a line matching `ready` (20 s at most). */
function startCli(command: string, args: string[], ready: RegExp, teardown?: (fn: () => unknown) => void) {
  const child = spawn(process.execPath, [CLI, command, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  teardown?.(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    return exited;
  });
  let out = '';
  return new Promise<{ child: ChildProcess; exited: Promise<number | null>; match: RegExpExecArray; stderr: () => string; stdout: () => string }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${command} did not start in 20 s:\n${err}`)), 20_000);
    child.stdout!.on('data', (d) => {
      out += d;
      const m = ready.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ child, exited, match: m, stderr: () => err, stdout: () => out });
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${command} exited (${code ?? signal}) before listening:\n${err}`));
    });
  });
}

export async function startServe(args: string[], teardown?: (fn: () => unknown) => void): Promise<Served> {
  const { child, exited, match, stderr, stdout } = await startCli('serve', args, /listening on (nbd:\/\/[^:]+:(\d+)\/\S*)/, teardown);
  return {
    child,
    port: Number(match[2]),
    uri: match[1],
    exited,
    stderr,
    stdout,
    stop: (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
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

/** Runs a command to its end, resolving with its exit code and output whatever the code (for commands that fail on purpose). */
export function runStatus(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

/**
 * `blockferry ARGS` expected to refuse to start: resolves with its exit code and stderr. One still running
 * after 15 s (it started after all) is SIGKILLed and reported with code null, so a regression fails, not hangs.
 */
export function runRefused(args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), 15_000);
    p.on('error', reject);
    p.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

export interface Replaying {
  child: ChildProcess;
  url: string;
  port: number;
  exited: Promise<number | null>;
  stdout(): string;
}

/** Starts `blockferry replay` and waits for its `listening on ws://...` line. */
export async function startReplay(args: string[], teardown?: (fn: () => unknown) => void): Promise<Replaying> {
  const { child, exited, match, stdout } = await startCli('replay', args, /listening on (wss?:\/\/[^:]+:(\d+))/, teardown);
  return { child, url: match[1], port: Number(match[2]), exited, stdout };
}

/** A loopback port free right now, for a process that must come back on the same port after a restart. */
export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

/** The admin URL a serve or replay started with `--admin` printed (`admin on http://...`). */
export const adminOf = (stdout: string): string => /admin on (http:\/\/\S+)/.exec(stdout)![1];

/** GET ADMIN/status as JSON (5 s at most). */
export async function getStatus(admin: string): Promise<any> {
  const res = await fetch(`${admin}/status`, { signal: AbortSignal.timeout(5_000) });
  return res.json();
}
