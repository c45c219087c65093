"""The missing-data check: how to get mmdet's / mmseg's datasets, and the hints of projects."""
from __future__ import annotations

import pytest
from mmengine.config import Config

from expand_mm import datasets_check
from expand_mm.datasets_check import DatasetNotFoundError, check_datasets, register_dataset_hint
from expand_mm.errors import ExpandMMError


def _config(data_root: str) -> Config:
    return Config(dict(train_dataloader=dict(dataset=dict(type='CocoDataset',
                                                           data_root=data_root))))


def _hint_for(data_root: str) -> str:
    with pytest.raises(DatasetNotFoundError) as err:
        check_datasets(_config(data_root), ('train_dataloader',))
    return str(err.value).split('How to get it: ', 1)[1]


@pytest.fixture
def no_project_hints(monkeypatch):
    """An empty registry, whatever the configs loaded so far registered."""
    monkeypatch.setattr(datasets_check, '_registered_hints', [])


def test_the_missing_path_is_named_and_the_error_is_a_refusal_and_a_file_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"dataset path '{tmp_path}/nothing/'") as err:
        check_datasets(_config(f'{tmp_path}/nothing/'), ('train_dataloader',))
    assert isinstance(err.value, ExpandMMError) and isinstance(err.value, FileNotFoundError)


def test_standard_datasets_and_the_default_hint(no_project_hints, tmp_path):
    assert _hint_for(f'{tmp_path}/coco/').startswith('COCO 2017: download train2017')
    assert _hint_for(f'{tmp_path}/elsewhere/').startswith(
        'put the dataset where the config expects it, or override '
        'train_dataloader.dataset.data_root with --cfg-options')


def test_a_registered_hint_comes_first_and_passes_on_roots_it_does_not_know(
        no_project_hints, tmp_path):
    def shapes_hint(data_root: str) -> str | None:
        return 'run `make shapes`' if 'shapes' in data_root else None

    assert register_dataset_hint(shapes_hint) is shapes_hint
    assert _hint_for(f'{tmp_path}/coco_shapes/').startswith('run `make shapes`')
    assert _hint_for(f'{tmp_path}/coco/').startswith('COCO 2017')

    def newer_hint(data_root: str) -> str | None:
        return 'run `make newer`' if 'coco' in data_root else None

    register_dataset_hint(newer_hint)
    assert _hint_for(f'{tmp_path}/coco_shapes/').startswith('run `make newer`')
    register_dataset_hint(shapes_hint)  # registered again (a re-imported module): first, once
    assert _hint_for(f'{tmp_path}/coco_shapes/').startswith('run `make shapes`')
    assert datasets_check._registered_hints == [shapes_hint, newer_hint]
