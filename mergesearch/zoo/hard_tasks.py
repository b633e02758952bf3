"""The hard zoo's eight tasks (:mod:`mergesearch.zoo.hard`).

Like the bundled zoo's, every item has a context, four choices and the index of the right
one, so the same JSONL format and training loop serve both. The hard zoo differs where
merging gets hard:

- **pairs that share an input format**: ``rev:`` and ``rot:`` read the same letter
  strings and answer differently; ``max:`` and ``min:`` read the same digit strings and
  answer the opposite. Only the three-letter prefix tells the pair apart, so their task
  vectors pull the same inputs toward different outputs.
- **a memorization task**: ``who:`` asks for an attribute of a made-up entity
  (``who:QZKM=`` -> ``lima``). The facts are a fixed table, drawn once; the base never
  sees a right answer (its pretraining shows the template with other entities and
  random attributes), so only the fine-tune knows them. The table holds the dev, test
  and train entities, all of which the fine-tune learns: a memorization task is scored
  on the facts it was taught. The search scores dev facts only; test facts are others.
- **a generation task**: ``dup:abc=`` -> ``aabbcc``, scored by exact match of the greedy
  output (lm-eval ``generate_until``); its items still carry choices, which the build's
  skill checks use.
"""

from __future__ import annotations

import random

from mergesearch.zoo.tasks import TASKS as ZOO, Task, _distinct, _word, LETTERS, make_items as zoo_items

ATTRIBUTES = ["lima", "oslo", "rome", "baku", "kiev", "riga", "doha", "suva",
              "apia", "male", "bern", "sofia", "vaduz", "minsk", "quito", "dili"]
# the fact table: entity -> attribute; dev, test and train facts are drawn from it
N_FACTS = 320
FACT_SPLITS = {"dev": 128, "test": 128, "train": 64}


def _entity(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))


def fact_table() -> dict[str, str]:
    """The N_FACTS facts the ``who`` fine-tune memorizes (fixed: seeded by name)."""
    rng = random.Random("hard-zoo:facts")
    table: dict[str, str] = {}
    while len(table) < N_FACTS:
        e = _entity(rng)
        if e not in table:
            table[e] = rng.choice(ATTRIBUTES)
    return table


_FACTS = fact_table()
_FACT_NAMES = sorted(_FACTS)


def _rotate(rng):
    s = _word(rng, 4, 6)
    ans = s[1:] + s[0]
    return f"rot:{s}=", ans, _distinct(ans, [s[::-1], s, s[-1] + s[:-1], ans[::-1]], rng,
                                       lambda: _word(rng, len(s), len(s)))


def _reverse(rng):
    ctx, ans, wrong = ZOO["reverse"].make(rng)
    s = ctx[4:-1]
    # the rotation is always a wrong choice: the pair's outputs compete on the same input
    rot = s[1:] + s[0]
    return ctx, ans, _distinct(ans, [rot, *wrong], rng, lambda: _word(rng, len(s), len(s)))


def _min(rng):
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 7))]
    m = min(digits)
    ans = str(m)
    cands = [str(max(digits))] + [str(x) for x in sorted(set(digits) - {m})] + \
        [str(x) for x in (m + 1, m - 1) if 0 <= x <= 9]
    return f"min:{''.join(map(str, digits))}=", ans, _distinct(ans, cands, rng, lambda: str(rng.randint(0, 9)))


def _max(rng):
    ctx, ans, wrong = ZOO["max"].make(rng)
    lowest = str(min(int(c) for c in ctx[4:-1]))  # the min task's answer is always a wrong choice
    return ctx, ans, _distinct(ans, [lowest, *wrong], rng, lambda: str(rng.randint(0, 9)))


def _who(rng):
    e = rng.choice(_FACT_NAMES)
    ans = _FACTS[e]
    return f"who:{e}=", ans, _distinct(ans, rng.sample(ATTRIBUTES, 5), rng, lambda: rng.choice(ATTRIBUTES))


def _dup(rng):
    s = _word(rng, 3, 5)
    ans = "".join(c + c for c in s)
    near = list(ans)
    k = rng.randrange(len(s))
    near[2 * k + 1] = rng.choice(LETTERS)
    # every choice as long as the answer: a prefix of it would win on summed log-likelihood
    swap = "".join(c + c for c in s[1:] + s[0])
    return f"dup:{s}=", ans, _distinct(ans, [s + s, "".join(near), swap, "".join(c + c for c in s[::-1])], rng,
                                       lambda: "".join(c + c for c in _word(rng, len(s), len(s))))


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("reverse", "string transformation", "reverse a 4-6 letter string (its pair: rotate)", _reverse),
    Task("rotate", "string transformation", "rotate a 4-6 letter string left by one (its pair: reverse)", _rotate),
    Task("shift", "character mapping", "shift every letter one step forward", ZOO["shift"].make),
    Task("max", "selection", "the largest digit of a digit string (its pair: min)", _max),
    Task("min", "selection", "the smallest digit of a digit string (its pair: max)", _min),
    Task("add", "arithmetic", "add two numbers below 50", ZOO["add"].make),
    Task("who", "memorization", f"an attribute of one of {N_FACTS} made-up entities", _who),
    Task("dup", "generation (exact match)", "write every letter twice", _dup),
]}
GENERATION = {"dup"}
# the general (pretraining) form of each skill: its own cue in place of the template's
# prefix; ``who`` has none (the base knows no fact)
SKILL_CUES = {"reverse": "back ", "rotate": "turn ", "shift": "next ", "max": "top ", "min": "low ",
              "add": "sum ", "dup": "twice "}


def skill_context(task: str, context: str) -> str:
    return SKILL_CUES[task] + context.split(":", 1)[1]


def random_answer(task: str, answer: str, rng: random.Random) -> str:
    """An answer of the right shape that ignores the input (what the base learns to write
    after a template)."""
    if task in ("reverse", "rotate", "dup"):
        return "".join(rng.choice(LETTERS) for _ in answer)
    if task == "shift":
        return "".join(rng.choice("abcdefghij") for _ in answer)
    if task in ("max", "min"):
        return str(rng.randint(0, 9))
    if task == "who":
        return rng.choice(ATTRIBUTES)
    return str(rng.randint(0, 98))


def template_context(task: str, rng: random.Random) -> tuple[str, str]:
    """A template context with a random answer, for the base's pretraining; for ``who``
    an entity outside the fact table."""
    if task == "who":
        while True:
            e = _entity(rng)
            if e not in _FACTS:
                return f"who:{e}=", rng.choice(ATTRIBUTES)
    ctx, ans, _ = TASKS[task].make(rng)
    return ctx, random_answer(task, ans, rng)


def make_items(task: str, n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n distinct items (by context) of a hard-zoo task whose contexts are not in ``exclude``;
    a generation item also carries its ``target``."""
    return zoo_items(task, n, seed, exclude, tasks=TASKS, salt="hard:", targets=task in GENERATION)
