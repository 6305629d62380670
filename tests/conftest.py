"""Shared fixtures: tiny random-weight Llama / GPT-2 / OPT models, and the real default model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent   # the package is installed (pyproject.toml)
# How long a test waits for a job's own completion signal (a status line, a plot, a file, a
# subprocess's exit): generous, so that a busy shared machine slows a test down instead of failing
# it, while a hang still ends. DTM_TEST_WAIT_S changes it.
WAIT_S = float(os.environ.get("DTM_TEST_WAIT_S", "1200"))
WAIT_MS = int(WAIT_S * 1000)

from dtm_core.models.load import LoadedModel, load_model

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 512


def tiny_config(family: str):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(family)


class TinyTokenizer:
    """Token ids are numbers in text: enough for decode and the pad/eos bookkeeping."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1
    chat_template = None

    def __len__(self):
        return VOCAB

    def get_vocab(self):
        return {str(i): i for i in range(VOCAB)}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


def make_tiny(family: str, seed: int = 0, scale: float = 1.0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # bigger weights give peaked, non-degenerate distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=TinyTokenizer(), source=f"tiny-{family}",
                       description=f"tiny random {family}", fingerprint=f"tiny-{family}-{seed}")


@pytest.fixture(params=["llama", "gpt2", "opt"])
def tiny(request) -> LoadedModel:
    return make_tiny(request.param, scale=8.0)


@pytest.fixture(scope="session")
def default_q4_gguf(tmp_path_factory):
    """A Q4_0 re-quantization of the default GGUF (gguf-py; only the decoder's matrices change),
    written once per session: its de-quantized cache is then built once too."""
    from gguf_requant import requantize
    from dtm_core.models.load import default_gguf_path

    out = tmp_path_factory.mktemp("gguf") / "q4_0.gguf"
    requantize(str(default_gguf_path()), str(out), "Q4_0")
    return out


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> LoadedModel:
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    return load_model("default")


def random_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lens]


class NumberTokenizer(TinyTokenizer):
    """Text is whitespace-separated token ids: lets tests write exact prompts for tiny models."""

    def __call__(self, text, add_special_tokens=True):
        class Encoded:
            input_ids = [int(w) for w in text.split()]
        return Encoded()


class ChatNumberTokenizer(NumberTokenizer):
    """A NumberTokenizer with a chat template: each user turn becomes ``1 5 <ids> 6`` and the
    generation prompt ``7``, rendered by jinja2 as transformers renders templates."""

    chat_template = ("{% for m in messages %}1 5 {{ m['content'] }} 6 {% endfor %}"
                     "{% if add_generation_prompt %}7{% endif %}")

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kw):
        import jinja2

        text = jinja2.Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)
        return self(text).input_ids if tokenize else text


def hf_greedy(model, ids, n, eos, pad_id=0):
    """transformers' own generate, one prompt at a time, cut after the first EOS: ground truth."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=pad_id)[0, len(ids):].tolist()
    for k, t in enumerate(out):
        if t in eos:
            return out[:k + 1]
    return out


def greedy_fdt(dense: list[int], comp: list[int], n: int) -> int:
    """Where two greedy texts first differ (n when they agree): FDT by its definition."""
    if dense == comp:
        return n
    return next((t for t, (a, b) in enumerate(zip(dense, comp)) if a != b),
                min(len(dense), len(comp)))
