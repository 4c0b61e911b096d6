"""The Lightning wiring of gradient filtering, shared by both Lightning namespaces.

``lightning_gf.callbacks.pytorch_lightning`` (``pytorch_lightning``) and ``lightning_gf.callbacks.lightning``
(``lightning.pytorch``) each add their namespace's ``Callback`` base to this class.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_gf.config import GradientFilterConfig, resolve_config
from lightning_gf.diagnostics import peak_memory
from lightning_gf.diagnostics.saved_tensors import SavedTensorMeter
from lightning_gf.diagnostics.step_memory import PlainBackpropMemory
from lightning_gf.surgery.apply import apply_gradient_filter
from lightning_gf.surgery.class_swap import is_swapped
from lightning_gf.surgery.frozen_batchnorm import EvalModeMixin
from lightning_gf.surgery.frozen_bn_stats import FrozenBatchNormStats
from lightning_gf.surgery.handle import GradientFilterHandle
from lightning_gf.surgery.tracing import (
    INPUT_KINDS,
    ExampleInputError,
    describe_input,
    forward_input,
    model_input_of,  # noqa: F401  (public here before it moved)
    take_samples,
)

_MIB = 2**20
_SHARDED_STRATEGIES = {
    "FSDPStrategy": "FSDP",
    "DeepSpeedStrategy": "DeepSpeed",
    "ModelParallelStrategy": "ModelParallelStrategy (FSDP2 / tensor parallel)",
}


def refuse_sharded_strategy(strategy: Any) -> None:
    """Raise a clear error for the strategies the filter is not known to work with.

    Example:
        >>> class FSDPStrategy: ...
        >>> refuse_sharded_strategy(FSDPStrategy())
        Traceback (most recent call last):
        ...
        RuntimeError: GradientFilterCallback does not support FSDP: ...
    """
    for cls in type(strategy).__mro__:
        if cls.__name__ in _SHARDED_STRATEGIES:
            raise RuntimeError(
                f"GradientFilterCallback does not support {_SHARDED_STRATEGIES[cls.__name__]}: sharded parameters "
                "are untested with the filtered conv. Gradient filtering is meant for models that fit one device: "
                "use strategy='ddp' (or a single device); see docs/reliability.md"
            )


def _overrides_configure_model(pl_module: Any) -> bool:
    for cls in type(pl_module).__mro__:
        if "configure_model" in cls.__dict__:
            return not cls.__module__.startswith(("pytorch_lightning.", "lightning."))
    return False


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Run a block without moving the global torch, random and numpy generators."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's deps
        np, np_state = None, None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def _first_training_batch(trainer: Any, pl_module: nn.Module) -> Any:
    """The first sample of the first training batch, on the module's device (None without a loader)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    with _rng_untouched():
        loader = source.dataloader()
        batch = next(iter(loader))
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    return apply_to_collection(take_samples(batch, 1), Tensor, lambda t: t.to(device))


class GradientFilterCallbackBase:
    """Filters the last ``depth`` conv layers for ``fit`` and logs the memory saved.

    The filter is installed in ``setup('fit')`` (before optimizers and DDP), from
    ``pl_module.example_input_array`` or else the first training batch, and removed
    in ``teardown``. A module that builds its layers in ``configure_model`` gets that
    hook called first (Lightning requires it to be idempotent). FSDP, DeepSpeed and
    ``ModelParallelStrategy`` are refused with a clear error. Every training step logs, in MiB:

    - ``gf/activation_mb``: what the step's autograd graph keeps for backward, measured
      (every tensor saved between the batch's start and its backward, one count per
      storage, parameters and buffers left out);
    - ``gf/activation_mb_vanilla``: what plain backprop with the same trainable set would
      keep for the same batch: the step's figure plus the difference of two forwards,
      plain and filtered, measured on 2 and 3 samples of the batch (once per input
      shape) and extended linearly to the batch's size (see :mod:`lightning_gf.diagnostics.step_memory`);
    - ``gf/memory_saved_mb``: their difference;

    and ``gf/backward_gflops_saved`` (analytic) and, on CUDA, ``gf/peak_mb`` (the step's
    ``torch.cuda.max_memory_allocated``).

    Args are those of :func:`lightning_gf.apply_gradient_filter` (the options, or one
    ``config``: a :class:`~lightning_gf.config.GradientFilterConfig`; its ``filter_fn`` is
    not saved in checkpoints), plus
    ``log_memory`` (turn the per-step metrics off) and ``fidelity_every_n_steps``
    (``0``: off; ``N``: every ``N`` optimizer steps, before the step, log
    ``gf/fidelity/<layer>/gw_cos``, ``gw_norm_ratio``, ``gx_cos``, ``gx_norm_ratio``
    from :func:`lightning_gf.diagnostics.fidelity.fidelity_with_handle` on the step's batch, with
    ``training_step`` as the loss; costs two extra forward/backward passes).

    Example:
        >>> from lightning_gf import GradientFilterCallback
        >>> cb = GradientFilterCallback(r=2, depth=3)
        >>> cb.state_dict()["depth"]
        3
    """

    def __init__(
        self,
        r: Union[int, dict[str, int]] = 2,
        depth: int = 3,
        *,
        freeze: bool = True,
        bn_eval: bool = True,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        stride_correction: bool = True,
        lean: bool = True,
        log_memory: bool = True,
        fidelity_every_n_steps: int = 0,
        config: Optional[GradientFilterConfig] = None,
    ) -> None:
        if isinstance(fidelity_every_n_steps, bool) or not isinstance(fidelity_every_n_steps, int) or (
            fidelity_every_n_steps < 0
        ):
            raise ValueError(f"fidelity_every_n_steps must be an int >= 0 (0 turns it off), got {fidelity_every_n_steps!r}")
        self.filter_config = resolve_config(config, r=r, depth=depth, freeze=freeze, bn_eval=bn_eval,
                                            include=include, exclude=exclude, stride_correction=stride_correction,
                                            lean=lean)
        self.log_memory = log_memory
        self.fidelity_every_n_steps = fidelity_every_n_steps
        self._fidelity_step = -1
        self.handle: Optional[GradientFilterHandle] = None
        self._bn_stats: Optional[FrozenBatchNormStats] = None
        self._plain_memory: Optional[PlainBackpropMemory] = None
        self._input_kind: Optional[str] = None  # how the forward's input comes out of a batch (INPUT_KINDS)
        self._step_meter: Optional[SavedTensorMeter] = None
        self._extra_bytes: Optional[int] = None

    def config(self) -> dict[str, Any]:
        """The options this callback was built with (:meth:`GradientFilterConfig.options`)."""
        return self.filter_config.options()

    # the options, read off the config (one source of truth)
    r = property(lambda self: self.filter_config.r)
    depth = property(lambda self: self.filter_config.depth)
    freeze = property(lambda self: self.filter_config.freeze)
    bn_eval = property(lambda self: self.filter_config.bn_eval)
    include = property(lambda self: self.filter_config.options()["include"])
    exclude = property(lambda self: self.filter_config.options()["exclude"])
    stride_correction = property(lambda self: self.filter_config.stride_correction)
    lean = property(lambda self: self.filter_config.lean)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.handle is not None:
            return
        refuse_sharded_strategy(trainer.strategy)
        if _overrides_configure_model(pl_module):
            # Lightning calls it right after setup; the layers must exist now, before optimizers and DDP.
            pl_module.configure_model()
        example = pl_module.example_input_array
        if example is not None:
            self.handle = apply_gradient_filter(pl_module, self.filter_config, example_input=example)
        else:
            self.handle, self._input_kind = self._install_from_first_batch(trainer, pl_module)
        if self.log_memory:
            self._plain_memory = PlainBackpropMemory(pl_module, self.handle, trainer.precision_plugin.train_step_context)
        rank_zero_info(f"lightning_gf: {self.handle!r}")

    def _install_from_first_batch(self, trainer: Any, pl_module: Any) -> tuple[GradientFilterHandle, str]:
        """Install the filter with the first training sample as example input: the tensor
        ``model_input_of`` finds in it, else the whole batch as the forward's one argument."""
        batch = _first_training_batch(trainer, pl_module)
        if batch is None:
            raise ValueError(
                "GradientFilterCallback needs an example input: set `example_input_array` on the "
                "LightningModule or give the Trainer a training dataloader"
            )
        failures = []
        for kind in INPUT_KINDS:
            try:
                example = forward_input(batch, kind)
            except ValueError as err:  # no tensor where model_input_of looks
                failures.append(str(err).split(":")[0])
                continue
            with warnings.catch_warnings(record=True) as caught:  # what a forward said on the wrong input is noise
                warnings.simplefilter("always")
                try:
                    handle = apply_gradient_filter(pl_module, self.filter_config, example_input=example)
                except ExampleInputError as err:
                    cause = err.__cause__
                    failures.append(f"the model's forward failed on {describe_input(example)} "
                                    f"({type(cause).__name__}: {cause})")
                    continue
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return handle, kind
        raise ValueError(
            "GradientFilterCallback could not derive an example input from the first training batch: "
            f"{'; '.join(failures)}. Set `example_input_array` on the LightningModule to an input its forward "
            "accepts (a tensor, a tuple of positional arguments or a dict of keyword arguments), e.g. "
            "`self.example_input_array = torch.zeros(1, 3, 224, 224)`"
        )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.handle is None:
            return
        present = {id(m) for m in pl_module.modules()}
        lost = [layer.name for layer in self.handle.layers if id(layer.module) not in present]
        if lost:
            raise RuntimeError(
                f"the filtered layers {lost} are no longer in the model: something rebuilt them after "
                "GradientFilterCallback.setup (e.g. a configure_model that is not idempotent). Make configure_model "
                "return early when the layers exist (`if self.model is not None: return`)"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.handle is not None:
            self._bn_stats = FrozenBatchNormStats([m for m in pl_module.modules() if is_swapped(m, EvalModeMixin)])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.handle is None:
            return
        if self._bn_stats is not None and self._bn_stats.restore_replaced():
            rank_zero_info(
                "lightning_gf: put back the frozen BatchNorm statistics (bn_eval=True) that another callback "
                "replaced (StochasticWeightAveraging resets them before re-estimating, which eval mode cannot do)"
            )
        n, step = self.fidelity_every_n_steps, trainer.global_step
        if n and step % n == 0 and step != self._fidelity_step and pl_module.automatic_optimization:
            from lightning_gf.diagnostics.fidelity import (
                fidelity_with_handle,
                training_step_loss,
            )

            self._fidelity_step = step
            result = fidelity_with_handle(pl_module, batch, training_step_loss(batch_idx), self.handle)
            pl_module.log_dict(result.metrics(), on_step=True, on_epoch=False, batch_size=1)
        if self.log_memory:
            self._extra_bytes = self._plain_backprop_extra(batch)
        self.handle.reset_stats()
        if self.log_memory:
            self._step_meter = SavedTensorMeter()
            self._step_meter.skip_parameters_of(pl_module, buffers=True)
            self._step_meter.__enter__()
            peak_memory.reset_step_peak(pl_module.device)

    def _plain_backprop_extra(self, batch: Any) -> Optional[int]:
        """What plain backprop keeps beyond the filter for this batch (measured), or None
        where the forward's input cannot be found in the batch (said once)."""
        if self._plain_memory is None:
            return None
        kinds = INPUT_KINDS if self._input_kind is None else (self._input_kind,)
        errors = []
        for kind in kinds:
            try:
                extra = self._plain_memory.extra_bytes(forward_input(batch, kind))
            except Exception as err:  # the user's forward on an input guessed from the batch
                errors.append(f"{type(err).__name__}: {err}")
                continue
            self._input_kind = kind
            return extra
        self._plain_memory = None
        rank_zero_warn(
            "GradientFilterCallback logs gf/activation_mb but not gf/activation_mb_vanilla nor gf/memory_saved_mb: "
            f"the model's forward input could not be found in the training batch ({'; '.join(errors)}). A batch "
            "whose first element (or 'image' / 'input' entry) is the forward's input, or a forward that takes the "
            "whole batch, makes them measurable"
        )
        return None

    def _close_step_meter(self) -> None:
        if self._step_meter is not None:
            self._step_meter.close()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        self._close_step_meter()  # what the step's forward kept is what its backward will read

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.handle is None or not self.log_memory or self._step_meter is None:
            return
        self._close_step_meter()
        kept, self._step_meter = self._step_meter.total_bytes, None
        stats = self.handle.stats
        metrics = {
            "gf/activation_mb": kept / _MIB,
            "gf/backward_gflops_saved": 2 * (stats.backward_macs_vanilla - stats.backward_macs_filtered) / 1e9,
        }
        if self._extra_bytes is not None:
            metrics["gf/activation_mb_vanilla"] = (kept + self._extra_bytes) / _MIB
            metrics["gf/memory_saved_mb"] = self._extra_bytes / _MIB
        peak = peak_memory.step_peak_mib(pl_module.device)
        if peak is not None:
            metrics["gf/peak_mb"] = peak
        pl_module.log_dict(
            metrics,
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close_step_meter()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.handle is not None:
            self._close_step_meter()
            self._step_meter = self._plain_memory = self._input_kind = None
            self.handle.remove()
            self.handle = None
            self._bn_stats = None

    def state_dict(self) -> dict[str, Any]:
        return self.config()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        differing = {k: (v, state_dict[k]) for k, v in self.config().items() if k in state_dict and state_dict[k] != v}
        if differing:
            details = ", ".join(f"{k}: checkpoint {old!r} -> now {new!r}" for k, (new, old) in differing.items())
            rank_zero_warn(f"GradientFilterCallback resumed with a different configuration ({details})")
