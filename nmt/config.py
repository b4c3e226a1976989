"""config.py — typed, frozen dataclasses for every YAML section, and `load_config`, the only way in.

Validation happens here and nowhere else: an unknown key, a wrong type, a bad value or a missing file is an
`NMTError` naming the key (and the valid keys). No other module reads config values by string key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nmt.errors import NMTError


@dataclass(frozen=True)
class CorpusSpec:
    """One split of a parallel corpus: a file pair, one TSV/JSONL file with columns, or a `datasets` name."""

    src: str | None = None  # plain text, one sentence per line
    tgt: str | None = None
    path: str | None = None  # a .tsv / .jsonl / .json / .csv / .parquet file with two columns
    src_column: str = "src"
    tgt_column: str = "tgt"
    hub: str | None = None  # a hub dataset name, or a local folder saved with `Dataset.save_to_disk`
    config: str | None = None
    split: str = "train"
    src_lang: str | None = None
    tgt_lang: str | None = None
    limit: int = 0  # keep only the first N pairs (0 = all)
    # A tag put before every source sentence, e.g. "<bt>" on back-translations (Caswell et al. 2019) or a second
    # reference's name: the model learns the corpus's style under the tag and keeps the untagged one for
    # translation. The vocabulary holds it as one piece.
    src_prefix: str = ""

    def validate(self, where: str, check_files: bool = True) -> None:
        kinds = [k for k, on in (("src/tgt", self.src or self.tgt), ("path", self.path), ("hub", self.hub)) if on]
        if len(kinds) != 1:
            raise NMTError(f"{where}: give exactly one of src+tgt, path or hub (got {', '.join(kinds) or 'none'})")
        if kinds[0] == "src/tgt" and not (self.src and self.tgt):
            raise NMTError(f"{where}: both src and tgt are needed")
        for key in ("src", "tgt", "path"):
            value = getattr(self, key)
            if check_files and value and not Path(value).is_file():
                raise NMTError(f"{where}.{key}: file not found: {value}")
        if self.hub and Path(self.hub).exists() is False and not (self.src_lang and self.tgt_lang):
            raise NMTError(f"{where}: a hub dataset needs src_lang and tgt_lang")
        if self.limit < 0:
            raise NMTError(f"{where}.limit: must be >= 0")
        if self.src_prefix and (len(self.src_prefix.split()) != 1 or self.src_prefix != self.src_prefix.strip()):
            raise NMTError(f"{where}.src_prefix: must be one token without spaces, got {self.src_prefix!r}")

    def describe(self) -> str:
        if self.hub:
            return f"{self.hub}:{self.config or ''}:{self.split}"
        return self.path or f"{self.src} + {self.tgt}"


@dataclass(frozen=True)
class DataConfig:
    train: CorpusSpec | None = None
    extra_train: tuple[CorpusSpec, ...] = ()  # more training pairs after `train` (e.g. a second reference, tagged)
    dev: CorpusSpec | None = None
    test: CorpusSpec | None = None
    max_len: int = 100  # pieces; longer training pairs are filtered out
    min_len: int = 1
    max_len_ratio: float = 3.0  # drop training pairs whose piece counts differ more than this factor
    valid_max_sentences: int = 0  # validate BLEU on the first N dev sentences (0 = all)


@dataclass(frozen=True)
class VocabConfig:
    size: int = 16000
    type: Literal["bpe", "unigram"] = "bpe"
    joint: bool = True
    character_coverage: float = 1.0
    max_sentences: int = 2_000_000  # sentences sampled to train SentencePiece
    # target: the decoder predicts only the pieces of the training targets (and the specials), as every peer
    # does; at 16k joint BPE on the Bible that halves the output layer. full: every piece of the model.
    output: Literal["target", "full"] = "target"


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 256
    encoder_hidden: int = 256  # per direction
    encoder_layers: int = 1
    decoder_hidden: int = 512
    decoder_layers: int = 1
    attention_dim: int = 256
    dropout: float = 0.2
    tie_embeddings: bool = False  # the decoder's input embeddings are its output layer's weights
    share_embeddings: bool = False  # the encoder's and the decoder's embeddings are one matrix (a joint vocabulary);
    #                                 with tie_embeddings, three-way tying
    rnn_type: Literal["gru", "lstm"] = "gru"
    layer_norm: bool = False  # layer-normalized cells (Nematus): trained by the same hand-written loops, exportable
    # Measured beside OpenNMT-py (bench/peer_side_by_side.py, README): a tanh on the attentional layer kept the
    # model on the unigram plateau (dev perplexity 515 after 100 updates; 311 without it, 283 with all four).
    rnn_init: Literal["xavier", "uniform"] = "uniform"  # recurrent weights and biases U(±1/√H), or per-gate Xavier
    bridge: Literal["tanh", "relu"] = "relu"  # activation from the encoder's final state to the decoder's first
    attentional_tanh: bool = False  # tanh on the attentional layer (Luong); False: linear, as OpenNMT-py's MLP
    feed_dropout: bool = True  # dropout on the attentional vector where it is fed back too (one mask for both)
    source_word_dropout: float = 0.0  # drop whole source positions' embeddings (Nematus' dropout_source)
    target_word_dropout: float = 0.0  # ... and the decoder's input tokens' (dropout_target)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/model"
    batch_tokens: int = 3000  # source + target pieces per batch, padding included
    lr: float = 0.001
    warmup_steps: int = 0
    # plateau: after the warmup, multiply the LR by lr_decay when validation BLEU stalls for lr_patience
    # validations; inverse_sqrt: after the warmup, lr × sqrt(warmup_steps / step) (fairseq, Vaswani et al.);
    # cosine: after the warmup, a half cosine from lr down to min_lr at max_steps (Loshchilov & Hutter, no restarts;
    # training on with a raised max_steps stretches the curve, so the LR rises again)
    lr_schedule: Literal["plateau", "inverse_sqrt", "cosine"] = "plateau"
    lr_decay: float = 0.5
    lr_patience: int = 3
    min_lr: float = 1e-5  # plateau: stop when the LR falls below it; cosine: where the LR ends
    weight_decay: float = 0.0
    max_epochs: int = 20
    max_steps: int = 0  # 0 = no step limit
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    valid_every: int = 500
    patience: int = 10  # validations without a better BLEU before stopping
    seed: int = 1
    device: str = "cpu"
    amp: Literal[False, "bf16", "fp16"] = False
    progress: bool = True
    log_every: int = 100
    init_from: str = ""  # start from the weights of this checkpoint
    ema_decay: float = 0.0  # > 0: validate, keep best.pt and translate with an exponential moving average of the
    #                          weights (Marian's exponential smoothing; e.g. 0.9999)


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = 5
    nbest: int = 1
    length_penalty: float = 1.0  # GNMT alpha; 0 ranks by total log-probability
    max_len_ratio: float = 2.0
    min_len: int = 0
    max_input_len: int = 250  # pieces; longer inputs are translated in parts (with a warning)
    batch_size: int = 64


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a teacher (Kim & Rush 2016)."""

    teacher: str = ""  # teacher run folder or checkpoint
    ensemble: tuple[str, ...] = ()  # more teachers: the distilled corpus is the ensemble's translations (nmt.ensemble)
    beam_size: int = 5  # the teacher's beam when translating the training source
    shard_size: int = 2000  # source lines per shard; a killed distillation redoes at most one shard
    keep_original: bool = False  # train the student on distilled + original pairs
    seq_inter: bool = False  # pick, of the teacher's n-best, the one closest to the reference (sentence BLEU)
    nbest: int = 5  # n-best size for seq_inter
    word_kd_weight: float = 0.0  # > 0: mix in cross-entropy to the teacher's distribution with this weight
    word_kd_topk: int = 8  # teacher probabilities kept per token for word-level KD


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def distilled_corpus(self) -> CorpusSpec:
        """Where distillation writes the student's corpus: distill/train.src|tgt in the run folder."""
        folder = Path(self.train.out_dir) / "distill"
        return CorpusSpec(src=str(folder / "train.src"), tgt=str(folder / "train.tgt"))


# What a checkpoint saved before a key existed was trained with: read for keys its config lacks.
CHECKPOINT_DEFAULTS = {"model": {"rnn_init": "xavier", "bridge": "tanh", "attentional_tanh": True,
                                 "feed_dropout": False}}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses; raise NMTError naming `where`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return value
        if value is True and False in typing.get_args(tp):  # `amp: true` means the usual choice
            return "bf16"
        raise NMTError(f"{where}: must be {_type_name(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except NMTError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:  # tuple[X, ...] from a YAML list
        if not isinstance(value, (list, tuple)):
            raise NMTError(f"{where}: must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise NMTError(f"{where}: must be a mapping of keys, got {value!r}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise NMTError(f"{where}: must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise NMTError(f"{where}.{key}: unknown key (valid: {', '.join(names)})".lstrip("."))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}".lstrip("."))
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise NMTError(f"--set {override!r}: expected section.key=value")
    path, _, raw = override.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    keys = path.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise NMTError(f"--set {override!r}: {key} is not a section")
    node[keys[-1]] = value


def _resolve_paths(config: Config, base: Path) -> Config:
    """Make file paths relative to the config file's folder absolute."""

    def resolve(value: str | None) -> str | None:
        if not value:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path))

    def resolve_spec(spec: CorpusSpec | None) -> CorpusSpec | None:
        if spec is None:
            return None
        hub = spec.hub
        if hub and (base / hub).exists():
            hub = resolve(hub)
        return dataclasses.replace(spec, src=resolve(spec.src), tgt=resolve(spec.tgt), path=resolve(spec.path), hub=hub)

    data = dataclasses.replace(
        config.data, train=resolve_spec(config.data.train), dev=resolve_spec(config.data.dev),
        test=resolve_spec(config.data.test), extra_train=tuple(resolve_spec(spec) for spec in config.data.extra_train),
    )
    train = dataclasses.replace(config.train, out_dir=resolve(config.train.out_dir),
                                init_from=resolve(config.train.init_from))
    distill = dataclasses.replace(config.distill, teacher=resolve(config.distill.teacher),
                                  ensemble=tuple(resolve(path) for path in config.distill.ensemble))
    return dataclasses.replace(config, data=data, train=train, distill=distill)


def validate(config: Config, check_files: bool = True) -> Config:
    """Check values that types alone cannot; returns the config unchanged."""
    specs = {f"data.{name}": getattr(config.data, name) for name in ("train", "dev", "test")}
    specs.update((f"data.extra_train[{index}]", spec) for index, spec in enumerate(config.data.extra_train))
    for where, spec in specs.items():
        if spec is not None:
            spec.validate(where, check_files)
    if config.data.extra_train and config.data.train is None:
        raise NMTError("data.extra_train: needs data.train (the corpus it adds to)")
    checks = [
        ("data.max_len", config.data.max_len >= 1),
        ("data.min_len", 0 <= config.data.min_len <= config.data.max_len),
        ("data.max_len_ratio", config.data.max_len_ratio >= 1.0),
        ("vocab.size", config.vocab.size >= 8),
        ("vocab.character_coverage", 0.9 <= config.vocab.character_coverage <= 1.0),
        ("model.embed_dim", config.model.embed_dim >= 1),
        ("model.encoder_hidden", config.model.encoder_hidden >= 1),
        ("model.encoder_layers", config.model.encoder_layers >= 1),
        ("model.decoder_hidden", config.model.decoder_hidden >= 1),
        ("model.decoder_layers", config.model.decoder_layers >= 1),
        ("model.attention_dim", config.model.attention_dim >= 1),
        ("model.dropout", 0.0 <= config.model.dropout < 1.0),
        ("model.source_word_dropout", 0.0 <= config.model.source_word_dropout < 1.0),
        ("model.target_word_dropout", 0.0 <= config.model.target_word_dropout < 1.0),
        ("train.batch_tokens", config.train.batch_tokens >= 1),
        ("train.lr", config.train.lr > 0),
        ("train.lr_decay", 0 < config.train.lr_decay <= 1),
        ("train.warmup_steps", config.train.warmup_steps >= (1 if config.train.lr_schedule == "inverse_sqrt" else 0)),
        ("train.ema_decay", 0.0 <= config.train.ema_decay < 1.0),
        ("train.max_epochs", config.train.max_epochs >= 1),
        ("train.max_steps", config.train.max_steps >= 0),
        ("train.clip_norm", config.train.clip_norm >= 0),
        ("train.label_smoothing", 0.0 <= config.train.label_smoothing < 1.0),
        ("train.valid_every", config.train.valid_every >= 1),
        ("train.patience", config.train.patience >= 1),
        ("decode.beam_size", config.decode.beam_size >= 1),
        ("decode.nbest", 1 <= config.decode.nbest <= config.decode.beam_size),
        ("decode.length_penalty", config.decode.length_penalty >= 0),
        ("decode.max_len_ratio", config.decode.max_len_ratio > 0),
        ("decode.max_input_len", config.decode.max_input_len >= 1),
        ("decode.batch_size", config.decode.batch_size >= 1),
        ("distill.beam_size", config.distill.beam_size >= 1),
        ("distill.shard_size", config.distill.shard_size >= 1),
        ("distill.nbest", 1 <= config.distill.nbest <= config.distill.beam_size or not config.distill.seq_inter),
        ("distill.word_kd_weight", 0.0 <= config.distill.word_kd_weight <= 1.0),
        ("distill.word_kd_topk", config.distill.word_kd_topk >= 1),
        ("distill.ensemble", not (config.distill.ensemble and config.distill.word_kd_weight > 0)),
    ]
    for key, ok in checks:
        if not ok:
            section, name = key.split(".")
            raise NMTError(f"{key}: invalid value {getattr(getattr(config, section), name)!r}")
    if config.train.lr_schedule == "cosine" and config.train.max_steps <= config.train.warmup_steps:
        raise NMTError(f"train.max_steps: the cosine schedule ends at max_steps, which must exceed warmup_steps "
                       f"({config.train.warmup_steps}), got {config.train.max_steps}")
    if config.train.device not in ("cpu", "cuda") and not config.train.device.startswith("cuda:"):
        raise NMTError(f"train.device: must be cpu, cuda or cuda:N, got {config.train.device!r}")
    return config


def config_from_dict(values: dict[str, Any], base: Path | None = None, check_files: bool = True) -> Config:
    """Build and validate a Config from a plain mapping (paths relative to `base`); a checkpoint's config is
    read with `check_files=False`, since its data files need not exist where the model is used."""
    if not isinstance(values, dict):
        raise NMTError("config: the top level must be a mapping of sections")
    config = _build(Config, values, "")
    if base is not None:
        config = _resolve_paths(config, base)
    return validate(config, check_files)


def config_from_checkpoint(values: Any) -> Config:
    """A checkpoint's saved config: keys added since it was written take the values it was trained with."""
    if isinstance(values, dict):
        values = {**values, **{section: {**defaults, **(values.get(section) or {})}
                               for section, defaults in CHECKPOINT_DEFAULTS.items()}}
    return config_from_dict(values, check_files=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not the last one winning)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (config or recipe); anything else is one NMTError line."""
    if not path.is_file():
        raise NMTError(f"{what} not found: {path}")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise NMTError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise NMTError(f"{path}: the top level must be a mapping of sections")
    return values


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, validate. The only entry point for configs."""
    path = Path(path)
    values = read_yaml(path, "config file")
    for override in overrides:
        _set_path(values, override)
    return config_from_dict(values, path.resolve().parent)
