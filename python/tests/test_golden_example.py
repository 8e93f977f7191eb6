"""A regression test to copy: export a checkpoint, check its logits against a golden file (made on
the first run) and its greedy continuation. Run with `PYTHONPATH=build/python python3 -m pytest
python/tests` from a kiln checkout (docs/regression-testing.md)."""
import os

import numpy as np
import pytest

import kiln

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "..", "models", "default")
TOKENS = [1, 5, 9, 2, 7, 3, 11, 4]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kiln") / "model.kiln")
    summary = kiln.export([os.path.join(MODEL, "model.safetensors")],
                          os.path.join(MODEL, "config.yml"), out,
                          tokenizer=os.path.join(MODEL, "tokenizer.model"))
    assert summary["layers"] > 0
    return kiln.Engine(out)


def test_logits_match_golden(engine, tmp_path):
    golden = os.environ.get("KILN_GOLDEN", str(tmp_path / "golden.npy"))
    logits = engine.logits(TOKENS)
    if not os.path.exists(golden):
        np.save(golden, logits)  # the first run makes the golden file
    want = np.load(golden)
    np.testing.assert_allclose(logits, want, atol=1e-3)
    assert (logits.argmax(-1) == want.argmax(-1)).all()


def test_greedy_continuation_is_stable(engine):
    first = "".join(engine.generate_text("Once upon a time", 12))
    again = "".join(engine.generate_text("Once upon a time", 12))
    assert first == again and first


def test_bad_token_is_a_kiln_error(engine):
    with pytest.raises(kiln.Error, match="outside the vocabulary"):
        engine.logits([engine.vocab_size])
