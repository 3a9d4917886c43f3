"""The baked Numba cache survives a read-only image: ``seed_numba_cache`` (run by
``python -m service`` before the models warm up) copies it into the writable ``NUMBA_CACHE_DIR``,
and a kernel decorated before the copy still loads from it instead of compiling. A small kernel
of the same shape as ``service/labelmap.py``'s stands in for it (that one takes a minute to
compile on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.servers import REPO_ROOT

KERNEL = """
import numpy as np
from numba import njit

@njit(nogil=True, cache=True)
def total(values):
    return values.sum()
"""

# Import the kernel (Numba picks its cache directory now), then maybe seed, then call it.
RUN = """
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import kernel
if len(sys.argv) > 2:
    from service.__main__ import seed_numba_cache
    seed_numba_cache(Path(sys.argv[2]))
kernel.total(np.arange(4.0))
print(json.dumps({"hits": sum(kernel.total.stats.cache_hits.values()),
                  "misses": sum(kernel.total.stats.cache_misses.values())}))
"""


def run(tmp_path: Path, cache_dir: Path, *seed: Path) -> dict[str, int]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path / "src"), *map(str, seed)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_seeded_cache_is_loaded_not_compiled(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "kernel.py").write_text(KERNEL)
    baked = tmp_path / "baked"
    assert run(tmp_path, baked) == {"hits": 0, "misses": 1}  # the image build compiles
    assert any(baked.rglob("*.nbi")) and any(baked.rglob("*.nbc"))
    assert run(tmp_path, tmp_path / "empty") == {"hits": 0, "misses": 1}  # unseeded: compiles
    assert run(tmp_path, tmp_path / "seeded", baked) == {"hits": 1, "misses": 0}
