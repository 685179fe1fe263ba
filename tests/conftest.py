import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = ["tiny-llama", "tiny-opt", "tiny-qwen2"]

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
)


@pytest.fixture
def text_corpus(tmp_path):
    """A small local text file corpus (train: first 90% of lines, test: the rest)."""
    lines = [f"{i}: {TEXT[(i * 7) % 50:]}{TEXT[: (i * 13) % 60]}" for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


def ids_for(tok, n=2, seq=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tok) - 3, (n, seq), generator=g)


def assert_logits_same_on_every_path(model, tok, seqs=(1, 5, 40)):
    """The model's logits with the CPU kernels equal the plain-torch reference's, for decode-sized
    inputs (the row kernels) and prefill-sized ones (dequantize/rebuild + BLAS)."""
    from llmdeploy.kernels import use_reference

    for seq in seqs:
        ids = ids_for(tok, n=1, seq=seq)
        with torch.no_grad():
            fast = model(ids).logits
            with use_reference():
                ref = model(ids).logits
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def interrupt_at(model, n_calls, training_only=False):
    """A hook that raises KeyboardInterrupt at the ``n_calls``-th forward of ``model``'s input
    embedding (only forwards in training mode with ``training_only``): a run cut off mid-way."""
    calls = {"n": 0}

    def hook(module, *_):
        calls["n"] += module.training or not training_only
        if calls["n"] == n_calls:
            raise KeyboardInterrupt

    return model.get_input_embeddings().register_forward_hook(hook)
