// Every command module the CLI registers, in the order `--help` lists them.
import type { CommandModule } from 'yargs';
import { command as demo } from './demo.js';
import { demoteCommand, promoteCommand } from './failover.js';
import { command as journal, replayLocalCommand } from './journal.js';
import { command as replay } from './replay.js';
import { command as serve } from './serve.js';
import { command as status } from './status.js';
import { command as verify } from './verify.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export const commands: CommandModule<any, any>[] = [serve, replay, status, demo, journal, replayLocalCommand, verify, promoteCommand, demoteCommand];
