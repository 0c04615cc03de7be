/**
 * The kernel simulator: a pure model of the kernel's side of dm-log-userspace (mirror, region
 * hash, userspace log, transport), the checker of the daemon's answers, a seeded workload, and
 * the netlink driver that runs them against a real daemon.
 *
 * Pure (no I/O, no clock; usable by the cluster simulator): {@link KernelModel},
 * {@link Workload}, {@link LogChecker}, {@link ViolationLog}, {@link Histogram}, {@link Prng}.
 * I/O: {@link runDriver} (netlink socket) and {@link runKernelSim} (the CLI).
 *
 * @module
 */

export {
  BAD_REQUEST_KINDS,
  BadRequest,
  type Command,
  ctrString,
  KERNEL_DEFAULTS,
  type KernelHooks,
  KernelModel,
  type KernelOptions,
  type KernelStats,
  type MirrorSpec,
  type MirrorState,
  type MirrorSummary,
  type ModelReply,
} from "./model.ts";
export { Call, CallKind, CallState, type OutgoingRequest } from "./call.ts";
export {
  type CheckerConfig,
  LogChecker,
  Mark,
  Sync,
  type Violation,
  type ViolationKind,
  ViolationLog,
} from "./checker.ts";
export {
  type Phase,
  type RunSummary,
  Workload,
  WORKLOAD_DEFAULTS,
  type WorkloadOptions,
} from "./workload.ts";
export { Histogram, type LatencySummary } from "./histogram.ts";
export { Prng } from "./prng.ts";
export {
  daemonListening,
  DRIVER_DEFAULTS,
  type DriverOptions,
  type DriverResult,
  runDriver,
} from "./driver.ts";
export { type KernelSimReport, runKernelSim } from "./cli.ts";
