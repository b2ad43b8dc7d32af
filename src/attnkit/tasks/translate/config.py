"""``TrainConfig``: everything that defines a translation run, saved in every checkpoint and checked field by
field when it is built (from the command line or from a checkpoint someone may have edited)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from attnkit._checks import check_choice, check_float, check_int, check_probability

EMBEDDED = "embedded"
SCHEDULES = ("constant", "linear")
MODELS = ("bahdanau", "luong", "transformer")
SCORES = ("dot", "general")
LANGS = ("fr", "de")
VOCABS = ("word", "subword")


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint JSON)."""

    data: str = EMBEDDED  # "embedded" or a path to a source<TAB>target file
    lang: str = "fr"  # target language of the embedded task: fr | de
    max_pairs: int | None = None  # keep the first N pairs of a data file
    model: str = "bahdanau"  # bahdanau | luong | transformer
    score: str = "general"  # luong only: dot | general
    bidirectional: bool = False  # GRU models: read the source in both directions (Bahdanau et al.)
    embed_dim: int = 32
    hidden: int = 64
    num_layers: int = 1
    dropout: float = 0.1
    num_heads: int = 4
    ff_dim: int = 256
    epochs: int = 30
    batch_size: int = 32
    lr: float = 5e-3  # peak learning rate
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many optimizer steps
    schedule: str = "constant"  # after warm-up: "constant" or "linear" (decay to 0 at the end of the last epoch)
    clip: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    split_seed: int = 0
    valid_frac: float = 0.05
    test_frac: float = 0.1
    min_freq: int = 1  # word vocabulary: keep words seen this many times in the training split
    vocab: str = "word"  # "word" (one id per word, rare ones <unk>) or "subword" (byte-level BPE, no <unk>)
    vocab_size: int = 8000  # subword vocabulary: ids per side (256 bytes and 4 specials included)
    max_len: int = 40
    max_minutes: float | None = None  # stop (and save) after this much training time
    max_train_len: int | None = None  # skip training pairs with a side longer than this (None: sized for the data)
    max_tokens: int | None = None  # cut batches to at most this many padded tokens (None: batch_size x longest)
    average_last: int = 0  # evaluate and keep the mean of the weights at the ends of the last N epochs (0: off)

    def __post_init__(self):
        self.validate()

    def validate(self) -> TrainConfig:
        """Raise ValueError/TypeError naming the first field that is out of range; return ``self``."""
        if not isinstance(self.data, str) or not self.data:
            raise TypeError(f"data must be {EMBEDDED!r} or a file path; got {self.data!r}.")
        check_choice("lang", self.lang, LANGS)
        if self.max_pairs is not None:
            check_int("max_pairs", self.max_pairs, minimum=1)
        check_choice("model", self.model, MODELS)
        check_choice("score", self.score, SCORES)
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"bidirectional must be true or false; got {self.bidirectional!r}.")
        for name in ("embed_dim", "hidden", "num_layers", "num_heads", "ff_dim", "epochs", "batch_size",
                     "min_freq", "max_len"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "seed", "split_seed", "average_last"):
            check_int(name, getattr(self, name), minimum=0)
        check_probability("dropout", self.dropout)
        check_probability("label_smoothing", self.label_smoothing)
        check_float("lr", self.lr, minimum=0.0, min_open=True)
        check_float("clip", self.clip, minimum=0.0, min_open=True)
        valid_frac = check_float("valid_frac", self.valid_frac, minimum=0.0, maximum=1.0, max_open=True)
        check_float("test_frac", self.test_frac, minimum=0.0, maximum=1.0, min_open=True, max_open=True)
        if valid_frac + self.test_frac >= 1.0:
            raise ValueError(f"valid_frac + test_frac must be < 1 (something must be left to train on); got "
                             f"{self.valid_frac} + {self.test_frac}.")
        if self.max_minutes is not None:
            check_float("max_minutes", self.max_minutes, minimum=0.0, min_open=True)
        for name in ("max_train_len", "max_tokens"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.max_train_len is not None and self.max_tokens is not None \
                and self.max_tokens < 2 * self.max_train_len + 1:
            raise ValueError(f"max_tokens must hold one pair of max_train_len tokens per side (>= "
                             f"{2 * self.max_train_len + 1}); got {self.max_tokens}.")
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("vocab", self.vocab, VOCABS)
        check_int("vocab_size", self.vocab_size, minimum=260)
        if self.vocab_size > 1_000_000:
            raise ValueError(f"vocab_size must be <= 1000000; got {self.vocab_size}.")
        if self.model == "transformer" and self.hidden % self.num_heads:
            raise ValueError(f"hidden must be divisible by num_heads for the Transformer; got hidden "
                             f"{self.hidden}, num_heads {self.num_heads}.")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise TypeError(f"the training options must be a JSON object; got {type(d).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; expected some of {sorted(names)}")
        return cls(**d)
