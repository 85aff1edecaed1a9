import fs from 'node:fs';
const mode = process.argv[2]; const f = '/var/tmp/pw.img'; const N = 1 << 30;
fs.rmSync(f, { force: true });
if (mode === 'copy') fs.copyFileSync('/var/tmp/rb-base.img', f);
else {
  const fd = fs.openSync(f, 'w+'); fs.ftruncateSync(fd, N);
  const piece = +mode; const buf = Buffer.alloc(piece, 1);
  for (let o = 0; o < N; o += piece) fs.writeSync(fd, buf, 0, piece, o);
  fs.closeSync(fd);
}
const fd = fs.openSync(f, 'r+');
if (process.env.SYNC) fs.fdatasyncSync(fd);
const b = Buffer.alloc(4096, 2); const n = 200000;
const cpu = () => { const u = process.cpuUsage(); return u.user + u.system; };
const c0 = cpu();
for (let i = 0; i < n; i++) fs.writeSync(fd, b, 0, 4096, Math.floor(Math.random() * (N / 4096)) * 4096);
console.log(mode, 'SYNC=' + (process.env.SYNC ?? ''), ((cpu() - c0) / n).toFixed(2), 'us per 4K pwrite');
