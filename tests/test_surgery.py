"""Model surgery and checkpoint forms on small plain and mmcv models."""
import dataclasses
import pickle

import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

import expand_mm
from expand_mm import CheckpointError, contract_model, expand_model, match_state_dict
from expand_mm.checkpoint import read_checkpoint
from expand_mm.errors import ConfigError
from expand_mm.surgery import ExpansionSettings


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='BN')),
            ConvModule(8, 8, 3, padding=1, groups=8, norm_cfg=dict(type='BN')),
            ConvModule(8, 16, 1, norm_cfg=dict(type='BN')),
            nn.Conv2d(16, 16, 5, stride=2, padding=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.backbone(x))


def eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_expand_report_and_conv_module_structure():
    model = Tiny()
    report = expand_model(model, strategy='auto', ratio=2)
    paths = [r.path for r in report.layers]
    assert paths == ['backbone.0.conv', 'backbone.1.conv', 'backbone.3']
    assert [r.strategy for r in report.layers] == ['cl', 'cl', 'ck']
    assert isinstance(model.backbone[0].bn, nn.BatchNorm2d)  # norm stays outside
    assert isinstance(model.backbone[2].conv, nn.Conv2d)  # 1x1 left compact
    assert isinstance(model.head[2], nn.Linear)  # linear left compact by default
    assert report.model_params_after - report.model_params_before == \
        report.expanded_params - report.compact_params
    assert 'backbone.3' in str(report)


def test_expand_1x1_and_linear_and_patterns():
    model = Tiny()
    report = expand_model(model, include=['backbone.*', 'head'], exclude=['backbone.1*'],
                          expand_1x1=True, expand_linear=True)
    assert [r.path for r in report.layers] == ['backbone.0.conv', 'backbone.2.conv',
                                               'backbone.3', 'head.2']
    assert isinstance(model.head[2], expand_mm.ExpandLinear)


def test_contract_is_a_copy_with_stock_keys_and_same_function():
    torch.manual_seed(0)
    model = Tiny()
    stock = {k: v.shape for k, v in model.state_dict().items()}
    expand_model(model, strategy='auto', ratio=3, expand_linear=True)
    x = torch.randn(2, 3, 17, 23)
    compact = contract_model(model, verify_inputs=x)
    assert expand_mm.expanded_layers(model) and not expand_mm.expanded_layers(compact)
    assert {k: v.shape for k, v in compact.state_dict().items()} == stock
    torch.testing.assert_close(eval_out(compact, x), eval_out(model, x), rtol=1e-5, atol=1e-6)
    errors = expand_mm.verify_contraction(model, compact, x)
    assert errors['max_rel'] < 1e-5


@pytest.mark.parametrize('kwargs, message', [
    (dict(include=['backbone.9*']), "include pattern 'backbone.9*' matches no expandable"),
    (dict(exclude=['neck.*']), "exclude pattern 'neck.*'"),
    (dict(include=['backbone.2']), 'only layers left compact: backbone.2.conv (1x1 conv'),
    (dict(strategy='xx'), "strategy='xx' is not one of"),
    (dict(ratio=0), 'ratio=0 must be an integer >= 1'),
    (dict(ratio=2.5), 'ratio=2.5'),
    (dict(mode='fast'), "mode='fast'"),
    (dict(strategy='ck'), "strategy='ck' needs odd kernels >= 5, but these selected layers"),
])
def test_bad_settings_name_the_culprit(kwargs, message):
    with pytest.raises(ConfigError, match=None) as err:
        expand_model(Tiny(), **kwargs)
    assert message in str(err.value)


def test_expansion_settings_are_checked_once_and_carry_every_option():
    settings = ExpansionSettings(strategy='auto', ratio=2, include='backbone.*',
                                 exclude=['backbone.1*'])
    assert settings.include == ('backbone.*',) and settings.exclude == ('backbone.1*',)
    assert settings.ratio_for('backbone.0.conv') == 2
    assert settings.selects('backbone.0.conv') and not settings.selects('backbone.1.conv')
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.ratio = 3
    by_keywords = expand_model(Tiny(), strategy='auto', ratio=2, include='backbone.*',
                               exclude=['backbone.1*'])
    by_settings = expand_model(Tiny(), settings=settings)
    assert by_settings.to_dict() == by_keywords.to_dict()
    assert [r.path for r in by_settings.layers] == ['backbone.0.conv', 'backbone.3']
    assert by_settings.settings is settings
    assert (by_settings.ratio, by_settings.mode) == (2, 'online')
    with pytest.raises(ConfigError, match='not both'):
        expand_model(Tiny(), ratio=3, settings=settings)
    with pytest.raises(ConfigError, match=r'ratio=0 must be an integer >= 1'):
        ExpansionSettings(ratio=0)
    with pytest.raises(ConfigError, match=r"include=\(3,\) must be glob patterns"):
        ExpansionSettings(include=[3])


def test_unmatched_pattern_suggests_nearest_paths():
    with pytest.raises(ValueError) as err:
        expand_model(Tiny(), include=['backbone.0.cnv'])
    assert 'backbone.0.conv' in str(err.value)


def test_a_pattern_that_names_an_unexpandable_module_says_so():
    with pytest.raises(ValueError) as err:
        expand_model(Tiny(), include=['backbone.0.bn'])
    assert ("matches modules that are not expandable: backbone.0.bn (BatchNorm2d). "
            "Expandable are plain nn.Conv2d") in str(err.value)


def test_unsupported_conv_subclass_is_left_compact_with_a_reason():
    class Padded(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 0, 1, 0)))

    model = nn.Sequential(Padded(3, 4, 3), nn.Conv2d(4, 4, 3))
    report = expand_model(model)
    assert [r.path for r in report.layers] == ['1']
    assert 'overrides Conv2d.forward' in dict(report.skipped)['0']
    with pytest.raises(ValueError, match='overrides Conv2d.forward'):
        expand_model(nn.Sequential(Padded(3, 4, 3), nn.Conv2d(4, 4, 3)), include=['0'])


def test_compact_state_dict_loads_into_expanded_model_exactly():
    torch.manual_seed(0)
    trained = Tiny()
    x = torch.randn(1, 3, 16, 16)
    reference = eval_out(trained, x)
    compact_sd = trained.state_dict()
    model = Tiny()
    expand_model(model, strategy='cl', ratio=4)
    assert match_state_dict(model, compact_sd) == 'compact'
    model.load_state_dict(compact_sd, strict=True)
    torch.testing.assert_close(eval_out(model, x), reference, rtol=1e-5, atol=1e-5)
    assert match_state_dict(model, model.state_dict()) == 'expanded'


def test_other_models_checkpoint_is_refused_with_keys():
    model = Tiny()
    expand_model(model)
    other = nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict()
    with pytest.raises(CheckpointError) as err:
        match_state_dict(model, other, source='other.pth')
    assert 'other.pth fits neither' in str(err.value) and 'missing' in str(err.value)
    wrong_shape = Tiny().state_dict()
    wrong_shape['backbone.0.conv.weight'] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(CheckpointError, match=r'backbone.0.conv.weight \(checkpoint '
                                              r'\(8, 3, 5, 5\), model \(8, 3, 3, 3\)\)'):
        match_state_dict(model, wrong_shape)


def test_corrupt_and_missing_checkpoint_files(tmp_path):
    path = tmp_path / 'model.pth'
    torch.save({'state_dict': Tiny().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        read_checkpoint(str(path))
    with pytest.raises(CheckpointError, match='does not exist'):
        read_checkpoint(str(tmp_path / 'nope.pth'))
    # Not a checkpoint at all: whatever the unpickler raises becomes a CheckpointError
    # that says what failed, without torch's advice to load with weights_only=False.
    text = tmp_path / 'notes.pth'
    text.write_text('hello world\n')
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*notes.pth' \(KeyError"):
        read_checkpoint(str(text))
    pickled = tmp_path / 'object.pth'
    pickled.write_bytes(pickle.dumps(Tiny()))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(pickled))
    assert 'WeightsUnpickler error: ' in str(err.value)
    assert 'weights_only' not in str(err.value) and 'corrupt or truncated' in str(err.value)
    # A sound checkpoint whose meta holds an object: said so, not called corrupt.
    with_object = tmp_path / 'with_object.pth'
    torch.save({'state_dict': Tiny().state_dict(), 'meta': {'act': Tiny}}, with_object)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(with_object))
    assert 'holds a Python object other than tensors and plain values' in str(err.value)
    assert 'weights_only' not in str(err.value) and 'is corrupt' not in str(err.value)


def test_pattern_messages_suggest_expandable_layers_and_name_cancelling_patterns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.data_preprocessor = nn.Identity()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
            self.head = nn.Conv2d(8, 4, 3)

    with pytest.raises(ValueError, match=r"Nearest module paths: backbone.\*, head.\*"):
        expand_model(Net(), exclude=['nothing.matches'])
    with pytest.raises(ValueError, match=r"Nearest module paths: backbone.1, backbone.0 \("):
        expand_model(Net(), include=['backbone.O'])
    with pytest.raises(ValueError, match=r"exclude=\['backbone.\*'\] removes every layer that "
                                         r"include pattern\(s\) \['backbone.\*'\] select"):
        expand_model(Net(), include=['backbone.*'], exclude=['backbone.*'])
    with pytest.raises(ValueError, match="strategy='CL': the names are lower-case, use 'cl'"):
        expand_model(Net(), strategy='CL')


def test_what_a_conv_carries_beyond_its_class_is_kept_or_refused():
    """Found by fuzzing: sharing, freezing, _conv_forward overrides, hooks, parametrizations."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 3, padding=1)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    shared = Shared()
    expand_model(shared)
    assert isinstance(shared.a, expand_mm.ExpandConv2d) and shared.a is shared.b
    torch.optim.SGD(shared.parameters(), lr=0.1).zero_grad()
    shared(torch.randn(1, 3, 5, 5)).sum().backward()
    for p in shared.parameters():
        p.data.add_(p.grad, alpha=-0.1)
    compact = contract_model(shared, verify_inputs=torch.randn(1, 3, 5, 5))
    assert compact.a is compact.b and type(compact.a) is nn.Conv2d

    frozen = nn.Sequential(nn.Conv2d(3, 4, 3).requires_grad_(False), nn.Conv2d(4, 4, 3))
    expand_model(frozen)
    assert not any(p.requires_grad for p in frozen[0].parameters())
    assert all(p.requires_grad for p in frozen[1].parameters())

    class WSConv(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, (w - w.mean()) / (w.std() + 1e-5), b)

    hooked = nn.Conv2d(4, 4, 3)
    hooked.register_forward_pre_hook(lambda module, args: None)
    net = nn.Sequential(WSConv(3, 4, 3), hooked,
                        nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)),
                        nn.Conv2d(4, 4, 3))
    skipped = dict(expand_model(net).skipped)
    assert 'overrides Conv2d.forward or _conv_forward' in skipped['0']
    assert 'has hooks' in skipped['1']
    assert 'has a parametrization' in skipped['2']
    assert isinstance(net[3], expand_mm.ExpandConv2d)

    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"expand_model: 0 still have uninitialised lazy "
                                         r"parameters .* run one forward pass"):
        expand_model(lazy)
    lazy(torch.randn(1, 3, 8, 8))  # a dummy batch materialises it
    expand_model(lazy)
    assert isinstance(lazy[0], expand_mm.ExpandConv2d)


def test_a_wrappers_checkpoint_is_named_by_its_prefix_with_the_right_advice():
    """Student entries under 'student.' (the compact form of an expanded model without
    norms: far fewer keys than the expanded form) point to *_compact.pth; entries of
    the same architecture under 'teacher.' are the teacher's, to be saved alone."""
    from expand_mm.checkpoint import expanded_key_shapes, wrapper_checkpoint_hint
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    compact_keys = {'student.' + k: v for k, v in student.state_dict().items()}
    teacher = {'teacher.' + k: torch.zeros(2 * v.shape[0], *v.shape[1:])
               for k, v in student.state_dict().items()}
    expand_model(student, strategy='cl', ratio=4)
    with pytest.raises(CheckpointError, match=r"kd.pth does not fit Sequential: its entries for "
                                              r"this model are under 'student.': .* Use its "
                                              r"\*_compact.pth"):
        match_state_dict(student, {**compact_keys, **teacher}, source='kd.pth')
    wide = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    teacher = {'teacher.' + k: v for k, v in wide.state_dict().items()}
    hint = wrapper_checkpoint_hint(expanded_key_shapes(wide), {**compact_keys, **teacher})
    assert hint.startswith("its entries for this model are under 'teacher.': they are the "
                           'teacher of a Distiller training checkpoint'), hint
    assert '_compact.pth' not in hint
