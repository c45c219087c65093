"""Worked examples built on expand_mm, in the OpenMMLab ``projects/`` convention.

Each project keeps its configs, tools and code together and is imported from
the repository root (``custom_imports = dict(imports=['projects.<name>...'])``
in its configs), as OpenMMLab projects are.
"""
