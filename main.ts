/**
 * clogd: the cluster mirror log daemon. Entry point and command dispatch.
 *
 *   clogd serve [--standalone] [--accept-user-peers] [--log-level L] [--control PATH]
 *   clogd status [--json] [--control PATH]
 *   clogd kernel-sim [options]
 *
 * @module
 */

const USAGE =
  `clogd: user-space dirty-region log daemon for device-mapper mirrors (dm-log-userspace)

Usage: clogd <command> [options]

Commands:
  serve        run the daemon in the foreground
  status       ask a running daemon for the state of every log
  kernel-sim   play the kernel's side over netlink (tests, demos, benchmarks)
  help         show this text

Run "clogd <command> --help" for a command's options.
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case "serve": {
      const { serveCommand } = await import("./src/cli/serve.ts");
      return await serveCommand(rest);
    }
    case "status": {
      const { statusCommand } = await import("./src/cli/status.ts");
      return await statusCommand(rest);
    }
    case "kernel-sim": {
      const { runKernelSim } = await import("./src/sim/cli.ts");
      return await runKernelSim(rest);
    }
    case undefined:
    case "help":
    case "--help":
    case "-h":
      console.log(USAGE);
      return cmd === undefined ? 2 : 0;
    default:
      console.error(`clogd: unknown command "${cmd}"\n\n${USAGE}`);
      return 2;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
