"""Deprecated path of the demo, ``projects/digits/tools/demo.py`` (``make demo`` runs it).

Runs it with the same arguments, after one line on stderr.
"""
from _moved_tool import run_moved_tool  # tools/ is this script's folder, first on sys.path

if __name__ == '__main__':
    run_moved_tool('tools/demo.py', 'projects/digits/tools/demo.py')
