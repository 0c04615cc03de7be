/**
 * Opens the log device of a clustered-disk log: resolves the CTR's device argument (a path, or
 * major:minor through /sys/dev/block), checks its size, and wraps the {@link DiskStore}.
 *
 * @module
 */

import type { DiskLog } from "./disk_log.ts";
import type { LogConfig } from "./log/types.ts";
import { resolveLogDevice } from "./disk/device.ts";
import { DiskStore } from "./disk/store.ts";

/** Open the disk log named by a clustered-disk CTR. Rejects with a clear message. */
export async function openDiskLog(config: LogConfig): Promise<DiskLog> {
  if (config.device === undefined) {
    throw new Error(`Log ${config.uuid}: clustered-disk without a log device`);
  }
  const device = resolveLogDevice(config.device);
  const store = await DiskStore.open(device, { regionCount: config.regionCount });
  const label = device.isBlockDevice ? `${device.path} (${device.name})` : device.path;
  return {
    kernelName: device.name,
    load: (sync) => store.load(sync),
    write: (bytes, changes, options) => store.write(bytes, changes, config.regionCount, options),
    close: () => store.close(),
    describe: () => label,
    stats: () => ({ ...store.stats }),
  };
}
