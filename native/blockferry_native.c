/* blockferry's native helper: the few Linux syscalls Node does not expose (fallocate, SEEK_DATA/SEEK_HOLE,
 * block-device ioctls, fadvise, madvise of a file's shared mappings, flock) and glibc's mallopt, as synchronous
 * Node-API functions. They are rare or fast (metadata and settings only). One asynchronous function,
 * pwritePieces, writes a large buffer as a series of bounded pwrite calls in one thread-pool trip. And CRC32C
 * with the SSE4.2 instruction on three interleaved streams (where the CPU has it). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

static const char *errno_name(int e) {
  switch (e) {
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOSPC: return "ENOSPC";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EPERM: return "EPERM";
    case EROFS: return "EROFS";
    case ENOTTY: return "ENOTTY";
    case ENODEV: return "ENODEV";
    case EFBIG: return "EFBIG";
    case EACCES: return "EACCES";
    case EINTR: return "EINTR";
    case ENXIO: return "ENXIO";
    case ENOSYS: return "ENOSYS";
    case ENOMEM: return "ENOMEM";
    default: return "EIO";
  }
}

/* A Node-style system error: code (e.g. "ENOSPC"), errno (negative), syscall, and a message naming all three. */
static napi_value errno_error(napi_env env, const char *syscall, int e) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s, %s", errno_name(e), strerror(e), syscall);
  napi_value code, message, err, num;
  napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &err);
  napi_create_int32(env, -e, &num);
  napi_set_named_property(env, err, "errno", num);
  napi_value sc;
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &sc);
  napi_set_named_property(env, err, "syscall", sc);
  return err;
}

static napi_value throw_errno(napi_env env, const char *syscall, int e) {
  napi_throw(env, errno_error(env, syscall, e));
  return NULL;
}

/* Reads up to 3 integer arguments (fd, offset, length); returns 0 and throws TypeError on bad input. */
static int get_args(napi_env env, napi_callback_info info, size_t want, int64_t *out) {
  napi_value argv[3];
  size_t argc = 3;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < want) {
    napi_throw_type_error(env, NULL, "blockferry_native: missing arguments");
    return 0;
  }
  for (size_t i = 0; i < want; i++) {
    if (napi_get_value_int64(env, argv[i], &out[i]) != napi_ok) {
      napi_throw_type_error(env, NULL, "blockferry_native: arguments must be numbers");
      return 0;
    }
  }
  return 1;
}

static napi_value undef(napi_env env) {
  napi_value u;
  napi_get_undefined(env, &u);
  return u;
}

static napi_value num(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode, const char *name) {
  int64_t a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  int r;
  do r = fallocate((int)a[0], mode, (off_t)a[1], (off_t)a[2]); while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, name, errno);
  return undef(env);
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "fallocate(PUNCH_HOLE)");
}

static napi_value zero_range(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "fallocate(ZERO_RANGE)");
}

/* Allocates blocks for [offset, offset+length) without changing the file size (unwritten extents read as zeroes). */
static napi_value allocate(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_KEEP_SIZE, "fallocate");
}

static napi_value do_seek(napi_env env, napi_callback_info info, int whence, const char *name) {
  int64_t a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], whence);
  if (r < 0) {
    if (errno == ENXIO) return num(env, -1); /* no data (or hole) at or after offset */
    return throw_errno(env, name, errno);
  }
  return num(env, (int64_t)r);
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)"); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)"); }

static napi_value block_device_size(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  uint64_t size = 0;
  if (ioctl((int)a[0], BLKGETSIZE64, &size) < 0) return throw_errno(env, "ioctl(BLKGETSIZE64)", errno);
  return num(env, (int64_t)size);
}

static napi_value do_blk_range(napi_env env, napi_callback_info info, unsigned long req, const char *name) {
  int64_t a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  uint64_t range[2] = {(uint64_t)a[1], (uint64_t)a[2]};
  if (ioctl((int)a[0], req, range) < 0) return throw_errno(env, name, errno);
  return undef(env);
}

static napi_value blk_discard(napi_env env, napi_callback_info info) { return do_blk_range(env, info, BLKDISCARD, "ioctl(BLKDISCARD)"); }
static napi_value blk_zero_out(napi_env env, napi_callback_info info) { return do_blk_range(env, info, BLKZEROOUT, "ioctl(BLKZEROOUT)"); }

static napi_value fadvise_will_need(napi_env env, napi_callback_info info) {
  int64_t a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  int r = posix_fadvise((int)a[0], (off_t)a[1], (off_t)a[2], POSIX_FADV_WILLNEED);
  if (r != 0) return throw_errno(env, "posix_fadvise(WILLNEED)", r);
  return undef(env);
}

/* fadviseRandom(fd): no readahead on this open file (POSIX_FADV_RANDOM); see FileDevice.readScan. */
static napi_value fadvise_random(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int r = posix_fadvise((int)a[0], 0, 0, POSIX_FADV_RANDOM);
  if (r != 0) return throw_errno(env, "posix_fadvise(RANDOM)", r);
  return undef(env);
}

/* dropFileMappings(path): MADV_DONTNEED on every *shared* mapping of exactly `path` in this process. The pages
 * stay in the page cache and fault back in with the same contents on the next access; only this process's
 * page-table entries go, so its RSS stops counting file pages it read once (LMDB reads the journal through a
 * shared map). Private mappings are never touched: there MADV_DONTNEED would discard data. Returns the bytes of
 * mappings advised.
 *
 * Finding the mappings means parsing /proc/self/maps, which cost ~3% of serve's loop thread at 1 MiB journaled
 * writes (perf: vfscanf, strtoull and the kernel's show_map; the call runs every 16 MiB of journal touched). So
 * the ranges found are remembered per path, and on later calls each is checked before use with one readlink of
 * /proc/self/map_files/START-END, which names the file only while exactly that range is still one mapping of
 * it; any mismatch (LMDB resized or reopened its map) falls back to the parse. The kernel refuses map_files to
 * a process without CAP_SYS_ADMIN on some versions: then every call parses, as before. */
#define MAP_CACHE_PATHS 8
#define MAP_CACHE_RANGES 8
static struct {
  char path[4096];
  int n; /* ranges remembered; -1: more than MAP_CACHE_RANGES (always parse) */
  unsigned long start[MAP_CACHE_RANGES], end[MAP_CACHE_RANGES];
} map_cache[MAP_CACHE_PATHS];
static int map_cache_next;

/* Whether [start, end) is still exactly one mapping of `want` (map_files names only whole mappings). */
static bool mapping_is(unsigned long start, unsigned long end, const char *want) {
  char link[96], target[4096];
  snprintf(link, sizeof link, "/proc/self/map_files/%lx-%lx", start, end);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n <= 0) return false;
  target[n] = 0;
  return strcmp(target, want) == 0;
}

static napi_value drop_file_mappings(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char want[4096];
  size_t len = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], want, sizeof want, &len) != napi_ok || len == 0 || len >= sizeof want - 1) {
    napi_throw_type_error(env, NULL, "blockferry_native: dropFileMappings needs a path");
    return NULL;
  }
  int slot = -1;
  for (int i = 0; i < MAP_CACHE_PATHS; i++) {
    if (strcmp(map_cache[i].path, want) == 0) {
      slot = i;
      break;
    }
  }
  if (slot >= 0 && map_cache[slot].n > 0) {
    bool valid = true;
    for (int i = 0; i < map_cache[slot].n && valid; i++) valid = mapping_is(map_cache[slot].start[i], map_cache[slot].end[i], want);
    if (valid) {
      int64_t advised = 0;
      for (int i = 0; i < map_cache[slot].n; i++) {
        unsigned long start = map_cache[slot].start[i], end = map_cache[slot].end[i];
        if (madvise((void *)start, end - start, MADV_DONTNEED) != 0) return throw_errno(env, "madvise(MADV_DONTNEED)", errno);
        advised += (int64_t)(end - start);
      }
      return num(env, advised);
    }
  }
  if (slot < 0) {
    slot = map_cache_next;
    map_cache_next = (map_cache_next + 1) % MAP_CACHE_PATHS;
    memcpy(map_cache[slot].path, want, len + 1);
  }
  map_cache[slot].n = 0;
  FILE *f = fopen("/proc/self/maps", "r");
  if (!f) return throw_errno(env, "open(/proc/self/maps)", errno);
  char line[4096 + 256];
  int64_t advised = 0;
  int err = 0;
  int found = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long start, end;
    char perms[8];
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %n", &start, &end, perms, &path_at) < 3 || path_at == 0) continue;
    char *name = line + path_at;
    size_t n = strlen(name);
    if (n > 0 && name[n - 1] == '\n') name[--n] = 0;
    if (perms[3] != 's' || strcmp(name, want) != 0) continue;
    if (madvise((void *)start, end - start, MADV_DONTNEED) != 0) {
      err = errno;
      break;
    }
    advised += (int64_t)(end - start);
    if (found < MAP_CACHE_RANGES) {
      map_cache[slot].start[found] = start;
      map_cache[slot].end[found] = end;
    }
    found++;
  }
  fclose(f);
  if (err) return throw_errno(env, "madvise(MADV_DONTNEED)", err);
  /* Remember only what the next call can check: every range, each still naming the file in map_files. */
  bool checkable = found > 0 && found <= MAP_CACHE_RANGES;
  for (int i = 0; i < found && checkable; i++) checkable = mapping_is(map_cache[slot].start[i], map_cache[slot].end[i], want);
  map_cache[slot].n = checkable ? found : -1;
  return num(env, advised);
}

/* releasePages(buffer): gives the memory pages wholly inside `buffer` back to the kernel (MADV_DONTNEED), so RSS
 * stops counting them; they read as zeroes when next touched. Only for a buffer of the caller's own whose
 * contents are no longer needed (the journal's memory window once it stops): its first and last partial pages,
 * which may be shared with other allocations, are left alone. Returns the bytes released. */
static napi_value release_pages(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data = NULL;
  size_t length = 0;
  bool is_buffer = false;
  if (argc < 1 || napi_is_buffer(env, argv[0], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[0], &data, &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "blockferry_native: releasePages needs a Buffer");
    return NULL;
  }
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t from = ((uintptr_t)data + page - 1) & ~(page - 1);
  uintptr_t to = ((uintptr_t)data + length) & ~(page - 1);
  if (to <= from) return num(env, 0);
  if (madvise((void *)from, to - from, MADV_DONTNEED) != 0) return throw_errno(env, "madvise(MADV_DONTNEED)", errno);
  return num(env, (int64_t)(to - from));
}

/* pwritePieces(fd, buffer, offset, piece, callback): writes all of `buffer` at `offset` as pwrite calls of at
 * most `piece` bytes, on the libuv thread pool, then calls callback(err|null). Why pieces: the kernel sizes a
 * page-cache folio by the write that creates it, and on kernels with large folios (ext4 since 6.16) every later
 * small write into a large folio walks all of its buffer heads: measured here, a 4 KiB pwrite into a file written
 * in 8 MiB calls took 34 us, in 1 MiB calls 13.7 us, in 128 KiB calls 4.2 us. One trip, not one per piece, so a
 * large request costs no more thread hand-offs than before. */
typedef struct {
  napi_async_work work;
  napi_ref buffer_ref;
  napi_ref callback_ref;
  int fd;
  const char *data;
  size_t length;
  int64_t offset;
  size_t piece;
  int err;
} pwrite_job;

/* Writes all of `length` bytes at `offset` as pwrite calls of at most `piece` bytes, retrying on EINTR; returns
 * 0, or the errno of the call that failed (EIO for a pwrite that wrote nothing). */
static int pwrite_all(int fd, const char *data, size_t length, int64_t offset, size_t piece) {
  size_t done = 0;
  while (done < length) {
    size_t n = length - done;
    if (n > piece) n = piece;
    ssize_t r = pwrite(fd, data + done, n, (off_t)(offset + (int64_t)done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return EIO;
    done += (size_t)r;
  }
  return 0;
}

static void pwrite_execute(napi_env env, void *arg) {
  (void)env;
  pwrite_job *job = arg;
  job->err = pwrite_all(job->fd, job->data, job->length, job->offset, job->piece);
}

static void pwrite_complete(napi_env env, napi_status status, void *arg) {
  pwrite_job *job = arg;
  napi_value cb, global, argv[1];
  napi_get_reference_value(env, job->callback_ref, &cb);
  napi_get_global(env, &global);
  if (status != napi_ok && job->err == 0) job->err = EIO;
  if (job->err) argv[0] = errno_error(env, "pwrite", job->err);
  else napi_get_null(env, &argv[0]);
  napi_delete_reference(env, job->buffer_ref);
  napi_delete_reference(env, job->callback_ref);
  napi_delete_async_work(env, job->work);
  free(job);
  napi_call_function(env, global, cb, 1, argv, NULL);
}

static napi_value pwrite_pieces(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd, offset, piece;
  void *data;
  size_t length;
  napi_valuetype cbt;
  if (argc < 5 || napi_get_value_int64(env, argv[0], &fd) != napi_ok || napi_get_buffer_info(env, argv[1], &data, &length) != napi_ok ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || napi_get_value_int64(env, argv[3], &piece) != napi_ok || piece <= 0 ||
      napi_typeof(env, argv[4], &cbt) != napi_ok || cbt != napi_function) {
    napi_throw_type_error(env, NULL, "blockferry_native: pwritePieces(fd, buffer, offset, piece, callback)");
    return NULL;
  }
  pwrite_job *job = calloc(1, sizeof *job);
  if (!job) return throw_errno(env, "calloc", ENOMEM);
  job->fd = (int)fd;
  job->data = data;
  job->length = length;
  job->offset = offset;
  job->piece = (size_t)piece;
  napi_create_reference(env, argv[1], 1, &job->buffer_ref);
  napi_create_reference(env, argv[4], 1, &job->callback_ref);
  napi_value name;
  napi_create_string_utf8(env, "blockferry:pwritePieces", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, pwrite_execute, pwrite_complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return undef(env);
}

/* pwriteMany(fd, buffers, offsets): writes each buffer at its offset, in array order, synchronously, and returns
 * the number written (all of them). For runs of small writes already in hand (a replica applying a batch of
 * 4 KiB entries): one call into C for the run instead of one fs.writeSync each, whose argument checks and libuv
 * request cost ~1.2 us per call here (a random 4 KiB pwrite: 2.7 us in C, 3.9 us through fs.writeSync). On a
 * failure it throws the errno error with `written` set to how many buffers were fully written before it. */
static napi_value pwrite_many(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  size_t argc = 3;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd;
  bool a1 = false, a2 = false;
  uint32_t n = 0, n2 = 0;
  if (argc < 3 || napi_get_value_int64(env, argv[0], &fd) != napi_ok || napi_is_array(env, argv[1], &a1) != napi_ok || !a1 ||
      napi_is_array(env, argv[2], &a2) != napi_ok || !a2 || napi_get_array_length(env, argv[1], &n) != napi_ok ||
      napi_get_array_length(env, argv[2], &n2) != napi_ok || n != n2) {
    napi_throw_type_error(env, NULL, "blockferry_native: pwriteMany(fd, buffers, offsets) with arrays of the same length");
    return NULL;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value bv, ov;
    void *data;
    size_t length;
    int64_t offset;
    bool isbuf = false;
    if (napi_get_element(env, argv[1], i, &bv) != napi_ok || napi_is_buffer(env, bv, &isbuf) != napi_ok || !isbuf ||
        napi_get_buffer_info(env, bv, &data, &length) != napi_ok || napi_get_element(env, argv[2], i, &ov) != napi_ok ||
        napi_get_value_int64(env, ov, &offset) != napi_ok || offset < 0) {
      napi_throw_type_error(env, NULL, "blockferry_native: pwriteMany: buffers must be Buffers and offsets numbers >= 0");
      return NULL;
    }
    int e = pwrite_all((int)fd, data, length, offset, SIZE_MAX);
    if (e) {
      napi_value err = errno_error(env, "pwrite", e), written;
      napi_create_uint32(env, i, &written);
      napi_set_named_property(env, err, "written", written);
      napi_throw(env, err);
      return NULL;
    }
  }
  napi_value out;
  napi_create_uint32(env, n, &out);
  return out;
}

/* tryLock(fd, exclusive): flock(LOCK_EX or LOCK_SH | LOCK_NB) on the open file. Returns true when taken, false
 * when another open file holds a conflicting lock (EWOULDBLOCK); throws other errors. The lock goes with the
 * open file: closing the descriptor, or the process ending in any way, releases it, so it is never stale. */
static napi_value try_lock(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd;
  bool exclusive = true;
  if (argc < 2 || napi_get_value_int64(env, argv[0], &fd) != napi_ok || napi_get_value_bool(env, argv[1], &exclusive) != napi_ok) {
    napi_throw_type_error(env, NULL, "blockferry_native: tryLock(fd, exclusive)");
    return NULL;
  }
  int r;
  do r = flock((int)fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB);
  while (r < 0 && errno == EINTR);
  napi_value out;
  if (r == 0) {
    napi_get_boolean(env, true, &out);
    return out;
  }
  if (errno == EWOULDBLOCK) {
    napi_get_boolean(env, false, &out);
    return out;
  }
  return throw_errno(env, "flock", errno);
}

/* keepFreedMemory(mmapThreshold, trimThreshold): glibc malloc serves allocations below mmapThreshold from its
 * heap and gives freed memory back to the kernel only when more than trimThreshold is free at the top. Its
 * default (allocations from 128 KiB up by mmap, adjusted upwards as they are freed; trim above twice that)
 * returns the pages of every large batch to the kernel and faults fresh zeroed ones in for the next: LMDB
 * mallocs each commit's overflow pages for 1 MiB entries, Node each 1 MiB request's buffer. Returns false
 * where malloc is not glibc's (nothing changed). */
static napi_value keep_freed_memory(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t mmap_threshold, trim_threshold;
  if (argc < 2 || napi_get_value_int64(env, argv[0], &mmap_threshold) != napi_ok ||
      napi_get_value_int64(env, argv[1], &trim_threshold) != napi_ok || mmap_threshold <= 0 || trim_threshold <= 0 ||
      mmap_threshold > INT32_MAX || trim_threshold > INT32_MAX) {
    napi_throw_type_error(env, NULL, "blockferry_native: keepFreedMemory(mmapThreshold, trimThreshold)");
    return NULL;
  }
  bool done = false;
#ifdef __GLIBC__
  done = mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold) == 1 && mallopt(M_TRIM_THRESHOLD, (int)trim_threshold) == 1;
#endif
  napi_value result;
  napi_get_boolean(env, done, &result);
  return result;
}


/* ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as @node-rs/crc32's crc32c(data, initial) ----
 * The crc32 instruction has a latency of three cycles and a throughput of one, so one stream of it runs at a
 * third of its speed: long inputs are cut into three blocks whose CRCs are computed together and then joined.
 * Joining uses linearity: the register after A then B equals the register after A advanced over len(B) zero
 * bytes (a multiplication by x^(8 len(B)) modulo P) xor the register of B alone from zero. */
#define CRC32C_POLY 0x82F63B78u
/* Bytes per block of the three-way loops, and x^(8 * block) mod P for each, set by crc32c_init. */
#define CRC_BLOCK 8192
#define CRC_SMALL_BLOCK 512 /* the rest of a long input, and inputs of 1.5 KiB up (4 KiB writes) */
static uint32_t crc_shift_block, crc_shift_small;
static uint32_t crc_x2n[32]; /* x^(2^k) mod P */
static bool crc_hw;

/* a * b modulo P, bit-reflected (bit 31 is x^0). */
static uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ CRC32C_POLY : b >> 1;
  }
  return p;
}

/* x^(8n) mod P: the operator that advances a CRC register over n zero bytes. */
static uint32_t x8nmodp(uint64_t n) {
  uint32_t p = 1u << 31;
  for (int k = 3; n; n >>= 1, k++)
    if (n & 1) p = multmodp(crc_x2n[k & 31], p);
  return p;
}

#if defined(__x86_64__)
/* Three streams of `block` bytes at a time while 3 * block bytes remain, joined with `shift` = x^(8 block). */
__attribute__((target("sse4.2"))) static inline uint64_t crc32c_3way(uint64_t c0, const uint8_t **pp, size_t *np, size_t block, uint32_t shift) {
  const uint8_t *p = *pp;
  size_t n = *np;
  while (n >= 3 * block) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t *end = p + block;
    do {
      uint64_t a, b, c;
      memcpy(&a, p, 8);
      memcpy(&b, p + block, 8);
      memcpy(&c, p + 2 * block, 8);
      c0 = _mm_crc32_u64(c0, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, c);
      p += 8;
    } while (p < end);
    c0 = multmodp(shift, (uint32_t)c0) ^ (uint32_t)c1;
    c0 = multmodp(shift, (uint32_t)c0) ^ (uint32_t)c2;
    p += 2 * block;
    n -= 3 * block;
  }
  *pp = p;
  *np = n;
  return c0;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
  uint64_t c0 = crc;
  while (n > 0 && ((uintptr_t)p & 7)) {
    c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    n--;
  }
  c0 = crc32c_3way(c0, &p, &n, CRC_BLOCK, crc_shift_block);
  c0 = crc32c_3way(c0, &p, &n, CRC_SMALL_BLOCK, crc_shift_small);
  while (n >= 8) {
    uint64_t a;
    memcpy(&a, p, 8);
    c0 = _mm_crc32_u64(c0, a);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    n--;
  }
  return (uint32_t)c0;
}
#endif

static void crc32c_init(void) {
  uint32_t p = 1u << 30; /* x^1 */
  crc_x2n[0] = p;
  for (int k = 1; k < 32; k++) crc_x2n[k] = p = multmodp(p, p);
  crc_shift_block = x8nmodp(CRC_BLOCK);
  crc_shift_small = x8nmodp(CRC_SMALL_BLOCK);
#if defined(__x86_64__)
  __builtin_cpu_init();
  crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

/* crc32c(data, initial = 0): initial is a previous result, so crc32c(b, crc32c(a)) == crc32c(a + b). */
static napi_value crc32c(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data = NULL;
  size_t len = 0;
  bool typed = false;
  if (argc >= 1) napi_is_typedarray(env, argv[0], &typed);
  if (!typed) {
    napi_throw_type_error(env, NULL, "blockferry_native: crc32c(Buffer, initial?)");
    return NULL;
  }
  napi_typedarray_type type;
  napi_get_typedarray_info(env, argv[0], &type, &len, &data, NULL, NULL);
  if (type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "blockferry_native: crc32c takes a Uint8Array");
    return NULL;
  }
  uint32_t init = 0;
  if (argc >= 2) napi_get_value_uint32(env, argv[1], &init);
  uint32_t crc = ~init;
#if defined(__x86_64__)
  crc = crc32c_hw(crc, data, len);
#endif
  napi_value result;
  napi_create_uint32(env, ~crc, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  crc32c_init();
  napi_property_descriptor props[] = {
    {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
    {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_default, NULL},
    {"allocate", NULL, allocate, NULL, NULL, NULL, napi_default, NULL},
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
    {"blockDeviceSize", NULL, block_device_size, NULL, NULL, NULL, napi_default, NULL},
    {"blkDiscard", NULL, blk_discard, NULL, NULL, NULL, napi_default, NULL},
    {"blkZeroOut", NULL, blk_zero_out, NULL, NULL, NULL, napi_default, NULL},
    {"fadviseWillNeed", NULL, fadvise_will_need, NULL, NULL, NULL, napi_default, NULL},
    {"fadviseRandom", NULL, fadvise_random, NULL, NULL, NULL, napi_default, NULL},
    {"dropFileMappings", NULL, drop_file_mappings, NULL, NULL, NULL, napi_default, NULL},
    {"releasePages", NULL, release_pages, NULL, NULL, NULL, napi_default, NULL},
    {"pwritePieces", NULL, pwrite_pieces, NULL, NULL, NULL, napi_default, NULL},
    {"pwriteMany", NULL, pwrite_many, NULL, NULL, NULL, napi_default, NULL},
    {"tryLock", NULL, try_lock, NULL, NULL, NULL, napi_default, NULL},
    {"keepFreedMemory", NULL, keep_freed_memory, NULL, NULL, NULL, napi_default, NULL},
    {"crc32c", NULL, crc32c, NULL, NULL, NULL, napi_default, NULL},
  };
  /* crc32c only where the instruction is there: elsewhere the caller keeps its portable one. */
  size_t n = sizeof props / sizeof props[0];
  napi_define_properties(env, exports, crc_hw ? n : n - 1, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
