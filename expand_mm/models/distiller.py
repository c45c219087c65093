"""``type='Distiller'``: knowledge distillation into a (possibly expanded) student.

ExpandNets combine with knowledge distillation (Guo et al., NeurIPS 2020): the
expanded student learns from a trained teacher's outputs as well as from the
labels, and is contracted to the compact model afterwards. The distiller is a
training-time wrapper (see :mod:`expand_mm.models.wrappers`): the student is the
deployable network, everything else -- the frozen teacher, the feature
adapters -- exists only for training and is left out of the compact checkpoint
that :class:`~expand_mm.hooks.ContractCheckpointHook` writes.

Three distillation losses, registered in MMEngine's ``MODELS``, read the
outputs of named modules of the student and the teacher during the student's
``loss()`` and the teacher's forward:

* :class:`LogitsKDLoss` -- Hinton's KD on dense logits: ``softmax`` (pixel-wise
  KL of the softened decode-head logits, resized to a common size) or
  ``sigmoid`` (per-element Bernoulli KL, i.e. BCE against the teacher's
  probabilities, e.g. the objectness / class maps of a YOLOv3 head).
* :class:`FeatureImitationLoss` -- MSE between student and teacher feature
  maps (e.g. the neck's) through training-only 1x1 conv adapters (FitNets).
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import load_checkpoint
from torch import Tensor, nn

from ..checkpoint import (CheckpointError, compare_state_dict, match_state_dict, read_checkpoint,
                          strip_prefix)
from ..errors import ConfigError, ConfigTypeError, MissingFileError, SetupError
from .model_cfg import check_model_overrides
from .wrappers import TrainingWrapper, build_inner_model, get_submodule, record_forward

DISTILLER_KEYS = ('student', 'teacher', 'teacher_ckpt', 'distill_losses', 'data_preprocessor',
                  'init_cfg')


def _flatten(out: Any, key: str) -> list[Tensor]:
    """The tensors of a (nested) tuple / list output, in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o, key)]
    raise ConfigTypeError(f'{key}: the recorded output is a {type(out).__name__}, not tensors; '
                          'record a module that returns a tensor or a tuple / list of tensors')


class DistillLoss(nn.Module):
    """Base of the distillation losses: which outputs to compare, and how much.

    Args:
        student: Module path in the student whose ``forward`` output is used
            (``''``: the student's own forward is not recorded; use a submodule).
        teacher: Module path in the teacher (default: the same as ``student``).
        index: If set, the output (a tuple) is first indexed with it, e.g.
            ``0`` for the class scores of ``(cls_scores, bbox_preds)``.
        loss_weight: Factor of the loss.
        loss_name: Key of the loss in the logged losses (must contain
            ``'loss'`` so that MMEngine sums it into the total).
    """

    default_name = 'loss_kd'

    def __init__(self, student: str, teacher: str | None = None, index: int | None = None,
                 loss_weight: float = 1.0, loss_name: str | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = student if teacher is None else teacher
        self.index = index
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
                or not loss_weight >= 0:
            raise ConfigError(f'{type(self).__name__}: loss_weight={loss_weight!r} must be a '
                              'number >= 0, e.g. 1.0')
        self.loss_weight = float(loss_weight)
        self.loss_name = loss_name or self.default_name
        if 'loss' not in self.loss_name:
            raise ConfigError(f'{type(self).__name__}: loss_name={self.loss_name!r} must '
                              "contain 'loss' (MMEngine only sums keys containing it), e.g. "
                              "'loss_kd'")

    def select(self, out: Any, key: str) -> list[Tensor]:
        """The tensors this loss compares, from a recorded module output."""
        if self.index is not None:
            if not isinstance(out, (list, tuple)) or not -len(out) <= self.index < len(out):
                raise ConfigError(f'{key}: index={self.index} does not select from the '
                                  f'recorded output ({type(out).__name__}'
                                  + (f' of {len(out)}' if isinstance(out, (list, tuple)) else '')
                                  + ')')
            out = out[self.index]
        return _flatten(out, key)

    def check_shapes(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                     spatial: bool = True) -> None:
        """Refuse outputs whose number or shapes differ, naming both."""
        s_shapes = [tuple(t.shape) for t in student]
        t_shapes = [tuple(t.shape) for t in teacher]
        same = len(s_shapes) == len(t_shapes) and all(
            (a == b) if spatial else (a[:2] == b[:2]) for a, b in zip(s_shapes, t_shapes))
        if not same:
            raise ConfigError(
                f'{type(self).__name__} ({self.loss_name}): student {self.student!r} outputs '
                f'{s_shapes} but teacher {self.teacher!r} outputs {t_shapes}; '
                + ('they must be equal' if spatial else 'their batch and channel sizes must be '
                   'equal (spatial sizes are resized)')
                + ' (same classes, anchors and strides), or choose other modules')

    def forward(self, student: Any, teacher: Any) -> Tensor:
        """The weighted loss from the recorded student and teacher outputs."""
        raise NotImplementedError


@MODELS.register_module()
class LogitsKDLoss(DistillLoss):
    """Knowledge distillation on dense logits (Hinton et al., 2015), ``T²``-scaled.

    ``activation='softmax'``: the channels (of each group) are a categorical
    distribution per position; the loss is ``KL(p_t || p_s)`` of the
    temperature-softened distributions, summed over the classes, averaged over
    the positions (segmentation: per pixel). ``activation='sigmoid'``: each
    selected channel is a Bernoulli probability (YOLO objectness and classes,
    RetinaNet classes); the loss is the Bernoulli KL, i.e. the BCE against the
    teacher's probabilities minus its (constant) entropy, so it is zero when
    the student matches. Both are multiplied by ``T²`` so their gradients keep
    their scale across temperatures.

    Args:
        student: Module path in the student (``'decode_head'`` for mmseg,
            ``'bbox_head'`` for mmdet dense heads).
        teacher: Module path in the teacher (default: ``student``).
        index: Output index before flattening (``0``: class scores of heads
            returning ``(cls_scores, bbox_preds)``; YOLOv3's ``(pred_maps,)``
            needs none).
        activation: ``'softmax'`` or ``'sigmoid'``.
        temperature: Softening temperature ``T``.
        group_size: Channels per anchor, if the channel axis holds several
            anchors' outputs (YOLOv3: ``5 + num_classes``; SSD:
            ``num_classes + 1``). Default: all channels are one group.
        channels: ``(start, stop)`` within each group: the logits to distill
            (YOLOv3: ``(4, 5 + num_classes)``, objectness and classes, not the
            box offsets). Default: all.
        resize: Resize the teacher's maps to the student's spatial size
            (bilinear) when they differ; otherwise a mismatch is an error.
        reduction: ``'mean'`` (softmax: over positions and groups; sigmoid:
            over the selected elements), ``'batchmean'`` (sum / batch size) or
            ``'sum'``.
        loss_weight: Factor of the loss.
        loss_name: Logged key (default ``'loss_kd'``).
    """

    def __init__(self, student: str, teacher: str | None = None, index: int | None = None,
                 activation: str = 'softmax', temperature: float = 1.0,
                 group_size: int | None = None, channels: Sequence[int] | None = None,
                 resize: bool = False, reduction: str = 'mean', loss_weight: float = 1.0,
                 loss_name: str | None = None) -> None:
        super().__init__(student, teacher, index, loss_weight, loss_name)
        if activation not in ('softmax', 'sigmoid'):
            raise ConfigError(f"LogitsKDLoss: activation={activation!r} must be 'softmax' or "
                              "'sigmoid'")
        if not temperature > 0:
            raise ConfigError(f'LogitsKDLoss: temperature={temperature!r} must be > 0')
        if reduction not in ('mean', 'batchmean', 'sum'):
            raise ConfigError(f"LogitsKDLoss: reduction={reduction!r} must be 'mean', "
                              "'batchmean' or 'sum'")
        if group_size is not None and (isinstance(group_size, bool)
                                       or not isinstance(group_size, int) or group_size < 1):
            raise ConfigError(f'LogitsKDLoss: group_size={group_size!r} must be a positive int '
                              '(channels per anchor), or None for one group of all channels')
        if channels is not None and (len(channels) != 2 or channels[0] >= channels[1]):
            raise ConfigError(f'LogitsKDLoss: channels={channels!r} must be (start, stop) '
                              'with start < stop')
        self.activation = activation
        self.temperature = float(temperature)
        self.group_size = group_size
        self.channels = None if channels is None else tuple(int(c) for c in channels)
        self.resize = resize
        self.reduction = reduction

    def _grouped(self, logits: Tensor) -> Tensor:
        """``(N, C, *S)`` -> ``(N, G, c, *S)``: groups, then the selected channels."""
        n, c = logits.shape[:2]
        size = self.group_size or c
        if c % size:
            raise ConfigError(f'LogitsKDLoss ({self.loss_name}): {c} channels are not a '
                              f'multiple of group_size={size}')
        grouped = logits.reshape(n, c // size, size, *logits.shape[2:])
        if self.channels is not None:
            if self.channels[1] > size:
                raise ConfigError(f'LogitsKDLoss ({self.loss_name}): channels={self.channels} '
                                  f'exceeds the group of {size} channels')
            grouped = grouped[:, :, self.channels[0]:self.channels[1]]
        return grouped

    def forward(self, student: Any, teacher: Any) -> Tensor:
        """The weighted KD loss of the recorded logits (all levels together)."""
        s_maps = self.select(student, f'student {self.student!r}')
        t_maps = self.select(teacher, f'teacher {self.teacher!r}')
        self.check_shapes(s_maps, t_maps, spatial=not self.resize)
        t = self.temperature
        total, count = s_maps[0].new_zeros(()), 0
        for s, tm in zip(s_maps, t_maps):
            tm = tm.detach().to(s.dtype)
            if tm.shape[2:] != s.shape[2:]:
                tm = F.interpolate(tm, size=s.shape[2:], mode='bilinear', align_corners=False)
            s, tm = self._grouped(s) / t, self._grouped(tm) / t
            if self.activation == 'softmax':
                log_ps, log_pt = F.log_softmax(s, dim=2), F.log_softmax(tm, dim=2)
                kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2)
            else:
                pt = torch.sigmoid(tm)
                # BCE(s, p_t) - H(p_t): the Bernoulli KL, zero when the student matches.
                kl = (F.binary_cross_entropy_with_logits(s, pt, reduction='none')
                      - F.binary_cross_entropy_with_logits(tm, pt, reduction='none'))
            total = total + kl.sum()
            count += kl.numel()
        if self.reduction == 'mean':
            total = total / max(count, 1)
        elif self.reduction == 'batchmean':
            total = total / s_maps[0].shape[0]
        return self.loss_weight * t * t * total


@MODELS.register_module()
class FeatureImitationLoss(DistillLoss):
    """MSE between student and teacher feature maps through 1x1 conv adapters (FitNets).

    Each student map goes through its own 1x1 conv (student channels ->
    teacher channels) before the mean squared error against the teacher's map.
    The adapters belong to the distiller, not to the student: they are trained
    with it and dropped from the compact checkpoint.

    Args:
        student: Module path in the student (e.g. ``'neck'``).
        teacher: Module path in the teacher (default: ``student``).
        student_channels: Channels of each recorded student map (an int for
            one map, a list for several, e.g. the neck's ``out_channels``).
        teacher_channels: Channels of each teacher map.
        index: Output index before flattening.
        loss_weight: Factor of the loss.
        loss_name: Logged key (default ``'loss_feat'``).
    """

    default_name = 'loss_feat'

    def __init__(self, student: str, student_channels: int | Sequence[int],
                 teacher_channels: int | Sequence[int], teacher: str | None = None,
                 index: int | None = None, loss_weight: float = 1.0,
                 loss_name: str | None = None) -> None:
        super().__init__(student, teacher, index, loss_weight, loss_name)
        s_ch = [student_channels] if isinstance(student_channels, int) else list(student_channels)
        t_ch = [teacher_channels] if isinstance(teacher_channels, int) else list(teacher_channels)
        if len(s_ch) != len(t_ch) or not s_ch:
            raise ConfigError(f'FeatureImitationLoss: student_channels={student_channels!r} and '
                              f'teacher_channels={teacher_channels!r} must list one channel '
                              'count per feature map, as many for both')
        self.adapters = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(s_ch, t_ch))

    def forward(self, student: Any, teacher: Any) -> Tensor:
        """The weighted mean of the per-map MSEs."""
        s_maps = self.select(student, f'student {self.student!r}')
        t_maps = self.select(teacher, f'teacher {self.teacher!r}')
        expected = [a.in_channels for a in self.adapters]
        if [m.shape[1] if m.dim() == 4 else None for m in s_maps] != expected:
            raise ConfigError(
                f'FeatureImitationLoss ({self.loss_name}): student {self.student!r} outputs '
                f'{[tuple(m.shape) for m in s_maps]} but student_channels={expected}')
        adapted = [adapter(m) for adapter, m in zip(self.adapters, s_maps)]
        t_channels = [a.out_channels for a in self.adapters]
        if [m.shape[1] if m.dim() == 4 else None for m in t_maps] != t_channels:
            raise ConfigError(
                f'FeatureImitationLoss ({self.loss_name}): teacher {self.teacher!r} outputs '
                f'{[tuple(m.shape) for m in t_maps]} but teacher_channels={t_channels}')
        self.check_shapes(adapted, t_maps)
        losses = [F.mse_loss(a, t.detach().to(a.dtype)) for a, t in zip(adapted, t_maps)]
        return self.loss_weight * torch.stack(losses).mean()


def _build_teacher(teacher: dict | str, data_preprocessor: dict | None) -> nn.Module:
    """Build the teacher from a model config dict or from a config file."""
    if not isinstance(teacher, str):
        return build_inner_model(teacher, 'model.teacher', 'Distiller', data_preprocessor)
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    if '::' in teacher:
        from mmengine.hub import get_config
        cfg = get_config(teacher)
    elif osp.isfile(teacher):
        cfg = Config.fromfile(teacher)
    else:
        raise MissingFileError(f'Distiller: model.teacher={teacher!r} is neither a model config '
                               'dict nor an existing config file (relative paths are from '
                               "the working directory; '{{fileDirname}}/...' makes them "
                               "relative to the distillation config)")
    if not isinstance(cfg.get('model'), dict):
        raise ConfigError(f'Distiller: the teacher config {teacher!r} has no `model` dict')
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        return build_inner_model(cfg.model, f'model in {teacher}', 'Distiller',
                                 cfg.get('data_preprocessor') or data_preprocessor)


@MODELS.register_module()
class Distiller(TrainingWrapper):
    """Train a student (compact or ExpandNet) with a frozen teacher's guidance.

    The teacher is built from its config, loaded from ``teacher_ckpt`` (with
    MMEngine's ``load_checkpoint``, strictly, after a check that names the keys
    that do not fit) when the runner initialises the weights, frozen, kept in
    eval mode, and run without gradients on the student's preprocessed batch
    (both must use the same normalisation). Training, validation and testing
    steps, ``predict`` and the data preprocessor are the student's, so mmdet /
    mmseg metrics, visualisation and tools see the student; ``loss()`` is the
    student's losses plus each distillation loss under its own key.

    Args:
        student: Config of the student (a stock model or ``type='ExpandNet'``).
        teacher: Config of the teacher (a model config dict), or the path of
            the teacher's config file (its ``model`` is built in its
            ``default_scope``, with its top-level ``data_preprocessor``), e.g.
            ``'{{fileDirname}}/yolo-lite-w2_1xb16-900i_digits-det-64x64.py'``.
        teacher_ckpt: Checkpoint of the teacher (path or URL), e.g. the
            teacher config's ``iter_N.pth``. Loaded in ``init_weights()``
            (``Runner.train()`` calls it), so building the distiller to test or
            contract a checkpoint does not need the file.
        distill_losses: Configs of the distillation losses
            (:class:`LogitsKDLoss`, :class:`FeatureImitationLoss`).
        data_preprocessor: The config's top-level ``data_preprocessor`` (the
            Runner adds it); given to the student and teacher configs that
            have none.
        init_cfg: Unused (each part initialises itself); accepted for
            MMEngine's model interface.
        **model_overrides: Keys mm APIs set on the top-level model dict
            (``pretrained``, ``train_cfg``), applied to the student's config.
    """

    def __init__(self, student: dict, teacher: dict | str, teacher_ckpt: str,
                 distill_losses: Sequence[dict] = (), data_preprocessor: dict | None = None,
                 init_cfg: dict | None = None, **model_overrides: Any) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(teacher_ckpt, str) or not teacher_ckpt:
            raise ConfigError(f'Distiller: model.teacher_ckpt={teacher_ckpt!r} must be the path '
                              "of the teacher's checkpoint (train the teacher config first)")
        check_model_overrides(model_overrides, 'Distiller', DISTILLER_KEYS, student, 'student')
        self.student = build_inner_model(student, 'model.student', 'Distiller',
                                         data_preprocessor, model_overrides)
        self.teacher = _build_teacher(teacher, data_preprocessor)
        self._teacher_source = teacher if isinstance(teacher, str) else None
        self.data_preprocessor = self.student.data_preprocessor
        self._check_normalisation()
        self.teacher_ckpt = teacher_ckpt
        self._teacher_loaded = False
        self._teacher_from_resume = False
        self._teacher_missing: str | None = None
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        if not distill_losses:
            raise ConfigError('Distiller: model.distill_losses is empty; give at least one, '
                              "e.g. [dict(type='LogitsKDLoss', student='decode_head')]")
        self.distill_losses = nn.ModuleList()
        names = set()
        for i, cfg in enumerate(distill_losses):
            loss = MODELS.build(cfg)
            if not isinstance(loss, DistillLoss):
                raise ConfigTypeError(f'Distiller: model.distill_losses[{i}] built a '
                                      f'{type(loss).__name__}, not a distillation loss '
                                      '(LogitsKDLoss, FeatureImitationLoss)')
            get_submodule(self.student, loss.student, f'model.distill_losses[{i}].student',
                          'Distiller')
            get_submodule(self.teacher, loss.teacher, f'model.distill_losses[{i}].teacher',
                          'Distiller')
            if loss.loss_name in names:
                raise ConfigError(f'Distiller: model.distill_losses[{i}].loss_name='
                                  f'{loss.loss_name!r} is used twice; give each loss its own')
            names.add(loss.loss_name)
            self.distill_losses.append(loss)

    def _check_normalisation(self) -> None:
        """The teacher sees the student's preprocessed batch: refuse other mean / std / order."""
        s_swap = getattr(self.student.data_preprocessor, '_channel_conversion', None)
        t_swap = getattr(self.teacher.data_preprocessor, '_channel_conversion', None)
        if s_swap is not None and t_swap is not None and s_swap != t_swap:
            raise ConfigError(
                'Distiller: the teacher is run on the student\'s preprocessed batch but its '
                f'data_preprocessor {"swaps" if t_swap else "keeps"} the channel order '
                f'(bgr_to_rgb / rgb_to_bgr) and the student\'s {"does" if s_swap else "does not"}'
                '; give model.teacher the same data_preprocessor')
        for attr in ('mean', 'std'):
            s = getattr(self.student.data_preprocessor, attr, None)
            t = getattr(self.teacher.data_preprocessor, attr, None)
            if isinstance(s, Tensor) and isinstance(t, Tensor) and (
                    s.shape != t.shape or not torch.allclose(s, t)):
                raise ConfigError(
                    f'Distiller: the teacher is run on the student\'s preprocessed batch but '
                    f'its data_preprocessor.{attr} is {t.flatten().tolist()}, the student\'s '
                    f'{s.flatten().tolist()}; give model.teacher the same data_preprocessor')

    def deployable_model(self) -> nn.Module:
        """The student."""
        return self.student

    @classmethod
    def deployable_cfg(cls, cfg: dict) -> dict:
        """The student's config."""
        return cfg['student']

    def _init_parts(self) -> Sequence[nn.Module]:
        return [self.student]

    def init_weights(self) -> None:
        """Initialise the student as its config says and load the teacher's checkpoint."""
        super().init_weights()
        self.load_teacher()

    def expect_teacher_from_resume(self) -> None:
        """Let a missing ``teacher_ckpt`` wait for the resumed checkpoint's teacher.

        Called by :class:`~expand_mm.hooks.ExpandCheckpointLoadHook` before the
        Runner initialises the weights of a run that resumes: a Distiller
        checkpoint holds the teacher, so the teacher's own file is not needed
        (it may have been moved or deleted since). If the resume brings no
        teacher, the first loss raises the missing-file error.
        """
        self._teacher_from_resume = True

    def load_teacher(self) -> None:
        """Load ``teacher_ckpt`` into the teacher, refusing one that does not fit.

        Raises:
            CheckpointError: If the file is missing or corrupt, or its keys or
                shapes do not fit the teacher config (naming them). A missing
                file is only logged after :meth:`expect_teacher_from_resume`.
        """
        path = self.teacher_ckpt
        if '://' in path:  # remote: MMEngine's loader (strict) does the checking
            load_checkpoint(self.teacher, path, map_location='cpu', strict=True,
                            logger=MMLogger.get_current_instance())
        else:  # read once, checked with a clear message, then loaded strictly
            if not osp.isfile(path):
                missing = (
                    f'Distiller: model.teacher_ckpt={path!r} '
                    + ('is a folder' if osp.isdir(path) else 'does not exist')
                    + ': train the teacher config first (python tools/train.py '
                    f'{self._teacher_source or "TEACHER_CONFIG"}) or point model.teacher_ckpt '
                    "at the teacher's iter_N.pth / epoch_N.pth")
                if not self._teacher_from_resume:
                    raise CheckpointError(missing)
                self._teacher_missing = missing
                MMLogger.get_current_instance().info(
                    f'Distiller: model.teacher_ckpt={path!r} is not there; the teacher comes '
                    'from the resumed checkpoint')
                return
            state_dict = strip_prefix(read_checkpoint(path)['state_dict'])
            try:
                match_state_dict(self.teacher, state_dict, source=path)
            except CheckpointError:
                mismatch = compare_state_dict(self.teacher, state_dict)
                raise CheckpointError(
                    f'Distiller: model.teacher_ckpt={path!r} does not fit model.teacher '
                    f'({type(self.teacher).__name__}): {mismatch.describe()}. Use a '
                    'checkpoint trained with the teacher config (its iter_N.pth / '
                    'epoch_N.pth, or the *_compact.pth of an ExpandNet teacher) or change '
                    'model.teacher to the config the checkpoint was trained with') from None
            self.teacher.load_state_dict(state_dict, strict=True)
        self._teacher_loaded = True
        MMLogger.get_current_instance().info(
            f'Distiller: teacher ({type(self.teacher).__name__}) loaded from '
            f'{osp.basename(path)}, frozen, eval mode')

    @property
    def teacher_loaded(self) -> bool:
        """Whether the teacher holds trained weights (``teacher_ckpt`` or a distiller checkpoint)."""
        return self._teacher_loaded

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint of the distiller (resume, load_from) holds the teacher too.
        # ExpandCheckpointLoadHook completes a student-only checkpoint with the
        # wrapper's own current entries: the teacher's own tensors coming back
        # are not weights from anywhere, so they do not count as a load.
        own = {prefix + 'teacher.' + k: v for k, v in self.teacher.state_dict().items()}
        incoming = [k for k in state_dict if k.startswith(prefix + 'teacher.')]
        if any(k not in own or state_dict[k].data_ptr() != own[k].data_ptr()
               for k in incoming):
            self._teacher_loaded = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> 'Distiller':
        """Set the mode of the student and adapters; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.train(False)
        return self

    def loss(self, inputs: Tensor, data_samples: Any) -> dict:
        """The student's losses plus every distillation loss (each under its own key)."""
        if not self._teacher_loaded and self._teacher_missing:
            raise CheckpointError(self._teacher_missing + ' (the resumed checkpoint had no '
                                  'teacher either)')
        if not self._teacher_loaded:
            raise SetupError(
                'Distiller: the teacher has no weights yet; call init_weights() (the Runner '
                'does at the start of training) to load model.teacher_ckpt, or load a '
                'Distiller checkpoint')
        s_modules = {loss.student: self.student.get_submodule(loss.student)
                     for loss in self.distill_losses}
        t_modules = {loss.teacher: self.teacher.get_submodule(loss.teacher)
                     for loss in self.distill_losses}
        with record_forward(s_modules) as s_out:
            losses = self.student.loss(inputs, data_samples)
        with torch.no_grad(), record_forward(t_modules) as t_out:
            self.teacher(inputs, data_samples, mode='tensor')
        for loss in self.distill_losses:
            for side, path, out in (('student', loss.student, s_out),
                                    ('teacher', loss.teacher, t_out)):
                if path not in out:
                    raise SetupError(
                        f'Distiller: {side} module {path!r} ({loss.loss_name}) did not run '
                        f'in the {side}\'s forward; record a module the forward calls (e.g. '
                        "'neck', 'bbox_head', 'decode_head')")
            if loss.loss_name in losses:
                raise ConfigError(f'Distiller: loss_name={loss.loss_name!r} is also a loss of '
                                  'the student; give the distillation loss another name')
            losses[loss.loss_name] = loss(s_out[loss.student], t_out[loss.teacher])
        return losses
