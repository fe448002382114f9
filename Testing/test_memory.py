"""The allocator setting of UniversalSeg's own processes (``memory.tune_allocator``), in fresh processes."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A segmentation's pattern: one big block freed (glibc then raises its mapping threshold to its size), then
# many 2 MB temporaries. Prints how much the heap grew while they were alive and how much of that was
# still resident after they were freed.
_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from UniversalSegLib.memory import tune_allocator

    def heap_kb():
        rss, inside = 0, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if fields and "-" in fields[0] and ":" not in fields[0]:
                inside = fields[-1] == "[heap]"
            elif inside and fields[0] == "Rss:":
                rss += int(fields[1])
        return rss

    tuned = tune_allocator() if {tune} else None
    big = np.ones(2**24, dtype=np.uint8)  # below 32 MB: glibc adapts its threshold only up to that
    del big
    start = heap_kb()
    blocks = [np.ones(2**21, dtype=np.uint8) for _ in range(20)]
    grown = heap_kb() - start
    del blocks
    print(json.dumps({{"tuned": tuned, "grown_mb": grown / 1024, "kept_mb": (heap_kb() - start) / 1024}}))
""")


def _probe(tune: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(repo=str(REPO), tune=tune)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator and /proc/self/smaps")
def test_big_temporaries_stay_out_of_the_heap():
    untuned = _probe(tune=False)
    assert untuned["grown_mb"] > 30  # the default: 40 MB of 2 MB blocks land in the heap (the probe sees it)
    tuned = _probe(tune=True)
    assert tuned["tuned"] is True
    assert tuned["grown_mb"] < 5 and tuned["kept_mb"] < 5, tuned  # each block mapped on its own, and unmapped
