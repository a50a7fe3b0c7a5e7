"""``bct-fast compat`` on embedding files: two models (cross-test + verdict), three models (AC/AM),
memory-mapped galleries, errors that name the option, and the demo's saved embeddings."""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from bct_fast import cli
from bct_fast.evaluate import cross_test


def clustered(n_per, classes, d, seed, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + noise * torch.randn(len(labels), d, generator=g), labels


def write(tmp_path, name, t):
    p = tmp_path / name
    np.save(p, t.numpy() if isinstance(t, torch.Tensor) else t)
    return str(p)


def test_two_models_match_cross_test(tmp_path, capsys):
    old, labels = clustered(6, 10, 16, 0)
    new = old + 0.05 * torch.randn_like(old)  # a compatible "new" model
    args = ["compat", "--model", f"old={write(tmp_path, 'o.npy', old)}", "--model", f"new={write(tmp_path, 'n.npy', new)}",
            "--query-labels", write(tmp_path, "l.npy", labels), "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(args) == 0
    doc = json.loads((tmp_path / "out" / "compat.json").read_text())
    ref = cross_test(old, new, labels)
    assert doc["cross_test"]["new_old"] == pytest.approx(ref.new_old)
    assert doc["cross_test"]["compatible"] == ref.compatible
    assert (tmp_path / "out" / "compat.png").stat().st_size > 1000
    assert "compatible (M(new,old) > M(old,old)" in capsys.readouterr().out


def test_three_models_with_memmapped_galleries(tmp_path):
    q0, ql = clustered(3, 8, 12, 1)
    g0, gl = clustered(20, 8, 12, 1)
    specs = []
    for i, name in enumerate(("v1", "v2", "v3")):
        rot = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(i)))[0] if i == 2 else torch.eye(12)
        specs += ["--model", f"{name}={write(tmp_path, f'q{i}.npy', q0 @ rot)},{write(tmp_path, f'g{i}.npy', g0 @ rot)}"]
    args = ["compat", *specs, "--query-labels", write(tmp_path, "ql.npy", ql), "--gallery-labels",
            write(tmp_path, "gl.npy", gl), "--out", str(tmp_path / "out"), "--no-progress", "--no-plot"]
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "out" / "compat.json").read_text())["matrix"]
    assert m["names"] == ["v1", "v2", "v3"]
    assert m["values"][0][1] is None and m["values"][1][0] == pytest.approx(m["values"][0][0])
    assert m["values"][2][0] < 0.5 < m["values"][2][2]  # a rotated model is incompatible with v1
    assert m["AC"] == 0.0  # v2 = v1 ties (not >), v3 is incompatible with both


@pytest.mark.parametrize("extra,needle", [
    (["--model", "old=MISSING.npy"], "file not found"),
    (["--model", "oops"], "NAME=QUERIES"),
    (["--k", "x"], "--k"),
])
def test_errors_name_the_option(tmp_path, capsys, extra, needle):
    old, labels = clustered(2, 3, 4, 0)
    base = ["compat", "--model", f"a={write(tmp_path, 'a.npy', old)}", "--query-labels",
            write(tmp_path, "l.npy", labels), "--out", str(tmp_path / "o"), "--no-plot", "--no-progress"]
    if extra[0] == "--model":
        base += extra
    else:
        base += ["--model", f"b={write(tmp_path, 'b.npy', old)}"] + extra
    assert cli.main(base) == 2
    assert needle in capsys.readouterr().err


def test_a_model_with_the_wrong_row_count(tmp_path, capsys):
    old, labels = clustered(2, 3, 4, 0)
    args = ["compat", "--model", f"a={write(tmp_path, 'a.npy', old)}", "--model", f"b={write(tmp_path, 'b.npy', old[:-1])}",
            "--query-labels", write(tmp_path, "l.npy", labels), "--no-plot", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "--model b (queries)" in capsys.readouterr().err


def test_compat_reproduces_the_demo_from_its_saved_embeddings(tmp_path):
    """The demo saves every model's embeddings and prints a `bct-fast compat` command per
    evaluation set; running that command as printed gives the demo's own cross-test numbers."""
    pytest.importorskip("matplotlib")  # the glyphs are rendered from matplotlib's fonts
    from bct_fast.demo import EXAMPLE_METHOD, format_table, quick_config, run_demo

    results = run_demo(quick_config("glyphs"), out_dir=tmp_path / "demo", progress=False)  # ~20 s
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    commands = saved["compat_commands"]
    assert set(commands) == {"open_set", "closed_set"}
    assert "--gallery-labels" in commands["open_set"]  # glyphs: queries and gallery from different fonts
    assert commands["open_set"] in format_table(results)  # printed at the end of the demo
    for set_name, cmd in commands.items():
        argv = shlex.split(cmd)
        assert argv[:2] == ["bct-fast", "compat"]
        assert cli.main(argv[1:] + ["--no-progress", "--no-plot"]) == 0
        out = Path(argv[argv.index("--out") + 1])
        assert out.parent == tmp_path / "demo"  # beside the demo's results, not in the working folder
        got = json.loads((out / "compat.json").read_text())["cross_test"]
        want = saved[set_name]["methods"][EXAMPLE_METHOD]
        assert got["old_old"] == saved[set_name]["old/old"]
        assert got["new_new"] == want["new/new"]
        assert got["new_old"] == want["new/old"]
        assert got["compatible"] == want["compatible"]


@pytest.mark.parametrize("models,extra,needle", [
    (["a=Q"], [], "at least two models"),
    (["a=Q", "a=Q"], [], "model names must be unique"),
    (["a=Q,G", "b=Q"], ["--gallery-labels", "GL"], "a gallery for every model or for none"),
    (["a=Q,G", "b=Q,G"], [], "--gallery-labels: required"),
    (["a=Q", "b=Q"], ["--gallery-labels", "GL"], "--gallery-labels: given, but no model has a gallery"),
    (["a=Q", "b=Q"], ["--query-labels", "FL"], "--query-labels: expected a 1-D integer array"),
    (["a=Q,BADG", "b=Q,G"], ["--gallery-labels", "GL"], "--model a (gallery): expected [5, 4]"),
])
def test_argument_combinations_are_named(tmp_path, capsys, models, extra, needle):
    q, ql = clustered(2, 3, 4, 0)
    files = {"Q": write(tmp_path, "q.npy", q), "G": write(tmp_path, "g.npy", q[:5]),
             "BADG": write(tmp_path, "bg.npy", q[:4]), "GL": write(tmp_path, "gl.npy", ql[:5]),
             "FL": write(tmp_path, "fl.npy", ql.double()), "QL": write(tmp_path, "ql.npy", ql)}
    args = ["compat", "--out", str(tmp_path / "o"), "--no-plot", "--no-progress"]
    for m in models:
        name, spec = m.split("=")
        args += ["--model", f"{name}=" + ",".join(files[p] for p in spec.split(","))]
    opts = {"--query-labels": "QL", **dict(zip(extra[::2], extra[1::2]))}
    for opt, key in opts.items():
        args += [opt, files[key]]
    assert cli.main(args) == 2
    assert needle in capsys.readouterr().err
