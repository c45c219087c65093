"""The digits project: detection and segmentation sets drawn from scikit-learn's digits,
compact models sized for a CPU, their ExpandNets, and the demo that compares them.

See ``projects/digits/README.md``. The data generator is :mod:`.digits_data`;
:mod:`.data_hint`, which the configs import, names the command that writes the
data when a config's data is missing.
"""
