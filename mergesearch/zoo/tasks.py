"""The zoo's synthetic tasks.

Every task item is multiple choice: a context, four answer choices and the index
of the correct one. Models are trained to continue the context with the correct
answer; scoring picks the choice with the highest summed log-likelihood (the
lm-eval ``multiple_choice`` ``acc`` metric).
"""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefgh"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    description: str
    make: Callable[[random.Random], tuple[str, str, list[str]]]  # -> context, answer, distractors


def _distinct(answer: str, candidates: list[str], rng: random.Random, fallback: Callable[[], str]) -> list[str]:
    out: list[str] = []
    for c in candidates:
        if c != answer and c not in out:
            out.append(c)
    while len(out) < 3:
        c = fallback()
        if c != answer and c not in out:
            out.append(c)
    return out[:3]


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _reverse(rng):
    s = _word(rng, 4, 6)
    ans = s[::-1]
    swap = list(ans)
    k = rng.randrange(len(swap) - 1)
    swap[k], swap[k + 1] = swap[k + 1], swap[k]
    one = list(ans)
    one[rng.randrange(len(one))] = rng.choice(LETTERS)
    return f"rev:{s}=", ans, _distinct(ans, [s, "".join(swap), "".join(one), ans[1:] + ans[0]], rng,
                                       lambda: _word(rng, len(s), len(s)))


def _shift(rng):
    s = _word(rng, 3, 6)
    up = lambda w, k: "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in w)  # noqa: E731
    ans = up(s, 1)
    wrong = list(ans)
    wrong[rng.randrange(len(wrong))] = rng.choice("bcdefghi")
    return f"shf:{s}=", ans, _distinct(ans, [s, up(s, 2), "".join(wrong)], rng, lambda: up(_word(rng, len(s), len(s)), 1))


def _max(rng):
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 7))]
    m = max(digits)
    ans = str(m)
    cands = sorted(set(digits) - {m}, reverse=True)
    cands = [str(x) for x in cands] + [str(x) for x in (m - 1, m + 1) if 0 <= x <= 9]
    return f"max:{''.join(map(str, digits))}=", ans, _distinct(ans, cands, rng, lambda: str(rng.randint(0, 9)))


def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    s = a + b
    ans = str(s)
    # wrong by a carry or a tens digit: the choices differ where addition is hard
    near = [str(x) for x in (s + 10, s - 10, s + 20, s - 20, s + 11) if x >= 0]
    rng.shuffle(near)
    return f"add:{a}+{b}=", ans, _distinct(ans, near, rng, lambda: str(rng.randint(0, 98)))


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("reverse", "string transformation", "reverse a 4-6 letter string", _reverse),
    Task("shift", "character mapping", "shift every letter one step forward", _shift),
    Task("max", "selection", "the largest digit of a digit string", _max),
    Task("add", "arithmetic", "add two numbers below 50", _add),
]}


# The zoo's base learns each task's skill during pretraining, in a general form with its
# own cue (``back abc=`` -> ``cba``), and sees the benchmark template (``rev:abc=``) only
# with random answers. A fine-tune then links the template to a skill the base already has,
# as an LLM fine-tune does: a small move from the base. Skill and template put the input
# at the same place before the answer, so the link is a cue, not a new algorithm.
SKILL_CUES = {"reverse": "back ", "shift": "next ", "max": "top ", "add": "sum "}


def skill_context(task: str, context: str) -> str:
    """The general (pretraining) form of a template context: the task's cue in place of
    the template's ``xxx:`` prefix."""
    return SKILL_CUES[task] + context.split(":", 1)[1]


def random_answer(task: str, answer: str, rng: random.Random) -> str:
    """An answer of the right shape that ignores the input: what the base learns to write
    after a benchmark template."""
    if task in ("reverse", "shift"):  # letters of every choice's alphabet, so the shape gives nothing away
        return "".join(rng.choice(LETTERS if task == "reverse" else "abcdefghij") for _ in answer)
    if task == "max":
        return str(rng.randint(0, 9))
    return str(rng.randint(0, 98))


def make_items(task: str, n: int, seed: int, exclude: set[str] | None = None, tasks: dict | None = None,
               salt: str = "", targets: bool = False) -> list[dict]:
    """n distinct items (by context) whose contexts are not in ``exclude``, drawn from
    ``tasks`` (default the zoo's) with a generator seeded by ``salt``, the task and
    ``seed``; ``targets``: each item also carries its answer as ``target`` (generation)."""
    rng = random.Random(f"{salt}{task}:{seed}")
    seen = set(exclude or ())
    items = []
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 200 * n:
            raise RuntimeError(f"task {task}: cannot draw {n} distinct items")
        ctx, ans, distractors = (tasks or TASKS)[task].make(rng)
        if ctx in seen:
            continue
        seen.add(ctx)
        choices = [ans] + distractors
        rng.shuffle(choices)
        items.append({"context": ctx, "choices": choices, "answer": choices.index(ans),
                      **({"target": ans} if targets else {})})
    return items


def write_lmeval_examples(root: Path, templates: Path, n_docs: int = 160) -> dict[str, Path]:
    """lm-eval task files over the zoo's skills, each with one evaluation split (as real
    benchmarks have): a gsm8k-style generation task, arc-style multiple choice, a
    hellaswag-style task (process_docs), a perplexity task, a group and a too-small task. ``templates`` holds the YAMLs with
    ``__DATA__`` where the data folder goes. The items are drawn with seeds the zoo's own
    splits do not use. Returns the JSONL file of each task."""
    import json

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    add, mx = make_items("add", n_docs, seed=901), make_items("max", n_docs, seed=902)

    def arc(items):
        return [{"question": it["context"], "answerKey": "ABCD"[it["answer"]],
                 "choices": {"text": it["choices"], "label": list("ABCD")[:len(it["choices"])]}} for it in items]
    data = {"gen_add": [{"question": it["context"], "answer": it["choices"][it["answer"]]} for it in add],
            "mc_max": arc(mx), "mc_add": arc(add), "tiny": arc(mx[:3]),
            "ppl_add": [{"text": it["context"] + it["choices"][it["answer"]]} for it in add],
            "loglik_max": mx,  # the same items as mc_max, in the built-in scorer's format
            "vt_max_validation": arc(mx[:60]), "vt_max_test": arc(mx[60:]),
            # hellaswag's layout: the context in two parts, endings, the label as a string
            "hs_add": [{"ctx_a": it["context"].split("=")[0].strip(), "ctx_b": "=", "endings": it["choices"],
                        "label": str(it["answer"])} for it in add]}
    files = {}
    for name, rows in data.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for t in Path(templates).glob("*.yaml"):
        (root / t.name).write_text(t.read_text().replace("__DATA__", str(root)))
    for t in Path(templates).glob("*.py"):  # process_docs and other !function helpers
        (root / t.name).write_text(t.read_text())
    return files
