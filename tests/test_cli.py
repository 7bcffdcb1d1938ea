"""One command line for every command: --help, one-line errors, and every documented command parses."""
import errno
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from helpers import cfg_with, one_error_line
from hrdecoder_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ["train", "evaluate", "predict", "convert", "benchmark", "export", "tools.write_layout",
            "tools.window_seams", "experiments.tiny_lesion_study"]


def command_module(name):
    return importlib.import_module(f"hrdecoder_jax.{name}")


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_the_flags(name, capsys):
    module = command_module(name)
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"python -m hrdecoder_jax.{name}") and "--verbose" in out
    flags_of = {line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  --")}
    assert len(flags_of) >= 2


def documented_commands(prefixes=("python -m hrdecoder_jax",)):
    """Every command starting with one of ``prefixes`` in the code blocks of the README and docs/, with line
    continuations joined and the placeholders made concrete: ``[--x a|b]`` -> ``--x a``, ``a|b`` -> ``a``,
    ``...`` dropped."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        in_block, lines = False, []
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if line.strip().startswith("```"):
                in_block = not in_block
            elif in_block:
                lines.append(line.strip())
        for line in lines:
            if line.startswith(prefixes):
                line = line.split("  #")[0]
                line = re.sub(r"\[([^\]]*)\]", r"\1", line)          # optional parts: check them too
                line = re.sub(r"(\S+?)\|\S+", r"\1", line)           # alternatives: the first
                line = line.replace("...", "").strip()
                found.append((doc.name, line))
    return found


def launch_commands():
    return documented_commands(("python launch/", "bash launch/", "sbatch ", "launch/"))


TRAIN_WRAPPER = 'hrdecoder_jax.train --config "$config" --workdir "$workdir" "$@"'   # launch/*.sh, *.sbatch


def test_the_docs_show_commands():
    names = {shlex.split(c)[2] for _, c in documented_commands()}
    assert {"hrdecoder_jax.train", "hrdecoder_jax.evaluate", "hrdecoder_jax.predict", "hrdecoder_jax.convert",
            "hrdecoder_jax.benchmark"} <= names


@pytest.mark.parametrize("where,command", documented_commands())
def test_documented_command_parses(where, command, monkeypatch):
    """A documented flag that does not exist (or a config file or field that does not) fails here."""
    monkeypatch.chdir(REPO)
    args = shlex.split(command)
    name = args[2][len("hrdecoder_jax."):]
    module = command_module(name)
    fv = cli.parse(name, module.define_flags, args[3:], config=getattr(module, "USES_CONFIG", True))
    assert fv is not None, (where, command)


def test_the_docs_show_launch_commands():
    scripts = {a for _, c in launch_commands() for a in shlex.split(c) if a.startswith("launch/")}
    assert {"launch/reference/same_training.py", "launch/local_multiprocess.py", "launch/slurm.sbatch"} <= scripts


@pytest.mark.parametrize("where,command", launch_commands())
def test_documented_launch_command_parses(where, command, monkeypatch):
    """The ``launch/`` commands of the README and docs/: the script exists and its own argument parser
    (``build_parser``) takes the documented arguments; the training arguments a launcher passes on are
    parsed with train's flags; a shell script must at least be valid shell."""
    import importlib.util
    import subprocess
    monkeypatch.chdir(REPO)
    args = shlex.split(command)
    if args[0] == "sbatch":                    # sbatch [its options] SCRIPT args
        first = next(i for i, a in enumerate(args) if i > 0 and not a.startswith("-"))
        args = ["bash", *args[first:]]
    elif args[0].startswith("launch/"):        # an executable script run directly
        args = ["bash", *args]
    script = REPO / args[1]
    assert script.is_file(), (where, command)
    if args[0] == "bash":
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, (where, command)
        if TRAIN_WRAPPER in script.read_text():      # CONFIG WORKDIR [train flags]
            from hrdecoder_jax import train
            config, workdir, *rest = args[2:]
            assert cli.parse("train", train.define_flags, [f"--config={config}", f"--workdir={workdir}", *rest])
        return
    spec = importlib.util.spec_from_file_location(f"launch_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parsed = module.build_parser().parse_args(args[2:])
    train_args = [a for a in getattr(parsed, "train_args", None) or [] if a != "--"]
    if train_args:
        from hrdecoder_jax import train
        assert cli.parse("train", train.define_flags, train_args) is not None, (where, command)


def test_flag_spellings_with_dashes_and_underscores_are_one_flag():
    from hrdecoder_jax import convert
    a = cli.parse("convert", convert.define_flags, ["--config=configs/tiny.py", "--torch-checkpoint=x.pth",
                                                     "--workdir=w"])
    b = cli.parse("convert", convert.define_flags, ["--config=configs/tiny.py", "--torch_checkpoint=x.pth",
                                                     "--workdir=w"])
    assert a.torch_checkpoint == b.torch_checkpoint == "x.pth"


@pytest.mark.parametrize("args,expect", [
    (["--config=configs/tiny.py", "--workdir=w", "--config.totl_steps=5"], "totl_steps"),
    (["--config=configs/tiny.py", "--workdir=w", "--bogus"], "bogus"),
    (["--config=configs/no_such.py", "--workdir=w"], "no_such.py"),
    (["--workdir=w"], "--config"),
    (["--config=configs/tiny.py", "--workdir=w", "--checkpoint=newest"], "--checkpoint"),
])
def test_bad_flags_end_in_one_line(args, expect, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import evaluate
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


def test_no_module_imports_an_entry_point():
    """Only experiments/ (which drives whole runs) may import train, evaluate, predict, benchmark or export."""
    entry = re.compile(r"(from hrdecoder_jax(\.| import )(train|evaluate|predict|benchmark|export)\b|"
                       r"import hrdecoder_jax\.(train|evaluate|predict|benchmark|export)\b)")
    offenders = []
    for path in (REPO / "hrdecoder_jax").rglob("*.py"):
        if "experiments" in path.parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if entry.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


# The package's floors, ground first: a module imports modules of its own floor or below, never above, and
# no import circle (at any floor). A name stands for the module and everything under it; the longest match
# wins (``models.resize`` is ground, the rest of ``models`` a building block).
FLOORS = [
    ("ground", ["", "errors", "runtime", "losses", "serving", "ops"]),
    ("config and files", ["config_utils", "workdir", "weights", "ops.library", "ops.batch_norm", "ops.conv",
                          "ops.fence", "ops.resize", "models.resize"]),
    ("building blocks", ["data", "models", "metrics", "optim", "train_step"]),
    ("services", ["inference", "checkpoint", "evaluation", "deploy", "reports"]),
    ("command line", ["cli"]),
    ("commands", ["train", "evaluate", "predict", "convert", "export", "benchmark", "tools"]),
    ("experiments", ["experiments"]),
]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file, lazy imports included), from the source."""
    import ast
    root = REPO / "hrdecoder_jax"
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _floor(module: str) -> int:
    rel = module.removeprefix("hrdecoder_jax").removeprefix(".")
    best, floor = -1, None
    for i, (_, names) in enumerate(FLOORS):
        for n in names:
            if (rel == n or rel.startswith(n + ".") or n == "") and len(n) > best:
                best, floor = len(n), i
    return floor


def test_no_import_runs_back_up_a_floor():
    graph = _import_graph()
    unplaced = sorted(m for m in graph if _floor(m) is None)
    assert unplaced == [], "give these modules a floor in FLOORS"
    upward = [f"{m} ({FLOORS[_floor(m)][0]}) -> {t} ({FLOORS[_floor(t)][0]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if _floor(t) > _floor(m)]
    assert upward == []


def test_no_import_circles():
    graph = _import_graph()
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_errors_of_a_command_run_as_main_are_expected_ones(fixtures_dir, tmp_path):
    """``python -m hrdecoder_jax.convert`` runs the module as ``__main__``; its errors must still be the
    package's own classes (a ``__main__`` copy of ``WeightImportError`` would be 'unexpected')."""
    sd = dict(np.load(fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz"))
    sd["decode_head.conv_seg.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    np.savez(tmp_path / "shape.npz", **sd)
    result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.convert", "--config=configs/tiny.py",
                             f"--torch-checkpoint={tmp_path / 'shape.npz'}", f"--workdir={tmp_path / 'w'}"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert "shape mismatch for decode_head.conv_seg.weight" in errors[0] and "unexpected" not in errors[0]
    assert "Traceback" not in result.stderr


def test_config_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import train
    base = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}"]
    assert train.main(base + ["--config.totl_steps=5"]) == 2
    assert "no config field totl_steps; Did you mean \"total_steps\"" in one_error_line(capsys)
    assert train.main(base + ["--config.data.crop_size=(256,)"]) == 1
    assert "data.crop_size=(256,) must be two positive numbers" in one_error_line(capsys)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_oserror_lines_name_the_cause():
    from hrdecoder_jax import cli
    assert cli.describe(OSError(errno.ENOSPC, "No space left on device", "/ckpt/4")) == \
        "disk full (no space left on device): /ckpt/4"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert cli.describe(wrapped).startswith("disk full")
    assert "unexpected" in cli.describe(ZeroDivisionError("x"))


@pytest.mark.parametrize("text,where", [
    ("def get_config(:\n    pass\n", ":1: SyntaxError: invalid syntax"),
    ("from hrdecoder_jax import config_utils\n\n\ndef get_config():\n    c = config_utils.base_config()\n"
     "    c.seed = undefined_name\n    return c\n", ":6: NameError: name 'undefined_name' is not defined"),
], ids=["syntax", "name"])
def test_a_broken_config_file_is_one_line_naming_the_file_and_line(text, where, tmp_path, capsys):
    from hrdecoder_jax import train
    path = tmp_path / "broken.py"
    path.write_text(text)
    assert train.main([f"--config={path}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}{where}"), err


def test_a_missing_cuda_backend_is_named(fixtures_dir, tmp_path):
    import importlib.util
    if any(importlib.util.find_spec(n) for n in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        pytest.skip("JAX's CUDA plugin is installed here: JAX_PLATFORMS=cuda may well work")
    result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.convert", "--config=configs/tiny.py",
                             f"--torch_checkpoint={fixtures_dir / 'tiny_w18_256_hr128_seed0_state_dict.npz'}",
                             f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cuda"))
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1, result.stderr[-2000:]
    assert err[0].startswith("error: JAX_PLATFORMS=cuda but CUDA is not available: JAX's CUDA plugin is not "
                             "installed") and "unset JAX_PLATFORMS" in err[0]


def test_commands_print_no_tensorflow_banner_and_convert_imports_no_tensorflow(fixtures_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.evaluate", "--config=configs/tiny.py",
                             f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no Orbax checkpoint found (looked for {tmp_path / 'nothing' / 'checkpoints'}, "
        f"{tmp_path / 'nothing'}, {tmp_path / 'nothing' / 'best'}); train first or run `python -m hrdecoder_jax.convert`"]
    script = ("import sys\nfrom hrdecoder_jax import convert\n"
              f"status = convert.main(['--config=configs/tiny.py', '--torch_checkpoint="
              f"{fixtures_dir / 'tiny_w18_256_hr128_seed0_state_dict.npz'}', '--workdir={tmp_path / 'w'}'])\n"
              "print('status', status, 'tensorflow imported:', 'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert "status 0 tensorflow imported: False" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("command,extra,expect", [
    ("evaluate", ["--config.eval.max_images=0"], "error: eval.max_images=0 must be >= 1"),
    ("train", ["--config.data.val_count=100"], "error: data.val_count=100 holds out too many of the training "
                                               "split's 7 images"),
    ("train", ["--config.data.val_count=-1"], "error: data.val_count=-1 must be a number of images >= 0"),
    ("train", ["--config.data.val_fraction=1.5"], "error: data.val_fraction=1.5 must be in [0, 1)"),
], ids=["max_images", "val_count", "val_count_negative", "val_fraction"])
def test_bad_settings_name_the_field(trained, tmp_path, capsys, command, extra, expect):
    import importlib
    root, _ = trained
    module = importlib.import_module(f"hrdecoder_jax.{command}")
    assert module.main([f"--config={cfg_with(tmp_path, root)}", f"--workdir={tmp_path / 'w'}", *extra]) == 1
    line = one_error_line(capsys)
    assert line.startswith(expect) and "unexpected" not in line, line


def test_a_config_without_a_data_section_is_named(tmp_path, capsys):
    from hrdecoder_jax import evaluate, train
    path = tmp_path / "nodata.py"
    path.write_text("from hrdecoder_jax import config_utils\n\n\ndef get_config():\n    return config_utils.base_config()\n")
    for module in (train, evaluate):
        assert module.main([f"--config={path}", f"--workdir={tmp_path / 'w'}"]) == 1
        line = one_error_line(capsys)
        assert line.startswith("error: the config has no 'data' section: set config.data") and "unexpected" not in line
