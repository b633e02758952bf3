"""`mergesearch zoo build --preset hard`: the hard benchmark zoo, for benchmarks only.

The bundled zoo (:mod:`mergesearch.zoo.build`) is saturated as a yardstick: a search
merges its four gentle fine-tunes to within a few points of the specialists. The hard zoo
is built like it (a base with latent skills, one fine-tune per benchmark template, the
same JSONL format and lm-eval task files, cached by its manifest) and differs where
merging is hard (:mod:`mergesearch.zoo.hard_tasks`):

- a larger tiny Llama (hidden 128, 5 layers, intermediate 320: about 1.0M parameters);
- eight tasks: two pairs that share an input format (reverse/rotate on letter strings,
  max/min on digit strings), a memorization task whose facts the base does not know, a
  generation task scored by exact match, shift and add;
- fine-tunes with less replay (10% against the bundled zoo's 30%) and a larger step, so
  they move further from the base and their task vectors collide.

``base/``, ``ft_<task>/`` (with ``exp_avg_sq.safetensors``), ``data/<task>/{dev,test,
train}.jsonl``, ``tasks/zoo_<task>_<split>.yaml`` and ``manifest.json``; the manifest
records each fine-tune's accuracy on its own task (dev and test) and the build's time.
No checkpoints, sweep, SGD twin or LoRA adapters: the bundled zoo has them.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from mergesearch.progress import Step, step as progress_step
from mergesearch.zoo import hard_tasks as ht
from mergesearch.zoo.synthetic import CHARS, SPECIALS
from mergesearch.zoo.train import encode, init_model, mc_accuracy, save_model, train, PAD, EOS

log = logging.getLogger(__name__)

HARD_VERSION = 1
DEFAULT_OUT = Path("results/zoo_hard")
HARD_TASKS = list(ht.TASKS)
N_DEV, N_TEST, N_TRAIN = 200, 200, 128
MODEL = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=5, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
# pretraining: the seven skills in their general form (50%; add, the slowest, three times as
# often), the eight templates with random answers (50%), until every skill scores
# SKILL_TARGET on held-out skill items or ``steps``
PRETRAIN = dict(steps=1600, min_steps=500, lr=3e-3, seed=0, batch_size=128)
SKILL_WEIGHTS = {"add": 3}
SKILL_SHARE, SKILL_TARGET, CHECK_EVERY = 0.5, 0.95, 100
REPLAY = 0.1
FINETUNE = {t: dict(steps=150, lr=1e-3) for t in HARD_TASKS}
FINETUNE["who"] = dict(steps=300, lr=2e-3)
FINETUNE["add"] = dict(steps=200, lr=1e-3)
GEN_ARGS = {"until": ["<", "\n"], "max_gen_toks": 12, "do_sample": False}


def split_sizes(task: str) -> dict[str, int]:
    return dict(ht.FACT_SPLITS) if task == "who" else {"dev": N_DEV, "test": N_TEST, "train": N_TRAIN}


def write_data(root: Path) -> dict:
    """Every task's dev, test and train items (JSONL under ``root/data``), disjoint by context."""
    import json

    splits = {}
    for task in HARD_TASKS:
        sizes, taken, splits[task] = split_sizes(task), set(), {}
        for seed, split in enumerate(("dev", "test", "train"), start=1):
            items = ht.make_items(task, sizes[split], seed=seed, exclude=taken)
            taken |= {it["context"] for it in items}
            splits[task][split] = items
        folder = root / "data" / task
        folder.mkdir(parents=True)
        for split, items in splits[task].items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    return splits


def pretraining_sampler(held_out: dict[str, set[str]], skill_share: float = SKILL_SHARE):
    skills = [t for t in HARD_TASKS if t in ht.SKILL_CUES]
    weights = [SKILL_WEIGHTS.get(t, 1) for t in skills]

    def sample(rng: random.Random):
        while True:
            if rng.random() < skill_share:
                task = rng.choices(skills, weights=weights)[0]
                ctx, ans, _ = ht.TASKS[task].make(rng)
                if ctx not in held_out[task]:
                    return ht.skill_context(task, ctx), ans
            else:
                return ht.template_context(rng.choice(HARD_TASKS), rng)
    return sample


def finetune_sampler(task: str, held_out: dict[str, set[str]]):
    """The task's template with the right answer (never a dev or test context, except for
    ``who``, whose every fact is taught), mixed with REPLAY of the pretraining skills."""
    replay = pretraining_sampler(held_out, skill_share=1.0)
    skip = set() if task == "who" else held_out[task]

    def sample(rng: random.Random):
        if rng.random() < REPLAY:
            return replay(rng)
        while True:
            ctx, ans, _ = ht.TASKS[task].make(rng)
            if ctx not in skip:
                return ctx, ans
    return sample


@torch.no_grad()
def greedy(model, contexts: list[str], max_new: int = 12) -> list[str]:
    """The greedy continuation of each context, up to EOS (at most ``max_new`` characters);
    contexts of one length decode together."""
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        by_len.setdefault(len(c), []).append(i)
    out: list[list[int]] = [[] for _ in contexts]
    for members in by_len.values():
        ids = torch.tensor([encode(contexts[i]) for i in members])
        done = torch.zeros(len(members), dtype=torch.bool)
        for _ in range(max_new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            done |= (nxt == EOS) | (nxt == PAD)
            for j, i in enumerate(members):
                if not done[j]:
                    out[i].append(int(nxt[j]))
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ["".join(CHARS[t - len(SPECIALS)] if t >= len(SPECIALS) else "" for t in o) for o in out]


def gen_accuracy(model, items: list[dict], max_new: int = 12) -> float:
    """Exact match of the greedy continuation with each item's ``target``."""
    outs = greedy(model, [it["context"] for it in items], max_new)
    return sum(o == it["target"] for o, it in zip(outs, items)) / len(items)


def own_accuracy(model, task: str, items: list[dict]) -> float:
    return gen_accuracy(model, items) if task in ht.GENERATION else mc_accuracy(model, items)


def build(root: Path, final: Path, scale: float, steps) -> dict:
    """Train the base and the eight fine-tunes into ``root`` (a temporary folder renamed to
    ``final`` by the caller); ``steps(n)`` scales a step count. Returns the manifest."""
    total = steps(PRETRAIN["steps"]) + sum(steps(hp["steps"]) for hp in FINETUNE.values())
    with progress_step(f"zoo: training the hard zoo's {1 + len(HARD_TASKS)} models", total=total) as line:
        return _train_all(root, final, scale, steps, line)


def _train_all(root: Path, final: Path, scale: float, steps, line: Step) -> dict:
    t0 = time.perf_counter()
    splits = write_data(root)
    held_out = {t: {it["context"] for sp in ("dev", "test") for it in splits[t][sp]} for t in HARD_TASKS}
    _, model = init_model(MODEL, PRETRAIN["seed"])
    taken = {t: held_out[t] | {it["context"] for it in splits[t]["train"]} for t in HARD_TASKS}
    probes = {t: [dict(it, context=ht.skill_context(t, it["context"]))
                  for it in ht.make_items(t, 100, seed=4, exclude=taken[t])] for t in ht.SKILL_CUES}
    skill_log: list = []

    def skills_learned(step, opt):
        if step < steps(PRETRAIN["min_steps"]) or step % CHECK_EVERY:
            return False
        acc = {t: round(mc_accuracy(model, items), 3) for t, items in probes.items()}
        model.train()
        skill_log.append({"step": step, **acc})
        log.info("zoo: base skills at step %d: %s", step, acc)
        return min(acc.values()) >= SKILL_TARGET
    train(model, pretraining_sampler(held_out), steps(PRETRAIN["steps"]), PRETRAIN["lr"],
          batch_size=PRETRAIN["batch_size"], seed=PRETRAIN["seed"], loss_on_context=True, warmup=50,
          on_step=skills_learned, parent=line,
          progress=f"zoo: pretraining the hard base, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    model.eval()
    save_model(model, root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pretrain_seconds = time.perf_counter() - t0
    base_acc = {t: {sp: round(own_accuracy(model, t, splits[t][sp]), 3) for sp in ("dev", "test")}
                for t in HARD_TASKS}
    models = [{"name": "base", "path": "base", "kind": "base", "accuracy": base_acc}]
    for i, task in enumerate(HARD_TASKS):
        hp = FINETUNE[task]
        model.load_state_dict(base_state)
        opt = train(model, finetune_sampler(task, held_out), steps(hp["steps"]), hp["lr"], seed=i + 1, warmup=10,
                    parent=line, progress=f"zoo: fine-tuning ft_{task}")
        save_model(model, root / f"ft_{task}", opt)
        acc = {sp: round(own_accuracy(model, task, splits[task][sp]), 3) for sp in ("dev", "test")}
        log.info("zoo: ft_%s scores %.3f on %s dev, %.3f on test", task, acc["dev"], task, acc["test"])
        models.append({"name": f"ft_{task}", "path": f"ft_{task}", "kind": "finetune", "task": task,
                       "optimizer": "adamw", "replay": REPLAY, **hp, "accuracy": acc,
                       "exp_avg_sq": f"ft_{task}/exp_avg_sq.safetensors"})
    return {
        "version": HARD_VERSION,
        "preset": "hard",
        "scale": scale,
        "root": str(final),
        "models": models,
        "tasks": {t: {"kind": ht.TASKS[t].kind, "description": ht.TASKS[t].description,
                      "output_type": "generate_until" if t in ht.GENERATION else "multiple_choice",
                      **{sp: f"data/{t}/{sp}.jsonl" for sp in ("dev", "test", "train")},
                      "lmeval_task": f"zoo_{t}_{{split}}"} for t in HARD_TASKS},
        "splits": {t: split_sizes(t) for t in HARD_TASKS},
        "lmeval_include_path": "tasks",
        "base_skill_checks": skill_log,
        "pretrain_seconds": round(pretrain_seconds, 1),
    }


def lmeval_spec(task: str, split: str, data_file: Path) -> dict:
    """The lm-eval task file of one hard-zoo task and split: multiple choice scored by
    ``acc``, or (``dup``) greedy generation scored by exact match."""
    spec = {"task": f"zoo_{task}_{split}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"eval": str(data_file)}}, "test_split": "eval",
            "doc_to_text": "{{context}}", "target_delimiter": ""}
    if task in ht.GENERATION:
        spec.update(output_type="generate_until", doc_to_target="{{target}}", generation_kwargs=dict(GEN_ARGS),
                    # the char tokenizer decodes with a space between characters
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                  "regexes_to_ignore": [" "]}])
    else:
        spec.update(output_type="multiple_choice", doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    spec["metadata"] = {"version": HARD_VERSION}
    return spec
