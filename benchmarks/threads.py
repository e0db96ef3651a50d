"""CPU threads on a shared machine: training images/s with one thread, with torch's default thread
count (libgomp's default wait policy: waiting threads spin), with that count and
``OMP_WAIT_POLICY=PASSIVE``, and with the count ``balpoe train`` chooses when ``train.threads`` is 0
(:func:`balpoe.runtime.device.auto_threads`: torch's default less the cores the 1-minute load average
says are busy), each on the machine as it is and with another process burning one core
(``python -c 'while True: pass'``; for the automatic count started 60 s before the timing, so that
the load average sees it).

Each setting is one ``benchmarks/speed.py`` run of the CPU demo recipe in a fresh process (the
wait policy is read when torch loads its OpenMP runtime), ``--limit`` training images, one untimed
and ``--epochs`` timed epochs.

    python benchmarks/threads.py                 # writes runs/threads/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from balpoe.runtime.device import auto_threads

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "balpoe" / "fashion_mnist_lt_ir100_cpu_demo.yaml"
#: name -> (threads (0: torch's default, None: auto_threads at the time), OMP_WAIT_POLICY or None for libgomp's)
SETTINGS = {"1 thread": (1, None), "torch's default threads": (0, None),
            "torch's default threads, OMP_WAIT_POLICY=PASSIVE": (0, "PASSIVE"),
            "auto (balpoe train's default)": (None, None)}


def speed(threads: int | None, policy: str | None, limit: int, epochs: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    if threads is None:
        threads = auto_threads()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed.json"
        subprocess.run([sys.executable, str(HERE / "speed.py"), str(RECIPE), "--threads", str(threads),
                        "--limit", str(limit), "--epochs", str(epochs), "--json", str(out)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["modes"]["fast"]["img_per_s"], threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=4096, help="training images (default 4096)")
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs (default 1)")
    ap.add_argument("--out", default="runs/threads")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS to run")
    args = ap.parse_args()
    lines = ["| setting | as it is: img/s (threads) | one core busy: img/s (threads) |", "|---|---:|---:|"]
    for name in args.settings.split(","):
        threads, policy = SETTINGS[name]
        load0 = os.getloadavg()[0]
        idle, n_idle = speed(threads, policy, args.limit, args.epochs)
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            if threads is None:
                time.sleep(60)  # the 1-minute load average auto_threads reads has to see the burner
            load1 = os.getloadavg()[0]
            loaded, n_loaded = speed(threads, policy, args.limit, args.epochs)
        finally:
            burner.kill()
            burner.wait()
        lines.append(f"| {name} | {idle:,.0f} ({n_idle or 'default'}; load {load0:.1f}) | {loaded:,.0f} "
                     f"({n_loaded or 'default'}; load {load1:.1f}) |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = f"{os.cpu_count()} CPUs; load: the 1-minute load average when the timing started"
    (out / "results.md").write_text("\n".join(lines) + f"\n\n{info}\n")
    print("\n".join(lines) + f"\n\n{info}")


if __name__ == "__main__":
    main()
