"""Runs a tool from its new path: what a tool's old path keeps, so old commands still work."""
import os.path as osp
import runpy
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_moved_tool(old: str, new: str) -> None:
    """Says on stderr that ``old`` is deprecated and runs ``new`` with this process's arguments.

    Args:
        old: The tool's old path, from the repository root.
        new: Its path now, from the repository root.
    """
    print(f'{old} is deprecated: run {new}', file=sys.stderr)
    sys.argv[0] = osp.join(REPO_ROOT, new)
    runpy.run_path(sys.argv[0], run_name='__main__')
