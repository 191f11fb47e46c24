"""Runs a command and prints one JSON line: wall seconds, peak anonymous RSS (memory the
process allocated, not file pages it mapped), and peak total RSS, sampled every 20 ms.

    python3 scripts/bench/measure.py LABEL -- COMMAND...
"""

import json
import subprocess
import sys
import time


def status(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmRSS", "RssFile"):
                    fields[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return fields


def main():
    label = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    start = time.time()
    proc = subprocess.Popen(cmd)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        s = status(proc.pid)
        peak_anon = max(peak_anon, s.get("RssAnon", 0))
        peak_rss = max(peak_rss, s.get("VmRSS", 0))
        time.sleep(0.02)
    seconds = time.time() - start
    print(json.dumps({"label": label, "rc": proc.returncode, "seconds": round(seconds, 2),
                      "peak_anon_gb": round(peak_anon / 1e9, 3), "peak_rss_gb": round(peak_rss / 1e9, 3)}), flush=True)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
