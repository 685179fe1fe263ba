"""Full-parameter fine-tuning (the fine-tunes BitDelta compresses)."""

import pytest
import torch

import llmdeploy
from llmdeploy.errors import CheckpointError, ConfigError
from llmdeploy.finetune import FullFinetune
from llmdeploy.finetune.full import cosine_schedule

from .conftest import ids_for, interrupt_at


def test_cosine_schedule_shape():
    f = [cosine_schedule(i, 100, 10) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] < 0.01


def test_full_finetune_lowers_loss_and_changes_every_matrix():
    model, tok = llmdeploy.load("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = ids_for(tok, n=8, seq=32)
    ft = FullFinetune(steps=12, lr=3e-3, batch_size=4)
    model = ft(model, calib)
    h = ft.report_.history
    assert len(h) == 12 and sum(h[-3:]) / 3 < sum(h[:3]) / 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    assert not model.training


def test_resume_equals_uninterrupted_run(tmp_path):
    calib = ids_for(llmdeploy.load("tiny-qwen2")[1], n=8, seq=32)
    ref, _ = llmdeploy.load("tiny-qwen2")
    FullFinetune(steps=6, lr=1e-3, batch_size=2)(ref, calib)
    model, _ = llmdeploy.load("tiny-qwen2")
    cfg = dict(steps=6, lr=1e-3, batch_size=2, checkpoint_dir=str(tmp_path), save_every=2)
    handle = interrupt_at(model, 5)  # dies in step 5, after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        FullFinetune(**cfg)(model, calib)
    handle.remove()
    fresh, _ = llmdeploy.load("tiny-qwen2")
    ft = FullFinetune(**cfg, resume=True)
    fresh = ft(fresh, calib)
    assert ft.report_.resumed_at == 4 and len(ft.report_.history) == 6
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(CheckpointError, match="different fine-tuning run"):
        FullFinetune(**{**cfg, "lr": 5e-4}, resume=True)(fresh, calib)


def test_full_finetune_errors():
    model, tok = llmdeploy.load("tiny-llama")
    with pytest.raises(ConfigError):
        FullFinetune(steps=0)(model, ids_for(tok))
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        FullFinetune(resume=True)(model, ids_for(tok))


def test_training_state_survives_an_interrupted_save(tmp_path):
    """A save cut off before ``progress.json`` names its folder leaves the previous state whole."""
    from llmdeploy.compress.state import TrainingState

    st = TrainingState(tmp_path, "fp", "fine-tuning")
    st.save(2, {"w": torch.ones(3)}, {"opt": {"lr": 1.0}}, {"history": [1.0, 0.5]})
    (tmp_path / "step-4").mkdir()  # the next save died while writing its tensors
    (tmp_path / "step-4" / "tensors.safetensors").write_bytes(b"half a file")
    step, tensors, opt, progress = st.load()
    assert step == 2 and torch.equal(tensors["w"], torch.ones(3)) and opt == {"opt": {"lr": 1.0}}
    assert progress["history"] == [1.0, 0.5]
    st.save(4, {"w": torch.zeros(3)}, {}, {"history": []})
    assert st.load()[0] == 4 and sorted(p.name for p in tmp_path.glob("step-*")) == ["step-4"]
    with pytest.raises(CheckpointError, match="different fine-tuning run"):
        TrainingState(tmp_path, "other", "fine-tuning").load()
