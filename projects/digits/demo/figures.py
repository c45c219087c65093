"""The report's figures: loss curves and metric bars, and predictions side by side."""
from __future__ import annotations

import os.path as osp

import numpy as np

from .tasks import DET_SCORE_THR, VARIANT_TITLES, VARIANTS, TaskSpec


def _palette(dataset) -> list[tuple[float, float, float]]:
    return [tuple(c / 255 for c in rgb) for rgb in dataset.metainfo['palette']]


def draw_predictions(spec: TaskSpec, dataset, preds: dict[str, list], work_dir: str) -> str:
    """Draws ground truth and both models' predictions side by side.

    Args:
        spec: The task.
        dataset: Test dataset (image paths, ground truth, class names, palette).
        preds: Variant -> predicted data samples of the first images.
        work_dir: Where ``{task}_predictions.png`` goes.

    Returns:
        The image's path.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    n = len(preds['compact'])
    det = spec.name == 'det'
    # det: boxes drawn on the image; seg: the image, then the label maps.
    columns = ([] if det else ['image']) + ['ground truth'] + [VARIANT_TITLES[v]
                                                               for v in VARIANTS]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 2.6 * n + 0.5),
                             squeeze=False)
    classes = dataset.metainfo['classes']
    palette = _palette(dataset)
    lut = np.full((256, 3), 1.0)  # white: the ignored edge band (255)
    lut[:len(palette)] = palette
    for row in range(n):
        sample = preds['compact'][row]
        image = np.asarray(Image.open(sample.img_path).convert('RGB'))
        for col, title in enumerate(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            source = VARIANTS[col - len(columns) + 2] if col >= len(columns) - 2 else None
            if det:
                ax.imshow(image)
                if source is None:
                    info = dataset.get_data_info(row)
                    boxes = [(inst['bbox'], inst['bbox_label'], None)
                             for inst in info['instances']]
                else:
                    inst = preds[source][row].pred_instances
                    keep = inst.scores >= DET_SCORE_THR
                    boxes = list(zip(inst.bboxes[keep].tolist(), inst.labels[keep].tolist(),
                                     inst.scores[keep].tolist()))
                for (x1, y1, x2, y2), label, score in boxes:
                    colour = palette[label]
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                           edgecolor=colour, linewidth=1.5))
                    text = classes[label] + ('' if score is None else f' {score:.2f}')
                    ax.text(x1, y1 - 1, text, color='black', fontsize=6,
                            bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, linewidth=0))
            elif title == 'image':
                ax.imshow(image)
            else:
                if source is None:
                    label_map = np.asarray(Image.open(sample.seg_map_path)).astype(np.int64)
                else:
                    label_map = preds[source][row].pred_sem_seg.data[0].numpy().astype(np.int64)
                ax.imshow(lut[label_map])
    if spec.name == 'det':
        note = f'predictions with score >= {DET_SCORE_THR}'
    else:
        note = 'label maps (black: background, white: ignored edge band)'
    fig.suptitle(f'{spec.title}: {note}', fontsize=10)
    fig.tight_layout()
    path = osp.join(work_dir, f'{spec.name}_predictions.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_report_figure(results: list[dict], path: str, quick: bool) -> None:
    """Training-loss curves of both models per task, and the metric bars.

    Args:
        results: Per-task results of :func:`run_task`.
        path: Output PNG.
        quick: Marks the figure as a smoke test.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)),
                             squeeze=False, gridspec_kw=dict(width_ratios=[2.2, 1]))
    colours = dict(compact='tab:blue', expandnet='tab:orange')
    for row, res in enumerate(results):
        ax = axes[row][0]
        for variant in VARIANTS:
            scalars = res['runs'][variant]['scalars']
            ax.plot([r['iter'] for r in scalars], [r['loss'] for r in scalars],
                    label=VARIANT_TITLES[variant].split(' →')[0], color=colours[variant])
        ax.set_yscale('log')
        ax.set_xlabel('iteration')
        ax.set_ylabel('training loss')
        ax.set_title(f'{res["title"]}: training loss')
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[row][1]
        values = [res['runs'][v]['metric'] for v in VARIANTS]
        bars = ax.bar(['compact', 'ExpandNet\n(contracted)'], values,
                      color=[colours[v] for v in VARIANTS])
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f'{value:.1f}', ha='center',
                    va='bottom')
        ax.set_ylabel(res['metric_name'])
        ax.set_ylim(0, max(100.0 if res['metric_name'] == 'mIoU' else 0.0,
                           max(values) * 1.15 + 1))
        ax.set_title(f'deployed models: {res["metric_name"]} (one seed)')
    if quick:
        fig.suptitle('--quick smoke test: tiny data, a few iterations -- numbers mean nothing',
                     color='tab:red')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
