"""`LDFACallback`: LDFA inside a Hugging Face `Trainer`.

The callback only calls the plugin: ``step()`` after every optimizer step that really
happened, ``save_pretrained`` into every checkpoint folder, ``load_state_dict`` on resume,
and a few ``ldfa/*`` scalars into the logs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Optional

import torch
from transformers import TrainerCallback

from .warning import LDFAWarning
from .plugin import STATE_NAME, LDFAPlugin


class LDFACallback(TrainerCallback):
    """Keeps an `LDFAPlugin` in step with a `Trainer`.

    Args:
        plugin: the plugin returned by ``ldfa_hf.wrap(model, config)``.
        probe_batch: optional batch (a mapping of tensors); when given, every log also
            carries ``ldfa/angle``, the mean angle between LDFA's and backprop's gradient.
        resume_from_checkpoint: where to read the plugin state when the Trainer resumes
            from a folder other than ``output_dir/checkpoint-N``.

    Example:
        >>> plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=16))
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds)
        >>> LDFACallback(plugin).install(trainer)              # ahead of TensorBoard / W&B
        >>> trainer.train()                                    # or resume_from_checkpoint=True
    """

    def __init__(self, plugin: LDFAPlugin, probe_batch: Optional[Mapping[str, Any]] = None,
                 resume_from_checkpoint: Optional[str] = None) -> None:
        if not isinstance(plugin, LDFAPlugin):
            raise TypeError(f"LDFACallback needs an LDFAPlugin (from ldfa_hf.wrap), got {type(plugin).__name__}")
        self.plugin = plugin
        self.probe_batch = probe_batch
        self.resume_from_checkpoint = resume_from_checkpoint
        self._installed = False

    # -- ordering: our scalars must be in `logs` before the reporting callbacks read them ------
    def install(self, trainer) -> "LDFACallback":
        """Add this callback to ``trainer`` ahead of its reporters (TensorBoard, W&B, ...).

        The Trainer runs user callbacks after the reporting ones, which read ``logs`` in their own
        ``on_log``; installed this way, the ``ldfa/*`` scalars are in ``logs`` before they do. Uses
        only the Trainer's public ``add_callback`` / ``pop_callback``.

        Example:
            >>> trainer = Trainer(model=model, args=args, train_dataset=ds)
            >>> LDFACallback(plugin).install(trainer)
            >>> trainer.train()
        """
        from transformers.trainer_callback import DefaultFlowCallback

        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        ahead = trainer.callback_handler.callbacks
        for callback in ahead[:ahead.index(self)]:
            if not isinstance(callback, DefaultFlowCallback):
                trainer.pop_callback(callback)   # re-added behind us, in the same order
                trainer.add_callback(callback)
        self._installed = True
        return self

    # -- training --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        if not self._installed and [r for r in reporters if r != "none"]:
            warnings.warn(
                "LDFACallback was passed in callbacks=[...], so it runs after the reporting callbacks "
                f"({', '.join(reporters)}) and the ldfa/* scalars reach only trainer.state.log_history; "
                "use LDFACallback(plugin).install(trainer) to report them too", LDFAWarning, stacklevel=2)
        ddp = getattr(args, "world_size", 1) > 1 and not getattr(args, "fsdp", None) and not getattr(args, "deepspeed", None)
        if self.plugin.config.skip_branches and ddp and not args.ddp_find_unused_parameters:
            warnings.warn(
                "skip_branches leaves a skipped branch's parameters without a gradient that step, which DDP "
                "refuses unless it looks for unused parameters: set TrainingArguments(ddp_find_unused_parameters=True)",
                LDFAWarning, stacklevel=2)
        if self.plugin.steps_per_epoch is None:  # the Trainer's epoch length, for refresh_every="auto"
            loader = kwargs.get("train_dataloader")
            try:
                batches = len(loader)
            except TypeError:  # an iterable dataset has no length: keep the fallback
                batches = None
            if batches:
                self.plugin.steps_per_epoch = max(1, batches // max(1, args.gradient_accumulation_steps))
        if state.global_step > 0:  # the Trainer restored its state from a checkpoint
            folder = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._restore(folder)

    def _restore(self, folder: str) -> None:
        path = os.path.join(folder, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at a checkpoint without LDFA state: {path} does not exist. Refusing to re-initialise the "
                "feedback silently; pass LDFACallback(plugin, resume_from_checkpoint=...) if the checkpoint is elsewhere"
            )
        self.plugin.load_pretrained(folder)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: no weight update, no factor update
            self.plugin.reset_statistics()
            return
        self.plugin.step()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # factors are identical on every process
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.plugin.save_pretrained(folder)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only, not evaluation ones
            return
        stats = self.plugin.stats(self._probe_batch(kwargs.get("model")))
        scalars = {"ldfa/feedback_error": stats["mean_feedback_error"],
                   "ldfa/skipped_updates": stats["skipped_updates"]}
        if "mean_angle" in stats:
            scalars["ldfa/angle"] = stats["mean_angle"]
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def _probe_batch(self, model):
        if self.probe_batch is None:
            return None
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.probe_batch.items()}
