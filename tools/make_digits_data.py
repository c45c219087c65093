"""Deprecated path of the digits data generator, ``projects/digits/tools/make_digits_data.py``.

Runs it with the same arguments, after one line on stderr.
"""
from _moved_tool import run_moved_tool  # tools/ is this script's folder, first on sys.path

if __name__ == '__main__':
    run_moved_tool('tools/make_digits_data.py', 'projects/digits/tools/make_digits_data.py')
