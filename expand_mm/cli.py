"""Shared pieces of the command-line tools."""
import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None``: its help says what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ''
        return super()._get_help_string(action)
