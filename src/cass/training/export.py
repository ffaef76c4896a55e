"""``cass export``: the networks of a pretraining run as backbones a user can take away, with a model card.

For every network the run trained (CASS: the CNN and the Transformer; DINO: its student's), a headless
safetensors file that timm loads by itself (:mod:`cass.models.backbone`), and one ``MODEL_CARD.md`` saying
what they are: the sources and their image counts, the recipe, the run's learning checks, and how to load
them with timm, with ``cass finetune --from FILE`` and with ``cass embed``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cass.config import ConfigError, PretrainConfig, load_yaml
from cass.evaluation.diagnostics import BACKBONE_RANK, BACKBONE_STD, KNN_F1
from cass.methods.registry import method_class
from cass.models.backbone import BackboneInfo, save_backbone
from cass.models.factory import Network, create_network, shape_options
from cass.utils.atomic import atomic_write_text
from cass.utils.checkpoint import read_info
from cass.utils.markdown import markdown_table
from cass.utils.rundir import CONFIG, SOURCES, read_history
from cass.utils.version import VERSION

log = logging.getLogger(__name__)

MODEL_CARD = "MODEL_CARD.md"
CHECKS = (("loss", "loss"), (BACKBONE_STD, "backbone std"), (BACKBONE_RANK, "backbone rank"), (KNN_F1, "k-NN macro-F1"))
"""The columns of the card's learning-check table: the loss, then per network (key suffix, heading)."""


def backbone_file(role: str, timm_name: str) -> str:
    """``cnn-resnet18.safetensors``: the role keeps two exports apart, the name says what to build."""
    return f"{role}-{timm_name}.safetensors"


def export_run(run_dir: str | Path, out: str | Path, sections: Sequence[str] = ()) -> list[Path]:
    """Write each network of the pretraining run in ``run_dir`` as a backbone file in ``out``, and
    ``MODEL_CARD.md``; returns the backbone files. A run that has not finished is exported as it stands
    (its last finished epoch), and the card says so. ``sections``: more Markdown sections for the card (what
    the backbone did downstream, written by the layers that know experiments), placed before its recipe."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG} there (is it a cass pretrain run directory?)")
    if out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out}: choose another directory than the run's (its own files stay as they are)")
    cfg = load_yaml(PretrainConfig, run_dir / CONFIG)
    sources = _read_sources(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Network, BackboneInfo]] = []
    for role in method_class(cfg.method, option=f"{run_dir / CONFIG}: method").roles(cfg.arch):
        weights = run_dir / f"{role}.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{run_dir}: no {weights.name} (the run has not finished an epoch yet)")
        trained = read_info(weights)
        net = create_network(getattr(cfg, role), init=str(weights), num_outputs=0, img_size=cfg.img_size,
                             **shape_options(role, cfg.cnn_stem, cfg.vit_patch_size))
        path = out / backbone_file(role, net.name)
        info = save_backbone(net, role, path, {
            "cass_version": VERSION, "method": cfg.method, "epoch": trained.get("epoch", ""),
            "epochs": str(cfg.epochs), "swa": trained.get("swa", ""), "run": str(run_dir),
            "config": (run_dir / CONFIG).read_text(),
            "sources": json.dumps([{key: source.get(key) for key in ("data", "pretraining_images", "fingerprint")}
                                   for source in sources]),
        })
        written.append((path, net, info))
    epoch = trained.get("epoch", "")  # every network of a run is saved after the same epoch
    if epoch != str(cfg.epochs):
        log.warning("%s has finished %s of %d epochs; exporting it as it stands", run_dir, epoch or "?", cfg.epochs)
    atomic_write_text(out / MODEL_CARD, model_card(run_dir, cfg, sources, written, epoch, sections))
    return [path for path, _, _ in written]


def _read_sources(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``sources.json`` entries; none for a run made before cass recorded its sources."""
    path = run_dir / SOURCES
    return json.loads(path.read_text())["sources"] if path.is_file() else []


def model_card(run_dir: Path, cfg: PretrainConfig, sources: list[dict[str, Any]],
               written: list[tuple[Path, Network, BackboneInfo]], epoch: str, sections: Sequence[str] = ()) -> str:
    """The Markdown model card of an export."""
    method = method_class(cfg.method)
    total = sum(source["pretraining_images"] for source in sources)
    finished = ("" if epoch == str(cfg.epochs)
                else f" **Exported after epoch {epoch or '?'} of {cfg.epochs}: the run had not finished.**")
    parts = [
        f"# {method.label(cfg.arch)} backbone{'s' if len(written) > 1 else ''}: "
        + ", ".join(f"{info.timm_name} ({info.arch})" for _, _, info in written),
        f"Pretrained without labels by cass {VERSION} with `{cfg.method}` ({method.objective}) for {cfg.epochs} "
        f"epoch{'s' if cfg.epochs != 1 else ''} at batch {cfg.batch_size} and {written[0][2].img_size} px, from "
        f"`{cfg.init}` initialisation, "
        f"on {total or 'an unrecorded number of'} images from {len(sources) or 'unrecorded'} source(s).{finished} "
        f"Run directory: `{run_dir}`.",
        "## Files\n\n" + markdown_table(["file", "network", "input", "features", "timm.create_model arguments"], [
            [f"`{path.name}`", f"{info.timm_name} ({info.arch}{', small stem' if info.cnn_stem == 'small' else ''})",
             f"{info.img_size} px RGB", str(net.num_features), _kwargs_text(info)]
            for path, net, info in written]),
        _sources_section(sources, cfg.balance_sources),
        _checks_section(run_dir, [info.arch for _, _, info in written]),
        _loading_section(written),
        *sections,
        "## Recipe\n\nThe run's whole configuration (`cass pretrain --config` on it reruns it):\n\n```yaml\n"
        + (run_dir / CONFIG).read_text().rstrip() + "\n```",
    ]
    return "\n\n".join(parts) + "\n"


def _kwargs_text(info: BackboneInfo) -> str:
    kwargs = info.timm_kwargs()
    return ", ".join(f"`{key}={value!r}`" for key, value in kwargs.items()) or "none"


def _sources_section(sources: list[dict[str, Any]], balanced: bool) -> str:
    if not sources:
        return "## Sources\n\nNot recorded: the run was made before cass wrote `sources.json`."
    rows = [[str(i), f"`{s['data']}`", str(s["pretraining_images"]), str(s["selection_images_kept_out"]),
             str(s["test_images_kept_out"]), f"`{s['fingerprint'] or 'none'}`"] for i, s in enumerate(sources, 1)]
    how = ("each source drawn equally often per epoch" if balanced and len(sources) > 1
           else "every pooled image once per epoch")
    return ("## Sources\n\nOnly each source's train images were read (" + how + "); its selection and test "
            "images, whole groups when the source has groups, were kept out, so the backbone can be evaluated on "
            "them honestly. The fingerprint digests every file's name, size and date (`sources.json` of the run).\n\n"
            + markdown_table(["#", "data", "pretraining images", "selection images kept out", "test images kept out",
                      "fingerprint"], rows))


def _checks_section(run_dir: Path, roles: list[str]) -> str:
    """The run's learning checks per epoch (``start.csv`` then ``metrics.csv``), when it recorded them."""
    history = read_history(run_dir)
    columns = [(key, heading) for key, heading in CHECKS[:1]]
    columns += [(f"{role}_{key}", f"{role} {heading}") for role in roles for key, heading in CHECKS[1:]]
    columns = [(key, heading) for key, heading in columns if any(key in row for row in history)]
    if not history or not columns:
        return "## Learning checks\n\nNot recorded."
    rows = [[str(int(row["epoch"]))] + [f"{row[key]:.3f}" if key in row else "" for key, _ in columns]
            for row in history]
    return ("## Learning checks\n\nMeasured by the run on its backbones' pooled features, on fixed train images of "
            "the first source: std over images (1 healthy, 0 collapsed), effective rank, and a k-NN's macro-F1 "
            "on that source's selection split (labelled sources only). Epoch 0 is the starting point.\n\n"
            + markdown_table(["epoch"] + [heading for _, heading in columns], rows))


def _loading_section(written: list[tuple[Path, Network, BackboneInfo]]) -> str:
    """How to load each file: with timm alone, then with cass."""
    blocks = []
    for path, net, info in written:
        mean = [round(v, 4) for v in net.mean.flatten().tolist()]
        std = [round(v, 4) for v in net.std.flatten().tolist()]
        if info.cnn_stem == "small":
            conv = net.model.conv1
            code = (f"import timm, torch\nfrom safetensors.torch import load_file\n\n"
                    f"model = timm.create_model({info.timm_name!r}, num_classes=0)\n"
                    f"model.conv1 = torch.nn.Conv2d({conv.in_channels}, {conv.out_channels}, 3, stride=1, padding=1, "
                    f"bias={conv.bias is not None})  # cass's small stem\n"
                    "model.maxpool = torch.nn.Identity()\n"
                    f"model.load_state_dict(load_file({path.name!r}))\nmodel.eval()")
        else:
            kwargs = "".join(f", {key}={value!r}" for key, value in info.timm_kwargs().items())
            code = (f"import timm\n\nmodel = timm.create_model({info.timm_name!r}, pretrained=True, "
                    f"num_classes=0{kwargs},\n{' ' * 26}pretrained_cfg_overlay=dict(file={path.name!r}))\n"
                    "model.eval()")
        blocks.append(
            f"### `{path.name}`\n\n```python\n{code}\n# input: RGB floats in [0, 1] resized to {info.img_size} x "
            f"{info.img_size}, normalised with mean {mean} and std {std}\nfeatures = model(images)  # (N, "
            f"{net.num_features}) pooled features\n```\n\nWith a new head for your classes: `num_classes=C` in place "
            "of `num_classes=0`" + (" (then `model.reset_classifier(C)` after loading)" if info.cnn_stem == "small"
                                    else "")
            + ".\n\nWith cass:\n\n```bash\n"
            f"cass finetune --from {path.name} --data my_labelled_images --label-fraction 0.1 --out runs/finetuned\n"
            f"cass embed --model {path.name} --input my_images --out features\n```\n\n"
            "(`--from` reads the network, its shape and its input size from the file; a typed `--img-size` wins.) "
            "From Python: `cass.models.backbone.load_backbone(path)` returns the network.")
    return "## Loading\n\n" + "\n\n".join(blocks)
