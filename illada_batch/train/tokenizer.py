"""Build a small byte-level BPE tokenizer in LLaDA-8B-Instruct's layout.

Trained on the King James Bible (made offline from Debian's ``bible-kjv``
packages) plus text from the few-shot task suite, so that every task word and
digit with a leading space is a single token.  Writes ``tokenizer.json`` and
``tokenizer_config.json`` into the output directory::

    python -m illada_batch.train.tokenizer --out DIR [--vocab-size 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from illada_batch.tasks import suite as tasks

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
EOT, START_HEADER, END_HEADER = "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, EOS, MASK, EOT, START_HEADER, END_HEADER)  # ids 0..5

CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")
KJV_SPEC = "gen1:1-rev22:21"
_VERSE_REF = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ", re.MULTILINE)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "illada_batch"


# ------------------------------------------------------------------ corpus
def _apt_download(workdir: str) -> None:
    cmd = ["apt-get", "download", *KJV_PACKAGES]
    if subprocess.run(cmd, cwd=workdir, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(cmd, cwd=workdir, check=True, capture_output=True)


def corpus_text(cache_dir: Optional[os.PathLike] = None) -> str:
    """The KJV Bible as plain text, one verse per line, without verse references.

    Made from Debian's ``bible-kjv`` packages (``apt-get download``, unpacked
    with ``dpkg-deb -x``, printed by their ``bible`` program); cached in
    ``cache_dir/kjv.txt``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "kjv.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        _apt_download(tmp)
        root = os.path.join(tmp, "root")
        for deb in sorted(glob.glob(os.path.join(tmp, "*.deb"))):
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        data = glob.glob(os.path.join(root, "**", "bible.data"), recursive=True)
        if not data:
            raise RuntimeError("bible.data not found in the extracted packages")
        out = subprocess.run(
            [os.path.join(root, "usr", "bin", "bible"), "-p", os.path.dirname(data[0]),
             "-f", "-l0", KJV_SPEC],
            check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"},
        ).stdout.decode("utf-8")
    text = _VERSE_REF.sub("", out)
    if text.count("\n") < 30000 or "In the beginning God created" not in text:
        raise RuntimeError("unexpected output from the bible program")
    cache.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(text, encoding="utf-8")
    os.replace(tmp_path, path)
    return text


def task_texts(seed: int, n_docs: int, min_prefix_tokens: int = 200) -> Iterator[str]:
    """Training documents from the task suite, plus one text per suite prefix."""
    rng = random.Random(f"tokenizer:{seed}")
    for _ in range(n_docs):
        segments, _task = tasks.training_sequence(rng, min_prefix_tokens)
        yield "".join(text for text, _ in segments)
    prefixes, rows = tasks.make_suite(seed, 20, 2, min_prefix_tokens)
    yield from prefixes.values()
    yield from (r.prompt + r.answer for r in rows)


# ------------------------------------------------------------------- build
def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048) -> Tokenizer:
    """Byte-level BPE with the special tokens first (ids 0..5)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def verify(tok: Tokenizer, sample: str = "") -> None:
    """Assert the properties the task suite and the model rely on."""
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} has id {tok.token_to_id(s)}"
    pieces = [" " + w for w in tasks.WORDS + tasks.DIGITS] + list(tasks.WORDS)
    for s in pieces:
        n = len(tok.encode(s, add_special_tokens=False).ids)
        assert n == 1, f"{s!r} encodes to {n} tokens"
    checks = ["Input:", "Output:", "Input: lamb king\nOutput: king lamb\n\n", sample,
              "caf\u00e9 \u2014 \u4f60\u597d \U0001f600", f"a{MASK}b{EOS}"]
    for s in checks:
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids,
                          skip_special_tokens=False) == s, f"round trip failed: {s[:60]!r}"
    mask_ids = tok.encode(f"x{MASK}{MASK}", add_special_tokens=False).ids
    assert mask_ids.count(SPECIAL_TOKENS.index(MASK)) == 2, "mask token not atomic"


def tokenizer_config(vocab_size: int) -> dict:
    """``tokenizer_config.json`` contents, as LLaDA-8B-Instruct lays it out."""
    return {
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": vocab_size,
    }


def build(out_dir: os.PathLike, vocab_size: int = 2048, seed: int = 0,
          cache_dir: Optional[os.PathLike] = None, task_docs: int = 3000) -> Tokenizer:
    """Train, verify and save the tokenizer into ``out_dir``."""
    kjv = corpus_text(cache_dir)
    texts = kjv.splitlines() + list(task_texts(seed, task_docs))
    tok = train_tokenizer(texts, vocab_size)
    verify(tok, sample=kjv[:2000] + texts[-1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok.get_vocab_size()), f, indent=2, ensure_ascii=False)
    return tok


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Build the tiny LLaDA-style BPE tokenizer.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="where kjv.txt is cached")
    ap.add_argument("--task-docs", type=int, default=3000,
                    help="task-suite documents mixed into the training text")
    args = ap.parse_args(argv)
    t0 = time.time()
    tok = build(args.out, args.vocab_size, args.seed, args.cache_dir, args.task_docs)
    print(f"wrote {args.out}/tokenizer.json (vocab {tok.get_vocab_size()}) "
          f"in {time.time() - t0:.1f}s; checks passed")


if __name__ == "__main__":
    main()
