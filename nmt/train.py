"""train.py — the one training loop (`Trainer`) and `nmt train`.

Adam, label-smoothed cross-entropy over real target tokens (fused with the output layer, nmt.loss), gradient-norm clipping, LR warmup then decay when
validation BLEU stalls, validation (loss + greedy BLEU) every `valid_every` steps, early stopping, atomic
`best.pt` / `last.pt`, exact `--resume`, AMP and CUDA, DDP under torchrun (one process per device, batches
sharded by rank). Dropout is seeded from (seed, step, rank), so a resumed run draws the same masks; the
data position (epoch, batch) and the optimizer/scheduler states come from `last.pt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from tqdm import tqdm

from nmt import parallel, runlock
from nmt.average import ExponentialAverage
from nmt.checkpoint import load_checkpoint, model_from_payload, resolve_checkpoint, save_checkpoint
from nmt.config import Config, config_from_checkpoint, load_config
from nmt.data import Batch, TrainingData, filter_for_training, load_parallel, load_training, source_tags, tokenize
from nmt.errors import NMTError
from nmt.evaluate import bleu
from nmt.model import Seq2Seq
from nmt.translate import Translator
from nmt.vocab import Vocab, train_vocab

log = logging.getLogger("nmt.train")


class LRSchedule:
    """Linear warmup over `warmup_steps`; then either the LR is multiplied by `decay` after `patience`
    validations without a better BLEU (plateau), or it falls as sqrt(warmup_steps / step) (inverse_sqrt), or along
    a half cosine to `final_lr` at `total_steps` (cosine). Plain-number state, so it fits in a weights-only
    checkpoint."""

    def __init__(self, base_lr: float, warmup_steps: int, decay: float, patience: int,
                 kind: str = "plateau", total_steps: int = 0, final_lr: float = 0.0) -> None:
        self.base_lr, self.warmup_steps, self.decay, self.patience = base_lr, warmup_steps, decay, patience
        self.kind, self.total_steps, self.final_lr = kind, total_steps, final_lr
        self.scale, self.best, self.bad = 1.0, -math.inf, 0

    def lr(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "inverse_sqrt":
            warmup = min(warmup, math.sqrt(self.warmup_steps / (step + 1)))
        if self.kind == "cosine" and warmup == 1.0:
            done = min(1.0, (step + 1 - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return self.final_lr + (self.base_lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * done))
        return self.base_lr * self.scale * warmup

    def observe(self, metric: float) -> None:
        if metric > self.best:
            self.best, self.bad = metric, 0
            return
        self.bad += 1
        if self.bad >= self.patience and self.kind == "plateau":
            self.scale, self.bad = self.scale * self.decay, 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.best, self.bad = float(state["scale"]), float(state["best"]), int(state["bad"])


@dataclass
class Progress:
    """Where training stands; saved in `last.pt`."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0
    target_tokens: int = 0  # real target tokens (and eos) trained on so far, this rank


class Trainer:
    # Word-level distillation's hook: a sparse soft target per target position, (ids, probabilities) [B, T, k]
    # for a batch, mixed into the loss's target distribution with this weight.
    soft_targets: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]] | None = None
    soft_target_weight: float = 0.0

    def __init__(self, config: Config, resume: bool = False, quiet: bool = False, vocab: Vocab | None = None) -> None:
        self.config, self.cfg = config, config.train
        if config.data.train is None or config.data.dev is None:
            raise NMTError("data.train and data.dev are needed for training")
        self.ranks = parallel.ranks()
        self.rank, self.world = self.ranks.rank, self.ranks.world
        self.device = parallel.device_for(self.cfg.device, self.ranks.local_rank, "train.device",
                                          "use --set train.device=cpu")
        self.run_dir = Path(self.cfg.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.quiet = quiet or self.rank != 0
        last = self.ckpt_dir / "last.pt"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = runlock.acquire(self.run_dir) if self.rank == 0 else None  # before looking at its checkpoints
        if not resume and last.exists():
            raise NMTError(f"{self.run_dir} already holds a training run: use --resume, or another train.out_dir")
        if resume and not last.exists():
            raise NMTError(f"nothing to resume: {last} does not exist")
        self._setup_logging()
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

        torch.manual_seed(self.cfg.seed)
        self.vocab = self._vocabulary(vocab, resume)
        self.train_data, self.dev_table = self._datasets()
        if config.model.share_embeddings and not self.vocab.joint:
            raise NMTError("model.share_embeddings needs a joint vocabulary (vocab.joint: true)")
        self.model = Seq2Seq(config.model, self.vocab.src_size, self.vocab.tgt_size,
                             self.vocab.output_ids).to(self.device)
        if self.cfg.init_from and not resume:
            source = resolve_checkpoint(self.cfg.init_from)
            try:
                self.model.load_state_dict(model_from_payload(load_checkpoint(source), str(source))[0].state_dict())
            except RuntimeError:
                raise NMTError(f"train.init_from: {source} is a model of another shape or vocabulary than this "
                               f"config's") from None
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # fused: one kernel for all parameters (CPU and CUDA), 5x faster than the per-tensor loop on one CPU thread
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                          fused=True)
        self.schedule = LRSchedule(self.cfg.lr, self.cfg.warmup_steps, self.cfg.lr_decay, self.cfg.lr_patience,
                                   self.cfg.lr_schedule, self.cfg.max_steps, self.cfg.min_lr)
        self.ema = ExponentialAverage(self.model, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp or "")
        fp16_on_cuda = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16_on_cuda)  # bf16 needs no loss scaling
        self.progress = Progress()
        if resume:
            self._resume(last)
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._stop_signal: int | None = None
        self.log(f"model: {self.model.parameter_count():,} parameters; "
                 f"vocab {self.vocab.src_size}/{self.vocab.tgt_size}; "
                 f"{len(self.train_data):,} training pairs; device {self.device}; world size {self.world}")

    # --- setup ----------------------------------------------------------------------------------------------

    def _setup_logging(self) -> None:
        self.logger = logging.getLogger(f"nmt.train.{self.run_dir}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        for handler in list(self.logger.handlers):  # a second Trainer on the same folder reopens the file
            self.logger.removeHandler(handler)
            handler.close()
        if self.rank == 0:
            handler = logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.logger.addHandler(handler)

    def log(self, message: str) -> None:
        if self.rank != 0:
            return
        self.logger.info(message)
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def _vocabulary(self, given: Vocab | None, resume: bool) -> Vocab:
        """Save the given vocabulary (a student shares its teacher's) or train one, once, on rank 0, in the run
        folder, restricting the output to the training targets' pieces (vocab.output: target) unless it has an
        output map already; other ranks and resumed runs load it from there."""
        vocab_dir = self.run_dir / "vocab"
        if self.rank == 0 and not resume:
            # a model already in the folder was placed there for this run (e.g. one shared with a peer toolkit)
            vocab = Vocab.load(vocab_dir) if any(vocab_dir.glob("spm*.model")) else given
            table = None
            if vocab is None:
                table = load_training(self.config.data)
                vocab = train_vocab(self.config.vocab, table["src"], table["tgt"], source_tags(self.config.data))
            if self.config.vocab.output == "target" and vocab.output_ids is None:
                table = table if table is not None else load_training(self.config.data)
                vocab = vocab.restricted_to(vocab.encode_tgt([line.strip() for line in table["tgt"]]))
            vocab.save(vocab_dir)
        self.ranks.barrier()
        return Vocab.load(vocab_dir)

    def _datasets(self):
        data = self.config.data
        train = filter_for_training(tokenize(load_training(data), self.vocab), data)
        dev = load_parallel(data.dev)
        if len(dev) == 0:
            raise NMTError(f"data.dev: {data.dev.describe()} has no sentences (validation needs some)")
        if data.valid_max_sentences:
            dev = dev.select(range(min(len(dev), data.valid_max_sentences)))
        return TrainingData(train, self.cfg.batch_tokens, self.cfg.seed, self.rank, self.world), dev

    # --- checkpoints ----------------------------------------------------------------------------------------

    def _payload(self, full: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "config": self.config.to_dict(), "vocab": self.vocab.to_state(), "model": self.model.state_dict(),
            "step": self.progress.step, "best_bleu": self.progress.best_bleu,
        }
        if full:
            payload.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                           scaler=self.scaler.state_dict(), progress=vars(self.progress).copy())
            if self.ema is not None:
                payload["ema"] = self.ema.state_dict()
        return payload

    def save(self, name: str) -> None:
        if self.rank == 0:
            save_checkpoint(self.ckpt_dir / name, self._payload(full=name == "last.pt"))

    def _resume(self, path: Path) -> None:
        payload = load_checkpoint(path, map_location=self.device)
        saved = config_from_checkpoint(payload["config"]).model
        if saved != self.config.model:
            differ = [f"{f.name}: {getattr(saved, f.name)!r} there, {getattr(self.config.model, f.name)!r} here"
                      for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(self.config.model, f.name)]
            raise NMTError(f"{path}: trained with another model section ({'; '.join(differ)}): resume with the "
                           f"model it was trained with (set those keys), or train a new run")
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["schedule"])
            if payload.get("scaler"):
                self.scaler.load_state_dict(payload["scaler"])
            if self.ema is not None:  # an average saved with the run, else one that starts from its weights
                self.ema = ExponentialAverage(self.model, self.cfg.ema_decay)
                if "ema" in payload:
                    self.ema.load_state_dict(payload["ema"])
            self.progress = Progress(**payload["progress"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise NMTError(f"{path}: cannot resume from it ({str(err).splitlines()[0][:160]})") from None

    # --- training -------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, batch: Batch) -> tuple[float, int]:
        """One optimizer step on a batch; returns (mean NLL per target token, target tokens)."""
        self.ddp_model.train()
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.progress.step * 101 + self.rank)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr(self.progress.step)
        batch = batch.to(self.device)
        tokens = batch.n_tgt_tokens
        soft = self.soft_targets(batch) if self.soft_targets is not None else (None, None)
        with self._autocast():
            loss, nll = self.ddp_model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out,
                                       self.cfg.label_smoothing, *soft, self.soft_target_weight)
        loss = loss / tokens
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.progress.step += 1
        return float(nll) / tokens, tokens

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Dev loss (NLL per token, teacher forcing) and greedy-decoding BLEU on detokenized text."""
        self.model.eval()
        src, refs = list(self.dev_table["src"]), list(self.dev_table["tgt"])
        translator = Translator(self.model, self.vocab, self.config.decode, self.device)
        hyps = [n[0].text for n in translator.translate(src, beam_size=1, nbest=1)]
        pairs = [(s, r) for s, r in zip(self.vocab.encode_src(src), self.vocab.encode_tgt(refs)) if s and r]
        total, count = 0.0, 0
        for start in range(0, len(pairs), 64):
            chunk = pairs[start: start + 64]
            batch = Batch.from_ids([s[: self.config.decode.max_input_len - 1] for s, _ in chunk],
                                   [r for _, r in chunk]).to(self.device)
            with self._autocast():
                total += float(self.model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out)[1])
            count += batch.n_tgt_tokens
        return total / max(count, 1), bleu(hyps, refs)

    def _after_validation(self, valid_loss: float, valid_bleu: float) -> bool:
        """Book-keeping after a validation; returns True when training should stop early."""
        p = self.progress
        improved = valid_bleu > p.best_bleu
        if improved:
            p.best_bleu, p.best_step, p.bad_validations = valid_bleu, p.step, 0
            self.save("best.pt")
        else:
            p.bad_validations += 1
        self.schedule.observe(valid_bleu)
        lr = self.schedule.lr(p.step)
        self.log(f"validation at step {p.step}: loss {valid_loss:.4f}, ppl {math.exp(min(valid_loss, 50)):.2f}, "
                 f"BLEU {valid_bleu:.2f}{' (best)' if improved else ''}, lr {lr:.2e}")
        self._record({"step": p.step, "valid_loss": valid_loss, "valid_bleu": valid_bleu, "lr": lr})
        stop = p.bad_validations >= self.cfg.patience or lr < self.cfg.min_lr
        if stop:
            self.log(f"early stopping: no better BLEU for {p.bad_validations} validations (best {p.best_bleu:.2f} "
                     f"at step {p.best_step})" if p.bad_validations >= self.cfg.patience else
                     f"stopping: learning rate {lr:.2e} fell below train.min_lr")
        return stop

    def _record(self, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(values) + "\n")
        for key, value in values.items():
            if key != "step":
                self.writer.add_scalar(key, value, values["step"])
        self.writer.flush()

    def _validate_everywhere(self) -> bool:
        """Validate on rank 0 (with the averaged weights, which best.pt then keeps, when train.ema_decay > 0)
        and share the stop decision with every rank."""
        stop = False
        if self.rank == 0:
            with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
                stop = self._after_validation(*self.validate())
        self.save("last.pt")
        return self.ranks.broadcast_flag(stop, self.device)

    def _handle_signal(self, signum: int, _frame) -> None:
        self._stop_signal = signum

    def train(self) -> dict[str, Any]:
        """Train until max_steps / max_epochs / early stopping; returns a summary."""
        cfg, p = self.cfg, self.progress
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.time()
        stop = p.bad_validations >= cfg.patience or bool(cfg.max_steps and p.step >= cfg.max_steps)
        window_tokens, window_loss, window_start = 0, 0.0, time.time()
        bar = tqdm(total=cfg.max_steps or None, initial=p.step,
                   disable=self.quiet or not cfg.progress or not sys.stderr.isatty(),
                   desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        try:
            while not stop and p.epoch < cfg.max_epochs:
                batches = self.train_data.batcher.epoch(p.epoch)
                for indices in batches[p.batch_in_epoch:]:
                    loss, tokens = self.step(self.train_data.batch(indices))
                    p.batch_in_epoch += 1
                    p.target_tokens += tokens
                    window_tokens, window_loss = window_tokens + tokens, window_loss + loss * tokens
                    elapsed = max(time.time() - window_start, 1e-9)
                    lr = self.schedule.lr(p.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window_tokens / elapsed:.0f}", lr=f"{lr:.1e}")
                    if p.step % cfg.log_every == 0:
                        self.log(f"step {p.step} | epoch {p.epoch + 1} | loss {window_loss / window_tokens:.4f} | "
                                 f"lr {lr:.2e} | {window_tokens / elapsed:.0f} target tokens/s | "
                                 f"{p.target_tokens} target tokens")
                        self._record({"step": p.step, "train_loss": window_loss / window_tokens,
                                      "tokens_per_s": window_tokens / elapsed, "target_tokens": p.target_tokens})
                        window_tokens, window_loss, window_start = 0, 0.0, time.time()
                    reached_max = cfg.max_steps and p.step >= cfg.max_steps
                    if p.step % cfg.valid_every == 0 or reached_max:
                        stop = self._validate_everywhere() or bool(reached_max)
                    if self._stop_signal is not None:
                        self.save("last.pt")
                        self._record({"step": p.step, "target_tokens": p.target_tokens})
                        raise NMTError(f"interrupted at step {p.step}; checkpoint saved, continue with --resume")
                    if stop:
                        break
                else:
                    p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            if not stop and p.step % cfg.valid_every != 0:
                self._validate_everywhere()  # the last steps of the final epoch
        finally:
            bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.close()
            if self.lock is not None:
                runlock.release(self.lock)
        summary = {"steps": p.step, "epochs": p.epoch, "target_tokens": p.target_tokens, "best_bleu": p.best_bleu,
                   "best_step": p.best_step,
                   "parameters": self.model.parameter_count(), "wall_s": round(time.time() - started, 1),
                   "run_dir": str(self.run_dir)}
        self.log(f"done: {json.dumps(summary)}")
        return summary


def run_train(config_path: str, resume: bool = False, overrides: list[str] | tuple[str, ...] = (),
              config: Config | None = None) -> dict[str, Any]:
    """`nmt train`: train from a YAML config (or an already built Config); returns the summary."""
    config = config or load_config(config_path, overrides)
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.train()
    finally:
        parallel.finish()
