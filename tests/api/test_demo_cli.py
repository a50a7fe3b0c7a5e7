"""The demo pipeline at a tiny size on a fixed seed, and the CLI (demo, eval, errors)."""
import json

import numpy as np
import pytest
import torch

from bct_fast import cli
from bct_fast.demo import format_table, quick_config, run_demo


def test_demo_pipeline_qualitative_result(tmp_path):
    """sklearn digits: old model on 3 digits, new on 7, retrieval on the 3 held-out digits."""
    pytest.importorskip("sklearn")
    cfg = quick_config("digits")
    r = run_demo(cfg, out_dir=tmp_path, progress=False)
    assert r["open_set"]["classes"] == 3 and r["closed_set"]["classes"] == 7
    m = r["open_set"]["methods"]
    assert set(m) == {"independent", "l2", "bct_old_classes_only", "bct", "bct_class_means"}
    # Independently trained embeddings are incompatible: cross-test near chance (1/3 classes).
    assert m["independent"]["new/old"]["mean_average_precision"] < 0.6
    # The influence loss with synthesized rows makes new queries find old gallery items.
    for bct in ("bct", "bct_class_means"):
        assert m[bct]["new/old"]["precision_at_1"] > m["independent"]["new/old"]["precision_at_1"] + 0.25
    assert "compatible" in format_table(r)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["open_set"]["methods"]["bct"]["new/old"] == m["bct"]["new/old"]
    assert (tmp_path / "compatibility.png").read_bytes()[:4] == b"\x89PNG"
    # training curves of class-mean BCT: one record per epoch, the last equal to the final model's
    curve = saved["training_curves"]["bct_class_means"]["epochs"]
    assert [e["epoch"] for e in curve] == list(range(cfg.new_epochs))
    last = r["closed_set"]["methods"]["bct_class_means"]
    assert curve[-1]["new_old"] == pytest.approx(last["new/old"]["precision_at_1"])
    assert (tmp_path / "curves_bct_class_means.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    assert "cuda_compiled" in json.loads(capsys.readouterr().out)


def test_cli_bad_flag():
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--device", "tpu"])
    assert e.value.code == 2


def test_cli_eval(tmp_path, capsys, seed):
    x = torch.randn(50, 8)
    y = torch.randint(0, 5, (50,))
    np.save(tmp_path / "q.npy", x.numpy())
    np.save(tmp_path / "ql.npy", y.numpy())
    assert cli.main(["eval", "--query", str(tmp_path / "q.npy"), "--query-labels", str(tmp_path / "ql.npy"),
                     "--k", "all"]) == 0
    text = capsys.readouterr().out  # the seed fixture prints a line first
    out = json.loads(text[text.index("{"):])
    from bct_fast.metrics import evaluate_retrieval
    assert out["mean_average_precision"] == pytest.approx(evaluate_retrieval(x, y, k="all")["mean_average_precision"])
    assert cli.main(["eval", "--query", str(tmp_path / "q.npy"), "--query-labels", str(tmp_path / "ql.npy"),
                     "--gallery", str(tmp_path / "q.npy"), "--gallery-labels", str(tmp_path / "ql.npy"),
                     "--exclude-self"]) == 0


@pytest.mark.parametrize("args,needle", [
    (["--query", "missing.npy", "--query-labels", "ql.npy"], "file not found"),
    (["--query", "q.txt", "--query-labels", "ql.npy"], ".npy or .safetensors"),
    (["--query", "q.npy", "--query-labels", "short.npy"], "--query-labels"),
    (["--query", "q.npy", "--query-labels", "ql.npy", "--gallery", "g.npy", "--gallery-labels", "ql.npy"], "--gallery"),
    (["--query", "q.npy", "--query-labels", "ql.npy", "--gallery", "q.npy"], "both or neither"),
])
def test_cli_eval_errors(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    np.save("q.npy", np.random.randn(10, 4).astype(np.float32))
    np.save("g.npy", np.random.randn(10, 5).astype(np.float32))
    np.save("ql.npy", np.arange(10) % 3)
    np.save("short.npy", np.arange(4))
    (tmp_path / "q.txt").write_text("1 2 3")
    assert cli.main(["eval", *args]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1])
def test_families_protocol_keeps_training_query_and_gallery_families_disjoint(seed):
    """protocol='families': no training image shares a font family with a query or gallery
    image, and queries and gallery come from two different unseen families."""
    from bct_fast import data as datasets
    from bct_fast.demo import default_config, load_data

    cfg = default_config()
    cfg.protocol, cfg.seed = "families", seed
    x, _, font, _ = datasets.glyph_dataset(cfg.image_size, augment=cfg.augment, seed=cfg.seed)
    families: dict = {}  # image bytes -> families rendering exactly it (a few glyphs coincide)
    for img, f in zip(x, font):
        families.setdefault(img.numpy().tobytes(), set()).add(int(f) // 4)

    def of(images):
        found = [families[img.numpy().tobytes()] for img in images]
        return {next(iter(f)) for f in found if len(f) == 1}

    d = load_data(cfg)
    train_families = of(d.train_x)
    for name, (xe, _, is_query) in d.eval_sets.items():
        q, g = of(xe[is_query]), of(xe[~is_query])
        assert len(q) == len(g) == 1 and q != g, name
        assert not (q | g) & train_families, name
    assert len(train_families) == 2


def test_an_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """--out under a regular file: the demo and compat used to train / search first and then
    die on a traceback writing the results (after ~1 h for `demo --dataset cjk`)."""
    import bct_fast.demo as demo

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "sub"

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(demo, "load_data", no_work)
    with pytest.raises(OSError):
        run_demo(quick_config("synthetic"), out_dir=out, progress=False)
    assert cli.main(["demo", "--quick", "--dataset", "synthetic", "--out", str(out), "--no-progress"]) == 2
    assert f"bct-fast demo: {out}" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.random.randn(10, 4).astype(np.float32))
    np.save(tmp_path / "ql.npy", np.arange(10) % 3)
    monkeypatch.setattr("bct_fast.evaluate.cross_test", no_work)
    model = f"{tmp_path / 'q.npy'}"
    assert cli.main(["compat", "--model", f"old={model}", "--model", f"new={model}",
                     "--query-labels", str(tmp_path / "ql.npy"), "--out", str(out)]) == 2
    assert f"bct-fast compat: {out}" in capsys.readouterr().err
