// The admin HTTP server of `serve` and `replay` (--admin HOST:PORT): read-only by construction. It answers
// GET (and HEAD) for /status (JSON), /metrics (Prometheus text), / (the status page) and a fixed list of
// /assets; every other path is 404 and every other method 405. Nothing it serves changes state, so it can sit
// behind a reverse proxy without giving control away. The page and its assets are read once at start from the
// package (the page directory beside this file, uPlot from node_modules): no CDN, nothing fetched at run time.
import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { silentLogger, type Logger } from '../util/logger.js';
import { replayAttention, serveAttention } from './attention.js';
import { StatusMetrics } from './metrics.js';
import type { AdminStatus, ReplayStatusBody, ServeStatusBody } from './status-types.js';

/** An idle keep-alive connection (a browser tab polling once a second) is kept this long. */
const KEEP_ALIVE_MS = 5_000;
/** A client must send its request headers within this time (a slow client cannot hold sockets open). */
const HEADERS_TIMEOUT_MS = 10_000;

export type StatusSource =
  | { role: 'serve'; status: () => ServeStatusBody | Promise<ServeStatusBody> }
  | { role: 'replay'; status: () => ReplayStatusBody | Promise<ReplayStatusBody> };

export type AdminOptions = StatusSource & {
  host: string;
  port: number;
  logger?: Logger;
};

export interface AdminServer {
  /** http://HOST:PORT (with the port actually bound when 0 was asked). */
  url: string;
  host: string;
  port: number;
  /** The snapshot /status would return now. */
  snapshot(): Promise<AdminStatus>;
  close(): Promise<void>;
}

interface Asset {
  type: string;
  body: Buffer;
}

const require = createRequire(import.meta.url);
const PAGE_DIR = new URL('./page/', import.meta.url);

function loadAssets(): Map<string, Asset> {
  const page = (name: string) => fs.readFileSync(new URL(name, PAGE_DIR));
  const uplot = (name: string) => fs.readFileSync(require.resolve(`uplot/dist/${name}`));
  const js = 'text/javascript; charset=utf-8';
  const css = 'text/css; charset=utf-8';
  return new Map<string, Asset>([
    ['/', { type: 'text/html; charset=utf-8', body: page('index.html') }],
    ['/assets/app.js', { type: js, body: page('app.js') }],
    ['/assets/style.css', { type: css, body: page('style.css') }],
    ['/assets/uPlot.iife.min.js', { type: js, body: uplot('uPlot.iife.min.js') }],
    ['/assets/uPlot.min.css', { type: css, body: uplot('uPlot.min.css') }],
  ]);
}

function packageVersion(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(fileURLToPath(new URL('../../package.json', import.meta.url)), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/** Headers on every answer: nothing here may be framed, sniffed or load anything from elsewhere. */
const COMMON_HEADERS = {
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  // uPlot sizes its elements through element.style; everything else comes from this origin.
  'Content-Security-Policy': "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
};

export async function startAdmin(opts: AdminOptions): Promise<AdminServer> {
  const log = (opts.logger ?? silentLogger).child({ component: 'admin' });
  const assets = loadAssets();
  const metrics = new StatusMetrics();
  const version = packageVersion();
  const startedAt = Date.now();

  const snapshot = async (): Promise<AdminStatus> => {
    const envelope = { version, pid: process.pid, startedAt, now: Date.now() };
    if (opts.role === 'serve') {
      const body = await opts.status();
      return { role: 'serve', ...envelope, ...body, attention: serveAttention(body) };
    }
    const body = await opts.status();
    return { role: 'replay', ...envelope, ...body, attention: replayAttention(body) };
  };

  const send = (req: http.IncomingMessage, res: http.ServerResponse, status: number, type: string, body: string | Buffer, extra: Record<string, string> = {}) => {
    const buf = typeof body === 'string' ? Buffer.from(body) : body;
    res.writeHead(status, { ...COMMON_HEADERS, 'Content-Type': type, 'Content-Length': buf.length, 'Cache-Control': 'no-cache', ...extra });
    res.end(req.method === 'HEAD' ? undefined : buf);
  };

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return send(req, res, 405, 'text/plain; charset=utf-8', `${req.method} is not allowed: the admin server is read-only (GET /status, /metrics, /)\n`, { Allow: 'GET, HEAD' });
    }
    // The request target: a path (origin form), or a whole URL (absolute form, RFC 9112 3.2.2). A path is
    // appended to a fixed origin, never resolved against it: '//x/status' or '/\\x/status' would otherwise be
    // read as host x's URL, and '//[' throws.
    const target = req.url ?? '/';
    let pathname: string;
    try {
      if (target.startsWith('/')) pathname = new URL(`http://admin.invalid${target}`).pathname;
      else if (/^https?:\/\//i.test(target)) pathname = new URL(target).pathname;
      else throw new Error('neither a path nor a URL');
    } catch {
      return send(req, res, 400, 'text/plain; charset=utf-8', 'bad request target: a path such as /status is expected\n');
    }
    if (pathname === '/status') {
      return send(req, res, 200, 'application/json; charset=utf-8', `${JSON.stringify(await snapshot(), null, 2)}\n`, { 'Cache-Control': 'no-store' });
    }
    if (pathname === '/metrics') {
      return send(req, res, 200, metrics.contentType, await metrics.render(await snapshot()), { 'Cache-Control': 'no-store' });
    }
    const asset = assets.get(pathname === '/index.html' ? '/' : pathname);
    if (asset) return send(req, res, 200, asset.type, asset.body);
    return send(req, res, 404, 'text/plain; charset=utf-8', `${pathname} not found: try /status, /metrics or /\n`);
  };

  const server = http.createServer({ keepAliveTimeout: KEEP_ALIVE_MS, headersTimeout: HEADERS_TIMEOUT_MS, requestTimeout: HEADERS_TIMEOUT_MS }, (req, res) => {
    handle(req, res).catch((err: Error) => {
      log.error({ err, url: req.url }, 'admin request failed');
      if (!res.headersSent) send(req, res, 500, 'application/json; charset=utf-8', `${JSON.stringify({ error: err.message })}\n`);
      else res.destroy();
    });
  });
  server.on('clientError', (err, socket) => {
    log.debug({ err }, 'bad admin request');
    socket.destroy();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: opts.host, port: opts.port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => log.error({ err }, 'admin server error'));
  const addr = server.address() as AddressInfo;
  const host = addr.address.includes(':') ? `[${addr.address}]` : addr.address;
  const url = `http://${host}:${addr.port}`;
  log.info({ url }, 'admin server listening (read-only: /status, /metrics, /)');

  let closing: Promise<void> | undefined;
  return {
    url,
    host: addr.address,
    port: addr.port,
    snapshot,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      })),
  };
}
