"""Synthetic memory tasks shared by all architectures, so that they are compared on one footing.

Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): a sequence lists key-value pairs, then
asks for the values of some keys again. Token layout (vocabulary ``vocab_size``):

    0 pad | 1 bos | 2 eos | keys [3, 3 + n_keys) | values [3 + n_keys, vocab_size)

    bos k1 v1 k2 v2 ... kn vn  |  kq1 vq1 kq2 vq2 ...          (labels: the query values only)

A model without memory of the pairs is at chance (1 / n_values) on the query values.

Passkey retrieval (``PasskeySpec``): a passkey hidden in an earlier segment of filler, asked for at the end.

The yardstick of ``hf-memory bench`` (``BENCH_TASKS``) asks each question at a stated difficulty ("level"):
passkey retrieval with the passkey ``level`` tokens before the question, MQAR with ``level`` pairs, and copying
``level`` tokens (the source is ``level + 1`` tokens behind each copied token, so it spans segments). Levels
beyond those trained on make the sequences longer than any seen in training: length extrapolation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset

PAD, BOS, EOS = 0, 1, 2
FIRST_KEY = 3
IGNORE = -100


@dataclass(frozen=True)
class MQARSpec:
    vocab_size: int = 128
    num_pairs: int = 8
    num_queries: int = 8

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - FIRST_KEY) // 2

    @property
    def first_value(self) -> int:
        return FIRST_KEY + self.num_keys

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.first_value

    @property
    def length(self) -> int:
        return 1 + 2 * self.num_pairs + 2 * self.num_queries

    def describe(self, token: int) -> str:
        """``value 17``, ``key 5`` or ``pad`` / ``bos`` / ``eos``: what a token of this task is."""
        if token >= self.first_value:
            return f"value {token - self.first_value}"
        if token >= FIRST_KEY:
            return f"key {token - FIRST_KEY}"
        return ("pad", "bos", "eos")[token]

    def stage(self, num_pairs: int) -> "MQARSpec":
        """The easier task of a curriculum stage: ``num_pairs`` pairs, all queried."""
        return replace(self, num_pairs=num_pairs, num_queries=num_pairs)

    def training_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return mqar_batch(self, batch_size, generator)

    def check(self) -> None:
        if self.num_keys < self.num_pairs:
            raise ValueError(
                f"MQAR: vocab_size {self.vocab_size} leaves {self.num_keys} keys, fewer than num_pairs {self.num_pairs}"
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(f"MQAR: num_queries {self.num_queries} exceeds num_pairs {self.num_pairs}")


def mqar_batch(spec: MQARSpec, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (query values only, -100 elsewhere) and ``attention_mask``, each [B, L]."""
    spec.check()
    keys = torch.stack(
        [torch.randperm(spec.num_keys, generator=generator)[: spec.num_pairs] for _ in range(batch_size)]
    ) + FIRST_KEY
    values = torch.randint(spec.first_value, spec.vocab_size, (batch_size, spec.num_pairs), generator=generator)
    asked = torch.stack(
        [torch.randperm(spec.num_pairs, generator=generator)[: spec.num_queries] for _ in range(batch_size)]
    )
    query_keys, query_values = keys.gather(1, asked), values.gather(1, asked)

    context = torch.stack([keys, values], dim=-1).reshape(batch_size, -1)
    queries = torch.stack([query_keys, query_values], dim=-1).reshape(batch_size, -1)
    bos = torch.full((batch_size, 1), BOS)
    input_ids = torch.cat([bos, context, queries], dim=1)

    labels = torch.full_like(input_ids, IGNORE)
    value_positions = 1 + 2 * spec.num_pairs + 2 * torch.arange(spec.num_queries) + 1
    labels[:, value_positions] = input_ids[:, value_positions]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


class MQARDataset(Dataset):
    """A fixed set of MQAR examples (deterministic for a seed), for ``Trainer`` and loops alike."""

    def __init__(self, spec: MQARSpec, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.data = mqar_batch(spec, size, generator)

    def __len__(self) -> int:
        return self.data["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.data.items()}


# ``train_recall`` settings of ``hf-memory demo`` (700 steps x 64, lr 1e-2, preset gated-deltanet-1layer-tiny) and
# of the Gated DeltaNet recall ablation. Without the one-pair stage, escaping the unigram plateau (loss ~4.1) took
# 250 to 700+ steps and flipped between 92% and 3% recall under a 1e-6 relative perturbation of the initial
# weights. With it, the two-layer test size still stalled on 2 of 5 seeds at ~54% (loss ~1.3, just under ln 4: it
# copies one of the 4 values of the context, matching keys only partly) while one layer reached 92-99% on each
# of 8 seeds, with 1 or 2 threads, under that perturbation, and at lr 5e-3 or 2e-2.
DEMO_TRAINING = dict(warmup=50, decay="constant", curriculum=((1, 150),))


def train_recall(model, spec, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True,
                 parameters=None, warmup: int = 50, decay: str = "constant", betas=(0.9, 0.999),
                 weight_decay: float = 0.0, clip: float = 1.0, curriculum=(), description: str | None = None,
                 bar_position: int | None = None) -> list[float]:
    """AdamW on fresh batches of the task of ``spec`` (MQAR or passkey): linear warmup over ``warmup`` steps,
    then a ``"constant"`` or ``"cosine"`` (to 0 at the end) learning rate; returns the training losses.
    ``parameters`` may be optimizer parameter groups (default: all parameters).

    ``curriculum``: ``(level, steps)`` stages trained first, within the ``steps`` budget, each with a fresh
    optimizer and warmup, on ``spec.stage(level)``: MQAR with ``level`` pairs (with one pair the answer is the one
    value in the context, so the model learns to write values to its memory and read them back before it must
    also match keys), passkey with ``level`` segments (the needle nearer the question).

    ``spec`` is anything with ``training_batch(batch_size, generator)`` (and ``stage`` for a curriculum)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    stages = [(spec.stage(level), n) for level, n in scaled_curriculum(curriculum, steps)]
    stages.append((spec, steps - sum(n for _, n in stages)))
    bar = tqdm(total=steps, desc=description or f"training on {type(spec).__name__[:-4]}", unit="step",
               disable=not progress, position=bar_position)
    losses = []
    for stage_spec, stage_steps in stages:
        # A fresh AdamW per stage: the harder stage's first gradients are ~100x the last ones of the easier stage,
        # and the old second-moment estimates would turn them into steps of several times lr.
        optimizer = torch.optim.AdamW(model.parameters() if parameters is None else parameters, lr=lr,
                                      betas=betas, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, n=stage_steps: _lr_factor(s, n, warmup, decay))
        for _ in range(stage_steps):
            losses.append(_train_step(model, optimizer, stage_spec, batch_size, generator, clip))
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses


def scaled_curriculum(curriculum, steps: int) -> list[tuple[int, int]]:
    """The ``(level, steps)`` stages as run within a budget of ``steps``: shrunk in proportion when they would
    take more than half of it (a short run still ends on the full task)."""
    planned = sum(n for _, n in curriculum)
    scale = min(1.0, steps / 2 / planned) if planned else 1.0
    return [(pairs, int(n * scale)) for pairs, n in curriculum]


def _train_step(model, optimizer, spec, batch_size: int, generator: torch.Generator, clip: float) -> float:
    model.train()
    batch = {name: t.to(model.device) for name, t in spec.training_batch(batch_size, generator).items()}
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _lr_factor(step: int, steps: int, warmup: int, decay: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warmup, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    raise ValueError(f"train_recall: decay must be 'constant' or 'cosine', got {decay!r}")


@dataclass(frozen=True)
class PasskeySpec:
    """Passkey retrieval across segments: filler, ``KEY passkey`` somewhere in an earlier segment, then
    ``QUERY`` at the end; the model must answer the passkey. Token layout (vocabulary ``vocab_size``):
    0 pad | 1 bos | 2 eos | 3 KEY | 4 QUERY | filler [5, vocab/2) | passkeys [vocab/2, vocab)."""

    vocab_size: int = 128
    segment_size: int = 8
    num_segments: int = 4

    @property
    def length(self) -> int:
        return self.segment_size * self.num_segments + 2

    @property
    def first_passkey(self) -> int:
        return self.vocab_size // 2

    def stage(self, num_segments: int) -> "PasskeySpec":
        """The easier task of a curriculum stage: ``num_segments`` segments, so the needle is nearer the question."""
        return replace(self, num_segments=num_segments)

    def training_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = passkey_batch(self, batch_size, generator)
        del batch["needle_segment"]
        return batch


KEY, QUERY, FIRST_FILLER = 3, 4, 5


def passkey_batch(spec: PasskeySpec, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (the passkey after QUERY only), ``attention_mask`` and ``needle_segment``."""
    ids = torch.randint(FIRST_FILLER, spec.first_passkey, (batch_size, spec.length), generator=generator)
    ids[:, 0] = BOS
    passkeys = torch.randint(spec.first_passkey, spec.vocab_size, (batch_size,), generator=generator)
    needle_segment = torch.randint(0, spec.num_segments - 1, (batch_size,), generator=generator)
    position = needle_segment * spec.segment_size + torch.randint(1, spec.segment_size - 1, (batch_size,),
                                                                  generator=generator)
    rows = torch.arange(batch_size)
    ids[rows, position], ids[rows, position + 1] = KEY, passkeys
    ids[:, -2], ids[:, -1] = QUERY, passkeys
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = passkeys
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "needle_segment": needle_segment}


@torch.no_grad()
def recall_accuracy(model, batch: dict[str, torch.Tensor]) -> float:
    """Fraction of query values predicted exactly (argmax of the next-token logits at each query key)."""
    model.eval()
    batch = {name: t.to(model.device) for name, t in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    predictions = logits[:, :-1].argmax(-1)
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    return (predictions[scored] == targets[scored]).float().mean().item()


# ---------------------------------------------------------------------------------------------- the yardstick
@dataclass(frozen=True)
class BenchTask:
    """A task of ``hf-memory bench``: trained on levels drawn from ``train_levels``, evaluated per level."""

    name: str
    level_name: str  # what a level counts: the passkey's distance, pairs, tokens copied
    make: Callable[[int, int, int, torch.Generator], dict[str, torch.Tensor]]  # (level, batch, vocab, generator)
    train_levels: tuple[int, int]  # inclusive range; one level drawn per training batch
    vocab_size: int = 128

    def batch(self, level: int, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.make(level, batch_size, self.vocab_size, generator)

    def training_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        low, high = self.train_levels
        return self.batch(int(torch.randint(low, high + 1, (), generator=generator)), batch_size, generator)


PASSKEY_LENGTH = 32  # passkey sequences are at least this long: a nearer passkey leaves more filler before it


def passkey_at_distance(distance: int, batch_size: int, vocab_size: int, generator: torch.Generator) -> dict:
    """``bos filler.. KEY p filler.. QUERY p``: the passkey ``p`` is ``distance`` tokens before QUERY (1: right
    before it); the label is the last ``p`` only. Filler is drawn from ``[5, vocab/2)`` and passkeys from
    ``[vocab/2, vocab)``, so the one earlier passkey token is the only evidence of the answer."""
    if distance < 1:
        raise ValueError(f"passkey distance must be >= 1, got {distance}")
    length = max(PASSKEY_LENGTH, distance + 4)  # bos, KEY, QUERY, answer
    first_passkey = vocab_size // 2
    ids = torch.randint(FIRST_FILLER, first_passkey, (batch_size, length), generator=generator)
    passkeys = torch.randint(first_passkey, vocab_size, (batch_size,), generator=generator)
    query = length - 2
    ids[:, 0], ids[:, query - distance - 1], ids[:, query - distance] = BOS, KEY, passkeys
    ids[:, query], ids[:, -1] = QUERY, passkeys
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = passkeys
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def mqar_with_pairs(pairs: int, batch_size: int, vocab_size: int, generator: torch.Generator) -> dict:
    """MQAR (``mqar_batch``) with ``pairs`` key-value pairs, every key queried once, in random order."""
    return mqar_batch(MQARSpec(vocab_size, pairs, pairs), batch_size, generator)


COPY = KEY  # the separator between the tokens to copy and their copy


def copy_tokens(count: int, batch_size: int, vocab_size: int, generator: torch.Generator) -> dict:
    """``bos x1..xn COPY x1..xn``: ``count`` random tokens from ``[5, vocab)``, then their copy (the labels);
    each copied token's source is ``count + 1`` tokens before it."""
    if count < 1:
        raise ValueError(f"copy count must be >= 1, got {count}")
    source = torch.randint(FIRST_FILLER, vocab_size, (batch_size, count), generator=generator)
    bos, separator = torch.full((batch_size, 1), BOS), torch.full((batch_size, 1), COPY)
    ids = torch.cat([bos, source, separator, source], dim=1)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -count:] = source
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


BENCH_TASKS = {
    "passkey": BenchTask("passkey", "distance", passkey_at_distance, train_levels=(1, PASSKEY_LENGTH - 4)),
    "mqar": BenchTask("mqar", "pairs", mqar_with_pairs, train_levels=(1, 6)),
    "copy": BenchTask("copy", "tokens", copy_tokens, train_levels=(1, 8)),
}
