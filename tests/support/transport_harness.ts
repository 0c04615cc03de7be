/**
 * An EventLoop running in the test process, and CPG transports on it, each connected (also on
 * reconnection) to one test corosync inside its namespace, with quorum tracked there too. All
 * closed at the end (`await using`).
 *
 * @module
 */

import { type CpgLimits, CpgTransport } from "../../src/bus/cpg.ts";
import type { Logger } from "../../src/logger.ts";
import { EventLoop } from "../../src/loop.ts";
import type { Corosync } from "./corosync.ts";

/** The loop and the transports of one test. */
export class TransportHarness implements AsyncDisposable {
  readonly loop = new EventLoop({ timeoutMs: 100 });
  readonly #running = this.loop.run();
  readonly #transports: CpgTransport[] = [];
  readonly #logger: Logger;

  constructor(logger: Logger) {
    this.#logger = logger;
  }

  /** A transport of `corosync`'s node, CPG and quorum opened inside its namespace. */
  connect(
    corosync: Corosync,
    options: { group?: string; limits?: Partial<CpgLimits> } = {},
  ): CpgTransport {
    const transport = CpgTransport.connect({
      loop: this.loop,
      group: options.group,
      logger: this.#logger,
      limits: options.limits,
      open: (callbacks) => corosync.openCpg(callbacks),
      openQuorum: (callbacks) => corosync.openQuorum(callbacks),
    });
    this.#transports.push(transport);
    return transport;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const t of this.#transports) t.close();
    this.loop.stop();
    await this.#running;
    this.loop.close();
  }
}
