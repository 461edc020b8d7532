"""``TopKReplay``: compared forms of a model that selects by top-k make the original's choices, so a rounding
difference between near-tied scores is not read as a different function, and a real difference still is."""
import numpy as np
import paddle
import pytest

from ppfuse.core.verify import TopKReplay, compare
from ppfuse.errors import VerificationError


def _select(scores, features, k=4):
    """Features of the k best-scoring rows (RT-DETR's query selection, in small)."""
    _, index = paddle.topk(scores, k, axis=-1)
    return paddle.gather(features, index.reshape([-1]), axis=0) * 2.0


def _tied_inputs():
    rng = np.random.RandomState(0)
    scores = np.linspace(0, 1, 16).astype("float32")
    scores[[3, 12]] = 0.9  # a tie at the 4th place: rounding decides which row is chosen
    scores[[13, 14, 15]] = [0.95, 0.97, 0.99]
    return scores, rng.normal(size=(16, 5)).astype("float32")


def test_replayed_choices_compare_the_values_not_the_selection():
    scores, features = _tied_inputs()
    choices = TopKReplay()
    with choices.record():
        original = _select(paddle.to_tensor(scores), paddle.to_tensor(features)).numpy()
    chosen = 3 if 3 in choices.indices[0] else 12
    bumped = scores.copy()
    bumped[chosen] -= 1e-7  # a rounding-size difference that flips the tie
    own = _select(paddle.to_tensor(bumped), paddle.to_tensor(features)).numpy()
    assert not compare({"y": original}, {"y": own}, 1e-5, 1e-5).within_tolerance  # another row was chosen
    with choices.replay():
        replayed = _select(paddle.to_tensor(bumped), paddle.to_tensor(features)).numpy()
    assert choices.changed == 1 and choices.total == 4
    np.testing.assert_allclose(replayed, original, rtol=0, atol=0)
    assert "1 of 4 chosen indices would differ" in choices.describe()


def test_a_real_difference_is_still_one_with_the_choices_replayed():
    scores, features = _tied_inputs()
    choices = TopKReplay()
    with choices.record():
        original = _select(paddle.to_tensor(scores), paddle.to_tensor(features)).numpy()
    with choices.replay():
        wrong = _select(paddle.to_tensor(scores), paddle.to_tensor(features * 1.01)).numpy()
    assert choices.changed == 0
    result = compare({"y": original}, {"y": wrong}, 1e-5, 1e-5)
    assert not result.within_tolerance and result.max_rel == pytest.approx(0.01, rel=1e-3)


def test_runs_that_take_other_paths_are_refused():
    scores, features = _tied_inputs()
    choices = TopKReplay()
    with choices.record():
        _select(paddle.to_tensor(scores), paddle.to_tensor(features))
    with pytest.raises(VerificationError, match="paddle.topk call 1 .* does not match"):
        with choices.replay():
            _select(paddle.to_tensor(scores), paddle.to_tensor(features), k=5)
    with pytest.raises(VerificationError, match="paddle.topk call 2 .* does not match"):
        with choices.replay():
            _select(paddle.to_tensor(scores), paddle.to_tensor(features))
            _select(paddle.to_tensor(scores), paddle.to_tensor(features))
    assert paddle.topk.__module__.startswith("paddle")  # put back, also after the error
