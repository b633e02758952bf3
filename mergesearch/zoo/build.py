"""`mergesearch zoo build`: the bundled tiny model zoo, built here, offline.

- ``base/``: a tiny Llama (~0.47M parameters) with a char-level tokenizer. Its
  pretraining teaches the four task skills in a general form (``back abc=`` -> ``cba``)
  and shows the benchmark templates (``rev:abc=``) with random answers only: the base
  can do every task but answers no template.
- ``ft_<task>/``: one short, gentle AdamW fine-tune of the base per task, which links the
  template to the skill, with replay of the pretraining skills; each saves its Adam second
  moments in ``exp_avg_sq.safetensors`` (under the parameter names; the metadata holds
  step, beta2 and eps for bias correction). They move about 0.1 from the base (relative
  L2), as LLM fine-tunes move little, so their task vectors add up.
- ``checkpoints/add/checkpoint-<step>/``: intermediate checkpoints of the ``add``
  fine-tune in HF Trainer's layout (model, optimizer.pt, trainer_state.json).
- ``ft_shift_sgd/``: the shift fine-tune again (same data order) trained with SGD and
  momentum instead of AdamW: the optimizer pair for geometry-aware merging.
- ``sweep/reverse/<config>/``: fine-tunes of one task over learning rate, steps
  and seed, as in the model-soups setup; they share the base's basin.
- ``lora_<task>/``: one PEFT LoRA adapter of the base per task (``adapter_config.json``,
  ``adapter_model.safetensors``; rank 8 on every attention and MLP projection), trained by
  ``peft`` on the task's fine-tune data in the full fine-tune's data order. Its config
  names the zoo's ``base/`` folder by its absolute path.
- ``data/<task>/{dev,test,train}.jsonl`` (train: examples for curvature and Gram
  estimates), ``tasks/<task>.yaml`` (lm-eval task files reading the dev and test
  JSONL files), and ``manifest.json``.

Every random choice has a fixed seed, so a build gives the same files every time;
a finished build is recognised by its manifest and returned at once.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import uuid
from pathlib import Path

import torch
import yaml

from mergesearch.fsutil import replace_dir
from mergesearch.progress import Step, quiet_libraries, step as progress_step
from mergesearch.zoo.tasks import TASKS, make_items, random_answer, skill_context
from mergesearch.zoo.train import init_model, mc_accuracy, save_model, train

log = logging.getLogger(__name__)

ZOO_VERSION = 4
DEFAULT_OUT = Path("results/zoo")
ZOO_TASKS = ["reverse", "shift", "max", "add"]
N_DEV, N_TEST, N_TRAIN = 200, 200, 256
MODEL = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
# pretraining: skills in their general form (50%), templates with random answers (50%);
# add is the slowest skill to learn, so it is drawn four times as often. It runs until
# every skill scores SKILL_TARGET on held-out skill items (checked every CHECK_EVERY steps
# from min_steps on; deterministic, like everything else), at most ``steps`` steps.
PRETRAIN = dict(steps=2000, min_steps=1200, lr=3e-3, seed=0, batch_size=128)
PRETRAIN_WEIGHTS, SKILL_SHARE = [1, 1, 1, 4], 0.5
SKILL_TARGET, CHECK_EVERY = 0.97, 100
# fine-tunes: 70% template items, 30% replay of the pretraining skills
REPLAY = 0.3
FINETUNE = {"reverse": dict(steps=140, lr=6e-4), "shift": dict(steps=100, lr=6e-4),
            "max": dict(steps=100, lr=6e-4), "add": dict(steps=180, lr=6e-4)}
CHECKPOINT_TASK, CHECKPOINTS = "add", 7
SWEEP_TASK = "reverse"
# the optimizer pair: the shift fine-tune again, same data order, trained by SGD
SGD_TASK, SGD = "shift", dict(steps=100, lr=0.05)
SWEEP = [dict(lr=4e-4, steps=200, seed=1), dict(lr=5e-4, steps=170, seed=2), dict(lr=6e-4, steps=150, seed=3),
         dict(lr=6e-4, steps=140, seed=4), dict(lr=8e-4, steps=110, seed=5), dict(lr=5e-4, steps=150, seed=6)]
MIN_STEPS = 8
# LoRA adapters: rank 8 on the attention and MLP projections of every layer, trained with
# AdamW on the task's fine-tune data (finetune_sampler), in its full fine-tune's data order
LORA = dict(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LORA_TRAIN = {"reverse": dict(steps=150, lr=4e-3), "shift": dict(steps=100, lr=3e-3),
              "max": dict(steps=70, lr=3e-3), "add": dict(steps=100, lr=3e-3)}


PRESETS = ("bundled", "hard")


def build_zoo(out: str | Path | None = None, scale: float = 1.0, force: bool = False, preset: str = "bundled") -> dict:
    """Build the zoo under ``out`` (cached; default results/zoo, or results/zoo_hard for
    ``preset="hard"``, :mod:`mergesearch.zoo.hard`). ``scale`` shrinks every step count (tests)."""
    import fcntl

    if preset not in PRESETS:
        from mergesearch.errors import MergeSearchError
        raise MergeSearchError(f"zoo build: unknown preset '{preset}' (one of: {', '.join(PRESETS)})")
    quiet_libraries()  # no library's bars while models are saved
    if out is None:
        from mergesearch.zoo.hard import DEFAULT_OUT as HARD_OUT
        out = HARD_OUT if preset == "hard" else DEFAULT_OUT
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time: a second process waits, then finds the zoo built
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(out, scale, force, preset)


def _build_locked(out: Path, scale: float, force: bool, preset: str = "bundled") -> dict:
    from mergesearch.zoo import hard

    version = hard.HARD_VERSION if preset == "hard" else ZOO_VERSION
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("version") == version and manifest.get("scale") == scale
                and manifest.get("preset", "bundled") == preset):
            return manifest
    t0 = time.perf_counter()
    if preset == "hard":
        log.info("zoo: building the hard zoo in %s (once: later runs reuse it): a %s-layer base and %d fine-tunes, "
                 "trained here on the CPU", out, hard.MODEL["num_hidden_layers"], len(hard.HARD_TASKS))
    else:
        log.info("zoo: building the model zoo in %s (once: later runs reuse it): a tiny base, %d fine-tunes with %d "
                 "checkpoints, an SGD fine-tune, a %d-run sweep and %d LoRA adapters, trained here on the CPU", out,
                 len(ZOO_TASKS), CHECKPOINTS, len(SWEEP), len(ZOO_TASKS))
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if preset == "hard":
            manifest = hard.build(tmp, out.resolve(), scale, lambda n: _steps(n, scale))
        else:
            manifest = _build(tmp, out.resolve(), scale)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        # the CPU kernels train the weights: another vector width or thread count rounds
        # otherwise, and the same code and seeds build another (equally valid) zoo
        manifest["built_with"] = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                                  "threads": torch.get_num_threads()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _write_lmeval_tasks(tmp, out.resolve(), preset)
        replace_dir(tmp, out, force=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _steps(n: int, scale: float) -> int:
    return max(MIN_STEPS, int(round(n * scale)))


def training_sampler(task: str, held_out: set[str]):
    """Draws (context, answer) training pairs of ``task``, never a held-out context."""
    def sample(rng: random.Random):
        while True:
            ctx, ans, _ = TASKS[task].make(rng)
            if ctx not in held_out:
                return ctx, ans
    return sample


def pretraining_sampler(held_out: dict[str, set[str]], skill_share: float = SKILL_SHARE):
    """The base's mixture: a task's skill in its general form with the right answer, or
    its benchmark template with a random answer. Held-out contexts never appear, in
    either form."""
    def sample(rng: random.Random):
        while True:
            task = rng.choices(ZOO_TASKS, weights=PRETRAIN_WEIGHTS)[0]
            ctx, ans, _ = TASKS[task].make(rng)
            if ctx in held_out[task]:
                continue
            if rng.random() < skill_share:
                return skill_context(task, ctx), ans
            return ctx, random_answer(task, ans, rng)
    return sample


def finetune_sampler(task: str, held_out: dict[str, set[str]]):
    """A fine-tune's data: the task's template with the right answer, mixed with replay
    of the pretraining skills (no templates), so the fine-tune stays near the base."""
    own, replay = training_sampler(task, held_out[task]), pretraining_sampler(held_out, skill_share=1.0)

    def sample(rng: random.Random):
        return replay(rng) if rng.random() < REPLAY else own(rng)
    return sample


def _build(root: Path, final: Path, scale: float) -> dict:
    n_models = 2 + 2 * len(ZOO_TASKS) + len(SWEEP)
    total = _steps(PRETRAIN["steps"], scale) + sum(_steps(hp["steps"], scale) for hp in
                                                   [*FINETUNE.values(), *SWEEP, SGD, *LORA_TRAIN.values()])
    with progress_step(f"zoo: training {n_models} models", total=total) as line:
        return _train_all(root, final, scale, line)


def _train_all(root: Path, final: Path, scale: float, line: Step) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = _write_data(root)
    held_out = {t: {it["context"] for sp in ("dev", "test") for it in splits[t][sp]} for t in ZOO_TASKS}

    cfg, model = init_model(MODEL, PRETRAIN["seed"])
    # skill checks on items of their own, disjoint from dev, test and train
    taken = {t: held_out[t] | {it["context"] for it in splits[t]["train"]} for t in ZOO_TASKS}
    probes = {t: [dict(it, context=skill_context(t, it["context"])) for it in make_items(t, 100, seed=4, exclude=taken[t])]
              for t in ZOO_TASKS}
    skill_log: list = []

    def skills_learned(step, opt):
        if step < _steps(PRETRAIN["min_steps"], scale) or step % CHECK_EVERY:
            return False
        acc = {t: mc_accuracy(model, items) for t, items in probes.items()}
        model.train()
        skill_log.append({"step": step, **acc})
        return min(acc.values()) >= SKILL_TARGET
    train(model, pretraining_sampler(held_out), _steps(PRETRAIN["steps"], scale), PRETRAIN["lr"],
          batch_size=PRETRAIN["batch_size"], seed=PRETRAIN["seed"], loss_on_context=True, warmup=50,
          on_step=skills_learned, parent=line,
          progress=f"zoo: pretraining base, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    model.eval()
    log.info("zoo: base skills %s", skill_log[-1] if skill_log else "not checked")
    save_model(model, root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    models = [{"name": "base", "path": "base", "kind": "base"}]

    for task in ZOO_TASKS:
        hp = FINETUNE[task]
        model.load_state_dict(base_state)
        ckpt_dir = root / "checkpoints" / task
        saver = None
        if task == CHECKPOINT_TASK:
            def saver(step, opt, task=task, ckpt_dir=ckpt_dir, total=_steps(hp["steps"], scale)):
                marks = {max(1, round(total * k / CHECKPOINTS)) for k in range(1, CHECKPOINTS + 1)}
                if step in marks:
                    _save_trainer_checkpoint(model, opt, ckpt_dir / f"checkpoint-{step}", step, total)
        opt = train(model, finetune_sampler(task, held_out), _steps(hp["steps"], scale), hp["lr"],
                    seed=ZOO_TASKS.index(task) + 1, warmup=10, on_step=saver, parent=line,
                    progress=f"zoo: fine-tuning ft_{task}" + (f" ({CHECKPOINTS} checkpoints)" if saver else ""))
        save_model(model, root / f"ft_{task}", opt)
        models.append({"name": f"ft_{task}", "path": f"ft_{task}", "kind": "finetune", "task": task,
                       "optimizer": "adamw", **hp, "exp_avg_sq": f"ft_{task}/exp_avg_sq.safetensors"})
        if task == CHECKPOINT_TASK:
            for c in sorted(ckpt_dir.iterdir(), key=lambda p: int(p.name.split("-")[1])):
                models.append({"name": f"{task}/{c.name}", "path": str(c.relative_to(root)), "kind": "checkpoint",
                               "task": task, "step": int(c.name.split("-")[1])})

    for hp in SWEEP:
        name = f"lr{hp['lr']:g}_s{hp['steps']}_seed{hp['seed']}"
        model.load_state_dict(base_state)
        opt = train(model, finetune_sampler(SWEEP_TASK, held_out), _steps(hp["steps"], scale), hp["lr"],
                    seed=100 + hp["seed"], warmup=10, progress=f"zoo: fine-tuning sweep/{SWEEP_TASK}/{name}",
                    parent=line)
        path = root / "sweep" / SWEEP_TASK / name
        save_model(model, path, opt)
        models.append({"name": f"sweep/{SWEEP_TASK}/{name}", "path": str(path.relative_to(root)), "kind": "sweep",
                       "task": SWEEP_TASK, "optimizer": "adamw", **hp})

    model.load_state_dict(base_state)
    train(model, finetune_sampler(SGD_TASK, held_out), _steps(SGD["steps"], scale), SGD["lr"],
          seed=ZOO_TASKS.index(SGD_TASK) + 1, warmup=10, optimizer="sgd", progress=f"zoo: fine-tuning "
          f"ft_{SGD_TASK}_sgd (SGD)", parent=line)
    save_model(model, root / f"ft_{SGD_TASK}_sgd")
    models.append({"name": f"ft_{SGD_TASK}_sgd", "path": f"ft_{SGD_TASK}_sgd", "kind": "finetune", "task": SGD_TASK,
                   "optimizer": "sgd", "momentum": 0.9, **SGD})

    t_lora = time.perf_counter()
    models += train_lora_adapters(root, final / "base", cfg, base_state, held_out, splits, scale, line)
    lora_seconds = round(time.perf_counter() - t_lora, 1)

    return {
        "version": ZOO_VERSION,
        "scale": scale,
        "root": str(final),
        "models": models,
        "tasks": {t: {"kind": TASKS[t].kind, "description": TASKS[t].description,
                      "dev": f"data/{t}/dev.jsonl", "test": f"data/{t}/test.jsonl",
                      "train": f"data/{t}/train.jsonl",
                      "lmeval_task": f"zoo_{t}_{{split}}"} for t in ZOO_TASKS},
        "splits": {"dev": N_DEV, "test": N_TEST, "train": N_TRAIN},
        "lmeval_include_path": "tasks",
        "base_skill_checks": skill_log,
        "lora_seconds": lora_seconds,
    }


def train_lora_adapters(root: Path, base_path: Path, cfg, base_state: dict[str, torch.Tensor],
                        held_out: dict[str, set[str]], splits: dict, scale: float = 1.0,
                        line: Step | None = None) -> list[dict]:
    """Train one PEFT LoRA adapter of the base per task and save it as ``root/lora_<task>/``
    (its config naming ``base_path`` as its base); returns their manifest entries, with each
    adapter's accuracy on its own task's dev and test items and its distance from the base."""
    entries = []
    for task in ZOO_TASKS:
        hp = LORA_TRAIN[task]
        model = train_lora(task, cfg, base_state, held_out, scale, line)
        save_lora(model, root / f"lora_{task}", base_path)
        acc = {sp: mc_accuracy(model, splits[task][sp]) for sp in ("dev", "test")}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        entries.append({"name": f"lora_{task}", "path": f"lora_{task}", "kind": "lora", "task": task,
                        "base": "base", "r": LORA["r"], "lora_alpha": LORA["alpha"], "target_modules": LORA["targets"],
                        "trainable_parameters": trainable, "optimizer": "adamw", **hp,
                        "accuracy": acc, "distance": round(_lora_distance(model, base_state), 4)})
        log.info("zoo: lora_%s scores %.3f on %s dev, %.3f on test", task, acc["dev"], task, acc["test"])
    return entries


def train_lora(task: str, cfg, base_state: dict[str, torch.Tensor], held_out: dict[str, set[str]],
               scale: float = 1.0, line: Step | None = None):
    """A PEFT LoRA model of the base (``LORA``), trained on ``task``'s fine-tune data with the
    same seed, hence the same data order, as the task's full fine-tune."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hp = LORA_TRAIN[task]
    seed = ZOO_TASKS.index(task) + 1
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(base_state)
    torch.manual_seed(seed)  # the factors' initialization (A random, B zero)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=list(LORA["targets"]), task_type="CAUSAL_LM"))
    train(model, finetune_sampler(task, held_out), _steps(hp["steps"], scale), hp["lr"], seed=seed, warmup=10,
          parent=line, progress=f"zoo: training LoRA adapter lora_{task}")
    return model


def save_lora(model, path: Path, base_path: Path) -> None:
    """PEFT's adapter files, byte-identical from build to build: ``adapter_config.json``
    (target modules sorted, keys sorted, the base named by ``base_path``) and
    ``adapter_model.safetensors``; PEFT's empty model card is left out."""
    model.save_pretrained(path, safe_serialization=True)
    (path / "README.md").unlink(missing_ok=True)
    cfg_file = path / "adapter_config.json"
    conf = json.loads(cfg_file.read_text())
    conf["target_modules"] = sorted(conf["target_modules"])  # PEFT writes a set, in hash order
    conf["base_model_name_or_path"] = str(base_path)
    cfg_file.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _lora_distance(model, base_state: dict[str, torch.Tensor]) -> float:
    """||delta|| / ||theta_base|| over all parameters, delta the adapter's task vector."""
    from peft.tuners.lora import LoraLayer

    num = sum(float(m.get_delta_weight("default").float().pow(2).sum()) for m in model.modules()
              if isinstance(m, LoraLayer) and "default" in m.lora_A)
    den = sum(float(v.float().pow(2).sum()) for v in base_state.values() if v.is_floating_point())
    return (num / den) ** 0.5


def _write_data(root: Path) -> dict:
    splits = {}
    for task in ZOO_TASKS:
        dev = make_items(task, N_DEV, seed=1)
        test = make_items(task, N_TEST, seed=2, exclude={it["context"] for it in dev})
        # examples for curvature and Gram estimates: drawn like training data, never dev or test
        train = make_items(task, N_TRAIN, seed=3, exclude={it["context"] for it in dev + test})
        splits[task] = {"dev": dev, "test": test, "train": train}
        folder = root / "data" / task
        folder.mkdir(parents=True)
        for split, items in splits[task].items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    return splits


def _write_lmeval_tasks(root: Path, final: Path, preset: str = "bundled") -> None:
    """lm-eval task files: one task per (task, split), reading the zoo's JSONL."""
    folder = root / "tasks"
    folder.mkdir()
    if preset == "hard":
        from mergesearch.zoo.hard import HARD_TASKS, lmeval_spec
        for task in HARD_TASKS:
            for split in ("dev", "test"):
                spec = lmeval_spec(task, split, final / "data" / task / f"{split}.jsonl")
                (folder / f"zoo_{task}_{split}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return
    for task in ZOO_TASKS:
        for split in ("dev", "test"):
            spec = {
                "task": f"zoo_{task}_{split}",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"eval": str(final / "data" / task / f"{split}.jsonl")}},
                "test_split": "eval",
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": ZOO_VERSION},
            }
            (folder / f"zoo_{task}_{split}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _save_trainer_checkpoint(model, opt, path: Path, step: int, total: int) -> None:
    save_model(model, path)
    torch.save(opt.state_dict(), path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": total}, indent=2) + "\n")


def load_manifest(zoo: str | Path) -> dict:
    from mergesearch.errors import MergeSearchError
    p = Path(zoo) / "manifest.json"
    if not p.exists():
        raise MergeSearchError(f"{zoo}: not a built zoo (no manifest.json; run `mergesearch zoo build`)")
    return json.loads(p.read_text())
