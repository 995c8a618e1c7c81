"""One training loop for the three stages: packed rows, gradient accumulation normalised over the supervised
tokens of the whole window (equal to one bigger batch), AdamW with warmup then cosine, clipping, bf16 autocast,
activation checkpointing, atomic checkpoints with exact resume, metrics.jsonl, DDP or FSDP2 from outside.

Data order is a pure function of (seed, epoch), so the data position is just (epoch, row): a resumed run, or a
run on N processes, sees the same global batches as an uninterrupted single-process run."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..pretrained import Qwen2VL
from ..processing.processor import Processor
from ..processing.video_cache import parse_size
from ..progress import end as end_progress
from ..progress import show
from ..records import DataError, read_jsonl
from . import distributed as dist_utils
from .checkpoint import latest_checkpoint, load_state
from .data import IGNORE, Sample, encode, to_messages
from .loader import MemorySamples, Prefetcher, Skipped, StoreSamples, media_access
from .packing import PackedRow, loss_sum, pack, plan_rows
from .stages import param_groups, stage
from .store import Store, is_store, media_identity, tokenizer_hash


@dataclass
class TrainConfig:
    stage: int
    model: str  # checkpoint directory to start from (hub layout, with tokenizer and preprocessor files)
    data: str  # JSONL, or a prepared store (a directory or an object-store URI: ``qwen2vl data prepare``)
    out: str
    max_steps: int = 100
    batch_tokens: int = 2048  # tokens per packed row
    rows_per_step: int = 1  # rows per optimizer step on each process (gradient accumulation)
    lr: float | None = None  # None: the stage's
    vision_lr_scale: float | None = None  # the ViT's lr relative to lr; None: the stage's (0.1 in stage 2)
    warmup_steps: int | None = None  # None: a tenth of max_steps, at most 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "float32"  # "bfloat16": autocast (weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    seed: int = 0
    save_every: int = 50
    max_overlong: float = 0.01  # fraction of samples over batch_tokens that fails the run
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    # "token": every supervised token weighs the same (the usual mean); "turn": every reply weighs the same (its
    # tokens' mean), so one-word answers are not drowned by long ones (a 20-token box, a caption)
    loss_weighting: str = "token"
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: this process's GPU if torch sees one, else the CPU
    media: dict = field(default_factory=dict)  # preprocessing options (min_pixels, max_pixels, fps, ...)
    video_cache: str | None = None  # a directory of decoded clips, shared by runs on the same videos
    video_cache_size: int | str | None = None  # its bound in bytes ("20G"); None: unbounded
    # media fetching (http(s) and object stores): threads loading the next steps' samples (0: in the loop), the
    # requests in flight and per second across them, retries of transient faults, each request's timeout
    fetch_workers: int = 8
    fetch_qps: float | None = None
    fetch_retries: int = 5
    fetch_timeout: float = 30.0
    fetch_allow_private: bool = False  # media URLs may point at private addresses (an in-house media server)
    storage_options: dict = field(default_factory=dict)  # fsspec options per protocol: {"s3": {"endpoint_url": ..}}
    max_skipped: float = 0.01  # fraction of samples whose media could not be had that fails the run
    max_media_bytes: int = 2**31  # an image or video larger than this is refused (skipped), local or fetched
    prefetch_steps: int = 2
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the tensorboard package)

    @classmethod
    def from_recipe(cls, path: str | None, **overrides) -> TrainConfig:
        """A YAML recipe, then command-line overrides (None means "not given")."""
        values = {}
        if path:
            try:
                import yaml
            except ImportError:
                raise ValueError("a YAML recipe needs PyYAML: pip install 'qwen2vl[train]'") from None

            values = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: a recipe is a mapping of settings")
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        if missing := [k for k in ("stage", "model", "data", "out") if values.get(k) is None]:
            raise ValueError(f"missing training settings: {', '.join(missing)}")
        return cls(**values)


def warmup_steps(cfg: TrainConfig) -> int:
    """The warmup: as set (it must end before the run does), else a tenth of the run, at most 10 steps."""
    if cfg.warmup_steps is None:
        return min(10, cfg.max_steps // 10)
    if cfg.warmup_steps >= cfg.max_steps:
        raise ValueError(f"warmup_steps ({cfg.warmup_steps}) must be below max_steps ({cfg.max_steps}): "
                         "the run would never leave its warmup")  # fmt: skip
    return cfg.warmup_steps


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps (step counts from 0)."""
    warmup = warmup_steps(cfg)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Objective(nn.Module):
    """The thing DDP/FSDP wrap: one packed row -> its summed loss. When the row has no media but the vision tower
    trains, a zero-weighted pass over a dummy image keeps every process's graph the same, so a step where one rank
    has no image does not hang the others."""

    def __init__(self, model: Qwen2VL):
        super().__init__()
        self.model = model

    def forward(self, row: PackedRow) -> torch.Tensor:
        vision, unused = self.model.visual, None
        if row.pixel_values is None and row.pixel_values_videos is None and any(
            p.requires_grad for p in vision.parameters()
        ):  # first, as a row with media runs the ViT first: the same order of collectives on every rank
            dummy = torch.zeros(4, self.model.config.vision.patch_dim, device=row.input_ids.device)
            unused = vision(dummy, torch.tensor([[1, 2, 2]])).sum()
        loss, _ = loss_sum(self.model, row)
        return loss if unused is None else loss + 0.0 * unused


def use_activation_checkpointing(model: Qwen2VL) -> None:
    """Recompute each decoder layer and ViT block in the backward pass (set on the instances: names do not change)."""
    for block in [*model.model.layers, *model.visual.blocks]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def prepare_samples(cfg: TrainConfig, processor: Processor, log) -> list[Sample]:
    """Every record encoded; samples longer than a row are counted and reported, and fail the run past
    ``max_overlong``; a bad record fails it at once, naming its line."""
    root = Path(cfg.data).resolve().parent
    samples, overlong = [], []
    for line, record in read_jsonl(cfg.data):
        where = f"{cfg.data}:{line}"
        sample = encode(*to_messages(record, where, root), processor, where, levels=True,
                        turn_weights=cfg.loss_weighting == "turn", **cfg.media)  # fmt: skip
        if len(sample) > cfg.batch_tokens:
            overlong.append((line, len(sample)))
            continue
        if sample.supervised == 0:
            raise DataError(f"{where}: nothing to learn from (no supervised token)")
        samples.append(sample)
    total = len(samples) + len(overlong)
    if not total:
        raise DataError(f"{cfg.data}: no records")
    if overlong:
        lines = ", ".join(f"line {n} ({k} tokens)" for n, k in overlong[:5])
        log(f"{len(overlong)} of {total} samples are longer than batch_tokens={cfg.batch_tokens} and are left out: "
            f"{lines}{' ...' if len(overlong) > 5 else ''}")  # fmt: skip
        if len(overlong) / total > cfg.max_overlong:
            raise DataError(f"{len(overlong)} of {total} samples exceed batch_tokens={cfg.batch_tokens} "
                            f"(more than max_overlong={cfg.max_overlong:.0%}); raise batch_tokens")  # fmt: skip
    return samples


def epoch_rows(lengths: list[int], epoch: int, cfg: TrainConfig) -> list[list[int]]:
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
    rows = plan_rows([lengths[i] for i in order], cfg.batch_tokens)
    return [[order[i] for i in row] for row in rows]


def windows(lengths: list[int], cfg: TrainConfig, epoch: int, row: int, per_step: int) -> Iterator[tuple]:
    """(the rows of each step's window, the data position after it), from the position (epoch, row)."""
    rows = epoch_rows(lengths, epoch, cfg)
    while True:
        window = []
        while len(window) < per_step:
            if row >= len(rows):
                epoch, row = epoch + 1, 0
                rows = epoch_rows(lengths, epoch, cfg)
            window.append(rows[row])
            row += 1
        yield window, (epoch, row)


def open_samples(cfg: TrainConfig, processor: Processor, log):
    """The run's samples: a JSONL file encoded now, or a prepared store read as training goes."""
    if not is_store(cfg.data):
        return MemorySamples(prepare_samples(cfg, processor, log))
    remote = processor.media.access.remote
    store = Store.open(cfg.data, read=lambda uri: remote.read(uri, "store file", max_bytes=None),
                       cache=Path(cfg.out) / "store-cache")  # fmt: skip
    if store.index["tokenizer"] != tokenizer_hash(cfg.model):
        raise DataError(f"{cfg.data}: prepared with another tokenizer than {cfg.model}'s; prepare it again")
    stored = store.index["media_settings"]
    media = cfg.media or stored["options"]  # unset in the run: the options the store was prepared with
    settings = media_identity(processor, media)
    if stored != settings:
        differ = sorted(f"{g}.{k}" for g in settings for k in {*settings[g], *stored.get(g, {})}
                        if settings[g].get(k) != stored.get(g, {}).get(k))  # fmt: skip
        raise DataError(f"{cfg.data}: prepared with other media settings ({', '.join(differ)}); token counts would "
                        "differ: prepare it again with this run's settings")  # fmt: skip
    return StoreSamples(store, processor, media, turn_weights=cfg.loss_weighting == "turn",
                        batch_tokens=cfg.batch_tokens, max_overlong=cfg.max_overlong, log=log)  # fmt: skip


def _empty_row() -> PackedRow:
    """A row with nothing supervised, for a process whose samples were all skipped: it still runs forward and
    backward, so that its collectives match the other processes'."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    return PackedRow(ids, torch.full_like(ids, IGNORE), torch.zeros(3, 1, 2, dtype=torch.long), [2])


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) a training run; the metrics of the steps run by this call."""
    if cfg.loss_weighting not in ("token", "turn"):
        raise ValueError(f"loss_weighting must be 'token' or 'turn', got {cfg.loss_weighting!r}")
    warmup_steps(cfg)  # a warmup that outlasts the run fails here, before anything loads
    device = dist_utils.pick_device(cfg.device)
    rank, world = dist_utils.init(device)
    out = Path(cfg.out)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    torch.manual_seed(cfg.seed)
    st = stage(cfg.stage)
    if cfg.vision_lr_scale is not None:  # e.g. 1.0 from scratch, where stage 1 left the ViT far from trained
        st = dataclasses.replace(st, vision_lr_scale=cfg.vision_lr_scale)

    start_from = latest_checkpoint(out) if cfg.resume else None
    state = load_state(start_from) if start_from else {"step": 0, "epoch": 0, "row": 0}
    model = Qwen2VL.from_pretrained(start_from or cfg.model, dtype=torch.float32, device=device)
    processor = Processor.from_pretrained(cfg.model)
    processor.media.video_cache = cfg.video_cache
    processor.media.video_cache_size = parse_size(cfg.video_cache_size) if cfg.video_cache_size else None
    processor.media.access = media_access(workers=cfg.fetch_workers, qps=cfg.fetch_qps, retries=cfg.fetch_retries,
                                          timeout=cfg.fetch_timeout, allow_private=cfg.fetch_allow_private,
                                          storage_options=cfg.storage_options,
                                          max_bytes=cfg.max_media_bytes)  # fmt: skip
    if start_from:
        log(f"resuming from {start_from} (step {state['step']})")
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    if cfg.activation_checkpointing:
        use_activation_checkpointing(model)
    param_groups(model, st, cfg.lr, cfg.weight_decay)  # freeze before wrapping: FSDP shards what trains
    objective = dist_utils.wrap(Objective(model), cfg.parallel, world)
    model = dist_utils.inner(objective)
    groups = param_groups(model, st, cfg.lr, cfg.weight_decay)  # FSDP2 replaced the parameters: take the new ones
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    if start_from:
        saved = torch.load(start_from / "optimizer.pt", weights_only=True, map_location=device)
        dist_utils.load_optimizer(objective, optimizer, saved)

    samples = open_samples(cfg, processor, log)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    log(f"stage {cfg.stage} ({st.name}): {trainable:,} trainable parameters; {len(samples.lengths)} samples; "
        f"{world} process(es) x {cfg.rows_per_step} row(s) of <= {cfg.batch_tokens} tokens per step")  # fmt: skip

    metrics_path = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # drop what a killed run logged after its last checkpoint
        kept = [l for l in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if json.loads(l)["step"] <= state["step"]] if start_from else []  # fmt: skip
        metrics_path.write_text("".join(l + "\n" for l in kept))
    writer = None
    if cfg.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(str(out / "tensorboard"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    per_step = cfg.rows_per_step * world
    steps = itertools.islice(windows(samples.lengths, cfg, state["epoch"], state["row"], per_step),
                             cfg.max_steps - state["step"])  # fmt: skip
    workers = cfg.fetch_workers if isinstance(samples, StoreSamples) else 0  # encoded already: nothing to fetch
    loaded = Prefetcher(samples, workers, cfg.prefetch_steps).steps(steps, lambda s: [i for r in s[0][rank::world]
                                                                                      for i in r])  # fmt: skip
    history, t_start, attempted, skipped_total = [], time.perf_counter(), 0, 0
    for step, ((window, (epoch, row_index)), got) in enumerate(loaded, state["step"]):
        t0 = time.perf_counter()
        skipped = [s for s in got.values() if isinstance(s, Skipped)]
        for s in skipped:
            reason = s.reason if s.reason.startswith(s.where) else f"{s.where}: {s.reason}"
            print(f"rank {rank}: skipped {reason}", file=sys.stderr, flush=True)
        # what the skipped samples would have added to the window, summed over the processes
        lost = dist_utils.all_reduce_sum(torch.tensor([sum(samples.weight(s.index) for s in skipped),
                                                       sum(samples.lengths[s.index] for s in skipped),
                                                       len(skipped)], dtype=torch.float64, device=device)).tolist()
        attempted += sum(len(r) for r in window)
        skipped_total += int(lost[2])
        if skipped_total > cfg.max_skipped * max(attempted, 100):
            raise DataError(f"{skipped_total} of {attempted} samples skipped, more than max_skipped="
                            f"{cfg.max_skipped:.0%} (their reasons are above)")  # fmt: skip
        # the whole window's supervised tokens, or their weight (all ranks); a sample's first token is never
        # supervised, so a row's count is the sum of its samples'
        count = sum(samples.weight(i) for r in window for i in r) - lost[0]
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        local_sum = torch.zeros((), device=device)
        mine = []
        for r in window[rank::world]:  # this rank's rows, with what was delivered of them
            kept = [got[i] for i in r if not isinstance(got[i], Skipped)]
            mine.append((pack(kept, model.config) if kept else _empty_row()).to(device))
        for i, row in enumerate(mine):
            with dist_utils.no_sync(objective, last=i == len(mine) - 1), autocast:
                loss = objective(row)
            (loss * world / max(count, 1e-9)).backward()  # DDP/FSDP average over ranks: * world: the window's mean
            local_sum += loss.detach().float()
        grad_norm = dist_utils.clip_grad_norm(objective, cfg.grad_clip)
        optimizer.step()
        total = dist_utils.all_reduce_sum(local_sum)
        seconds = time.perf_counter() - t0
        entry = {"step": step + 1, "loss": float(total) / max(count, 1e-9),
                 "lr": max(g["lr"] for g in optimizer.param_groups), "grad_norm": float(grad_norm),
                 "tokens": sum(samples.lengths[i] for r in window for i in r) - int(lost[1]),
                 "seconds": round(seconds, 4)}  # fmt: skip
        if skipped_total:
            entry["skipped"] = int(lost[2])
        history.append(entry)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if cfg.progress:
                _progress(entry, cfg.max_steps, time.perf_counter() - t_start, step + 1 - state["step"])
            if writer is not None:
                for key in ("loss", "lr", "grad_norm"):
                    writer.add_scalar(f"train/{key}", entry[key], entry["step"])
                writer.add_scalar("train/tokens_per_second", entry["tokens"] / max(seconds, 1e-9), entry["step"])
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            new_state = {"step": step + 1, "epoch": epoch, "row": row_index, "rng": torch.get_rng_state().tolist(),
                         "config": asdict(cfg)}  # fmt: skip
            dist_utils.save(objective, optimizer, out, step + 1, new_state, rank)
    if rank == 0 and cfg.progress:
        end_progress()
    if writer is not None:
        writer.close()
    dist_utils.barrier()
    return history


def _progress(entry: dict, max_steps: int, elapsed: float, steps_here: int) -> None:
    rate = entry["tokens"] / max(entry["seconds"], 1e-9)
    eta = elapsed / steps_here * (max_steps - entry["step"])
    bar = ("#" * int(24 * entry["step"] / max_steps)).ljust(24, "-")
    show(f"[{bar}] step {entry['step']}/{max_steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
         f"{rate:,.0f} tok/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", entry["step"], max_steps)
