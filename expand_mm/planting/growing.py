"""A planter whose units grow one by one: the widths are chosen step by step, not fixed.

:class:`~expand_mm.planting.ChannelPlanter` plants every unit by the same
fractions at fixed stages. :class:`GrowingPlanter` keeps its masks, its
function-preserving planting step and its freezing, but each planting step
names the units that grow and by how many channels
(:meth:`GrowingPlanter.plant`), so a search can choose where to grow
(:mod:`expand_mm.planting.search`). A step can be tried and undone exactly
(:meth:`GrowingPlanter.snapshot` / :meth:`GrowingPlanter.restore`), and the
cost of the network planted so far -- parameters and multiply-accumulates of
the narrower network the masks stand for -- is counted from the same traced
readers that the freezing uses (:meth:`GrowingPlanter.narrow_cost`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .planter import ChannelPlanter, PlantingError


def start_width(channels: int, fraction: float) -> int:
    """``ceil(fraction * channels)``, at least 1 and at most ``channels``."""
    return min(channels, max(1, math.ceil(fraction * channels - 1e-9)))


class GrowingPlanter(ChannelPlanter):
    """Masks, grows (unit by unit) and freezes the output channels of selected units.

    Args:
        model: The network (its units keep their full, stock widths).
        include: Glob patterns of the units to plant (see
            :class:`~expand_mm.planting.ChannelPlanter`).
        start_fraction: Planted fraction of every unit's channels at the start.
        exclude: Glob patterns of units to keep at full width.
        freeze: ``'all'`` (old entries frozen at every step, the paper) or ``'none'``.
        verify_rtol: Largest accepted relative change of the probe's outputs
            at a planting step.

    Raises:
        PlantingError: On a ``start_fraction`` outside ``(0, 1]`` or the
            :class:`~expand_mm.planting.ChannelPlanter` errors.
    """

    def __init__(self, model: nn.Module, include: Sequence[str], start_fraction: float = 0.25,
                 exclude: Sequence[str] | None = None, freeze: str = 'all',
                 verify_rtol: float = 1e-5) -> None:
        if not 0 < float(start_fraction) <= 1:
            raise PlantingError(f'start_fraction={start_fraction!r} must be in (0, 1], e.g. 0.25')
        super().__init__(model, include, (1.0,), exclude, freeze, verify_rtol)
        for unit in self.units:
            unit.widths = [start_width(unit.conv.out_channels, float(start_fraction))]
        self.fractions = [self.planted_fraction(0)]
        self._spatial: dict[nn.Module, int] = {}

    def _is_final(self) -> bool:
        # Growth is open-ended: the masks stay (at full width they multiply by one) and
        # the channels not planted yet are traced at every step.
        return False

    def planted_fraction(self, stage: int | None = None) -> float:
        """Planted channels over all channels of the units, at ``stage`` (default: now)."""
        stage = self.stage if stage is None else stage
        return (sum(u.widths[stage] for u in self.units)
                / max(1, sum(u.conv.out_channels for u in self.units)))

    def unit_paths(self) -> list[str]:
        """Module paths of the planted units, in model order."""
        return [u.path for u in self.units]

    def widths(self) -> dict[str, int]:
        """``{unit path: planted channels}`` now."""
        return {u.path: u.widths[self.stage] for u in self.units}

    def history(self) -> dict[str, list[int]]:
        """``{unit path: planted channels at each step so far}``: what resuming needs."""
        return {u.path: list(u.widths[:self.stage + 1]) for u in self.units}

    def grown_widths(self, grow: Mapping[str, int]) -> dict[str, int]:
        """The widths after growing unit ``path`` by ``grow[path]`` channels (capped at full).

        Raises:
            PlantingError: If a path is not a planted unit.
        """
        unknown = [p for p in grow if p not in self.widths()]
        if unknown:
            raise PlantingError(f'{unknown} are not planted units; the units are e.g. '
                                f'{self.unit_paths()[:4]}')
        return {u.path: min(u.conv.out_channels, u.widths[self.stage] + int(grow.get(u.path, 0)))
                for u in self.units}

    @torch.no_grad()
    def plant(self, grow: Mapping[str, int], probe: Callable[[], Any]) -> None:
        """Plant ``grow[path]`` more channels into each named unit, keeping the function.

        Freezes everything that existed (``freeze='all'``); the new channels'
        filters, norm parameters and their readers' new input columns train.

        Args:
            grow: ``{unit path: channels to add}``.
            probe: Runs the model on a fixed batch (see
                :meth:`~expand_mm.planting.ChannelPlanter.advance`).

        Raises:
            PlantingError: If nothing would grow, or planting would change the
                function (nothing is changed then).
        """
        widths = self.grown_widths(grow)
        if widths == self.widths():
            raise PlantingError(f'planting {dict(grow)} adds no channel: the units are full')
        for unit in self.units:
            unit.widths = unit.widths[:self.stage + 1] + [widths[unit.path]]
        self.fractions = self.fractions[:self.stage + 1] + [self.planted_fraction(self.stage + 1)]
        self._masks.clear()
        try:
            self.advance(probe)
        except BaseException:
            for unit in self.units:
                unit.widths.pop()
            self.fractions.pop()
            self._masks.clear()
            raise

    def resume(self, history: Mapping[str, Sequence[int]], probe: Callable[[], Any]) -> None:
        """Apply the widths of every step so far (from :meth:`history`), at the last step.

        Raises:
            PlantingError: If ``history`` names other units or its steps differ in number.
        """
        if set(history) != set(self.unit_paths()):
            raise PlantingError(
                f'the recorded planting names units {sorted(history)[:4]}..., this model plants '
                f'{self.unit_paths()[:4]}...: the search was run with other include / exclude')
        lengths = {len(v) for v in history.values()}
        if len(lengths) != 1:
            raise PlantingError(f'the recorded planting has steps of different lengths {lengths}')
        steps = lengths.pop()
        for unit in self.units:
            unit.widths = [int(w) for w in history[unit.path]]
        self.fractions = [self.planted_fraction(s) for s in range(steps)]
        self._masks.clear()
        self.start(steps - 1, probe)

    # ------------------------------------------------------------------ try and undo
    def snapshot(self) -> dict:
        """Everything :meth:`plant` and training change: weights, buffers, gradients, widths."""
        return dict(
            state={k: v.detach().clone() for k, v in self.model.state_dict().items()},
            grads={p: (None if p.grad is None else p.grad.detach().clone())
                   for p in self.model.parameters()},
            widths=[list(u.widths) for u in self.units], fractions=list(self.fractions),
            stage=self.stage, new_columns=dict(self.new_columns),
            unplanted_columns=dict(self.unplanted_columns), rng=torch.get_rng_state(),
            training=self.model.training)

    @torch.no_grad()
    def restore(self, snapshot: dict) -> None:
        """Put the model and the planter back exactly as :meth:`snapshot` found them."""
        for key, value in self.model.state_dict().items():
            value.copy_(snapshot['state'][key])
        for param, grad in snapshot['grads'].items():
            param.grad = grad
        for unit, widths in zip(self.units, snapshot['widths']):
            unit.widths = list(widths)
        self.fractions = list(snapshot['fractions'])
        self.stage = snapshot['stage']
        self.new_columns = dict(snapshot['new_columns'])
        self.unplanted_columns = dict(snapshot['unplanted_columns'])
        self._masks.clear()
        self._install_masks()
        self._refreeze()
        torch.set_rng_state(snapshot['rng'])
        self.model.train(snapshot['training'])

    # ------------------------------------------------------------------------- cost
    def record_spatial_sizes(self, probe: Callable[[], Any]) -> None:
        """Output positions per image of every conv on the probe batch (for MACs)."""
        sizes: dict[nn.Module, int] = {}

        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            sizes[module] = int(out[0, 0].numel()) if out.dim() > 2 else 1

        handles = [m.register_forward_hook(hook) for m in self.model.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                probe()
        finally:
            self.model.train(training)
            for handle in handles:
                handle.remove()
        self._spatial = sizes

    def narrow_cost(self) -> dict[str, int]:
        """``params`` and ``macs`` (per image) of the narrower network planted now.

        Every parameter entry counts but those not planted (the unplanted
        rows of the units and the columns reading unplanted channels, as
        traced at the last step); a conv's or linear layer's planted weight
        entries count once per output position it computed on the probe batch
        (:meth:`record_spatial_sizes`).
        """
        held = self._unplanted_entries()
        params = macs = 0
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                active = param.numel() - (int(held[param].sum()) if param in held else 0)
                params += active
                if name == 'weight' and module in self._spatial:
                    macs += active * self._spatial[module]
        return dict(params=params, macs=macs)

    def full_cost(self) -> dict[str, int]:
        """``params`` and ``macs`` of the stock network, every channel planted."""
        params = sum(p.numel() for p in self.model.parameters())
        macs = sum(m.weight.numel() * n for m, n in self._spatial.items())
        return dict(params=params, macs=macs)
