"""Suite-wide settings (set before anything imports triton) and the models tests share."""

import os

# Triton kernels run on CPU tensors through Triton's interpreter; the variable is read at import.
os.environ.setdefault("TRITON_INTERPRET", "1")
# No hub is reachable on these machines: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from balcony_runtime.loader import LoadedModel, load_model  # noqa: E402


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The default model in fp32 with freshly initialised balconies."""
    return load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def default_hf(default_model):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model) -> Path:
    """A random 4-layer LLaMA with an untied head and GQA 4/2, sharing the default tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(default_model.tokenizer), hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms, so a norm applied to the wrong tensor shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    default_model.tokenizer.save_pretrained(path)
    return path


