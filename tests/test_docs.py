"""The documentation stays true: every command of README.md and docs/ names flags its tool has, and the
"add a sampler" recipe of CONTRIBUTING.md works when followed on a copy of the package."""

import contextlib
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import single_thread_env, tiny_sit

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# Entry points: how a command line names them -> the module whose main(argv) parses its flags
SCRIPTS = {"sample.py": "sample", "train_sit.py": "train_sit", "eval_fid.py": "eval_fid"}
SUBCOMMANDS = {"sit_atconv.analysis": ("influence", "features")}


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(file, command line, words) of every `python ...` / `accelerate launch ...` in the bash blocks of the docs."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if line.startswith(("python ", "accelerate launch ")):
                    found.append((doc.name, line, shlex.split(line)))
    return found


def entry_point(words: list[str]) -> tuple[str, list[str]]:
    """(module of the tool, the words after it) of a command line; accelerate's own options are skipped."""
    for i, word in enumerate(words):
        if word == "-m":
            return words[i + 1], words[i + 2 :]
        if word in SCRIPTS:
            return SCRIPTS[word], words[i + 1 :]
        if word.endswith(".py") and word.startswith("benchmarks/"):
            return word, words[i + 1 :]
    raise AssertionError(f"no tool in {' '.join(words)!r}")


def help_text(module: str, argv: list[str]) -> str:
    """What `module --help` prints (in this process: the tools' parsers only, nothing runs)."""
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location("bench_" + Path(module).stem, ROOT / module)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
    else:
        package = importlib.util.find_spec(module).submodule_search_locations is not None
        tool = importlib.import_module(f"{module}.__main__" if package else module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        if inspect.signature(tool.main).parameters:
            tool.main([*argv, "--help"])
        else:  # (the benchmarks read sys.argv)
            saved, sys.argv = sys.argv, [module, *argv, "--help"]
            try:
                tool.main()
            finally:
                sys.argv = saved
    assert stop.value.code == 0
    return out.getvalue()


COMMANDS = doc_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 25 and {name for name, _, _ in COMMANDS} >= {"README.md", "sampling.md", "training.md"}


@pytest.mark.parametrize(("doc", "line", "words"), COMMANDS, ids=[f"{d}:{w[0]}" for d, _, w in COMMANDS])
def test_every_documented_command_names_flags_its_tool_has(doc, line, words):
    """A stale flag in a README or docs command fails here (`--help` of the tool lists every flag it takes)."""
    module, rest = entry_point(words)
    sub = [word for word in rest[:1] if word in SUBCOMMANDS.get(module, ())]
    text = help_text(module, sub)
    for flag in [word.split("=")[0] for word in rest if word.startswith("--")]:
        assert flag in text, f"{doc}: {flag} is not a flag of {module} in: {line}"


def test_the_add_a_sampler_recipe_works_on_a_copy(tmp_path):
    """CONTRIBUTING.md's recipe, followed literally on a copy of the package: a midpoint sampler written in
    samplers.py and added to SAMPLERS is then a choice of sample.py's --sampler and runs."""
    recipe = (ROOT / "CONTRIBUTING.md").read_text()
    assert "write `sample_x(predict, transport, x, ts, randn_like, *, option=...)`" in recipe
    assert "sit_atconv/transport/samplers.py` and add it to `SAMPLERS`" in recipe
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "sit_atconv", copy / "sit_atconv", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "sample.py", copy / "sample.py")
    samplers = copy / "sit_atconv" / "transport" / "samplers.py"
    source = samplers.read_text()
    midpoint = '''

def sample_midpoint(predict, transport, x, ts, randn_like=None):
    """Explicit midpoint steps (a test's sampler, added by following CONTRIBUTING.md)."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        half = x + 0.5 * (t_next - t) * _velocity(predict, transport, x, t)
        x = x + (t_next - t) * _velocity(predict, transport, half, 0.5 * (t + t_next))
    return x
'''
    source = source.replace("\n# name -> function.", midpoint + "\n\n# name -> function.", 1)
    entry = '    "heun": sample_heun,\n'
    source = source.replace(entry, entry + '    "midpoint": sample_midpoint,\n', 1)
    assert "sample_midpoint," in source
    samplers.write_text(source)
    tiny_sit(in_channels=3).save_pretrained(tmp_path / "model")
    command = [sys.executable, "sample.py", "--ckpt", str(tmp_path / "model"), "--sampler", "midpoint"]
    command += ["--num-steps", "3", "--num-samples", "4", "--out", str(tmp_path / "s.npz")]
    env = single_thread_env(PYTHONPATH=str(copy))
    proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = (tmp_path / "s.json").read_text()
    assert '"sampler": "midpoint"' in record and (tmp_path / "s.npz").is_file()
