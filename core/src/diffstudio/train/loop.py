"""The training loop (``diffstudio train`` and :func:`train`), on accelerate.

One process or many (``accelerate launch``): each process prepares its own batches, accelerate synchronises
gradients (DDP by default; FSDP / DeepSpeed through an accelerate config file), accumulates them over
``--gradient_accumulation_steps`` micro-steps and applies mixed precision. Batches are assigned so that one
optimizer step always sees the same samples whatever the process count: the epoch's batch ``k`` goes to process
``k % P`` as micro-step ``(k // P) % A``. Only the main process writes files and shows the progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffstudio._io import atomic_write_text
from diffstudio.lora import attach_lora, collect_lora
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.state import PipelineState
from diffstudio.runtime import Runtime
from diffstudio.train.cache import SampleCache, prepared_units
from diffstudio.train.checkpoints import TrainerState, TrainingParts, resume, save_checkpoint, save_weights
from diffstudio.train.config import TrainConfig, TrainConfigError
from diffstudio.train.data import TrainingDataset, epoch_batches
from diffstudio.train.ema import EmaWeights
from diffstudio.train.loader import loaded_batches
from diffstudio.train.lora_train import PRESET_LORA, TRAINED_LORA, add_trainable_lora, continue_from, lora_module
from diffstudio.train.models import load_training_pipeline, model_configs, own_memory
from diffstudio.train.objective import FlowMatchingObjective, collate, sample_generator, training_inputs
from diffstudio.train.optim import adamw, stepper
from diffstudio.train.outputs import full_state, lora_reader, lora_writer, save_lora, strip_prefix
from diffstudio.train.templates import TemplateTraining, base_trainable

logger = logging.getLogger("diffstudio.train")

__all__ = ["TrainResult", "Trainer", "load_training_pipeline", "model_configs", "train"]


@dataclass
class TrainResult:
    """What a run did: steps, the losses of every optimizer step (main process), the files written."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime if runtime is not None else Runtime()
        self.ema: EmaWeights | None = None
        self.templates: TemplateTraining | None = None  # --template_model_id_or_path (train/templates.py)

    @property
    def unconditioned(self) -> bool:
        """Whether samples also need the negative (empty-prompt) branch, for caption dropout."""
        return self.config.caption_dropout > 0

    # -- setup ----------------------------------------------------------------------------------------------

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs

        # accelerate keeps one process-wide state: a second train() in the same process (the Python API) with
        # another --mixed_precision or accumulation would be refused. The distributed setup (PartialState) stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        cpu = not torch.cuda.is_available()
        return Accelerator(
            gradient_accumulation_steps=self.config.gradient_accumulation_steps,
            mixed_precision=self.config.mixed_precision,
            cpu=cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.config.find_unused_parameters)],
        )

    def _trainable(self, pipe: BasePipeline) -> tuple[list[str], dict[str, nn.Module]]:
        cfg = self.config
        for name in [*base_trainable(cfg.trainable_models), *([cfg.lora_base_model] if cfg.lora_base_model else [])]:
            if name not in pipe.loaded:
                raise TrainConfigError(
                    f"--trainable_models / --lora_base_model names {name!r}, which matches no loaded component; "
                    f"loaded: {', '.join(sorted(pipe.loaded))}"
                )
        # frozen slots first: a slot that shares modules with a trained one (Step1X's connector slot is the DiT's
        # connector) must not freeze them after the trained slot unfroze them
        for name, component in sorted(pipe.loaded.items(), key=lambda item: item[0] in cfg.trainable_models):
            module = component.module
            if isinstance(module, nn.Module):
                trained = name in cfg.trainable_models
                if trained:
                    own_memory(module)
                module.requires_grad_(trained)
                module.train(trained)
                if cfg.use_gradient_checkpointing and hasattr(module, "use_gradient_checkpointing"):
                    flag: Any = trained or name == cfg.lora_base_model
                    module.use_gradient_checkpointing = flag
                    if flag:  # families checkpoint blocks in training mode only; the LoRA base needs it too
                        module.train(True)
        if cfg.preset_lora_path:
            self._preset_lora(pipe)
        extra: dict[str, nn.Module] = {}
        if cfg.lora_base_model:
            base = pipe.loaded[cfg.lora_base_model].module
            deltas = add_trainable_lora(
                base, cfg.lora_target_modules, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed,
                component=cfg.lora_base_model,
            )  # fmt: skip
            if cfg.lora_checkpoint:
                deltas = continue_from(base, deltas, self._read_lora(pipe, cfg.lora_checkpoint))
            extra["lora"] = lora_module(deltas)
        if self.templates is not None:  # templates: trained through the objective's extra modules
            extra["template_model"] = self.templates.model
        return base_trainable(cfg.trainable_models), extra

    def _preset_lora(self, pipe: BasePipeline) -> None:
        """Differential LoRA: the preset LoRA becomes part of the frozen base before the new one is added.

        It is attached as a frozen side path rather than fused into the weights: the same function, exact in
        any storage dtype (fusing into float8 weights would round it away) and without writing to the
        memory-mapped checkpoint. Saved files hold only the new LoRA: the difference to the preset.
        """
        cfg = self.config
        slot = str(cfg.preset_lora_model)
        if slot not in pipe.loaded:
            raise TrainConfigError(
                f"--preset_lora_model {slot!r} matches no loaded component; loaded: {', '.join(sorted(pipe.loaded))}"
            )
        module = pipe.loaded[slot].module
        attach_lora(module, self._read_lora(pipe, str(cfg.preset_lora_path)), PRESET_LORA)

    def _read_lora(self, pipe: BasePipeline, path: str) -> Any:
        from safetensors.torch import load_file

        return lora_reader(self.runtime, pipe.family, load_file(path), path)

    # -- data -----------------------------------------------------------------------------------------------

    def _dataset(self, pipe: BasePipeline) -> TrainingDataset:
        cfg = self.config
        return TrainingDataset(
            cfg.dataset_base_path,
            cfg.dataset_metadata_path,
            data_file_keys=cfg.data_file_keys,
            extra_inputs=cfg.extra_inputs,
            height=cfg.height,
            width=cfg.width,
            max_pixels=cfg.max_pixels,
            repeat=cfg.dataset_repeat,
            multiple=type(pipe).size_multiple,
            allow_outside=cfg.allow_outside_dataset,
        )

    def _prepare(self, pipe: BasePipeline, dataset: TrainingDataset, cache: SampleCache | None,
                 positions: list[int], skip: set[str],
                 loaded: list[dict[str, Any]] | None = None) -> PipelineState:  # fmt: skip
        states = []
        for i, position in enumerate(positions):
            sample = dataset.load(position, with_files=cache is None) if loaded is None else loaded[i]
            if self.templates is not None:  # templates: template_inputs -> cache tensors (with gradients)
                self.templates.add_cache(pipe, sample, dataset.sample(position).index, cached=cache is not None)
            inputs = training_inputs(pipe, sample, self.config.pipeline_args)
            if cache is None:
                states.append(pipe.prepare(inputs, cfg=self.unconditioned))
                continue
            state = cache.load(dataset.sample(position).index, device=pipe.device)
            state.shared = {**inputs, **state.shared}
            states.append(pipe.prepare({}, skip=skip, state=state, cfg=self.unconditioned))
        return collate(states)

    # -- run ------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train; returns the losses and files (the main process's view)."""
        cfg = self.config
        started = time.monotonic()
        accelerator = self._accelerator()
        torch.manual_seed(cfg.seed)
        pipe = load_training_pipeline(cfg, self.runtime, str(accelerator.device))
        self.pipeline = pipe
        pipe.set_progress_bar_config(disable=True)
        self.templates = TemplateTraining.from_config(cfg, self.runtime, pipe)
        dataset = self._dataset(pipe)
        output = Path(cfg.output_path)
        if cfg.task == "sft:data_process":
            return self._data_process(accelerator, pipe, dataset, output, started)
        trainable, extra = self._trainable(pipe)
        if cfg.lora_base_model:  # a missing writer stops now, not after the first epoch
            lora_writer(self.runtime, pipe.family, self._lora_layout())
        objective = self.objective = self._objective(pipe, trainable, extra)
        params = [p for p in objective.parameters() if p.requires_grad]
        if not params:
            raise TrainConfigError("the chosen --trainable_models / LoRA have no trainable parameters")
        optimizer = adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        model, optimizer = accelerator.prepare(objective, optimizer)
        optimizer_step = stepper(optimizer)
        self.ema = EmaWeights(objective, cfg.ema_decay) if cfg.ema_decay else None
        self.parts = TrainingParts(objective, getattr(optimizer, "optimizer", optimizer), self.ema, accelerator.scaler)
        state = TrainerState()
        if self.checkpointing:
            check_checkpoint_support(accelerator)
        if cfg.resume:
            resumed = resume(output, self.parts, accelerator.process_index)
            if resumed is None:
                logger.warning("--resume: no checkpoint in %s; training from the start", output / "checkpoints")
            else:
                state = resumed.apply(self.parts)
                logger.info("resumed from %s (step %d)", resumed.folder, state.step)
                if self._done(state) or state.epoch >= cfg.num_epochs:  # finished: its files and log stay as they are
                    logger.info("%s is the end of the run (step %d); nothing to train", resumed.folder, state.step)
                    accelerator.end_training()
                    return TrainResult(steps=state.step, seconds=time.monotonic() - started)
        cache, skip = None, set()
        if cfg.task == "sft:train":
            cache = SampleCache(output / "cache")
            skip = cache.units()
            rows = [sample.index for sample in dataset.rows]
            if cache.preload(rows, cfg.cache_memory_mb * 2**20):
                logger.info("split-training cache held in memory (%d rows)", len(set(rows)))
        result = TrainResult(steps=state.step)
        bar = self._progress(accelerator, dataset, state)
        for epoch in range(state.epoch, cfg.num_epochs):
            updates = list(self._updates(accelerator, dataset, epoch, state))
            samples = self._loaded(dataset, [p for _, micro in updates for p in micro], cache is None)
            for update, micro in updates:
                for positions in micro:
                    with accelerator.accumulate(model):
                        batch = self._prepare(pipe, dataset, cache, positions, skip, next(samples, None))
                        generators = [sample_generator(cfg.seed, epoch, p) for p in positions]
                        loss = model(batch, generators)
                        accelerator.backward(loss)
                        set_learning_rate(optimizer, cfg.learning_rate * lr_factor(cfg, state.step))
                        optimizer_step()
                        optimizer.zero_grad(set_to_none=True)
                        if self.ema is not None and accelerator.sync_gradients:
                            self.ema.update()
                    value = float(accelerator.gather(loss.detach().reshape(1)).mean())
                    result.losses.append(value) if len(micro) == 1 else None
                if len(micro) > 1:
                    result.losses.append(value)
                state.step, state.update_in_epoch = state.step + 1, update + 1
                self._after_step(accelerator, pipe, objective, state, result, bar, value)
                if self._done(state):
                    break
            if self._done(state) and state.update_in_epoch < self._updates_per_epoch(accelerator, dataset, epoch):
                if accelerator.is_main_process:  # stopped inside the epoch by --max_steps
                    path = output / f"step-{state.step}.safetensors"
                    result.files.append(str(self._save_weights(pipe, objective, path)))
                self._checkpoint(accelerator, state)
                break
            state.epoch, state.update_in_epoch = epoch + 1, 0
            if accelerator.is_main_process:
                result.files.append(str(self._save_weights(pipe, objective, output / f"epoch-{epoch}.safetensors")))
            self._checkpoint(accelerator, state)
            if self._done(state):
                break
        if bar is not None:
            bar.close()
        accelerator.wait_for_everyone()
        result.steps, result.seconds = state.step, time.monotonic() - started
        if accelerator.is_main_process:
            atomic_write_text(output / "train_log.json", json.dumps(asdict(result)) + "\n")
        accelerator.end_training()
        return result

    def _objective(self, pipe: BasePipeline, trainable: list[str], extra: dict[str, nn.Module]) -> Any:
        cfg = self.config
        offload = cfg.use_gradient_checkpointing_offload
        if cfg.task == "direct_distill":
            from diffstudio.train.distill import DirectDistillObjective

            return DirectDistillObjective(pipe, trainable, extra, steps=cfg.distill_steps,
                                          caption_dropout=cfg.caption_dropout, activation_offload=offload)  # fmt: skip
        return FlowMatchingObjective(
            pipe,
            trainable,
            extra,
            timestep_sampling=cfg.timestep_sampling,
            sampling_options={"logit_mean": cfg.logit_mean, "logit_std": cfg.logit_std, "mode_scale": cfg.mode_scale},
            loss_weighting=cfg.loss_weighting,
            caption_dropout=cfg.caption_dropout,
            activation_offload=offload,
        )

    def _loaded(self, dataset: TrainingDataset, batches: list[list[int]], with_files: bool) -> Iterator[Any]:
        """Samples read ahead by ``--dataset_num_workers`` processes; none (read in ``_prepare``) without workers."""
        if self.config.dataset_num_workers <= 0:
            return iter(())
        return loaded_batches(dataset, batches, workers=self.config.dataset_num_workers, with_files=with_files)

    @property
    def checkpointing(self) -> bool:
        """Whether resumable checkpoints are written: with ``--checkpoint_steps``, or ``--resume`` (at epoch ends)."""
        return bool(self.config.checkpoint_steps) or self.config.resume

    def _checkpoint(self, accelerator: Any, state: TrainerState) -> None:
        """The checkpoint at an epoch's end or at ``--max_steps``, when checkpoints are written at all."""
        if self.checkpointing:  # after _after_step's: the epoch's end moves the state to the next epoch
            save_checkpoint(accelerator, self.config.output_path, state, self.parts)

    def _lora_layout(self) -> str:
        return "kohya" if self.config.align_to_opensource_format else self.config.lora_format

    def _done(self, state: TrainerState) -> bool:
        return self.config.max_steps is not None and state.step >= self.config.max_steps

    def _updates_per_epoch(self, accelerator: Any, dataset: TrainingDataset, epoch: int) -> int:
        batches = epoch_batches(dataset, epoch, self.config.seed, self.config.batch_size)
        return len(batches) // (int(accelerator.num_processes) * self.config.gradient_accumulation_steps)

    def _updates(
        self, accelerator: Any, dataset: TrainingDataset, epoch: int, state: TrainerState
    ) -> Iterator[tuple[int, list[list[int]]]]:
        """This process's micro-batches of each optimizer step of ``epoch``, from the resume point on."""
        cfg = self.config
        processes, accumulation = accelerator.num_processes, cfg.gradient_accumulation_steps
        batches = epoch_batches(dataset, epoch, cfg.seed, cfg.batch_size)
        per_update = processes * accumulation
        first = state.update_in_epoch if epoch == state.epoch else 0
        for update in range(first, len(batches) // per_update):
            group = batches[update * per_update : (update + 1) * per_update]
            yield update, [group[a * processes + accelerator.process_index] for a in range(accumulation)]

    def _progress(self, accelerator: Any, dataset: TrainingDataset, state: TrainerState) -> Any:
        if not accelerator.is_main_process:
            return None
        from tqdm.auto import tqdm

        cfg = self.config
        per_epoch = len(dataset) // (cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps)
        total = per_epoch * cfg.num_epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.num_epochs)
        return tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True)

    def _after_step(self, accelerator: Any, pipe: BasePipeline, objective: FlowMatchingObjective,
                    state: TrainerState, result: TrainResult, bar: Any, loss: float) -> None:  # fmt: skip
        cfg = self.config
        output = Path(cfg.output_path)
        if bar is not None:  # the postfix is drawn at tqdm's next refresh (mininterval), not on every step
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
        if cfg.save_steps and state.step % cfg.save_steps == 0 and accelerator.is_main_process:
            result.files.append(str(self._save_weights(pipe, objective, output / f"step-{state.step}.safetensors")))
        if cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0:
            save_checkpoint(accelerator, output, state, self.parts)
        if cfg.validation_prompt and cfg.validation_steps and state.step % cfg.validation_steps == 0:
            if accelerator.is_main_process:
                self._validate(pipe, objective, output / "validation" / f"step-{state.step}.png")
            accelerator.wait_for_everyone()

    def _validate(self, pipe: BasePipeline, objective: FlowMatchingObjective, path: Path) -> None:
        from diffstudio.outputs import record_for, save_image

        was_training = [m.training for m in objective.trained.values()]
        for module in objective.trained.values():
            module.eval()
        size = {"height": self.config.height, "width": self.config.width} if self.config.height else {}
        arguments = {"seed": 0, **size, **self.config.pipeline_args}
        generate: Any = pipe
        image = generate(self.config.validation_prompt, **arguments)
        record = record_for(pipe, prompt=str(self.config.validation_prompt), seed=0, image=image, arguments=arguments)
        save_image(image, path, record)
        for module, flag in zip(objective.trained.values(), was_training):
            module.train(flag)

    def _save_weights(self, pipe: BasePipeline, objective: FlowMatchingObjective, path: Path) -> Path:
        if self.ema is None:
            return self._write_weights(pipe, objective, path)
        with self.ema.applied():
            return self._write_weights(pipe, objective, path)

    def _write_weights(self, pipe: BasePipeline, objective: FlowMatchingObjective, path: Path) -> Path:
        cfg = self.config
        if self.templates is not None:  # templates: pipe.template_model.* (+ trained slots), data-only export
            return self.templates.save(path, objective.trained)
        if cfg.lora_base_model:
            lora = collect_lora(pipe.loaded[cfg.lora_base_model].module, TRAINED_LORA)
            return save_lora(self.runtime, pipe.family, lora, path, self._lora_layout(), rank=cfg.lora_rank,
                             alpha=cfg.lora_alpha, base_model=cfg.lora_base_model,
                             remove_prefix=cfg.remove_prefix_in_ckpt)  # fmt: skip
        if len(objective.trained) == 1 and not cfg.remove_prefix_in_ckpt:
            (slot,) = objective.trained.keys()
            tensors, fmt = full_state(objective.trained[slot], self.runtime, pipe.loaded[slot].claim)
            metadata = dict(self._source_metadata(pipe, slot))
            metadata["diffstudio.train"] = json.dumps({"component": slot, "format": fmt})
            return save_weights(path, tensors, metadata)
        tensors = {f"pipe.{slot}.{k}": v for slot, m in objective.trained.items() for k, v in m.state_dict().items()}
        return save_weights(path, strip_prefix(tensors, cfg.remove_prefix_in_ckpt))

    @staticmethod
    def _source_metadata(pipe: BasePipeline, slot: str) -> dict[str, str]:
        """Metadata of the component's original file that must survive a fine-tune (e.g. ``norm_groups``)."""
        from diffstudio.loading import Checkpoint

        files = pipe.loaded[slot].files
        if not files:
            return {}
        try:
            return {k: v for k, v in Checkpoint.open(files[0]).metadata.items() if not k.startswith("diffstudio.")}
        except Exception:  # noqa: BLE001 - metadata is a courtesy; the weights are what matter
            return {}

    # -- split training, stage 1 ------------------------------------------------------------------------------

    def _data_process(self, accelerator: Any, pipe: BasePipeline, dataset: TrainingDataset, output: Path,
                      started: float) -> TrainResult:  # fmt: skip
        """Run every unit that touches no trainable model on every row once and store the outputs."""
        cfg = self.config
        trained = set(cfg.trainable_models) | ({cfg.lora_base_model} if cfg.lora_base_model else set())
        units = prepared_units(pipe, trained)
        if self.templates is not None:  # templates: units reading the template cache run in stage 2
            units = self.templates.cacheable_units(pipe, units, dataset.load(0))
        cache = SampleCache(output / "cache")
        cache.start(units)
        result = TrainResult()
        rows = dataset.rows[accelerator.process_index :: accelerator.num_processes]
        with torch.no_grad():
            for sample in rows:
                if cache.has(sample.index):
                    continue
                position = dataset.rows.index(sample)
                loaded = dataset.load(position)
                if self.templates is not None:  # templates: store process_inputs' output of the row
                    self.templates.store(pipe, loaded, sample.index)
                inputs = training_inputs(pipe, loaded, cfg.pipeline_args)
                state = PipelineState(shared=dict(inputs))
                for unit in pipe.units:
                    if unit.name in units:
                        pipe.run_unit(unit, state, self.unconditioned)
                cache.store(sample.index, state, inputs)
                result.steps += 1
        accelerator.wait_for_everyone()
        result.seconds = time.monotonic() - started
        return result


def check_checkpoint_support(accelerator: Any) -> None:
    """Refuse checkpoints under FSDP / DeepSpeed / Megatron: their sharded states are pickles diffstudio won't load."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TrainConfigError(
            f"--checkpoint_steps / --resume are not supported under {kind}: its sharded states are pickle files, "
            "which diffstudio does not load. Train with DDP (the default), or without resumable checkpoints"
        )


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of ``--learning_rate`` for optimizer step ``step`` (0-based; a pure function of the step).

    Linear warm-up over ``--lr_warmup_steps``, then constant or a cosine / linear decay reaching 0 at
    ``--max_steps``. Being a function of the step alone, it needs no state of its own in checkpoints, and a
    resumed run may change the schedule (the optimizer's stored rate is overwritten every step).
    """
    warmup = cfg.lr_warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.lr_scheduler == "constant" or cfg.max_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    if cfg.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: Any, rate: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = rate


def train(config: TrainConfig | None = None, *, runtime: Runtime | None = None, **options: Any) -> TrainResult:
    """Train from a :class:`TrainConfig` or keyword options with the same names (the Python API)."""
    if config is None:
        config = TrainConfig(**options)
    return Trainer(config, runtime).run()
