"""The demo pipeline at a small size, and the CLI."""
import json

import pytest

from bct_fast import cli
from bct_fast.demo import DemoConfig, format_table, run_demo


@pytest.mark.slow
def test_demo_pipeline_qualitative_result():
    cfg = DemoConfig(num_classes=120, old_classes=40, train_classes=90, samples_per_class=16,
                     old_epochs=8, new_epochs=10, seed=0)
    r = run_demo(cfg)
    m = r["methods"]
    assert set(m) == {"independent", "l2", "bct_old_classes_only", "bct"}
    # Independently trained embeddings are incompatible: cross-test near chance (1/30 classes).
    assert m["independent"]["new/old"]["precision_at_1"] < 0.15
    # The influence loss with synthesized rows makes new queries find old gallery items.
    assert m["bct"]["new/old"]["precision_at_1"] > m["independent"]["new/old"]["precision_at_1"] + 0.15
    assert "compatible" in format_table(r)


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    assert "cuda_compiled" in json.loads(capsys.readouterr().out)


def test_cli_bad_flag():
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--device", "tpu"])
    assert e.value.code == 2
