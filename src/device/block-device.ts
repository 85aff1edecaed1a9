// The one storage interface of blockferry: served by the local file/block device, by an in-memory device for
// tests, by the mirror layer (journal + local image) and by the replica. The NBD core talks only to this.
//
// Offsets and lengths are plain numbers: NBD offsets are 64-bit, but JS numbers are exact to 2^53 (8 PiB),
// and the codec rejects anything larger before it reaches a device.
//
// Errors: a device rejects with a Node SystemError (`code` such as 'ENOSPC', 'EIO') or a BlockferryError;
// the NBD layer maps those to NBD errnos in exactly one place. Devices never validate request bounds:
// the NBD layer has done that already.

export interface DeviceCapabilities {
  /** Writes, trims and zeroing are refused (the export advertises NBD_FLAG_READ_ONLY). */
  readonly readOnly: boolean;
  /** flush() makes completed writes durable. Without it the export does not advertise SEND_FLUSH/SEND_FUA. */
  readonly flush: boolean;
  /** write/trim/writeZeroes honour `fua` natively; otherwise the NBD core emulates FUA with flush(). */
  readonly fua: boolean;
  /** trim() can discard (punch holes). Without it TRIM is accepted and ignored (it is only a hint). */
  readonly trim: boolean;
  /** writeZeroes() is efficient (zero-range / punch). Without it the core writes zero buffers. */
  readonly zeroes: boolean;
  /** writeZeroes({fastZero}) fails fast with ENOTSUP instead of falling back to slow writes. */
  readonly fastZero: boolean;
  /** blockStatus() reports holes and zero ranges (base:allocation). Without it everything is "data". */
  readonly blockStatus: boolean;
  /** Every connection sees the same data and flush covers all connections (NBD_FLAG_CAN_MULTI_CONN). */
  readonly multiConn: boolean;
}

export interface WriteOptions {
  /** Force unit access: the data is on stable storage before the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** NBD_CMD_FLAG_NO_HOLE: the range must stay allocated (no punching). */
  noHole?: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly. */
  fastZero?: boolean;
}

/** One run of base:allocation status. */
export interface Extent {
  length: number;
  /** NBD_STATE_HOLE: not allocated. */
  hole: boolean;
  /** NBD_STATE_ZERO: reads as zeroes. */
  zero: boolean;
}

export interface BlockDevice {
  /** Size in bytes; fixed for the life of the device. */
  readonly size: number;
  readonly capabilities: DeviceCapabilities;

  /** Read `length` bytes at `offset`. The returned buffer is owned by the caller. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: read() for a pass over much of the image (digests for sync, resync and verify) that should leave
   * the page cache as client I/O would find it. See FileDevice.readScan. With `into` (at least `length` bytes)
   * the result may be a view of it, so that a pass can reuse one buffer.
   */
  readScan?(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  /**
   * A buffer for a WRITE payload of `length` bytes, which the caller fills and passes to write(). Optional: a
   * layer that records writes (the mirror) uses it to read the payload straight into its record. Once that
   * write() settles the buffer is the device's again (the mirror reuses it): the caller must not touch it.
   */
  writeBuffer?(length: number): Buffer;
  /** Write `data` at `offset`. The device must not keep a reference to `data` after resolving. */
  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  /**
   * Optional: write `data` at `offset` synchronously if the device does such a write on the calling thread
   * anyway (a small write into a file) and return true; return false, having written nothing, otherwise.
   * Throws what the write throws. Lets a caller applying many small writes in order skip a promise per write.
   */
  writeNow?(offset: number, data: Buffer): boolean;
  /** Make every write that has completed so far durable. */
  flush(): Promise<void>;
  /** Discard a range (a hint: afterwards its contents are unspecified until written). */
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  /** Make a range read as zeroes. */
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Prefetch a range (NBD_CMD_CACHE). Optional: the core treats a missing method as a no-op. */
  cache?(offset: number, length: number): Promise<void>;
  /** base:allocation extents covering a prefix of [offset, offset+length). Optional (see capabilities). */
  blockStatus?(offset: number, length: number): Promise<Extent[]>;
  /** Release the device. In-flight calls have completed before close() is called. */
  close(): Promise<void>;
}

/** Reads for a pass over much of the image: through readScan where the device has it, else read(). */
export function scanRead(dev: BlockDevice, offset: number, length: number, into?: Buffer): Promise<Buffer> {
  return dev.readScan ? dev.readScan(offset, length, into) : dev.read(offset, length);
}
