"""Start N training processes on this machine, each with its own fake CPU devices, joined by
``jax.distributed`` exactly as on a cluster: the multi-host code path, testable without one.

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 2 -- \
      --config configs/tiny.py --workdir runs/multi

Everything after ``--`` goes to ``python -m hrdecoder_jax.train``. Exits with the first non-zero status;
the other processes are stopped then.
"""
import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    train_args = [a for a in args.train_args if a != "--"]
    address = f"127.0.0.1:{args.port or free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = []
    for i in range(args.num_processes):
        cmd = [sys.executable, "-m", "hrdecoder_jax.train", *train_args,
               f"--coordinator_address={address}", f"--num_processes={args.num_processes}",
               f"--process_id={i}", f"--num_cpu_devices={args.devices_per_process}"]
        procs.append(subprocess.Popen(cmd, env=env))
    # A process that fails leaves its peers waiting in a collective until jax.distributed's timeouts
    # (minutes): stop them as soon as one exits with an error, as a cluster scheduler would.
    while True:
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            print(f"local_multiprocess: a process exited with {bad[0]}; stopped the others", file=sys.stderr)
            return bad[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
