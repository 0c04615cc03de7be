/**
 * The dm-log-userspace wire protocol: constants, header layouts and the decoded request type.
 *
 * Facts from include/uapi/linux/dm-log-userspace.h, drivers/md/dm-log-userspace-transfer.c and
 * the 2009 "cluster log" patch (see README, "Kernel protocol"). Everything on this link is
 * host-endian (x86_64: little-endian); the link never leaves the machine.
 *
 * @module
 */

/** Netlink protocol number of the connector (NETLINK_CONNECTOR). */
export const NETLINK_CONNECTOR = 11;
/** Connector index of device-mapper (CN_IDX_DM); also the multicast group the kernel sends to. */
export const CN_IDX_DM = 7;
/** Connector value of the userspace dirty log (CN_VAL_DM_USERSPACE_LOG). */
export const CN_VAL_DM_USERSPACE_LOG = 1;
/** Largest connector message the kernel accepts (CONNECTOR_MAX_MSG_SIZE). */
export const CONNECTOR_MAX_MSG_SIZE = 16384;

/** Size of `struct nlmsghdr`. */
export const NLMSG_HDRLEN = 16;
/** Netlink message type the connector uses for every message. */
export const NLMSG_DONE = 3;
/** Size of `struct cn_msg` (idx, val, seq, ack, len, flags). */
export const CN_MSG_LEN = 20;
/** Bytes before the dm-log-userspace request header in one datagram. */
export const FRAME_OVERHEAD = NLMSG_HDRLEN + CN_MSG_LEN;

/** Size of the current `struct dm_ulog_request` header (luid + version). */
export const HEADER_LEN_CURRENT = 160;
/** Size of the 2009 `struct dm_clog_request` header (no luid, no version). */
export const HEADER_LEN_2009 = 152;

/**
 * The kernel's preallocated request buffer is 512 bytes; minus cn_msg and the current header
 * this leaves 332 payload bytes. The kernel never sends more, so a longer payload is malformed.
 */
export const KERNEL_MAX_PAYLOAD = 332;

/** Highest DM_ULOG_REQUEST_VERSION we know (Debian 12's 6.1 kernel sends 3). */
export const MAX_KNOWN_VERSION = 3;

/** At most this many regions in one MARK, CLEAR or integrated FLUSH (the kernel's group size). */
export const MAX_REGIONS_PER_REQUEST = 32;

/** Which request header layout a datagram uses. */
export type HeaderLayout = "current" | "2009";

/** Request types: the same numbers in both layouts. `type & 0xFF`; the upper bits are reserved. */
export const RequestType = {
  CTR: 1,
  DTR: 2,
  PRESUSPEND: 3,
  POSTSUSPEND: 4,
  RESUME: 5,
  GET_REGION_SIZE: 6,
  IS_CLEAN: 7,
  IN_SYNC: 8,
  FLUSH: 9,
  MARK_REGION: 10,
  CLEAR_REGION: 11,
  GET_RESYNC_WORK: 12,
  SET_REGION_SYNC: 13,
  GET_SYNC_COUNT: 14,
  STATUS_INFO: 15,
  STATUS_TABLE: 16,
  IS_REMOTE_RECOVERING: 17,
} as const;

/** One of the 17 request type numbers. */
export type RequestType = typeof RequestType[keyof typeof RequestType];

/** Mask applied to `request_type` on receipt (DM_ULOG_REQUEST_MASK). */
export const REQUEST_TYPE_MASK = 0xff;

const NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(RequestType).map(([name, n]) => [n, name]),
);

/** The name of a request type number, e.g. `requestTypeName(9) === "FLUSH"`. */
export function requestTypeName(type: number): string {
  return NAMES[type] ?? `UNKNOWN(${type})`;
}

/** True when `type` is one of the 17 known request types. */
export function isRequestType(type: number): type is RequestType {
  return type >= RequestType.CTR && type <= RequestType.IS_REMOTE_RECOVERING;
}

/**
 * Size of the reply buffer the kernel offers per request type, in bytes. A full reply carrying
 * more data makes the kernel fail the call with -ENOSPC. STATUS_INFO/STATUS_TABLE: "the rest of
 * the status buffer", which we do not know; we cap status text at {@link MAX_STATUS_REPLY}.
 */
export const REPLY_CAPACITY: Record<RequestType, number> = {
  1: 128, // CTR: optional NUL-terminated device name (version >= 2); 0 on a re-CTR
  2: 0,
  3: 0,
  4: 0,
  5: 0,
  6: 8, // u64 region size
  7: 8, // s64 is_clean
  8: 8, // s64 in_sync
  9: 0,
  10: 0,
  11: 0,
  12: 16, // {s64 i; u64 r}
  13: 0,
  14: 8, // u64 sync count
  15: 128,
  16: 128,
  17: 16, // {s64 is_recovering; u64 in_sync_hint}
};

/** Longest status text we send (the kernel's status buffer is at least this big in practice). */
export const MAX_STATUS_REPLY = 128;

/** Linux errno values we use (positive; replies carry them negated). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EIO: 5,
  EAGAIN: 11,
  ENOMEM: 12,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENOSPC: 28,
  ERANGE: 34,
  ENOSYS: 38,
  EBADMSG: 74,
  EMSGSIZE: 90,
  EPROTO: 71,
  ETIMEDOUT: 110,
} as const;

/** Addressing of one datagram: who sent it and the connector fields to echo back. */
export interface Frame {
  /** Netlink port id of the sender (`recvfrom`'s `nl_pid`): 0 for the kernel. */
  portId: number;
  /** `cn_msg.seq` of the request. */
  cnSeq: number;
  /** `cn_msg.ack` of the request. */
  cnAck: number;
}

/** One decoded, validated kernel request. */
export interface Request {
  /** Header layout the datagram used. */
  layout: HeaderLayout;
  /** Kernel log pointer (current layout), 0n in the 2009 layout. */
  luid: bigint;
  /** Mirror log UUID (text before the first NUL). */
  uuid: string;
  /** DM_ULOG_REQUEST_VERSION (current layout), 0 in the 2009 layout. */
  version: number;
  /** The kernel's request sequence number: the only thing replies are matched on. */
  seq: number;
  /** `request_type & 0xFF`, one of the 17 known types. */
  type: RequestType;
  /** The raw `request_type` field, upper bits included. */
  rawType: number;
  /** Payload bytes (`data_size` of them), a view into the received datagram. */
  payload: Uint8Array;
  /** Addressing, for the reply. */
  frame: Frame;
}

/** What the daemon answers to one request. */
export interface Reply {
  /** 0 or a positive errno (sent negated in a full reply, positive in an ACK). */
  errno: number;
  /** Reply payload (must fit {@link REPLY_CAPACITY} for the type). */
  data?: Uint8Array;
}

/** Stable name for a log: uuid plus luid (two tables of one UUID differ in luid). */
export function logKey(uuid: string, luid: bigint): string {
  return `${uuid}/${luid.toString(16)}`;
}
