/**
 * Loading a shared library once per path, with an error that says what to install.
 *
 * @module
 */

/** What {@link cachedDlopen} needs to know about one library. */
export interface LibrarySpec {
  /** Environment variable that overrides the path, e.g. "CLOGD_LIBCPG". */
  env: string;
  /** The soname the dynamic loader finds, e.g. "libcpg.so.4". */
  soname: string;
  /** What it is, for the error: e.g. "corosync's CPG library". */
  what: string;
  /** The Debian package that provides it, e.g. "libcpg4". */
  pkg: string;
}

/**
 * The symbols of the library at `path` (default: `$env`, else the soname), loaded on the first
 * call for that path and kept in `cache`: a daemon loads one library, tests may load another
 * through the override.
 *
 * @throws Error naming the library path that failed to load, with the loader's error as cause
 */
export function cachedDlopen<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
  spec: LibrarySpec,
  cache: Map<string, Deno.DynamicLibrary<S>["symbols"]>,
  path?: string,
): Deno.DynamicLibrary<S>["symbols"] {
  const resolved = path || Deno.env.get(spec.env) || spec.soname;
  let lib = cache.get(resolved);
  if (lib === undefined) {
    try {
      lib = Deno.dlopen(resolved, symbols).symbols;
    } catch (cause) {
      throw new Error(
        `Failed to load ${spec.what} from "${resolved}" (install ${spec.pkg}, or set ${spec.env} to override)`,
        { cause },
      );
    }
    cache.set(resolved, lib);
  }
  return lib;
}
