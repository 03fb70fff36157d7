"""Does the data path scale? Token-store builds of two corpus sizes, plain and zstd-compressed, and reference
scoring on 1 vs 2 processes.

Generates its own synthetic corpus (many jsonl files of word-salad documents, ~48 MB each) and a byte-level
BPE tokenizer (vocab 8,192) in a temp folder; compresses each jsonl file, as a stream, into a `.json.zst`
file (Dolma's naming, zstandard level 3: one file, one piece of the build); then measures, side by side
in one run:

- peak RSS of the whole process tree (`flywheel prepare-data CONFIG --workers 2`, sampled every
  0.1 s) for a LARGE and a SMALL corpus, plain and compressed: memory must be flat in the corpus size;
- build tokens/s with 2 workers (the store build as `prepare-data` reports it; the whole
  command's wall clock, start-up included, beside it) against the raw fast tokenizer on one
  process (encode_batch on the same documents): parallel efficiency, reading and writing included;
- build tokens/s on the LARGE `.json.zst` files against the same texts as plain `.jsonl`: the cost of
  decompressing (the two stores must hold the same number of tokens);
- bytes on disk per token (token files + document index);
- reference scoring (`score_reference`, a random 4-layer Llama) as 2 processes x 1 thread
  (RANK/WORLD_SIZE set, as torchrun does) against 1 process x 2 threads, tokens/s of the
  scoring loops, and whether the two caches are byte-identical.

    python bench/data_scale.py [--large 400e6] [--small 50e6] [--json]
Targets: RSS large/small <= 1.15; RSS large <= 1.5 GB; build/raw >= 1.6; bytes/token <= 2.05;
scoring 2x1 / 1x2 >= 0.9 with byte-identical chunks; .json.zst build / .jsonl build >= 0.8 (same tokens);
.json.zst RSS large/small <= 1.15.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.env import apply_offline_env  # noqa: E402

apply_offline_env()
os.environ["TOKENIZERS_PARALLELISM"] = "false"

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))
WORDS = None
FILE_BYTES = 48 << 20


def _words(rng: np.random.Generator, n: int = 20_000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 9, size=n)])


def make_corpus(folder: Path, n_bytes: int, seed: int) -> int:
    """Jsonl files of ~FILE_BYTES each, Zipf-distributed words; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = _words(np.random.default_rng(0))
    p = 1 / np.arange(1, len(words) + 1)
    p /= p.sum()
    folder.mkdir(parents=True)
    written, f = 0, 0
    while written < n_bytes:
        lines = []
        size = 0
        while size < FILE_BYTES and written + size < n_bytes:
            picks = words[rng.choice(len(words), size=(500, 800), p=p)]
            for row, k in zip(picks, rng.integers(100, 800, size=len(picks)), strict=True):  # web-page lengths
                line = json.dumps({"text": " ".join(row[:k])}) + "\n"
                lines.append(line)
                size += len(line)
        (folder / f"part-{f:04d}.jsonl").write_text("".join(lines))
        written += size
        f += 1
    return written


def make_tokenizer(sample: list[str], folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eos|>").save_pretrained(folder)


def peak_tree_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; the highest sum of RSS over it and all its descendants (bytes), wall seconds, stdout."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})  # rich wraps at 80 columns otherwise
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return peak, time.perf_counter() - t0, out


def compress_corpus(corpus: Path, folder: Path) -> int:
    """Each jsonl file of `corpus` as a `.json.zst` file in `folder` (level 3, streamed); the compressed bytes."""
    import zstandard

    folder.mkdir(parents=True)
    total = 0
    for src in sorted(corpus.glob("*.jsonl")):
        with open(src, "rb") as fin, open(folder / f"{src.stem}.json.zst", "wb") as fout:
            total += zstandard.ZstdCompressor(level=3).copy_stream(fin, fout, size=src.stat().st_size)[1]
    return total


def write_config(path: Path, home: Path, source: Path, tokdir: Path, budget: int, **extra) -> None:
    import yaml

    doc = {"name": "bench", "home": str(home), "model": {"source": str(tokdir), "tokenizer": str(tokdir)},
           "data": {"sources": [{"source": str(source)}]},
           "midtrain": {"token_budget": budget, "seq_len": 128, "score_batch_size": 8, **extra}}
    path.write_text(yaml.safe_dump(doc))


def store_meta(home: Path) -> dict:
    (meta,) = (home / "cache" / "tokens").glob("*/store.json")
    return json.loads(meta.read_text())


def build_store(tmp: Path, label: str, corpus: Path, tokdir: Path) -> dict:
    """`prepare-data --workers 2` on `corpus` in a fresh home: peak tree RSS, build and wall tokens/s, store size."""
    home, cfg = tmp / f"home-{label}", tmp / f"{label}.yaml"
    write_config(cfg, home, corpus, tokdir, budget=1 << 20)
    rss, wall, out = peak_tree_rss([FLYWHEEL, "prepare-data", str(cfg), "--workers", "2"])
    meta = store_meta(home)
    build_s = float(re.search(r"built\s+in\s+([0-9.]+)\s+s", out).group(1))  # the store build, not CLI start-up
    return {"tokens": meta["tokens"], "documents": meta["documents"], "shards": len(meta["shards"]),
            "rss": rss, "seconds": wall, "build_s": build_s, "tps": meta["tokens"] / build_s,
            "wall_tps": meta["tokens"] / wall, "bytes_per_token": meta["bytes"] / meta["tokens"]}


def raw_tokenizer_rate(tokdir: Path, corpus: Path, n_docs: int = 60_000) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    with open(sorted(corpus.glob("*.jsonl"))[0]) as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(n_docs), strict=False)]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 1000):
        n += sum(len(e.ids) + 1 for e in tok.encode_batch(texts[i : i + 1000]))
    return n / (time.perf_counter() - t0)


SCORE = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from flywheel.config import load_config
from flywheel.remit.scoring import score_reference
rep = score_reference(load_config({cfg!r}), {model!r}, chunk_tokens=128 * 64)
print(json.dumps({{"rank": os.environ.get("RANK", "0"), "tps": rep.tokens_per_second, "folder": str(rep.cache.folder)}}))
"""


def scoring(tmp: Path, tokdir: Path, source: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_dir = tmp / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(model_dir)
    for f in tokdir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    results = {}
    for label, procs, threads in (("1x2", 1, 2), ("2x1", 2, 1)):
        home = tmp / f"score-{label}"
        cfg = tmp / f"score-{label}.yaml"
        write_config(cfg, home, source, model_dir, budget=128 * 64 * 8)
        subprocess.run([FLYWHEEL, "prepare-data", str(cfg)], check=True, capture_output=True)
        script = SCORE.format(repo=str(REPO), threads=threads, cfg=str(cfg), model=str(model_dir))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WORLD_SIZE": str(procs)}
        ps = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                               text=True) for r in range(procs)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
        assert all(p.returncode == 0 for p in ps)
        folder = Path(outs[0]["folder"])
        results[label] = {"tps": sum(o["tps"] for o in outs),
                          "sha": [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("chunk-*"))]}
    return {"tps_1x2": results["1x2"]["tps"], "tps_2x1": results["2x1"]["tps"],
            "ratio": results["2x1"]["tps"] / results["1x2"]["tps"],
            "identical": results["1x2"]["sha"] == results["2x1"]["sha"], "chunks": len(results["2x1"]["sha"])}


def tokenizer_and_rate(tmp: Path) -> tuple[Path, float]:
    """The tokenizer, trained on a sample first, and its bytes of jsonl per token (to size the corpora)."""
    from tokenizers import Tokenizer

    make_corpus(tmp / "sample", 4 << 20, seed=99)
    sample = [json.loads(line)["text"] for p in (tmp / "sample").glob("*.jsonl") for line in open(p)]
    tokdir = tmp / "tok"
    make_tokenizer(sample, tokdir)
    tk = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    return tokdir, sum(len(json.dumps({"text": t})) + 1 for t in sample) / sum(
        len(e.ids) + 1 for e in tk.encode_batch(sample))


def measure(tmp: Path, sizes: dict[str, float]) -> tuple[dict, float, dict]:
    """Every build (plain and .json.zst, per size), the raw tokenizer rate and the scoring figures."""
    tokdir, bytes_per_token = tokenizer_and_rate(tmp)
    builds = {}
    for label, tokens in sizes.items():
        corpus = tmp / f"corpus-{label}"
        t0 = time.perf_counter()
        plain_bytes = make_corpus(corpus, int(tokens * bytes_per_token), seed=1 if label == "small" else 2)
        builds[label] = {**build_store(tmp, label, corpus, tokdir), "generate_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        zst_bytes = compress_corpus(corpus, tmp / f"corpus-{label}-zst")
        builds[f"{label}-zst"] = {**build_store(tmp, f"{label}-zst", tmp / f"corpus-{label}-zst", tokdir),
                                  "generate_s": time.perf_counter() - t0, "compression": plain_bytes / zst_bytes}
        if label == "small":
            raw = raw_tokenizer_rate(tokdir, corpus)
            score = scoring(tmp, tokdir, corpus)
    return builds, raw, score


def figures(builds: dict, raw: float, score: dict) -> list[tuple[str, float, str, bool]]:
    """The ratio table: (figure, measured, goal, met)."""
    large, small, zlarge, zsmall = (builds[k] for k in ("large", "small", "large-zst", "small-zst"))
    zst_tps, zst_rss = zlarge["tps"] / large["tps"], zlarge["rss"] / zsmall["rss"]
    same = all(builds[f"{k}-zst"]["tokens"] == builds[k]["tokens"] for k in ("large", "small"))
    return [
        ("peak RSS large / small", large["rss"] / small["rss"], "<= 1.15", large["rss"] / small["rss"] <= 1.15),
        ("peak RSS large (GB)", large["rss"] / 1e9, "<= 1.5", large["rss"] / 1e9 <= 1.5),
        ("build tokens/s (2 workers) / raw tokenizer (1)", large["tps"] / raw, ">= 1.6", large["tps"] / raw >= 1.6),
        ("  same, wall clock of the whole command", large["wall_tps"] / raw, "(no goal)", True),
        ("bytes on disk per token", large["bytes_per_token"], "<= 2.05", large["bytes_per_token"] <= 2.05),
        ("scoring 2 proc x 1 thread / 1 proc x 2 threads", score["ratio"], ">= 0.9",
         score["ratio"] >= 0.9 and score["identical"]),
        ("build tokens/s (2 workers), .json.zst / .jsonl", zst_tps, ">= 0.8 (same tokens)", zst_tps >= 0.8 and same),
        ("peak RSS .json.zst large / small", zst_rss, "<= 1.15", zst_rss <= 1.15),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", type=float, default=400e6, help="tokens in the large corpus (about)")
    ap.add_argument("--small", type=float, default=50e6, help="tokens in the small corpus (about)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flywheel-data-scale-") as d:
        builds, raw, score = measure(Path(d), {"small": args.small, "large": args.large})
    rows = figures(builds, raw, score)
    if args.json:
        print(json.dumps({"builds": builds, "raw_tokenizer_tps": raw, "scoring": score,
                          "rows": [{"figure": r[0], "value": r[1], "goal": r[2], "pass": r[3]} for r in rows]}))
        return
    for label, b in builds.items():
        made = f"compressed {b['compression']:.1f}x in" if "compression" in b else "corpus generated in"
        print(f"{label}: {b['tokens']:,} tokens, {b['documents']:,} documents, {b['shards']} shards; build "
              f"{b['build_s']:.1f} s = {b['tps']:,.0f} tokens/s ({b['seconds']:.1f} s for the whole command), "
              f"peak tree RSS {b['rss'] / 2**20:,.0f} MiB ({made} {b['generate_s']:.0f} s)")
    print(f"raw fast tokenizer, one process: {raw:,.0f} tokens/s")
    print(f"scoring: 1x2 {score['tps_1x2']:,.0f} tokens/s, 2x1 {score['tps_2x1']:,.0f} tokens/s, "
          f"{score['chunks']} chunks, byte-identical: {score['identical']}")
    print("\n| figure | measured | goal | |\n|---|---|---|---|")
    for name, value, goal, ok in rows:
        print(f"| {name} | {value:.3f} | {goal} | {'PASS' if ok else 'MISS'} |")

if __name__ == "__main__":
    main()
