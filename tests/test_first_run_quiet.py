"""A first run explains itself: the zoo build shows one progress line per model it
trains (what it does, steps, ETA) and nothing that the libraries print on their own:
no "Writing model shards" or "Loading weights" bars, no tqdm bars, no warnings, no
Ray token-authentication notice (mergesearch.progress)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from mergesearch.progress import QUIET_ENV

EXE = Path(sys.executable).parent / "mergesearch"
# what the libraries print when left alone (the control run below shows each of them)
LIBRARY_OUTPUT = ["Writing model shards", "Loading checkpoint", "Loading weights", "it/s]", "|█",
                  "Token authentication", "Traceback"]
DURATION = r"(\d+s|\d+m\d\ds|\d+h\d\dm)"


def fresh_env() -> dict:
    """The environment of a first run: none of the settings quiet_libraries() makes
    (in-process CLI runs of other tests set them in this process), not in CI, no Ray mode."""
    drop = {*QUIET_ENV, "CI", "RAY_AUTH_MODE", "MERGESEARCH_RAY_ADDRESS", "PYTHONWARNINGS"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def test_a_zoo_build_shows_one_line_per_model_and_no_library_output(tmp_path):
    out = tmp_path / "zoo"
    # one thread: on a busy 2-core machine two threads wait on each other several times longer
    p = subprocess.run([str(EXE), "zoo", "build", "--out", str(out), "--scale", "0.001"], cwd=tmp_path,
                       env={**fresh_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.fullmatch(rf"zoo at {re.escape(str(out))}: 23 models, tasks reverse, shift, max, add "
                        rf"\(built in \d+s\)\n", p.stdout), p.stdout
    for text in LIBRARY_OUTPUT:
        assert text not in p.stdout + p.stderr, text
    lines = p.stderr.splitlines()
    assert lines[0] == (f"zoo: building the model zoo in {out} (once: later runs reuse it): a tiny base, 4 "
                        "fine-tunes with 7 checkpoints, an SGD fine-tune, a 6-run sweep and 4 LoRA adapters, trained here on the CPU")
    sweep = ["lr0.0004_s200_seed1", "lr0.0005_s170_seed2", "lr0.0006_s150_seed3", "lr0.0006_s140_seed4",
             "lr0.0008_s110_seed5", "lr0.0005_s150_seed6"]
    trained = (["pretraining base, 0.47M parameters"]
               + [f"fine-tuning ft_{t}" for t in ("reverse", "shift", "max")] + ["fine-tuning ft_add (7 checkpoints)"]
               + [f"fine-tuning sweep/reverse/{s}" for s in sweep] + ["fine-tuning ft_shift_sgd (SGD)"]
               + [f"training LoRA adapter lora_{t}" for t in ("reverse", "shift", "max", "add")])
    # scale 0.001: every training runs the minimum of 8 steps
    starts = [line for line in lines if re.fullmatch(r"zoo: .* \(\d+ steps\)", line)]
    assert starts == ["zoo: training 16 models (128 steps)"] + [f"zoo: {m} (8 steps)" for m in trained]
    ends = [line for line in lines if ": done, " in line]
    assert [line.split(": done, ")[0] for line in ends] == [f"zoo: {m}" for m in trained] + ["zoo: training 16 models"]
    for line in ends:
        assert re.fullmatch(rf"zoo: .*: done, (8|128) steps in {DURATION}", line), line
    # in between: the base's skill check, each adapter's scores and, every 30 s, a line with an ETA
    rest = [line for line in lines[1:] if line not in starts and line not in ends]
    assert rest.count("zoo: base skills not checked") == 1
    scores = [line for line in rest if " scores " in line]
    assert [line.split(" scores ")[0] for line in scores] == [f"zoo: lora_{t}" for t in ("reverse", "shift", "max", "add")]
    for line in rest:
        assert line == "zoo: base skills not checked" or line in scores and re.fullmatch(
            r"zoo: lora_(\w+) scores \d\.\d{3} on \1 dev, \d\.\d{3} on test", line) or \
            re.fullmatch(rf"zoo: .*: \d+/\d+ steps, {DURATION} elapsed, about {DURATION} left", line), line
    assert len(lines) <= 60


PROBE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # as the CLI does
    if sys.argv[2] == "quiet":
        from mergesearch.progress import quiet_libraries
        quiet_libraries()
    from mergesearch.progress import step
    from mergesearch.zoo.synthetic import llama_config
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in llama_config(16, 1, 32, 64, 2, "float32").items()
           if k not in ("architectures", "torch_dtype")}
    with step("probe: saving a tiny model", total=1) as s:
        LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(sys.argv[1])
        s.advance()
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default
    enable_token_auth_by_default()  # the first thing ray.init does for a new local cluster
    logging.getLogger("mergesearch.probe").warning("probe: our own warning")
""")


def test_quiet_libraries_silences_bars_warnings_and_the_ray_token_notice(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)

    def probe(mode: str) -> str:
        p = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / mode), mode], cwd=tmp_path,
                           env=fresh_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout + p.stderr

    loud = probe("loud")  # the control: what a first run showed before
    for text in ["Writing model shards", "Loading weights", "it/s]", "|█",
                 "Token authentication is enabled for this Ray cluster"]:
        assert text in loud, text
    quiet = probe("quiet")
    assert quiet.splitlines() == ["probe: saving a tiny model (1 steps)",
                                  re.search(r"probe: saving a tiny model: done, 1 steps in \d+s", quiet).group(0),
                                  "probe: our own warning"]


LIVE = textwrap.dedent("""
    import logging, time
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mergesearch.progress import step
    with step("outer", total=20) as outer:
        for k in range(2):
            with step(f"inner {k}", total=10, parent=outer) as s:
                for i in range(10):
                    time.sleep(0.03)
                    s.advance()
                    if i == 5:
                        logging.getLogger("mergesearch.x").info("a log line meanwhile")
""")


def test_on_a_terminal_steps_are_live_lines_and_log_lines_print_above_them(tmp_path):
    import pty

    main, child = pty.openpty()
    env = {**fresh_env(), "COLUMNS": "100", "TERM": "xterm"}
    p = subprocess.Popen([sys.executable, "-c", LIVE], stdout=child, stderr=child, env=env)
    os.close(child)
    raw = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        raw += chunk
    assert p.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode())
    assert re.search(r"inner 0 +━+ +\d+/10 steps +0:00:0\d ETA", text)  # a live line: bar, count, elapsed, ETA
    assert re.search(r"outer +━+ +\d+/20 steps", text)  # the outer step: a line of its own meanwhile
    # our log lines, in order, printed above the live lines (which are erased when each step ends)
    ours = re.findall(r"a log line meanwhile|inner \d: done, 10 steps in \ds|outer: done, 20 steps in \ds", text)
    assert [re.sub(r"in \ds", "in Ns", line) for line in ours] == [
        "a log line meanwhile", "inner 0: done, 10 steps in Ns", "a log line meanwhile",
        "inner 1: done, 10 steps in Ns", "outer: done, 20 steps in Ns"]
    assert raw.decode().rstrip().endswith("outer: done, 20 steps in " + ours[-1][-2:])  # nothing drawn after
