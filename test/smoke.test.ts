import t from 'tap';
import type { BlockDevice } from '../src/device/block-device.js';
t.test('ts loads', async (t) => { const d: Partial<BlockDevice> = {}; t.same(d, {}); });
