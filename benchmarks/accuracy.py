"""Accuracy benchmark: plain backprop vs gradient filtering (paper's convention and with
the stride correction) in the paper's protocol, on generated textured objects (or shapes) or CIFAR.

    make bench-accuracy                                  # = the next line
    .venv/bin/python -m benchmarks.accuracy --docs docs  # generated textured objects, ~20 min on 2 CPU cores
    .venv/bin/python -m benchmarks.accuracy --data cifar10 --data-root data/cifar10 --out outputs/accuracy_cifar10

For every model: pretrain the whole (randomly initialised) network on the ``pretrain``
partition, cached in ``--out``; then, for every depth, method, ``r`` and seed, fine-tune
the last ``depth`` convs on the shifted ``finetune`` partition and score them on its
validation set. Finished runs are cached in ``--out`` too: an interrupted benchmark
resumes, and a finished one only rewrites its report. ``--docs DIR`` writes the table
into ``DIR/accuracy.md`` (between its result markers) and the plot to ``DIR/img/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any, Optional

import torch

from benchmarks.accuracy_data import SOURCES, DataSource
from benchmarks.accuracy_train import (
    FinetuneConfig,
    accuracy,
    build_model,
    finetune,
    front_features,
    pretrain,
    split_at,
)

PLAIN = "plain backprop"


@dataclass(frozen=True)
class Method:
    label: str
    r: int
    stride_correction: bool


def methods(rs: list[int]) -> list[Method]:
    """Plain backprop (the same layers with ``r = 1``), then per ``r`` the corrected and the paper's filter.

    Example:
        >>> [m.label for m in methods([2])]
        ['plain backprop', 'corrected r=2', 'paper r=2']
    """
    out = [Method(PLAIN, 1, True)]
    for r in rs:
        out += [Method(f"corrected r={r}", r, True), Method(f"paper r={r}", r, False)]
    return out


@dataclass
class BenchConfig:
    """Everything the benchmark depends on; the fields before ``models`` decide the numbers."""

    data: str = "objects"
    data_root: str = "data/cifar"
    image_size: int = 112
    pretrain_low_res: int = 64
    pretrain_low_res_steps: int = 450
    # models that need more pretraining steps to converge (docs/accuracy.md, "Protocol")
    pretrain_low_res_steps_for: dict[str, int] = field(default_factory=lambda: {"mobilenetv2_100": 1200})
    pretrain_steps: int = 0
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    finetune_size: int = 640
    val_size: int = 1024
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.2  # chosen for plain backprop (docs/accuracy.md, "Protocol")
    momentum: float = 0.9
    lean: bool = True
    models: list[str] = field(default_factory=lambda: ["resnet18", "mobilenetv2_100"])
    depths: list[int] = field(default_factory=lambda: [2, 4, 6])
    rs: list[int] = field(default_factory=lambda: [2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int = 1
    jobs: int = 2
    device: str = "cpu"
    out: str = "outputs/accuracy"

    def fingerprint(self) -> dict[str, Any]:
        keys = list(self.__dataclass_fields__)
        return {k: getattr(self, k) for k in keys[:keys.index("models")]}

    def low_res_steps(self, model: str) -> int:
        """Pretraining steps of ``model`` at ``pretrain_low_res`` px."""
        return self.pretrain_low_res_steps_for.get(model, self.pretrain_low_res_steps)

    def checkpoint(self, model: str) -> str:
        return os.path.join(self.out, f"pretrained_{self.data}_{model}_{self.pretrain_low_res}px"
                                      f"{self.low_res_steps(model)}_{self.image_size}px{self.pretrain_steps}_"
                                      f"b{self.pretrain_batch}_lr{self.pretrain_lr:g}.pt")

    def results_file(self, model: str) -> str:
        return os.path.join(self.out, f"results_{self.data}_{model}.json")


def _load_results(cfg: BenchConfig, model: str) -> dict[str, Any]:
    path = cfg.results_file(model)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("fingerprint") == cfg.fingerprint():
            return saved
        print(f"[{model}] settings changed since {path}: its runs are not reused", flush=True)
    return {"fingerprint": cfg.fingerprint(), "runs": {}}


def _save_results(cfg: BenchConfig, model: str, results: dict[str, Any]) -> None:
    with open(cfg.results_file(model), "w") as f:
        json.dump(results, f, indent=1)


def run_key(depth: int, method: Method, seed: int) -> str:
    return f"depth{depth}/{method.label}/seed{seed}"


def run_model(cfg: BenchConfig, model_name: str) -> dict[str, Any]:
    """Pretrain (or reuse) one model, then every fine-tuning run not already cached."""
    torch.set_num_threads(cfg.threads)
    tag = f"[{model_name}] "
    os.makedirs(cfg.out, exist_ok=True)
    start = time.perf_counter()
    results = _load_results(cfg, model_name)
    source = DataSource(cfg.data, cfg.image_size, cfg.data_root)
    model = build_model(model_name, source.num_classes).to(cfg.device)
    ckpt = cfg.checkpoint(model_name)
    if os.path.isfile(ckpt):
        print(f"{tag}reusing the pretrained checkpoint {ckpt}", flush=True)
        model.load_state_dict(torch.load(ckpt, map_location=cfg.device))
    else:
        phases = [(cfg.low_res_steps(model_name), cfg.pretrain_low_res), (cfg.pretrain_steps, cfg.image_size)]
        phases = [(steps, size) for steps, size in phases if steps > 0]
        print(f"{tag}pretraining on the 'pretrain' partition ("
              f"{', then '.join(f'{steps} steps at {size} px' for steps, size in phases)}, batch {cfg.pretrain_batch}); "
              f"cached as {ckpt}", flush=True)
        pretrain(model, source, phases=phases, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, seed=0, prefix=tag)
        torch.save(model.state_dict(), ckpt)
    model.eval()
    val = source.finetune_set("val", cfg.val_size, seed=0)
    if "pretrain_acc" not in results:
        results["pretrain_acc"] = accuracy(model, source.pretrain_val(cfg.val_size))
        results["before_finetune_acc"] = accuracy(model, val)
    print(f"{tag}pretrained: {results['pretrain_acc']:.1f} % on the pretraining partition, "
          f"{results['before_finetune_acc']:.1f} % on the fine-tuning validation set", flush=True)

    todo = [(d, m, s) for s in cfg.seeds for d in cfg.depths for m in methods(cfg.rs)
            if run_key(d, m, s) not in results["runs"]]
    if todo:
        splits = {d: split_at(model, d, val.images[:2].to(cfg.device)) for d in cfg.depths}
        results["trained_convs"] = {str(d): split.trained for d, split in splits.items()}
        shortest = min(splits.values(), key=lambda split: len(split.front))
        seeds_needed = sorted({s for _, _, s in todo})
        base = front_features(shortest.front, [val] + [source.finetune_set("train", cfg.finetune_size, s)
                                                 for s in seeds_needed])
        features = {}
        for d, split in splits.items():
            rest = split.front[len(shortest.front):]
            sets = front_features(torch.nn.Sequential(*rest), base) if len(rest) else base
            features[d] = (sets[0], dict(zip(seeds_needed, sets[1:])))
        print(f"{tag}{len(todo)} fine-tuning runs to do (front features cached, "
              f"{time.perf_counter() - start:.0f} s so far)", flush=True)
    for i, (depth, method, seed) in enumerate(todo, start=1):
        split = splits[depth]
        key = run_key(depth, method, seed)
        if method.r > 1 and not method.stride_correction and not split.strided:
            twin = run_key(depth, Method(f"corrected r={method.r}", method.r, True), seed)
            results["runs"][key] = {**results["runs"][twin], "same_as": twin, "seconds": 0.0}
        else:
            ft = FinetuneConfig(depth=depth, r=method.r, stride_correction=method.stride_correction, seed=seed,
                                epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                lean=cfg.lean)
            val_features, train_features = features[depth]
            results["runs"][key] = finetune(split.tail, train_features[seed], val_features, ft)
        _save_results(cfg, model_name, results)
        run = results["runs"][key]
        note = " (no strided conv trained: same as corrected)" if "same_as" in run else ""
        print(f"{tag}run {i}/{len(todo)} {key}: {run['acc']:.1f} %{note} ({run['seconds']:.0f} s; "
              f"{time.perf_counter() - start:.0f} s so far)", flush=True)
    results["seconds_last_invocation"] = time.perf_counter() - start
    _save_results(cfg, model_name, results)
    return results


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Cell":
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f}"


def summarise(cfg: BenchConfig, all_results: dict[str, dict[str, Any]]) -> dict[str, dict[int, dict[str, Cell]]]:
    """``{model: {depth: {method label: Cell over seeds}}}`` for the finished runs."""
    table: dict[str, dict[int, dict[str, Cell]]] = {}
    for model, results in all_results.items():
        for depth in cfg.depths:
            for method in methods(cfg.rs):
                values = [results["runs"][k]["acc"] for s in cfg.seeds
                          if (k := run_key(depth, method, s)) in results["runs"]]
                if values:
                    table.setdefault(model, {}).setdefault(depth, {})[method.label] = Cell.of(values)
    return table


def expected_outcome(table: dict[str, dict[int, dict[str, Cell]]]) -> list[str]:
    """The two checks of issue 7 item 5, on resnet18 with r = 2."""
    lines = []
    cells = table.get("resnet18", {})
    if 2 in cells and {PLAIN, "corrected r=2"} <= set(cells[2]):
        gap = cells[2][PLAIN].mean - cells[2]["corrected r=2"].mean
        verdict = "yes" if gap <= 1.5 else "no"
        lines.append(f"- resnet18, depth 2: plain backprop minus corrected r=2 = {gap:+.1f} points "
                     f"(within 1.5 points: **{verdict}**)")
    if 4 in cells and {"paper r=2", "corrected r=2"} <= set(cells[4]):
        gain = cells[4]["corrected r=2"].mean - cells[4]["paper r=2"].mean
        verdict = "yes" if gain >= 3.0 else "no"
        lines.append(f"- resnet18, depth 4: corrected r=2 minus paper's convention r=2 = {gain:+.1f} points "
                     f"(at least 3 points better: **{verdict}**)")
    return lines


def markdown(cfg: BenchConfig, all_results: dict[str, dict[str, Any]], seconds: Optional[float]) -> str:
    table = summarise(cfg, all_results)
    labels = [m.label for m in methods(cfg.rs)]
    rows = ["| model | trained convs | before fine-tuning | " + " | ".join(labels) + " |",
            "|---|---|---|" + "---|" * len(labels)]
    for model, by_depth in table.items():
        before = all_results[model]["before_finetune_acc"]
        for depth, cells in by_depth.items():
            rows.append(f"| {model} | last {depth} | {before:.1f} | "
                        + " | ".join(str(cells.get(label, "")) for label in labels) + " |")
    pre = ", ".join(f"{m} {r['pretrain_acc']:.1f} %" for m, r in all_results.items())
    same = sorted({f"{m} depth {k.split('/')[0][5:]}" for m, r in all_results.items()
                   for k, run in r["runs"].items() if "same_as" in run})
    n_seeds = len(cfg.seeds)
    text = [f"Top-1 accuracy (%) on the fine-tuning validation set ({cfg.val_size} images), mean ± standard "
            f"deviation over {n_seeds} seeds (seeds {', '.join(map(str, cfg.seeds))}).", "", *rows, "",
            f"Pretrained accuracy on the pretraining partition: {pre}."]
    if same:
        text.append(f"No trained conv is strided in: {', '.join(same)}; there the paper's convention and the "
                    "correction compute the same gradients, and the table repeats the corrected runs.")
    text += ["", "Expected outcome (issue 7):", "", *expected_outcome(table)]
    spread = [f"{model} depth {depth} {label}: {cell.low:.1f}-{cell.high:.1f}"
              for model, by_depth in table.items() for depth, cells in by_depth.items()
              for label, cell in cells.items()]
    text += ["", "<details><summary>min-max over seeds</summary>", "", "; ".join(spread), "", "</details>"]
    if seconds is not None:
        text += ["", f"Wall time of this invocation: {seconds / 60:.1f} min."]
    return "\n".join(text)


def plot(cfg: BenchConfig, all_results: dict[str, dict[str, Any]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(cfg, all_results)
    fig, axes = plt.subplots(1, len(table), figsize=(5.2 * len(table), 3.9), squeeze=False)
    styles = {PLAIN: ("k", "-", "o")}
    for i, r in enumerate(cfg.rs):
        styles[f"corrected r={r}"] = (f"C{2 * i}", "-", "s")
        styles[f"paper r={r}"] = (f"C{2 * i + 1}", "--", "^")
    for ax, (model, by_depth) in zip(axes[0], table.items()):
        depths = sorted(by_depth)
        for j, label in enumerate(m.label for m in methods(cfg.rs)):
            cells = [by_depth[d].get(label) for d in depths]
            if any(c is None for c in cells):
                continue
            colour, line, marker = styles[label]
            x = [d + 0.06 * (j - 2) for d in depths]
            ax.errorbar(x, [c.mean for c in cells], yerr=[c.std for c in cells], color=colour, linestyle=line,
                        marker=marker, capsize=3, label=label)
        ax.axhline(all_results[model]["before_finetune_acc"], color="grey", linestyle=":", label="before fine-tuning")
        ax.set_title(f"{model}, {cfg.data} {cfg.image_size} px")
        ax.set_xticks(depths)
        ax.set_xlabel("trained convs (last N)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


START, END = "<!-- accuracy-results:start -->", "<!-- accuracy-results:end -->"


def write_docs(docs: str, block: str, figure: str) -> str:
    """Put ``block`` between the result markers of ``docs/accuracy.md`` (appended if absent)."""
    path = os.path.join(docs, "accuracy.md")
    text = open(path).read() if os.path.isfile(path) else "# Accuracy\n"
    body = f"{START}\n{block}\n\n![accuracy per depth]({os.path.relpath(figure, docs)})\n{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def run(cfg: BenchConfig, docs: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """All models (in ``cfg.jobs`` processes), then the report. Returns ``{model: results}``."""
    start = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.jobs > 1 and len(cfg.models) > 1:
        with ProcessPoolExecutor(min(cfg.jobs, len(cfg.models)), mp_context=get_context("spawn")) as pool:
            all_results = dict(zip(cfg.models, pool.map(run_model, [cfg] * len(cfg.models), cfg.models)))
    else:
        all_results = {m: run_model(cfg, m) for m in cfg.models}
    seconds = time.perf_counter() - start
    block = markdown(cfg, all_results, seconds)
    with open(os.path.join(cfg.out, "accuracy.md"), "w") as f:
        f.write(block + "\n")
    figure = plot(cfg, all_results, os.path.join(docs or cfg.out, "img" if docs else "", f"accuracy_{cfg.data}.png"))
    print("\n" + block + f"\n\nplot: {figure}")
    if docs:
        print(f"docs: {write_docs(docs, block, figure)}")
    return all_results


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _model_ints(text: str) -> dict[str, int]:
    """``"a=1,b=2"`` -> ``{"a": 1, "b": 2}`` (``""`` -> ``{}``)."""
    pairs = [item.split("=") for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected MODEL=STEPS,... got {text!r}")
    return {name: int(value) for name, value in pairs}


def main(argv: Optional[list[str]] = None) -> None:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=SOURCES, default=d.data)
    p.add_argument("--data-root", default=d.data_root, help="CIFAR folder (torchvision layout; never downloaded)")
    p.add_argument("--out", default=d.out, help="cached checkpoints, runs and the report")
    p.add_argument("--docs", help="also write DIR/accuracy.md (result block) and DIR/img/accuracy_<data>.png")
    p.add_argument("--models", default=",".join(d.models), help="timm model names, comma-separated")
    p.add_argument("--depths", type=_ints, default=d.depths)
    p.add_argument("--rs", type=_ints, default=d.rs)
    p.add_argument("--seeds", type=_ints, default=d.seeds)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="pretraining steps at --image-size")
    p.add_argument("--pretrain-low-res", type=int, default=d.pretrain_low_res,
                   help="image size of the first pretraining phase (progressive resizing)")
    p.add_argument("--pretrain-low-res-steps", type=int, default=d.pretrain_low_res_steps,
                   help="steps of the first pretraining phase (0: none)")
    p.add_argument("--pretrain-low-res-steps-for", type=_model_ints, default=d.pretrain_low_res_steps_for,
                   metavar="MODEL=STEPS,...", help="models that take another number of first-phase steps "
                   f"(default {','.join(f'{k}={v}' for k, v in d.pretrain_low_res_steps_for.items())}; '' for none)")
    p.add_argument("--pretrain-batch", type=int, default=d.pretrain_batch)
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    p.add_argument("--finetune-size", type=int, default=d.finetune_size, help="fine-tuning images (CIFAR: 0 = all)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images (CIFAR: 0 = whole test set)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--no-lean", dest="lean", action="store_false", help="filtered runs without the lean region")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=d.jobs, help="models trained at the same time, one process each")
    p.add_argument("--device", default=d.device, help="torch device, e.g. cuda (default cpu)")
    a = p.parse_args(argv)
    cfg = replace(d, data=a.data, data_root=a.data_root, out=a.out, models=a.models.split(","), depths=a.depths,
                  rs=a.rs, seeds=a.seeds, image_size=a.image_size, pretrain_steps=a.pretrain_steps,
                  pretrain_low_res=a.pretrain_low_res, pretrain_low_res_steps=a.pretrain_low_res_steps,
                  pretrain_low_res_steps_for=a.pretrain_low_res_steps_for,
                  pretrain_batch=a.pretrain_batch, pretrain_lr=a.pretrain_lr, finetune_size=a.finetune_size,
                  val_size=a.val_size, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
                  lean=a.lean, threads=a.threads, jobs=a.jobs, device=a.device)
    run(cfg, a.docs)


if __name__ == "__main__":
    main()
