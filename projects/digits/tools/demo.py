"""The digits demo: a compact model against its ExpandNet-CL (r=4), trained, contracted, evaluated.

    python projects/digits/tools/demo.py [--quick] [--work-dir work_dirs/demo]
        [--task det|seg|both] [--seed 0] [--jobs auto] [--data-root data/digits64]

``make demo`` runs it; what it does is described in :mod:`projects.digits.demo`
and ``projects/digits/README.md``.
"""
import os
import os.path as osp
import sys

# libgomp spin-waits by default: on a machine whose cores are shared with other
# jobs, every multi-threaded op then waits for a descheduled spinning thread
# (measured here: a 2-thread train step 40x slower than a 1-thread one at load
# 3). Passive waiting removes that. OpenMP reads it once, before torch loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import matplotlib  # noqa: E402

matplotlib.use('Agg')  # headless: the demo only writes files

# The project is imported from the repository root, as OpenMMLab projects are.
REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from expand_mm.cli import run_tool  # noqa: E402

from projects.digits.demo import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(run_tool(main))
