/**
 * The C library through Deno FFI: one declarative symbol table, the struct layouts and
 * constants the daemon needs, and thin wrappers that turn a failed call into an
 * {@link ErrnoError}.
 *
 * The library is loaded on first use ({@link libc}), so modules that merely import this one
 * still load without `--allow-ffi`. `CLOGD_LIBC` overrides the path (`libc.so.6` by default,
 * found by the dynamic loader). Values are for Linux on x86_64 and aarch64.
 *
 * Hot paths (netlink receive/send, poll) call the raw symbols and read {@link errno} right
 * after a call returned -1: nothing may run in between, because any other call into C (or a
 * garbage collection doing its own system calls) can overwrite errno.
 *
 * 64-bit integer arguments (`size_t`, `off_t`) are passed as bigint: a number there sends the
 * call down Deno's slow path (measured: about 140 ns against 20 ns for a call with a buffer).
 *
 * @module
 */

/** The libc symbols clogd uses. Each parameter is annotated with its C type. */
export const symbols = {
  /** int socket(int domain, int type, int protocol) */
  socket: {
    parameters: [
      "i32", // int domain
      "i32", // int type
      "i32", // int protocol
    ],
    result: "i32",
  },
  /** int bind(int sockfd, const struct sockaddr *addr, socklen_t addrlen) */
  bind: {
    parameters: [
      "i32", // int sockfd
      "buffer", // const struct sockaddr *addr
      "u32", // socklen_t addrlen
    ],
    result: "i32",
  },
  /** int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen) */
  setsockopt: {
    parameters: [
      "i32", // int sockfd
      "i32", // int level
      "i32", // int optname
      "buffer", // const void *optval
      "u32", // socklen_t optlen
    ],
    result: "i32",
  },
  /** int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen) */
  getsockopt: {
    parameters: [
      "i32", // int sockfd
      "i32", // int level
      "i32", // int optname
      "buffer", // void *optval
      "buffer", // socklen_t *optlen
    ],
    result: "i32",
  },
  /** int getsockname(int sockfd, struct sockaddr *addr, socklen_t *addrlen) */
  getsockname: {
    parameters: [
      "i32", // int sockfd
      "buffer", // struct sockaddr *addr
      "buffer", // socklen_t *addrlen
    ],
    result: "i32",
  },
  /**
   * ssize_t recvfrom(int sockfd, void *buf, size_t len, int flags, struct sockaddr *src_addr,
   * socklen_t *addrlen). The address arguments are raw pointers so that the hot path passes
   * preallocated, pinned buffers without converting them on every call.
   */
  recvfrom: {
    parameters: [
      "i32", // int sockfd
      "buffer", // void *buf
      "usize", // size_t len
      "i32", // int flags
      "pointer", // struct sockaddr *src_addr
      "pointer", // socklen_t *addrlen
    ],
    result: "isize",
  },
  /**
   * ssize_t sendto(int sockfd, const void *buf, size_t len, int flags,
   * const struct sockaddr *dest_addr, socklen_t addrlen)
   */
  sendto: {
    parameters: [
      "i32", // int sockfd
      "buffer", // const void *buf
      "usize", // size_t len
      "i32", // int flags
      "pointer", // const struct sockaddr *dest_addr
      "u32", // socklen_t addrlen
    ],
    result: "isize",
  },
  /** int close(int fd) */
  close: {
    parameters: [
      "i32", // int fd
    ],
    result: "i32",
  },
  /**
   * int poll(struct pollfd *fds, nfds_t nfds, int timeout), run on a Deno worker thread so
   * that the JS thread keeps serving timers and promises while it waits. Costs about 40 us per
   * call: wake once, drain everything. The pollfd array must stay referenced until it settles.
   */
  poll_nb: {
    name: "poll",
    parameters: [
      "buffer", // struct pollfd *fds
      "usize", // nfds_t nfds
      "i32", // int timeout
    ],
    result: "i32",
    nonblocking: true,
  },
  /** int poll(struct pollfd *fds, nfds_t nfds, int timeout): only ever with timeout 0. */
  poll: {
    parameters: [
      "buffer", // struct pollfd *fds
      "usize", // nfds_t nfds
      "i32", // int timeout
    ],
    result: "i32",
  },
  /** int eventfd(unsigned int initval, int flags) */
  eventfd: {
    parameters: [
      "u32", // unsigned int initval
      "i32", // int flags
    ],
    result: "i32",
  },
  /** ssize_t read(int fd, void *buf, size_t count) */
  read: {
    parameters: [
      "i32", // int fd
      "buffer", // void *buf
      "usize", // size_t count
    ],
    result: "isize",
  },
  /** ssize_t write(int fd, const void *buf, size_t count) */
  write: {
    parameters: [
      "i32", // int fd
      "buffer", // const void *buf
      "usize", // size_t count
    ],
    result: "isize",
  },
  /**
   * int open(const char *pathname, int flags, ... mode_t mode). Variadic in C; passing the
   * optional mode as a fixed argument is what the x86_64 and aarch64 calling conventions allow.
   */
  open: {
    parameters: [
      "buffer", // const char *pathname
      "i32", // int flags
      "u32", // mode_t mode
    ],
    result: "i32",
  },
  /** ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) */
  pwrite: {
    parameters: [
      "i32", // int fd
      "buffer", // const void *buf
      "usize", // size_t count
      "i64", // off_t offset
    ],
    result: "isize",
  },
  /** int fdatasync(int fd) */
  fdatasync: {
    parameters: [
      "i32", // int fd
    ],
    result: "i32",
  },
  /**
   * ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset), run on a Deno worker
   * thread so that the JS thread keeps serving the kernel while the device works. errno is the
   * worker's: after -1, repeat the call with {@link symbols.pwrite} to learn it. The buffer must
   * stay referenced (and unmoved: an explicit ArrayBuffer) until the call settles.
   */
  pwrite_nb: {
    name: "pwrite",
    parameters: [
      "i32", // int fd
      "buffer", // const void *buf
      "usize", // size_t count
      "i64", // off_t offset
    ],
    result: "isize",
    nonblocking: true,
  },
  /** ssize_t pread(int fd, void *buf, size_t count, off_t offset) */
  pread: {
    parameters: [
      "i32", // int fd
      "buffer", // void *buf
      "usize", // size_t count
      "i64", // off_t offset
    ],
    result: "isize",
  },
  /**
   * ssize_t pread(int fd, void *buf, size_t count, off_t offset) on a Deno worker thread; the
   * same rules as {@link symbols.pwrite_nb}.
   */
  pread_nb: {
    name: "pread",
    parameters: [
      "i32", // int fd
      "buffer", // void *buf
      "usize", // size_t count
      "i64", // off_t offset
    ],
    result: "isize",
    nonblocking: true,
  },
  /**
   * int fdatasync(int fd) on a Deno worker thread: a device cache flush takes milliseconds. Its
   * errno is the worker's and is lost; a failed fdatasync must not be repeated to learn it (Linux
   * reports a writeback error once, so the repeat may return 0).
   */
  fdatasync_nb: {
    name: "fdatasync",
    parameters: [
      "i32", // int fd
    ],
    result: "i32",
    nonblocking: true,
  },
  /** pid_t getpid(void) */
  getpid: { parameters: [], result: "i32" },
  /** int unshare(int flags) */
  unshare: {
    parameters: [
      "i32", // int flags
    ],
    result: "i32",
  },
  /** int setns(int fd, int nstype) */
  setns: {
    parameters: [
      "i32", // int fd
      "i32", // int nstype
    ],
    result: "i32",
  },
  /** int tgkill(pid_t tgid, pid_t tid, int sig): a signal to one thread (tests). */
  tgkill: {
    parameters: [
      "i32", // pid_t tgid
      "i32", // pid_t tid
      "i32", // int sig
    ],
    result: "i32",
  },
  /** int sigaction(int signum, const struct sigaction *act, struct sigaction *oldact) */
  sigaction: {
    parameters: [
      "i32", // int signum
      "buffer", // const struct sigaction *act (NULL: only read)
      "buffer", // struct sigaction *oldact (NULL: not wanted)
    ],
    result: "i32",
  },
  /** int *__errno_location(void): the calling thread's errno. */
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The loaded libc symbols. */
export type Libc = Deno.DynamicLibrary<typeof symbols>["symbols"];

/** Environment variable that overrides the path of the C library. */
export const LIBC_PATH_ENV = "CLOGD_LIBC";
/** Default C library: the glibc soname, found by the dynamic loader. */
export const DEFAULT_LIBC_PATH = "libc.so.6";

let loaded: Libc | undefined;
let errnoView: Deno.UnsafePointerView | undefined;

/**
 * The C library's symbols, loaded on the first call.
 *
 * @throws Error naming the library path that failed to load, with the loader's error as cause
 */
export function libc(): Libc {
  if (loaded === undefined) {
    const path = Deno.env.get(LIBC_PATH_ENV) || DEFAULT_LIBC_PATH;
    try {
      loaded = Deno.dlopen(path, symbols).symbols;
    } catch (cause) {
      throw new Error(
        `Failed to load the C library from "${path}" (set ${LIBC_PATH_ENV} to override)`,
        {
          cause,
        },
      );
    }
  }
  return loaded;
}

/**
 * The calling thread's errno. Read it right after the call that failed. The location is cached:
 * it is fixed per thread, and a module instance lives on one thread (main or Worker).
 */
export function errno(): number {
  if (errnoView === undefined) {
    const location = libc().__errno_location();
    if (location === null) throw new Error("__errno_location() returned NULL");
    errnoView = new Deno.UnsafePointerView(location);
  }
  return errnoView.getInt32(0);
}

// Linux errno names, indexed by number (x86_64/aarch64 generic values; 41 and 58 are unused).
const ERRNO_NAMES = [
  "",
  "EPERM",
  "ENOENT",
  "ESRCH",
  "EINTR",
  "EIO",
  "ENXIO",
  "E2BIG",
  "ENOEXEC",
  "EBADF",
  "ECHILD",
  "EAGAIN",
  "ENOMEM",
  "EACCES",
  "EFAULT",
  "ENOTBLK",
  "EBUSY",
  "EEXIST",
  "EXDEV",
  "ENODEV",
  "ENOTDIR",
  "EISDIR",
  "EINVAL",
  "ENFILE",
  "EMFILE",
  "ENOTTY",
  "ETXTBSY",
  "EFBIG",
  "ENOSPC",
  "ESPIPE",
  "EROFS",
  "EMLINK",
  "EPIPE",
  "EDOM",
  "ERANGE",
  "EDEADLK",
  "ENAMETOOLONG",
  "ENOLCK",
  "ENOSYS",
  "ENOTEMPTY",
  "ELOOP",
  "",
  "ENOMSG",
  "EIDRM",
  "ECHRNG",
  "EL2NSYNC",
  "EL3HLT",
  "EL3RST",
  "ELNRNG",
  "EUNATCH",
  "ENOCSI",
  "EL2HLT",
  "EBADE",
  "EBADR",
  "EXFULL",
  "ENOANO",
  "EBADRQC",
  "EBADSLT",
  "",
  "EBFONT",
  "ENOSTR",
  "ENODATA",
  "ETIME",
  "ENOSR",
  "ENONET",
  "ENOPKG",
  "EREMOTE",
  "ENOLINK",
  "EADV",
  "ESRMNT",
  "ECOMM",
  "EPROTO",
  "EMULTIHOP",
  "EDOTDOT",
  "EBADMSG",
  "EOVERFLOW",
  "ENOTUNIQ",
  "EBADFD",
  "EREMCHG",
  "ELIBACC",
  "ELIBBAD",
  "ELIBSCN",
  "ELIBMAX",
  "ELIBEXEC",
  "EILSEQ",
  "ERESTART",
  "ESTRPIPE",
  "EUSERS",
  "ENOTSOCK",
  "EDESTADDRREQ",
  "EMSGSIZE",
  "EPROTOTYPE",
  "ENOPROTOOPT",
  "EPROTONOSUPPORT",
  "ESOCKTNOSUPPORT",
  "EOPNOTSUPP",
  "EPFNOSUPPORT",
  "EAFNOSUPPORT",
  "EADDRINUSE",
  "EADDRNOTAVAIL",
  "ENETDOWN",
  "ENETUNREACH",
  "ENETRESET",
  "ECONNABORTED",
  "ECONNRESET",
  "ENOBUFS",
  "EISCONN",
  "ENOTCONN",
  "ESHUTDOWN",
  "ETOOMANYREFS",
  "ETIMEDOUT",
  "ECONNREFUSED",
  "EHOSTDOWN",
  "EHOSTUNREACH",
  "EALREADY",
  "EINPROGRESS",
  "ESTALE",
  "EUCLEAN",
  "ENOTNAM",
  "ENAVAIL",
  "EISNAM",
  "EREMOTEIO",
  "EDQUOT",
  "ENOMEDIUM",
  "EMEDIUMTYPE",
  "ECANCELED",
  "ENOKEY",
  "EKEYEXPIRED",
  "EKEYREVOKED",
  "EKEYREJECTED",
  "EOWNERDEAD",
  "ENOTRECOVERABLE",
  "ERFKILL",
  "EHWPOISON",
] as const;

/** The symbolic name of an errno value, e.g. `errnoName(11) === "EAGAIN"`. */
export function errnoName(code: number): string {
  return ERRNO_NAMES[code] || `errno ${code}`;
}

/** Operation not permitted (missing capability). */
export const EPERM = 1;
/** Interrupted system call. */
export const EINTR = 4;
/** Bad file descriptor. */
export const EBADF = 9;
/** Bad address (a pointer outside the process). */
export const EFAULT = 14;
/** Try again (nothing to read, or no room to queue a send on a nonblocking socket). */
export const EAGAIN = 11;
/** Invalid argument. */
export const EINVAL = 22;
/** Not a socket. */
export const ENOTSOCK = 88;
/** No buffer space: on a netlink receive, datagrams were dropped because we fell behind. */
export const ENOBUFS = 105;
/** Connection refused: a netlink unicast to a port id nobody holds. */
export const ECONNREFUSED = 111;

/**
 * Most distinct lengths {@link sizeT} keeps. Datagram lengths on the connector link take a few
 * dozen values (one per request type and payload), so this is never reached in practice.
 */
export const MAX_CACHED_SIZES = 4096;

const sizes = new Map<number, bigint>();

/**
 * `n` as the bigint a `size_t` parameter takes, without allocating on the hot path:
 * `BigInt(n)` allocates a heap object on every call, so each length is converted once.
 */
export function sizeT(n: number): bigint {
  let size = sizes.get(n);
  if (size === undefined) {
    size = BigInt(n);
    if (sizes.size < MAX_CACHED_SIZES) sizes.set(n, size);
  }
  return size;
}

/** A C call failed; carries errno and the name of the call. */
export class ErrnoError extends Error {
  /** The errno value the call left. */
  readonly errno: number;
  /** The C function that failed, e.g. `"recvfrom"`. */
  readonly syscall: string;

  /** `new ErrnoError("recvfrom", 11)` has the message "recvfrom failed: EAGAIN (11)". */
  constructor(syscall: string, code: number, options?: ErrorOptions) {
    super(`${syscall} failed: ${errnoName(code)} (${code})`, options);
    this.name = "ErrnoError";
    this.errno = code;
    this.syscall = syscall;
  }
}

/** Throws an {@link ErrnoError} with the current errno when `result` is negative. */
export function check<T extends number | bigint>(syscall: string, result: T): T {
  if (result < 0) throw new ErrnoError(syscall, errno());
  return result;
}

// ---- Constants (Linux UAPI) ----

/** Address family of netlink sockets. */
export const AF_NETLINK = 16;
/** Datagram socket type. */
export const SOCK_DGRAM = 2;
/** `socket()` type flag: nonblocking from the start. */
export const SOCK_NONBLOCK = 0o4000;
/** `socket()` type flag: close on exec, so child processes do not inherit it. */
export const SOCK_CLOEXEC = 0o2000000;
/** `setsockopt()` level for generic socket options. */
export const SOL_SOCKET = 1;
/** Send buffer size, capped by net.core.wmem_max. */
export const SO_SNDBUF = 7;
/** Receive buffer size, capped by net.core.rmem_max. */
export const SO_RCVBUF = 8;
/** Send buffer size ignoring wmem_max (needs CAP_NET_ADMIN). */
export const SO_SNDBUFFORCE = 32;
/** Receive buffer size ignoring rmem_max (needs CAP_NET_ADMIN). */
export const SO_RCVBUFFORCE = 33;
/** `setsockopt()` level for netlink options. */
export const SOL_NETLINK = 270;
/** Netlink option: join a multicast group (by number, not mask). */
export const NETLINK_ADD_MEMBERSHIP = 1;
/** `recvfrom()`/`sendto()` flag: do not block. */
export const MSG_DONTWAIT = 0x40;
/** `recvfrom()` flag: return the datagram's real length even when it did not fit. */
export const MSG_TRUNC = 0x20;
/** `eventfd()` flag: nonblocking. */
export const EFD_NONBLOCK = 0o4000;
/** `eventfd()` flag: close on exec. */
export const EFD_CLOEXEC = 0o2000000;
/** `open()` flag: read only. */
export const O_RDONLY = 0;
/** `open()` flag: close on exec. */
export const O_CLOEXEC = 0o2000000;
/** `open()` flag: read and write. */
export const O_RDWR = 2;
/**
 * `open()` flag: transfer straight between the user buffer and the device, bypassing the page
 * cache; offsets, lengths and the buffer address must be aligned (to the logical block size).
 * The value differs by architecture: 0o40000 on x86_64, 0o200000 on aarch64 (where 0o40000 is
 * O_DIRECTORY).
 */
export const O_DIRECT = Deno.build.arch === "aarch64" ? 0o200000 : 0o40000;
/** `setns()`/`unshare()` flag: network namespace. */
export const CLONE_NEWNET = 0x40000000;
/** User signal 1. */
export const SIGUSR1 = 10;
/** User signal 2. */
export const SIGUSR2 = 12;
/** Signal disposition: the default action. */
export const SIG_DFL = 0n;
/** Signal disposition: ignore. */
export const SIG_IGN = 1n;
/** `poll()` event: readable. */
export const POLLIN = 0x1;
/** `poll()` event: error condition (always reported). */
export const POLLERR = 0x8;
/** `poll()` event: hang up (always reported). */
export const POLLHUP = 0x10;
/** `poll()` event: the fd is not open (always reported). */
export const POLLNVAL = 0x20;

// ---- Struct layouts ----

/** `struct sockaddr_nl`: `u16 nl_family @0, u16 pad @2, u32 nl_pid @4, u32 nl_groups @8`. */
export const SOCKADDR_NL = { size: 12, family: 0, pid: 4, groups: 8 } as const;
/**
 * glibc's `struct sigaction`: `handler @0` (8 bytes), `sa_mask @8` (128), `int sa_flags @136`,
 * `sa_restorer @144` (8); glibc fills in the restorer itself.
 */
export const SIGACTION = { size: 152, handler: 0, mask: 8, flags: 136 } as const;
/** `struct pollfd`: `int fd @0, short events @4, short revents @6`. */
export const POLLFD = { size: 8, fd: 0, events: 4, revents: 6 } as const;

/**
 * A `struct sockaddr_nl` in its own ArrayBuffer. An explicit ArrayBuffer keeps the bytes off the
 * V8 heap, so a pointer taken once with `Deno.UnsafePointer.of` stays valid while it is referenced.
 */
export function sockaddrNl(pid: number, groups: number): Uint8Array {
  const bytes = new Uint8Array(new ArrayBuffer(SOCKADDR_NL.size));
  const view = new DataView(bytes.buffer);
  view.setUint16(SOCKADDR_NL.family, AF_NETLINK, true);
  view.setUint32(SOCKADDR_NL.pid, pid, true);
  view.setUint32(SOCKADDR_NL.groups, groups, true);
  return bytes;
}

// ---- Wrappers for the calls that are not on a hot path ----

const intArg = new Int32Array(1);
const intBytes = new Uint8Array(intArg.buffer);
const lengthArg = new Uint32Array(1);
const lengthBytes = new Uint8Array(lengthArg.buffer);

/** `socket()`; returns the new fd. */
export function socket(domain: number, type: number, options: { protocol: number }): number {
  return check("socket", libc().socket(domain, type, options.protocol));
}

/** `bind()` to an address held in `addr`. */
export function bind(fd: number, addr: Uint8Array): void {
  check("bind", libc().bind(fd, addr, addr.byteLength));
}

/** `setsockopt()` of an `int` option. */
export function setsockoptInt(
  fd: number,
  option: { level: number; name: number; value: number },
): void {
  intArg[0] = option.value;
  check("setsockopt", libc().setsockopt(fd, option.level, option.name, intBytes, 4));
}

/** `getsockopt()` of an `int` option. */
export function getsockoptInt(fd: number, option: { level: number; name: number }): number {
  lengthArg[0] = 4;
  check("getsockopt", libc().getsockopt(fd, option.level, option.name, intBytes, lengthBytes));
  return intArg[0];
}

/** `getsockname()` into `addr`; returns the address length the kernel reported. */
export function getsockname(fd: number, addr: Uint8Array): number {
  lengthArg[0] = addr.byteLength;
  check("getsockname", libc().getsockname(fd, addr, lengthBytes));
  return lengthArg[0];
}

/** `close()`. */
export function close(fd: number): void {
  check("close", libc().close(fd));
}

/** `eventfd()`; returns the new fd. */
export function eventfd(initval: number, flags: number): number {
  return check("eventfd", libc().eventfd(initval, flags));
}

/** `open()` of an existing file (no O_CREAT); returns the new fd. */
export function open(path: string, flags: number): number {
  const bytes = new TextEncoder().encode(path + "\0");
  return check("open", libc().open(bytes, flags, 0));
}

/** `setns()`: move the calling thread into the namespace `fd` refers to. */
export function setns(fd: number, nstype: number): void {
  check("setns", libc().setns(fd, nstype));
}

/** `unshare()`: give the calling thread new namespaces of the kinds in `flags`. */
export function unshare(flags: number): void {
  check("unshare", libc().unshare(flags));
}

/**
 * The current disposition of `signum`: {@link SIG_DFL}, {@link SIG_IGN} or the address of a
 * handler.
 */
export function signalDisposition(signum: number): bigint {
  const old = new Uint8Array(SIGACTION.size);
  check("sigaction", libc().sigaction(signum, null, old));
  return new DataView(old.buffer).getBigUint64(SIGACTION.handler, true);
}

/** Sets `signum` to be ignored (SIG_IGN): it neither reaches a handler nor kills the process. */
export function ignoreSignal(signum: number): void {
  const act = new Uint8Array(SIGACTION.size);
  new DataView(act.buffer).setBigUint64(SIGACTION.handler, SIG_IGN, true);
  check("sigaction", libc().sigaction(signum, act, null));
}

/** `tgkill()`: sends `signal` to thread `tid` of process `tgid`. */
export function tgkill(tgid: number, tid: number, options: { signal: number }): void {
  check("tgkill", libc().tgkill(tgid, tid, options.signal));
}

/** `getpid()`. */
export function getpid(): number {
  return libc().getpid();
}
