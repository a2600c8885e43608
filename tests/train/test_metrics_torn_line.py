"""A run killed while writing metrics.jsonl leaves a torn last line: `--resume` drops it
(with the records after the last checkpoint) and continues with the same losses as a run
never interrupted; a damaged line elsewhere is a clear DataError, not a traceback."""
from __future__ import annotations

import itertools
import json

import pytest

from dsmoe import ModelArgs
from dsmoe.data import mathgen
from dsmoe.data.prepare import prepare
from dsmoe.errors import DataError
from dsmoe.train.config import TrainConfig
from dsmoe.train.pretrain import train
from dsmoe.train.run_dir import METRICS_FILE, read_metrics

TINY = ModelArgs.from_preset("tiny").replace(n_layers=2, n_mtp_layers=0)
CFG = dict(batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_interval=0, eval_batches=1,
           ckpt_interval=2, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    src = tmp_path_factory.mktemp("text") / "math.txt"
    src.write_text("\n\n".join(mathgen.as_document(p) for p in itertools.islice(mathgen.problems("train", seed=0), 120)))
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(out, [src], vocab_size=512, show_progress=False)
    return out


def _losses(out) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]


def test_resume_after_a_torn_last_line(data, tmp_path):
    import shutil

    cfg = TrainConfig(**CFG, steps=4)
    out = train(TINY, cfg, data, tmp_path / "run", progress=False, export=False).out
    want = _losses(out)
    # As if killed while logging step 4, before its checkpoint: the last line is torn.
    shutil.rmtree(out / "checkpoints" / "step-000004")
    lines = (out / METRICS_FILE).read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) < 4]
    (out / METRICS_FILE).write_text("".join(kept) + '{"step": 4, "loss": 3.14')
    assert [s for s, _ in _losses(out)] == [1, 2, 3]  # the reader drops the torn line
    resumed = train(TINY, cfg, data, out, resume=True, progress=False, export=False)
    assert resumed.step == 4
    assert _losses(out) == want  # steps 3-4 again, bit for bit; the torn record gone
    assert all(line.endswith("}") for line in (out / METRICS_FILE).read_text().splitlines())


def test_a_damaged_line_inside_the_log_is_named(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match=rf"{METRICS_FILE}: line 2 is not a JSON record"):
        read_metrics(tmp_path)
