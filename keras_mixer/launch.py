"""Runs a command as N JAX processes on this machine: a multi-host run, locally.

    python -m keras_mixer.launch --processes 2 --devices-per-process 4 -- train.py --workdir runs/x
    python -m keras_mixer.launch --processes 2 -- keras-mixer-script args...

Each process gets the variables a cluster would give it (Keras' own:
`KERAS_DISTRIBUTION_JOB_ADDRESSES` naming a free localhost port,
`KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID`),
`KERAS_BACKEND=jax` and, with `--devices-per-process K`, K simulated CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=K`,
`JAX_PLATFORMS=cpu`). So the same `train.py` command that runs on a pod
slice or under SLURM runs here on one machine with real processes, real
cross-process collectives (gloo, turned on by `keras_mixer.distribute`)
and JAX's real coordination service: what the tests use, and a way to try
a multi-host config before paying for one.

Each output line is prefixed with `[process i]`. When a process fails, the
others are given `--grace` seconds to stop by themselves (JAX's
coordination service ends them once it misses the lost process's
heartbeats, from C++ and with a stack trace), then terminated; the last
lines say which process was lost and what to do. The exit status is the
first failing process's (128 + signal for a signal), else 0.

A command that starts with a `.py` file or `-m` runs under this Python.
Standard library only.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


# train.py's exit status after a SIGTERM, once its state is saved.
PREEMPTED = 143


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(index, processes, address, devices_per_process=None, environ=None):
    """The environment of process `index` of `processes`, coordinated at `address`."""
    env = dict(os.environ if environ is None else environ)
    env.update(
        KERAS_BACKEND="jax",
        KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
        KERAS_DISTRIBUTION_NUM_PROCESSES=str(processes),
        KERAS_DISTRIBUTION_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",
    )
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def command_line(command):
    """`command` with this Python in front of a script or a `-m` module."""
    if not command:
        raise ValueError("No command: put it after `--`, e.g. -- train.py --workdir runs/x")
    if command[0].endswith(".py") or command[0] == "-m":
        return [sys.executable] + list(command)
    return list(command)


def _describe(status):
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _pump(stream, prefix, out, lock):
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def _watch(children, grace):
    """Waits for every child; returns `(statuses, (index, status, when) of the
    first failure or None)`. Once one fails, the rest get `grace` seconds to
    stop by themselves, then are killed."""
    # Stop, not ignore: a SIGTERM or Ctrl-C to the launcher goes to every process.
    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first_failure, deadline = None, None
    try:
        while any(child.poll() is None for child in children):
            if first_failure is None:
                for index, child in enumerate(children):
                    status = child.poll()
                    if status not in (None, 0):
                        first_failure, deadline = (index, status, time.monotonic()), time.monotonic() + grace
                        break
            elif time.monotonic() > deadline:
                for child in children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    statuses = [child.wait() for child in children]
    if first_failure is None:
        failed = [i for i, s in enumerate(statuses) if s]
        if failed:
            first_failure = (failed[0], statuses[failed[0]], time.monotonic())
    return statuses, first_failure


def launch(command, processes, devices_per_process=None, grace=60.0, out=None, port=None):
    """Runs `command` as `processes` processes; returns the exit status (see the module)."""
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, got {processes}.")
    out = out or sys.stdout
    argv = command_line(command)
    address = f"localhost:{port or free_port()}"
    lock = threading.Lock()
    children, pumps = [], []
    for index in range(processes):
        child = subprocess.Popen(
            argv, env=process_env(index, processes, address, devices_per_process),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        children.append(child)
        with lock:
            out.write(f"keras_mixer.launch: process {index} of {processes} is pid {child.pid} "
                      f"(coordinator {address})\n")
            out.flush()
        pump = threading.Thread(target=_pump, args=(child.stdout, f"[process {index}] ", out, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    statuses, first_failure = _watch(children, grace)
    for pump in pumps:
        pump.join(timeout=5)
    if first_failure is None:
        return 0
    index, status, when = first_failure
    if set(statuses) <= {0, PREEMPTED}:
        out.write(f"keras_mixer.launch: stopped by SIGTERM (exit status {PREEMPTED}); "
                  "run the same command again to resume.\n")
        out.flush()
        return PREEMPTED
    others = [f"process {i}: {_describe(s)}" for i, s in enumerate(statuses) if i != index]
    with lock:
        out.write(
            f"keras_mixer.launch: process {index} of {processes} {'was lost' if status < 0 else 'failed'} "
            f"({_describe(status)}); "
            f"the others stopped ({'; '.join(others) or 'none'}) within "
            f"{max(0.0, time.monotonic() - when):.0f} s.\n"
            "keras_mixer.launch: a multi-host run needs every process. Fix what ended that process "
            "(its lines above), then start all of them again with the same command: train.py resumes "
            "from the last state in its work directory.\n"
        )
        out.flush()
    return 128 - status if status < 0 else status


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_mixer.launch",
        description="Run a command as N JAX processes on this machine (a multi-host run, locally).",
    )
    parser.add_argument("--processes", type=int, default=2, help="how many processes (default 2)")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="simulated CPU devices per process (default: the machine's devices)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the other processes get to stop after one fails (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- train.py ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return launch(command, args.processes, args.devices_per_process, args.grace)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # not a program, not found, not executable
        print(f"error: cannot start {' '.join(command)}: {error.strerror or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
