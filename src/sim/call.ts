/**
 * One request of the simulated kernel (one try: a resend is a new {@link Call} with a new seq),
 * shared by the kernel model (src/sim/model.ts) and the answer checker (src/sim/checker.ts).
 *
 * @module
 */

import type { HeaderLayout } from "../kernel/protocol.ts";

/** Where a call is in its life. */
export const CallState = {
  /** Queued for the driver to send, or sent and waiting for its reply. */
  WAITING: 0,
  /** A reply arrived (errno and values are set). */
  REPLIED: 1,
  /** No reply within the timeout: the kernel resends with a new seq. */
  TIMED_OUT: 2,
  /** The send itself failed (e.g. -ESRCH: nobody listens on group 7). */
  SEND_FAILED: 3,
} as const;

/** Why a call was sent: by the emulated kernel, as a probe of the sim, or deliberately bad. */
export const CallKind = {
  /** A request the real kernel makes (the workload's mirror, log and region hash). */
  KERNEL: 0,
  /** An extra read-only question the real kernel never asks (IS_CLEAN), to check answers. */
  PROBE: 1,
  /** A deliberately malformed or misdirected request that must get an error reply. */
  BAD: 2,
} as const;

/** A bad request's expectation: any error reply. */
export const EXPECT_ERROR = -1;
/** A bad request's expectation: an error reply, or no reply at all (dropped with a log line). */
export const EXPECT_ERROR_OR_DROP = -2;

/** The identity of the log a call is about, as the header carries it. */
export interface LogIdentity {
  readonly uuid: string;
  readonly luid: bigint;
}

/** A request to send: what the driver encodes (see `encodeRequest` in src/kernel/codec.ts). */
export interface OutgoingRequest {
  readonly layout: HeaderLayout;
  readonly luid: bigint;
  readonly uuid: string;
  readonly version: number;
  readonly seq: number;
  readonly type: number;
  readonly payload: Uint8Array;
}

/** One try of one request. Fields are public for speed; only the model writes them. */
export class Call implements OutgoingRequest {
  layout: HeaderLayout = "current";
  luid = 0n;
  uuid = "";
  version = 0;
  seq = 0;
  type = 0;
  payload: Uint8Array = EMPTY;
  /** Reply bytes the kernel offers for this request (more fails with -ENOSPC). */
  cap = 0;
  /**
   * What the kernel's reply-size variable holds after this call (fill_pkg writes it): a full
   * reply's data_size, 0 after an ACK (except -EAGAIN) or an over-capacity reply, unchanged
   * when the send failed. userspace_do_request reuses the variable for its -ESRCH retry and
   * dm_consult_userspace for its -EAGAIN resend, so it becomes the next try's capacity.
   */
  capAfter = 0;
  kind: number = CallKind.KERNEL;
  /** For {@link CallKind.BAD}: expected positive errno, {@link EXPECT_ERROR} or {@link EXPECT_ERROR_OR_DROP}. */
  expect = 0;
  /** A CTR resent after -ESRCH (NUL counted, no reply room). */
  reCtr = false;
  /** Index of the simulated log in the model (-1 for none). */
  logIndex = -1;
  /** First region of the payload (IN_SYNC, IS_CLEAN, SET_REGION_SYNC, IS_REMOTE_RECOVERING), or -1. */
  region = -1;
  /** Regions of a MARK, CLEAR or FLUSH payload, or null. */
  regions: number[] | null = null;
  /** Model time the request was handed to the driver, in ms. */
  sentAt = 0;
  /** Model time after which the kernel gives up on this try. */
  deadline = 0;
  /** The checker's knowledge epoch when sent (a daemon restart starts a new one). */
  epoch = 0;
  state: number = CallState.WAITING;
  /** Outcome: positive errno the kernel acts on (0 = success). */
  errno = 0;
  /** Outcome: first value of the reply (sizes, flags, counts), 0 on failure. */
  v0 = 0;
  /** Outcome: second value of the reply (resync region, in_sync_hint), 0 on failure. */
  v1 = 0;
  /** Outcome: text of a STATUS_INFO or CTR reply. */
  text = "";
  /** Reply data bytes (0 for an ACK). */
  dataLength = 0;
  /** Checker snapshots taken at send time. */
  snap0 = 0;
  snap1 = 0;
  snap2 = 0;
  snap3 = 0;
  /** The emulated kernel thread waiting for this call (opaque to the checker). */
  waiter: unknown = null;
}

/** A shared empty payload. */
export const EMPTY = new Uint8Array(0);
