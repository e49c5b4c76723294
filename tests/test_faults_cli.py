"""Bad input to the `smartkv` command: exit status 2 and one line naming the flag, its value and
the valid range, before any model is loaded; internal errors (exit 1, --debug for the
traceback) and Ctrl-C (exit 130); the same checks in the library's public functions; results
that say when their budget had no effect (smartkv_cli/errors.py, smartkv_cli/validate.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eval.result_store import ResultStore
from eval.sweep import run_sweep
from eval.sweep_settings import PerplexitySettings, SweepSettings
from smartkv_cli import eval as E
from smartkv_cli import main as M
from smartkv_jax.errors import SmartKVError
from smartkv_jax.generate import generate
from smartkv_jax.policy import RecentPolicy, WindowPolicy
from smartkv_jax.policy_table import PolicyConfig, budget_effective, make_policy
from train.policy_names import parse_policy

from .test_eval_needle import CFG, CharTokenizer, tiny_params
from .test_eval_report import write_books

# {dir}: an existing directory, {file}: an existing file, {missing}: a path that does not exist
GEN = ["generate", "--prompt", "hi"]
PARITY = ["parity", "--text-file", "{file}"]
CAL = ["calibrate", "--labels", "{dir}"]
ANALYZE = ["analyze", "--labels", "{dir}", "--gates", "{dir}"]
TRAIN = ["train-gates", "--train", "{dir}"]
PPL, NEEDLE, REPORT = ["eval", "ppl"], ["eval", "needle"], ["eval", "report", "--no-run"]

LABELS = ["labels", "--out", "{missing}"]

# (case, argv, what the one line must contain)
CASES = [
    ("labels window 1", [*LABELS, "--window", "1"], "--window must be >= 2, got 1"),
    ("labels cap 0", [*LABELS, "--cap", "0"], "--cap must be >= 1, got 0"),
    (
        "labels cap >= window",
        [*LABELS, "--window", "64", "--cap", "64"],
        "--cap must be < --window (64), got 64",
    ),
    ("labels tau 0", [*LABELS, "--taus", "0.05", "0"], "--taus must be in (0, 1), got 0.0"),
    (
        "labels windows 0",
        [*LABELS, "--windows-per-doc", "0"],
        "--windows-per-doc must be >= 1, got 0",
    ),
    ("labels facts < 0", [*LABELS, "--facts", "-1"], "--facts must be >= 0, got -1"),
    (
        "budget 0",
        [*GEN, "--policy", "window", "--budget", "0"],
        "--budget must be in (0, 1], got 0.0",
    ),
    (
        "budget < 0",
        [*GEN, "--policy", "window", "--budget", "-1"],
        "--budget must be in (0, 1], got -1.0",
    ),
    (
        "budget > 1",
        [*GEN, "--policy", "window", "--budget", "1.5"],
        "--budget must be in (0, 1], got 1.5",
    ),
    ("budget NaN", [*GEN, "--budget", "nan"], "--budget must be in (0, 1], got nan"),
    (
        "budget not a number",
        [*GEN, "--budget", "abc"],
        "argument --budget: invalid float value: 'abc'",
    ),
    ("chunk 0", [*GEN, "--chunk", "0"], "--chunk must be >= 1, got 0"),
    ("max-new-tokens 0", [*GEN, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ("top-p 0", [*GEN, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("top-p > 1", [*GEN, "--top-p", "1.01"], "--top-p must be in (0, 1], got 1.01"),
    ("temperature < 0", [*GEN, "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    ("top-k < 0", [*GEN, "--top-k", "-1"], "--top-k must be >= 0, got -1"),
    ("seed < 0", [*GEN, "--seed", "-1"], "--seed must be >= 0, got -1"),
    ("unknown policy", [*GEN, "--policy", "windw"], "unknown policy 'windw'"),
    ("missing policy table", [*GEN, "--policy", "{missing}.json"], "policy file not found"),
    ("calibrated without table", [*GEN, "--policy", "hybrid-calibrated"], "--calibrated PATH"),
    ("missing gates", [*GEN, "--gates", "{missing}"], "--gates {missing}: no such directory"),
    ("missing calibrated", [*GEN, "--calibrated", "{missing}"], "no such file or directory"),
    ("parity tokens 1", [*PARITY, "--tokens", "1"], "--tokens must be >= 2, got 1"),
    (
        "parity missing text",
        ["parity", "--text-file", "{missing}"],
        "--text-file {missing}: no such file",
    ),
    ("parity text is a dir", ["parity", "--text-file", "{dir}"], "--text-file {dir}: not a file"),
    ("calibrate budget 0", [*CAL, "--budget", "0"], "--budget must be in (0, 1], got 0.0"),
    ("calibrate budget > 1", [*CAL, "--budget", "2"], "--budget must be in (0, 1], got 2.0"),
    ("calibrate context 0", [*CAL, "--context", "0"], "--context must be >= 1, got 0"),
    ("calibrate tau 0", [*CAL, "--tau", "0"], "--tau must be in (0, 1), got 0.0"),
    ("calibrate tau 1", [*CAL, "--tau", "1"], "--tau must be in (0, 1), got 1.0"),
    ("calibrate discount < 0", [*CAL, "--discount", "-0.5"], "--discount must be >= 0, got -0.5"),
    ("discount with expiry", [*CAL, "--discount", "0.5", "--expiry"], "--discount and --expiry"),
    (
        "calibrate missing labels",
        ["calibrate", "--labels", "{missing}"],
        "--labels {missing}: no such directory",
    ),
    ("calibrate labels is a file", ["calibrate", "--labels", "{file}"], "not a directory"),
    ("calibrate out is a dir", [*CAL, "--out", "{dir}"], "--out {dir} is a directory"),
    ("calibrate out in missing dir", [*CAL, "--out", "{missing}/t.json"], "does not exist"),
    (
        "analyze depth > 1",
        [*ANALYZE, "--needle-depth", "1.5"],
        "--needle-depth must be in [0, 1], got 1.5",
    ),
    (
        "analyze context 10",
        [*ANALYZE, "--needle-context", "10"],
        "--needle-context must be >= 128, got 10",
    ),
    (
        "analyze missing gates",
        ["analyze", "--labels", "{dir}", "--gates", "{dir}", "{missing}"],
        "--gates {missing}",
    ),
    ("eval memory 0", [*PPL, "--memory", "0"], "--memory must be in (0, 1], got 0.0"),
    ("eval memory 1.5", [*PPL, "--memory", "0.5", "1.5"], "--memory must be in (0, 1], got 1.5"),
    ("eval memory 150%", [*PPL, "--memory", "150%"], "--memory must be in (0, 1], got 1.5"),
    ("eval memory text", [*PPL, "--memory", "half"], "argument --memory: not a fraction"),
    ("eval tokens 1", [*PPL, "--tokens", "1"], "--tokens must be >= 2, got 1"),
    ("eval books 0", [*PPL, "--books", "0"], "--books must be >= 1, got 0"),
    ("eval chunk 0", [*PPL, "--chunk", "0"], "--chunk must be >= 1, got 0"),
    (
        "eval chunk = tokens",
        [*PPL, "--tokens", "64", "--chunk", "64"],
        "--chunk must be < --tokens (64), got 64",
    ),
    (
        "eval chunk > tokens",
        [*REPORT, "--tokens", "64", "--chunk", "512"],
        "--chunk must be < --tokens (64), got 512",
    ),
    ("eval tau 0", [*PPL, "--tau", "0"], "--tau must be in (0, 1), got 0.0"),
    ("eval n-boot 0", [*REPORT, "--n-boot", "0"], "--n-boot must be >= 1, got 0"),
    (
        "eval missing text dir",
        [*PPL, "--text", "{missing}"],
        "--text {missing}: no such file or directory",
    ),
    ("eval missing gates", [*PPL, "--gates", "{missing}"], "--gates {missing}: no such directory"),
    ("needle contexts 10", [*NEEDLE, "--contexts", "10"], "--contexts must be >= 128, got 10"),
    (
        "needle depths 150",
        [*NEEDLE, "--depths", "0", "150"],
        "--depths must be in [0, 100], got 150.0",
    ),
    ("needle depths < 0", [*NEEDLE, "--depths", "-5"], "--depths must be in [0, 100], got -5.0"),
    ("needle chunk 0", [*NEEDLE, "--needle-chunk", "0"], "--needle-chunk must be >= 1, got 0"),
    (
        "needle max-new-tokens 0",
        [*NEEDLE, "--max-new-tokens", "0"],
        "--max-new-tokens must be >= 1, got 0",
    ),
    (
        "needle missing haystack",
        [*NEEDLE, "--haystack", "{missing}"],
        "--haystack {missing}: no such directory",
    ),
    ("train steps 0", [*TRAIN, "--steps", "0"], "--steps must be >= 1, got 0"),
    ("train batch-size 0", [*TRAIN, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("train lr < 0", [*TRAIN, "--lr", "-1"], "--lr must be > 0, got -1.0"),
    ("train lr 0", [*TRAIN, "--lr", "0"], "--lr must be > 0, got 0.0"),
    ("train lr inf", [*TRAIN, "--lr", "inf"], "--lr must be > 0, got inf"),
    ("train tau 2", [*TRAIN, "--tau", "2"], "--tau must be in (0, 1), got 2.0"),
    (
        "train weight-decay < 0",
        [*TRAIN, "--weight-decay", "-1"],
        "--weight-decay must be >= 0, got -1.0",
    ),
    ("train warmup < 0", [*TRAIN, "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    ("train huber-delta 0", [*TRAIN, "--huber-delta", "0"], "--huber-delta must be > 0, got 0.0"),
    ("train keep < 0", [*TRAIN, "--keep", "-1"], "--keep must be >= 0, got -1"),
    ("train hidden < 0", [*TRAIN, "--hidden", "-1"], "--hidden must be >= 0, got -1"),
    ("train pos-clip 0", [*TRAIN, "--pos-clip", "0"], "--pos-clip must be >= 1, got 0"),
    ("train data-shards 0", [*TRAIN, "--data-shards", "0"], "--data-shards must be >= 1, got 0"),
    (
        "train batch not a multiple",
        [*TRAIN, "--batch-size", "100"],
        "--batch-size must be a multiple of --data-shards (8), got 100",
    ),
    ("train stop-after 0", [*TRAIN, "--stop-after", "0"], "--stop-after must be >= 1, got 0"),
    ("train mesh-data 0", [*TRAIN, "--mesh-data", "0"], "--mesh-data must be >= 1, got 0"),
    (
        "train process-id too big",
        [*TRAIN, "--num-processes", "2", "--process-id", "2"],
        "--process-id must be < --num-processes (2), got 2",
    ),
    (
        "train missing store",
        ["train-gates", "--train", "{dir}", "{missing}"],
        "--train {missing}: no such directory",
    ),
    ("train out is a dir", [*TRAIN, "--out", "{dir}"], "--out {dir} is a directory"),
    ("unknown command", ["generat"], "invalid choice: 'generat'"),
    ("unknown flag", [*GEN, "--budjet", "0.5"], "unrecognized arguments: --budjet"),
]


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("some text")
    return {"dir": str(tmp_path / "dir"), "file": str(tmp_path / "file.txt"),
            "missing": str(tmp_path / "missing")}  # fmt: skip


def fill(items, paths: dict[str, str]) -> list[str]:
    return [s.format(**paths) for s in items]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: bad input must be refused before."""
    import smartkv_jax.convert as convert

    def fail(*args, **kwargs):
        pytest.fail("the model was loaded before the input was checked")

    monkeypatch.setattr(convert, "load_model", fail)
    monkeypatch.setattr(E, "load_model", fail)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = M.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.splitlines()


@pytest.mark.parametrize("case,argv,want", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, argv, want, paths, no_model, capsys):
    code, lines = run(fill(argv, paths), capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prefix(case, argv)}: error: "), lines[0]
    assert want.format(**paths) in lines[0]


def prefix(case: str, argv: list[str]) -> str:
    """The "smartkv <command>" of the error line (the top-level parser's for unknown words)."""
    if case in ("unknown command", "unknown flag"):
        return "smartkv"
    return "smartkv " + " ".join(argv[:2] if argv[0] == "eval" else argv[:1])


def test_eval_module_main_reports_the_same_way(capsys):
    assert E.main(["ppl", "--books", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "smartkv eval ppl: error: --books must be >= 1, got 0"
    ]


@pytest.fixture
def broken_calibrate(monkeypatch):
    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(M, "cmd_calibrate", boom)


def test_internal_error_exits_1_and_points_to_debug(paths, broken_calibrate, capsys, monkeypatch):
    monkeypatch.delenv("SMARTKV_DEBUG", raising=False)
    code, lines = run(fill(CAL, paths), capsys)
    assert code == 1
    assert lines == [
        "smartkv calibrate: internal error: RuntimeError: boom; second line (rerun with --debug "
        "or SMARTKV_DEBUG=1 for the traceback)"
    ]


@pytest.mark.parametrize("how", ["flag", "flag-first", "env"])
def test_debug_prints_the_traceback(how, paths, broken_calibrate, capsys, monkeypatch):
    argv = fill(CAL, paths)
    if how == "env":
        monkeypatch.setenv("SMARTKV_DEBUG", "1")
    else:
        argv = [*argv, "--debug"] if how == "flag" else ["--debug", *argv]
    code, lines = run(argv, capsys)
    assert code == 1
    assert lines[0] == "Traceback (most recent call last):"
    assert "RuntimeError: boom" in lines and lines[-1].startswith("smartkv calibrate: internal")


def test_ctrl_c_exits_130(paths, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "cmd_calibrate", interrupted)
    assert run(fill(CAL, paths), capsys) == (130, ["smartkv calibrate: interrupted"])


def test_help_exits_0(capsys):
    assert M.main(["generate", "--help"]) == 0
    assert "--budget" in capsys.readouterr().out


# ----------------------------------------------------------------------------- library


@pytest.mark.parametrize(
    "call,want",
    [
        (
            lambda: make_policy("window", 3, 1024, 0.0),
            r"memory_fraction must be in \(0, 1\], got 0",
        ),
        (lambda: make_policy("window", 3, 1024, -1.0), r"memory_fraction .* got -1"),
        (lambda: make_policy("window", 3, 1024, 1.5), r"memory_fraction .* got 1.5"),
        (lambda: make_policy("hybrid", 3, 0, 0.5), r"context must be >= 1, got 0"),
        (lambda: parse_policy("window", 3, 1024, 2.0), r"memory_fraction .* got 2.0"),
        (lambda: parse_policy("window", 3, -5, 0.5), r"context must be >= 1, got -5"),
        (lambda: parse_policy("windw", 3, 1024, 0.5), r"unknown policy 'windw'"),
        (lambda: generate(_MODEL, [[1, 2]], 0), r"max_new_tokens must be >= 1, got 0"),
        (lambda: generate(_MODEL, [[1, 2]], 4, chunk=0), r"chunk must be >= 1, got 0"),
        (lambda: generate(_MODEL, [[]], 4), r"every prompt needs at least one token"),
        (lambda: generate(_MODEL, [[1] * 10], 8), r"exceeds the model's context limit of 16"),
    ],
)
def test_library_refuses_bad_arguments(call, want):
    with pytest.raises(SmartKVError, match=want):
        call()


_MODEL = SimpleNamespace(cfg=SimpleNamespace(max_position=16))  # checked before it is used


def test_budget_effective():
    window = PolicyConfig.uniform(3, WindowPolicy(capacity=36))
    assert not budget_effective(window, 30)  # every token fits
    assert not budget_effective(window, 37)  # the last query reads 36 cached + itself
    assert budget_effective(window, 38)
    recent = PolicyConfig.uniform(3, RecentPolicy(capacity=64))
    assert not budget_effective(recent, 100, chunk=64)  # cache (64) + last chunk: all 100
    assert budget_effective(recent, 200, chunk=64)
    assert not budget_effective(PolicyConfig.uniform(3), 1000)  # the full cache


def test_sweep_refuses_a_chunk_holding_every_token(tmp_path):
    settings = SweepSettings(tasks=("ppl",), ppl=PerplexitySettings(tokens=64, chunk=64))
    with pytest.raises(SmartKVError, match="chunk must be < tokens"):
        run_sweep(tmp_path, None, None, settings, model_name="x")
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_budget_without_effect_is_noted(tmp_path, monkeypatch, capsys):
    """recent at 99% of 40 tokens keeps 39 slots: no token a query reads is ever evicted."""
    write_books(tmp_path / "books")
    model = SimpleNamespace(cfg=CFG, model=tiny_params(), tokenizer=CharTokenizer(), source="t")
    monkeypatch.setattr(E, "load_model", lambda name, dtype="float32", mesh=None: model)
    argv = ["ppl", "--out", str(tmp_path / "res"), "--text", str(tmp_path / "books"),
            "--tokens", "40", "--books", "1", "--policies", "full", "recent", "window",
            "--memory", "0.99", "0.25", "--no-progress"]  # fmt: skip
    assert E.main(argv) == 0
    lines = {line.split()[0] + " " + line.split()[1]: line for line in capsys.readouterr()
             .out.splitlines()[1:]}  # fmt: skip
    assert "budget not in effect at 40 tokens in chunks of 1" in lines["recent 99%"]
    assert "not in effect" not in lines["recent 25%"] + lines["full 100%"]
    rows = {r["key"]: r for r in ResultStore(tmp_path / "res").rows()}
    assert rows["ppl|recent|0.99"]["budget_effective"] is False
    assert rows["ppl|window|0.25"]["budget_effective"] is True
    assert rows["ppl|recent|0.99"]["ppl"] == pytest.approx(rows["ppl|full|1"]["ppl"], rel=1e-4)
